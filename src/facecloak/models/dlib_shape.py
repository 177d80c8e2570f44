"""dlib's shape predictor (``shape_predictor_5_face_landmarks.dat``) in numpy, exactly.

dlib's own pipeline (and the ``face_recognition`` package built on it) aligns a face for its ResNet
with a 5-point shape predictor: an ensemble of regression trees (Kazemi and Sullivan, "One
Millisecond Face Alignment with an Ensemble of Regression Trees", CVPR 2014). Running the same
predictor here lets us build exactly dlib's face chip without importing dlib, which makes our
embeddings match dlib's whole pipeline more closely than a template fitted to MTCNN's landmarks.

How dlib predicts (``dlib/image_processing/shape_predictor.h``), and how this port follows it:
    - The shape lives in a normalised frame in which the detection rectangle spans (0, 0) to
      (1, 1); ``unnormalizing_tform(rect)`` maps it to pixels, ``(0, 0)`` to the rectangle's
      top-left and ``(1, 1)`` to its bottom-right corner. dlib rectangles are integer and
      inclusive (``right = left + width - 1``), so a box here is ``(left, top, right, bottom)``
      of those corners.
    - Starting from the mean shape, each cascade (15 in the 5-point model) reads 800 pixels. Each
      pixel is an anchor landmark plus an offset, both learnt against the mean shape; the offset is
      rotated and scaled by the similarity taking the mean shape to the current one
      (``find_tform_between_shapes``, Umeyama's least squares; here in closed form), in float32
      arithmetic as dlib does, then mapped to pixels in double and rounded to the nearest pixel
      (``floor(x + 0.5)``). Pixels outside the image read as 0.
    - Pixels are grey levels 0..255: dlib reads an RGB image through ``get_pixel_intensity``,
      which averages the channels with integer division, ``(r + g + b) // 3``.
    - Each cascade's 500 depth-4 trees split on ``pixel[idx1] - pixel[idx2] > thresh`` (true goes
      to the left child, ``2 i + 1``); the leaves' shape updates are added to the shape one tree
      after another in float32, and kept in that order so the sums agree with dlib's bit for bit.
    - The landmarks are the final shape mapped to pixels. dlib rounds them to integer
      ``point`` values; `ShapePredictor.predict` returns the sub-pixel positions unless asked to round.

The trees read pixels, so the landmarks are piecewise constant in the image: there is no useful
gradient, and this module is plain numpy behind a tensor interface.

Checked against dlib 20.0.1 (tests/test_dlib_shape.py): on dlib's HOG boxes of 100 LFW faces, and
on boxes partly outside the image, tiny, huge or on rotated faces, the landmarks after dlib's
rounding are identical to dlib's (the 68-point file too, checked by hand on 50 boxes). Started
from MTCNN's boxes mapped by `mtcnn_box_to_dlib`, they land about 0.6 px from dlib's own, and the
embeddings of chips aligned on them have mean cosine 0.998 with dlib's whole pipeline (HOG,
predictor, descriptor), against 0.994 when aligning MTCNN's own landmarks to the card's
``DLIB_CHIP_TEMPLATE_150``. About 4 ms for one face, 1.5 ms per face in a batch of 64 (numpy, on
a busy 2-core machine).

The 5-point model's points are, in dlib's order: the outer then inner corner of the eye on the
viewer's right, the outer then inner corner of the eye on the viewer's left, and the base of the
nose (the order of `facecloak.models.dlib_resnet.DLIB_5POINT_TEMPLATE`).

Example:
    >>> predictor = load_shape_predictor()  # doctest: +SKIP
    >>> predictor.predict(grey, torch.tensor([[62.0, 77.0, 168.0, 183.0]])).shape  # doctest: +SKIP
    torch.Size([1, 5, 2])

"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import Tensor

from facecloak._checks import check_images
from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.models.dlib_format import DlibReader, locate_package_model
from facecloak.models.parsed_cache import load_parsed
from facecloak.transforms import levels_8bit

__all__ = [
    "DLIB_SHAPE_PREDICTOR_5_FILENAME",
    "DLIB_SHAPE_PREDICTOR_68_FILENAME",
    "MTCNN_TO_DLIB_BOX",
    "ShapePredictor",
    "dlib_grey",
    "default_shape_predictor",
    "dlib_landmarks",
    "load_shape_predictor",
    "locate_shape_predictor",
    "mtcnn_box_to_dlib",
]

DLIB_SHAPE_PREDICTOR_5_FILENAME = "shape_predictor_5_face_landmarks.dat"
"""dlib's 5-point predictor, as shipped in the ``face_recognition_models`` package's ``models/``."""

DLIB_SHAPE_PREDICTOR_68_FILENAME = "shape_predictor_68_face_landmarks.dat"
"""dlib's 68-point (iBUG 300-W) predictor, shipped beside it."""

