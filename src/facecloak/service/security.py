"""Optional API keys: checked before a byte of the request body is read."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from facecloak.service.limits import UploadRejected, _send_json

PROTECTED_PATHS = ("/v1/", "/metrics")
"""Paths (prefixes) that need a key when keys are configured. ``/metrics`` is among them: its
counts (requests, faces, refusals by reason, queue depth) tell whoever reads them how the service
is used; a Prometheus scrape job sends the key as its bearer token."""

OPEN_PATHS = frozenset({"/v1/info"})
"""Open even with keys: the web page reads it to know whether to ask for a key."""


def route_path(scope) -> str:
    """The path the app routes on: ``scope["path"]`` less the ``root_path`` it is served under.

    Behind a proxy prefix (``uvicorn --root-path /fc``) or mounted in another app, ``path`` holds
    the prefix: ``/fc/v1/cloak`` did not start with ``/v1/``, and every endpoint answered with no key.
    """
    path, root = scope["path"], scope.get("root_path", "")
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):  # not /fcx under /fc
        return path[len(root.rstrip("/")) :] or "/"
    return path


class ApiKeyAuth:
    """ASGI middleware: requests under ``prefixes`` (except ``OPEN_PATHS``) need one of ``keys``.

    The key comes as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. No key: 401 (with
    ``WWW-Authenticate``); a wrong key: 403. Keys are compared in constant time and never logged.
    ``/healthz``, the page, its files and the API docs stay open.
    """

    def __init__(
        self,
        app,
        keys: frozenset[str],
        prefixes: tuple[str, ...] = PROTECTED_PATHS,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        """``on_refusal``: called with the refusal's code (the metrics count refusals by reason)."""
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.prefixes = prefixes
        self.on_refusal = on_refusal

    async def __call__(self, scope, receive, send) -> None:
        """Check the key of API and metrics requests, then pass them on."""
        if (
            scope["type"] != "http"
            or not route_path(scope).startswith(self.prefixes)
            or route_path(scope) in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"").strip()
        authorization = headers.get(b"authorization", b"")
        if not given and authorization.lower().startswith(b"bearer "):  # an empty X-API-Key is none
            given = authorization[7:].strip()
        if not given:
            await _send_json(
                send,
                UploadRejected(
                    401,
                    "api_key_missing",
                    "this service needs an API key: send 'Authorization: Bearer KEY'",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
                self.on_refusal,
            )
            return
        if not any(hmac.compare_digest(given, key) for key in self.keys):
            wrong = UploadRejected(403, "api_key_wrong", "the API key is not accepted")
            await _send_json(send, wrong, self.on_refusal)
            return
        await self.app(scope, receive, send)


PRIVACY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
)
"""On every answer: no type sniffing of a returned photo, no page URL leaked to other sites, and
the page never framed by another site (a click-jacking frame could pass photos to its uploads)."""

NO_STORE_PREFIXES = ("/v1/",)
"""Answers that carry a person's photo or its faces: ``Cache-Control: no-store``, so that no
shared proxy or browser cache keeps a copy."""


class PrivacyHeaders:
    """ASGI middleware: `PRIVACY_HEADERS` on every HTTP answer, ``no-store`` under `NO_STORE_PREFIXES`.

    A header the endpoint set itself is left as it is.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        """Pass the request on; add the headers to its answer's start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(PRIVACY_HEADERS)
        if route_path(scope).startswith(NO_STORE_PREFIXES):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
