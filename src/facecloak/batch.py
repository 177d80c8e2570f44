"""Batches of files: plan, read, detect, protect, write, and count what happened to each file.

Layered like black: `plan_batch` decides every output path before any work (an input whose
output exists is skipped unless ``overwrite``; a missing or unreadable path is one file's
error, not the batch's); a `facecloak.protection.Protection` turns a list of decoded images and
their `Faces` into output images and per-face records; `run_batch` detects every face first (so the totals are
known), then protects the photos in chunks, catching each file's `FacecloakError` so one bad
file never stops the batch, and reports progress as `ProgressEvent`s; `BatchReport` counts
outcomes, derives the exit code and renders the summary. The CLI only parses options, calls
`run_batch` and prints. The data types (`Options`, `BatchPlan`, `FileOutcome`, `BatchReport`,
`ProgressEvent`) live in `facecloak.batch_types` and are re-exported here.

Exit codes: 0 every face found was protected (skipped files count as done); 1 finished, but
some image had no face or a face fell short of its protection target, or there was no image at
all; 2 usage error (from the CLI); 3 some file failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from facecloak import io
from facecloak._device import in_parts_that_fit, is_out_of_memory
from facecloak.anonymize import METHODS as ANONYMIZE_METHODS
from facecloak.batch_types import (
    BatchPlan,
    BatchReport,
    FileOutcome,
    Options,
    ProgressCallback,
    ProgressEvent,
)
from facecloak.detect import FaceDetector, detector_for
from facecloak.errors import (  # noqa: F401  (EXIT_* re-exported: the exit codes live in errors)
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNPROTECTED,
    EXIT_USAGE,
    FacecloakError,
    ImageReadError,
    ImageWriteError,
    InvalidInputError,
    OutOfMemoryError,
)
from facecloak.faces import Faces, pixel_bounds
from facecloak.protection import CloakFaces, Protection, ProtectionResult


def plan_batch(
    paths: Sequence[str | Path], tag: str, options: Options, *, check_overwrites: bool = True
) -> BatchPlan:
    """Decide every output path, and which inputs to skip or fail, before any work.

    Args:
        paths: files and folders (walked recursively); a missing path is one failed file.
        tag: output name suffix (``<stem>_<tag>.<ext>``).
        options: file settings (``out_dir``, ``format``, ``overwrite``, ``max_pixels``).
        check_overwrites: with ``options.overwrite``, fail an input whose existing output is not
            it with its faces changed (`replacing_refused`). A journaled batch checks after its
            journal (what it wrote is its to replace) and plans with this off.

    Example:
        >>> plan = plan_batch(["samples/"], "cloaked", Options(out_dir="out"))  # doctest: +SKIP
        >>> len(plan.todo), len(plan.existing)  # doctest: +SKIP
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
    earlier = _earlier_outputs(planned, tag, overwrite=options.overwrite, max_pixels=options.max_pixels)
    inputs = io.ProtectedFiles(path for path in inputs if path not in earlier)
    # found as outputs of earlier runs: with --overwrite they were already found to look like
    # their photos (`_earlier_outputs`), which is not read again below
    seen_alike = {path.resolve() for path in earlier} if options.overwrite else set()
    claimed: dict[Path, Path] = {}
    for job, target in planned:
        if job.path in earlier:  # an output of an earlier run here: never an input
            plan.not_images.append((job.path, earlier[job.path]))
            plan.order.remove(str(job.path))
            continue
        try:
            key = target.resolve()
            is_dir = target.is_dir()
        except OSError as error:  # a path longer than the system takes: a traceback stopped the batch
            way_out = "a shorter -o" if out_dir else "a shorter name"
            problem = f"its output path cannot be used ({error.strerror}; {way_out})"
            plan.failed.append(
                FileOutcome(str(job.path), "failed", error=str(ImageWriteError(problem, job.path)))
            )
            continue
        problem = None
        if is_dir:
            problem = f"its output {target} is a folder"
        elif target in inputs:
            way_out = "rename one" if out_dir else "give -o, or rename one"
            problem = f"its output {target} is an input too: not overwritten ({way_out})"
        elif key in claimed:
            # photo.jpg and photo.png both give photo_cloaked.png when one format is asked for
            # (a cloak's default): -o mirrors the folder, so only a name or the format tells them apart
            other = claimed[key]
            way_out = "rename one"
            if other.suffix.lower() != job.path.suffix.lower() and options.format is not None:
                way_out += ", or --format input keeps each input's format"
            problem = f"its output {target} is also the output of {other} ({way_out})"
        if problem:
            plan.failed.append(
                FileOutcome(str(job.path), "failed", error=str(ImageWriteError(problem, job.path)))
            )
            continue
        claimed[key] = job.path
        refused = None
        if target.exists() and check_overwrites and key not in seen_alike:
            refused = replacing_refused(
                job.path, target, overwrite=options.overwrite, max_pixels=options.max_pixels
            )
        if refused is not None:
            plan.failed.append(refused)
        elif target.exists() and not options.overwrite:
            plan.existing.append((job.path, target))
        else:
            plan.todo.append((job, target))
    return plan


