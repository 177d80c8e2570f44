"""facecloak: protect the faces in photos from face-search scrapers.

The pipeline is ``io -> detect -> align -> embed -> cloak | anonymize -> evaluate``; every stage
is a small function or module over (B, 3, H, W) float tensors in [0, 1]:

    >>> from facecloak import read_image, detect_faces, blur_faces  # doctest: +SKIP
    >>> image = read_image("samples/astronaut.jpg")  # doctest: +SKIP
    >>> faces = detect_faces([image.pixels])  # doctest: +SKIP
    >>> blurred = blur_faces(image.pixels[None], faces)  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Anonymizer": "facecloak.anonymize",
    "anonymize_faces": "facecloak.anonymize",
    "blur_faces": "facecloak.anonymize",
    "mask_faces": "facecloak.anonymize",
    "pixelate_faces": "facecloak.anonymize",
    "FaceDetector": "facecloak.detect",
    "detect_faces": "facecloak.detect",
    "FacecloakError": "facecloak.errors",
    "ImageReadError": "facecloak.errors",
    "ImageWriteError": "facecloak.errors",
    "InvalidInputError": "facecloak.errors",
    "ModelNotFoundError": "facecloak.errors",
    "Faces": "facecloak.faces",
    "LoadedImage": "facecloak.io",
    "read_image": "facecloak.io",
    "write_image": "facecloak.io",
    "tune_allocator": "facecloak._allocator",
}
"""Where each public name lives. They are imported on first use, so ``facecloak --help`` and the
commands that need no model do not wait for torch (about 3 s on a small machine)."""

if TYPE_CHECKING:
    from facecloak._allocator import tune_allocator
    from facecloak.anonymize import Anonymizer, anonymize_faces, blur_faces, mask_faces, pixelate_faces
    from facecloak.detect import FaceDetector, detect_faces
    from facecloak.errors import (
        FacecloakError,
        ImageReadError,
        ImageWriteError,
        InvalidInputError,
        ModelNotFoundError,
    )
    from facecloak.faces import Faces
    from facecloak.io import LoadedImage, read_image, write_image


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'facecloak' has no attribute {name!r}")


__all__ = [
    "Anonymizer",
    "FaceDetector",
    "Faces",
    "FacecloakError",
    "ImageReadError",
    "ImageWriteError",
    "InvalidInputError",
    "LoadedImage",
    "ModelNotFoundError",
    "anonymize_faces",
    "blur_faces",
    "detect_faces",
    "mask_faces",
    "pixelate_faces",
    "read_image",
    "tune_allocator",
    "write_image",
]
