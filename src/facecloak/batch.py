"""Batches of files: read, detect, protect, write, and count what happened to each file.

Layered like black: a `Protector` turns a list of decoded images and their `Faces` into output
images and per-face records; `process_files` runs it over files in chunks, catching each
file's `FacecloakError` so one bad file never stops the batch; `BatchReport` counts outcomes,
derives the exit code and renders the summary. The CLI only parses options, calls
`run_batch` and prints the report.

Exit codes: 0 every face found was protected; 1 finished, but some image had no face or a face
fell short of its protection target; 2 usage error (from the CLI); 3 some file failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from facecloak import io
from facecloak.anonymize import Anonymizer
from facecloak.cloak import Cloak
from facecloak.detect import FaceDetector
from facecloak.errors import FacecloakError, ImageWriteError, InvalidInputError
from facecloak.faces import Faces

EXIT_OK = 0
EXIT_UNPROTECTED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3


@dataclass(frozen=True)
class Options:
    """File and detection settings of a run; written verbatim into the JSON report.

    Attributes:
        out_dir: output folder (mirrors the input tree); None writes beside each input.
        format: output format name ("jpeg", "png", ...); None keeps each input's format.
        keep_metadata: keep EXIF minus GPS (default: drop it all).
        overwrite: replace earlier outputs (inputs are never replaced).
        max_pixels: decompression-bomb guard per image.
        min_score: detection confidence threshold.
        min_size: smallest face side looked for, in pixels.
        device: torch device name, None for CUDA when present else CPU.
        chunk: images read, detected and processed together.
        jpeg_quality: quality of JPEG/WebP outputs.
    """

    out_dir: str | None = None
    format: str | None = None
    keep_metadata: bool = False
    overwrite: bool = False
    max_pixels: int | None = None
    min_score: float = 0.9
    min_size: int = 20
    device: str | None = None
    chunk: int = 8
    jpeg_quality: int = io.JPEG_QUALITY


class Protector(Protocol):
    """What a batch runs: anonymise or cloak the faces of a list of images."""

    tag: str  # output name suffix, e.g. "anonymized"

    def __call__(self, images: list[Tensor], faces: Faces) -> tuple[list[Tensor], list[dict]]:
        """Return one output per image and one record per face (with a bool ``protected``)."""
        ...


@dataclass
class FileOutcome:
    """What happened to one input file."""

    path: str
    status: str  # "protected", "no_face", "unprotected", "failed"
    output: str | None = None
    faces: list[dict] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def message(self) -> str:
        """One line for the terminal."""
        if self.status == "failed":
            return f"error: {self.error}"
        if self.status == "no_face":
            return f"{self.path}: no face found; written unchanged to {self.output}"
        short = sum(not face.get("protected", True) for face in self.faces)
        if self.status == "unprotected":
            return f"{self.path}: {short} of {len(self.faces)} face(s) NOT protected -> {self.output}"
        return f"{self.path}: {len(self.faces)} face(s) -> {self.output}"


@dataclass
class BatchReport:
    """Outcomes of a batch, with its options; renders the summary and the exit code."""

    command: str
    options: dict
    outcomes: list[FileOutcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        """Number of files with ``status``."""
        return sum(outcome.status == status for outcome in self.outcomes)

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
        """3 if a file failed, else 1 if an image had no face or a face fell short, else 0."""
        if self.count("failed"):
            return EXIT_FAILED
        if self.count("no_face") or self.count("unprotected"):
            return EXIT_UNPROTECTED
        return EXIT_OK

    def __str__(self) -> str:
        lines = [
            f"{self.command}: {len(self.outcomes)} image(s), {self.faces} face(s) found, "
            f"{self.faces - self.unprotected_faces} protected, in {self.seconds:.1f} s"
        ]
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
            lines.append(f"  {len(self.skipped)} file(s) skipped (not images)")
        return "\n".join(lines)

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
            "seconds": round(self.seconds, 3),
            "files": [asdict(outcome) for outcome in self.outcomes],
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


ProgressCallback = Callable[[int, int], None]


def run_batch(
    paths: Sequence[str | Path],
    protector: Protector,
    options: Options,
    *,
    detector: FaceDetector | None = None,
    command: str = "",
    on_progress: ProgressCallback | None = None,
) -> BatchReport:
    """Protect every image under ``paths``; never raise for a bad file, report it instead.

    Args:
        paths: files and folders (walked recursively).
        protector: what to do with the faces (an anonymiser or a cloak).
        options: file and detection settings.
        detector: a ready detector (default: built from ``options``).
        command: name shown in the summary.
        on_progress: called with (files done, files total) after each chunk.
    """
    started = time.perf_counter()
    out_dir = Path(options.out_dir) if options.out_dir else None
    jobs, skipped = io.collect_images(paths, exclude=out_dir)
    report = BatchReport(command or protector.tag, asdict(options), skipped=[(str(p), r) for p, r in skipped])
    detector = detector or FaceDetector(
        min_score=options.min_score, min_size=options.min_size, device=options.device
    )
    inputs = [job.path for job in jobs]
    for start in range(0, len(jobs), max(1, options.chunk)):
        chunk = jobs[start : start + max(1, options.chunk)]
        report.outcomes += _process_chunk(chunk, protector, detector, options, out_dir, inputs)
        if on_progress is not None:
            on_progress(min(start + len(chunk), len(jobs)), len(jobs))
    report.seconds = time.perf_counter() - started
    return report


def _process_chunk(
    jobs: list[io.ImageJob],
    protector: Protector,
    detector: FaceDetector,
    options: Options,
    out_dir: Path | None,
    inputs: list[Path],
) -> list[FileOutcome]:
    started = time.perf_counter()
    outcomes: dict[int, FileOutcome] = {}
    loaded: list[tuple[int, io.LoadedImage, Path]] = []
    for i, job in enumerate(jobs):
        try:
            image = io.read_image(job.path, max_pixels=options.max_pixels)
            target = io.output_path(job, out_dir, protector.tag, options.format, image.format)
            if any(io.same_file(target, other) for other in inputs):
                raise ImageWriteError("refusing to overwrite an input file", target)
            loaded.append((i, image, target))
        except FacecloakError as error:
            outcomes[i] = FileOutcome(str(job.path), "failed", error=str(error))
    if loaded:
        pixels = [image.pixels for _, image, _ in loaded]
        faces = detector(pixels)
        outputs, records = protector(pixels, faces)
        seconds = (time.perf_counter() - started) / len(loaded)
        for k, (i, image, target) in enumerate(loaded):
            face_records = [
                record for record, index in zip(records, faces.image_index.tolist()) if index == k
            ]
            outcomes[i] = _write_output(
                jobs[i].path, image, outputs[k], target, face_records, options, inputs, seconds
            )
    return [outcomes[i] for i in range(len(jobs))]


def _write_output(
    path: Path,
    image: io.LoadedImage,
    output: Tensor,
    target: Path,
    face_records: list[dict],
    options: Options,
    inputs: list[Path],
    seconds: float,
) -> FileOutcome:
    try:
        io.write_image(
            target,
            output,
            source=image,
            keep_metadata=options.keep_metadata,
            protected=inputs,
            overwrite=options.overwrite,
            jpeg_quality=options.jpeg_quality,
        )
    except FacecloakError as error:
        return FileOutcome(str(path), "failed", error=str(error), faces=face_records, seconds=seconds)
    if not face_records:
        status = "no_face"
    elif all(record.get("protected", True) for record in face_records):
        status = "protected"
    else:
        status = "unprotected"
    return FileOutcome(str(path), status, output=str(target), faces=face_records, seconds=round(seconds, 3))


READ_CHUNK_FILES = 32
"""Files `detect` and `embed` decode and detect together (MTCNN batches across photos)."""

READ_CHUNK_PIXELS = 64_000_000
"""...or fewer, once their pixels add up to this (about 770 MB as float32): bounds memory."""


def _faces_per_chunk(
    paths: Sequence[str | Path], options: Options, detector: FaceDetector | None
) -> Iterator[list[tuple[Path, io.LoadedImage | None, Faces | None, str | None]]]:
    """Yield chunks of (path, image, faces, error), one entry per file, detected together.

    Files are decoded until `READ_CHUNK_FILES` or `READ_CHUNK_PIXELS` is reached, then the
    chunk goes through the detector in one call; a file that fails to read has its error set.
    """
    jobs, _ = io.collect_images(paths)
    detector = detector or FaceDetector(
        min_score=options.min_score, min_size=options.min_size, device=options.device
    )
    chunk: list[tuple[Path, io.LoadedImage | None, str | None]] = []
    pixels = 0
    for position, job in enumerate(jobs):
        try:
            image = io.read_image(job.path, max_pixels=options.max_pixels)
            chunk.append((job.path, image, None))
            pixels += image.pixels.shape[1] * image.pixels.shape[2]
        except FacecloakError as error:
            chunk.append((job.path, None, str(error)))
        if len(chunk) >= READ_CHUNK_FILES or pixels >= READ_CHUNK_PIXELS or position == len(jobs) - 1:
            loaded = [image for _, image, _ in chunk if image is not None]
            with torch.no_grad():
                faces = detector([image.pixels for image in loaded]) if loaded else Faces.empty()
            per_image = iter(range(len(loaded)))
            yield [
                (path, image, None if image is None else faces.for_image(next(per_image)), error)
                for path, image, error in chunk
            ]
            chunk, pixels = [], 0


def _faces_per_file(paths: Sequence[str | Path], options: Options, detector: FaceDetector | None):
    """Yield (path, image, faces, error) for every image under ``paths`` (detected in chunks)."""
    for chunk in _faces_per_chunk(paths, options, detector):
        yield from chunk


def detect_files(
    paths: Sequence[str | Path], options: Options, *, detector: FaceDetector | None = None
) -> list[dict]:
    """Faces per image for ``facecloak detect``: one dict per file (``faces`` or ``error``)."""
    results = []
    for path, image, faces, error in _faces_per_file(paths, options, detector):
        if error:
            results.append({"path": str(path), "error": error})
            continue
        width, height = image.size
        results.append({"path": str(path), "width": width, "height": height, "faces": faces.to_records()})
    return results


class AnonymizeFaces:
    """Protector that anonymises every face (see `facecloak.anonymize`)."""

    tag = "anonymized"

    def __init__(self, anonymizer: Anonymizer) -> None:
        self.anonymizer = anonymizer

    def __repr__(self) -> str:
        return f"AnonymizeFaces({self.anonymizer!r})"

    def __call__(self, images: list[Tensor], faces: Faces) -> tuple[list[Tensor], list[dict]]:
        """Anonymise each image's faces; every face found counts as protected."""
        outputs = []
        for k, image in enumerate(images):
            mine = faces.for_image(k)
            outputs.append(self.anonymizer(image[None], mine.to(image.device))[0] if len(mine) else image)
        records = [
            dict(record, protected=True, method=self.anonymizer.method) for record in faces.to_records()
        ]
        return outputs, records