def replacing_refused(
    photo: Path | str,
    target: Path,
    *,
    overwrite: bool,
    ours: bool = False,
    other_input: str | None = None,
    max_pixels: int | None = None,
) -> FileOutcome | None:
    """The failure of ``photo`` whose output ``target`` exists and is not its to replace; else None.

    - ``other_input``: the journal says the file is the output of that other photo (``day1/x.jpg``
      and ``day2/x.jpg`` into one ``-o``, a day apart): the second was skipped as done, exit 0,
      its face never protected.
    - With ``overwrite``, a file that is not ``ours`` (journaled) must look like the photo with its
      faces changed (`io.looks_like`): ``anonymize x.jpg --overwrite`` replaced the user's own
      ``x_blur.jpg``, another photo, with no word.
    """
    if other_input is not None:
        problem = (
            f"its output {target} is the output of another photo (an earlier run's {other_input}, by "
            "the journal): not replaced; rename one, or write to another folder"
        )
    elif overwrite and not ours and not io.looks_like(target, Path(photo), max_pixels=max_pixels):
        problem = (
            f"its output {target} exists and is not this photo with its faces changed (another photo?): "
            "not overwritten; move it away first"
        )
    else:
        return None
    return FileOutcome(str(photo), "failed", error=str(ImageWriteError(problem, photo)))


OUTPUT_TAGS = (CloakFaces.tag, *ANONYMIZE_METHODS)
"""The name tags of every command's outputs (``photo_cloaked.png``, ``photo_blur.jpg``...)."""


