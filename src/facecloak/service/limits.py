"""What an upload must pass before it reaches a model: size, content and pixel caps.

Each check fails with an `UploadRejected` carrying the HTTP status and a one-line reason:

- the request body is capped by `BodySizeLimit`, an ASGI middleware that answers 413 from the
  ``Content-Length`` header before reading anything, and otherwise counts the bytes as they
  arrive and stops reading at the cap (chunked uploads);
- the content is sniffed from its bytes (`facecloak.io.probe_image_bytes`), never trusted from
  the file name or the declared content type (415);
- the pixel count is read from the image header before any decoding (413), so a 30,000 x
  30,000 PNG bomb costs a few bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from facecloak import io
from facecloak.errors import ImageReadError

READABLE_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF"} | ({"HEIF"} if io.HEIF_AVAILABLE else set())
)
"""Formats an upload may have (sniffed). PIL reads more (ICO, PSD, ...), the service does not."""


class UploadRejected(Exception):
    """A request the service refuses, with its HTTP status, a short code and a one-line reason."""

    def __init__(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = " ".join(reason.split())
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON error body every refusal shares."""
        return {"error": self.code, "reason": self.reason, "status": self.status}


def check_upload(data: bytes, *, max_pixels: int) -> tuple[str, int, int]:
    """Sniff the upload's format and size from its header; refuse it before decoding.

    Returns:
        (format, width, height).

    Raises:
        UploadRejected: 400 empty, 415 not an image of a readable format, 413 too many pixels.
    """
    if not data:
        raise UploadRejected(400, "empty_upload", "the uploaded file is empty (0 bytes)")
    try:
        format_name, width, height = io.probe_image_bytes(data, max_pixels=max_pixels)
    except ImageReadError as error:
        if "pixels" in error.reason:
            reason = f"{error.reason} (this service's limit is {max_pixels:,} pixels)"
            raise UploadRejected(413, "too_many_pixels", reason) from None
        raise UploadRejected(
            415,
            "unsupported_media_type",
            "the upload is not an image in a readable format (JPEG, PNG, WebP, TIFF, BMP, GIF"
            + (", HEIC" if io.HEIF_AVAILABLE else "")
            + "); the content is checked, not the file name or content type",
        ) from None
    if format_name not in READABLE_FORMATS:
        raise UploadRejected(
            415, "unsupported_media_type", f"image format {format_name or '?'} is not accepted"
        )
    if width * height > max_pixels:
        raise UploadRejected(
            413,
            "too_many_pixels",
            f"{width}x{height} = {width * height:,} pixels, more than this service's limit of {max_pixels:,}",
        )
    return format_name, width, height


class BodyTooLarge(Exception):
    """Raised inside the app when the request body passes the cap while being read."""


class BodySizeLimit:
    """ASGI middleware: refuse request bodies larger than ``max_bytes`` with 413, reading no more.

    With a ``Content-Length`` over the cap the answer comes before a byte of the body is read.
    Without one (chunked), bytes are counted as they arrive; at the cap reading stops, whatever
    the app was about to answer is dropped, and the 413 is sent instead.
    """

    def __init__(self, app, max_bytes: int, on_refusal: Callable[[str], None] | None = None) -> None:
        """``on_refusal``: called with the refusal's code (the metrics count refusals by reason)."""
        self.app = app
        self.max_bytes = int(max_bytes)
        self.on_refusal = on_refusal

    def _rejection(self) -> UploadRejected:
        return UploadRejected(
            413,
            "upload_too_large",
            f"the request body is larger than this service's limit of {self.max_bytes:,} bytes "
            f"({self.max_bytes / 2**20:.0f} MiB)",
        )

    async def __call__(self, scope, receive, send) -> None:
        """Pass the request on, cut at the cap."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, self._rejection(), self.on_refusal)
            return
        state = {"received": 0, "tripped": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["tripped"] = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message) -> None:
            if state["tripped"]:
                return  # the app's answer to a half-read body is replaced by the 413
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if state["tripped"] and not state["started"]:
            await _send_json(send, self._rejection(), self.on_refusal)


async def _send_json(
    send, rejection: UploadRejected, on_refusal: Callable[[str], None] | None = None
) -> None:
    """Answer with the refusal's JSON body, from a middleware (the app's error handlers are inside)."""
    if on_refusal is not None:
        on_refusal(rejection.code)
    body = json.dumps(rejection.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in rejection.headers.items()]
    await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