def anonymize_image(
    image: Tensor, *, method: str = "blur", detector: FaceDetector | None = None, **params
) -> tuple[Tensor, list[dict]]:
    """Anonymise every face in one (3, H, W) image: returns the new image and one record per face.

    Example:
        >>> from facecloak.io import read_image
        >>> out, faces = anonymize_image(read_image("samples/astronaut.jpg").pixels)  # doctest: +SKIP
    """
    detector = detector or FaceDetector()
    faces = detector([image])
    outputs, records = AnonymizeFaces(Anonymizer(method, **params))([image], faces)
    return outputs[0], records


class CloakFaces:
    """Protector that cloaks every face of a chunk of photos in one optimisation."""

    tag = "cloaked"

    def __init__(self, cloak: Cloak) -> None:
        self.cloak = cloak

    def __repr__(self) -> str:
        return f"CloakFaces({self.cloak!r})"

    def __call__(self, images: list[Tensor], faces: Faces) -> tuple[list[Tensor], list[dict]]:
        """Cloak the faces; a face is protected when every model's distance after JPEG 75 passes."""
        result = self.cloak(images, faces)
        return [image.cpu() for image in result.images], result.records(faces)


def cloak_image(
    image: Tensor, cloak: Cloak, *, detector: FaceDetector | None = None
) -> tuple[Tensor, list[dict]]:
    """Cloak every face in one (3, H, W) image: the cloaked image and one record per face.

    Example:
        >>> cloak = create_cloak("untargeted", [create_embedder("dlib-resnet")])  # doctest: +SKIP
        >>> cloaked, faces = cloak_image(read_image("samples/astronaut.jpg").pixels, cloak)
    """
    detector = detector or cloak.detector
    faces = detector([image])
    outputs, records = CloakFaces(cloak)([image], faces)
    return outputs[0], records


