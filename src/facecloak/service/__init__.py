"""The HTTP service: ``facecloak serve`` (FastAPI on uvicorn), a thin shell over the Python API.

`create_app(settings)` builds the app: versioned endpoints ``/v1/cloak``, ``/v1/anonymize`` and
``/v1/detect``, ``/healthz``, ``/metrics`` (Prometheus) and the web page at ``/``. Uploads are
checked before they are decoded (`facecloak.service.limits`) and micro-batched onto models that
are loaded once (`facecloak.service.batcher`). Needs ``pip install 'facecloak[serve]'``.
"""

from facecloak.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]


def create_app(settings: ServiceSettings | None = None):
    """Build the FastAPI app (imported lazily: the service's packages are an optional extra)."""
    from facecloak.service.app import create_app as _create_app

    return _create_app(settings)