def _earlier_outputs(
    planned: list[tuple[io.ImageJob, Path]],
    tag: str,
    *,
    overwrite: bool = False,
    max_pixels: int | None = None,
) -> dict[Path, str]:
    """The files found in folders that are outputs of earlier runs, each with the reason.

    This command's output of another input here, or any command's output (``<stem>_<tag>``) of
    a photo beside it: runs of several methods into one folder do not take each other's outputs
    for photos. A file named on the command line is always an input. With ``overwrite`` a name is
    not enough (``anonymize photos/ --overwrite`` replaced the user's own ``x_blur.jpg``, another
    photo, beside ``x.jpg``): the file must also look like its photo (`io.looks_like`); one that does
    not is an input, and its photo's output then fails as "an input too".
    """
    # every photo a name may come from: two (b.JPG, b.jpeg) share an output, and the last one
    # was named its source alone, though the file may be the other's
    targets: dict[Path, list[Path]] = {}
    beside: dict[tuple[Path, str], list[Path]] = {}
    for job, target in planned:
        targets.setdefault(target.resolve(), []).append(job.path)
        beside.setdefault((job.path.parent.resolve(), job.path.stem), []).append(job.path)
    earlier: dict[Path, str] = {}
    for job, _ in planned:
        if job.named:
            continue
        sources = [path for path in targets.get(job.path.resolve(), []) if path != job.path]
        output_tag = tag if sources else None
        if output_tag is None:  # not this command's: any command's output of a photo beside it
            for other in OUTPUT_TAGS:
                stem = job.path.stem.removesuffix(f"_{other}")
                found = [p for p in beside.get((job.path.parent.resolve(), stem), []) if p != job.path]
                if stem != job.path.stem and found:
                    output_tag, sources = other, found
                    break
        an_output = output_tag is not None and (
            not overwrite or any(io.looks_like(job.path, source, max_pixels=max_pixels) for source in sources)
        )
        if an_output:
            earlier[job.path] = f"the {output_tag} output of {' or '.join(str(p) for p in sources)}"
    return earlier


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
            detector = detector_for(options)
        found = _detect_all(plan.todo, detector, options, tracker)
        tracker.faces_total = sum(len(faces) for faces in found.values() if faces is not None)
        for index, _ in enumerate(plan.todo):
            if found[index] is None:
                report.outcomes.append(tracker.failures.pop(index))
        ready = [index for index in range(len(plan.todo)) if found[index] is not None]
        for start in range(0, len(ready), max(1, options.chunk)):
            chunk = ready[start : start + max(1, options.chunk)]
            report.outcomes += _protect_chunk(
                [plan.todo[i] for i in chunk],
                [found[i] for i in chunk],
                protection,
                options,
                tracker,
                [tracker.stamps.get(i) for i in chunk],
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
        self.stamps: dict[int, tuple | None] = {}  # each photo's file as its faces were found in it

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

    def detect(part: Sequence[tuple[int, Tensor]]) -> None:
        with torch.no_grad():
            faces = detector([pixels for _, pixels in part]).to("cpu")
        for k, (i, _) in enumerate(part):
            found[i] = faces.for_image(k)

    def too_large(item: tuple[int, Tensor], detail: str) -> None:
        i, path = item[0], todo[item[0]][0].path
        found[i] = None
        tracker.failures[i] = FileOutcome(str(path), "failed", error=str(out_of_memory(path, detail)))

    tracker.work_total = float(len(todo))
    tracker.work_started = time.perf_counter()
    for start in range(0, len(todo), size):
        indices = list(range(start, min(start + size, len(todo))))
        tracker.emit("detect", current=tuple(todo[i][0].path.name for i in indices))
        images: list[tuple[int, Tensor]] = []
        for i in indices:
            try:
                tracker.stamps[i] = _stamp(todo[i][0].path)
                # flattened as the output will be: a viewer's face, not what lies under alpha
                image = io.for_output(
                    io.read_image(todo[i][0].path, max_pixels=options.max_pixels), todo[i][1]
                )
                images.append((i, image.pixels))
            except FacecloakError as error:
                found[i] = None
                tracker.failures[i] = FileOutcome(str(todo[i][0].path), "failed", error=str(error))
        if images:
            in_parts_that_fit(images, detect, too_large)
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
    stamps: Sequence[tuple | None] = (),
) -> list[FileOutcome]:
    """Read a chunk again, protect its faces together, write each output; one outcome per file.

    ``stamps`` are the files as their faces were found (`_stamp`): a photo changed since (saved
    again by an editor, replaced by a sync) fails, as its faces may lie elsewhere now.
    """
    names = tuple(job.path.name for job, _ in todo)
    outcomes: list[FileOutcome] = []
    loaded: list[tuple[io.ImageJob, Path, io.LoadedImage, Faces]] = []
    for k, ((job, target), faces) in enumerate(zip(todo, found)):
        try:
            image = io.for_output(io.read_image(job.path, max_pixels=options.max_pixels), target)
            if k < len(stamps) and _stamp(job.path) != stamps[k]:
                raise ImageReadError(
                    "changed while the batch ran, after its faces were found: not protected (run again)",
                    job.path,
                )
            loaded.append((job, target, image, faces))
        except FacecloakError as error:
            outcome = FileOutcome(str(job.path), "failed", error=str(error))
            tracker.work_done += 1 + len(faces) * tracker.face_work()
            tracker.finish(outcome)
            outcomes.append(outcome)
    if not loaded:
        return outcomes
    protected: list[tuple[list[int], tuple[ProtectionResult, list[float]]]] = []
    handled: set[int] = set()

    def protect(part: Sequence[int]) -> None:
        result = _protect_loaded([loaded[k] for k in part], protection, options.jpeg_quality, tracker, names)
        protected.append((list(part), result))
        handled.update(part)

    def fail(k: int, error: FacecloakError) -> None:
        handled.add(k)
        outcome = FileOutcome(str(loaded[k][0].path), "failed", error=str(error))
        tracker.work_done += 1 + len(loaded[k][3]) * tracker.face_work()
        tracker.finish(outcome)
        outcomes.append(outcome)

    try:
        in_parts_that_fit(
            range(len(loaded)), protect, lambda k, detail: fail(k, out_of_memory(loaded[k][0].path, detail))
        )
    except FacecloakError as error:
        # a model that cannot run, say: this chunk's files fail, the batch goes on
        for k in range(len(loaded)):
            if k not in handled:
                fail(k, error)
    for part, (result, seconds_each) in protected:
        for j, k in enumerate(part):
            job, target, image, _ = loaded[k]
            outcome = write_output(
                job.path,
                image,
                result.images[j],
                target,
                result.records_for(j),
                options,
                seconds_each[j],
                encode=result.to_encode(j),
            )
            tracker.finish(outcome)
            outcomes.append(outcome)
    return outcomes


