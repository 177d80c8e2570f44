"""The data of a batch: its options, its plan, each file's outcome, the report and progress events.

`BatchReport` counts outcomes, derives the exit code and renders the summary and the table;
`facecloak.batch` fills these in (and re-exports every name here).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from facecloak.defaults import (
    DETECT_ROTATIONS,
    DISTANCE_AFTER_UPLOAD_KEY,
    FOUND_AFTER_UPLOAD_KEY,
    MIN_FACE_PX,
    MIN_FACE_SCORE,
    SOFT_DONOR_UPSCALE,
    STRONGEST_LEVEL,
    WRITTEN_DSSIM_EXCESS,
)
from facecloak.errors import EXIT_FAILED, EXIT_OK, EXIT_UNPROTECTED, InvalidInputError, shown_path

if TYPE_CHECKING:  # the CLI reads these types before any image is touched: no torch at import
    from facecloak.io import ImageJob


LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".heic", ".heif")
"""Outputs whose encoder quantises a cloak's change again (the cap holds on the file)."""

LISTED_SKIPPED = 20
"""Files passed over that the summary names; the JSON report lists every one."""


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
        rotations: quarter-turn search of the detector (`facecloak.defaults.DETECT_ROTATIONS`).
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
    rotations: str = DETECT_ROTATIONS
    device: str | None = None
    chunk: int = 8
    jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        """Refuse numbers no run can use, as the command line's ranges do.

        A quality of 0 or 500 was taken, and ``max_pixels=-1`` failed every photo as "more than
        the limit of -1".
        """
        if self.jpeg_quality is not None and not (
            _whole(self.jpeg_quality) and 1 <= self.jpeg_quality <= 100
        ):
            raise InvalidInputError(
                f"jpeg_quality must be a whole number 1 to 100, got {self.jpeg_quality!r}"
            )
        if self.max_pixels is not None and not (_whole(self.max_pixels) and self.max_pixels >= 1):
            raise InvalidInputError(f"max_pixels must be a whole number >= 1, got {self.max_pixels!r}")
        if not (_whole(self.chunk) and self.chunk >= 1):
            raise InvalidInputError(f"chunk must be a whole number >= 1, got {self.chunk!r}")


