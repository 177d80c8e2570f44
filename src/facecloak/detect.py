"""Face detection: MTCNN (facenet-pytorch 2.5.3's weights, from the installed package) -> `Faces`.

Photos larger than ``max_side`` are downscaled for detection (faces in them are large), never so
far that a ``min_size`` face becomes too small for MTCNN (`detection_scale`), and the results mapped
back to the original pixels. Photos of one size share P-Net's calls; R-Net and
O-Net see the candidate boxes of every photo of the batch at once (`facecloak.mtcnn`, the default
``backend="batched"``). ``backend="facenet-pytorch"`` runs facenet-pytorch's own ``detect_face``
instead, one size group at a time: the reference the batched stages are tested against. Its raw
outputs (object arrays under numpy 2) are cast to plain float tensors; "no face" is a `Faces`
of length 0.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak._checks import check_choice, check_image_list, is_finite_number
from facecloak._device import default_device
from facecloak.batch_types import Options
from facecloak.defaults import DETECT_ROTATIONS, MIN_FACE_PX, MIN_FACE_SCORE, ROTATION_MODES
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces, box_iou, box_min_overlap
from facecloak.mtcnn import (
    MTCNN_STAGE_THRESHOLDS,
    NMS_MIN_ONET,
    PNET_WINDOW_PX,
    PYRAMID_FACTOR,
    detect_mtcnn,
    load_mtcnn_nets,
    pyramid_scales,
)
from facecloak.turns import boxes_from_turned, from_turned, turn_image

DETECT_MAX_SIDE_PX = 1600
"""Photos whose longer side exceeds this are downscaled to it for detection."""

DETECTOR_BACKENDS = ("batched", "facenet-pytorch")
"""How MTCNN's stages run: batched across photos (default), or facenet-pytorch's own code."""

DETECT_MAX_PIXELS = 8_000_000
"""The most pixels a photo is read at to keep its ``min_size`` faces findable (`detection_scale`):
a 12 MP photo's 2400 x 1800 fits (all its 20 px faces), larger photos stop here."""

TURNED_SCORE_SHARE = 0.9
"""A face found only in a turned photo must close this share of the gap between ``min_score`` and 1
(0.99 at the default 0.9). A real face at its own turn scores 0.999-1.0 on the samples; beside
the upright faces of 400 LFW photos the turns found 13 more at 0.9 (ears, necks, faces cut by the
photo's edge), 1 at 0.99, and still 199 of 200 LFW faces turned by 90 or 180 degrees."""

TURNED_MAX_SIDE_PX = 800
"""The turned passes read each photo downscaled to this longer side at most (the upright pass:
``max_side``, 1600): three passes at a quarter of the pixels cost about three quarters of the
upright one on a 12 MP photo instead of three times it. A face found turned in a 12 MP photo must
then be at least about 60 px (P-Net's 12 px window at 800 px; upright, about 30 px at 1600). A
turn that finds a face there is read again at full detail, so its faces' boxes and landmarks are
as precise as upright ones."""

TURNED_OVERLAP_IOU = 0.3
"""A face found in a turned photo that overlaps a face already kept by this much (box IoU) is the
same face read at another turn (MTCNN finds some upside-down faces, with misplaced landmarks):
only its best-scoring reading is kept."""

__all__ = [
    "DETECTOR_BACKENDS",
    "DETECT_MAX_SIDE_PX",
    "MIN_FACE_PX",
    "MIN_FACE_SCORE",
    "MTCNN_STAGE_THRESHOLDS",
    "FaceDetector",
    "default_detector",
    "detect_faces",
    "detector_for",
]