SHAPE_PREDICTOR_VERSION = 1
"""The only version ``deserialize(shape_predictor&)`` accepts."""

MTCNN_TO_DLIB_BOX = (-0.0267, 0.0434, 1.1277, 0.8381)
"""How `mtcnn_box_to_dlib` turns MTCNN's box (width ``w``, height ``h``) into dlib HOG's.

``(c0, c1, c2, c3)``: dlib's box centre is MTCNN's plus ``(c0 w, c1 h)``, and it spans ``(c2 w,
c3 h)`` pixels (``right - left``, ``bottom - top``). Fitted by least squares in pixels by
``scripts/calibrate/fit_dlib_box_mapping.py`` on 396 LFW faces found by both detectors (HOG upsampled once,
as ``face_recognition`` does). HOG boxes come in discrete pyramid sizes, so single boxes still
differ by about 7 px RMS per corner, but the predictor hardly minds: on mapped MTCNN boxes its
landmarks land 0.53 px (mean; 0.56 on faces held out of the fit, 95th percentile 1.3 px) from
dlib's own on HOG boxes, most of which is dlib's rounding to whole pixels (0.38 px on average).
Unmapped MTCNN boxes give 1.07 px."""


# --------------------------------------------------------------------------------------------------
# the model


_ARRAY_FIELDS = ("initial_shape", "split_pixels", "split_thresholds", "leaf_values", "anchor_idx", "deltas")

SHAPE_PREDICTOR_CACHE_FORMAT = "shape-predictor-v1"
"""Name and version of the parsed form kept in the cache (`facecloak.models.parsed_cache`)."""