def _whole(value: object) -> bool:
    """An int, not a bool (no torch here: `facecloak._checks` loads it)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
            return f"error: {self.named_error}"
        path, output = shown_path(self.path), shown_path(self.output or "")  # one line, whatever the names
        if self.status == "skipped":
            return f"{path}: skipped, output exists: {output}"
        if self.status == "no_face":
            return f"{path}: no face found; written unchanged to {output}{self._encoding_note()}"
        short = sum(not face.get("protected", True) for face in self.faces)
        if self.status == "unprotected":
            note = self._encoding_note()
            return f"{path}: {short} of {len(self.faces)} face(s) NOT protected -> {output}{note}"
        return f"{path}: {len(self.faces)} face(s) -> {output}{self._encoding_note()}"

    @property
    def named_error(self) -> str:
        """The error, led by this file's name where it names another file (a model) or none.

        A photo that failed on a model's file was listed by the model's message alone, once per
        photo, with no word of which photos failed.
        """
        error = self.error or ""
        return error if shown_path(self.path) in error else f"{shown_path(self.path)}: {error}"

    @property
    def frames_left_out(self) -> int:
        """Frames or pages of the input not in the output (an animation or multi-page file: all but one)."""
        return max(0, self.written.get("frames_in_source", 1) - self.written.get("frames_written", 1))

    def _encoding_note(self) -> str:
        """How the output was encoded, then what of the input it lacks (``written["notes"]``)."""
        notes = list(self.written.get("notes", []))  # what is lost first: frames, alpha, EXIF
        if self.written.get("encoding") == "jpeg-blocks":
            kept = self.written["mcus_total"] - self.written["mcus_reencoded"]
            notes.append(f"JPEG: {kept} of {self.written['mcus_total']} blocks kept bit-exact")
        elif "jpeg_fallback" in self.written:
            notes.append(self.written["jpeg_fallback"])
        return f" ({'; '.join(notes)})" if notes else ""


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
        """Faces whose protection fell short, in an output that was written (as `protected_faces`).

        With a failed file's faces counted, the summary said "1 face(s) NOT protected:" and listed
        no file: its file is listed among the failed ones (`faces_in_failed_files`).
        """
        return sum(
            not face.get("protected", True) for o in self.outcomes if o.status != "failed" for face in o.faces
        )

    @property
    def faces_in_failed_files(self) -> int:
        """Faces found in files that then failed (not written: protected nowhere)."""
        return sum(len(o.faces) for o in self.outcomes if o.status == "failed")

    @property
    def protected_faces(self) -> int:
        """Faces protected in an output that was written (a file that failed protects nothing)."""
        return sum(
            face.get("protected", True) for o in self.outcomes if o.status != "failed" for face in o.faces
        )

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
            return "\n".join(lines + self._passed_over())
        earlier = sum(bool(getattr(o, "resumed", False)) for o in self.outcomes)  # done by a previous run
        done = len(self.outcomes) - self.count("skipped") - self.count("failed") - earlier
        skipped = self.count("skipped") + earlier
        lines = [
            f"{self.command}: {len(self.outcomes)} image(s): {done} done, {skipped} skipped, "
            f"{self.count('failed')} failed; {self.faces} face(s) found, "
            f"{self.protected_faces} protected"
            + (f", {self.faces_in_failed_files} in files that failed" if self.faces_in_failed_files else "")
            + f", in {self.seconds:.1f} s"
        ]
        lines += self._frames_left_out()
        if self.count("skipped"):
            # a re-run of a run that found no face, or fell short, exited 0 here: what an existing
            # output holds is not known without a journal (-o) that recorded it
            lines.append(
                f"  {self.count('skipped')} image(s) skipped: their output exists (--overwrite redoes them); "
                "whether its faces are protected is not checked again (with -o, the folder's journal says)"
            )
        if self.count("no_face"):
            lines.append(
                f"  {self.count('no_face')} image(s) with NO face found (nothing was changed in them):"
            )
            lines += [f"    {shown_path(o.path)}" for o in self.outcomes if o.status == "no_face"]
            # a face under --min-face is not looked for; with --rotations none (or auto, fooled by
            # a face it misreads as upright) a photo on its side or upside down finds none
            where = self.options.get("rotations", DETECT_ROTATIONS)
            if where == "all":
                hint = "upright and turned by 90, 180 and 270 degrees"
                fix = "lower --min-face or --detect-threshold"
            else:
                hint = "upright only" if where == "none" else "turned only where none is upright"
                fix = "--rotations all also looks in every photo turned, or lower --min-face"
            lines.append(f"    (faces of at least --min-face pixels are looked for {hint}: {fix})")
        if self.unprotected_faces:
            # --steps 0 changes nothing: "fell short" and the hints to go a level up misled
            unchanged = self.command == "cloak" and self.options.get("steps") == 0
            why = " (fell short of the target)" if self.command == "cloak" else ""
            why = " (--steps 0: not cloaked at all)" if unchanged else why
            lines.append(f"  {self.unprotected_faces} face(s) NOT protected{why}:")
            explained = False
            for o in self.outcomes:
                if o.status == "unprotected":
                    # a cloak's shortfall by model; a replaced face kept after failing (--fallback
                    # keep) says which check it failed
                    short = [
                        _shortfall(face) or face.get("reason", "")
                        for face in o.faces
                        if face.get("protected") is False
                    ]
                    details = "; ".join(text for text in short if text)
                    explained = explained or bool(details)
                    lines.append(f"    {shown_path(o.path)}" + (f": {details}" if details else ""))
            # cloaked again and still short (`escalated_from`), or tried one level up and kept as it
            # was (`escalation`): told to try --escalate all the same, before
            short_after_escalating = any(
                (face.get("escalated_from") or face.get("escalation")) and face.get("protected") is False
                for o in self.outcomes
                for face in o.faces
            )
            at_the_top = self.options.get("level") == STRONGEST_LEVEL
            explained = explained and self.command == "cloak" and not unchanged  # a cloak's hints
            if explained and short_after_escalating:
                lines.append("    (cloaked again one level up and still short: a face hard for these models)")
            elif explained and at_the_top:
                lines.append("    (at the strongest level already: a face hard for these models)")
            elif explained:
                lines.append(
                    "    (a higher --level, or --escalate for these faces alone, moves faces further, "
                    "at a more visible change)"
                )
            lossy = [
                o.path
                for o in self.outcomes
                if o.status == "unprotected" and Path(o.output or "").suffix.lower() in LOSSY_SUFFIXES
            ]
            if explained and lossy:
                lines.append(
                    "    (a JPEG or WebP output keeps less of the change than a PNG: its encoder quantises "
                    "it again, and the cap holds on the file; --format png keeps more)"
                )
        lines += self._written_wider()
        unseen = [(o.path, f) for o in self.outcomes for f in o.faces if _protected_unseen(f)]
        if unseen:
            lines.append(
                f"  {len(unseen)} cloaked face(s) counted protected because the check found no face there "
                "after a JPEG 75 re-encode (small or soft faces; a finer detector may find them):"
            )
            lines += [f"    {shown_path(path)}: {_shortfall(face)} (as cloaked)" for path, face in unseen]
        escalated = [(o.path, f) for o in self.outcomes for f in o.faces if f.get("escalated_from")]
        if escalated:
            lines.append(f"  {len(escalated)} face(s) fell short, cloaked again one level up (--escalate):")
            lines += [
                f"    {shown_path(path)}: {f['escalated_from']} -> {f['level']}" for path, f in escalated
            ]
        lines += self._left_out_of_files()
        if self.count("failed"):
            lines.append(f"  {self.count('failed')} file(s) failed:")
            lines += [f"    {o.named_error}" for o in self.outcomes if o.status == "failed"]
        lines += self._passed_over()
        blurred = [
            (o.path, f)
            for o in self.outcomes
            for f in o.faces
            if f.get("method") == "blur" and f.get("reason")
        ]
        if blurred:
            lines.append(f"  {len(blurred)} face(s) blurred instead of replaced:")
            lines += [f"    {shown_path(path)}: {face['reason']}" for path, face in blurred]
        soft = [
            (o.path, f)
            for o in self.outcomes
            for f in o.faces
            if f.get("method") == "replace" and f.get("donor_upscale", 0.0) >= SOFT_DONOR_UPSCALE
        ]
        if soft:
            lines.append(
                f"  {len(soft)} replaced face(s) softer than their photo (each made from a smaller face):"
            )
            lines += [f"    {shown_path(path)}: {_soft_reason(face)}" for path, face in soft]
        finished = sum(
            f.get("method") == "replace" and bool(f.get("finished")) for o in self.outcomes for f in o.faces
        )
        if finished:
            lines.append(
                f"  {finished} replaced face(s) finished with a faint cloak: they missed or passed a check "
                "by a few percent (--no-finish: none)"
            )
        return "\n".join(lines)

    def _written_wider(self) -> list[str]:
        """The summary's lines on cloaked faces that the written file changes more than the cloak did."""
        wider = [
            (o.path, f)
            for o in self.outcomes
            for f in o.faces
            if f.get("box_dssim_written", 0.0) > f.get("box_dssim_cloaked", 0.0) + WRITTEN_DSSIM_EXCESS
        ]
        if not wider:
            return []
        lines = [
            f"  {len(wider)} cloaked face(s) changed more in the written file than as cloaked "
            "(a lossy output, JPEG, WebP or HEIF, quantises the change again; --format png writes it "
            "as cloaked):"
        ]
        lines += [
            f"    {shown_path(path)}: face DSSIM {f['box_dssim_written']:.4f} written, "
            f"{f['box_dssim_cloaked']:.4f} as cloaked (largest change {f['linf_written']}/255)"
            for path, f in wider
        ]
        return lines

    def _frames_left_out(self) -> list[str]:
        """The summary's lines on animations and multi-page files: only their first frame is written.

        Second in the summary: the other frames are missing from the output with no error, and a
        user who sees only "done" would find out when the animation no longer moves.
        """
        cut = [o for o in self.outcomes if o.status != "failed" and o.frames_left_out]
        if not cut:
            return []
        lines = [
            f"  {len(cut)} image(s) with several frames or pages: ONLY THE FIRST frame of each was "
            "protected and written; the others are NOT in the output:"
        ]
        lines += [
            f"    {shown_path(o.path)}: first of {o.written['frames_in_source']} frames -> "
            f"{shown_path(o.output)}"
            for o in cut
        ]
        return lines

    def _left_out_of_files(self) -> list[str]:
        """The summary's lines on outputs that lack what their input had: transparency, EXIF."""
        lines = []
        for key, lacking in (
            ("alpha_flattened", "in a format without transparency: composited onto white"),
            ("exif_dropped", "written without their EXIF"),
        ):
            cut = [o for o in self.outcomes if o.status != "failed" and o.written.get(key)]
            if cut:
                lines.append(f"  {len(cut)} output(s) {lacking} (--format png keeps it):")
                detail = key == "exif_dropped"  # its value says what was left out; alpha's is True
                # one line each, whatever the names (a newline in one split it in two)
                lines += [
                    f"    {shown_path(o.output or '')}" + (f": {o.written[key]}" if detail else "")
                    for o in cut
                ]
        return lines

    def _passed_over(self) -> list[str]:
        """The summary's lines on the files passed over: each named, with the reason."""
        if not self.skipped:
            return []
        lines = [f"  {len(self.skipped)} file(s) passed over (not images, outputs of earlier runs, links):"]
        lines += [f"    {shown_path(path)}: {reason}" for path, reason in self.skipped[:LISTED_SKIPPED]]
        if len(self.skipped) > LISTED_SKIPPED:
            lines.append(f"    and {len(self.skipped) - LISTED_SKIPPED} more (--json lists them all)")
        return lines

    def table(self) -> list[list[str]]:
        """Rows of the final table (first row the header): one per file that was worked on."""
        rows = [["file", "faces", "protected", "distance / threshold", "face DSSIM", "s", "output"]]
        for outcome in self.outcomes:
            if outcome.status in ("failed", "skipped"):
                continue
            # a face protected only by not being found again has no distance after the upload
            ratios = [_worst_ratio(face) for face in outcome.faces if not _protected_unseen(face)]
            ratios = [r for r in ratios if r is not None]
            dssims = [face["dssim"] for face in outcome.faces if "dssim" in face]
            protected = sum(face.get("protected", True) for face in outcome.faces)
            rows.append(
                [
                    shown_path(outcome.path),
                    str(len(outcome.faces)),
                    f"{protected}/{len(outcome.faces)}",
                    f"{min(ratios):.2f}x" if ratios else "-",
                    f"{max(dssims):.4f}" if dssims else "-",
                    f"{outcome.seconds:.1f}",
                    shown_path(outcome.output) if outcome.output else "-",
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
            "protected_faces": self.protected_faces,
            "faces_in_failed_files": self.faces_in_failed_files,
            "no_face_images": self.count("no_face"),
            "failed_files": self.count("failed"),
            "skipped_existing": self.count("skipped"),
            # outputs holding only the first frame of an animation or multi-page input
            "first_frame_only_files": sum(
                o.status != "failed" and bool(o.frames_left_out) for o in self.outcomes
            ),
            "seconds": round(self.seconds, 3),
            "files": [asdict(outcome) for outcome in self.outcomes],
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


def _model_ratios(face: dict) -> dict[str, float]:
    """A cloaked face's distance / threshold per model (after JPEG 75 when measured), where known."""
    ratios = {}
    for name, model in face.get("models", {}).items():
        distance = model.get(DISTANCE_AFTER_UPLOAD_KEY)
        distance = model.get("distance") if distance is None else distance
        if distance is not None and model.get("threshold"):
            ratios[name] = distance / model["threshold"]
    return ratios


def _worst_ratio(face: dict) -> float | None:
    """A cloaked face's smallest distance / threshold over its models (after JPEG 75 when measured)."""
    ratios = _model_ratios(face).values()
    return min(ratios) if ratios else None


def _protected_unseen(face: dict) -> bool:
    """A cloaked face counted protected only because the check found no face there after the upload.

    Its cloak left it within some model's threshold as cloaked; the check's detector (the
    scraper's stand-in) missed it after the JPEG re-encode, as happens to faces of 12-20 px.
    """
    return (
        face.get(FOUND_AFTER_UPLOAD_KEY) is False and face.get("protected") is True and bool(_shortfall(face))
    )


def _shortfall(face: dict) -> str:
    """Which models a cloaked face stayed within, and how far it got: ``"mobileface at 0.61x ..."``.

    '' when no model's distance is known (a face not found again after the upload).
    """
    near = [f"{name} at {ratio:.2f}x" for name, ratio in _model_ratios(face).items() if ratio < 1]
    return f"{', '.join(near)} of its match threshold" if near else ""


def _soft_reason(face: dict) -> str:
    """Why a replaced face is soft, and what to do: its donors are small, or the synthesis chip is."""
    upscale = face["donor_upscale"]
    if face.get("detail_limit") == "chip":
        return (
            f"{upscale:.2f}x the chips its new face is read from "
            "(eyes 56 px apart, 112 in donors' detail chips: a limit of facecloak, not of the donors)"
        )
    return f"{upscale:.2f}x its smallest donor (add larger, sharp donor photos: facecloak donors add)"


@dataclass
class BatchPlan:
    """Every input and what will happen to it, decided before any work.

    Attributes:
        todo: (input job, output path) of the photos to protect.
        existing: (input, output) of photos skipped because their output exists.
        failed: inputs that cannot be done (missing, not an image, output clash), with the reason.
        not_images: files passed over, with the reason: inside folders, files without an image
            suffix, and symlinks to folders (not followed); anywhere, files that are this command's
            output of another input, and second paths (symlinks) to a photo already taken.
        inputs: the paths as given.
        order: every input file in the order found (the report lists files in this order).
        written_before: of ``todo``, the photos whose output an earlier run of this journaled
            batch wrote: each is skipped once its photo is found unchanged (a hash, when read).
    """

    todo: list[tuple[ImageJob, Path]] = field(default_factory=list)
    existing: list[tuple[Path, Path]] = field(default_factory=list)
    failed: list[FileOutcome] = field(default_factory=list)
    not_images: list[tuple[Path, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    written_before: int = 0

    @property
    def empty(self) -> bool:
        """No image at all under the paths given."""
        return not (self.todo or self.existing or self.failed)


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