def _largest_face(path: Path, faces: Faces) -> Faces:
    if len(faces) == 0:
        raise InvalidInputError("no face found", path)
    areas = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
    return faces.select([int(areas.argmax())])


def verify_files(first: Path, second: Path, model, options: Options) -> dict:
    """Whether the largest faces of two photos are the same person, by ``model``'s threshold.

    Both photos are detected in one call and both faces embedded in one batch.
    """
    from facecloak.embed import embed_faces

    detector = FaceDetector(min_score=options.min_score, min_size=options.min_size, device=options.device)
    images = [io.read_image(path, max_pixels=options.max_pixels).pixels for path in (first, second)]
    with torch.no_grad():
        found = detector(images)
    faces = Faces.cat(
        [_largest_face(path, found.for_image(i)).shifted(i) for i, path in enumerate((first, second))]
    )
    a, b = embed_faces(images, faces, model)
    distance = float(model.distance(a, b))
    return {
        "first": str(first),
        "second": str(second),
        "model": model.card.name,
        "metric": model.card.distance,
        "distance": round(distance, 5),
        "threshold": model.card.match_threshold,
        "same_person": distance < model.card.match_threshold,
    }


def embed_files(paths: Sequence[str | Path], model, options: Options) -> list[dict]:
    """Embeddings of every face per image for ``facecloak embed``.

    Photos are detected in chunks (`READ_CHUNK_FILES`) and every face of a chunk is aligned and
    embedded in one batch, not one file at a time.
    """
    from facecloak.embed import embed_faces

    results = []
    for chunk in _faces_per_chunk(paths, options, None):
        loaded = [(image.pixels, faces) for _, image, faces, error in chunk if error is None]
        everyone = Faces.cat([faces.shifted(k) for k, (_, faces) in enumerate(loaded)])
        vectors = (
            embed_faces([pixels for pixels, _ in loaded], everyone, model).cpu() if len(everyone) else None
        )
        first = 0
        for path, _, faces, error in chunk:
            if error is not None:
                results.append({"path": str(path), "error": error})
                continue
            records = faces.to_records()
            for record, vector in zip(records, vectors[first : first + len(faces)] if len(faces) else []):
                record["embedding"] = [round(float(v), 6) for v in vector]
            first += len(faces)
            results.append({"path": str(path), "model": model.card.name, "faces": records})
    return results
