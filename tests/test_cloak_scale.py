"""Large faces are cloaked at a working scale and their change brought back up (`facecloak.cloak.scale`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facecloak.align import model_alignment
from facecloak.cloak import LEVELS, create_cloak
from facecloak.cloak.scale import (
    MIN_WORKING_FACTOR,
    WORKING_FACE_PX,
    area_average,
    upsample_change,
    working_factors,
    working_photos,
)
from facecloak.faces import face_regions
from facecloak.io import read_image
from facecloak.transforms import levels_8bit

UPSCALE = 4


@pytest.fixture(scope="module")
def large_photo(samples_dir):
    """Grace Hopper's sample upscaled 4x (2400 x 2048): one face about 720 pixels wide."""
    photo = read_image(samples_dir / "grace_hopper.jpg").pixels
    large = F.interpolate(photo[None], scale_factor=UPSCALE, mode="bicubic", align_corners=False)[0]
    return levels_8bit(large.clamp(0, 1)).float() / 255


def test_only_faces_well_over_the_largest_chip_leave_their_native_resolution(
    samples_dir, lfw_dir, large_photo, detector, dlib_resnet
):
    small = [
        read_image(samples_dir / name).pixels for name in ("astronaut.jpg", "grace_hopper.jpg", "group.jpg")
    ]
    small += [read_image(path).pixels for path in sorted((lfw_dir / "images").glob("*/*.jpg"))[:8]]
    faces = detector(small)
    alignments = [model_alignment(small, faces, dlib_resnet.card)]
    assert len(faces) >= 14 and working_factors(faces, alignments).eq(1).all()

    faces = detector([large_photo])
    alignments = [model_alignment([large_photo], faces, dlib_resnet.card)]
    factor = float(working_factors(faces, alignments)[0])
    width = float(faces.boxes[0, 2] - faces.boxes[0, 0])
    assert factor >= MIN_WORKING_FACTOR
    assert factor == pytest.approx(width / WORKING_FACE_PX)  # dlib's chip reads coarser than that


def test_an_upsampled_change_area_averages_back_to_the_change_it_came_from():
    # a smooth change on a 60 x 50 working photo, zero near its edges, brought to 2.7x that size
    ys, xs = torch.meshgrid(torch.arange(60.0), torch.arange(50.0), indexing="ij")
    blob = torch.exp(-(((ys - 28) / 7) ** 2 + ((xs - 22) / 6) ** 2) / 2)
    blob = torch.where(blob > 0.01, blob - 0.01, 0.0)
    change = torch.stack([blob, -0.5 * blob, 0.25 * blob]) * 0.02
    native_size = (162, 135)
    part, top, left = upsample_change(change, (60 / 162, 50 / 135), native_size)
    native = torch.zeros(3, *native_size)
    native[:, top : top + part.shape[-2], left : left + part.shape[-1]] = part
    assert 0 < top and 0 < left and part.shape[-2] < native_size[0]  # only the changed rectangle
    back = area_average(native, 2.7)
    assert back.shape == change.shape
    assert (back - change).abs().max() < 0.03 * change.abs().max()
    assert math.isclose(float(back.sum()), float(change.sum()), rel_tol=0.02)


def test_faces_move_onto_their_working_photos_in_order(large_photo, samples_dir, detector):
    small = read_image(samples_dir / "grace_hopper.jpg").pixels
    photos = [small, large_photo]
    faces = detector(photos)
    factors = torch.tensor([1.0, 3.0])
    working = working_photos(photos, faces, factors)
    assert working.photos[0] is small and working.photos[1].shape[-2:] == (800, 683)
    assert working.faces.image_index.tolist() == [0, 1] and working.factors.tolist() == [1.0, 3.0]
    assert torch.allclose(working.faces.boxes[0], faces.boxes[0])
    scale = torch.tensor([683 / 2048, 800 / 2400, 683 / 2048, 800 / 2400])
    assert torch.allclose(working.faces.boxes[1], faces.boxes[1] * scale)


def test_a_large_face_is_cloaked_at_its_working_scale_and_changed_only_around_it(
    large_photo, detector, dlib_resnet
):
    faces = detector([large_photo])
    cloak = create_cloak("untargeted", [dlib_resnet], "mid", detector=detector, seed=0)
    result = cloak([large_photo], faces)
    assert result.images[0].shape == large_photo.shape
    assert float(result.working_factors[0]) > MIN_WORKING_FACTOR
    record = result.records(faces)[0]
    assert record["working_factor"] == pytest.approx(float(result.working_factors[0]), abs=1e-3)
    # white-box, through a real JPEG 75 and a detection of the native photo from scratch
    assert bool(result.protected[0]), (result.distance_jpeg, result.thresholds)
    assert 0 < float(result.dssim[0]) <= LEVELS["mid"].max_dssim and float(result.ciede_mean[0]) < 1.5

    # the upsampled change stays inside the region's rectangle (the feathered edge is 0 before it),
    # which is what escalation pastes from a stronger cloak (`facecloak.protection.escalate`)
    change = (result.images[0] - large_photo).abs().amax(0)
    region = face_regions(faces, cloak.region_scale)[0]
    x0, y0 = int(region[0].floor()), int(region[1].floor())
    x1, y1 = int(region[2].ceil()) + 1, int(region[3].ceil()) + 1
    outside = change.clone()
    outside[y0:y1, x0:x1] = 0
    assert float(change.max()) > 4 / 255 and float(outside.max()) == 0


def test_a_photo_with_a_large_and_a_small_face_cloaks_each_at_its_own_scale(
    large_photo, samples_dir, detector, dlib_resnet
):
    small = read_image(samples_dir / "grace_hopper.jpg").pixels
    canvas = large_photo.clone()
    canvas[:, -small.shape[-2] :, -small.shape[-1] :] = small  # bottom right, clear of the large face
    faces = detector([canvas])
    assert len(faces) == 2
    cloak = create_cloak("untargeted", [dlib_resnet], "mid", detector=detector, seed=0)
    result = cloak([canvas], faces)
    widths = faces.boxes[:, 2] - faces.boxes[:, 0]
    large, little = int(widths.argmax()), int(widths.argmin())
    assert float(result.working_factors[large]) > MIN_WORKING_FACTOR
    assert float(result.working_factors[little]) == 1
    assert result.protected.all(), result.distance_jpeg
    regions = face_regions(faces, cloak.region_scale)
    for n in (large, little):
        x0, y0, x1, y1 = (int(v) for v in regions[n].round().tolist())
        assert float((result.images[0] - canvas)[:, y0:y1, x0:x1].abs().max()) > 4 / 255


def test_a_large_face_is_measured_from_its_native_clean_embedding(large_photo, detector, dlib_resnet):
    # no step taken: the photo is unchanged, so its face measures no distance from itself. The
    # reference was the face embedded on its area-averaged working photo, 0.045 from the native
    # face every measure reads: a record could claim "protected" 0.08 of a threshold early
    faces = detector([large_photo])
    cloak = create_cloak("untargeted", [dlib_resnet], "mid", steps=0, detector=detector, seed=0)
    result = cloak([large_photo], faces)
    assert float(result.working_factors[0]) > MIN_WORKING_FACTOR
    assert float(result.distance[0, 0]) < 0.005, result.distance
