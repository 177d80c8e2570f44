"""The batched MTCNN (`facecloak.mtcnn`) against facenet-pytorch's own ``detect_face`` on real faces.

facenet-pytorch's code path (``FaceDetector(backend="facenet-pytorch")``) is the oracle: the
batched stages must find the same faces, with boxes and landmarks within a pixel (in practice
they agree to float rounding) and scores within 1e-4.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facecloak.detect import FaceDetector
from facecloak.faces import Faces
from facecloak.io import read_image
from facecloak.mtcnn import (
    MTCNN_STAGE_THRESHOLDS,
    area_crops,
    nms_min_overlap,
    pyramid_scales,
    summed_area_table,
)

NUM_LFW_PHOTOS = 100
MAX_PX = 1.0
MAX_SCORE = 1e-4


@pytest.fixture(scope="module")
def reference() -> FaceDetector:
    """facenet-pytorch's detect_face, every face it returns at its own thresholds (O-Net's 0.7)."""
    return FaceDetector(
        device="cpu", backend="facenet-pytorch", min_score=MTCNN_STAGE_THRESHOLDS[2], rotations="none"
    )


@pytest.fixture(scope="module")
def batched() -> FaceDetector:
    return FaceDetector(device="cpu", min_score=MTCNN_STAGE_THRESHOLDS[2], rotations="none")


@pytest.fixture(scope="module")
def lfw_photos(lfw_dir) -> list[torch.Tensor]:
    files = sorted((lfw_dir / "images").glob("*/*.jpg"))
    random.Random(14).shuffle(files)
    return [read_image(path).pixels for path in files[:NUM_LFW_PHOTOS]]


def assert_same_faces(found: Faces, expected: Faces, num_images: int) -> tuple[float, float]:
    """Same faces per image in the same order; returns the largest box and landmark differences (px)."""
    assert found.count_per_image(num_images) == expected.count_per_image(num_images)
    assert torch.equal(found.image_index, expected.image_index)
    if len(expected) == 0:
        return 0.0, 0.0
    box_px = float((found.boxes - expected.boxes).abs().max())
    landmark_px = float((found.landmarks - expected.landmarks).abs().max())
    assert box_px <= MAX_PX, f"boxes differ by up to {box_px:.3f} px"
    assert landmark_px <= MAX_PX, f"landmarks differ by up to {landmark_px:.3f} px"
    assert float((found.scores - expected.scores).abs().max()) <= MAX_SCORE
    return box_px, landmark_px


def test_matches_facenet_pytorch_on_lfw(lfw_photos, reference, batched):
    """100 LFW photos, 32 per batch as the CLI and evaluator send them: same faces, same boxes and points."""
    worst = (0.0, 0.0)
    faces = 0
    for start in range(0, len(lfw_photos), 32):
        photos = lfw_photos[start : start + 32]
        expected = reference(photos)
        worst = max(worst, assert_same_faces(batched(photos), expected, len(photos)))
        faces += len(expected)
    assert faces >= NUM_LFW_PHOTOS  # every photo has its subject, some have more people
    assert worst[0] < 0.01 and worst[1] < 0.01  # float rounding, far inside the pixel allowed


def test_same_recall_on_lfw_centre_faces(lfw_photos, reference, batched):
    """At the default score threshold both find the subject (the face at the centre) as often."""

    def centre_found(faces: Faces) -> int:
        boxes = faces.boxes
        inside = (boxes[:, 0] < 125) & (boxes[:, 2] > 125) & (boxes[:, 1] < 125) & (boxes[:, 3] > 125)
        return len(faces.image_index[inside].unique())

    ours, theirs = batched(lfw_photos[:50]), reference(lfw_photos[:50])
    found = centre_found(ours.select(ours.scores >= 0.9))
    assert found == centre_found(theirs.select(theirs.scores >= 0.9))
    assert found >= 49


def test_matches_on_samples_of_mixed_sizes(samples_dir, lfw_photos, reference, batched):
    """Photos of several sizes in one call (R-Net and O-Net see all their boxes at once), one large."""
    samples = [read_image(path).pixels for path in sorted(samples_dir.glob("*.jpg"))]
    large = F.interpolate(samples[0][None], size=(2000, 1700), mode="bilinear", align_corners=False)[0]
    photos = [*samples, lfw_photos[0], large, lfw_photos[1], samples[0].flip(-1)]
    expected = reference(photos)
    assert_same_faces(batched(photos), expected, len(photos))
    assert expected.count_per_image(len(photos))[:3] == [1, 1, 4]  # astronaut, grace_hopper, group


def test_batch_composition_does_not_change_results(lfw_photos, batched):
    together = batched(lfw_photos[:8])
    for i in range(8):
        alone = batched([lfw_photos[i]])
        mine = together.for_image(i)
        assert torch.allclose(mine.boxes, alone.boxes, atol=1e-3)
        assert torch.allclose(mine.landmarks, alone.landmarks, atol=1e-3)


def test_no_face_and_tiny_photos(batched):
    assert len(batched([torch.full((3, 200, 300), 0.5)])) == 0
    assert len(batched([torch.rand(3, 10, 10)])) == 0  # smaller than the smallest face: no pyramid
    assert pyramid_scales(10, 10, 20.0) == []


def test_reference_backend_finds_no_face_in_a_photo_under_the_smallest_face(lfw_photos, reference, batched):
    """A photo too small for one pyramid level (10 px, ``min_size`` 20): facenet-pytorch's
    ``detect_face`` concatenated no levels and raised a ValueError, failing the whole batch."""
    tiny = F.interpolate(lfw_photos[0][None], size=(10, 10), mode="area")[0]
    photos = [tiny, lfw_photos[0]]
    expected = batched(photos)
    assert expected.count_per_image(2)[0] == 0 and len(expected) >= 1
    assert_same_faces(reference(photos), expected, 2)


def test_area_crops_are_interpolate_area():
    """The summed-area crops equal F.interpolate(mode="area") of each window, down and up."""
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 61, 47, generator=generator) * 255).round()
    table = summed_area_table(images)
    index = torch.tensor([0, 1, 1, 0])
    top, bottom = torch.tensor([0, 5, 40, 3]), torch.tensor([61, 50, 41, 20])
    left, right = torch.tensor([0, 7, 10, 30]), torch.tensor([47, 30, 46, 31])
    for size in (24, 48):
        crops = area_crops(table, index, top, bottom, left, right, size)
        for k in range(4):
            window = images[index[k], :, top[k] : bottom[k], left[k] : right[k]][None]
            expected = F.interpolate(window, size=(size, size), mode="area")[0]
            assert torch.allclose(crops[k], expected, atol=1e-4)


def test_min_overlap_nms_matches_facenet_pytorch():
    """Per photo, the "Min" NMS keeps what facenet-pytorch's nms_numpy keeps (distinct scores)."""
    from facenet_pytorch.models.utils.detect_face import nms_numpy

    rng = np.random.default_rng(0)
    for _ in range(20):
        corners = rng.uniform(0, 200, size=(40, 2)).astype(np.float32)
        sides = rng.uniform(10, 80, size=(40, 1)).astype(np.float32)
        boxes = np.concatenate([corners, corners + sides], axis=1)
        scores = rng.permutation(40).astype(np.float32) / 40
        photos = rng.integers(0, 3, size=40)
        kept = nms_min_overlap(boxes, scores, photos, 0.7)
        for photo in range(3):
            mine = np.nonzero(photos == photo)[0]
            expected = mine[nms_numpy(boxes[mine], scores[mine], 0.7, "Min")]
            assert kept[photos[kept] == photo].tolist() == expected.tolist()


