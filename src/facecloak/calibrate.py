"""Setting a face model's match threshold from labelled photos instead of a guess.

A plug-in model arrives without a threshold, and the cloak aims at a multiple of it: a threshold
set too low makes every cloak look successful. `calibrate_threshold` embeds the centre face of
photos in a folder with one sub-folder per person, forms every same-person (genuine) and
different-person (impostor) pair, and takes the distance that admits ``far`` of the impostor
pairs: the operating point a scraper that tolerates that false-match rate would use.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facecloak import io
from facecloak._checks import is_whole_number
from facecloak.datasets import list_people
from facecloak.defaults import SCRAPER_ROTATIONS
from facecloak.detect import FaceDetector
from facecloak.embed import model_device
from facecloak.errors import FacecloakError, InvalidInputError
from facecloak.evaluate import PipelineAttacker, distance_matrix, tar_at_far
from facecloak.models.registry import Embedder

DEFAULT_FAR = 1e-3
DEFAULT_MAX_PHOTOS = 1200
"""Photos embedded by default: enough for ~700k impostor pairs (FAR 1e-3 rests on ~700 of them)."""

EMBED_CHUNK = 32


@dataclass(frozen=True)
class Calibration:
    """The threshold found and what it rests on."""

    model: str
    threshold: float
    """Cut to the 4 decimals the card keeps, so the saved threshold admits at most ``far``."""
    far: float
    tar: float
    genuine_pairs: int
    impostor_pairs: int
    photos: int
    photos_without_face: int
    people: int
    unreadable: tuple[str, ...] = ()
    """One line per photo that could not be read (left out): a threshold resting on fewer photos says so."""

    def summary(self) -> str:
        """One line for the terminal."""
        line = (
            f"{self.model}: threshold {self.threshold:.4f} at FAR {self.far:g} "
            f"(TAR {self.tar:.3f}; {self.genuine_pairs} genuine / {self.impostor_pairs} impostor pairs "
            f"from {self.photos} photos of {self.people} people, {self.photos_without_face} without a face)"
        )
        if self.unreadable:
            line += f"; {len(self.unreadable)} photo(s) left out, unreadable, the first: {self.unreadable[0]}"
        return line


def calibration_photos(data: str | Path, max_photos: int, seed: int = 0) -> list[tuple[Path, int]]:
    """(path, person label) of up to ``max_photos`` photos, people with two or more photos first.

    People are drawn at random (``seed``) and taken whole, so genuine pairs are plentiful.
    """
    people = list_people(data)
    if not people:
        raise InvalidInputError("no labelled photos: expected one sub-folder of photos per person", data)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(people))
    several = [people[i] for i in order if len(people[i].photos) >= 2]
    single = [people[i] for i in order if len(people[i].photos) < 2]
    chosen: list[tuple[Path, int]] = []
    for label, person in enumerate(several + single):
        if len(chosen) >= max_photos:
            break
        chosen += [(path, label) for path in person.photos[: max_photos - len(chosen)]]
    return chosen


def calibrate_threshold(
    model: Embedder,
    data: str | Path,
    *,
    far: float = DEFAULT_FAR,
    max_photos: int = DEFAULT_MAX_PHOTOS,
    detector: FaceDetector | None = None,
    seed: int = 0,
) -> Calibration:
    """The distance below which ``model`` calls two faces the same person, at false-accept rate ``far``.

    Args:
        model: the face model to calibrate.
        data: folder with one sub-folder of photos per person (the subject is the centre face).
        far: share of impostor pairs allowed under the threshold.
        max_photos: at most this many photos are embedded (see `calibration_photos`).
        detector: face detector (default MTCNN on the model's device).
        seed: seed of the draw of people.

    Raises:
        InvalidInputError: ``far`` or ``max_photos`` out of range, too few pairs, or impostor
            pairs so close that no threshold above 0 admits only ``far`` of them (a model that
            does not tell these people apart).
    """
    if isinstance(far, bool) or not isinstance(far, numbers.Real) or not 0 < far < 1:  # "1e-3": a TypeError
        raise InvalidInputError(f"far must be a number between 0 and 1, got {far!r}")
    # 0 or less (the CLI takes 10 or more) was refused as "no readable photos", which they were
    # not, and a float failed deep in a slice
    if not is_whole_number(max_photos) or max_photos < 2:
        raise InvalidInputError(f"max_photos must be a whole number of at least 2, got {max_photos!r}")
    photos = calibration_photos(data, max_photos, seed)
    # on the model's device, not CUDA whenever present: `--device cpu` put MTCNN on the GPU
    attacker = PipelineAttacker(
        model, detector or FaceDetector(device=model_device(model), rotations=SCRAPER_ROTATIONS)
    )
    embeddings, labels, unreadable = [], [], []
    for start in range(0, len(photos), EMBED_CHUNK):
        images, chunk_labels = [], []
        for path, label in photos[start : start + EMBED_CHUNK]:
            try:
                images.append(io.read_image(path).pixels)
                chunk_labels.append(label)
            except FacecloakError as error:  # left out, and counted: it was silent
                unreadable.append(str(error))
        if images:
            embeddings.append(attacker.embed(images))
            labels += chunk_labels
    if not embeddings:
        raise InvalidInputError("no readable photos", data)
    everything = torch.cat(embeddings)
    found = ~torch.isnan(everything).any(1)
    if not bool(found.any()):  # it said "give more people with two or more photos"
        raise InvalidInputError(
            f"no face found in any of the {len(labels)} photos: calibration needs photos of faces", data
        )
    vectors, ids = everything[found], torch.tensor(labels)[found]
    distances = distance_matrix(vectors, vectors, model.card.distance)
    upper = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
    same = ids[:, None] == ids[None, :]
    genuine, impostor = distances[upper & same], distances[upper & ~same]
    if len(genuine) == 0 or len(impostor) * far < 1:
        raise InvalidInputError(
            f"too few pairs to calibrate at FAR {far:g} ({len(genuine)} genuine, {len(impostor)} impostor"
            f"{_without_face(found)}): give more people with two or more photos",
            data,
        )
    _, exact = tar_at_far(genuine, impostor, far)
    exact = float(exact) if math.isfinite(exact) else float(impostor.max())
    threshold = _rounded_down(exact) if exact > 0 else exact
    if not threshold > 0:  # saved as the card's threshold it was refused with a traceback
        raise InvalidInputError(
            f"at FAR {far:g} the threshold would be {threshold:.4g}: {model.card.name} puts different "
            "people at distance 0 in these photos, so it cannot be calibrated on them",
            data,
        )
    return Calibration(
        model=model.card.name,
        threshold=threshold,
        far=far,
        tar=float((genuine < threshold).float().mean()),
        genuine_pairs=int(len(genuine)),
        impostor_pairs=int(len(impostor)),
        photos=int(found.sum()),
        photos_without_face=int((~found).sum()),
        people=int(len(ids.unique())),
        unreadable=tuple(unreadable),
    )


def _rounded_down(threshold: float) -> float:
    """``threshold`` cut to the 4 decimals a card keeps (4 significant digits below 1e-4).

    The card keeps 4 decimals: rounded to the nearest, a threshold rounded up past the impostor
    pair it stops at, which then matched, and more than ``far`` of the impostor pairs were accepted.
    Cut down, it admits no more than the exact one.
    """
    digits = 4 if threshold >= 1e-4 else 3 - math.floor(math.log10(threshold))
    return math.floor(threshold * 10**digits) / 10**digits


def _without_face(found: torch.Tensor) -> str:
    """``; N of M photos without a face`` where some were, for the too-few-pairs message."""
    missing = int((~found).sum())
    return f"; {missing} of {len(found)} photos without a face" if missing else ""