@dataclass(frozen=True)
class ShapePredictor:
    """dlib's ``shape_predictor``: a cascade of regression-tree forests, as numpy arrays.

    dlib requires every tree to be complete (``2**depth`` leaves for ``2**depth - 1`` splits);
    all trees of a trained predictor have the same depth, so the forests are stored as dense
    arrays and evaluated for all faces and all trees of a cascade at once. Shapes below use
    ``C`` cascades, ``T`` trees per cascade, ``S`` splits and ``L = S + 1`` leaves per tree,
    ``F`` feature pixels per cascade and ``P`` landmarks.

    Attributes:
        initial_shape: ``(P, 2)`` float32 mean shape in the normalised box frame.
        split_pixels: ``(C, 2, T * S)`` int64, ``idx1`` and ``idx2`` (feature indices) of each
            split, tree by tree, nodes in breadth-first order (children of ``i``: ``2i + 1``,
            ``2i + 2``).
        split_thresholds: ``(C, T, S)`` float32, go left when ``pixel[idx1] - pixel[idx2]``
            exceeds it.
        leaf_values: ``(C, T * L, P, 2)`` float32 shape updates, tree by tree.
        anchor_idx: ``(C, F)`` int64, the landmark each feature pixel is anchored to.
        deltas: ``(C, F, 2)`` float32, its offset from that landmark in the mean shape.

    """

    initial_shape: np.ndarray
    split_pixels: np.ndarray
    split_thresholds: np.ndarray
    leaf_values: np.ndarray
    anchor_idx: np.ndarray
    deltas: np.ndarray

    @property
    def num_parts(self) -> int:
        """Number of landmarks ``P`` (5 or 68 for dlib's models)."""
        return int(self.initial_shape.shape[0])

    @property
    def num_cascades(self) -> int:
        """Number of cascades ``C``."""
        return int(self.split_pixels.shape[0])

    @property
    def tree_depth(self) -> int:
        """Depth of every tree (4 in dlib's models)."""
        return int(self.split_thresholds.shape[2] + 1).bit_length() - 1

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as named arrays (what the parsed-model cache stores)."""
        return {name: getattr(self, name) for name in _ARRAY_FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ShapePredictor:
        """Rebuild a predictor from `to_arrays`' output, checking shapes, dtypes and index ranges.

        Raises:
            KeyError: a field is missing.
            ValueError: the arrays do not make a predictor.
        """
        fields = {name: np.ascontiguousarray(arrays[name]) for name in _ARRAY_FIELDS}
        initial, splits = fields["initial_shape"], fields["split_pixels"]
        thresholds, anchors = fields["split_thresholds"], fields["anchor_idx"]
        if initial.ndim != 2 or initial.shape[1] != 2 or thresholds.ndim != 3:
            raise ValueError("not a shape predictor: bad mean shape or thresholds")
        cascades, trees, num_splits = thresholds.shape
        parts, pixels = initial.shape[0], anchors.shape[-1]
        expected = {
            "split_pixels": ((cascades, 2, trees * num_splits), np.int64),
            "split_thresholds": ((cascades, trees, num_splits), np.float32),
            "leaf_values": ((cascades, trees * (num_splits + 1), parts, 2), np.float32),
            "anchor_idx": ((cascades, pixels), np.int64),
            "deltas": ((cascades, pixels, 2), np.float32),
            "initial_shape": ((parts, 2), np.float32),
        }
        for name, (shape, dtype) in expected.items():
            if fields[name].shape != shape or fields[name].dtype != dtype:
                raise ValueError(
                    f"not a shape predictor: {name} is {fields[name].shape} {fields[name].dtype}"
                )
        if (num_splits + 1) & num_splits or not cascades or not pixels:
            raise ValueError("not a shape predictor: incomplete trees")
        if splits.min() < 0 or splits.max() >= pixels or anchors.min() < 0 or anchors.max() >= parts:
            raise ValueError("not a shape predictor: a split or anchor index out of range")
        return cls(**fields)

    def __repr__(self) -> str:
        cascades, trees = self.split_thresholds.shape[:2]
        return (
            f"ShapePredictor(parts={self.num_parts}, cascades={cascades}, trees={trees}, "
            f"depth={self.tree_depth}, pixels={self.anchor_idx.shape[1]})"
        )

    def predict(
        self, grey: np.ndarray | Tensor, boxes: np.ndarray | Tensor, *, round_to_pixel: bool = False
    ) -> Tensor:
        """Landmarks of the faces in ``boxes``, as dlib's ``shape_predictor(img, rect)`` finds them.

        Args:
            grey: ``(H, W)`` grey levels on dlib's 0..255 scale: uint8, or a float array holding
                such values. dlib reads uint8 pixels; for an RGB photo use `dlib_grey` (or
                `dlib_landmarks`), which converts the way dlib does.
            boxes: ``(N, 4)`` ``(left, top, right, bottom)`` of dlib's rectangles: the pixels the
                normalised corners (0, 0) and (1, 1) map to. dlib's rectangles are integer and
                inclusive; fractional boxes (such as `mtcnn_box_to_dlib`'s) are used as given.
            round_to_pixel: round the landmarks to integer pixels, ``floor(x + 0.5)``, as dlib
                does when it stores them in a ``full_object_detection``. Off by default: the
                sub-pixel positions are dlib's before that rounding and align faces better.

        Returns:
            ``(N, P, 2)`` landmarks ``(x, y)`` in image pixels, in the model's point order; dtype
            of ``boxes`` if floating (else float32), on its device.

        Raises:
            InvalidInputError: ``grey`` is not a 2-D image in 0..255 or ``boxes`` not ``(N, 4)``.

        Example:
            >>> grey = torch.zeros(200, 200, dtype=torch.uint8)
            >>> load_shape_predictor().predict(grey, torch.tensor([[50.0, 50.0, 150.0, 150.0]])).shape
            torch.Size([1, 5, 2])

        """
        return self.predict_many([grey], [boxes], round_to_pixel=round_to_pixel)[0]

    def predict_many(
        self,
        greys: Sequence[np.ndarray | Tensor],
        boxes: Sequence[np.ndarray | Tensor],
        *,
        round_to_pixel: bool = False,
        origins: Sequence[tuple[int, int]] | None = None,
    ) -> list[Tensor]:
        """`predict` for the faces of several images in one pass: ``boxes[i]`` are in ``greys[i]``.

        The cascade's cost is mostly per call, not per face, so a batch of photos costs about what
        one does (the cloak and the evaluator align hundreds at once). ``origins[i]``: where
        ``greys[i]`` lies in a larger photo whose coordinates ``boxes[i]`` and the points are in (a
        cut-out of it; pixels outside the cut-out read as outside the image).

        Returns:
            One ``(N_i, P, 2)`` tensor per image, as `predict` gives it.
        """
        if len(greys) != len(boxes):
            raise InvalidInputError(f"{len(greys)} images but {len(boxes)} box sets")
        pixels = [_grey_array(grey) for grey in greys]
        box_arrays = [_box_array(b) for b in boxes]
        counts = [len(b) for b in box_arrays]
        sizes = np.array([p.size for p in pixels], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        flat = np.concatenate([p.reshape(-1) for p in pixels]) if pixels else np.zeros(0, np.float32)
        owner = np.repeat(np.arange(len(pixels)), counts)
        shapes = np.array([p.shape for p in pixels], dtype=np.int64).reshape(-1, 2)
        every_box = np.concatenate(box_arrays) if box_arrays else np.zeros((0, 4))
        corners = np.array(origins if origins is not None else [(0, 0)] * len(pixels), dtype=np.float64)
        if corners.shape != (len(pixels), 2):
            raise InvalidInputError(f"{len(greys)} images but origins of shape {corners.shape}")
        points = self._predict_array(
            flat, starts[owner], shapes[owner, 1], shapes[owner, 0], every_box, round_to_pixel, corners[owner]
        )
        out = []
        for b, part in zip(boxes, np.split(points, np.cumsum(counts)[:-1])):
            like = b if isinstance(b, Tensor) and b.is_floating_point() else None
            dtype = like.dtype if like is not None else torch.float32
            device = b.device if isinstance(b, Tensor) else torch.device("cpu")
            out.append(torch.from_numpy(np.ascontiguousarray(part)).to(device=device, dtype=dtype))
        return out

    def _predict_array(
        self,
        flat_pixels: np.ndarray,
        starts: np.ndarray,
        widths: np.ndarray,
        heights: np.ndarray,
        boxes: np.ndarray,
        round_to_pixel: bool,
        origins: np.ndarray,
    ) -> np.ndarray:
        """`predict` on float32 images laid end to end in ``flat_pixels``; float64 ``(N, P, 2)`` result.

        Face n reads the ``heights[n] x widths[n]`` image that starts at ``flat_pixels[starts[n]]``,
        whose top-left pixel is pixel ``origins[n]`` (x, y) of the photo ``boxes[n]`` is in.
        """
        count = len(boxes)
        width, height = widths.astype(np.float64), heights.astype(np.float64)
        # Work in (feature or tree, face) layout: gathers then copy contiguous rows of N values.
        left, top = boxes[:, 0], boxes[:, 1]  # (N,) float64: where the normalised (0, 0) goes
        span_x, span_y = boxes[:, 2] - left, boxes[:, 3] - top  # and (1, 1) - (0, 0)
        shape = np.repeat(self.initial_shape[:, :, None], count, axis=2)  # (P, 2, N) float32
        _, num_trees, num_splits = self.split_thresholds.shape
        split_start = (np.arange(num_trees)[:, None] * num_splits) * count + np.arange(count)  # (T, N)
        leaf_start = np.arange(num_trees)[:, None] * (num_splits + 1) - num_splits  # (T, 1)
        weights = _similarity_weights(self.initial_shape)
        for cascade in range(self.num_cascades):
            # feature pixels: anchor + similarity(mean -> current) * delta, in float32 as dlib
            linear = _similarity_linear(weights, shape).astype(np.float32)  # (2, 2, N)
            anchors = shape[self.anchor_idx[cascade]]  # (F, 2, N)
            delta_x, delta_y = self.deltas[cascade, :, 0, None], self.deltas[cascade, :, 1, None]  # (F, 1)
            x = linear[0, 0] * delta_x
            x += linear[0, 1] * delta_y
            x += anchors[:, 0]
            y = linear[1, 0] * delta_x
            y += linear[1, 1] * delta_y
            y += anchors[:, 1]
            column = np.floor(x.astype(np.float64) * span_x + left + 0.5) - origins[:, 0]  # dlib's point()
            row = np.floor(y.astype(np.float64) * span_y + top + 0.5) - origins[:, 1]  # rounds half up
            inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
            index = np.where(inside, starts + row * width + column, 0).astype(np.int64)
            features = np.where(inside, flat_pixels[index], np.float32(0))  # (F, N) float32

            # every split of every tree, then depth steps down each tree: left (2i + 1) if true
            first = features[self.split_pixels[cascade, 0]]  # (T * S, N)
            second = features[self.split_pixels[cascade, 1]]
            go_left = (first - second > self.split_thresholds[cascade].reshape(-1, 1)).reshape(-1)
            node = np.zeros((num_trees, count), dtype=np.int64)
            for _ in range(self.tree_depth):
                node = 2 * node + 2 - go_left[split_start + node * count]
            updates = self.leaf_values[cascade][leaf_start + node]  # (T, N, P, 2)
            # dlib adds the trees' updates one after another in float32: accumulate, don't sum
            steps = np.concatenate([shape.transpose(2, 0, 1)[None], updates])
            shape = np.add.accumulate(steps, axis=0, dtype=np.float32)[-1].transpose(1, 2, 0)

        shape = shape.transpose(2, 0, 1)  # (N, P, 2)
        origin = boxes[:, None, :2]
        span = boxes[:, None, 2:] - origin
        points = shape.astype(np.float64) * span + origin
        return np.floor(points + 0.5) if round_to_pixel else points


def _similarity_weights(from_shape: np.ndarray) -> np.ndarray | None:
    """``(2, 2P)`` weights giving the similarity from ``from_shape`` ``(P, 2)`` (see `_similarity_linear`).

    The least-squares rotation-and-scale ``[[a, -b], [b, a]]`` from centred points ``s`` to
    centred points ``t`` is ``a = sum(s . t) / |s|^2``, ``b = sum(s x t) / |s|^2``: two dot
    products with fixed weights when ``s`` is the mean shape. ``None`` where dlib uses the
    identity (one point, or all points equal).
    """
    source = from_shape.astype(np.float64)
    source = source - source.mean(axis=0)
    norm = np.square(source).sum()
    if len(source) == 1 or norm == 0:
        return None
    dot = source.reshape(-1)
    cross = np.stack([-source[:, 1], source[:, 0]], axis=1).reshape(-1)
    return np.stack([dot, cross]) / norm


def _similarity_linear(weights: np.ndarray | None, to_shape: np.ndarray) -> np.ndarray:
    """Linear part ``(2, 2, N)`` of the least-squares similarity from the mean shape to ``(P, 2, N)``.

    dlib (``find_tform_between_shapes``) uses Umeyama's SVD formulas in double precision; in 2-D
    the optimum has the closed form of `_similarity_weights`, equal to Umeyama's up to double
    rounding, far below the float32 dlib casts the result to.
    """
    parts, _, count = to_shape.shape
    linear = np.empty((2, 2, count))
    if weights is None:  # dlib: the identity
        linear[:] = np.eye(2)[:, :, None]
        return linear
    target = to_shape.astype(np.float64)
    target -= target.sum(axis=0) / parts
    a, b = weights @ target.reshape(2 * parts, count)
    linear[0, 0], linear[0, 1], linear[1, 0], linear[1, 1] = a, -b, b, a
    return linear


def _grey_array(grey: np.ndarray | Tensor) -> np.ndarray:
    """Check a 2-D grey image on the 0..255 scale and return it as a contiguous float32 array."""
    array = grey.detach().cpu().numpy() if isinstance(grey, Tensor) else np.asarray(grey)
    if array.ndim != 2 or min(array.shape) == 0:
        raise InvalidInputError(f"grey must be a non-empty (H, W) image, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
            raise InvalidInputError(f"grey must hold numbers, got {array.dtype}")
        if array.min() < 0 or array.max() > 255:
            raise InvalidInputError("grey must hold grey levels in 0..255 (dlib's scale)")
    return np.ascontiguousarray(array, dtype=np.float32)


def _box_array(boxes: np.ndarray | Tensor) -> np.ndarray:
    """Check ``(N, 4)`` finite boxes and return them as a float64 array."""
    array = (
        boxes.detach().cpu().double().numpy() if isinstance(boxes, Tensor) else np.asarray(boxes, np.float64)
    )
    if array.ndim != 2 or array.shape[1] != 4:
        raise InvalidInputError(f"boxes must have shape (N, 4), got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidInputError("boxes must be finite")
    return array


# --------------------------------------------------------------------------------------------------
# reading the .dat file


def locate_shape_predictor(filename: str = DLIB_SHAPE_PREDICTOR_5_FILENAME) -> Path | None:
    """Find ``filename`` inside the installed ``face_recognition_models`` package, if any."""
    return locate_package_model(filename)


def load_shape_predictor(path: Path | str | None = None, *, cache: bool = True) -> ShapePredictor:
    """Read a dlib shape predictor file (5-point by default; the 68-point file works too).

    The file is replayed as dlib's ``serialize(shape_predictor)`` wrote it: version (1), the
    mean shape (``matrix<float,0,1>``, x and y interleaved), the forests
    (``vector<vector<regression_tree>>``, a tree being its splits ``{idx1, idx2, thresh}`` then
    its leaf values), then per cascade the pixels' anchor landmarks (``vector<vector<unsigned
    long>>``) and offsets (``vector<vector<vector<float,2>>>``). Parsing the 5-point file takes
    about 4 s of CPU (pure Python; the 68-point file, 11 times larger, proportionally longer), so
    the parsed arrays are cached on disk (`facecloak.models.parsed_cache`, keyed by the file's
    size, modification time and SHA-256) and later loads take milliseconds.

    Args:
        path: the ``.dat`` file; default `DLIB_SHAPE_PREDICTOR_5_FILENAME` from the installed
            ``face_recognition_models`` package.
        cache: read and write the parsed-model cache (False: always parse the file).

    Returns:
        The predictor.

    Raises:
        ModelNotFoundError: no file, or one that is truncated or not a complete shape predictor
            (one line naming the file).

    Example:
        >>> load_shape_predictor()  # doctest: +SKIP
        ShapePredictor(parts=5, cascades=15, trees=500, depth=4, pixels=800)

    """
    if path is None:
        path = locate_shape_predictor()
        if path is None:
            raise ModelNotFoundError(
                f"dlib's {DLIB_SHAPE_PREDICTOR_5_FILENAME} not found: install face-recognition-models "
                "or pass the file's path"
            )
    if not cache:
        return _parse_shape_predictor(Path(path))
    return load_parsed(
        path,
        SHAPE_PREDICTOR_CACHE_FORMAT,
        lambda source: _parse_shape_predictor(source).to_arrays(),
        ShapePredictor.from_arrays,
    )


def _parse_shape_predictor(path: Path) -> ShapePredictor:
    """Replay the ``.dat`` file (see `load_shape_predictor`)."""
    reader = DlibReader.from_file(path)
    reader.expect_int(SHAPE_PREDICTOR_VERSION, what="the shape_predictor version")
    initial = reader.read_column_vector()
    if initial.size == 0 or initial.size % 2:
        reader.fail(f"mean shape of {initial.size} values, expected a positive even number")

    def read_split() -> tuple[int, int, float]:
        return (
            reader.read_uint("a split's idx1"),
            reader.read_uint("a split's idx2"),
            reader.read_float("a threshold"),
        )

    def read_tree() -> tuple[list[tuple[int, int, float]], list[np.ndarray]]:
        splits = reader.read_list(read_split, "a tree's splits")
        return splits, reader.read_list(reader.read_column_vector, "a tree's leaf values")

    forests = reader.read_list(lambda: reader.read_list(read_tree, "a forest"), "the forests")
    anchor_idx = reader.read_list(lambda: reader.read_list(reader.read_uint, "anchor indices"), "the anchors")
    deltas = reader.read_list(lambda: reader.read_list(reader.read_point2, "deltas"), "the deltas")
    reader.expect_end()
    return _assemble(initial.reshape(-1, 2), forests, anchor_idx, deltas, reader)


def _assemble(
    initial: np.ndarray,
    forests: list[list[tuple[list[tuple[int, int, float]], list[np.ndarray]]]],
    anchor_idx: list[list[int]],
    deltas: list[list[tuple[float, float]]],
    reader: DlibReader,
) -> ShapePredictor:
    """Check the parsed structure against dlib's requirements and pack it into dense arrays."""

    def fail(reason: str) -> NoReturn:
        raise ModelNotFoundError(f"not a usable dlib shape predictor: {reason}", reader.path)

    parts = len(initial)
    if not forests or len(forests) != len(anchor_idx) or len(forests) != len(deltas):
        fail(f"{len(forests)} forests, {len(anchor_idx)} anchor lists and {len(deltas)} delta lists")
    num_trees = len(forests[0])
    num_pixels = len(anchor_idx[0])
    num_splits = len(forests[0][0][0]) if num_trees else 0
    if num_trees == 0 or num_pixels == 0 or (num_splits + 1) & num_splits:
        fail(f"{num_trees} trees of {num_splits} splits over {num_pixels} pixels in the first cascade")
    for cascade, forest in enumerate(forests):
        if (
            len(forest) != num_trees
            or len(anchor_idx[cascade]) != num_pixels
            or len(deltas[cascade]) != num_pixels
        ):
            fail(f"cascade {cascade} differs in size from the first (only uniform cascades are supported)")
        for splits, leaves in forest:
            if len(splits) != num_splits or len(leaves) != num_splits + 1:
                fail(f"cascade {cascade} has a tree of {len(splits)} splits and {len(leaves)} leaves")
            if any(leaf.size != 2 * parts for leaf in leaves):
                fail(f"cascade {cascade} has a leaf that does not hold {parts} points")
    try:  # an index past int64 (a corrupt file) raised OverflowError, a traceback
        splits = np.array(
            [[[s[:2] for s in tree[0]] for tree in forest] for forest in forests], dtype=np.int64
        )
        anchors = np.array(anchor_idx, dtype=np.int64)
    except OverflowError:
        fail("a split or anchor index out of range")
    thresholds = np.array(
        [[[s[2] for s in tree[0]] for tree in forest] for forest in forests], dtype=np.float32
    )
    leaves = np.stack([np.stack([np.stack(tree[1]) for tree in forest]) for forest in forests])
    if splits.max() >= num_pixels or anchors.max() >= parts:
        fail("a split or anchor index out of range")
    return ShapePredictor(
        initial_shape=np.ascontiguousarray(initial, dtype=np.float32),
        split_pixels=np.ascontiguousarray(splits.reshape(len(forests), -1, 2).transpose(0, 2, 1)),
        split_thresholds=thresholds,
        leaf_values=leaves.reshape(len(forests), -1, parts, 2).astype(np.float32),
        anchor_idx=anchors,
        deltas=np.array(deltas, dtype=np.float32),
    )


