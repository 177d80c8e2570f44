"""Optional API keys: checked before a byte of the request body is read."""

from __future__ import annotations

import hmac

from facecloak.service.limits import UploadRejected, _send_json


class ApiKeyAuth:
    """ASGI middleware: requests under ``prefix`` need one of ``keys``.

    The key comes as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. No key: 401 (with
    ``WWW-Authenticate``); a wrong key: 403. Keys are compared in constant time and never logged.
    """

    def __init__(self, app, keys: frozenset[str], prefix: str = "/v1/") -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.prefix = prefix

    async def __call__(self, scope, receive, send) -> None:
        """Check the key of API requests, then pass them on."""
        if (
            scope["type"] != "http"
            or not scope["path"].startswith(self.prefix)
            or scope["path"] == "/v1/info"
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
            )
            return
        if not any(hmac.compare_digest(given, key) for key in self.keys):
            await _send_json(send, UploadRejected(403, "api_key_wrong", "the API key is not accepted"))
            return
        await self.app(scope, receive, send)
