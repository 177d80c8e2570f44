"""Measure what a cloaked (or anonymised) JPEG keeps of its original, on the samples and LFW photos.

    python scripts/check_jpeg_blocks.py [--lfw 50] [--method cloak|blur|pixelate|mask] [--level mid]
                                        [--out bench-results/check_jpeg_blocks.json]

For every photo: detect the faces, protect them, write the output as facecloak does (a JPEG
from a JPEG: block by block at the input's own quantisation, `facecloak.jpeg_blocks`), decode
input and output with the decoder facecloak reads with (PIL), and count the pixels that differ:

- outside the face region's blocks: the MCUs (8x8 or 16x16 pixel cells of the JPEG) that a face
  region (its detection box x1.3, the pixels a cloak or anonymiser may change) touches,
  dilated by one MCU when the chroma is subsampled (a decoder's smooth chroma upsampling
  reaches one pixel across an MCU border). facecloak's claim: 0 here, on every photo.
- outside the touched MCUs themselves (no dilation): how far that chroma upsampling spills.
- the same count for the whole photo re-encoded at quality 95 (what writing with PIL did before,
  and what ``--jpeg-quality 95`` still does), for comparison.

And the file size of input and output. Prints a table and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jpeglib
import numpy as np
import torch

from _bench import REPO, data_root, machine, write_json
from facecloak.anonymize import Anonymizer
from facecloak.cloak import create_cloak
from facecloak.detect import FaceDetector
from facecloak.io import read_image, to_uint8, write_image
from facecloak.models import create_embedder
from facecloak.protection import AnonymizeFaces, CloakFaces

REGION_SCALE = 1.3  # the face region the cloak and the anonymisers change, relative to the box


def lfw_photos(count: int) -> list[Path]:
    """``count`` LFW photos spread evenly over the sorted list (deterministic)."""
    files = sorted((data_root() / "lfw" / "images").glob("*/*.jpg"))
    if not files or count <= 0:
        return []
    picks = np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int)
    return [files[i] for i in picks]


def mcu_layout(path: Path) -> tuple[int, int, bool]:
    """(MCU height, MCU width, chroma subsampled) of a JPEG file."""
    jpeg = jpeglib.read_dct(str(path))
    factors = np.asarray(jpeg.samp_factor).reshape(-1, 2)
    return 8 * int(factors[:, 0].max()), 8 * int(factors[:, 1].max()), bool((factors != factors[0]).any())


def region_blocks(
    boxes: torch.Tensor, height: int, width: int, mcu: tuple[int, int], dilate: int
) -> np.ndarray:
    """(H, W) bool: whole MCUs touched by any face region (box x REGION_SCALE, +1 px), dilated."""
    mask = np.zeros((height, width), dtype=bool)
    mcu_h, mcu_w = mcu
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * REGION_SCALE
    for (cx, cy), (hx, hy) in zip(centre.tolist(), half.tolist()):
        x0, x1 = max(0, int(np.floor(cx - hx)) - 1), min(width - 1, int(np.ceil(cx + hx)) + 1)
        y0, y1 = max(0, int(np.floor(cy - hy)) - 1), min(height - 1, int(np.ceil(cy + hy)) + 1)
        if x1 < 0 or y1 < 0 or x0 >= width or y0 >= height:
            continue
        row0, row1 = max(0, y0 // mcu_h - dilate), y1 // mcu_h + dilate
        col0, col1 = max(0, x0 // mcu_w - dilate), x1 // mcu_w + dilate
        mask[row0 * mcu_h : (row1 + 1) * mcu_h, col0 * mcu_w : (col1 + 1) * mcu_w] = True
    return mask


def _shown(path: Path) -> str:
    """The photo's path relative to the repository or to the shared data folder."""
    for root in (REPO, data_root()):
        if path.resolve().is_relative_to(root.resolve()):
            return str(path.resolve().relative_to(root.resolve()))
    return str(path)


def measure(source: Path, output: Path, whole: Path, boxes: torch.Tensor, info: dict) -> dict:
    before = to_uint8(read_image(source).pixels)
    after = to_uint8(read_image(output).pixels)
    reencoded = to_uint8(read_image(whole).pixels)
    height, width = before.shape[:2]
    mcu_h, mcu_w, subsampled = mcu_layout(source)
    region = region_blocks(boxes, height, width, (mcu_h, mcu_w), 1 if subsampled else 0)
    tight = region_blocks(boxes, height, width, (mcu_h, mcu_w), 0)
    differs = (before != after).any(axis=2)
    differs_whole = (before != reencoded).any(axis=2)
    outside = int((~region).sum())
    return {
        "photo": _shown(source),
        "size": [width, height],
        "faces": len(boxes),
        "mcu": [mcu_h, mcu_w],
        "encoding": info.get("encoding"),
        "fallback": info.get("jpeg_fallback"),
        "mcus_reencoded": info.get("mcus_reencoded"),
        "mcus_total": info.get("mcus_total"),
        "pixels_outside_face_blocks": outside,
        "differing_outside_face_blocks": int((differs & ~region).sum()),
        "differing_outside_touched_mcus_undilated": int((differs & ~tight).sum()),
        "differing_in_face_blocks": int((differs & region).sum()),
        "whole_q95_differing_outside_face_blocks": int((differs_whole & ~region).sum()),
        "whole_q95_max_change_outside": int(
            np.abs(before.astype(int) - reencoded)[~region].max() if outside else 0
        ),
        "bytes_in": source.stat().st_size,
        "bytes_out": output.stat().st_size,
        "bytes_whole_q95": whole.stat().st_size,
    }