def out_of_memory(path: str | Path, detail: str) -> OutOfMemoryError:
    """The one-line error of a photo that ran out of memory alone (`facecloak._device.in_parts_that_fit`)."""
    return OutOfMemoryError(
        f"out of memory even alone ({detail}): read it smaller (--max-pixels), protect it with fewer "
        "models, or on a device with more memory",
        path,
    )


def _protect_loaded(
    loaded: Sequence[tuple[io.ImageJob, Path, io.LoadedImage, Faces]],
    protection: Protection,
    jpeg_quality: int | None,
    tracker: _Tracker,
    names: tuple[str, ...],
) -> tuple[ProtectionResult, list[float]]:
    """Protect read photos' faces together (`_protect_chunk`), with progress; and each photo's seconds."""
    started = time.perf_counter()
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
    storage = [io.stored_as(target, image, jpeg_quality) for _, target, image, _ in loaded]
    try:
        result = protection.protect(pixels, faces, on_step=on_step, stored_as=storage)
    except Exception as error:
        if is_out_of_memory(error):  # its parts are tried next, from where this began
            tracker.work_done, tracker.faces_done = work_before, faces_before
        raise
    tracker.faces_done = faces_before + face_count
    tracker.work_done = work_before + len(loaded) + face_count * tracker.face_work()
    return result, seconds_per_photo(0.0, time.perf_counter() - started, [len(f) for *_, f in loaded])


def seconds_per_photo(shared: float, by_faces: float, face_counts: Sequence[int]) -> list[float]:
    """Each photo's seconds of a chunk: ``shared`` evenly, ``by_faces`` by its faces.

    ``shared`` is what every photo costs alike (reading, detecting); ``by_faces`` (protecting) is
    split by how many faces each photo holds, evenly where none holds one. All split evenly, a
    photo with no face beside seven with faces showed an eighth of their cloaks' time (23 s).
    """
    count, total = len(face_counts), sum(face_counts)
    return [
        shared / count + (by_faces * faces / total if total else by_faces / count) for faces in face_counts
    ]


