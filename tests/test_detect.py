"""Face detection with MTCNN on the samples and on real LFW photos."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from facecloak.errors import InvalidInputError
from facecloak.faces import Faces
from facecloak.io import read_image

# Approximate boxes (x1, y1, x2, y2) of the faces in the bundled samples, checked by eye.
SAMPLE_BOXES = {
    "astronaut.jpg": [(181, 61, 268, 172)],
    "grace_hopper.jpg": [(174, 120, 356, 340)],
    "group.jpg": [(873, 85, 943, 173), (914, 423, 973, 495), (580, 96, 657, 196), (169, 158, 316, 344)],
}


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("name", sorted(SAMPLE_BOXES))
def test_finds_each_sample_face(detector, samples_dir, name):
    faces = detector([read_image(samples_dir / name).pixels])
    expected = SAMPLE_BOXES[name]
    assert len(faces) == len(expected)
    for box in expected:
        assert max(iou(box, found) for found in faces.boxes.tolist()) > 0.8
    assert bool((faces.scores > 0.99).all())
    # landmarks sit inside their box, eyes above the mouth, viewer's-left eye first
    for box, points in zip(faces.boxes, faces.landmarks):
        assert bool(((points >= box[:2] - 2) & (points <= box[2:] + 2)).all())
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
        assert points[:2, 1].max() < points[3:, 1].min()


def test_batch_equals_single(detector, samples_dir):
    images = [read_image(samples_dir / n).pixels for n in ("astronaut.jpg", "grace_hopper.jpg", "group.jpg")]
    images.append(images[0].flip(-1))  # same size as the first: one MTCNN batch for both
    batched = detector(images)
    assert batched.count_per_image(4) == [1, 1, 4, 1]
    for i, image in enumerate(images):
        single = detector([image])
        mine = batched.for_image(i)
        assert torch.allclose(mine.boxes, single.boxes, atol=1e-3)
        assert torch.allclose(mine.landmarks, single.landmarks, atol=1e-3)


def test_tensor_batch_and_list_agree(detector, samples_dir):
    image = read_image(samples_dir / "astronaut.jpg").pixels
    as_tensor = detector(torch.stack([image, image]))
    assert as_tensor.image_index.tolist() == [0, 1]
    assert torch.allclose(as_tensor.boxes[0], as_tensor.boxes[1])


def test_large_photo_is_downscaled_and_mapped_back(detector, samples_dir):
    image = read_image(samples_dir / "astronaut.jpg").pixels
    large = F.interpolate(image[None], size=(3000, 3000), mode="bilinear", align_corners=False)[0]
    faces = detector([large])
    assert len(faces) == 1
    expected = torch.tensor(SAMPLE_BOXES["astronaut.jpg"][0], dtype=torch.float32) * (3000 / 512)
    assert iou(expected.tolist(), faces.boxes[0].tolist()) > 0.8


def test_no_face_is_empty_not_none(detector):
    texture = torch.linspace(0, 1, 200 * 300).reshape(1, 200, 300).repeat(3, 1, 1)
    faces = detector([texture])
    assert isinstance(faces, Faces) and len(faces) == 0
    assert faces.landmarks.shape == (0, 5, 2)


@pytest.mark.parametrize("rotations", ["none", "all"])
@pytest.mark.parametrize("size", [(0, 40), (40, 0), (0, 0)])
def test_a_photo_without_pixels_holds_no_face_beside_one_that_does(detector, samples_dir, size, rotations):
    """A photo of no pixels passes the input check; its detection scale divided by its zero area
    and the whole batch failed with a ZeroDivisionError."""
    astronaut = read_image(samples_dir / "astronaut.jpg").pixels
    faces = detector([torch.zeros(3, *size), astronaut], rotations=rotations)
    assert faces.count_per_image(2) == [0, 1]


def test_thresholds_and_bad_input(detector, samples_dir):
    from facecloak.detect import FaceDetector

    group = read_image(samples_dir / "group.jpg").pixels
    assert len(FaceDetector(min_size=90)([group])) == 1  # only the big face is >= 90 px
    with pytest.raises(InvalidInputError):
        detector([torch.rand(3, 50, 50) * 3])
    with pytest.raises(InvalidInputError):
        FaceDetector(min_score=1.5)


def test_a_call_can_look_only_for_larger_faces(detector, samples_dir):
    """``min_size`` per call: the group's big face alone, found where the full pyramid finds it."""
    group = read_image(samples_dir / "group.jpg").pixels
    every = detector([group])
    sides = torch.minimum(every.boxes[:, 2] - every.boxes[:, 0], every.boxes[:, 3] - every.boxes[:, 1])
    big = detector([group], min_size=90)
    assert len(big) == int((sides >= 90).sum()) == 1
    # the same face (a coarser pyramid proposes other candidate boxes: O-Net settles a few px apart)
    assert iou(big.boxes[0].tolist(), every.boxes[int(sides.argmax())].tolist()) > 0.85
    assert detector.min_size < 90 and len(detector([group])) == len(every)  # the detector's own setting


