"""Settings of the service: limits, batching, security. One frozen dataclass, set by ``facecloak serve``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
"""Default upload cap: larger request bodies get 413 before they are read."""

MAX_UPLOAD_PIXELS = 50_000_000
"""Default pixel cap, checked on the image header before any decoding (413 above it). A decoded
50 MP photo takes 600 MB as float32; the CLI's own default (120 MP) is too generous for a server."""


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs.

    Attributes:
        device: torch device for the models; None for CUDA when present, else CPU.
        workers: model workers, each with its own copy of the models, pulling micro-batches from
            the one queue (use one per GPU; on a CPU one is best, torch already uses every core).
        models: face models the cloak attacks; None for every model available here.
        max_upload_bytes: request body cap (413).
        max_pixels: image pixel cap, read from the header before decoding (413).
        max_batch: most photos per model call (one detection and one optimisation over them).
        batch_wait_ms: how long the worker waits for more photos after the first one.
        queue_size: photos waiting for a model at most; more get 503 with Retry-After.
        max_queued_pixels: pixels waiting for a model at most (bounds memory); more get 503.
        request_timeout_s: a request still waiting after this gets 504.
        max_steps: the most cloak steps a client may ask for.
        api_keys_file: file of accepted API keys, one per line (``#`` comments); None: no keys.
            With keys, ``/v1/`` endpoints (but ``/v1/info``) and ``/metrics`` need one.
        cors_origins: origins allowed by CORS; empty (default): CORS off. Only these may send
            requests from another site's page (`facecloak.service.security.SameSiteOnly`).
        allowed_hosts: the ``Host`` names the service answers to; None (default): any.
            ``facecloak serve`` on a loopback address answers to the loopback names only
            (`facecloak.service.security.LOOPBACK_HOSTS`), unless told more.
        preload: load the models at start-up (the first request does not pay for it).
        donors: donor bank (name or folder) for ``method=replace``; None: replace is not offered.
            Its faces are checked with the same models as the cloak (the bank must hold them).
    """

    device: str | None = None
    workers: int = 1
    models: tuple[str, ...] | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_UPLOAD_PIXELS
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    queue_size: int = 32
    max_queued_pixels: int = 400_000_000
    request_timeout_s: float = 300.0
    max_steps: int = 200
    api_keys_file: Path | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    allowed_hosts: tuple[str, ...] | None = None
    preload: bool = True
    donors: str | None = None

    def api_keys(self) -> frozenset[str]:
        """The accepted keys (empty: the service is open)."""
        if self.api_keys_file is None:
            return frozenset()
        # utf-8-sig: a byte-order mark (Notepad writes one) stayed on the first key, which never matched
        lines = Path(self.api_keys_file).read_text(encoding="utf-8-sig").splitlines()
        keys = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
        if not keys:
            raise ValueError(f"{self.api_keys_file}: no API key in the file")
        return keys