def protector_for(args, detector: FaceDetector):
    if args.method == "cloak":
        model = create_embedder("dlib-resnet", device=args.device)
        return CloakFaces(create_cloak("untargeted", [model], args.level, detector=detector))
    return AnonymizeFaces(Anonymizer(args.method))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw", type=int, default=50, help="LFW photos to add to the samples")
    parser.add_argument("--method", choices=["cloak", "blur", "pixelate", "mask"], default="cloak")
    parser.add_argument("--level", choices=["low", "mid", "high"], default="mid")
    parser.add_argument("--chunk", type=int, default=8, help="photos protected together")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "check_jpeg_blocks.json")
    args = parser.parse_args()

    photos = sorted((REPO / "samples").glob("*.jpg")) + lfw_photos(args.lfw)
    detector = FaceDetector(device=args.device)
    protector = protector_for(args, detector)
    rows = []
    with tempfile.TemporaryDirectory(prefix="facecloak-check-") as folder:
        for start in range(0, len(photos), args.chunk):
            chunk = photos[start : start + args.chunk]
            images = [read_image(path) for path in chunk]
            faces = detector([image.pixels for image in images]).to("cpu")
            outputs = protector.protect([image.pixels for image in images], faces).images
            for k, (path, image) in enumerate(zip(chunk, images)):
                output = Path(folder) / f"{start + k}_{path.stem}_{protector.tag}.jpg"
                whole = Path(folder) / f"{start + k}_{path.stem}_q95.jpg"
                info: dict = {}
                write_image(output, outputs[k], source=image, info=info)
                write_image(whole, outputs[k], source=image, jpeg_quality=95)
                rows.append(measure(path, output, whole, faces.for_image(k).boxes, info))
                row = rows[-1]
                print(
                    f"{row['photo']:<58} faces {row['faces']}  outside face blocks: "
                    f"{row['differing_outside_face_blocks']} differ (q95 re-encode: "
                    f"{row['whole_q95_differing_outside_face_blocks']})  "
                    f"bytes {row['bytes_in']} -> {row['bytes_out']}",
                    flush=True,
                )

    def total(key: str, subset=rows) -> int:
        return int(sum(row[key] for row in subset))

    groups = {
        "samples": [row for row in rows if row["photo"].startswith("samples")],
        "lfw": [row for row in rows if not row["photo"].startswith("samples")],
    }
    summary = {}
    for name, subset in groups.items():
        if not subset:
            continue
        outside = total("pixels_outside_face_blocks", subset)
        summary[name] = {
            "photos": len(subset),
            "faces": total("faces", subset),
            "block_edited": sum(row["encoding"] == "jpeg-blocks" for row in subset),
            "pixels_outside_face_blocks": outside,
            "differing_outside_face_blocks": total("differing_outside_face_blocks", subset),
            "differing_outside_touched_mcus_undilated": total(
                "differing_outside_touched_mcus_undilated", subset
            ),
            "whole_q95_differing_outside_face_blocks": total(
                "whole_q95_differing_outside_face_blocks", subset
            ),
            "whole_q95_share_outside_changed": round(
                total("whole_q95_differing_outside_face_blocks", subset) / max(1, outside), 4
            ),
            "bytes_in": total("bytes_in", subset),
            "bytes_out": total("bytes_out", subset),
            "bytes_whole_q95": total("bytes_whole_q95", subset),
            "size_change": round(total("bytes_out", subset) / total("bytes_in", subset) - 1, 4),
            "size_change_whole_q95": round(
                total("bytes_whole_q95", subset) / total("bytes_in", subset) - 1, 4
            ),
        }
    claim = all(row["differing_outside_face_blocks"] == 0 for row in rows)
    results = {
        "what": "pixels outside the face region's JPEG blocks that differ between input and output "
        "(decoded with PIL, as facecloak reads), and file sizes",
        "method": args.method,
        "level": args.level if args.method == "cloak" else None,
        "claim_holds": claim,
        "summary": summary,
        "photos": rows,
        "machine": machine(),
        "versions": {"jpeglib": jpeglib.__version__},
    }
    write_json(args.out, results)
    print(f"every pixel outside the face region's blocks identical on all {len(rows)} photos: {claim}")


if __name__ == "__main__":
    main()