def test_centre_face_found_in_lfw(detector, lfw_dir):
    """The subject (the face at the image centre) is found in >= 98% of 500 LFW photos."""
    files = sorted((lfw_dir / "images").glob("*/*.jpg"))
    random.Random(0).shuffle(files)
    files = files[:500]
    found = 0
    for start in range(0, len(files), 50):
        images = [read_image(f).pixels for f in files[start : start + 50]]
        faces = detector(images)
        for i in range(len(images)):
            boxes = faces.for_image(i).boxes
            inside = (boxes[:, 0] < 125) & (boxes[:, 2] > 125) & (boxes[:, 1] < 125) & (boxes[:, 3] > 125)
            found += bool(inside.any())
    assert found / len(files) >= 0.98, f"centre face found in {found}/{len(files)}"


def test_a_score_threshold_under_onets_own_finds_the_faces_scoring_between(lfw_dir):
    """``min_score`` under 0.7, MTCNN's last-stage threshold, finds the faces scoring between them.

    Until 2026-12-06 O-Net dropped every face under its own 0.7 before ``min_score`` was applied:
    ``--detect-threshold 0.5`` found nothing more than 0.7 did. Faces at 0.7 and over are the same.
    """
    from facecloak.detect import FaceDetector
    from facecloak.mtcnn import MTCNN_STAGE_THRESHOLDS

    onet = MTCNN_STAGE_THRESHOLDS[2]
    names = ("Amanda_Coetzer_0002", "Carla_Del_Ponte_0002")
    photos = [read_image(lfw_dir / "images" / n.rsplit("_", 1)[0] / f"{n}.jpg").pixels for n in names]
    low, usual = FaceDetector(min_score=0.5), FaceDetector(min_score=onet)
    found, above = low(photos), usual(photos)
    between = (found.scores >= 0.5) & (found.scores < onet)
    assert found.image_index[between].unique().tolist() == [0, 1]  # in each photo
    assert bool((found.scores >= 0.5).all())
    kept = found.select(found.scores >= onet)
    assert torch.equal(kept.image_index, above.image_index)
    assert torch.allclose(kept.boxes, above.boxes) and torch.allclose(kept.scores, above.scores)
    # facenet-pytorch's own stages (the reference backend) are told the same threshold
    reference = FaceDetector(min_score=0.5, backend="facenet-pytorch")(photos)
    assert torch.equal(reference.image_index, found.image_index)
    assert torch.allclose(reference.boxes, found.boxes, atol=1e-2)


def test_small_faces_in_a_large_photo_are_not_downscaled_out_of_reach(detector, samples_dir):
    """A photo over ``max_side`` keeps its ``min_size`` faces over P-Net's 12 px window.

    Downscaled to 1600 px on its longer side alone, a 6400 x 480 strip made its 40 px faces 10 px
    before the pyramid's first level: none was found (and 13 of 60 faces of 40 px in a 12 MP crowd).
    """
    from facecloak.detect import detection_scale

    image = read_image(samples_dir / "astronaut.jpg").pixels
    face = F.interpolate(image[None, :, 40:200, 150:300], size=(43, 40), mode="area")[0]
    strip = torch.full((3, 480, 6400), 0.5)
    lefts = [400, 2000, 3600, 5200]
    for left in lefts:
        strip[:, 200:243, left : left + 40] = face
    assert detection_scale(480, 6400, detector.min_size, detector.max_side) == pytest.approx(0.6)
    assert detection_scale(300, 400, detector.min_size, detector.max_side) == 1.0
    faces = detector([strip])
    assert len(faces) == len(lefts)
    centres = sorted(((faces.boxes[:, 0] + faces.boxes[:, 2]) / 2).tolist())
    assert all(abs(c - (left + 20)) < 15 for c, left in zip(centres, lefts))


def test_a_reported_box_holds_the_same_pixels_as_the_exact_one():
    """A bottom edge at 201.0018 was reported as 201.0: the written file's DSSIM, measured over the
    reported box, left out the row the cloak had measured its caps on."""
    from facecloak.faces import pixel_bounds

    exact = [10.004, 19.996, 100.0018, 201.0018]
    index = torch.zeros(1, dtype=torch.long)
    faces = Faces(torch.tensor([exact]), torch.zeros(1, 5, 2), torch.ones(1), index)
    reported = faces.to_records()[0]["box"]
    assert pixel_bounds(reported, 400, 400) == pixel_bounds(faces.boxes[0].tolist(), 400, 400)
    assert all(abs(a - b) <= 0.01 for a, b in zip(reported, exact))