def _stamp(path: Path) -> tuple | None:
    """What tells a changed file: its identity, size and modification time (None if unreadable)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _measure_written(target: Path, image: io.LoadedImage, output: Tensor, face_records: list[dict]) -> None:
    """Add to each cloaked face the change of the file as written, beside the change as cloaked.

    The cloak caps its change on the photo rounded to 8 bits; a JPEG output then quantises that
    change with the input's own tables (or a whole re-encode adds its own noise), so the file a
    viewer opens can differ more. Each face gets ``box_dssim_cloaked`` and ``box_dssim_written``,
    both DSSIM over its detection box in the same measure, and ``linf_written`` (in 1/255).
    """
    boxes = [record["box"] for record in face_records if "dssim" in record]
    if not boxes:
        return
    from facecloak.quality import box_dssims

    # our own file, as large as its input: the input's pixel limit (a raised --max-pixels) holds,
    # not the default, which failed a cloak of a 200 MP photo after it was written and journaled
    written = io.read_image(target, max_pixels=max(1, output.shape[-1] * output.shape[-2])).pixels
    if written.shape != image.pixels.shape:  # another orientation on disk: nothing to compare
        return
    source = image.pixels[None]
    height, width = source.shape[-2:]
    for record in (record for record in face_records if "dssim" in record):
        # the pixels the cloak measured its caps on: its own rounding of the box (int() and round()
        # here left out its last column and row, and a 25 px face read 0.0086 against its 0.0078)
        x0, y0, x1, y1 = pixel_bounds(record["box"], height, width)
        box = torch.tensor([[x0, y0, x1, y1]])
        cloaked = float(box_dssims(source, output[None].to(source), box)[0, 0])
        stored = float(box_dssims(source, written[None], box)[0, 0])
        change = (written - image.pixels)[:, y0:y1, x0:x1].abs()
        record.update(
            box_dssim_cloaked=round(max(0.0, cloaked), 5),  # float32 sums: -1e-05 for no change
            box_dssim_written=round(max(0.0, stored), 5),
            linf_written=round(float(change.max()) * 255) if change.numel() else 0,
        )


def face_status(face_records: list[dict]) -> str:
    """A written file's status from its face records: "no_face", "protected" or "unprotected"."""
    if not face_records:
        return "no_face"
    if all(record.get("protected", True) for record in face_records):
        return "protected"
    return "unprotected"


def write_output(
    path: Path,
    image: io.LoadedImage,
    output: Tensor,
    target: Path,
    face_records: list[dict],
    options: Options,
    seconds: float,
    *,
    protected: Sequence[Path] | io.ProtectedFiles | None = None,
    overwrite: bool | None = None,
    before: Callable[[], None] | None = None,
    after: Callable[[str, dict], None] | None = None,
    encode: Tensor | None = None,
) -> FileOutcome:
    """Write one protected photo atomically and say what happened to it (both batches use this).

    A `FacecloakError` is this file's failure, never the batch's. ``protected`` (default: the
    input itself) is never replaced; ``overwrite`` defaults to ``options.overwrite``. The
    resumable batch journals around the write: ``before()`` runs first and may refuse with a
    `FacecloakError`, ``after(status, written)`` runs once the output is in place (``written``:
    how it was written, what it lacks, for the journal to say again on a resume). ``output`` is the photo
    the records measured; ``encode`` (default ``output``) the pixels to hand the encoder, whose
    file decodes to it (`ProtectionResult.to_encode`).
    """
    status = face_status(face_records)
    written: dict = {}
    try:
        if before is not None:
            before()
        io.write_image(
            target,
            output if encode is None else encode,
            source=image,
            keep_metadata=options.keep_metadata,
            protected=[path] if protected is None else protected,
            overwrite=options.overwrite if overwrite is None else overwrite,
            jpeg_quality=options.jpeg_quality,
            info=written,
        )
        _measure_written(target, image, output, face_records)  # before "done": the journal keeps it
        if after is not None:
            after(status, written)
    except FacecloakError as error:
        return FileOutcome(
            str(path), "failed", error=str(error), faces=face_records, seconds=round(seconds, 3)
        )
    return FileOutcome(
        str(path), status, output=str(target), faces=face_records, seconds=round(seconds, 3), written=written
    )