def test_pnet_pair_pooling_is_max_pooling_with_ceil_mode():
    """`_PairMaxPool` (strided maximums) gives `nn.MaxPool2d(2, 2, ceil_mode=True)`'s exact values."""
    from facecloak.mtcnn import PAIR_POOL_MIN_PX, _PairMaxPool

    generator = torch.Generator().manual_seed(7)
    pool, reference = _PairMaxPool(), torch.nn.MaxPool2d(2, 2, ceil_mode=True)
    for height, width in ((148, 148), (105, 107), (64, 33), (13, 13)):
        features = torch.randn(3, 10, height, width, generator=generator)
        features = features.contiguous(memory_format=torch.channels_last)
        assert (height * width >= PAIR_POOL_MIN_PX) == (height > 13)  # both paths are exercised
        assert torch.equal(pool(features), reference(features)), (height, width)


def test_pnet_in_pieces_gives_the_whole_levels_outputs():
    """`run_pnet`: groups of photos and strips of rows give P-Net's outputs on the whole level."""
    from facecloak.mtcnn import load_mtcnn_nets, run_pnet

    pnet = load_mtcnn_nets("cpu")[0]
    generator = torch.Generator().manual_seed(5)
    for shape in ((1, 3, 301, 157), (1, 3, 300, 160), (3, 3, 64, 75)):
        pixels = torch.rand(*shape, generator=generator) * 255
        whole_offsets, whole_probability = pnet(pixels)
        offsets, probability = run_pnet(pnet, pixels, tile_px=4000)  # strips of 7 to 21 output rows
        assert offsets.shape == whole_offsets.shape and probability.shape == whole_probability.shape
        assert torch.allclose(offsets, whole_offsets, atol=1e-5), shape
        assert torch.allclose(probability, whole_probability, atol=1e-5), shape


