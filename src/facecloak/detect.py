"""Face detection: MTCNN (facenet-pytorch 2.5.3, weights from the installed package) -> `Faces`.

Images of one size go through MTCNN in one batch; photos larger than ``max_side`` are
downscaled for detection (faces in them are large) and the results mapped back to the
original pixels. MTCNN's raw outputs (object arrays under numpy 2, ``None`` for no face) are
turned into plain float tensors; "no face" is a `Faces` of length 0.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak._checks import check_images
from facecloak._device import default_device
from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.faces import Faces

MIN_FACE_PX = 20
"""Default smallest face side, in original-image pixels, that detection looks for."""

DETECT_MAX_SIDE_PX = 1600
"""Photos whose longer side exceeds this are downscaled to it for detection."""

MTCNN_STAGE_THRESHOLDS = (0.6, 0.7, 0.7)
"""facenet-pytorch's per-stage thresholds; ``min_score`` filters the final stage on top."""


def _mtcnn_weights_dir() -> Path:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError("facenet-pytorch is not installed (pip install facenet-pytorch==2.5.3)")
    folder = Path(spec.origin).parent / "data"
    if not (folder / "pnet.pt").is_file():
        raise ModelNotFoundError("facenet-pytorch's MTCNN weights (data/pnet.pt) are missing", folder)
    return folder


class FaceDetector:
    """MTCNN face detector returning boxes, scores and five landmarks per face.

    Args:
        min_score: keep faces whose final MTCNN confidence is at least this (0..1). Lower finds
            more faces (side views, small, blurred) and more false ones.
        min_size: smallest face side to look for, in original pixels. Smaller is slower.
        max_side: longer image side used for detection; larger photos are downscaled first.
        device: torch device; default CUDA when present, else CPU.

    Example:
        >>> detector = FaceDetector()  # doctest: +SKIP
        >>> faces = detector(images)    # images: (B, 3, H, W) in [0, 1], or a list of (3, H, W)
    """

    def __init__(
        self,
        *,
        min_score: float = 0.9,
        min_size: int = MIN_FACE_PX,
        max_side: int = DETECT_MAX_SIDE_PX,
        device: str | torch.device | None = None,
    ) -> None:
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        if not 0.0 <= min_score <= 1.0:
            raise InvalidInputError(f"min_score must lie in [0, 1], got {min_score}")
        if min_size < 1 or max_side < 64:
            raise InvalidInputError("min_size must be >= 1 and max_side >= 64")
        self.min_score = float(min_score)
        self.min_size = int(min_size)
        self.max_side = int(max_side)
        self.device = default_device(device)
        folder = _mtcnn_weights_dir()
        self.nets = []
        for net_class, file in ((PNet, "pnet.pt"), (RNet, "rnet.pt"), (ONet, "onet.pt")):
            net = net_class(pretrained=False)
            net.load_state_dict(torch.load(folder / file, map_location="cpu", weights_only=True))
            self.nets.append(net.eval().requires_grad_(False).to(self.device))

    def __repr__(self) -> str:
        return (
            f"FaceDetector(min_score={self.min_score}, min_size={self.min_size}, "
            f"max_side={self.max_side}, device={self.device})"
        )

    def __call__(self, images: Tensor | Sequence[Tensor]) -> Faces:
        """Detect faces in a batch.

        Args:
            images: (B, 3, H, W) in [0, 1], or a list of (3, H_i, W_i) of any sizes.

        Returns:
            `Faces` in original pixel coordinates, sorted by image then by score.
        """
        batch = [images[i] for i in range(images.shape[0])] if isinstance(images, Tensor) else list(images)
        for i, image in enumerate(batch):
            check_images(image[None], name=f"images[{i}]")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(batch):
            groups[tuple(image.shape[1:])].append(i)
        found = [Faces.empty()] * len(batch)
        for (height, width), indices in groups.items():
            scale = min(1.0, self.max_side / max(height, width))
            stack = torch.stack([batch[i] for i in indices]).to(self.device, torch.float32)
            if scale < 1.0:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                stack = F.interpolate(stack, size=size, mode="area")
            for i, faces in zip(indices, self._detect_same_size(stack, scale)):
                found[i] = faces.scaled(1.0 / scale) if scale < 1.0 else faces
        return Faces.cat([faces.shifted(i) for i, faces in enumerate(found)])

    @torch.no_grad()
    def _detect_same_size(self, stack: Tensor, scale: float) -> list[Faces]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        pnet, rnet, onet = self.nets
        min_size = max(12.0, self.min_size * scale)
        pixels = (stack * 255.0).permute(0, 2, 3, 1).contiguous()
        boxes_per_image, points_per_image = detect_face(
            pixels, min_size, pnet, rnet, onet, list(MTCNN_STAGE_THRESHOLDS), 0.709, self.device
        )
        results = []
        for boxes, points in zip(boxes_per_image, points_per_image):
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)  # numpy 2: cast object arrays
            points = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)
            side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / scale
            keep = (boxes[:, 4] >= self.min_score) & (side >= self.min_size)
            order = np.argsort(-boxes[keep, 4], kind="stable")
            kept_boxes, kept_points = boxes[keep][order], points[keep][order]
            count = len(kept_boxes)
            results.append(
                Faces(
                    boxes=torch.from_numpy(kept_boxes[:, :4].copy()),
                    landmarks=torch.from_numpy(kept_points.copy()),
                    scores=torch.from_numpy(kept_boxes[:, 4].copy()),
                    image_index=torch.zeros(count, dtype=torch.long),
                )
            )
        return results


_default_detectors: dict[tuple, FaceDetector] = {}


def detect_faces(
    images: Tensor | Sequence[Tensor],
    *,
    min_score: float = 0.9,
    min_size: int = MIN_FACE_PX,
    device: str | torch.device | None = None,
) -> Faces:
    """Detect faces with a cached `FaceDetector` (built once per settings).

    Example:
        >>> faces = detect_faces(images)  # doctest: +SKIP
        >>> faces.boxes.shape
        torch.Size([1, 4])
    """
    key = (min_score, min_size, str(default_device(device)))
    if key not in _default_detectors:
        _default_detectors[key] = FaceDetector(min_score=min_score, min_size=min_size, device=device)
    return _default_detectors[key](images)