class FaceDetector:
    """MTCNN face detector returning boxes, scores and five landmarks per face.

    Args:
        min_score: keep faces whose final MTCNN confidence (O-Net's) is at least this (0..1).
            Lower finds more faces (side views, small, blurred) and more false ones.
        min_size: smallest face side to look for, in original pixels. Smaller is slower.
        max_side: longer image side used for detection; larger photos are downscaled first,
            but never so far that a ``min_size`` face falls under P-Net's window (`detection_scale`).
        device: torch device; default CUDA when present, else CPU.
        backend: ``"batched"`` (default) runs R-Net and O-Net once over every photo's candidate
            boxes; ``"facenet-pytorch"`` runs facenet-pytorch's ``detect_face`` (slower on small
            photos: one resampling call per candidate box), kept as the reference.
        rotations: also look in each photo turned by quarter turns (`facecloak.turns`): "all"
            (default, `facecloak.defaults.DETECT_ROTATIONS`) in every photo, "auto" in photos with
            no upright face only, "none" never. Faces found turned come back in the photo's own
            pixels; their landmarks say the turn.

    Example:
        >>> detector = FaceDetector()  # doctest: +SKIP
        >>> # images: (B, 3, H, W) in [0, 1], or a list of (3, H, W)
        >>> faces = detector(images)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        min_score: float = MIN_FACE_SCORE,
        min_size: int = MIN_FACE_PX,
        max_side: int = DETECT_MAX_SIDE_PX,
        device: str | torch.device | None = None,
        backend: str = "batched",
        rotations: str = DETECT_ROTATIONS,
    ) -> None:
        if not 0.0 <= min_score <= 1.0:
            raise InvalidInputError(f"min_score must lie in [0, 1], got {min_score}")
        whole = all(is_finite_number(v) and float(v).is_integer() for v in (min_size, max_side))
        if not whole or min_size < 1 or max_side < 64:
            # NaN passed the comparisons and failed in int(); 2.5 was cut to 2 without a word
            raise InvalidInputError(
                f"min_size must be a whole number >= 1 and max_side one >= 64, got {min_size!r}, {max_side!r}"
            )
        self.min_score = float(min_score)
        self.min_size = int(min_size)
        self.max_side = int(max_side)
        self.device = default_device(device)
        self.backend = check_choice(backend, DETECTOR_BACKENDS, "backend")
        self.rotations = check_choice(rotations, ROTATION_MODES, "rotations")
        self.nets = load_mtcnn_nets(self.device, raw_pixels=backend == "batched")

    def __repr__(self) -> str:
        return (
            f"FaceDetector(min_score={self.min_score}, min_size={self.min_size}, "
            f"max_side={self.max_side}, device={self.device}"
            + ("" if self.backend == "batched" else f", backend={self.backend!r}")
            + ("" if self.rotations == DETECT_ROTATIONS else f", rotations={self.rotations!r}")
            + ")"
        )

    def __call__(
        self,
        images: Tensor | Sequence[Tensor],
        *,
        min_size: int | None = None,
        rotations: str | None = None,
        turns: Sequence[int] | None = None,
    ) -> Faces:
        """Detect faces in a batch.

        Args:
            images: (B, 3, H, W) in [0, 1], or a list of (3, H_i, W_i) of any sizes.
            min_size: this call's smallest face side (default ``self.min_size``): a caller that
                knows how large the faces it looks for are skips the pyramid's finest, costliest
                levels.
            rotations: this call's quarter-turn search (default ``self.rotations``).
            turns: look at exactly these quarter turns of every photo instead (`facecloak.turns`;
                0 is upright): a check that looks again for faces it knows the turns of.

        Returns:
            `Faces` in original pixel coordinates, sorted by image then by score.
        """
        batch = check_image_list(images)
        min_size = self.min_size if min_size is None else int(min_size)
        rotations = (
            self.rotations if rotations is None else check_choice(rotations, ROTATION_MODES, "rotations")
        )
        if turns is not None:
            wanted = sorted({int(k) % 4 for k in turns}) or [0]
            found = {
                k: self._detect_each([turn_image(image, k) for image in batch], min_size) for k in wanted
            }
            # faces known to be there, looked for again (a check): `min_score` alone, not `_sure`'s bar
            faces = [
                _merge_turns([(k, _from_turned(found[k][i], k, *image.shape[-2:])) for k in wanted])[0]
                for i, image in enumerate(batch)
            ]
            return Faces.cat([f.shifted(i) for i, f in enumerate(faces)])
        faces = self._detect_each(batch, min_size)
        searched = [
            i for i, found in enumerate(faces) if rotations == "all" or (rotations == "auto" and not found)
        ]
        if searched:
            # each photo downscaled once (`TURNED_MAX_SIDE_PX`), then turned: small copies, cheap passes
            smaller = [self._for_turns(batch[i]) for i in searched]
            turned = self._detect_each(
                [turn_image(image, k) for image, _ in smaller for k in (1, 2, 3)],
                [min_size * factor for _, factor in smaller for _ in (1, 2, 3)],
                enlarge=False,  # cheap passes: from P-Net's window up, never an enlarged copy
            )
            for j, (i, (image, factor)) in enumerate(zip(searched, smaller)):
                small_height, small_width = image.shape[-2:]
                candidates = [(0, faces[i])]
                for k in (1, 2, 3):
                    found = _from_turned(turned[3 * j + k - 1], k, small_height, small_width)
                    candidates.append((k, self._sure(found.scaled(1.0 / factor))))
                faces[i], kept = _merge_turns(candidates)
                again = sorted(kept - {0})
                if factor < 1.0 and again:
                    # faces kept from a turn of the small copy: that turn read again at full detail
                    height, width = batch[i].shape[-2:]
                    full = self._detect_each([turn_image(batch[i], k) for k in again], min_size)
                    for k, found in zip(again, full):
                        candidates[k] = (k, self._sure(_from_turned(found, k, height, width)))
                    faces[i], _ = _merge_turns(candidates)
        return Faces.cat([f.shifted(i) for i, f in enumerate(faces)])

    def _sure(self, faces: Faces) -> Faces:
        """The faces found in a turned photo that score high enough to keep (`TURNED_SCORE_SHARE`)."""
        bar = self.min_score + TURNED_SCORE_SHARE * (1.0 - self.min_score)
        return faces.select((faces.scores >= bar).nonzero()[:, 0]) if len(faces) else faces

    def _for_turns(self, image: Tensor) -> tuple[Tensor, float]:
        """``image`` area-downscaled so its longer side is at most `TURNED_MAX_SIDE_PX`, and the factor."""
        height, width = image.shape[-2:]
        factor = min(1.0, min(self.max_side, TURNED_MAX_SIDE_PX) / max(height, width, 1))
        if factor < 1.0:
            size = (max(1, round(height * factor)), max(1, round(width * factor)))
            image = F.interpolate(image[None].to(self.device, torch.float32), size=size, mode="area")[0]
        return image, factor

    def _detect_each(
        self, batch: Sequence[Tensor], min_size: float | Sequence[float], *, enlarge: bool = True
    ) -> list[Faces]:
        """Upright faces of each photo (``image_index`` 0), in original pixels, best first.

        ``min_size``: the smallest face side, one for every photo or one each (faces found smaller
        are dropped). ``enlarge``: a photo read at full size may be enlarged to look for faces under
        P-Net's window (`smallest_face_px`); without it the search starts at the window.
        """
        sizes = [float(min_size)] * len(batch) if isinstance(min_size, (int, float)) else list(min_size)
        groups: dict[tuple[int, int, float], list[int]] = defaultdict(list)
        for i, image in enumerate(batch):
            if image.shape[-2] * image.shape[-1]:  # a photo with no pixels holds no face
                groups[(*image.shape[1:], sizes[i])].append(i)
        stacks, min_faces, scales, order = [], [], [], []
        for (height, width, min_face), indices in groups.items():
            scale = detection_scale(height, width, min_face, self.max_side)
            # one photo: a view, not a copy (a 12 MP photo's copy costs as much as its P-Net level)
            stack = batch[indices[0]][None] if len(indices) == 1 else torch.stack([batch[i] for i in indices])
            stack = stack.to(self.device, torch.float32)
            if scale < 1.0:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                stack = F.interpolate(stack, size=size, mode="area")
            stacks.append(stack * 255.0)
            floor = smallest_face_px(height, width, scale) if enlarge else float(PNET_WINDOW_PX)
            min_faces.append(max(floor, min_face * scale))
            scales += [scale] * len(indices)
            order += indices
        # inference mode: no autograd bookkeeping per op, the CPU's share of batched MTCNN (workers
        # on threads wait less for each other: 88 -> 92 photos/s on 200 LFW photos, 2 cores)
        with torch.inference_mode():
            if self.backend == "batched":
                found = detect_mtcnn(stacks, min_faces, self.nets, thresholds=self.stage_thresholds)
            else:
                found = [f for stack, m in zip(stacks, min_faces) for f in self._facenet_pytorch(stack, m)]
        found = [(boxes.clone(), points.clone()) for boxes, points in found]  # plain tensors again
        faces = [Faces.empty()] * len(batch)
        for i, scale, (boxes, points) in zip(order, scales, found):
            faces[i] = self._keep(boxes, points, scale, sizes[i])
        return faces

    @property
    def stage_thresholds(self) -> tuple[float, float, float]:
        """MTCNN's three stage thresholds, O-Net's (the final score) no higher than ``min_score``.

        O-Net drops what scores under its own threshold before `_keep` sees it: with facenet-
        pytorch's 0.7 there, a ``min_score`` under 0.7 found nothing more than 0.7 did (on 300
        LFW photos, 22 faces scoring 0.36-0.69 at ``min_score=0.3``). Lowering the last stage
        only adds faces under 0.7: NMS keeps the best first, so the others are the same.
        """
        pnet, rnet, onet = MTCNN_STAGE_THRESHOLDS
        return pnet, rnet, min(onet, self.min_score)

    def _keep(self, boxes: Tensor, points: Tensor, scale: float, min_size: float) -> Faces:
        """Faces above ``min_score`` and at least ``min_size`` (original pixels), best first."""
        side = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / scale
        keep = (boxes[:, 4] >= self.min_score) & (side >= min_size)
        boxes, points = boxes[keep], points[keep]
        order = torch.argsort(-boxes[:, 4], stable=True)
        boxes, points = boxes[order], points[order]
        faces = Faces(
            boxes=boxes[:, :4].contiguous(),
            landmarks=points.contiguous(),
            scores=boxes[:, 4].contiguous(),
            image_index=torch.zeros(len(boxes), dtype=torch.long),
        )
        return faces.scaled(1.0 / scale) if scale < 1.0 else faces

    def _facenet_pytorch(self, stack: Tensor, min_face: float) -> list[tuple[Tensor, Tensor]]:
        """facenet-pytorch's ``detect_face`` on one stack of same-size photos (pixels 0..255)."""
        from facenet_pytorch.models.utils.detect_face import detect_face

        pnet, rnet, onet = self.nets
        if not pyramid_scales(*stack.shape[-2:], min_face, PYRAMID_FACTOR):
            # smaller than the smallest face: facenet-pytorch's ``torch.cat`` of no levels raised
            empty = (torch.zeros(0, 5), torch.zeros(0, 5, 2))
            return [empty] * len(stack)
        pixels = stack.permute(0, 2, 3, 1).contiguous()
        boxes_per_image, points_per_image = detect_face(
            pixels, min_face, pnet, rnet, onet, list(self.stage_thresholds), PYRAMID_FACTOR, self.device
        )
        results = []
        for boxes, points in zip(boxes_per_image, points_per_image):
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)  # numpy 2: cast object arrays
            points = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)
            results.append((torch.from_numpy(boxes.copy()), torch.from_numpy(points.copy())))
        return results


