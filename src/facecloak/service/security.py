"""Who may use the service: API keys, the host a request names, the site that sent it.

Each is checked before a byte of the request body is read.
"""

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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""The names a service bound to this machine alone answers to, unless told more (``--allowed-host``)."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def request_host(value: str) -> str:
    """The host of a ``Host`` header, less its port: ``[::1]:8000`` -> ``::1``, ``Ex.org.`` -> ``ex.org``."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 address: [::1]:8000
        value = value[1 : value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")


class SameSiteOnly:
    """ASGI middleware: refuse a request to a host the service does not serve, or sent by another site.

    - ``Host`` not in ``hosts`` (None: any host): 400 ``host_not_allowed``. A service on 127.0.0.1
      answered a page of any site that pointed its own name at 127.0.0.1 (DNS rebinding), and that
      page could then read every answer and ``/metrics``.
    - An unsafe method (POST) that a browser marks as sent by another site's page (``Sec-Fetch-Site``
      ``cross-site`` or ``same-site``) from an origin not in ``origins``: 403 ``cross_site_request``.
      CORS does not stop a form POST, which a browser sends without asking: any page a user
      visited could make a service on their machine cloak its photos, or spend its CPU.
    """

    def __init__(
        self,
        app,
        hosts: frozenset[str] | None,
        origins: frozenset[str] = frozenset(),
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.hosts = None if hosts is None else frozenset(request_host(host) for host in hosts)
        self.origins = origins
        self.on_refusal = on_refusal

    async def __call__(self, scope, receive, send) -> None:
        """Check the request's host and site, then pass it on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host")
        if self.hosts is not None and host is not None:
            name = request_host(host.decode("latin-1"))
            if name not in self.hosts:
                refused = UploadRejected(
                    400,
                    "host_not_allowed",
                    f"this service does not answer to host {name!r}: start it with --allowed-host {name} "
                    "if it should (a name pointed at this machine by another site is refused)",
                )
                await _send_json(send, refused, self.on_refusal)
                return
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
        origin = headers.get(b"origin", b"").decode("latin-1")
        if (
            scope["method"] not in SAFE_METHODS
            and site in ("cross-site", "same-site")
            and origin not in self.origins
        ):
            refused = UploadRejected(
                403,
                "cross_site_request",
                f"a page of another site ({origin or 'unknown origin'}) may not send requests here; "
                "allow its origin with --cors-origin if it should",
            )
            await _send_json(send, refused, self.on_refusal)
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
