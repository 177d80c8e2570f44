"""Faces in photos lying on their side or upside down: found, aligned upright, protected in place."""

from __future__ import annotations

import pytest
import torch

from facecloak.faces import box_iou
from facecloak.io import read_image
from facecloak.turns import (
    boxes_from_turned,
    boxes_to_turned,
    face_turns,
    from_turned,
    to_turned,
    turn_chip_affine,
    turn_image,
)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_turned_coordinates_follow_the_pixels_that_rot90_moves(k):
    height, width = 5, 7
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = (ys * width + xs).float()[None]  # every pixel holds its own index
    turned = turn_image(image, k)
    points = torch.stack([xs.flatten(), ys.flatten()], -1).float()
    moved = to_turned(points, k, height, width).round().long()
    assert torch.equal(turned[0, moved[:, 1], moved[:, 0]], image[0].flatten())
    assert torch.allclose(from_turned(to_turned(points, k, height, width), k, height, width), points)
    boxes = torch.tensor([[0.5, 1.0, 3.5, 4.0], [-0.5, -0.5, 6.5, 4.5]])
    assert torch.allclose(
        boxes_from_turned(boxes_to_turned(boxes, k, height, width), k, height, width), boxes
    )


def test_face_turns_reads_the_turn_from_five_points_and_ignores_a_tilt():
    upright = torch.tensor([[30.0, 40.0], [70.0, 40.0], [50.0, 60.0], [35.0, 80.0], [65.0, 80.0]])
    tilted = (upright - 55) @ torch.tensor([[0.8, 0.6], [-0.6, 0.8]]) + 55  # rolled by about 37 degrees
    faces = torch.stack([upright, tilted] + [to_turned(upright, k, 100, 100) for k in (1, 2, 3)])
    # a face put into a photo turned by k needs 4 - k more quarter turns to stand upright
    assert face_turns(faces).tolist() == [0, 0, 3, 2, 1]


def test_a_turned_chip_map_reads_the_upright_crop():
    crop = torch.tensor([[[2.0, 0.0, -10.0], [0.0, 2.0, -6.0]]])  # chip_from_image: a 2x zoom
    for k in (1, 2, 3):
        turned_map = turn_chip_affine(crop, k, 16)
        grid_points = torch.tensor([[3.0, 5.0], [10.0, 2.0]])
        # chip pixel p of the turned map reads the image point that the plain map's chip puts at
        # the turned position of p
        plain = torch.linalg.solve(torch.cat([crop[0], torch.tensor([[0.0, 0.0, 1.0]])]), torch.eye(3))
        turned = torch.linalg.solve(torch.cat([turned_map[0], torch.tensor([[0.0, 0.0, 1.0]])]), torch.eye(3))
        for p in grid_points:
            q = to_turned(p[None], 4 - k, 16, 16)[0]  # where p of the turned chip lies in the plain chip
            a = turned @ torch.tensor([p[0], p[1], 1.0])
            b = plain @ torch.tensor([q[0], q[1], 1.0])
            assert torch.allclose(a, b, atol=1e-4)


@pytest.fixture(scope="module")
def detector():
    """The default detector: upright and at the three quarter turns (the session's is upright only)."""
    from facecloak.detect import FaceDetector

    return FaceDetector(device="cpu")


@pytest.fixture(scope="module")
def astronaut(samples_dir):
    return read_image(samples_dir / "astronaut.jpg").pixels


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_turned_face_is_found_where_it_lies_and_embeds_as_upright(astronaut, detector, dlib_resnet, k):
    from facecloak.embed import embed_faces

    upright = detector([astronaut])
    turned_photo = turn_image(astronaut, k)
    found = detector([turned_photo])
    assert len(upright) == 1 and len(found) == 1
    expected = boxes_to_turned(upright.boxes, k, *astronaut.shape[-2:])
    assert float(box_iou(found.boxes[0], expected)[0]) > 0.9
    assert face_turns(found.landmarks).tolist() == [(4 - k) % 4]
    # dlib's shape predictor runs on the face turned upright: the same chip, the same embedding
    distance = (
        embed_faces([turned_photo], found, dlib_resnet) - embed_faces([astronaut], upright, dlib_resnet)
    ).norm()
    assert float(distance) < 0.01 * dlib_resnet.card.match_threshold