def detection_scale(height: int, width: int, min_face: float, max_side: int) -> float:
    """How much a ``height`` x ``width`` photo is downscaled before MTCNN looks in it (1: not at all).

    Down to ``max_side`` on its longer side, but never so far that a face of ``min_face`` pixels
    falls under P-Net's `PNET_WINDOW_PX` window: MTCNN cannot find it there. At 1600 px alone a
    12 MP photo's faces under about 30 px (``min_size`` 20), and a 30000 x 800 panorama's under
    about 225 px, were lost before the pyramid's first level (13 of 60 faces of 40 px in a 12 MP
    crowd, all found in its 1000 px tiles). The floor is the scale of the pyramid's own first level
    at native resolution (`facecloak.mtcnn.pyramid_scales`), so nothing MTCNN would find in the
    whole photo is lost; larger faces are found at the same coarser levels as before. The floor
    never makes the photo read larger than `DETECT_MAX_PIXELS` (a 120 MP photo at 0.6 was a 43 MP
    level: 8.2 GB peak and minutes on 2 cores); over about 22 MP the smallest face found is then
    larger than ``min_size`` (about 29 px at 48 MP, 46 px at 120 MP; 95 and 150 px before).
    """
    floor = PNET_WINDOW_PX / max(float(min_face), 1e-6)
    floor = min(floor, math.sqrt(DETECT_MAX_PIXELS / (height * width)))  # bounded cost and memory
    return min(1.0, max(max_side / max(height, width), floor))


