"""The honest check after an upload: re-encode, detect from scratch, match, embed, and the records.

A cloak is only worth what survives an upload site: each cloaked photo is re-encoded as a real
JPEG at `VERIFY_JPEG_QUALITY`, faces are detected again by the detector passed in (no hidden
one), each original face is matched to a new detection by box overlap (`REDETECT_IOU`), and the
matched faces are embedded by every attacked model. `face_records` turns a `CloakResult` into the
per-face JSON the CLI, batch and service write.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from facecloak import io
from facecloak.defaults import (
    DISTANCE_AFTER_UPLOAD_KEY,
    FOUND_AFTER_UPLOAD_KEY,
    REDETECT_IOU,
    VERIFY_JPEG_QUALITY,
)
from facecloak.detect import FaceDetector
from facecloak.embed import embed_chips, face_chips
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces, box_iou
from facecloak.models.registry import Embedder
from facecloak.turns import face_turns

if TYPE_CHECKING:  # typing only: base.py builds CloakResult and imports this module
    from facecloak.cloak.base import CloakResult

__all__ = [
    "DISTANCE_AFTER_UPLOAD_KEY",
    "FOUND_AFTER_UPLOAD_KEY",
    "REDETECT_IOU",
    "VERIFY_JPEG_QUALITY",
    "face_records",
    "match_redetected",
    "measure_cloaked",
    "redetect",
    "redetect_min_size",
]

REDETECT_SIZE_SHARE = 0.4
"""A check after upload looks only for faces at least this share of the smallest checked face's
side (`redetect_min_size`). A square box of side ``a x s`` inside a square of side ``s`` overlaps
it by at most ``a**2`` (IoU), so below ``sqrt(REDETECT_IOU)`` x the face's side (0.55 at 0.3)
nothing can be matched to it; 0.4 leaves room for boxes that are not square. The pyramid's
finest levels, the costliest, are skipped (on the 512 px astronaut, 57 -> 29 ms)."""

REDETECT_SCORE_SHARE = 0.8
"""A check after upload of faces found under its detector's ``min_score`` (a run with a lower
``--threshold``) looks for faces down to this share of the lowest one's score (`redetect`). It
looked at the default 0.9 alone: on three LFW photos cloaked with ``--threshold 0.5`` each face
found at 0.58-0.83 was not found again, and counted protected whatever its cloak did. The share
leaves room for the score a face loses in the upload's JPEG."""

Detector = Callable[[Sequence[Tensor]], Faces]


def match_redetected(faces: Faces, found: Faces) -> tuple[Tensor, Tensor]:
    """Match each of ``faces`` to a face of ``found`` in the same photo, one to one, best overlap first.

    One to one: matched each to its own best overlap, two overlapping faces could take the same
    detection, and a face the detector no longer finds was then read through its neighbour's
    chip: "found again" and far from its person (the neighbour is someone else), which passed a
    replaced face's check without a face of its own there.

    Returns:
        matched: (N,) index into ``found``, -1 where none is left overlapping by `REDETECT_IOU`.
        is_found: (N,) bool, ``matched >= 0``.
    """
    n = len(faces)
    matched = torch.full((n,), -1, dtype=torch.long)
    pairs = []  # (overlap, face, detection) over every pair in the same photo
    for k in range(n):
        candidates = (found.image_index == faces.image_index[k]).nonzero()[:, 0]
        if len(candidates):
            overlaps = box_iou(faces.boxes[k], found.boxes[candidates])
            pairs += [(float(o), k, int(c)) for o, c in zip(overlaps, candidates) if float(o) >= REDETECT_IOU]
    taken = set()
    for _, k, c in sorted(pairs, key=lambda pair: (-pair[0], pair[1], pair[2])):
        if matched[k] < 0 and c not in taken:
            matched[k] = c
            taken.add(c)
    return matched, matched >= 0