def test_an_upside_down_group_photo_gives_all_its_faces_only_with_the_turns(samples_dir, detector):
    group = read_image(samples_dir / "group.jpg").pixels
    upside_down = turn_image(group, 2)
    upright_count = len(detector([group]))
    assert upright_count == 4
    # upright only, MTCNN reads some upside-down faces (score >= 0.9) and misses the others: a
    # group photo was "protected" with faces left as they were
    assert len(detector([upside_down], rotations="none")) < upright_count
    found = detector([upside_down])
    assert len(found) == upright_count
    assert face_turns(found.landmarks).tolist() == [2] * upright_count
    # auto turns a photo only when no upright face is found: here it is fooled
    assert len(detector([upside_down], rotations="auto")) < upright_count


def test_the_check_looks_again_only_at_the_turns_of_its_faces(astronaut, detector):
    from facecloak.cloak.verify import redetect

    calls = []

    class Counting(type(detector)):
        def _detect_each(self, batch, min_size, **options):
            calls.append(len(batch))
            return super()._detect_each(batch, min_size, **options)

    counting = Counting(device="cpu")
    turned_photo = turn_image(astronaut, 1)
    faces = counting([turned_photo])
    assert calls == [1, 3]  # upright, then the three turns
    calls.clear()
    again = redetect(counting, [turned_photo], faces)
    assert calls == [1] and len(again) == 1  # one detection, at the face's own turn
    assert float(box_iou(again.boxes[0], faces.boxes)[0]) > 0.9


def test_a_large_turned_photo_is_searched_small_and_its_faces_read_again_at_full_detail(
    samples_dir, detector
):
    """The turned passes read a 9 MP photo at 800 px (three passes at a quarter of the pixels); the
    turn that finds faces is read again at full detail, so boxes and landmarks are the upright ones."""
    import torch.nn.functional as F

    from facecloak.detect import TURNED_MAX_SIDE_PX

    group = read_image(samples_dir / "group.jpg").pixels
    large = F.interpolate(group[None], size=(2255, 4000), mode="bilinear", align_corners=False)[0]
    assert max(large.shape[-2:]) > 2 * TURNED_MAX_SIDE_PX
    upright = detector([large], rotations="none")
    found = detector([turn_image(large, 3)])
    assert len(found) == len(upright) == 4
    expected = boxes_to_turned(upright.boxes, 3, *large.shape[-2:])
    assert min(float(box_iou(box, expected).max()) for box in found.boxes) > 0.99


def test_a_face_found_at_two_turns_keeps_its_best_reading_in_a_photo_mixing_turns(samples_dir, detector):
    """An upside-down face beside four upright ones: MTCNN also reads it upright (0.997, landmarks
    misplaced as an upright face's). The upright turn finds the most faces, but that face must keep
    its reading at its own turn, or it is aligned, cloaked and replaced upright."""
    group = read_image(samples_dir / "group.jpg").pixels
    turned = turn_image(read_image(samples_dir / "grace_hopper.jpg").pixels, 2)
    height = max(group.shape[-2], turned.shape[-2])
    photo = torch.zeros(3, height, group.shape[-1] + turned.shape[-1])
    photo[:, : group.shape[-2], : group.shape[-1]] = group
    photo[:, : turned.shape[-2], group.shape[-1] :] = turned
    assert len(detector([photo], rotations="none")) == 5  # the turned face, read upright
    found = detector([photo])
    on_the_right = (found.boxes[:, 0] >= group.shape[-1]).tolist()
    assert len(found) == 5 and sum(on_the_right) == 1
    turns = face_turns(found.landmarks).tolist()
    assert [k for k, right in zip(turns, on_the_right) if right] == [2]
    assert [k for k, right in zip(turns, on_the_right) if not right] == [0] * 4


@pytest.mark.parametrize("k", [1, 3])
def test_a_face_on_its_side_gets_the_working_scale_of_the_same_face_upright(k):
    """`working_factors` measures a face's width: a face lying on its side is as wide as its box is
    tall, so it is averaged no more than upright (its box's width, the face's height, took a 300 px
    wide face at 400 px tall to 1.8x, 167 px across, where upright it stays native)."""
    from facecloak.cloak.scale import working_factors
    from facecloak.faces import Faces

    box = torch.tensor([[100.0, 100.0, 400.0, 500.0]])  # 300 px wide, 400 px tall
    points = torch.tensor([[[190.0, 260.0], [310.0, 260.0], [250.0, 330.0], [200.0, 410.0], [300.0, 410.0]]])
    upright = Faces(box, points, torch.ones(1), torch.zeros(1, dtype=torch.long))
    turned = Faces(
        boxes_to_turned(box, k, 600, 700), to_turned(points, k, 600, 700), torch.ones(1), upright.image_index
    )
    assert face_turns(turned.landmarks).tolist() == [(4 - k) % 4]
    assert working_factors(turned, []).tolist() == working_factors(upright, []).tolist() == [1.0]


