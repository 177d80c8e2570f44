"""Commands on single photos and plain listings: one-image helpers and ``detect``/``embed``/``verify``.

Nothing here protects a batch of files (that is `facecloak.batch` and `facecloak.pipeline`): these
read photos in chunks, detect their faces together, and return JSON-ready dicts per file for the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from facecloak import io
from facecloak.anonymize import Anonymizer
from facecloak.batch import Options
from facecloak.cloak import Cloak
from facecloak.detect import FaceDetector, detector_for
from facecloak.embed import embed_faces
from facecloak.errors import FacecloakError, InvalidInputError
from facecloak.faces import Faces
from facecloak.protection import AnonymizeFaces, CloakFaces

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
    detector = detector or detector_for(options)
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
        results.append({"path": str(path), "width": width, "height": height, "faces": _file_records(faces)})
    return results


def anonymize_image(
    image: Tensor, *, method: str = "blur", detector: FaceDetector | None = None, **params
) -> tuple[Tensor, list[dict]]:
    """Anonymise every face in one (3, H, W) image: returns the new image and one record per face.

    Example:
        >>> from facecloak.io import read_image
        >>> out, faces = anonymize_image(read_image("samples/astronaut.jpg").pixels)  # doctest: +SKIP
    """
    _check_one_image(image)
    detector = detector or FaceDetector()
    faces = detector([image])
    result = AnonymizeFaces(Anonymizer(method, **params)).protect([image], faces)
    return result.images[0], result.records


def cloak_image(
    image: Tensor, cloak: Cloak, *, detector: FaceDetector | None = None
) -> tuple[Tensor, list[dict]]:
    """Cloak every face in one (3, H, W) image: the cloaked image and one record per face.

    Example:
        >>> cloak = create_cloak("untargeted", [create_embedder("dlib-resnet")])  # doctest: +SKIP
        >>> cloaked, faces = cloak_image(read_image("samples/astronaut.jpg").pixels, cloak)  # doctest: +SKIP
    """
    _check_one_image(image)
    if not isinstance(cloak, Cloak):  # a name such as "untargeted" was an AttributeError traceback
        raise InvalidInputError(
            f"cloak must be a Cloak (make one with create_cloak), got {type(cloak).__name__}"
        )
    detector = detector or cloak.detector
    faces = detector([image])
    result = CloakFaces(cloak).protect([image], faces)
    return result.images[0], result.records


def _check_one_image(image: object) -> None:
    """Refuse anything but one (3, H, W) photo, naming what was given.

    A batch (1, 3, H, W) was reported as "images[0] must have shape (B, 3, H, W), got (1, 1, 3, H, W)":
    the shape the caller had passed, asked for, with a dimension they had not written.
    """
    if not isinstance(image, Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InvalidInputError(
            f"image must be one (3, H, W) tensor, got {got} (for a batch: facecloak.protection)"
        )


def _largest_face(path: Path, faces: Faces) -> Faces:
    if len(faces) == 0:
        raise FacecloakError("no face found", path)  # a photo's outcome (exit 3), not a usage error
    areas = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
    return faces.select([int(areas.argmax())])


def verify_files(
    first: Path, second: Path, model, options: Options, *, match_threshold: float | None = None
) -> dict:
    """Whether the largest faces of two photos are the same person.

    Args:
        first: one photo.
        second: the other photo.
        model: the face model that compares them.
        options: detection settings (``min_score`` is the detection confidence).
        match_threshold: same person below this distance; default the model's own threshold.

    Both photos are detected in one call and both faces embedded in one batch.
    """
    detector = detector_for(options)
    images = [io.read_image(path, max_pixels=options.max_pixels).pixels for path in (first, second)]
    with torch.no_grad():
        found = detector(images)
    faces = Faces.cat(
        [_largest_face(path, found.for_image(i)).shifted(i) for i, path in enumerate((first, second))]
    )
    a, b = embed_faces(images, faces, model)
    distance = float(model.distance(a, b))
    threshold = model.card.match_threshold if match_threshold is None else float(match_threshold)
    return {
        "first": str(first),
        "second": str(second),
        "model": model.card.name,
        "metric": model.card.distance,
        "distance": round(distance, 5),
        "match_threshold": threshold,
        "model_match_threshold": model.card.match_threshold,
        "detect_threshold": options.min_score,
        "same_person": distance < threshold,
    }


def embed_files(paths: Sequence[str | Path], model, options: Options) -> list[dict]:
    """Embeddings of every face per image for ``facecloak embed``.

    Photos are detected in chunks (`READ_CHUNK_FILES`) and every face of a chunk is aligned and
    embedded in one batch, not one file at a time.
    """
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
            records = _file_records(faces)
            for record, vector in zip(records, vectors[first : first + len(faces)] if len(faces) else []):
                record["embedding"] = [round(float(v), 6) for v in vector]
            first += len(faces)
            results.append({"path": str(path), "model": model.card.name, "faces": records})
    return results


def _file_records(faces: Faces) -> list[dict]:
    """The faces of one file as JSON records, without ``image_index``.

    Always 0 within one file: `detect --json` printed it as if it meant something, and ``--jsonl``
    left it out.
    """
    return [{k: v for k, v in record.items() if k != "image_index"} for record in faces.to_records()]