# --------------------------------------------------------------------------------------------------
# on facecloak images and MTCNN boxes


@functools.lru_cache(maxsize=1)
def default_shape_predictor() -> ShapePredictor:
    """Dlib's 5-point predictor from its package, loaded once per process and shared.

    An explicit, documented cache (the predictor is read-only numpy arrays, the same on every
    device): `dlib_landmarks` uses it when no ``predictor`` is passed;
    ``default_shape_predictor.cache_clear()`` drops it. After the first run it loads from the
    parsed-model cache (`facecloak.models.parsed_cache`).
    """
    return load_shape_predictor()


def dlib_grey(image: Tensor) -> Tensor:
    """Grey levels 0..255 of a ``(3, H, W)`` [0, 1] image, as dlib sees its 8-bit RGB version.

    The image is first quantised to uint8 as it would be saved (``round(255 x)``, like
    `facecloak.io.to_uint8`), then averaged as dlib's ``get_pixel_intensity`` does for an RGB
    pixel: ``(r + g + b) // 3`` in integers (not a luma-weighted sum).

    Returns:
        ``(H, W)`` uint8 tensor on the image's device.

    Example:
        >>> dlib_grey(torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)).item()
        170

    """
    check_images(image.detach()[None])
    # in float: sums of three levels (at most 765) and their thirds, floored, are exact there,
    # and the integer sum and floor division took 4x as long (0.1 s for a 5 MP face region)
    return levels_8bit(image).sum(dim=0).div_(3).floor_().to(torch.uint8)


