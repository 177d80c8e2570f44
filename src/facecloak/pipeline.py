"""A resumable, pipelined batch: the CLI's batch when it writes into an output folder.

Same contract as `facecloak.batch.run_batch` (the same `Protection`, `Options`, per-file
outcomes, summary and exit code), plus:

- a `facecloak.journal.Journal` in the output folder: a killed batch, run again with the same
  command, does only what is left; a changed input or changed settings is redone;
- decoding, computing and encoding overlap: reader threads hash and decode the next photos and a
  writer thread encodes and writes the finished ones while the models work on the current chunk,
  so the model never waits on the disk;
- on a CPU two chunks are protected at once, each on a thread with half the cores (small layers
  use two single-threaded workers better than one two-threaded one); a batch of one chunk runs
  alone, on every core.

    reader threads --(decoded, bounded queue)--> models (1-2 compute threads) --(queue)--> writer thread
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from facecloak import io
from facecloak._device import compute_workers, in_parts_that_fit, is_out_of_memory
from facecloak.batch import out_of_memory, plan_batch, replacing_refused, seconds_per_photo, write_output
from facecloak.batch_types import (
    BatchPlan,
    BatchReport,
    FileOutcome,
    Options,
    ProgressCallback,
    ProgressEvent,
)
from facecloak.detect import FaceDetector, detector_for
from facecloak.errors import FacecloakError, ImageWriteError, InvalidInputError, shown_path
from facecloak.journal import JOURNAL_NAME, Journal, JournalError, file_sha256, source_key
from facecloak.protection import Protection, ProtectionResult

READER_THREADS = 2
_END = object()


@dataclass(frozen=True)
class ProtectorSpec:
    """A protection described by value: what the journal fingerprints and what a remote worker builds.

    Attributes:
        kind: "anonymize" (params: method and its keywords), "cloak" (params: mode, level,
            models, identity_key, steps, max_dssim, seed) or "replace" (params: donors (the bank's
            folder), donors_per_face, seed, min_face, models; not run on Ray).
        params: the settings, as the CLI gives them.

    Example:
        >>> ProtectorSpec("anonymize", {"method": "blur"}).build().tag
        'blur'
    """

    kind: str
    params: dict

    @staticmethod
    def cloak(mode: str, level: str, models: Sequence[str] | None = None, **params) -> ProtectorSpec:
        """A cloak spec; ``models`` None means every model available here (resolved now, by name)."""
        from facecloak.models import available_embedders

        names = list(models) if models else available_embedders()
        return ProtectorSpec("cloak", {"mode": mode, "level": level, "models": names, **params})

    def build(self, device: str | None = None) -> Protection:
        """The protection, with its models loaded on ``device`` (default: CUDA if present)."""
        from facecloak.protection import AnonymizeFaces, CloakFaces, ReplaceFaces

        params = dict(self.params)
        if self.kind == "anonymize":
            from facecloak.anonymize import Anonymizer

            return AnonymizeFaces(Anonymizer(params.pop("method"), **params))
        if self.kind == "replace":
            from facecloak.detect import MIN_FACE_PX, FaceDetector
            from facecloak.donor_bank import load_bank
            from facecloak.models import create_embedder
            from facecloak.replace import FaceReplacer

            models = [create_embedder(name, device=device) for name in params.pop("models")]
            min_face = params.pop("min_face")
            detector = FaceDetector(min_size=min(min_face, MIN_FACE_PX), device=device)
            bank = load_bank(params.pop("donors"))
            return ReplaceFaces(FaceReplacer(bank, models, min_face=min_face, detector=detector, **params))
        if self.kind != "cloak":
            raise InvalidInputError(f"unknown protector kind {self.kind!r} (anonymize, cloak or replace)")
        from facecloak.models import create_embedder

        embedders = [create_embedder(name, device=device) for name in params.pop("models")]
        if not embedders:
            raise FacecloakError("no face model is available here; see `facecloak models`")
        mode, level, escalate = params.pop("mode"), params.pop("level"), params.pop("escalate", False)
        return CloakFaces.create(mode, embedders, level, escalate=bool(escalate), **params)

    def settings(self) -> dict:
        """The settings for the journal's fingerprint (a targeted cloak's key only as a hash).

        Models are named with their card and weights (`facecloak.models.model_identity`), a donor
        bank with its manifest's hash: the same name over another model or other donors makes
        other outputs, and a resumed batch redoes its photos.
        """
        from facecloak.models.registry import model_identity

        params = {key: value for key, value in self.params.items() if value is not None}
        if params.get("identity_key"):
            params["identity_key"] = key_fingerprint(str(params["identity_key"]))
        if "models" in params:
            params["models"] = [model_identity(name) for name in params["models"]]
        if "donors" in params:
            params["donor_manifest"] = _file_hash(Path(params["donors"]) / "bank.json")
        return {"kind": self.kind, **params}


def _file_hash(path: Path) -> str | None:
    """A short hash of the file at ``path``; None if unreadable (its use then fails with the reason)."""
    try:
        return file_sha256(path)[:16]
    except OSError:
        return None


RESUMED_STATUS_WORDS = {
    "protected": "protected",
    "no_face": "no face found",
    "unprotected": "a face NOT protected",
}
"""How a resumed file's journaled status reads in its line (it printed the journal's word, no_face)."""


@dataclass
class ResumedOutcome(FileOutcome):
    """A file done by an earlier run of the same batch (found in the journal), not redone."""

    resumed: bool = True

    @property
    def message(self) -> str:
        """One line for the terminal."""
        done = RESUMED_STATUS_WORDS.get(self.status, self.status)
        return f"{shown_path(self.path)}: done earlier ({done}), skipped -> {shown_path(self.output)}"


@dataclass
class ResumableReport(BatchReport):
    """A `BatchReport` that also says what an earlier run had done and where the journal is."""

    journal: str = ""
    resumed: int = 0
    timings: dict = field(default_factory=dict)

    def __str__(self) -> str:
        text = super().__str__()
        if self.resumed:
            # files skipped because an output not ours was there, and failed files, were counted
            # as processed now
            now = sum(
                not getattr(o, "resumed", False) and o.status not in ("skipped", "failed")
                for o in self.outcomes
            )
            text += (
                f"\n  {self.resumed} file(s) done by an earlier run, skipped; "
                f"{now} processed now (journal: {self.journal})"
            )
        return text

    def to_dict(self) -> dict:
        """Everything, JSON-ready."""
        return {
            **super().to_dict(),
            "journal": self.journal,
            "resumed_files": self.resumed,
            "timings": self.timings,
        }


@dataclass
class _Decoded:
    index: int
    job: io.ImageJob
    sha256: str
    image: io.LoadedImage
    target: Path


def key_fingerprint(key: str) -> str:
    """What the journal keeps of a targeted cloak's identity key: enough to notice a changed key.

    A memory-hard hash (scrypt, about 0.1 s and 32 MB), not a plain SHA-256: the journal lies in
    the output folder beside the photos, and a short key behind a fast hash is found by guessing.
    """
    digest = hashlib.scrypt(
        key.encode(), salt=b"facecloak journal identity key", n=2**15, r=8, p=1, maxmem=64 * 2**20, dklen=8
    )
    return "scrypt:" + digest.hex()


def run_resumable_batch(
    paths: Sequence[str | Path],
    protection: Protection | None,
    options: Options,
    *,
    settings: dict,
    detector: FaceDetector | None = None,
    command: str = "",
    on_progress: ProgressCallback | None = None,
    readers: int = READER_THREADS,
    tag: str | None = None,
    build: Callable[[], Protection] | None = None,
    workers: int | None = None,
) -> ResumableReport:
    """Protect every image under ``paths`` into ``options.out_dir``, journaled and pipelined.

    The rules of `facecloak.batch.run_batch` hold: every output is decided first
    (`facecloak.batch.plan_batch`); a missing or unreadable path fails alone; an output that
    exists and that this journal did not write is skipped (status "skipped") unless
    ``overwrite``; no image at all gives an empty report (exit code 1). Outputs the journal
    recorded for the same input and settings are not redone (`ResumedOutcome`).

    Args:
        paths: files and folders (walked recursively).
        protection: what to do with the faces (`facecloak.protection.AnonymizeFaces`,
            `CloakFaces`, `ReplaceFaces`); may be None with ``tag`` and ``build`` (then built only
            once a photo needs it, so a pure resume or re-run loads no model).
        options: file and detection settings; ``out_dir`` is required (the journal lives there).
            With ``overwrite`` every file is redone, whatever the journal says.
        settings: what shapes the outputs besides ``options`` (method, parameters, models...):
            a change of these redoes the files.
        detector: a ready detector (default: built from ``options``).
        command: name shown in the summary.
        on_progress: called with a `facecloak.batch.ProgressEvent` at the plan, while loading,
            per chunk and (cloaks) per optimisation step, and for every finished file (stage
            "file"; called from worker threads, one call at a time).
        readers: decoding threads.
        tag: output name suffix when ``protection`` is None.
        build: makes the protection when ``protection`` is None.
        workers: chunks protected at once, each on its own thread (default
            `facecloak._device.compute_workers`: 2 on a CPU, 1 on a GPU). Only protections that
            offer ``for_worker`` run concurrently. The method and settings are the same either
            way, but one thread's float sums are not two threads', so a face at the edge of a
            threshold can land on either side.

    Example:
        >>> protection = AnonymizeFaces(Anonymizer("blur"))  # doctest: +SKIP
        >>> options = Options(out_dir="out")  # doctest: +SKIP
        >>> report = run_resumable_batch(["photos"], protection, options, settings={})  # doctest: +SKIP
    """
    if not options.out_dir:
        raise InvalidInputError("a resumable batch needs an output folder (-o)")
    if protection is None and (tag is None or build is None):
        raise InvalidInputError("run_resumable_batch needs a protection, or a tag and a build function")
    tag = protection.tag if protection is not None else tag
    started = time.perf_counter()
    out_dir = Path(options.out_dir)
    # Every output path decided up front; which existing outputs to skip needs the journal (below).
    plan = plan_batch(paths, tag, replace(options, overwrite=True), check_overwrites=False)
    journal_settings = {**settings, **_output_options(options), "tag": tag}
    report = ResumableReport(
        command or tag,
        asdict(options),
        skipped=[(str(p), r) for p, r in plan.not_images],
        inputs=plan.inputs,
    )
    outcomes: list[FileOutcome] = []
    lock = threading.RLock()
    timings = {"decode_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    progress = _Progress(on_progress, lock, started)
    state: dict = {"protection": protection}

    def finish(outcome: FileOutcome) -> None:
        with lock:
            outcomes.append(outcome)
            progress.finish(outcome)

    if not (out_dir / JOURNAL_NAME).exists() and not any(
        options.overwrite or not target.exists() for _, target in plan.todo
    ):  # nothing to write (no image, or every output exists and is not ours): no journal, no folder
        shown = BatchPlan([], [(job.path, target) for job, target in plan.todo], plan.failed)
        shown.not_images, shown.inputs, shown.order = plan.not_images, plan.inputs, plan.order
        progress.files_total = len(plan.todo) + len(plan.failed)
        progress.emit("plan", plan=shown)
        for outcome in plan.failed:
            finish(outcome)
        for path, target in shown.existing:
            finish(FileOutcome(str(path), "skipped", output=str(target)))
        order = {path: k for k, path in enumerate(plan.order)}
        report.outcomes = sorted(outcomes, key=lambda outcome: order.get(outcome.path, len(order)))
        report.seconds = time.perf_counter() - started
        return report
    with Journal(out_dir, journal_settings) as journal:
        report.journal = str(journal.path)
        jobs: list[tuple[io.ImageJob, Path]] = []
        existing: list[tuple[Path, Path]] = []
        written_before = 0
        refused: list[FileOutcome] = []
        for job, target in plan.todo:
            decision, owned = existing_output_decision(journal, job.path, target, out_dir, options)
            if isinstance(decision, FileOutcome):
                refused.append(decision)
            elif decision == "skip":
                existing.append((job.path, target))
            else:
                jobs.append((job, target))
                written_before += bool(owned and target.exists() and not options.overwrite)
        shown = BatchPlan(
            jobs, existing, [*plan.failed, *refused], plan.not_images, plan.inputs, plan.order, written_before
        )
        progress.files_total = len(jobs) + len(existing) + len(shown.failed)
        progress.steps = protection.steps if protection is not None else 0
        progress.emit("plan", plan=shown)
        for outcome in shown.failed:
            finish(outcome)
        for path, target in existing:
            finish(FileOutcome(str(path), "skipped", output=str(target)))
        inputs = io.ProtectedFiles(job.path for job, _ in plan.todo)  # never replaced: one stat a check
        decoded: queue.Queue = queue.Queue(maxsize=max(2, 2 * options.chunk))
        finished: queue.Queue = queue.Queue(maxsize=max(2, 2 * options.chunk))
        next_job = iter(range(len(jobs)))
        stop = threading.Event()
        # what a reader or the writer did not expect (the progress callback's BrokenPipeError when
        # stdout's reader went away, a bug): the batch stops and the main thread raises it, where
        # a dead thread used to leave the others waiting on its queue forever
        crashed: list[BaseException] = []

        # the main thread is leaving on an exception (Ctrl-C, a worker's bug): a worker stops at its
        # next optimisation step, where it used to finish its chunk first (a CPU cloak: a minute)
        leaving = threading.Event()

        def crash(error: BaseException) -> None:
            with lock:
                crashed.append(error)
            stop.set()

        def read_one(index: int) -> _Decoded | FileOutcome:
            job, target = jobs[index]
            tick = time.perf_counter()
            try:
                sha256 = file_sha256(job.path)
                record = None if options.overwrite else journal.done_record(job.relative.as_posix(), sha256)
                if record is not None:
                    return resumed_outcome(str(job.path), record, out_dir)
                # transparency flattened here for a format without it: detection and the
                # protection see the photo as its output will show it
                image = io.for_output(io.read_image(job.path, max_pixels=options.max_pixels), target)
            except OSError as error:
                return FileOutcome(str(job.path), "failed", error=f"{job.path}: {error.strerror}")
            except FacecloakError as error:
                return FileOutcome(str(job.path), "failed", error=str(error))
            with lock:
                timings["decode_s"] += time.perf_counter() - tick
            return _Decoded(index, job, sha256, image, target)

        def read() -> None:
            try:
                while not stop.is_set():
                    with lock:
                        index = next(next_job, None)
                    if index is None:
                        break
                    item = read_one(index)
                    if isinstance(item, FileOutcome):
                        finish(item)  # outside read_one: its callback's errors are not this file's
                    else:
                        _put(decoded, item, stop)
            except BaseException as error:  # handed to the main thread
                crash(error)
            finally:
                _put(decoded, _END, stop)

        def write() -> None:
            try:
                while True:
                    item = finished.get()
                    if item is _END:
                        return
                    entry, output, records, seconds = item
                    tick = time.perf_counter()
                    finish(_write(entry, output, records, seconds, options, journal, out_dir, inputs))
                    with lock:
                        timings["write_s"] += time.perf_counter() - tick
            except BaseException as error:  # handed to the main thread
                crash(error)

        readers_running = [
            threading.Thread(target=read, daemon=True, name=f"facecloak-reader-{k}")
            for k in range(max(1, readers))
        ]
        writer = threading.Thread(target=write, daemon=True, name="facecloak-writer")
        for thread in [*readers_running, writer]:
            thread.start()
        count = compute_workers(options.device) if workers is None else max(1, int(workers))
        chunks = -(-len(jobs) // max(1, options.chunk))
        count = max(1, min(count, chunks))  # one chunk alone keeps every core (a worker gets its share)
        worker_state = threading.local()
        threads_before = torch.get_num_threads()

        def ready() -> tuple[Protection, FaceDetector]:
            """The calling thread's protection and the shared detector, built on the first chunk."""
            nonlocal detector
            with lock:
                if state["protection"] is None:  # built only once there is work (not on a pure resume)
                    state["protection"] = build()
                    progress.steps = state["protection"].steps
                if detector is None:
                    progress.emit("load")
                    detector = detector_for(options)
                if count == 1 or threading.current_thread() is threading.main_thread():
                    return state["protection"], detector
                if not hasattr(worker_state, "protection"):
                    worker_state.protection = state["protection"].for_worker()
                    torch.set_num_threads(max(1, threads_before // count))  # this thread's OpenMP team
                return worker_state.protection, detector

        def compute(chunk: list[_Decoded]) -> None:
            """Detect and protect a chunk together; one that runs out of memory, in smaller parts."""
            in_parts_that_fit(chunk, compute_part, too_large)

        def too_large(entry: _Decoded, detail: str) -> None:
            finish(
                FileOutcome(str(entry.job.path), "failed", error=str(out_of_memory(entry.job.path, detail)))
            )

        def compute_part(chunk: Sequence[_Decoded]) -> None:
            tick = time.perf_counter()
            counted = 0
            try:
                protection, found_by = ready()
                pixels = [entry.image.pixels for entry in chunk]
                names = tuple(entry.job.path.name for entry in chunk)
                progress.emit("detect", current=names)
                faces = found_by(pixels)
                found_at = time.perf_counter()
                counted = len(faces)
                progress.found(counted)
                storage = [io.stored_as(entry.target, entry.image, options.jpeg_quality) for entry in chunk]
                result = _protect(protection, pixels, faces, progress, names, storage, leaving)
            except FacecloakError as error:
                for entry in chunk:
                    finish(FileOutcome(str(entry.job.path), "failed", error=str(error)))
                return
            except Exception as error:
                if is_out_of_memory(error):
                    progress.found(-counted)  # its parts find these faces again
                raise
            done_at = time.perf_counter()
            per_photo = faces.image_index.bincount(minlength=len(chunk)).tolist()
            seconds = seconds_per_photo(found_at - tick, done_at - found_at, per_photo)
            with lock:
                timings["compute_s"] += done_at - tick
            for k, entry in enumerate(chunk):
                item = (entry, (result.images[k], result.to_encode(k)), result.records_for(k), seconds[k])
                _put(finished, item, stop)  # never blocks for good on a writer that stopped

        pool = None
        try:
            ended, running = 0, []
            while ended < len(readers_running) and not stop.is_set():
                chunk, ended = _take_chunk(decoded, max(1, options.chunk), ended, len(readers_running), stop)
                if not chunk or stop.is_set():
                    continue
                if pool is None and count > 1:
                    ready()  # build first, to learn whether the protection can run on workers
                    if getattr(state["protection"], "for_worker", lambda: None)() is None:
                        count = 1
                    else:
                        pool = ThreadPoolExecutor(count, thread_name_prefix="facecloak-compute")
                if pool is None:
                    compute(chunk)
                    continue
                while len(running) >= count:  # at most one chunk per worker in flight
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # re-raise what a worker did not expect
                    running = [future for future in running if not future.done()]
                running.append(pool.submit(compute, chunk))
            for future in running:
                future.result()
        except BaseException:
            leaving.set()
            raise
        finally:

            def settle() -> None:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    torch.set_num_threads(threads_before)  # MKL's count is process-wide: put it back
                stop.set()
                _drain(decoded)
                while writer.is_alive():  # the writer writes what was computed, then ends
                    try:
                        finished.put(_END, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                writer.join()
                for thread in readers_running:
                    thread.join()

            _despite_interrupts(settle)
        if crashed:
            raise crashed[0]
    order = {path: k for k, path in enumerate(plan.order)}
    report.outcomes = sorted(outcomes, key=lambda outcome: order.get(outcome.path, len(order)))
    report.resumed = sum(isinstance(outcome, ResumedOutcome) for outcome in report.outcomes)
    report.seconds = time.perf_counter() - started
    report.timings = {key: round(value, 3) for key, value in timings.items()}
    return report


def existing_output_decision(
    journal: Journal, photo: Path, target: Path, out_dir: Path, options: Options
) -> tuple[FileOutcome | str, bool]:
    """What a journaled batch does with ``photo``'s planned output ``target``, and whether it is ours.

    A failure (`facecloak.batch.replacing_refused`: another photo's output, or with --overwrite
    a file that is not this photo's), ``"skip"`` (a file the journal did not write, or changed
    since), or ``"write"``.
    """
    if not target.exists():  # nothing there to replace
        return "write", False
    relative_output = target.relative_to(out_dir).as_posix()
    other = journal.made_from_another(relative_output, photo)  # once: it may hash the photo
    owned = other is None and journal.owns(relative_output)
    refusal = replacing_refused(
        photo,
        target,
        overwrite=options.overwrite,
        ours=owned,
        other_input=other,
        max_pixels=options.max_pixels,
    )
    if refusal is not None:
        return refusal, owned
    return ("write" if options.overwrite or owned else "skip"), owned


def _despite_interrupts(step: Callable[[], None]) -> None:
    """Run ``step`` (which may run again from its start) to its end, though Ctrl-C comes meanwhile.

    A second Ctrl-C while a batch stopped left the threads running: the journal was closed under
    the writer ("the journal is not open" for every photo), and torch's threads at exit aborted
    the process (exit 134). The threads are joined first; a Ctrl-C that came is raised after.
    """
    interrupted = False
    while True:
        try:
            step()
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


class _Progress:
    """`ProgressEvent`s of a pipelined batch: files finished, faces, and the chunk's optimisation steps."""

    def __init__(self, callback: ProgressCallback | None, lock: threading.RLock, started: float) -> None:
        self.callback = callback
        self.lock = lock
        self.started = started
        self.files_total = 0
        self.files_done = 0
        self.files_instant = 0  # done earlier or skipped: they took no time, so they say nothing of the ETA
        self.faces_done = 0
        self.faces_seen: int | None = None  # faces detected so far (resumed files' included)
        self.steps = 0
        self.partial: dict[int, float] = {}  # per compute thread: its chunk's share of its files

    def emit(self, stage: str, *, faces_ahead: int = 0, **fields) -> None:
        """Send an event; ``faces_ahead``: faces of a chunk in progress already past their aim."""
        if self.callback is None:
            return
        with self.lock:
            done = min(self.files_total, self.files_done + sum(self.partial.values()))
            fraction = done / self.files_total if self.files_total else 0.0
            elapsed = time.perf_counter() - self.started
            # the rate of the files worked on now: a resumed batch's files done earlier count for
            # the bar, but an ETA from them said seconds for hours of work left
            worked = done - min(done, self.files_instant)
            left = self.files_total - done
            eta = elapsed * left / worked if worked > 0 and left > 0 else None
            self.callback(
                ProgressEvent(
                    stage=stage,
                    files_done=self.files_done,
                    files_total=self.files_total,
                    faces_done=self.faces_done + faces_ahead,
                    faces_total=self.faces_seen,
                    fraction=fraction,
                    eta_seconds=eta,
                    **fields,
                )
            )

    def found(self, faces: int) -> None:
        with self.lock:
            self.faces_seen = (self.faces_seen or 0) + faces

    def finish(self, outcome: FileOutcome) -> None:
        with self.lock:
            self.files_done += 1
            self.files_instant += isinstance(outcome, ResumedOutcome) or outcome.status == "skipped"
            self.faces_done += len(outcome.faces)
            if isinstance(outcome, ResumedOutcome):
                self.found(len(outcome.faces))
            self.emit("file", outcome=outcome)


class _Interrupted(Exception):
    """Ends a worker's optimisation at its next step: the batch is stopping (`_protect`'s ``halt``)."""


def _protect(
    protection: Protection,
    pixels,
    faces,
    progress: _Progress,
    names: tuple[str, ...],
    storage=None,
    halt: threading.Event | None = None,
) -> ProtectionResult:
    """Run the protection on a chunk, sending its per-step progress (cloaks).

    ``storage``: per photo, how its output file will hold it (`facecloak.io.stored_as`).
    ``halt``: once set, the optimisation stops at its next step (`_Interrupted`).
    """
    aim = protection.aim
    progress.emit("protect", current=names, steps=progress.steps, aim=aim)
    if not protection.steps:
        return protection.protect(pixels, faces)

    def on_step(step: int, steps: int, done, ratios) -> None:
        if halt is not None and halt.is_set():
            raise _Interrupted
        waiting = ratios[~done]
        distance = float(waiting.min()) if len(waiting) else float(ratios.min()) if len(ratios) else None
        finished = int(done.sum()) == len(done) or step >= steps
        with progress.lock:
            progress.partial[threading.get_ident()] = len(names) * min(1.0, step / max(1, steps)) * 0.9
        progress.emit(
            "check" if finished else "protect",
            faces_ahead=int(done.sum()),
            current=names,
            step=step,
            steps=steps,
            distance=distance,
            aim=aim,
        )

    try:
        return protection.protect(pixels, faces, on_step=on_step, stored_as=storage)
    finally:
        with progress.lock:
            progress.partial.pop(threading.get_ident(), None)


def _output_options(options: Options) -> dict:
    """The options that change an output's bytes, name or faces (the journal's fingerprint covers them)."""
    return {
        "format": options.format,
        "keep_metadata": options.keep_metadata,
        "jpeg_quality": options.jpeg_quality,
        "min_score": options.min_score,
        "min_size": options.min_size,
        # which quarter turns the detector looks in decides which faces are found (the summary
        # of a photo with no face suggests --rotations all: a rerun with it must redo the photo)
        "rotations": options.rotations,
    }


def _put(target: queue.Queue, item, stop: threading.Event) -> None:
    """Put, giving up if the batch is stopping (so a reader never blocks forever on a full queue)."""
    while True:
        try:
            target.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                return


def _take_chunk(
    decoded: queue.Queue, size: int, ended: int, readers: int, stop: threading.Event | None = None
) -> tuple[list[_Decoded], int]:
    """Up to ``size`` decoded photos: waits for a full chunk unless every reader has finished.

    A set ``stop`` (a thread failed) ends the wait with what came.
    """
    chunk: list[_Decoded] = []
    while len(chunk) < size and ended < readers:
        try:
            item = decoded.get(timeout=0.1)
        except queue.Empty:
            if stop is not None and stop.is_set():
                break
            continue
        if item is _END:
            ended += 1
        else:
            chunk.append(item)
    return chunk, ended


def _drain(target: queue.Queue) -> None:
    while True:
        try:
            target.get_nowait()
        except queue.Empty:
            return


def resumed_outcome(photo: str, record: dict, out_dir: Path) -> ResumedOutcome:
    """``photo`` as its journal's last ``done`` ``record`` says an earlier run left it (both batches)."""
    return ResumedOutcome(
        photo,
        record.get("status", "protected"),
        output=str(out_dir / record["output"]),
        faces=record.get("faces", []),
        written=record.get("written", {}) if isinstance(record.get("written"), dict) else {},
    )


@contextlib.contextmanager
def _journal_failure_named(photo: str | Path, what: str) -> Iterator[None]:
    """A journal append that fails names the photo it was about, then the journal's reason.

    The journal's own error names only the journal: on a full disk every photo after it failed
    with the same line, and the summary did not say which photos were left undone.
    """
    try:
        yield
    except JournalError as error:
        raise ImageWriteError(f"{what}: {error}", photo) from None


def journal_start(
    journal: Journal, photo: str | Path, relative: str, sha256: str, output: str, source: str | None
) -> None:
    """Journal ``start`` of ``photo``'s output (from here it is this batch's to replace).

    ``source``: where the photo really is (`facecloak.journal.source_key`), None where unknown
    (a URI). A journal that cannot be written names the photo left undone.
    """
    where = {} if source is None else {"source": source}
    with _journal_failure_named(photo, "not written"):
        journal.record("start", relative, sha256, output, **where)


def journal_done(
    journal: Journal,
    photo: str | Path,
    target: Path,
    relative: str,
    sha256: str,
    output: str,
    source: str | None,
    *,
    status: str,
    faces: list[dict],
    written: dict | None = None,
) -> None:
    """Journal ``done`` of ``photo``'s output ``target``, renamed into place, with its size.

    ``written`` (`facecloak.io.write_image`'s info: frames left out, alpha flattened...) is kept
    so that a resumed run reports what the output lacks, as the run that wrote it did.
    """
    size = target.stat().st_size
    where = {} if source is None else {"source": source}
    if written:
        where["written"] = written
    unjournaled = f"written to {shown_path(target)} but not journaled (redone next run)"
    with _journal_failure_named(photo, unjournaled):
        journal.record(
            "done", relative, sha256, output, status=status, output_bytes=size, faces=faces, **where
        )


def _write(
    entry: _Decoded,
    output: tuple[torch.Tensor, torch.Tensor],
    records: list[dict],
    seconds: float,
    options: Options,
    journal: Journal,
    out_dir: Path,
    inputs: io.ProtectedFiles,
) -> FileOutcome:
    """Journal ``start``, write atomically, journal ``done``: the order that makes a resume exact."""
    relative_input = entry.job.relative.as_posix()
    relative_output = entry.target.relative_to(out_dir).as_posix()
    path = str(entry.job.path)
    source = source_key(entry.job.path)

    def start() -> None:
        if entry.target.exists() and not (options.overwrite or journal.owns(relative_output, entry.job.path)):
            raise ImageWriteError("output exists (use --overwrite to replace earlier outputs)", entry.target)
        journal_start(journal, entry.job.path, relative_input, entry.sha256, relative_output, source)

    def done(status: str, written: dict) -> None:
        journal_done(
            journal,
            entry.job.path,
            entry.target,
            relative_input,
            entry.sha256,
            relative_output,
            source,
            status=status,
            faces=records,
            written=written,
        )

    measured, encode = output  # the photo the records measured, and the pixels to encode for it
    try:
        return write_output(
            entry.job.path,
            entry.image,
            measured,
            entry.target,
            records,
            options,
            seconds,
            protected=inputs,
            overwrite=True,
            before=start,
            after=done,
            encode=encode,
        )
    except OSError as error:
        return FileOutcome(path, "failed", error=f"{entry.target}: {error.strerror}", faces=records)