def smallest_face_px(height: int, width: int, scale: float) -> float:
    """The smallest face side, in detection pixels, MTCNN looks for in a photo read at ``scale``.

    P-Net's window (12 px) in a downscaled photo (`detection_scale` never takes it under a
    ``min_size`` face). At native resolution, smaller: the pyramid's first level then enlarges
    the photo, as facenet-pytorch's does for a ``min_face_size`` under 12, up to
    `DETECT_MAX_PIXELS`. Held at 12 px, ``--min-face`` 4 to 11 looked for nothing under about
    9 px (on 60 LFW photos shrunk to 20 px, 14 faces found against facenet-pytorch's 19).
    """
    if scale < 1.0:
        return float(PNET_WINDOW_PX)
    return PNET_WINDOW_PX * min(1.0, math.sqrt(height * width / DETECT_MAX_PIXELS))


def _from_turned(faces: Faces, k: int, height: int, width: int) -> Faces:
    """Faces found in a photo turned by ``k``, in the ``height`` x ``width`` photo itself."""
    if len(faces) == 0:
        return faces
    return Faces(
        boxes=boxes_from_turned(faces.boxes, k, height, width),
        landmarks=from_turned(faces.landmarks, k, height, width),
        scores=faces.scores,
        image_index=faces.image_index,
    )


