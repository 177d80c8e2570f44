"""``facecloak serve``: the HTTP service (FastAPI on uvicorn) over the same Python API."""

from __future__ import annotations

from pathlib import Path

import click

from facecloak.cli.options import CONTEXT, FiniteFloatRange, say_left_out, say_unchecked, usable_device


@click.command(context_settings=CONTEXT)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind. 0.0.0.0 exposes the service."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option(
    "--device",
    default=None,
    callback=usable_device,
    help="torch device, e.g. cpu or cuda:0. Default: CUDA if present.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Model workers, each with its own copy of the models (one per GPU; on a CPU keep 1).",
)
@click.option(
    "--models", default=None, help="Comma-separated models the cloak attacks. Default: all available."
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1, 4096),
    default=50,
    show_default=True,
    help="Upload cap (413 above).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1, None),
    default=50_000_000,
    show_default=True,
    help="Pixel cap, read from the image header before decoding (413 above).",
)
@click.option(
    "--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True, help="Photos per model call."
)
@click.option(
    "--batch-wait-ms",
    type=FiniteFloatRange(0, 1000),
    default=10.0,
    show_default=True,
    help="How long a worker waits for more photos to batch after the first.",
)
@click.option(
    "--queue-size",
    type=click.IntRange(1, 100_000),
    default=32,
    show_default=True,
    help="Photos waiting at most; more get 503 with Retry-After.",
)
@click.option(
    "--timeout",
    type=FiniteFloatRange(1, None),
    default=300.0,
    show_default=True,
    help="Per-request limit, s (504).",
)
@click.option(
    "--api-keys",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File of accepted API keys, one per line. Default: no key needed.",
)
@click.option(
    "--cors-origin", multiple=True, help="Allow this origin by CORS (repeatable). Default: CORS off."
)
@click.option(
    "--donors",
    "donor_bank",
    default=None,
    metavar="BANK",
    help="Donor bank (name or folder) for method=replace. Default: replace is not offered.",
)
@click.option(
    "--allowed-host",
    multiple=True,
    metavar="NAME",
    help="Answer requests naming this host (repeatable), e.g. the name a proxy passes on. Default: "
    "on a loopback --host, 127.0.0.1, localhost and ::1 only (a site pointing its name at this "
    "machine is refused); on another address, any host. '*': any host.",
)
@click.option(
    "--root-path",
    default="",
    metavar="PREFIX",
    help="Path prefix a proxy serves this under, e.g. /facecloak (for /docs behind it; the page "
    "and the API need none). Default: none.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe log lines printed on stderr (the service's and the web server's).",
)
def serve(
    host,
    port,
    device,
    workers,
    models,
    max_upload_mb,
    max_pixels,
    max_batch,
    batch_wait_ms,
    queue_size,
    timeout,
    api_keys,
    cors_origin,
    donor_bank,
    allowed_host,
    root_path,
    log_level,
) -> None:
    """Run the HTTP service and its web page (FastAPI on uvicorn).

    Open http://127.0.0.1:8000/ for the page, /docs for the API. The models are loaded once at
    start-up; concurrent uploads are batched onto them. Needs pip install 'facecloak[serve]'.

    \b
    facecloak serve
    curl -F image=@photo.jpg -F method=blur http://127.0.0.1:8000/v1/anonymize -o out.jpg
    curl -F image=@photo.jpg -F level=high -F response=json http://127.0.0.1:8000/v1/cloak
    facecloak serve --donors mybank    # also offers method=replace (see `facecloak donors`)
    """
    try:
        import uvicorn

        from facecloak.service import ServiceSettings, create_app
        from facecloak.service.proxy import PathPrefix
        from facecloak.service.security import LOOPBACK_HOSTS
    except ImportError as error:
        raise click.UsageError(f"the service needs pip install 'facecloak[serve]' ({error})") from None
    from facecloak._checks import split_names
    from facecloak.errors import FacecloakError
    from facecloak.models import choose_embedders

    _configure_logging(log_level)
    try:  # a misspelt model, or one without its weights: found by the workers as a 40-line start-up traceback
        choose_embedders(models)
        say_left_out(models)
    except FacecloakError as error:
        raise click.UsageError(str(error)) from None
    model_names = tuple(split_names(models)) or None
    if donor_bank is not None:
        donor_bank = _checked_bank(donor_bank, models)
    settings = ServiceSettings(
        device=device,
        workers=workers,
        models=model_names,
        max_upload_bytes=max_upload_mb * 1024 * 1024,
        max_pixels=max_pixels,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        queue_size=queue_size,
        request_timeout_s=timeout,
        api_keys_file=api_keys,
        cors_origins=tuple(cors_origin),
        allowed_hosts=_allowed_hosts(host, allowed_host),
        donors=donor_bank,
    )
    try:
        settings.api_keys()
    except (OSError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    if host not in LOOPBACK_HOSTS and not api_keys:
        click.echo(
            f"warning: serving on {host} without --api-keys: anyone who reaches it can use it", err=True
        )
    if root_path and (not root_path.startswith("/") or root_path.endswith("/")):
        raise click.UsageError(f"--root-path {root_path!r}: give it as /prefix, with no slash at its end")
    # the prefix is the app's, not uvicorn's: uvicorn puts its root path in front of every path,
    # and a proxy that kept the prefix then reached nothing (`facecloak.service.proxy`)
    uvicorn.run(
        PathPrefix(create_app(settings), root_path),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
    )


def _allowed_hosts(host: str, given: tuple[str, ...]) -> tuple[str, ...] | None:
    """The ``Host`` names served: those given (``*``: any), else the loopback names on a loopback address."""
    from facecloak.service.security import LOOPBACK_HOSTS

    if "*" in given:
        return None
    if given:
        return (*LOOPBACK_HOSTS, host, *given)
    return (*LOOPBACK_HOSTS, host) if host in LOOPBACK_HOSTS else None


def _checked_bank(name: str, models: str | None) -> str:
    """The bank's folder, or a one-line usage error (no bank, empty, built without a model served)."""
    from facecloak.donor_bank import load_bank
    from facecloak.errors import FacecloakError
    from facecloak.models import choose_embedders
    from facecloak.replace import DONORS_PER_FACE

    try:
        bank = load_bank(name)
        served = choose_embedders(models)
    except FacecloakError as error:
        raise click.UsageError(str(error)) from None
    missing = [model for model in served if model not in bank.models]
    if missing:
        raise click.UsageError(
            f"bank {bank.name!r} holds no embeddings of {', '.join(missing)}, which the service checks "
            f"new faces with; run `facecloak donors refresh {bank._called()}`"
        )
    try:  # a changed card or too few donors stopped the service's start-up with a traceback
        unchecked = bank.check_for_replacing(served, DONORS_PER_FACE, option=None)
    except FacecloakError as error:
        raise click.UsageError(str(error)) from None
    say_unchecked(bank.name, unchecked, served)
    return str(bank.folder)


OWN_LOGGERS = ("facecloak", "uvicorn")
"""The loggers ``--log-level debug`` opens up. Other libraries stay at INFO or above: at DEBUG,
Pillow's TIFF reader logs every EXIF tag of an upload (the camera's owner and serial number, its
comments), and image content and file names are never logged."""


def _configure_logging(log_level: str) -> None:
    import logging

    level = logging.getLevelName(log_level.upper())
    form = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=max(level, logging.INFO), format=form)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
