"""A resumable, pipelined batch: the CLI's batch when it writes into an output folder.

Same contract as `facecloak.batch.run_batch` (the same `Protector`, `Options`, per-file
outcomes, summary and exit code), plus:

- a `facecloak.journal.Journal` in the output folder: a killed batch, run again with the same
  command, does only what is left; a changed input or changed settings is redone;
- decoding, computing and encoding overlap: reader threads hash and decode the next photos and a
  writer thread encodes and writes the finished ones while the models work on the current chunk,
  so the model never waits on the disk.

    reader threads --(decoded, bounded queue)--> models (this thread) --(queue)--> writer thread
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from facecloak import io
from facecloak.batch import BatchReport, FileOutcome, Options, ProgressCallback, Protector
from facecloak.detect import FaceDetector
from facecloak.errors import FacecloakError, ImageWriteError, InvalidInputError
from facecloak.journal import Journal, file_sha256

READER_THREADS = 2
_END = object()


@dataclass(frozen=True)
class ProtectorSpec:
    """A protector described by value: what the journal fingerprints and what a remote worker builds.

    Attributes:
        kind: "anonymize" (params: method and its keywords) or "cloak" (params: mode, level,
            models, identity_key, steps, max_dssim, seed).
        params: the settings, as the CLI gives them.

    Example:
        >>> ProtectorSpec("anonymize", {"method": "blur"}).build().tag
        'anonymized'
    """

    kind: str
    params: dict

    @staticmethod
    def cloak(mode: str, level: str, models: Sequence[str] | None = None, **params) -> ProtectorSpec:
        """A cloak spec; ``models`` None means every model available here (resolved now, by name)."""
        from facecloak.models import available_embedders

        names = list(models) if models else available_embedders()
        return ProtectorSpec("cloak", {"mode": mode, "level": level, "models": names, **params})

    def build(self, device: str | None = None) -> Protector:
        """The protector, with its models loaded on ``device`` (default: CUDA if present)."""
        from facecloak.batch import AnonymizeFaces, CloakFaces

        params = dict(self.params)
        if self.kind == "anonymize":
            from facecloak.anonymize import Anonymizer

            return AnonymizeFaces(Anonymizer(params.pop("method"), **params))
        if self.kind != "cloak":
            raise InvalidInputError(f"unknown protector kind {self.kind!r} (anonymize or cloak)")
        from facecloak.cloak import create_cloak
        from facecloak.models import create_embedder

        embedders = [create_embedder(name, device=device) for name in params.pop("models")]
        if not embedders:
            raise FacecloakError("no face model is available here; see `facecloak models`")
        return CloakFaces(create_cloak(params.pop("mode"), embedders, params.pop("level"), **params))

    def settings(self) -> dict:
        """The settings for the journal's fingerprint (a targeted cloak's key only as a hash)."""
        params = {key: value for key, value in self.params.items() if value is not None}
        if params.get("identity_key"):
            params["identity_key"] = hashlib.sha256(str(params["identity_key"]).encode()).hexdigest()[:16]
        return {"kind": self.kind, **params}


@dataclass
class ResumedOutcome(FileOutcome):
    """A file done by an earlier run of the same batch (found in the journal), not redone."""

    resumed: bool = True

    @property
    def message(self) -> str:
        """One line for the terminal."""
        return f"{self.path}: done earlier ({self.status}), skipped -> {self.output}"


@dataclass
class ResumableReport(BatchReport):
    """A `BatchReport` that also says what an earlier run had done and where the journal is."""

    journal: str = ""
    resumed: int = 0
    timings: dict = field(default_factory=dict)

    def __str__(self) -> str:
        text = super().__str__()
        if self.resumed:
            text += (
                f"\n  {self.resumed} file(s) done by an earlier run, skipped; "
                f"{len(self.outcomes) - self.resumed} processed now (journal: {self.journal})"
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


def run_resumable_batch(
    paths: Sequence[str | Path],
    protector: Protector,
    options: Options,
    *,
    settings: dict,
    detector: FaceDetector | None = None,
    command: str = "",
    on_progress: ProgressCallback | None = None,
    readers: int = READER_THREADS,
) -> ResumableReport:
    """Protect every image under ``paths`` into ``options.out_dir``, journaled and pipelined.

    Args:
        paths: files and folders (walked recursively).
        protector: what to do with the faces (`facecloak.batch.AnonymizeFaces`, `CloakFaces`).
        options: file and detection settings; ``out_dir`` is required (the journal lives there).
            With ``overwrite`` every file is redone, whatever the journal says.
        settings: what shapes the outputs besides ``options`` (method, parameters, models...):
            a change of these redoes the files.
        detector: a ready detector (default: built from ``options``).
        command: name shown in the summary.
        on_progress: called with (files finished, files total) as files finish.
        readers: decoding threads.

    Example:
        >>> protector = AnonymizeFaces(Anonymizer("blur"))  # doctest: +SKIP
        >>> report = run_resumable_batch(["photos"], protector, Options(out_dir="out"), settings={})
    """
    if not options.out_dir:
        raise InvalidInputError("a resumable batch needs an output folder (-o)")
    started = time.perf_counter()
    out_dir = Path(options.out_dir)
    jobs, skipped = io.collect_images(paths, exclude=out_dir)
    journal_settings = {**settings, **_output_options(options), "tag": protector.tag}
    report = ResumableReport(
        command or protector.tag, asdict(options), skipped=[(str(p), r) for p, r in skipped]
    )
    inputs = [job.path for job in jobs]
    outcomes: dict[int, FileOutcome] = {}
    lock = threading.Lock()
    timings = {"decode_s": 0.0, "compute_s": 0.0, "write_s": 0.0}

    def finish(index: int, outcome: FileOutcome) -> None:
        with lock:
            outcomes[index] = outcome
            done = len(outcomes)
        if on_progress is not None:
            on_progress(done, len(jobs))

    with Journal(out_dir, journal_settings) as journal:
        report.journal = str(journal.path)
        decoded: queue.Queue = queue.Queue(maxsize=max(2, 2 * options.chunk))
        finished: queue.Queue = queue.Queue(maxsize=max(2, 2 * options.chunk))
        next_job = iter(range(len(jobs)))
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                with lock:
                    index = next(next_job, None)
                if index is None:
                    break
                job = jobs[index]
                tick = time.perf_counter()
                try:
                    sha256 = file_sha256(job.path)
                    record = (
                        None if options.overwrite else journal.done_record(job.relative.as_posix(), sha256)
                    )
                    if record is not None:
                        finish(index, _resumed(job, record, out_dir))
                        continue
                    image = io.read_image(job.path, max_pixels=options.max_pixels)
                    target = io.output_path(job, out_dir, protector.tag, options.format, image.format)
                    if any(io.same_file(target, other) for other in inputs):
                        raise ImageWriteError("refusing to overwrite an input file", target)
                except OSError as error:
                    finish(index, FileOutcome(str(job.path), "failed", error=f"{job.path}: {error.strerror}"))
                    continue
                except FacecloakError as error:
                    finish(index, FileOutcome(str(job.path), "failed", error=str(error)))
                    continue
                with lock:
                    timings["decode_s"] += time.perf_counter() - tick
                _put(decoded, _Decoded(index, job, sha256, image, target), stop)
            _put(decoded, _END, stop)

        def write() -> None:
            while True:
                item = finished.get()
                if item is _END:
                    return
                entry, output, records, seconds = item
                tick = time.perf_counter()
                finish(
                    entry.index, _write(entry, output, records, seconds, options, journal, out_dir, inputs)
                )
                with lock:
                    timings["write_s"] += time.perf_counter() - tick

        readers_running = [threading.Thread(target=read, daemon=True) for _ in range(max(1, readers))]
        writer = threading.Thread(target=write, daemon=True)
        for thread in [*readers_running, writer]:
            thread.start()
        try:
            ended = 0
            while ended < len(readers_running):
                chunk, ended = _take_chunk(decoded, max(1, options.chunk), ended, len(readers_running))
                if not chunk:
                    continue
                tick = time.perf_counter()
                detector = detector or FaceDetector(  # built only once there is work (not on a pure resume)
                    min_score=options.min_score, min_size=options.min_size, device=options.device
                )
                try:
                    pixels = [entry.image.pixels for entry in chunk]
                    faces = detector(pixels)
                    outputs, records = protector(pixels, faces)
                except FacecloakError as error:
                    for entry in chunk:
                        finish(entry.index, FileOutcome(str(entry.job.path), "failed", error=str(error)))
                    continue
                seconds = (time.perf_counter() - tick) / len(chunk)
                timings["compute_s"] += time.perf_counter() - tick
                image_of_face = faces.image_index.tolist()
                for k, entry in enumerate(chunk):
                    mine = [record for record, index in zip(records, image_of_face) if index == k]
                    finished.put((entry, outputs[k], mine, seconds))
        finally:
            stop.set()
            _drain(decoded)
            finished.put(_END)
            writer.join()
            for thread in readers_running:
                thread.join()
    report.outcomes = [outcomes[i] for i in range(len(jobs)) if i in outcomes]
    report.resumed = sum(isinstance(outcome, ResumedOutcome) for outcome in report.outcomes)
    report.seconds = time.perf_counter() - started
    report.timings = {key: round(value, 3) for key, value in timings.items()}
    return report


def _output_options(options: Options) -> dict:
    """The options that change an output's bytes or name (the journal's fingerprint covers them)."""
    return {
        "format": options.format,
        "keep_metadata": options.keep_metadata,
        "jpeg_quality": options.jpeg_quality,
        "min_score": options.min_score,
        "min_size": options.min_size,
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


def _take_chunk(decoded: queue.Queue, size: int, ended: int, readers: int) -> tuple[list[_Decoded], int]:
    """Up to ``size`` decoded photos: waits for a full chunk unless every reader has finished."""
    chunk: list[_Decoded] = []
    while len(chunk) < size and ended < readers:
        item = decoded.get()
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


def _resumed(job: io.ImageJob, record: dict, out_dir: Path) -> ResumedOutcome:
    return ResumedOutcome(
        str(job.path),
        record.get("status", "protected"),
        output=str(out_dir / record["output"]),
        faces=record.get("faces", []),
    )


def _write(
    entry: _Decoded,
    output,
    records: list[dict],
    seconds: float,
    options: Options,
    journal: Journal,
    out_dir: Path,
    inputs: list[Path],
) -> FileOutcome:
    """Journal ``start``, write atomically, journal ``done``: the order that makes a resume exact."""
    relative_input = entry.job.relative.as_posix()
    relative_output = entry.target.relative_to(out_dir).as_posix()
    path = str(entry.job.path)
    if not records:
        status = "no_face"
    elif all(record.get("protected", True) for record in records):
        status = "protected"
    else:
        status = "unprotected"
    try:
        if entry.target.exists() and not (options.overwrite or journal.owns(relative_output)):
            raise ImageWriteError("output exists (use --overwrite to replace earlier outputs)", entry.target)
        journal.record("start", relative_input, entry.sha256, relative_output)  # from here the output is ours
        io.write_image(
            entry.target,
            output,
            source=entry.image,
            keep_metadata=options.keep_metadata,
            protected=inputs,
            overwrite=True,
            jpeg_quality=options.jpeg_quality,
        )
        size = entry.target.stat().st_size
        journal.record(
            "done",
            relative_input,
            entry.sha256,
            relative_output,
            status=status,
            output_bytes=size,
            faces=records,
        )
    except FacecloakError as error:
        return FileOutcome(path, "failed", error=str(error), faces=records, seconds=round(seconds, 3))
    except OSError as error:
        return FileOutcome(path, "failed", error=f"{entry.target}: {error.strerror}", faces=records)
    return FileOutcome(path, status, output=str(entry.target), faces=records, seconds=round(seconds, 3))
