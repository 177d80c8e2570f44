"""The FastAPI app: endpoints, error bodies, security middleware, the web page.

Every endpoint takes the photo as the multipart field ``image`` and options as form fields named
like the CLI's options (``--mask-scale`` is ``mask_scale``):

    curl -F image=@photo.jpg -F method=blur http://127.0.0.1:8000/v1/anonymize -o out.jpg
    curl -F image=@photo.jpg -F level=high -F response=json http://127.0.0.1:8000/v1/cloak

The answer is the protected image (EXIF dropped as in the CLI; headers ``X-Facecloak-Faces``,
``X-Facecloak-Unprotected-Faces`` and, when the output lacks frames or transparency of the upload,
``X-Facecloak-Notes``), or with ``response=json`` (or ``Accept: application/json``)
the per-face report with the image in base64. Every refusal is JSON
``{"error": code, "reason": one line, "status": n}``; the service keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from facecloak import __version__, io
from facecloak._allocator import limit_arenas, limit_compiled_kernels, release_free_memory
from facecloak._checks import split_names
from facecloak.batch import face_status
from facecloak.cloak import LEVELS
from facecloak.cloak.budget import STRONGER_LEVEL
from facecloak.cloak.verify import DISTANCE_AFTER_UPLOAD_KEY, FOUND_AFTER_UPLOAD_KEY
from facecloak.defaults import (
    CLOAK_OUTPUT_FORMAT,
    DETECT_ROTATIONS,
    MAX_BLOCKS,
    MAX_FEATHER,
    MAX_SEED,
    MIN_FACE_PX,
    MIN_FACE_SCORE,
    MIN_SCALE,
    MIN_STRENGTH,
    OUTPUT_FORMAT_ALIASES,
)
from facecloak.errors import FacecloakError, ImageReadError
from facecloak.service.batcher import Job, JobResult, MicroBatcher, QueueFull
from facecloak.service.limits import BodySizeLimit, BodyTooLarge, UploadRejected, check_upload
from facecloak.service.metrics import MetricsMiddleware, ServiceMetrics
from facecloak.service.security import ApiKeyAuth, PrivacyHeaders, SameSiteOnly, route_path
from facecloak.service.settings import ServiceSettings

log = logging.getLogger("facecloak.service")
STATIC = Path(__file__).parent / "static"
RELEASE_MEMORY_EVERY_S = 30.0
"""How often the service collects garbage and hands the allocator's free memory back
(`_release_memory_every`; with `limit_arenas`: without them its resident memory only grew, README
"Service")."""
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "HEIF": "image/heic",
}
COMMON_FIELDS = {
    "image",
    "format",
    "jpeg_quality",
    "keep_metadata",
    "threshold",
    "min_face",
    "rotations",
    "response",
}
ANONYMIZE_FIELDS = COMMON_FIELDS | {
    "method",
    "shape",
    "mask_scale",
    "strength",
    "blocks",
    "feather",
    "keep_mouth",
}
CLOAK_FIELDS = COMMON_FIELDS | {
    "mode",
    "level",
    "models",
    "identity_key",
    "steps",
    "max_dssim",
    "seed",
    "escalate",
}
DETECT_FIELDS = {"image", "threshold", "min_face", "rotations"}
EXPOSED_HEADERS = (
    "X-Facecloak-Status",
    "X-Facecloak-Faces",
    "X-Facecloak-Unprotected-Faces",
    "X-Facecloak-Notes",
    "Content-Disposition",
    "Retry-After",
)
"""Answer headers a page on an allowed origin may read: CORS hides all but a few by default, and
a cross-origin client could not see whether the faces of the photo it got back were protected."""


ROTATIONS_HELP = (
    "Also look for faces in the photo turned by 90, 180 and 270 degrees (as the CLI's --rotations): "
    "all = always, auto = only when no upright face is found, none = upright only."
)


class CommonForm:
    """Form fields every photo endpoint shares (same names and defaults as the CLI's options)."""

    def __init__(
        self,
        format: Annotated[
            Literal["input", "jpeg", "jpg", "png", "webp", "tiff", "tif", "bmp"] | None,
            Form(
                description=f"Output format. Default: {CLOAK_OUTPUT_FORMAT} for a cloak (a JPEG's "
                "rounding would be charged to its visibility cap), JPEG for a HEIC upload (browsers "
                "do not show HEIC), the upload's own otherwise; input: the upload's own (GIF "
                "becomes PNG)."
            ),
        ] = None,
        jpeg_quality: Annotated[
            int | None,
            Form(
                ge=1,
                le=100,
                description="JPEG/WebP quality: the whole photo re-encoded at it. Default: a JPEG "
                "upload written as JPEG keeps its own quantisation, only the blocks around the faces "
                "re-encoded and every other block bit-exact (as the CLI); other lossy outputs 95.",
            ),
        ] = None,
        keep_metadata: Annotated[
            bool, Form(description="Keep EXIF minus GPS. Default: drop all EXIF (as the CLI).")
        ] = False,
        threshold: Annotated[
            float, Form(allow_inf_nan=False, ge=0, le=1, description="Detection confidence.")
        ] = MIN_FACE_SCORE,
        min_face: Annotated[
            int, Form(ge=4, description="Smallest face side looked for, in pixels.")
        ] = MIN_FACE_PX,
        rotations: Annotated[
            Literal["all", "auto", "none"],
            Form(description=ROTATIONS_HELP),
        ] = DETECT_ROTATIONS,
        response: Annotated[
            Literal["image", "json"] | None,
            Form(
                description="image: the protected photo; json: the per-face report with the photo in base64. "
                "Default: json when the Accept header names application/json, else image."
            ),
        ] = None,
    ) -> None:
        self.format = OUTPUT_FORMAT_ALIASES.get(format, format)
        self.jpeg_quality = jpeg_quality
        self.keep_metadata = keep_metadata
        self.threshold = threshold
        self.min_face = min_face
        self.rotations = rotations
        self.response = response

    def settings(self) -> dict:
        """The fields that shape the output, as a report's ``settings`` names them.

        They were left out, so a request repeated from its report gave another format and looked
        for faces otherwise.
        """
        fields = {
            "format": self.format,
            "jpeg_quality": self.jpeg_quality,
            "keep_metadata": self.keep_metadata,
            "threshold": self.threshold,
            "min_face": self.min_face,
            "rotations": self.rotations,
        }
        return {name: value for name, value in fields.items() if value is not None}  # None: the default


_LEVEL_CAPS = "DSSIM cap over the face " + " / ".join(f"{name} {LEVELS[name].max_dssim}" for name in LEVELS)


def _output_format(kind: str, requested: str | None, upload_format: str) -> str | None:
    """The format asked for, else the default for this kind of request and upload (None: the upload's own).

    A cloak defaults to `CLOAK_OUTPUT_FORMAT`; a HEIC upload (a phone's photo) to JPEG: browsers
    other than Safari show no HEIC, and the page shows the result.
    """
    if requested is None and kind == "cloak":
        return CLOAK_OUTPUT_FORMAT
    if requested is None and upload_format.upper() in ("HEIF", "HEIC"):
        return "jpeg"
    return None if requested == "input" else requested


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the service: load the models (once, at start-up), wire the endpoints and limits.

    Example:
        >>> import uvicorn  # doctest: +SKIP
        >>> app = create_app(ServiceSettings(device="cpu"))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    batcher = MicroBatcher(
        settings,
        on_batch=lambda size, seconds: metrics.batch_size.observe(size),
        on_models_loaded=gc.freeze,  # what is loaded lives on: collections skip it from then on
    )
    decoding = asyncio.Semaphore(4)  # decoded photos in flight, beside those queued (memory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        limit_arenas()  # before the worker and HTTP threads allocate: their memory is handed back
        limit_compiled_kernels()  # before the models' first convolution: photos of every size
        await asyncio.to_thread(batcher.start)  # its engines freeze what they load (`on_models_loaded`)
        log.info(
            "facecloak service ready: %d model worker(s), device %s",
            settings.workers,
            settings.device or "auto",
        )
        releasing = asyncio.create_task(_release_memory_every(RELEASE_MEMORY_EVERY_S))
        try:
            yield
        finally:
            releasing.cancel()
            await asyncio.to_thread(batcher.stop)
            gc.unfreeze()  # a program that ran the app (tests, an embedding server) collects as before

    app = FastAPI(
        title="facecloak",
        version=__version__,
        description="Cloak faces against face-recognition scrapers, or anonymise them. "
        "Upload the photo as multipart field `image`; options are form fields named like the CLI's.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.batcher = batcher

    def refused(code: str) -> None:
        """Count a middleware's refusal as the error handlers count theirs."""
        metrics.rejected.labels(code).inc()

    # Middleware, innermost first: the body cap, the API key check (before a byte of the body is
    # read), the host and cross-site check, CORS (only when origins are given), the request
    # metrics, and the privacy headers outermost.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes, on_refusal=refused)
    keys = settings.api_keys()
    if keys:  # /v1/ (but /v1/info) and /metrics
        app.add_middleware(ApiKeyAuth, keys=keys, on_refusal=refused)
        _document_api_keys(app)
    allowed_hosts = None if settings.allowed_hosts is None else frozenset(settings.allowed_hosts)
    app.add_middleware(
        SameSiteOnly, hosts=allowed_hosts, origins=frozenset(settings.cors_origins), on_refusal=refused
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key"],
            expose_headers=list(EXPOSED_HEADERS),
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(PrivacyHeaders)  # outermost: refusals and errors get them too

    _add_error_handlers(app, metrics)

    async def protect(
        request: Request, kind: str, upload: UploadFile, params: dict, common: CommonForm
    ) -> Response:
        if not batcher.alive:  # mounted where its lifespan never ran: the photo would wait the timeout out
            raise UploadRejected(
                503,
                "no_model_worker",
                "no model worker is running: the service's lifespan did not start it (mounted in "
                "another app, forward its lifespan) or its workers stopped; see GET /healthz",
            )
        batcher.check_room()
        data = await upload.read()
        name = _safe_name(upload.filename)
        async with decoding:
            image = await run_in_threadpool(_decode, data, name, settings.max_pixels)
            suffix = io.output_suffix(image.format, _output_format(kind, common.format, image.format))
            # flattened as the output will be (as the CLI does): the faces a viewer sees, not what
            # lies under the alpha (a face drawn by the alpha alone was not found, and came back bare)
            image = io.for_output(image, format_name=io.IMAGE_SUFFIXES[suffix])
            stored_as = io.stored_as(f"upload{suffix}", image, common.jpeg_quality)
            job = Job(
                kind,
                params,
                (common.threshold, common.min_face, common.rotations),
                image,
                stored_as=stored_as,
            )
            future = batcher.submit(job)
        result: JobResult = await _wait(future, settings.request_timeout_s, request)
        endpoint = route_path(request.scope)  # its label as the request metrics', behind a prefix too
        faces = [_with_reason(face, kind, params.get("level")) for face in result.faces]
        metrics.faces.labels(endpoint).inc(len(faces))
        metrics.unprotected.labels(endpoint).inc(sum(not f.get("protected", True) for f in faces))
        if not faces:
            metrics.no_face.labels(endpoint).inc()
        if kind == "detect":
            width, height = image.size
            return JSONResponse({"width": width, "height": height, "faces": faces, "faces_found": len(faces)})
        format_name = io.IMAGE_SUFFIXES[suffix]
        written: dict = {}
        encoded = await run_in_threadpool(
            io.encode_image,
            result.output,
            format_name,
            source=image,
            keep_metadata=common.keep_metadata,
            jpeg_quality=common.jpeg_quality,
            info=written,
        )
        notes = written.get("notes", [])  # what the output lacks: frames past the first, alpha
        tag = "cloaked" if kind == "cloak" else "anonymized"
        filename = f"{Path(name).stem}_{tag}{suffix}"
        status = face_status(faces)
        unprotected = sum(not face.get("protected", True) for face in faces)
        # an explicit response=image wins over the Accept header: axios sends "application/json,
        # text/plain, */*" with every request, and its clients got JSON where they asked for the photo
        wants_json = common.response == "json" or (
            common.response is None and prefers_json(request.headers.get("accept", ""))
        )
        if wants_json:
            width, height = image.size
            return JSONResponse(
                {
                    "status": status,
                    "faces_found": len(faces),
                    "unprotected_faces": unprotected,
                    "faces": faces,
                    "width": width,
                    "height": height,
                    "filename": filename,
                    "content_type": CONTENT_TYPES[format_name],
                    "image_base64": base64.b64encode(encoded).decode("ascii"),
                    "notes": notes,
                    "batch_images": result.batch_images,
                    # a targeted cloak's identity key is a per-person secret: a report kept or
                    # logged beside the photo held it in clear (the CLI's report leaves it out)
                    "settings": {
                        **{
                            FORM_NAMES.get(key, key): (list(v) if isinstance(v, tuple) else v)
                            for key, v in params.items()
                            if key != "identity_key"
                        },
                        **common.settings(),
                    },
                }
            )
        headers = {
            "Content-Disposition": _attachment(filename),
            "X-Facecloak-Status": status,
            "X-Facecloak-Faces": str(len(faces)),
            "X-Facecloak-Unprotected-Faces": str(unprotected),
        }
        if notes:
            headers["X-Facecloak-Notes"] = "; ".join(notes)
        return Response(encoded, media_type=CONTENT_TYPES[format_name], headers=headers)

    @app.post(
        "/v1/anonymize",
        tags=["protect"],
        response_class=Response,
        responses=_RESPONSES,
        dependencies=[Depends(_checked_fields(ANONYMIZE_FIELDS))],
    )
    async def anonymize(
        request: Request,
        image: Annotated[UploadFile, File(description="The photo (JPEG, PNG, WebP, TIFF, BMP, GIF).")],
        common: Annotated[CommonForm, Depends()],
        method: Annotated[
            Literal["blur", "pixelate", "mask", "replace"],
            Form(description="replace: a new face mixed from donors (when the server has a donor bank)."),
        ] = "blur",
        shape: Annotated[
            Literal["ellipse", "box"] | None, Form(description="Region shape [ellipse].")
        ] = None,
        mask_scale: Annotated[
            float | None,
            Form(
                allow_inf_nan=False,
                ge=MIN_SCALE,
                le=4.0,
                description="Region size relative to the box [1.3].",
            ),
        ] = None,
        strength: Annotated[
            float | None,
            Form(allow_inf_nan=False, ge=MIN_STRENGTH, le=2.0, description="blur sigma / face size."),
        ] = None,
        blocks: Annotated[
            int | None, Form(ge=1, le=MAX_BLOCKS, description="pixelate: blocks across the face.")
        ] = None,
        feather: Annotated[
            float | None, Form(allow_inf_nan=False, ge=0, le=MAX_FEATHER, description="Soft edge.")
        ] = None,
        keep_mouth: Annotated[
            bool, Form(description="replace: keep the person's own lips, replace the rest.")
        ] = False,
    ) -> Response:
        """Blur, pixelate, mask or replace every face; pixels outside the face regions are unchanged."""
        if method == "replace":
            if not settings.donors:
                raise UploadRejected(
                    422,
                    "invalid_option",
                    "method=replace needs a donor bank on the server: start it with "
                    "`facecloak serve --donors BANK`",
                )
            given = {"feather": feather, "strength": strength, "blocks": blocks, "shape": shape}
            given["mask_scale"] = mask_scale  # the new face's region follows its landmarks
            if any(value is not None for value in given.values()):
                raise UploadRejected(
                    422,
                    "invalid_option",
                    "method=replace takes no feather, strength, blocks, shape or mask_scale",
                )
            params = {"method": "replace", "keep_mouth": keep_mouth}
            return await protect(request, "anonymize", image, params, common)
        if keep_mouth:
            raise UploadRejected(422, "invalid_option", "keep_mouth is an option of method=replace")
        if method != "blur" and strength is not None:
            raise UploadRejected(422, "invalid_option", "strength is an option of method=blur")
        if method != "pixelate" and blocks is not None:
            raise UploadRejected(422, "invalid_option", "blocks is an option of method=pixelate")
        params = {"method": method, "shape": shape, "scale": mask_scale, "feather": feather}
        params |= {"strength": strength, "blocks": blocks}  # each checked above to suit the method
        params = {key: value for key, value in params.items() if value is not None}
        return await protect(request, "anonymize", image, params, common)

    @app.post(
        "/v1/cloak",
        tags=["protect"],
        response_class=Response,
        responses=_RESPONSES,
        dependencies=[Depends(_checked_fields(CLOAK_FIELDS))],
    )
    async def cloak(
        request: Request,
        image: Annotated[UploadFile, File(description="The photo (JPEG, PNG, WebP, TIFF, BMP, GIF).")],
        common: Annotated[CommonForm, Depends()],
        mode: Annotated[Literal["untargeted", "targeted"], Form()] = "untargeted",
        level: Annotated[Literal["low", "mid", "high"], Form(description=_LEVEL_CAPS)] = "mid",
        models: Annotated[
            str | None, Form(description="Comma-separated models to attack. Default: all.")
        ] = None,
        identity_key: Annotated[str | None, Form(description="targeted: a per-person secret.")] = None,
        steps: Annotated[int | None, Form(ge=0, description="Most steps per face [level's default].")] = None,
        max_dssim: Annotated[
            float | None, Form(allow_inf_nan=False, ge=0.0001, le=0.5, description="DSSIM cap.")
        ] = None,
        seed: Annotated[
            int,
            Form(
                ge=0,
                le=MAX_SEED,
                description="Seed of the random draws. Uploads sent at the same time with the same "
                "settings are cloaked together, with other draws: the same photo and seed can give "
                "another cloak.",
            ),
        ] = 0,
        escalate: Annotated[
            bool,
            Form(description="Cloak a face that falls short again one level up (low -> mid -> high)."),
        ] = False,
    ) -> Response:
        """Cloak every face; each is checked after a real JPEG 75 re-encode and reported."""
        if steps is not None and steps > settings.max_steps:
            raise UploadRejected(422, "invalid_option", f"steps may be at most {settings.max_steps} here")
        if mode == "targeted" and not identity_key:
            raise UploadRejected(422, "invalid_option", "mode=targeted needs an identity_key")
        if mode != "targeted" and identity_key:  # ignored before: an untargeted cloak where one was meant
            raise UploadRejected(422, "invalid_option", "identity_key is for mode=targeted")
        wanted = tuple(sorted(split_names(models))) or None
        params = {
            "mode": mode,
            "level": level,
            "models": wanted,
            "identity_key": identity_key,
            "steps": steps,
            "max_dssim": max_dssim,
            "seed": seed,
            "escalate": escalate or None,  # left out when off: the same cloak as before serves it
        }
        params = {key: value for key, value in params.items() if value is not None}
        return await protect(request, "cloak", image, params, common)

    @app.post("/v1/detect", tags=["detect"], dependencies=[Depends(_checked_fields(DETECT_FIELDS))])
    async def detect(
        request: Request,
        image: Annotated[UploadFile, File(description="The photo.")],
        threshold: Annotated[
            float, Form(allow_inf_nan=False, ge=0, le=1, description="Detection confidence.")
        ] = MIN_FACE_SCORE,
        min_face: Annotated[
            int, Form(ge=4, description="Smallest face side looked for, in pixels.")
        ] = MIN_FACE_PX,
        rotations: Annotated[
            Literal["all", "auto", "none"],
            Form(description=ROTATIONS_HELP),
        ] = DETECT_ROTATIONS,
    ) -> JSONResponse:
        """The faces found: boxes, scores and five landmarks each."""
        common = CommonForm(threshold=threshold, min_face=min_face, rotations=rotations)
        return await protect(request, "detect", image, {}, common)

    @app.get("/healthz", tags=["service"])
    async def healthz() -> JSONResponse:
        """Liveness and readiness: model workers running (503 when none is), queue depth."""
        workers = batcher.alive
        body = {
            "status": "ok" if workers else "no model worker running",
            "version": __version__,
            "workers": workers,
            "queue_depth": batcher.depth,
        }
        return JSONResponse(body, status_code=200 if workers else 503)

    # HEAD too (a load balancer's check got 405), outside the API description: one operation there
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text: requests, latencies, faces, unprotected faces, queue depth, batch sizes.

        With API keys configured it needs a key too (`facecloak.service.security`).
        """
        metrics.queue_depth.set(batcher.depth)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/info", tags=["service"])
    async def info() -> dict:
        """What the web page needs: methods, levels, limits, whether an API key is required."""
        return {
            "version": __version__,
            "methods": ["cloak", "blur", "pixelate", "mask"] + (["replace"] if settings.donors else []),
            "levels": list(LEVELS),
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "api_key_required": bool(keys),
        }

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: uptime checks
    async def page() -> HTMLResponse:
        """The web page, its files and API calls named by relative URLs.

        Behind a proxy's path prefix (known to the app as ``--root-path``, or stripped by the proxy
        unknown to it) or mounted in another app, absolute ``/v1/...`` URLs went outside the prefix.
        """
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_docs(app)
    return app


_RESPONSES = {
    200: {
        "content": {"image/jpeg": {}, "image/png": {}, "application/json": {}},
        "description": "The photo.",
    },
    400: {"description": "Empty body or upload."},
    401: {"description": "API key missing."},
    403: {"description": "API key wrong."},
    413: {"description": "Upload or pixel count over the limit."},
    415: {"description": "Not an image of a readable format (content sniffed)."},
    422: {"description": "Corrupt image, or a bad, unknown or repeated field."},
    500: {"description": "The model failed on this photo (logged by the service)."},
    503: {"description": "Queue full: retry after the Retry-After header's seconds; or no model worker."},
    504: {"description": "The per-request time limit passed."},
}


async def _release_memory_every(seconds: float) -> None:
    """Collect garbage, then hand the allocator's free memory back to the system, now and then.

    Python collects reference cycles across its whole heap seldom, and a photo caught in one (a
    job and its future were, until 2026-12-07: 149 MB after 400 requests) waits for that; with
    the models and all that existed when they loaded frozen (`gc.freeze`, `Engine`'s ``on_loaded``)
    a collection walks only what requests made since, so any such cycle lives at most ``seconds``.
    """
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(_collect_and_release)


def _collect_and_release() -> None:
    """Free what reference cycles hold, then hand free memory back (the order matters: first free)."""
    gc.collect()
    release_free_memory()


def _decode(data: bytes, name: str, max_pixels: int) -> io.LoadedImage:
    """Sniff and size-check the upload from its header, then decode it as the CLI does."""
    check_upload(data, max_pixels=max_pixels)
    try:
        return io.read_image_bytes(data, name, max_pixels=max_pixels)
    except ImageReadError as error:
        status = 413 if "limit" in error.reason else 422
        raise UploadRejected(status, "unreadable_image", error.reason) from None


async def _until_disconnected(request: Request) -> None:
    """Return when the client has gone (the body is read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(future, timeout_s: float, request: Request | None = None) -> JobResult:
    """The job's result; a model failure (the worker logged it) becomes a one-line JSON 500.

    Raised on as it was, it reached Starlette's last-resort handler, outside every middleware: a
    plain-text "Internal Server Error" without the privacy headers (``no-store`` among them).
    A client that disconnects (``request`` given) cancels its job as a timeout does: its photo
    held its place in the queue, and was computed, for nobody, while others got 503.
    """
    waiting = asyncio.wrap_future(future)
    watcher = asyncio.ensure_future(_until_disconnected(request)) if request is not None else None
    try:
        done, _ = await asyncio.wait(
            [waiting] if watcher is None else [waiting, watcher],
            timeout=timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        if watcher is not None:
            watcher.cancel()
        if not waiting.done():
            waiting.cancel()  # cancels the job if it still waits for a worker: its place is freed
    if waiting not in done:
        if watcher is not None and watcher in done:
            raise _disconnected()
        raise UploadRejected(504, "timeout", f"not finished within this service's limit of {timeout_s:g} s")
    try:
        return waiting.result()
    except FacecloakError:  # a client's setting: its own handler answers 422
        raise
    except Exception as error:
        raise UploadRejected(
            500,
            "internal_error",
            f"the service failed on this photo ({type(error).__name__}); the error is in its log",
        ) from None


def _document_api_keys(app: FastAPI) -> None:
    """Name the API key in the API's description, so that /docs can send it ("Authorize").

    Without it every "Try it out" of a keyed service got 401, and /docs had no field for the key.
    """
    described = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = described()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1/") and path != "/v1/info":
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}, {"apiKey": []}]
        return app.openapi_schema

    app.openapi = openapi


def _checked_fields(known: set[str]) -> Callable[[Request], Awaitable[None]]:
    """A route dependency refusing unknown and repeated form fields, before any option is used.

    FastAPI keeps one value of a repeated field (the last): ``level=low`` and ``level=high``, or
    two ``image`` parts, were answered as if only one had been sent, the others silently dropped.
    """

    async def check(request: Request) -> None:
        if request.query_params:  # read by no endpoint: ``?level=high`` got the default mid, silently
            raise UploadRejected(
                422,
                "unknown_field",
                f"options go in the form (-F name=value), not in the URL: "
                f"{', '.join(sorted(set(request.query_params.keys())))}",
            )
        form = await request.form()  # already parsed by FastAPI: this only reads the cache
        sent = Counter(name for name, _ in form.multi_items())
        repeated = sorted(name for name, count in sent.items() if count > 1)
        if repeated:
            one_photo = " (one photo per request)" if "image" in repeated else ""
            raise UploadRejected(
                422,
                "repeated_field",
                f"form field(s) sent more than once: {', '.join(repeated)}; send each once{one_photo}",
            )
        if "image" in sent:  # without it the validation's "missing the field 'image'" says more
            _reject_unknown_fields(set(sent), known)
        # FastAPI reads an empty value as the default: `-F level=$LEVEL` with LEVEL unset got mid
        empty = sorted(
            name for name, value in form.multi_items() if isinstance(value, str) and not value.strip()
        )
        if empty:
            raise UploadRejected(
                422,
                "invalid_option",
                f"form field(s) sent empty: {', '.join(empty)}; leave a field out for its default",
            )

    return check


def _reject_unknown_fields(sent: set[str], known: set[str]) -> None:
    unknown = sorted(sent - known)
    if unknown:
        hints = [
            f"{name} (did you mean {name.replace('-', '_')}?)" if name.replace("-", "_") in known else name
            for name in unknown
        ]
        raise UploadRejected(
            422,
            "unknown_field",
            f"unknown form field(s): {', '.join(hints)}; known: {', '.join(sorted(known))}",
        )


def _safe_name(filename: str | None) -> str:
    """The upload's base name with only letters, digits, ``.``, ``-`` and ``_`` (it names the download).

    Letters of any script: ``фото.jpg`` was cut to ``jpg`` and came back as ``jpg_anonymized.jpg``.
    No quote, slash or line break survives, so the name cannot break out of a header.
    """
    stem = re.sub(r"[^\w.-]+", "_", Path(filename or "photo").name).strip("._")[:100]
    return stem or "photo"


def _attachment(filename: str) -> str:
    """A Content-Disposition naming the download: ASCII for old clients, UTF-8 (RFC 6266) for the rest."""
    fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("._") or "photo"
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _with_reason(face: dict, kind: str, level: str | None = None) -> dict:
    """Add ``protected`` and a one-line ``reason`` a person can read, per face.

    ``level``: the cloak's; at the strongest one, a face that falls short is not told to try a
    higher level or to escalate (neither exists: the page asks for high with escalate on).
    """
    if kind == "detect":
        return face
    if kind == "anonymize" and (face.get("method") == "replace" or "reason" in face):  # method=replace
        return _replace_reason(face)
    if kind == "anonymize":
        verb = {"blur": "blurred", "pixelate": "pixelated", "mask": "masked"}.get(
            face.get("method"), "anonymised"
        )
        return dict(face, protected=True, reason=f"{verb}: the face is gone for a recognition model")
    if face.get("protected") and face.get(FOUND_AFTER_UPLOAD_KEY) is False:
        return dict(face, reason="not even detected after JPEG 75 re-compression: a scraper cannot enrol it")
    parts = []
    for name, model in face.get("models", {}).items():
        distance = model.get(DISTANCE_AFTER_UPLOAD_KEY)
        if distance is None:
            distance = model["distance"]
        relation = ">=" if distance >= model["threshold"] else "<"
        # three decimals: a miss by a hair read "0.60 < match threshold 0.60"
        parts.append(f"{name} distance {distance:.3f} {relation} match threshold {model['threshold']:.3f}")
    detail = "; ".join(parts)
    if face.get("protected"):
        reason = f"after JPEG 75: {detail} (a scraper no longer matches this face)"
        if face.get("escalated_from"):
            reason += f" (cloaked again at {face['level']}: {face['escalated_from']} fell short)"
        return dict(face, reason=reason)
    if face.get("escalation"):
        advice = f"cloaked again one level up, and {face['escalation']}"
    elif level is not None and level not in STRONGER_LEVEL:
        advice = f"{level} is the strongest level: a face hard for these models"
    else:
        advice = "try a higher level, or cloak it again one level stronger (escalate)"
    return dict(
        face,
        reason=f"NOT protected: after JPEG 75, {detail}: a scraper would still match this face; {advice}",
    )


def _replace_reason(face: dict) -> dict:
    """A replaced face's one-line reason: how far the new face lies from the person and its donors."""
    if face.get("method") != "replace":  # too small, or no donor mix passed: blurred (its reason says)
        return dict(face, reason=face.get("reason", "blurred instead of replaced"))
    if not face.get("protected"):
        return dict(face, reason=f"NOT protected: {face.get('reason', 'the new face failed its check')}")
    parts = [
        f"{name} {distance:.2f} >= {face['thresholds'][name]:.2f} from the person"
        for name, distance in face.get("distance_to_original", {}).items()
    ]
    return dict(
        face,
        reason=f"replaced by a mix of {len(face.get('donors', []))} donors; after JPEG 75: "
        + "; ".join(parts)
        + ", and past every donor's threshold",
    )


FORM_NAMES = {"scale": "mask_scale"}
"""Settings whose form field has another name than the anonymiser's parameter: a report's
``settings`` names each as the form does, so that they can be sent back as they are."""


def prefers_json(accept: str) -> bool:
    """Whether an ``Accept`` header ranks JSON at least as high as an image (and above 0).

    ``image/jpeg, application/json;q=0`` refuses JSON: it got JSON, as any header naming it did.
    """
    quality: dict[str, float] = {}
    for item in accept.split(","):
        kind, *options = (part.strip() for part in item.split(";"))
        q = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = kind.lower()
        quality[kind] = max(quality.get(kind, 0.0), q)
    if "application/json" not in quality:
        return False
    json = quality["application/json"]
    images = [q for kind, q in quality.items() if kind.startswith("image/")]
    image = max(images, default=quality.get("*/*", 0.0))
    return json > 0 and json >= image


def _disconnected() -> UploadRejected:
    """The refusal of a client that hung up (499, nginx's code): counted apart from bad requests."""
    return UploadRejected(499, "client_disconnected", "the client disconnected before the answer")


def _add_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    def refusal(error: UploadRejected) -> JSONResponse:
        metrics.rejected.labels(error.code).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(UploadRejected)
    async def rejected(request: Request, error: UploadRejected) -> JSONResponse:
        return refusal(error)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return refusal(
            UploadRejected(503, "queue_full", str(error), headers={"Retry-After": str(error.retry_after_s)})
        )

    @app.exception_handler(FacecloakError)
    async def facecloak_error(request: Request, error: FacecloakError) -> JSONResponse:
        return refusal(UploadRejected(422, "invalid_input", str(error)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return refusal(_explain_validation(request, error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error.__cause__, BodyTooLarge):  # the cap tripped while FastAPI read the form:
            raise error.__cause__  # `BodySizeLimit` answers (and counts) the 413; not a 400 too
        if isinstance(error.__cause__, ClientDisconnect):  # gone mid-upload: not a malformed body
            return refusal(_disconnected())
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        reason = str(error.detail)
        if error.status_code == 400 and "parsing the body" in reason:
            reason = "the request body is not valid multipart/form-data; send the photo as the field 'image'"
        return refusal(UploadRejected(error.status_code, code, reason, headers=dict(error.headers or {})))


def _explain_validation(request: Request, error: RequestValidationError) -> UploadRejected:
    """One readable line for FastAPI's validation errors (missing image, bad option values)."""
    content_type = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    if length == "0" or (length is None and not content_type):
        return UploadRejected(
            400, "empty_body", "the request body is empty; send the photo as multipart field 'image'"
        )
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item.get("loc", ())[1:]) or "body"
        if item.get("type") == "missing" and field == "image":
            if "multipart/form-data" not in content_type:
                problems.append(
                    f"expected multipart/form-data with the photo in field 'image', got content type "
                    f"{content_type.split(';')[0] or 'none'}"
                )
            else:
                problems.append("missing the multipart field 'image' (the photo must be sent as image=@file)")
        elif field == "image":  # a text part (curl -F 'image=<photo.jpg'): FastAPI's words name a class
            problems.append("the field 'image' must be a file part, not text (send the photo as image=@file)")
        else:
            problems.append(f"{field}: {item.get('msg', 'invalid')}")
    return UploadRejected(422, "invalid_request", "; ".join(problems))


def _add_docs(app: FastAPI) -> None:
    """OpenAPI docs at /docs from Swagger UI files installed with the package (no CDN), if present."""
    try:
        import swagger_ui_bundle
    except ImportError:  # pragma: no cover - the serve extra installs it
        swagger = None
    else:
        swagger = Path(swagger_ui_bundle.swagger_ui_path)
    if swagger is not None:
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/docs-assets", StaticFiles(directory=swagger), name="docs-assets")

        @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
        async def docs() -> HTMLResponse:
            # relative to /docs, as the page's: behind a path prefix /openapi.json lies outside it
            return get_swagger_ui_html(
                openapi_url="openapi.json",
                title="facecloak API",
                swagger_js_url="docs-assets/swagger-ui-bundle.js",
                swagger_css_url="docs-assets/swagger-ui.css",
                swagger_favicon_url="docs-assets/favicon-32x32.png",
            )
    else:  # pragma: no cover

        @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
        async def docs() -> HTMLResponse:
            return HTMLResponse('<p>The API is described in <a href="openapi.json">openapi.json</a>.</p>')
