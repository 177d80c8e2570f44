"""Input guards run at every public entry point; they always run and raise `InvalidInputError`."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from facecloak.defaults import MAX_SEED
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces


def is_whole_number(value: object) -> bool:
    """Whether ``value`` is an integer, and not a bool (``True`` is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is a finite int or float, and not a bool (JSON's ``true`` reads as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_range(name: str, value: object, low: float, high: float) -> float:
    """``value`` as a float if it is a finite number in [low, high], else a one-line error naming it.

    (NaN compares False with both bounds: it passed a plain ``low <= value <= high`` refusal.)
    """
    if not is_finite_number(value) or not low <= float(value) <= high:
        raise InvalidInputError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def check_images(images: object, name: str = "images") -> Tensor:
    """Check a (B, 3, H, W) floating tensor with values in [0, 1]; return it."""
    if not isinstance(images, Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInputError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating tensor in [0, 1], got {images.dtype}")
    if images.numel():
        low, high = torch.aminmax(images.detach())  # one pass (a 12 MP photo: 17 -> 9 ms)
        # written so that NaN (which min and max propagate) fails too: one NaN pixel spread over a
        # whole blurred face, and detection ran on it without a word
        if not (float(low) >= -1e-6 and float(high) <= 1 + 1e-6):
            raise InvalidInputError(f"{name} must hold finite values in [0, 1]")
    return images


def check_faces(faces: object, num_images: int) -> Faces:
    """Check that ``faces`` is a `Faces` whose image indices fit a batch of ``num_images``."""
    if not isinstance(faces, Faces):
        raise InvalidInputError(f"faces must be a facecloak.Faces, got {type(faces).__name__}")
    if len(faces) and (int(faces.image_index.min()) < 0 or int(faces.image_index.max()) >= num_images):
        raise InvalidInputError(f"faces.image_index must lie in [0, {num_images}) for this batch")
    return faces


def check_choice(value: str, choices: tuple[str, ...] | list[str], name: str) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidInputError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_seed(seed: int | None, name: str = "seed") -> int | None:
    """Check a seed lies in [0, `facecloak.defaults.MAX_SEED`] (None: a fresh draw each call)."""
    if seed is None:
        return None
    if not is_whole_number(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"{name} must be an integer from 0 to {MAX_SEED}; got {seed!r}")
    return int(seed)


def check_image_list(images: object, name: str = "images") -> list[Tensor]:
    """Check a (B, 3, H, W) batch or a sequence of (3, H_i, W_i) images; return them as a list.

    The one entry check of every stage that takes photos of different sizes together (detector,
    cloak, replacer, `facecloak.protection`), so each accepts ``Tensor | Sequence[Tensor]`` alike.
    """
    if isinstance(images, Tensor):
        check_images(images, name)
        return [images[i] for i in range(images.shape[0])]
    if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
        raise InvalidInputError(f"{name} must be a (B, 3, H, W) tensor or a list of (3, H, W) tensors")
    photos = list(images)
    for i, photo in enumerate(photos):
        if not isinstance(photo, Tensor):
            raise InvalidInputError(f"{name}[{i}] must be a torch.Tensor, got {type(photo).__name__}")
        # checked here, not as photo[None]: a (H, W, 3) photo was told it must be (B, 3, H, W), got
        # (1, H, W, 3), a shape it was never given, and a (1, 3, H, W) one, which is (B, 3, H, W)
        if photo.ndim != 3 or photo.shape[0] != 3:
            raise InvalidInputError(f"{name}[{i}] must have shape (3, H, W), got {tuple(photo.shape)}")
        check_images(photo[None], name=f"{name}[{i}]")
    return photos


def split_names(text: str | None) -> list[str]:
    """The entries of a comma-separated option, stripped, empty and repeated ones dropped ([] for None).

    Example:
        >>> split_names("dlib-resnet, mobileface,dlib-resnet")
        ['dlib-resnet', 'mobileface']
    """
    return list(dict.fromkeys(name.strip() for name in (text or "").split(",") if name.strip()))
