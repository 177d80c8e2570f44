"""The after-upload check's pieces on hand-made faces: region boxes, overlaps, matching, DSSIM cap."""

from __future__ import annotations

import pytest
import torch

from facecloak import quality
from facecloak.cloak.budget import enforce_dssim
from facecloak.cloak.verify import (
    DISTANCE_AFTER_UPLOAD_KEY,
    FOUND_AFTER_UPLOAD_KEY,
    REDETECT_IOU,
    VERIFY_JPEG_QUALITY,
    match_redetected,
)
from facecloak.errors import EXIT_FAILED, EXIT_USAGE, InvalidInputError, ModelNotFoundError, UnknownModelError
from facecloak.faces import Faces, box_iou, boxes_overlap, face_regions
from facecloak.io import read_image
from facecloak.models import get_card


def faces_at(boxes: list[list[float]], image_index: list[int]) -> Faces:
    n = len(boxes)
    return Faces(torch.tensor(boxes), torch.zeros(n, 5, 2), torch.ones(n), torch.tensor(image_index))


def test_face_regions_scale_about_the_centre_and_clip_only_when_asked():
    faces = faces_at([[10.0, 10.0, 30.0, 50.0]], [0])
    assert face_regions(faces, 1.5).tolist() == [[5.0, 0.0, 35.0, 60.0]]
    assert face_regions(faces, 2.0).tolist() == [[0.0, -10.0, 40.0, 70.0]]
    assert face_regions(faces, 2.0, (40, 100)).tolist() == [[0.0, 0.0, 40.0, 39.0]]


def test_box_iou_and_overlap():
    box = torch.tensor([0.0, 0.0, 2.0, 2.0])
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert box_iou(box, boxes).tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert boxes_overlap(box, boxes).tolist() == [True, True, False]


def test_match_redetected_takes_the_best_overlap_in_the_same_photo():
    faces = faces_at([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]], [0, 0, 1])
    found = faces_at(
        [[1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0], [21.0, 40.0, 31.0, 50.0]],
        [0, 0, 0, 1],
    )
    matched, is_found = match_redetected(faces, found)
    assert matched.tolist() == [2, -1, -1]  # exact box wins; a box in photo 1 is no match for photo 0
    assert is_found.tolist() == [True, False, False]
    assert 0 < REDETECT_IOU < 1


def test_match_redetected_pairs_one_face_with_one_detection():
    """Two overlapping faces, one of them no longer detected: each face matched its own best
    overlap, so both took the one detection left, and the lost face was read through its
    neighbour's chip (found again, and far from its person). One to one, best overlap first."""
    faces = faces_at([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]], [0, 0])
    found = faces_at([[4.0, 0.0, 14.0, 10.0]], [0])  # only the second face is found again
    assert box_iou(faces.boxes[0], found.boxes).tolist()[0] >= REDETECT_IOU  # it overlaps the first too
    matched, is_found = match_redetected(faces, found)
    assert matched.tolist() == [-1, 0] and is_found.tolist() == [False, True]


def test_record_keys_follow_the_verify_quality():
    assert DISTANCE_AFTER_UPLOAD_KEY == f"distance_after_jpeg{VERIFY_JPEG_QUALITY}"
    assert FOUND_AFTER_UPLOAD_KEY == f"found_after_jpeg{VERIFY_JPEG_QUALITY}"


def test_enforce_dssim_scales_only_faces_over_the_cap():
    generator = torch.Generator().manual_seed(0)
    crops = torch.rand(2, 3, 24, 24, generator=generator) * 0.5 + 0.25
    masks = torch.ones(2, 1, 24, 24)
    delta = torch.stack([torch.full((3, 24, 24), 0.001), torch.randn(3, 24, 24, generator=generator) * 0.1])
    boxes = torch.tensor([[0, 0, 24, 24], [0, 0, 24, 24]])
    cap = 0.01
    limited = enforce_dssim(crops, masks, delta, boxes, cap)
    after = quality.box_dssim(crops, (crops + limited).clamp(0, 1), boxes)
    assert torch.equal(limited[0], delta[0])  # already within the cap: untouched
    assert float(after[1]) <= cap and float(after[1]) > 0.5 * cap  # scaled down, not to nothing