def _merge_turns(candidates: list[tuple[int, Faces]]) -> tuple[Faces, set[int]]:
    """One photo's faces from its turns: every face once, read at the turn that scores it best.

    A face found at several turns (`TURNED_OVERLAP_IOU`) is kept as its best-scoring reading: MTCNN
    reads some upside-down faces upright (0.99+, landmarks misplaced as an upright face's), and in
    a photo mixing upright and turned faces the turn with the most faces kept that misreading, so
    the face was aligned, cloaked and replaced upright. Ties go to the turn that finds the most
    faces (then the highest total score, then the least turned). Returns the faces, best first,
    and the turns they come from.
    """
    ranked = sorted(candidates, key=lambda item: (-len(item[1]), -float(item[1].scores.sum()), item[0]))
    readings = [
        (float(score), rank, k, found, n)
        for rank, (k, found) in enumerate(ranked)
        for n, score in enumerate(found.scores.tolist())
    ]
    readings.sort(key=lambda item: (-item[0], item[1], item[4]))
    kept: list[Faces] = []
    turns: set[int] = set()
    boxes, kept_turns = torch.zeros(0, 4), []
    for _, _, k, found, n in readings:
        box = found.boxes[n].float().cpu()
        # only readings at other turns are compared: MTCNN's own NMS already told one turn's faces
        # apart (two overlapping upright faces, IoU 0.47, lost one of them to this merge)
        other = torch.tensor([t != k for t in kept_turns], dtype=torch.bool)
        if bool(other.any()) and float(box_iou(box, boxes[other]).max()) >= TURNED_OVERLAP_IOU:
            continue
        # a reading at another turn nested in a kept face (MTCNN reads part of a face lying on its
        # side as a small upright face, 0.9+): IoU alone kept it, a second "face" inside the first
        if bool(other.any()) and float(box_min_overlap(box, boxes[other]).max()) >= NMS_MIN_ONET:
            continue
        kept.append(found.select([n]))
        turns.add(k)
        boxes = torch.cat([boxes, box[None]])
        kept_turns.append(k)
    if not kept:
        return candidates[0][1], set()
    merged = Faces.cat(kept)
    return merged.select(torch.argsort(-merged.scores, stable=True)), turns


def detector_for(options: Options, *, device: str | torch.device | None = None) -> FaceDetector:
    """The `FaceDetector` of a run's detection settings (``options``; ``device`` overrides its own)."""
    return FaceDetector(
        min_score=options.min_score,
        min_size=options.min_size,
        device=options.device if device is None else device,
        rotations=options.rotations,
    )


@functools.lru_cache(maxsize=8)
def default_detector(
    min_score: float = MIN_FACE_SCORE, min_size: int = MIN_FACE_PX, device: str = "cpu"
) -> FaceDetector:
    """The shared `FaceDetector` for these settings on ``device`` (a device name, e.g. "cuda:0").

    An explicit, documented cache keyed by settings and device, used by `detect_faces` only:
    building MTCNN costs more than detecting in one photo. Code that runs many photos should
    build its own `FaceDetector` and pass it on; ``default_detector.cache_clear()`` drops these.
    """
    return FaceDetector(min_score=min_score, min_size=min_size, device=device)


def detect_faces(
    images: Tensor | Sequence[Tensor],
    *,
    min_score: float = MIN_FACE_SCORE,
    min_size: int = MIN_FACE_PX,
    device: str | torch.device | None = None,
) -> Faces:
    """Detect faces with the shared `default_detector` for these settings and device.

    Example:
        >>> faces = detect_faces(images)  # doctest: +SKIP
        >>> faces.boxes.shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    return default_detector(min_score, min_size, str(default_device(device)))(images)