def test_rnet_and_onet_see_few_batch_sizes_and_give_each_crop_its_own_outputs():
    """Each count of crops was a new input shape, and oneDNN compiled and kept kernels for every one
    (about 100 MB of them over LFW photos in batches of 1-8): counts are padded to powers of two."""
    from facecloak.mtcnn import ONET_INPUT_PX, RNET_INPUT_PX, _run_chunked, load_mtcnn_nets

    _, rnet, onet = load_mtcnn_nets("cpu")
    generator = torch.Generator().manual_seed(3)
    seen: list[int] = []
    for net, side in ((rnet, RNET_INPUT_PX), (onet, ONET_INPUT_PX)):
        seen.clear()
        hook = net.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
        try:
            for count in (1, 3, 5, 17, 33, 70):
                crops = torch.rand(count, 3, side, side, generator=generator) * 2 - 1
                crops = crops.contiguous(memory_format=torch.channels_last)
                alone = net(crops)
                del seen[-1]  # the reference call, not one of `_run_chunked`'s
                outputs = _run_chunked(net, crops)
                assert all(len(output) == count for output in outputs)
                for padded, unpadded in zip(outputs, alone):
                    assert torch.allclose(padded, unpadded, atol=1e-5), (side, count)
        finally:
            hook.remove()
        assert set(seen) <= {1, 2, 4, 8, 16, 32, 64, 128}, seen


def test_area_resize_from_the_table_is_interpolate_area():
    """`area_resize` reads F.interpolate(mode="area")'s values from the summed-area table."""
    from facecloak.mtcnn import area_resize

    generator = torch.Generator().manual_seed(6)
    photos = (torch.rand(2, 3, 61, 47, generator=generator) * 255).round()
    table = summed_area_table(photos)
    for size in (
        (37, 29),
        (14, 20),
        (62, 48),
        (61, 47),
    ):  # down, uneven, up by a pixel (P-Net's first level), same
        expected = F.interpolate(photos, size=size, mode="area")
        assert torch.allclose(area_resize(table, size), expected, atol=1e-4), size


def test_faces_under_pnets_window_are_found_with_a_small_min_size(lfw_dir):
    """``min_size`` under 12 px enlarges the photo's first pyramid level, as facenet-pytorch's MTCNN does.

    Held at P-Net's 12 px window, ``--min-face 6`` found none of these 7 px faces (LFW photos
    shrunk to 20 px), which facenet-pytorch's ``MTCNN(min_face_size=6)`` finds.
    """
    from facenet_pytorch import MTCNN

    names = ("Shane_Hmiel_0001", "Pat_Cox_0001", "Fred_Eckhard_0002")
    photos = [
        F.interpolate(
            read_image(lfw_dir / "images" / n[:-5] / f"{n}.jpg").pixels[None], size=(20, 20), mode="area"
        )[0]
        for n in names
    ]
    theirs = MTCNN(keep_all=True, device="cpu", min_face_size=6, post_process=False)
    ours = FaceDetector(device="cpu", min_size=6, rotations="none")(photos)
    assert ours.count_per_image(len(photos)) == [1, 1, 1]
    for i, photo in enumerate(photos):
        boxes, scores = theirs.detect((photo.permute(1, 2, 0) * 255).round().byte().numpy())
        boxes = torch.from_numpy(
            np.asarray(boxes, dtype=np.float32)[np.asarray(scores, dtype=np.float32) >= 0.9]
        )
        assert len(boxes) == 1
        assert torch.allclose(ours.for_image(i).boxes, boxes, atol=MAX_PX)