def dlib_landmarks(
    image: Tensor, boxes: Tensor, *, predictor: ShapePredictor | None = None, round_to_pixel: bool = False
) -> Tensor:
    """Find dlib's 5 landmarks for the faces in ``boxes`` of one RGB image, without dlib.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        boxes: ``(N, 4)`` dlib rectangles ``(left, top, right, bottom)``; for MTCNN's boxes,
            map them first with `mtcnn_box_to_dlib`.
        predictor: default `default_shape_predictor()`, dlib's 5-point model loaded once.
        round_to_pixel: round to integer pixels as dlib does (see `ShapePredictor.predict`).

    Returns:
        ``(N, P, 2)`` points (``P = 5`` for the default model) in dlib's order (eye corners,
        nose base; see the module's docstring), in image pixels, dtype and device of ``boxes``.

    Example:
        >>> faces = detect_faces(image[None])  # doctest: +SKIP
        >>> dlib_landmarks(image, mtcnn_box_to_dlib(faces.boxes)).shape  # doctest: +SKIP
        torch.Size([1, 5, 2])

    """
    return dlib_landmarks_many([image], [boxes], predictor=predictor, round_to_pixel=round_to_pixel)[0]


def dlib_landmarks_many(
    images: Sequence[Tensor],
    boxes: Sequence[Tensor],
    *,
    predictor: ShapePredictor | None = None,
    round_to_pixel: bool = False,
) -> list[Tensor]:
    """`dlib_landmarks` for several RGB images at once (``boxes[i]`` in ``images[i]``), in one pass.

    The grey conversion runs on each image's device; only the grey levels come to the CPU.
    """
    for image in images:
        if image.ndim != 3:
            raise InvalidInputError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    model = predictor if predictor is not None else default_shape_predictor()
    greys, faces, origins, counts = [], [], [], []
    for image, image_boxes in zip(images, boxes):
        array = torch.as_tensor(image_boxes, dtype=torch.float64).reshape(-1, 4).cpu()
        counts.append(len(array))
        for box in array:  # each face reads only the pixels around it
            x0, y0, x1, y1 = _region_around(box, image.shape[-2:])
            greys.append(dlib_grey(image[:, y0:y1, x0:x1]).cpu())
            faces.append(box[None])
            origins.append((x0, y0))
    found = model.predict_many(greys, faces, round_to_pixel=round_to_pixel, origins=origins)
    out, start = [], 0
    for image_boxes, count in zip(boxes, counts):
        like = image_boxes if isinstance(image_boxes, Tensor) and image_boxes.is_floating_point() else None
        device = image_boxes.device if isinstance(image_boxes, Tensor) else torch.device("cpu")
        points = torch.cat(found[start : start + count]) if count else torch.zeros(0, model.num_parts, 2)
        out.append(points.to(device=device, dtype=like.dtype if like is not None else torch.float32))
        start += count
    return out