def measure_cloaked(
    stored: list[Tensor],
    faces: Faces,
    reference: list[Tensor],
    models: Sequence[Embedder],
    detector: Detector | None,
    alignments: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Each face's distance as stored and after an upload: a real JPEG, a detection from scratch.

    The stored faces are read through ``alignments`` (the cloak's own; None: aligned afresh).
    With a ``detector``, each photo is re-encoded as JPEG at `VERIFY_JPEG_QUALITY`,
    detected again, and every original face matched to a new detection by box overlap
    (`REDETECT_IOU`). Both kinds of chip go through each model in one batch.

    Args:
        stored: the protected photos as they will be written, (3, H_i, W_i) each.
        faces: the faces that were protected (``image_index`` into ``stored``).
        reference: per model, (N, D_m) embeddings each face must end far from (its clean face, or
            its person's mean: `Cloak.references`).
        models: the models to measure.
        detector: finds faces in the re-encoded photos; None skips the upload.
        alignments: per model, the (N, 2, 3) chip_from_image to read the stored faces through.

    Returns:
        distance: (N, M) each model's distance as stored.
        distance_after_upload: (N, M) the same after the upload; NaN where not found again (and
            everywhere without a detector).
        found: (N,) bool, the face was detected again.
    """
    n = len(faces)
    distance = torch.zeros(n, len(models))
    after = torch.full((n, len(models)), math.nan)
    found = torch.zeros(n, dtype=torch.bool)
    if n == 0:
        return distance, after, found
    again, recompressed = None, None
    if detector is not None:
        recompressed = _recompress(stored)
        found_faces = redetect(detector, recompressed, faces)
        matched, found = match_redetected(faces, found_faces)
        again = found_faces.select(matched[found]) if bool(found.any()) else None
    for m, model in enumerate(models):
        with torch.no_grad():
            chips = face_chips(stored, faces, model, alignments[m] if alignments is not None else None)
            if again is not None:
                chips = torch.cat([chips, face_chips(recompressed, again, model)])
            embedding = embed_chips(model, chips)
        own = reference[m]
        distance[:, m] = model.distance(embedding[:n], own).cpu()
        if again is not None:
            after[found, m] = model.distance(embedding[n:], own[found.to(own.device)]).cpu()
    return distance, after, found


def face_records(result: CloakResult, faces: Faces) -> list[dict]:
    """One JSON-ready dict per face of ``result``, in ``faces`` order."""
    if len(faces) != len(result.distance):  # more: an IndexError; fewer: records cut short, silently
        raise InvalidInputError(
            f"records need the {len(result.distance)} face(s) this result was cloaked with, got {len(faces)}"
        )
    out = []
    base = faces.to_records()
    for n in range(len(faces)):
        models = {
            name: {
                "threshold": round(float(result.thresholds[m]), 4),
                "distance": round(float(result.distance[n, m]), 4),
                DISTANCE_AFTER_UPLOAD_KEY: None
                if math.isnan(float(result.distance_jpeg[n, m]))
                else round(float(result.distance_jpeg[n, m]), 4),
            }
            for m, name in enumerate(result.model_names)
        }
        out.append(
            {
                **base[n],
                "protected": bool(result.protected[n]),
                # None: not checked (``verify=False``); False read as "not found after upload"
                FOUND_AFTER_UPLOAD_KEY: bool(result.found_after_jpeg[n])
                if result.checked_after_upload
                else None,
                "models": models,
                "dssim": round(float(result.dssim[n]), 5),
                "psnr": _finite_or_none(float(result.psnr[n]), 2),  # None: the face is unchanged
                "linf": round(float(result.linf[n]), 2),
                "ciede2000_mean": round(float(result.ciede_mean[n]), 3),
                "ciede2000_p99": round(float(result.ciede_p99[n]), 3),
                "steps": int(result.steps[n]),
                # distances are from the mean of this many clean photos of the person (1: its own)
                "reference_photos": 1 if result.reference_photos is None else int(result.reference_photos[n]),
                # > 1: a large face, cloaked on its photo area-averaged this much (`facecloak.cloak.scale`)
                "working_factor": 1.0
                if result.working_factors is None
                else round(float(result.working_factors[n]), 3),
            }
        )
    return out


def _finite_or_none(value: float, digits: int) -> float | None:
    """``value`` rounded, or None where it is infinite (JSON has no infinity)."""
    return round(value, digits) if math.isfinite(value) else None


RECOMPRESS_THREADS = 8
"""Threads that JPEG-encode and decode a batch's photos at once (PIL lets go of the GIL)."""


def redetect_min_size(boxes: Tensor) -> int:
    """Smallest face side a re-detection must look for to find the faces ``boxes`` (N, 4) again.

    `REDETECT_SIZE_SHARE` of the shortest side among them: anything smaller could not be matched
    to one of them by `match_redetected`.
    """
    sides = (boxes[:, 2:] - boxes[:, :2]).amin(1)
    return max(1, int(REDETECT_SIZE_SHARE * float(sides.min())))


def redetect(detector: Detector, photos: list[Tensor], faces: Faces) -> Faces:
    """``detector`` on ``photos``, told the smallest face that could match one of ``faces``.

    The re-detection of both checks after upload, the cloak's (`measure_cloaked`) and the
    replacer's. It looks at the quarter turns the faces lie at (`facecloak.turns.face_turns`), so
    an upright face costs one detection and a face lying on its side is found again where it lies.
    The size comes from the faces, not the detector's own ``min_size``: a face under it (found
    with a lower ``--min-face``) was never looked for, and counted protected unchanged; so does
    the score where a face scored under the detector's ``min_score`` (`REDETECT_SCORE_SHARE`).
    Detectors that take no such hints are called as they are.
    """
    if not isinstance(detector, FaceDetector) or len(faces) == 0:
        return detector(photos)
    min_size = redetect_min_size(faces.boxes)
    turns = [0] if detector.rotations == "none" else sorted(set(face_turns(faces.landmarks).tolist()))
    lowest = float(faces.scores.min())
    if lowest >= detector.min_score:
        return detector(photos, min_size=min_size, turns=turns)
    # found by a run that looked lower: look at least as low, and through the detector's own pyramid
    # as well, where such a run found it: a face that scores low is found at some of the pyramid's
    # scales only (an LFW face at 0.83 was found from 8, 12 and 20 px up, not from 10)
    lower = copy.copy(detector)  # its loaded nets shared
    lower.min_score = REDETECT_SCORE_SHARE * lowest
    found = [lower(photos, min_size=size, turns=turns) for size in sorted({min_size, detector.min_size})]
    if len(found) == 1:
        return found[0]
    both = Faces.cat(found)
    # one detection a face: a face not found again must not be matched to a neighbour's second copy
    keep = batched_nms(both.boxes, both.scores, both.image_index, 0.5)
    return both.select(keep[torch.argsort(both.image_index[keep], stable=True)])


def _recompress(stored: list[Tensor]) -> list[Tensor]:
    """Every photo through a real JPEG at `VERIFY_JPEG_QUALITY`, several at a time."""
    if len(stored) < 2 * RECOMPRESS_THREADS:
        return [io.jpeg_roundtrip(image, VERIFY_JPEG_QUALITY) for image in stored]
    on_cpu = [image.cpu() for image in stored]
    with ThreadPoolExecutor(RECOMPRESS_THREADS) as pool:
        decoded = list(pool.map(lambda image: io.jpeg_roundtrip(image, VERIFY_JPEG_QUALITY), on_cpu))
    return [image.to(original.device) for image, original in zip(decoded, stored)]
