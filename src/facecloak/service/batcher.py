"""Micro-batching: concurrent uploads go through one detection and one protection call.

Request handlers decode their upload (in the HTTP thread pool) and `MicroBatcher.submit` a `Job`.
Each model worker is a thread with its own `Engine` (its own copy of the models, loaded once):
it takes the first waiting job, collects more for up to ``batch_wait_ms`` or until ``max_batch``,
groups them by settings, and runs one `FaceDetector` call and one protector call per group, so
several uploads share one cloak optimisation (what makes a GPU pay). Encoding happens back in
the handler, so the models never wait on decoding or encoding.

The queue is bounded twice, in photos and in pixels (memory); past either bound `submit` raises
`QueueFull` and the handler answers 503 with a Retry-After estimated from recent batch times.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from facecloak.anonymize import Anonymizer
from facecloak.defaults import DETECT_ROTATIONS, MIN_FACE_PX, MIN_FACE_SCORE
from facecloak.detect import FaceDetector
from facecloak.errors import FacecloakError
from facecloak.faces import Faces
from facecloak.io import LoadedImage
from facecloak.protection import AnonymizeFaces, CloakFaces, Protection, ReplaceFaces
from facecloak.service.settings import ServiceSettings

log = logging.getLogger("facecloak.service")

MAX_CACHED_CLOAKS = 16
"""Cloaks a worker keeps built, the least recently used dropped first. Their settings come from
clients (a seed, an identity key, steps, a DSSIM cap): kept without a bound, every new value
added one for good (a few kB each, and each targeted cloak kept its person's secret key)."""


class QueueFull(Exception):
    """The queue holds as many photos (or pixels) as it may; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # jobs are compared by identity (comparing fields would compare image tensors)
class Job:
    """One uploaded photo and what to do with it.

    Attributes:
        kind: "anonymize", "cloak" or "detect".
        params: the protection's settings (method and its parameters, or the cloak's).
        detection: (min_score, min_size, rotations) of the detector.
        image: the decoded upload.
        stored_as: how the response's file will hold the photo (`facecloak.io.stored_as`): a
            cloak holds its caps on that.
        future: resolved by a worker with a `JobResult`.
    """

    kind: str
    params: dict
    detection: tuple[float, int, str]
    image: LoadedImage
    future: Future = field(default_factory=Future)
    stored_as: Callable[[Tensor], Tensor] | None = None

    @property
    def key(self) -> tuple:
        """Jobs with equal keys share one model call."""
        return (self.kind, tuple(sorted(self.params.items())), self.detection)

    @property
    def pixels(self) -> int:
        """Pixel count (the queue's memory bound counts these)."""
        width, height = self.image.size
        return width * height


@dataclass
class JobResult:
    """What a worker hands back: the output pixels (None for detect) and one record per face."""

    output: Tensor | None
    faces: list[dict]
    batch_images: int
    seconds: float


class Engine:
    """The models of one worker, loaded once, and the one-call-per-group protection over them.

    ``on_loaded`` is called after each load of models: the detector and, with ``preload``, the
    recognisers at start-up, and whatever a request that first needs it loads later (every
    recogniser with ``preload`` off; the replacer that keeps the person's mouth always). The
    service freezes what was loaded out of its periodic garbage collections.
    """

    def __init__(
        self, settings: ServiceSettings, device: str | None, on_loaded: Callable[[], None] | None = None
    ) -> None:
        from facecloak._device import default_device

        self.settings = settings
        self._on_loaded = on_loaded
        self.device = str(default_device(device))
        self._detector: FaceDetector | None = None
        self._cloaks: OrderedDict[tuple, CloakFaces] = OrderedDict()
        self._embedders: list | None = None
        self._replace: dict[bool, ReplaceFaces] = {}
        self.detector(MIN_FACE_SCORE, MIN_FACE_PX, DETECT_ROTATIONS)
        if settings.preload:
            self.embedders()
            if settings.donors:
                self.replacement()

    def detector(self, min_score: float, min_size: int, rotations: str = DETECT_ROTATIONS) -> FaceDetector:
        """The detector for one detection setting: the worker's one MTCNN with these thresholds.

        A shallow copy of the default detector shares its loaded nets. A detector built (and
        kept) per setting loaded its own nets, 2 MB each: a client sending a new ``threshold``
        with every request grew the server's memory without bound.
        """
        key = (float(min_score), int(min_size), str(rotations))
        if self._detector is None:
            self._detector = FaceDetector(
                min_score=key[0], min_size=key[1], rotations=key[2], device=self.device
            )
            self._loaded()
        detector = self._detector
        if key == (detector.min_score, detector.min_size, detector.rotations):
            return detector
        detector = copy.copy(detector)
        detector.min_score, detector.min_size, detector.rotations = key
        return detector

    def embedders(self) -> list:
        """The face models the cloak attacks (the service's ``models`` or all available), loaded once."""
        if self._embedders is None:
            from facecloak.models import available_embedders, create_embedder

            names = list(self.settings.models) if self.settings.models else available_embedders()
            self._embedders = [create_embedder(name, device=self.device) for name in names]
            self._loaded()
        if not self._embedders:
            raise FacecloakError("no face model is available on this server (see `facecloak models`)")
        return self._embedders

    def replacement(self, keep_mouth: bool = False) -> ReplaceFaces:
        """``method=replace`` over the service's donor bank and models, built once (per ``keep_mouth``).

        As `facecloak anonymize --method replace` runs it: faces under its ``min_face`` (40 px)
        and faces no donor mix takes past every check are blurred instead, and say so.
        """
        if keep_mouth not in self._replace:
            from facecloak.donor_bank import load_bank
            from facecloak.replace import FaceReplacer

            if not self.settings.donors:
                raise FacecloakError(
                    "this server has no donor bank; start it with `facecloak serve --donors BANK`"
                )
            known = next(iter(self._replace.values()), None)  # the other variant, if built
            if known is not None:  # its bank, kin and caches shared
                replacer = known.replacer.keeping_mouth(keep_mouth)
            else:
                bank = load_bank(self.settings.donors)
                detector = self.detector(MIN_FACE_SCORE, MIN_FACE_PX)
                replacer = FaceReplacer(bank, self.embedders(), detector=detector, keep_mouth=keep_mouth)
            self._replace[keep_mouth] = ReplaceFaces(replacer)
            self._loaded()
        return self._replace[keep_mouth]

    def _loaded(self) -> None:
        """Models were just loaded: report it (`on_loaded`)."""
        if self._on_loaded is not None:
            self._on_loaded()

    def protection(self, kind: str, params: dict) -> Protection:
        """The protection (`facecloak.protection`) for these settings, as the CLI builds it."""
        if kind == "anonymize" and params["method"] == "replace":
            return self.replacement(bool(params.get("keep_mouth")))
        if kind == "anonymize":
            method = params["method"]
            options = {key: value for key, value in params.items() if key != "method"}
            return AnonymizeFaces(Anonymizer(method, **options))
        key = tuple(sorted(params.items()))
        if key in self._cloaks:
            self._cloaks.move_to_end(key)
        else:
            options = dict(params)
            wanted = options.pop("models", None)
            embedders = [m for m in self.embedders() if not wanted or m.card.name in wanted]
            if wanted and len(embedders) != len(wanted):
                loaded = ", ".join(m.card.name for m in self.embedders())
                raise FacecloakError(f"models {', '.join(wanted)} are not all loaded here (loaded: {loaded})")
            mode, level = options.pop("mode"), options.pop("level")
            if mode == "untargeted":
                # a call holds other clients' uploads: a face's person is sought in its own photo only
                # (another client's photo of the same person changed this cloak, its verdict and its
                # record: reference_photos 2, distances from a mean holding the other's face)
                options["people_per_photo"] = True
            self._cloaks[key] = CloakFaces.create(
                mode,
                embedders,
                level,
                escalate=bool(options.pop("escalate", False)),
                detector=self.detector(MIN_FACE_SCORE, MIN_FACE_PX),
                **options,
            )
            if len(self._cloaks) > MAX_CACHED_CLOAKS:
                self._cloaks.popitem(last=False)
        return self._cloaks[key]

    def run(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Detect and protect every job's photo in one call (all jobs share one key)."""
        started = time.perf_counter()
        kind, params, detection = jobs[0].kind, jobs[0].params, jobs[0].detection
        pixels = [job.image.pixels for job in jobs]
        with torch.no_grad():
            faces = self.detector(*detection)(pixels)
        if kind == "detect":
            outputs: list[Tensor | None] = [None] * len(jobs)
            records = faces.to_records()
        else:
            protection = self.protection(kind, params)
            if kind == "anonymize" and params["method"] != "replace":  # replace's finish is a cloak
                with torch.no_grad():
                    result = protection.protect(pixels, faces)
            else:
                result = protection.protect(pixels, faces, stored_as=[job.stored_as for job in jobs])
            # what to encode: a cloak held to a JPEG gives the pixels whose file is what it measured
            outputs, records = [result.to_encode(k) for k in range(len(jobs))], result.records
        seconds = time.perf_counter() - started
        return [
            JobResult(
                output=None if outputs[k] is None else outputs[k].detach().cpu(),
                faces=_records_of(records, faces, k),
                batch_images=len(jobs),
                seconds=seconds,
            )
            for k in range(len(jobs))
        ]


def _records_of(records: list[dict], faces: Faces, k: int) -> list[dict]:
    """Upload ``k``'s face records, without ``image_index``.

    One photo a request: it was always 0 (the command line's detect/embed JSON dropped it too).
    """
    return [
        {key: value for key, value in record.items() if key != "image_index"}
        for record, index in zip(records, faces.image_index.tolist())
        if index == k
    ]


class MicroBatcher:
    """A bounded queue of jobs and the model workers that drain it in micro-batches.

    Args:
        settings: batching, queue bounds and models.
        on_batch: called after each model call with its size and seconds (metrics).
        engine_factory: builds a worker's engine from a device name (tests swap it).
        on_models_loaded: the engines' ``on_loaded`` (`Engine`).
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        on_batch: Callable[[int, float], None] | None = None,
        engine_factory: Callable[[str | None], Engine] | None = None,
        on_models_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # queued + being processed
        self._pending_pixels = 0
        self._held: set[Job] = set()  # the jobs counted in the two, until released (once)
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._on_batch = on_batch
        self._engine_factory = engine_factory or (lambda device: Engine(settings, device, on_models_loaded))
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._errors: list[BaseException] = []

    @property
    def depth(self) -> int:
        """Photos queued or being processed."""
        return self._pending

    @property
    def alive(self) -> int:
        """Model workers running (fewer than started means the service is degraded)."""
        return sum(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        """Start the workers; returns when every worker has loaded its models (or raises)."""
        count = max(1, self.settings.workers)
        loaded = threading.Barrier(count + 1)
        for index in range(count):
            thread = threading.Thread(
                target=self._work,
                args=(self._device(index), loaded),
                name=f"facecloak-model-{index}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        loaded.wait()
        if self._errors:
            raise self._errors[0]
        self._ready.set()

    def _device(self, index: int) -> str | None:
        device = self.settings.device
        if device is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return f"cuda:{index % torch.cuda.device_count()}"  # one worker per GPU
        return device

    def stop(self) -> None:
        """Let the workers finish what they hold and stop; waiting jobs are cancelled."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
                self._release(job)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future resolves to a `JobResult`.

        Raises:
            QueueFull: the queue holds ``queue_size`` photos or ``max_queued_pixels`` pixels.
        """
        with self._lock:
            full = self._pending >= self.settings.queue_size
            heavy = self._pending > 0 and self._pending_pixels + job.pixels > self.settings.max_queued_pixels
            if full or heavy:
                raise QueueFull(self.retry_after_s())
            self._pending += 1
            self._pending_pixels += job.pixels
            self._held.add(job)
        # a job cancelled while waiting (its request timed out) frees its room now, not when a
        # worker reaches it: until then new uploads got 503 for work nobody waited for. The
        # callback holds the job weakly: a future keeps its callbacks, so a strong reference made a
        # cycle (job -> future -> callback -> job) that kept the photo and its result until Python's
        # rare full collection of cycles: 149 MB of them after 400 LFW requests (README, "Service")
        waiting = weakref.ref(job)
        job.future.add_done_callback(partial(_cancelled_job, self, waiting))
        self._queue.put(job)
        return job.future

    def check_room(self) -> None:
        """Raise `QueueFull` now if no photo could be queued (before spending time on decoding)."""
        if self._pending >= self.settings.queue_size:
            raise QueueFull(self.retry_after_s())

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained enough to take a photo again."""
        batches = self._pending / max(1, self.settings.max_batch * max(1, self.settings.workers))
        return int(min(120, max(1, math.ceil(self._batch_seconds * max(1.0, batches)))))

    def _release(self, job: Job) -> None:
        with self._lock:
            if job not in self._held:  # released already (cancelled while it waited)
                return
            self._held.remove(job)
            self._pending -= 1
            self._pending_pixels -= job.pixels

    def _cancelled(self, job: Job) -> None:
        """A waiting job was cancelled: free its room, and its photo (the queue still holds the job)."""
        self._release(job)
        job.image = None  # type: ignore[assignment]  # a cancelled job is never run

    def _work(self, device: str | None, loaded: threading.Barrier) -> None:
        try:
            engine = self._engine_factory(device)
        except BaseException as error:  # reported by start(), which re-raises it
            self._errors.append(error)
            loaded.wait()
            return
        loaded.wait()
        while True:
            batch = self._collect()
            if batch is None:
                return
            for group in _groups(batch):
                try:
                    self._run(engine, group)
                except Exception as error:  # never let a bug end the worker: fail this group, go on
                    log.exception("model worker: unexpected error")
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(error)

    def _collect(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000.0
        while len(batch) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # keep the stop signal for this worker's next turn
                break
            batch.append(job)
        return batch

    def _run(self, engine: Engine, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                live.append(job)
            else:
                self._release(job)  # timed out while waiting: nothing to compute
        if live:
            self._call(engine, live)

    def _call(self, engine: Engine, live: list[Job]) -> None:
        """One model call for ``live`` (running jobs of one key); each future gets its answer."""
        started = time.perf_counter()
        try:
            results = engine.run(live)
        except Exception as error:  # one bad group must not stop the worker
            if len(live) > 1:  # one bad photo must not fail other clients' photos: each alone
                log.warning("model call failed for %d photos (%s); running each alone", len(live), error)
                for job in live:
                    self._call(engine, [job])
                return
            if isinstance(error, FacecloakError):  # a client's setting (a model not loaded here): no trace
                log.warning("refused %d photo(s): %s", len(live), error)
            else:
                log.exception("model call failed for %d photo(s)", len(live))
            for job in live:
                job.future.set_exception(error)
                self._release(job)
            return
        seconds = time.perf_counter() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self._on_batch is not None:
            self._on_batch(len(live), seconds)
        for job, result in zip(live, results):
            self._release(job)
            job.future.set_result(result)


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs split by settings key, in arrival order of each key's first job."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    return list(groups.values())


def _cancelled_job(batcher: MicroBatcher, job: weakref.ref[Job], future: Future) -> None:
    """A job's done callback: a cancelled job that still exists frees its room (`MicroBatcher.submit`)."""
    held = job()
    if held is not None and future.cancelled():
        batcher._cancelled(held)
