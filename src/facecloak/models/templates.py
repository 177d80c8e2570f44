"""Alignment templates and chip paddings: where the five landmarks land in each model's chip.

One place for every template, so `align`, the model cards and plug-ins read the same numbers and
dlib's padding formula is written once (`dlib_template_pixels`). Templates are tuples of five
``(x, y)`` chip pixels (integer values at pixel centres, as in `facecloak.align`), in the order of
`facecloak.faces.LANDMARK_NAMES` unless said otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import overload

from torch import Tensor

from facecloak._checks import is_finite_number
from facecloak.errors import InvalidInputError

Template = tuple[tuple[float, float], ...]

ARCFACE_TEMPLATE_112: Template = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
"""The standard 5-point ArcFace/insightface template for a 112x112 chip (MTCNN's five points)."""

ARCFACE_CHIP_SIZE_PX = 112
"""The chip side `ARCFACE_TEMPLATE_112` is given for."""

DLIB_CHIP_SIZE_PX = 150
"""Side of the chip dlib's face-recognition network takes (``input_rgb_image_sized<150>``)."""

DLIB_CHIP_PADDING = 0.25
"""Padding dlib's face-recognition example uses in ``get_face_chip``: the template occupies the
middle 1/1.5 of the chip (dlib's own default is 0.2)."""

DLIB_5POINT_TEMPLATE: Template = (
    (0.8596, 0.2135),
    (0.6461, 0.2290),
    (0.1206, 0.2137),
    (0.3341, 0.2291),
    (0.4901, 0.6278),
)
"""dlib's own template for its 5-point landmarks, in unpadded chip units (0..1 across the face).

In dlib's point order: the eye corners from the viewer's right (outer, inner of the right-hand eye,
outer, inner of the left-hand eye), then the bottom of the nose. These are eye *corners*, not the
eye centres of `facecloak.faces.LANDMARK_NAMES`, which is why `DLIB_CHIP_TEMPLATE_150` is fitted
separately. `dlib_template_pixels` turns them into chip pixels for a given padding.
"""

DLIB_CHIP_TEMPLATE_150: Template = (
    (48.024, 46.055),
    (102.339, 45.923),
    (74.821, 78.105),
    (51.122, 105.763),
    (98.983, 105.752),
)
"""Where left eye centre, right eye centre, nose tip, left and right mouth corner (viewer's left
first) land in dlib's 150 px chip: the alignment for other models that share dlib's chip (plug-ins
with ``--template dlib``); dlib-resnet itself aligns by dlib's own landmarks. Fitted by
``scripts/calibrate/fit_dlib_template.py``: the mean position of MTCNN's points inside dlib's own
chips of 1,191 LFW faces (eyes scatter ~2 px, nose and mouth ~6.5 px around it). Aligned this way
our embeddings have mean cosine 0.994 with dlib's whole pipeline."""


@overload
def dlib_template_pixels(template_units: Tensor, size: int, padding: float = DLIB_CHIP_PADDING) -> Tensor: ...
@overload
def dlib_template_pixels(
    template_units: Sequence[Sequence[float]], size: int, padding: float = DLIB_CHIP_PADDING
) -> Template: ...
def dlib_template_pixels(template_units, size, padding=DLIB_CHIP_PADDING):
    """Dlib's template in chip units -> chip pixels for a chip of ``size`` with ``padding``.

    dlib's ``get_face_chip`` puts a point ``p`` at ``(padding + p) / (1 + 2 * padding) * size``.
    Takes a tensor (returned as a tensor) or a tuple of points (returned as a `Template`).

    Example:
        >>> dlib_template_pixels(((0.0, 1.0),), 150)
        ((25.0, 125.0),)
    """
    if isinstance(template_units, Tensor):
        return (padding + template_units) / (1.0 + 2.0 * padding) * size
    return tuple(
        tuple((padding + value) / (1.0 + 2.0 * padding) * size for value in point)  # type: ignore[misc]
        for point in template_units
    )


DLIB_5POINT_TEMPLATE_150: Template = dlib_template_pixels(DLIB_5POINT_TEMPLATE, DLIB_CHIP_SIZE_PX)
"""dlib's 5-point template in pixels of its 150 px chip with padding 0.25 (what ``get_face_chip`` uses)."""


def scale_template(template: Template, factor: float) -> Template:
    """``template`` for a chip ``factor`` times as wide (the points scale about the top-left corner)."""
    return tuple((x * factor, y * factor) for x, y in template)


FACENET_TEMPLATE_160: Template = tuple((x * 160 / 112, y * 160 / 112) for x, y in ARCFACE_TEMPLATE_112)
"""ArcFace's template scaled to facenet's 160 px chip: close to the tight MTCNN crops it was trained on."""


def template_for(spec: str, input_size: int) -> Template:
    """Landmark template in chip pixels: "arcface", "dlib", or a JSON file of 5 [x, y] points.

    The named templates are scaled to ``input_size``; a file's points are taken as they are.
    """
    if spec == "arcface":
        return scale_template(ARCFACE_TEMPLATE_112, input_size / float(ARCFACE_CHIP_SIZE_PX))
    if spec == "dlib":
        return scale_template(DLIB_CHIP_TEMPLATE_150, input_size / float(DLIB_CHIP_SIZE_PX))
    path = Path(spec)
    try:
        points = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidInputError(
            f"template must be arcface, dlib or a JSON file of 5 points ({error})", path
        ) from None
    # every value checked, so a file of five numbers or of strings is this one-line error,
    # not a TypeError or ValueError traceback
    if not (
        isinstance(points, list)
        and len(points) == 5
        and all(isinstance(p, list) and len(p) == 2 and all(is_finite_number(v) for v in p) for p in points)
    ):
        raise InvalidInputError("template file must hold 5 [x, y] points in chip pixels", path)
    return tuple((float(x), float(y)) for x, y in points)