LANDMARK_REGION_MARGIN = 0.75
"""Each face's landmarks are read from a grey image cut around its box, this many box sides beyond
it on every side (clamped to the photo), so a large photo is not converted to grey levels and
copied whole at every call (a 12 MP photo with 4 faces: 0.29-0.39 -> 0.03 s). The cascade reads pixels
at a landmark plus an offset of at most half a box (the 5-point model's offsets, all inside its
mean shape's box): 0.4 gave the same points to the last bit as the whole photo on 342 LFW and
sample faces (0.3: 3 faces moved, by up to 0.74 px), and 0.75 leaves room for a landmark a
quarter of a box outside its box."""


def _region_around(box: Tensor, size: Sequence[int]) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the part of an image of ``size`` (H, W) the predictor reads for ``box``."""
    height, width = int(size[0]), int(size[1])
    left, top, right, bottom = (float(v) for v in box)
    margin = LANDMARK_REGION_MARGIN * max(right - left, bottom - top, 1.0)
    x0 = min(max(0, math.floor(left - margin)), width - 1)
    y0 = min(max(0, math.floor(top - margin)), height - 1)
    x1 = max(min(width, math.ceil(right + margin) + 1), x0 + 1)
    y1 = max(min(height, math.ceil(bottom + margin) + 1), y0 + 1)
    return x0, y0, x1, y1


def mtcnn_box_to_dlib(boxes: Tensor) -> Tensor:
    """Map MTCNN boxes ``(x1, y1, x2, y2)`` to the rectangle dlib's HOG detector would give.

    dlib's predictor was trained on its HOG detector's boxes, which are square, tighter than
    MTCNN's and sit lower on the face; started from an MTCNN box as is, it lands several pixels
    off. The map scales the box about its centre and shifts the centre, in units of MTCNN's
    width and height (`MTCNN_TO_DLIB_BOX`).

    Args:
        boxes: ``(N, 4)`` MTCNN boxes in pixels.

    Returns:
        ``(N, 4)`` ``(left, top, right, bottom)`` for `ShapePredictor.predict`, fractional.

    Example:
        >>> mtcnn_box_to_dlib(torch.tensor([[10.0, 20.0, 110.0, 140.0]])).shape
        torch.Size([1, 4])

    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidInputError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2 + MTCNN_TO_DLIB_BOX[0] * width
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2 + MTCNN_TO_DLIB_BOX[1] * height
    half_x = MTCNN_TO_DLIB_BOX[2] * width / 2
    half_y = MTCNN_TO_DLIB_BOX[3] * height / 2
    return torch.stack([centre_x - half_x, centre_y - half_y, centre_x + half_x, centre_y + half_y], dim=1)