def test_a_whole_photo_box_turns_into_the_whole_turned_photo():
    """Boxes are pixel edges (``x1`` exclusive, `facecloak.align.box_chip_from_image`): the box of a
    whole 5 x 7 photo is the whole turned photo, not one pixel off it."""
    box = torch.tensor([[0.0, 0.0, 7.0, 5.0]])
    for k in (1, 2, 3):
        expected = [[0.0, 0.0, 5.0, 7.0]] if k % 2 else [[0.0, 0.0, 7.0, 5.0]]
        assert boxes_to_turned(box, k, 5, 7).tolist() == expected
        assert boxes_from_turned(torch.tensor(expected), k, 5, 7).tolist() == box.tolist()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_turned_faces_box_crop_is_the_upright_faces_box_crop(astronaut, detector, k):
    """A photo lying on its side, searched at the turn that stands it upright, shows MTCNN the upright
    pixels exactly: its face's box crop, turned upright, must be the upright photo's, pixel for pixel
    (the box was mapped back as pixel centres and the crop read one column off the face)."""
    from types import SimpleNamespace

    from facecloak.align import align_faces, model_alignment

    card = SimpleNamespace(alignment="box", extra={"margin": 8.0}, input_size=64)
    upright = detector([astronaut], turns=[0])
    lying = turn_image(astronaut, 4 - k)
    found = detector([lying], turns=[k])
    assert len(upright) == len(found) == 1
    expected = align_faces(
        astronaut[None], model_alignment([astronaut], upright, card), upright.image_index, 64
    )
    chips = align_faces(lying[None], model_alignment([lying], found, card), found.image_index, 64)
    assert float((chips - expected).abs().max()) < 1e-4


def test_a_small_upright_misreading_nested_in_a_turned_face_is_not_a_second_face(lfw_dir, detector):
    """Seven LFW faces side by side, the strip turned by three quarters: MTCNN also reads part of one
    face lying on its side as a small upright face (0.90, its box wholly inside the real face's).
    Its IoU with that face is 0.2, under `TURNED_OVERLAP_IOU`: it was kept as an eighth face, to be
    aligned upright, cloaked and replaced. Nested in a face read at another turn, it is that face."""
    names = ["Abdullah_Gul", "Abel_Pacheco", "Abid_Hamid_Mahmud_Al-Tikriti", "Abner_Martinez",
             "Adam_Freier", "Adam_Sandler", "Adolfo_Rodriguez_Saa"]  # fmt: skip
    tiles = [read_image(lfw_dir / "images" / n / f"{n}_0001.jpg").pixels[:, 50:200, 50:200] for n in names]
    strip = turn_image(torch.cat(tiles, -1), 3)
    upright_only = detector([strip], rotations="none")
    assert len(upright_only) >= 1  # the misreading (and no other face) at the upright turn
    found = detector([strip])
    assert len(found) == len(names)
    assert face_turns(found.landmarks).tolist() == [1] * len(names)


def test_overlapping_upright_faces_all_stay_when_the_turns_are_searched_too(lfw_dir, detector):
    """A double exposure: an LFW face and the same face 38 px to its right, each at half strength.
    MTCNN finds both upright (box IoU 0.47; its own "Min" NMS keeps them, at 0.69). The merge of
    the turns also compared faces of the same turn by IoU: the default search dropped one of the
    two faces MTCNN found upright, to be left as it was."""
    face = read_image(lfw_dir / "images" / "Aaron_Patterson" / "Aaron_Patterson_0001.jpg").pixels
    shift = 38
    photo = torch.zeros(3, face.shape[-2], face.shape[-1] + shift)
    photo[:, :, : face.shape[-1]] += 0.5 * face
    photo[:, :, shift:] += 0.5 * face
    photo[:, :, :shift] += 0.5 * face[:, :, :shift]  # the left edge at full strength
    upright = detector([photo], rotations="none")
    assert len(upright) == 2 and float(box_iou(upright.boxes[0], upright.boxes[1:])[0]) > 0.3
    found = detector([photo])
    assert len(found) == 2
    assert min(float(box_iou(box, found.boxes).max()) for box in upright.boxes) > 0.99
