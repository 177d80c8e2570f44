"""facecloak: protect the faces in photos from face-search scrapers.

The pipeline is ``io -> detect -> align -> embed -> cloak | anonymize -> evaluate``; every stage
is a small function or module over (B, 3, H, W) float tensors in [0, 1]:

    >>> from facecloak import read_image, detect_faces, blur_faces  # doctest: +SKIP
    >>> image = read_image("samples/astronaut.jpg")
    >>> faces = detect_faces([image.pixels])
    >>> blurred = blur_faces(image.pixels[None], faces)
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    "write_image",
]
