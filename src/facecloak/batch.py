"""Batches of files: plan, read, detect, protect, write, and count what happened to each file.

Layered like black: `plan_batch` decides every output path before any work (an input whose
output exists is skipped unless ``overwrite``; a missing or unreadable path is one file's
error, not the batch's); a `facecloak.protection.Protection` turns a list of decoded images and
their `Faces` into output images and per-face records; `run_batch` detects every face first (so the totals are
known), then protects the photos in chunks, catching each file's `FacecloakError` so one bad
file never stops the batch, and reports progress as `ProgressEvent`s; `BatchReport` counts
outcomes, derives the exit code and renders the summary. The CLI only parses options, calls
`run_batch` and prints.

Exit codes: 0 every face found was protected (skipped files count as done); 1 finished, but
some image had no face or a face fell short of its protection target, or there was no image at
all; 2 usage error (from the CLI); 3 some file failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from facecloak import io
from facecloak.cloak.verify import DISTANCE_AFTER_UPLOAD_KEY
from facecloak.defaults import MIN_FACE_PX, MIN_FACE_SCORE
from facecloak.detect import FaceDetector
from facecloak.errors import (  # noqa: F401  (EXIT_* re-exported: the exit codes live in errors)
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNPROTECTED,
    EXIT_USAGE,
    FacecloakError,
    ImageWriteError,
    InvalidInputError,
)
from facecloak.faces import Faces
from facecloak.protection import Protection


@dataclass(frozen=True)
class Options:
    """File and detection settings of a run; written verbatim into the JSON report.

    Attributes:
        out_dir: output folder (mirrors the input tree); None writes beside each input.
        format: output format name ("jpeg", "png", ...); None keeps each input's format.
        keep_metadata: keep EXIF minus GPS (default: drop it all).
        overwrite: redo inputs whose output exists and replace it (inputs are never replaced);
            without it such inputs are skipped before any work.
        max_pixels: decompression-bomb guard per image.
        min_score: detection confidence threshold.
        min_size: smallest face side looked for, in pixels.
        device: torch device name, None for CUDA when present else CPU.
        chunk: images read, detected and processed together.
        jpeg_quality: quality of JPEG/WebP outputs; None keeps a JPEG input's own quantisation
            and re-encodes only the blocks around the faces (`facecloak.jpeg_blocks`).
    """

    out_dir: str | None = None
    format: str | None = None
    keep_metadata: bool = False
    overwrite: bool = False
    max_pixels: int | None = None
    min_score: float = MIN_FACE_SCORE
    min_size: int = MIN_FACE_PX
    device: str | None = None
    chunk: int = 8
    jpeg_quality: int | None = None


@dataclass
class FileOutcome:
    """What happened to one input file."""

    path: str
    status: str  # "protected", "no_face", "unprotected", "failed", "skipped" (output exists)
    output: str | None = None
    faces: list[dict] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    written: dict = field(default_factory=dict)  # how the output was encoded (see io.write_image)

    @property
    def message(self) -> str:
        """One line for the terminal."""
        if self.status == "failed":
            return f"error: {self.error}"
        if self.status == "skipped":
            return f"{self.path}: skipped, output exists: {self.output}"
        if self.status == "no_face":
            return f"{self.path}: no face found; written unchanged to {self.output}{self._encoding_note()}"
        short = sum(not face.get("protected", True) for face in self.faces)
        if self.status == "unprotected":
            return (
                f"{self.path}: {short} of {len(self.faces)} face(s) NOT protected -> {self.output}"
                f"{self._encoding_note()}"
            )
        return f"{self.path}: {len(self.faces)} face(s) -> {self.output}{self._encoding_note()}"

    def _encoding_note(self) -> str:
        if self.written.get("encoding") == "jpeg-blocks":
            kept = self.written["mcus_total"] - self.written["mcus_reencoded"]
            return f" (JPEG: {kept} of {self.written['mcus_total']} blocks kept bit-exact)"
        if "jpeg_fallback" in self.written:
            return f" ({self.written['jpeg_fallback']})"
        return ""


@dataclass
class BatchReport:
    """Outcomes of a batch, with its options; renders the summary, the table and the exit code."""

    command: str
    options: dict
    outcomes: list[FileOutcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files in folders that are not images
    seconds: float = 0.0
    inputs: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Number of files with ``status``."""
        return sum(outcome.status == status for outcome in self.outcomes)

    @property
    def empty(self) -> bool:
        """No image at all under the paths given."""
        return not self.outcomes

    @property
    def faces(self) -> int:
        """Faces found in all files."""
        return sum(len(outcome.faces) for outcome in self.outcomes)

    @property
    def unprotected_faces(self) -> int:
        """Faces found whose protection fell short."""
        return sum(not face.get("protected", True) for outcome in self.outcomes for face in outcome.faces)

    @property
    def exit_code(self) -> int:
        """3 if a file failed; else 1 if an image had no face, a face fell short, or nothing was found."""
        if self.count("failed"):
            return EXIT_FAILED
        if self.empty or self.count("no_face") or self.count("unprotected"):
            return EXIT_UNPROTECTED
        return EXIT_OK

    def __str__(self) -> str:
        if self.empty:
            where = ", ".join(self.inputs) or "(nothing given)"
            lines = [f"{self.command}: no image found in {where}; nothing to do"]
            if self.skipped:
                lines.append(f"  {len(self.skipped)} file(s) skipped (not images)")
            return "\n".join(lines)
        earlier = sum(bool(getattr(o, "resumed", False)) for o in self.outcomes)  # done by a previous run
        done = len(self.outcomes) - self.count("skipped") - self.count("failed") - earlier
        skipped = self.count("skipped") + earlier
        lines = [
            f"{self.command}: {len(self.outcomes)} image(s): {done} done, {skipped} skipped, "
            f"{self.count('failed')} failed; {self.faces} face(s) found, "
            f"{self.faces - self.unprotected_faces} protected, in {self.seconds:.1f} s"
        ]
        if self.count("skipped"):
            lines.append(
                f"  {self.count('skipped')} image(s) skipped: their output exists (--overwrite redoes them)"
            )
        if self.count("no_face"):
            lines.append(
                f"  {self.count('no_face')} image(s) with NO face found (nothing was changed in them):"
            )
            lines += [f"    {o.path}" for o in self.outcomes if o.status == "no_face"]
        if self.unprotected_faces:
            lines.append(f"  {self.unprotected_faces} face(s) NOT protected (fell short of the target):")
            lines += [f"    {o.path}" for o in self.outcomes if o.status == "unprotected"]
        if self.count("failed"):
            lines.append(f"  {self.count('failed')} file(s) failed:")
            lines += [f"    {o.error}" for o in self.outcomes if o.status == "failed"]
        if self.skipped:
            lines.append(f"  {len(self.skipped)} file(s) skipped (not images, or outputs of this command)")
        blurred = [
            (o.path, f)
            for o in self.outcomes
            for f in o.faces
            if f.get("method") == "blur" and f.get("reason")
        ]
        if blurred:
            lines.append(f"  {len(blurred)} face(s) blurred instead of replaced:")
            lines += [f"    {path}: {face['reason']}" for path, face in blurred]
        return "\n".join(lines)

    def table(self) -> list[list[str]]:
        """Rows of the final table (first row the header): one per file that was worked on."""
        rows = [["file", "faces", "protected", "distance / threshold", "face DSSIM", "s", "output"]]
        for outcome in self.outcomes:
            if outcome.status in ("failed", "skipped"):
                continue
            ratios = [_worst_ratio(face) for face in outcome.faces]
            ratios = [r for r in ratios if r is not None]
            dssims = [face["dssim"] for face in outcome.faces if "dssim" in face]
            protected = sum(face.get("protected", True) for face in outcome.faces)
            rows.append(
                [
                    outcome.path,
                    str(len(outcome.faces)),
                    f"{protected}/{len(outcome.faces)}",
                    f"{min(ratios):.2f}x" if ratios else "-",
                    f"{max(dssims):.4f}" if dssims else "-",
                    f"{outcome.seconds:.1f}",
                    outcome.output or "-",
                ]
            )
        return rows

    def to_dict(self) -> dict:
        """Everything, JSON-ready."""
        return {
            "command": self.command,
            "options": self.options,
            "exit_code": self.exit_code,
            "images": len(self.outcomes),
            "faces": self.faces,
            "unprotected_faces": self.unprotected_faces,
            "no_face_images": self.count("no_face"),
            "failed_files": self.count("failed"),
            "skipped_existing": self.count("skipped"),
            "seconds": round(self.seconds, 3),
            "files": [asdict(outcome) for outcome in self.outcomes],
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


def _worst_ratio(face: dict) -> float | None:
    """A cloaked face's smallest distance / threshold over its models (after JPEG 75 when measured)."""
    ratios = []
    for model in face.get("models", {}).values():
        distance = model.get(DISTANCE_AFTER_UPLOAD_KEY)
        distance = model.get("distance") if distance is None else distance
        if distance is not None and model.get("threshold"):
            ratios.append(distance / model["threshold"])
    return min(ratios) if ratios else None


@dataclass
class BatchPlan:
    """Every input and what will happen to it, decided before any work.

    Attributes:
        todo: (input job, output path) of the photos to protect.
        existing: (input, output) of photos skipped because their output exists.
        failed: inputs that cannot be done (missing, not an image, output clash), with the reason.
        not_images: files passed over, with the reason: inside folders, files without an image
            suffix; anywhere, files that are this command's output of another input.
        inputs: the paths as given.
        order: every input file in the order found (the report lists files in this order).
    """

    todo: list[tuple[io.ImageJob, Path]] = field(default_factory=list)
    existing: list[tuple[Path, Path]] = field(default_factory=list)
    failed: list[FileOutcome] = field(default_factory=list)
    not_images: list[tuple[Path, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """No image at all under the paths given."""
        return not (self.todo or self.existing or self.failed)


def plan_batch(paths: Sequence[str | Path], tag: str, options: Options) -> BatchPlan:
    """Decide every output path, and which inputs to skip or fail, before any work.

    Args:
        paths: files and folders (walked recursively); a missing path is one failed file.
        tag: output name suffix (``<stem>_<tag>.<ext>``).
        options: file settings (``out_dir``, ``format``, ``overwrite``, ``max_pixels``).

    Example:
        >>> plan = plan_batch(["samples/"], "cloaked", Options(out_dir="out"))  # doctest: +SKIP
        >>> len(plan.todo), len(plan.existing)
        (3, 0)
    """
    out_dir = Path(options.out_dir) if options.out_dir else None
    jobs, not_images = io.collect_images(paths, exclude=out_dir)
    plan = BatchPlan(
        not_images=not_images, inputs=[str(path) for path in paths], order=[str(job.path) for job in jobs]
    )
    inputs = [job.path for job in jobs]
    planned: list[tuple[io.ImageJob, Path]] = []
    for job in jobs:
        try:
            source_format = io.probe_image(job.path, max_pixels=options.max_pixels)
            target = io.output_path(job, out_dir, tag, options.format, source_format)
        except FacecloakError as error:
            plan.failed.append(FileOutcome(str(job.path), "failed", error=str(error)))
            continue
        planned.append((job, target))
    targets = {target.resolve(): job.path for job, target in planned}
    earlier = {job.path for job, _ in planned if targets.get(job.path.resolve(), job.path) != job.path}
    inputs = [path for path in inputs if path not in earlier]
    claimed: dict[Path, Path] = {}
    for job, target in planned:
        if job.path in earlier:  # this command's output of another input here: never an input
            plan.not_images.append((job.path, f"the {tag} output of {targets[job.path.resolve()]}"))
            plan.order.remove(str(job.path))
            continue
        key = target.resolve()
        problem = None
        if any(io.same_file(target, other) for other in inputs):
            problem = "refusing to overwrite an input file"
        elif key in claimed:
            problem = f"same output as {claimed[key]}"
        if problem:
            error = ImageWriteError(problem, target)
            plan.failed.append(FileOutcome(str(job.path), "failed", error=str(error)))
            continue
        claimed[key] = job.path
        if target.exists() and not options.overwrite:
            plan.existing.append((job.path, target))
        else:
            plan.todo.append((job, target))
    return plan


@dataclass(frozen=True)
class ProgressEvent:
    """Where a batch is, for a progress display.

    Attributes:
        stage: "plan" (once, before any work), "load" (building the face detector), "detect"
            (per chunk), "protect" (per chunk and, for cloaks, per optimisation step), "check"
            (a cloak's last step is done: its after-upload check runs), "file" (one file
            finished: ``outcome``).
        files_done: input files finished (written, failed or skipped) out of ``files_total``.
        faces_done: faces finished (protection done) out of ``faces_total`` (None while
            faces are still being detected).
        step: optimisation step of the current chunk, out of ``steps`` (0 when not optimising).
        distance: current chunk, the farthest-behind unfinished face's distance from its
            identity as a multiple of its match threshold, under this step's simulated upload
            (cloaks only; the closest face once all are done).
        aim: the multiple the cloak aims at.
        fraction: share of the whole batch's work done, 0 to 1 (detection counts one unit per
            photo, protection one per photo plus, for cloaks, the most steps per face).
        eta_seconds: estimated time left (None until it can be estimated).
        current: names of the files being worked on.
        outcome: the finished file (stage "file").
        plan: the plan (stage "plan").
    """

    stage: str
    files_done: int
    files_total: int
    faces_done: int = 0
    faces_total: int | None = None
    step: int = 0
    steps: int = 0
    distance: float | None = None
    aim: float | None = None
    fraction: float = 0.0
    eta_seconds: float | None = None
    current: tuple[str, ...] = ()
    outcome: FileOutcome | None = None
    plan: BatchPlan | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def run_batch(
    paths: Sequence[str | Path],
    protection: Protection | None,
    options: Options,
    *,
    detector: FaceDetector | None = None,
    command: str = "",
    on_progress: ProgressCallback | None = None,
    plan: BatchPlan | None = None,
) -> BatchReport:
    """Protect every image under ``paths``; never raise for a bad file, report it instead.

    Every output path is decided first (`plan_batch`): inputs whose output exists are skipped
    (status "skipped", exit code unaffected) unless ``options.overwrite``; missing or unreadable
    paths fail alone (status "failed", exit code 3). Then every face is detected, then the
    photos are protected chunk by chunk and each output is written as soon as its chunk is done.

    Args:
        paths: files and folders (walked recursively).
        protection: what to do with the faces (an anonymiser or a cloak); may be None when
            ``plan`` has nothing to do (so a re-run loads no model).
        options: file and detection settings.
        detector: a ready detector (default: built from ``options``).
        command: name shown in the summary.
        on_progress: called with a `ProgressEvent` at each stage, step and finished file.
        plan: a plan made beforehand with `plan_batch` (default: made here, with ``protection.tag``).
    """
    started = time.perf_counter()
    if plan is None:
        if protection is None:
            raise InvalidInputError("run_batch needs a protection or a plan")
        plan = plan_batch(paths, protection.tag, options)
    tracker = _Tracker(plan, protection, on_progress, started)
    report = BatchReport(
        command or (protection.tag if protection else "batch"),
        asdict(options),
        skipped=[(str(p), r) for p, r in plan.not_images],
        inputs=plan.inputs,
    )
    report.outcomes += plan.failed
    for path, target in plan.existing:
        report.outcomes.append(FileOutcome(str(path), "skipped", output=str(target)))
    tracker.emit("plan", plan=plan)
    for outcome in report.outcomes:
        tracker.finish(outcome)
    if plan.todo:
        if protection is None:
            raise InvalidInputError("run_batch has photos to protect but no protection")
        if detector is None:
            tracker.emit("load")
            detector = FaceDetector(
                min_score=options.min_score, min_size=options.min_size, device=options.device
            )
        found = _detect_all(plan.todo, detector, options, tracker)
        tracker.faces_total = sum(len(faces) for faces in found.values() if faces is not None)
        for index, _ in enumerate(plan.todo):
            if found[index] is None:
                report.outcomes.append(tracker.failures.pop(index))
        ready = [index for index in range(len(plan.todo)) if found[index] is not None]
        for start in range(0, len(ready), max(1, options.chunk)):
            chunk = ready[start : start + max(1, options.chunk)]
            report.outcomes += _protect_chunk(
                [plan.todo[i] for i in chunk], [found[i] for i in chunk], protection, options, tracker
            )
    order = {path: k for k, path in enumerate(plan.order)}
    report.outcomes.sort(key=lambda outcome: order.get(outcome.path, len(order)))
    report.seconds = time.perf_counter() - started
    return report


class _Tracker:
    """Counts finished files and faces, estimates the time left, and sends `ProgressEvent`s."""

    def __init__(
        self,
        plan: BatchPlan,
        protection: Protection | None,
        callback: ProgressCallback | None,
        started: float,
    ) -> None:
        self.callback = callback
        self.files_total = len(plan.todo) + len(plan.existing) + len(plan.failed)
        self.files_done = 0
        self.faces_total: int | None = None
        self.faces_done = 0
        self.steps = protection.steps if protection is not None else 0
        self.aim = protection.aim if protection is not None else None
        self.work_total = 0.0  # detection counts 1 per photo; each face `steps` more (1 if none)
        self.work_done = 0.0
        self.work_started: float | None = None
        self.started = started
        self.failures: dict[int, FileOutcome] = {}

    def emit(self, stage: str, **fields) -> None:
        if self.callback is None:
            return
        self.callback(
            ProgressEvent(
                stage=stage,
                files_done=self.files_done,
                files_total=self.files_total,
                faces_done=self.faces_done,
                faces_total=self.faces_total,
                fraction=min(1.0, self.work_done / self.work_total) if self.work_total else 0.0,
                eta_seconds=self.eta(),
                **fields,
            )
        )

    def eta(self) -> float | None:
        if self.work_started is None or self.work_done <= 0 or self.work_total <= 0:
            return None
        elapsed = time.perf_counter() - self.work_started
        return max(0.0, elapsed * (self.work_total - self.work_done) / self.work_done)

    def finish(self, outcome: FileOutcome) -> None:
        self.files_done += 1
        self.emit("file", outcome=outcome)

    def face_work(self) -> float:
        return float(max(1, self.steps))


def _detect_all(
    todo: list[tuple[io.ImageJob, Path]], detector: FaceDetector, options: Options, tracker: _Tracker
) -> dict[int, Faces | None]:
    """Detect the faces of every photo to do (decoded chunk by chunk, not kept): None where unreadable."""
    found: dict[int, Faces | None] = {}
    size = max(1, options.chunk)
    tracker.work_total = float(len(todo))
    tracker.work_started = time.perf_counter()
    for start in range(0, len(todo), size):
        indices = list(range(start, min(start + size, len(todo))))
        tracker.emit("detect", current=tuple(todo[i][0].path.name for i in indices))
        images: list[tuple[int, Tensor]] = []
        for i in indices:
            try:
                images.append((i, io.read_image(todo[i][0].path, max_pixels=options.max_pixels).pixels))
            except FacecloakError as error:
                found[i] = None
                tracker.failures[i] = FileOutcome(str(todo[i][0].path), "failed", error=str(error))
        if images:
            with torch.no_grad():
                faces = detector([pixels for _, pixels in images]).to("cpu")
            for k, (i, _) in enumerate(images):
                found[i] = faces.for_image(k)
        tracker.work_done += len(indices)
        for i in indices:
            if found[i] is None:
                tracker.finish(tracker.failures[i])
    faces_total = sum(len(faces) for faces in found.values() if faces is not None)
    readable = sum(faces is not None for faces in found.values())
    tracker.work_total = tracker.work_done + readable + faces_total * tracker.face_work()
    return found


def _protect_chunk(
    todo: list[tuple[io.ImageJob, Path]],
    found: list[Faces],
    protection: Protection,
    options: Options,
    tracker: _Tracker,
) -> list[FileOutcome]:
    """Read a chunk again, protect its faces together, write each output; one outcome per file."""
    started = time.perf_counter()
    names = tuple(job.path.name for job, _ in todo)
    outcomes: list[FileOutcome] = []
    loaded: list[tuple[io.ImageJob, Path, io.LoadedImage, Faces]] = []
    for (job, target), faces in zip(todo, found):
        try:
            loaded.append((job, target, io.read_image(job.path, max_pixels=options.max_pixels), faces))
        except FacecloakError as error:
            outcome = FileOutcome(str(job.path), "failed", error=str(error))
            tracker.work_done += 1 + len(faces) * tracker.face_work()
            tracker.finish(outcome)
            outcomes.append(outcome)
    if not loaded:
        return outcomes
    faces = Faces.cat([faces.shifted(k) for k, (_, _, _, faces) in enumerate(loaded)])
    face_count = len(faces)
    work_before = tracker.work_done
    faces_before = tracker.faces_done
    tracker.emit("protect", current=names, steps=tracker.steps, aim=tracker.aim)

    def on_step(step: int, steps: int, done: Tensor, ratios: Tensor) -> None:
        finished = int(done.sum())
        tracker.faces_done = faces_before + finished
        per_face = tracker.face_work()
        tracker.work_done = work_before + sum(per_face if d else min(step, per_face) for d in done.tolist())
        waiting = ratios[~done]
        distance = float(waiting.min()) if len(waiting) else float(ratios.min()) if len(ratios) else None
        stage = "check" if finished == len(done) or step >= steps else "protect"
        tracker.emit(stage, current=names, step=step, steps=steps, distance=distance, aim=tracker.aim)

    pixels = [image.pixels for _, _, image, _ in loaded]
    result = protection.protect(pixels, faces, on_step=on_step)
    tracker.faces_done = faces_before + face_count
    tracker.work_done = work_before + len(loaded) + face_count * tracker.face_work()
    seconds = (time.perf_counter() - started) / len(loaded)
    for k, (job, target, image, _) in enumerate(loaded):
        outcome = _write_output(
            job.path, image, result.images[k], target, result.records_for(k), options, seconds
        )
        tracker.finish(outcome)
        outcomes.append(outcome)
    return outcomes


def _write_output(
    path: Path,
    image: io.LoadedImage,
    output: Tensor,
    target: Path,
    face_records: list[dict],
    options: Options,
    seconds: float,
) -> FileOutcome:
    written: dict = {}
    try:
        io.write_image(
            target,
            output,
            source=image,
            keep_metadata=options.keep_metadata,
            protected=[path],
            overwrite=options.overwrite,
            jpeg_quality=options.jpeg_quality,
            info=written,
        )
    except FacecloakError as error:
        return FileOutcome(str(path), "failed", error=str(error), faces=face_records, seconds=seconds)
    if not face_records:
        status = "no_face"
    elif all(record.get("protected", True) for record in face_records):
        status = "protected"
    else:
        status = "unprotected"
    return FileOutcome(
        str(path), status, output=str(target), faces=face_records, seconds=round(seconds, 3), written=written
    )
