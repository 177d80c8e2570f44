"""Reading and writing photos: the only package that touches files, PIL, uint8 and EXIF.

Everything past this package sees a (3, H, W) float32 RGB tensor in [0, 1]. Reading applies the
EXIF orientation, converts CMYK, palette, grey, 16-bit and alpha images, and turns every kind of
bad file (missing, empty, truncated, not an image, too many pixels) into an `ImageReadError`
whose message is one line naming the file. Writing is atomic (temporary file in the target
folder, then `os.replace`), never replaces an input, and drops EXIF (GPS above all) unless asked.
A photo with transparency bound for a format without alpha is composited onto white
(`for_output`); an animation or multi-page file is read and written as its first frame, and
every output says so. A JPEG written from a JPEG keeps every 8x8 block the protection did not
touch bit for bit (`facecloak.jpeg_blocks`); other formats are written losslessly where they were lossless.

Modules: `read` (decoding, pixel limit, `LoadedImage`), `write` (encoding, metadata, atomic
writes), `files` (suffixes, folder walking, output names). Every public name is re-exported
here; a constant such as `MAX_IMAGE_PIXELS` is read where it is defined (``facecloak.io.read``),
so patch it there.
"""

from __future__ import annotations

from facecloak.io.files import (
    IMAGE_SUFFIXES,
    INSIDE_THE_OUTPUT_FOLDER,
    OUTPUT_FORMATS,
    ImageJob,
    ProtectedFiles,
    collect_images,
    output_path,
    output_suffix,
    same_file,
)
from facecloak.io.read import (
    HEIF_AVAILABLE,
    MAX_IMAGE_PIXELS,
    LoadedImage,
    looks_like,
    max_pixels_default,
    probe_image,
    probe_image_bytes,
    read_image,
    read_image_bytes,
)
from facecloak.io.write import (
    ALPHA_FORMATS,
    JPEG_QUALITY,
    LOSSY_FORMATS,
    as_written,
    encode_image,
    for_output,
    jpeg_roundtrip,
    jpeg_roundtrip_changed,
    make_private_folder,
    over_white,
    stored_as,
    strip_location,
    to_uint8,
    write_bytes_atomic,
    write_image,
)

__all__ = [
    "ALPHA_FORMATS",
    "HEIF_AVAILABLE",
    "LOSSY_FORMATS",
    "as_written",
    "IMAGE_SUFFIXES",
    "INSIDE_THE_OUTPUT_FOLDER",
    "JPEG_QUALITY",
    "MAX_IMAGE_PIXELS",
    "OUTPUT_FORMATS",
    "ImageJob",
    "LoadedImage",
    "ProtectedFiles",
    "collect_images",
    "encode_image",
    "for_output",
    "jpeg_roundtrip",
    "jpeg_roundtrip_changed",
    "looks_like",
    "make_private_folder",
    "max_pixels_default",
    "output_path",
    "output_suffix",
    "over_white",
    "probe_image",
    "probe_image_bytes",
    "read_image",
    "read_image_bytes",
    "same_file",
    "stored_as",
    "strip_location",
    "to_uint8",
    "write_bytes_atomic",
    "write_image",
]
