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
            or not scope["path"].startswith(self.prefixes)
            or scope["path"] in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key")
        authorization = headers.get(b"authorization", b"")
        if given is None and authorization.lower().startswith(b"bearer "):
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
