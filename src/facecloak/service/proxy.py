"""Serving behind a reverse proxy's path prefix, whether the proxy strips the prefix or keeps it."""

from __future__ import annotations


class PathPrefix:
    """ASGI wrapper: the app is served under ``prefix`` (``/facecloak``), given or not in the path.

    A proxy that strips the prefix sends ``/v1/info``; one that keeps it sends ``/facecloak/v1/info``.
    ASGI wants the prefix in both ``root_path`` and ``path``, so it is added to a path that lacks
    it. (uvicorn's own ``--root-path`` adds it to every path: a kept prefix came out twice,
    ``/facecloak/facecloak/v1/info``, and every request through such a proxy got 404.)
    """

    def __init__(self, app, prefix: str) -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")

    def __getattr__(self, name: str):  # ``state``, ``openapi``, ...: the wrapped app's
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        """Set ``root_path`` and put the prefix in front of a path that came without it."""
        if scope["type"] not in ("http", "websocket") or not self.prefix:
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "").rstrip("/") + self.prefix
        path = scope["path"]
        if not _under(path, root):
            path = root + path
        raw = scope.get("raw_path")
        if raw is not None and not _under(raw.decode("latin-1"), root):
            raw = root.encode("latin-1") + raw
        await self.app({**scope, "root_path": root, "path": path, "raw_path": raw}, receive, send)


def _under(path: str, prefix: str) -> bool:
    """Whether ``path`` lies under ``prefix`` (``/fc/v1`` and ``/fc`` do, ``/fcx`` does not)."""
    return path == prefix or path.startswith(prefix + "/")