def test_errors_carry_their_exit_code():
    assert InvalidInputError("x").exit_code == EXIT_USAGE
    assert ModelNotFoundError("x").exit_code == EXIT_FAILED
    with pytest.raises(UnknownModelError) as info:
        get_card("no-such-model")
    assert isinstance(info.value, ModelNotFoundError) and info.value.exit_code == EXIT_USAGE


def test_the_check_looks_only_for_faces_large_enough_to_match_a_cloaked_one(samples_dir, detector):
    """The re-detection skips the pyramid's finest levels: no smaller face could reach REDETECT_IOU."""
    from facecloak.cloak.verify import REDETECT_SIZE_SHARE, _recompress, redetect
    from facecloak.detect import MIN_FACE_PX, FaceDetector
    from facecloak.io import read_image

    photos = [read_image(samples_dir / name).pixels for name in ("astronaut.jpg", "group.jpg")]
    faces = detector(photos)
    asked: list[int | None] = []

    class Recording(FaceDetector):
        def __call__(self, images, *, min_size=None, **turns):
            asked.append(min_size)
            return super().__call__(images, min_size=min_size, **turns)

    again = redetect(Recording(device="cpu"), _recompress(photos), faces)
    smallest = float((faces.boxes[:, 2:] - faces.boxes[:, :2]).amin())
    assert asked == [int(REDETECT_SIZE_SHARE * smallest)] and asked[0] > MIN_FACE_PX
    # a box of this share of a face's side covers less than REDETECT_IOU of it: it could not match
    assert REDETECT_SIZE_SHARE**2 < REDETECT_IOU
    _, found = match_redetected(faces, again)
    assert bool(found.all())  # every cloaked-size face is still found after the JPEG re-encode
    # a detector that takes no size hint is called as it is
    plain = redetect(lambda images: detector(images), photos, faces)
    assert len(plain) >= len(faces)


def test_a_face_under_the_detectors_min_size_is_looked_for_again_not_counted_protected(lfw_dir, dlib_resnet):
    """A 16 px face (found with a lower --min-face) was never looked for by the check's detector
    (its own min_size, 20 px, was the floor): an unchanged face counted protected, exit code 0."""
    import numpy as np
    from PIL import Image

    from facecloak.cloak import create_cloak
    from facecloak.detect import FaceDetector

    face = Image.open(lfw_dir / "images" / "Aaron_Sorkin" / "Aaron_Sorkin_0001.jpg")
    face = face.resize((40, 40), Image.LANCZOS)
    canvas = Image.new("RGB", (160, 160), (128, 128, 128))
    canvas.paste(face, (60, 60))
    photo = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
    faces = FaceDetector(device="cpu", min_size=8, rotations="none")([photo])
    assert len(faces) == 1 and float((faces.boxes[0, 2:] - faces.boxes[0, :2]).amin()) < 20
    check = FaceDetector(device="cpu", rotations="none")  # the cloak's own: min_size 20
    result = create_cloak("untargeted", [dlib_resnet], steps=0, detector=check)([photo], faces)
    assert torch.equal(result.images[0], photo)  # no step: the face is as it was
    assert result.found_after_jpeg.tolist() == [True]
    assert result.protected.tolist() == [False]


def test_a_face_found_under_the_check_s_min_score_is_looked_for_again_not_counted_protected(
    lfw_dir, dlib_resnet
):
    """A face found with a lower --threshold (0.83 here) was looked for after the upload at the check
    detector's own 0.9: not found, it counted protected, even unchanged."""
    from facecloak.cloak import create_cloak
    from facecloak.detect import FaceDetector

    photo = read_image(lfw_dir / "images" / "Mickey_Rooney" / "Mickey_Rooney_0001.jpg").pixels
    faces = FaceDetector(device="cpu", min_score=0.5, rotations="none")([photo])
    low = [k for k, score in enumerate(faces.scores.tolist()) if score < 0.9]
    assert low, faces.scores
    check = FaceDetector(device="cpu", rotations="none")  # the cloak's own: min_score 0.9
    result = create_cloak("untargeted", [dlib_resnet], steps=0, detector=check)([photo], faces)
    assert torch.equal(result.images[0], photo)  # no step: every face is as it was
    assert result.found_after_jpeg.tolist() == [True] * len(faces)
    assert result.protected.tolist() == [False] * len(faces)
