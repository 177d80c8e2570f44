"""The one protection contract (`facecloak.protection`) and its input check, on real sample faces."""

from __future__ import annotations

import pytest
import torch

from facecloak._checks import check_image_list
from facecloak.anonymize import Anonymizer
from facecloak.cloak import TargetedCloak
from facecloak.embed import embed_faces
from facecloak.errors import InvalidInputError
from facecloak.io import read_image
from facecloak.protection import AnonymizeFaces, CloakFaces, Protection, ProtectionResult, escalate


@pytest.fixture(scope="module")
def group(samples_dir, detector):
    image = read_image(samples_dir / "group.jpg").pixels
    return image, detector([image])


def test_check_image_list_takes_a_batch_or_a_list():
    batch = torch.rand(2, 3, 8, 6)
    assert [tuple(p.shape) for p in check_image_list(batch)] == [(3, 8, 6), (3, 8, 6)]
    photos = [torch.rand(3, 8, 6), torch.rand(3, 5, 7)]
    assert check_image_list(photos) == photos and check_image_list(()) == []
    nan = torch.rand(3, 8, 6)
    nan[0, 2, 2] = float("nan")  # passed: one NaN pixel spread over a whole blurred face
    for bad in (
        torch.rand(3, 8, 6),
        [torch.rand(3, 8, 6) * 3],
        [torch.rand(1, 8, 6)],
        ["photo.jpg"],
        "x",
        [nan],
    ):
        with pytest.raises(InvalidInputError):
            check_image_list(bad)


def test_anonymiser_result_is_the_same_for_a_batch_and_a_list(group):
    image, faces = group
    protection: Protection = AnonymizeFaces(Anonymizer("pixelate"))
    from_list = protection.protect([image, image.flip(-1)], faces)
    from_batch = protection.protect(torch.stack([image, image.flip(-1)]), faces)
    assert isinstance(from_list, ProtectionResult) and len(from_list.images) == 2
    assert all(torch.equal(a, b) for a, b in zip(from_list.images, from_batch.images))
    assert len(from_list.records_for(0)) == len(faces) and from_list.records_for(1) == []
    assert all(r["protected"] and r["method"] == "pixelate" for r in from_list.records)
    assert torch.equal(from_list.images[1], image.flip(-1))  # no face given there: untouched
    with pytest.raises(InvalidInputError):
        protection.protect([image], faces.shifted(1))  # a face of an image that is not there


def test_identity_is_passed_not_poked(group, dlib_resnet, detector):
    """A targeted cloak's per-person key arrives as an argument; the cloak's own key stays as it was."""
    image, faces = group
    cloak = TargetedCloak([dlib_resnet], "low", identity_key="own", detector=detector, steps=1)
    clean = [embed_faces([image], faces, dlib_resnet)]
    cloak.prepare(clean, faces, "alice")
    alice = cloak.targets[0]
    cloak.prepare(clean, faces)
    own = cloak.targets[0]
    keyed = TargetedCloak([dlib_resnet], "low", identity_key="alice", detector=detector, steps=1)
    keyed.prepare(clean, faces)
    assert torch.equal(alice, keyed.targets[0]) and not torch.equal(alice, own)
    assert cloak.identity_key == "own"
    protection = CloakFaces(cloak)
    assert protection.kind == "cloak" and protection.steps == cloak.budget.steps and protection.aim


def test_worker_copies_share_the_models_not_the_call_state(group, dlib_resnet, detector):
    """The pipeline runs two chunks at once on a CPU through `for_worker` copies."""
    image, faces = group
    cloak = TargetedCloak([dlib_resnet], "low", identity_key="own", detector=detector, steps=1)
    protection = CloakFaces(cloak)
    copy = protection.for_worker()
    assert copy is not None and copy.cloak is not cloak and copy.cloak.models[0] is dlib_resnet
    clean = [embed_faces([image], faces, dlib_resnet)]
    copy.cloak.prepare(clean, faces, "alice")
    cloak.prepare(clean, faces, "bob")
    assert not torch.equal(copy.cloak.targets[0], cloak.targets[0])  # each its own person's targets
    # cloaks that hook into the shared models while they run cannot run beside each other
    for hooked in ({"skip_gradient": 0.5}, {"dropout": 0.03}, {"feature_weight": 1.0}):
        assert CloakFaces(TargetedCloak([dlib_resnet], "low", steps=1, **hooked)).for_worker() is None
    anonymize = AnonymizeFaces(Anonymizer("blur"))
    assert anonymize.for_worker() is anonymize


def test_escalation_recloaks_only_the_faces_that_fell_short(samples_dir, dlib_resnet, detector):
    """``escalate_to``: faces a weak cloak leaves NOT protected get the stronger cloak's region; the rest
    of every photo, and every face that passed, stays the first cloak's, pixel for pixel."""
    from facecloak.cloak import UntargetedCloak
    from facecloak.faces import face_regions

    photos = [read_image(samples_dir / name).pixels for name in ("astronaut.jpg", "group.jpg")]
    faces = detector(photos)
    weak = UntargetedCloak([dlib_resnet], "low", steps=2, detector=detector, seed=0)
    strong = UntargetedCloak([dlib_resnet], "mid", detector=detector, seed=0)
    first = CloakFaces(weak).protect(photos, faces)
    short = [n for n, record in enumerate(first.records) if not record["protected"]]
    assert 0 in short and len(short) > 1  # two steps at `low` leave faces short
    escalated = CloakFaces(weak, escalate_to=strong).protect(photos, faces)
    again = CloakFaces(strong).protect(photos, faces.select(short))
    regions = face_regions(faces, strong.region_scale)
    changed = [torch.zeros(photo.shape[-2:], dtype=torch.bool) for photo in photos]
    for n, record in enumerate(escalated.records):
        if n not in short:
            assert record == first.records[n]
            continue
        assert record["protected"] and record["escalated_from"] == "low" and record["level"] == "mid"
        i = int(faces.image_index[n])
        x0, y0 = int(regions[n, 0].floor()), int(regions[n, 1].floor())
        x1, y1 = int(regions[n, 2].ceil()) + 1, int(regions[n, 3].ceil()) + 1
        y0, x0 = max(0, y0), max(0, x0)
        assert torch.equal(escalated.images[i][:, y0:y1, x0:x1], again.images[i][:, y0:y1, x0:x1])
        changed[i][y0:y1, x0:x1] = True
    for i, photo in enumerate(escalated.images):
        assert torch.equal(photo[:, ~changed[i]], first.images[i][:, ~changed[i]])
    # a face that passed is left as it was: the astronaut, marked as passed, keeps its photo whole
    records = [dict(r, protected=n == 0 or r["protected"]) for n, r in enumerate(first.records)]
    outputs, kept, to_write = escalate(strong, photos, faces, first.images, records, "low")
    assert to_write is None  # no lossy writer: the images are what to write
    assert kept[0] == records[0] and torch.equal(outputs[0], first.images[0])
    assert all(kept[n].get("escalated_from") == "low" for n in short if n != 0)


def test_an_escalated_photo_held_to_its_jpeg_file_is_written_from_what_its_records_measured(
    samples_dir, dlib_resnet, detector, tmp_path
):
    """Escalation with a lossy writer: the stronger cloak's region goes into the pixels to write
    (`ProtectionResult.to_encode`) as into the images, and the images are that file as it decodes,
    so the escalated face's record is the file's."""
    from facecloak.cloak import UntargetedCloak
    from facecloak.faces import face_regions, pixel_bounds
    from facecloak.io import stored_as, write_image
    from facecloak.quality import dssim

    source = read_image(samples_dir / "astronaut.jpg")
    faces = detector([source.pixels])
    target = tmp_path / "astronaut_cloaked.jpg"
    weak = UntargetedCloak([dlib_resnet], "low", steps=2, detector=detector, seed=0)
    strong = UntargetedCloak([dlib_resnet], "mid", detector=detector, seed=0)
    result = CloakFaces(weak, escalate_to=strong).protect(
        [source.pixels], faces, stored_as=[stored_as(target, source, None)]
    )
    (record,) = result.records
    assert record["escalated_from"] == "low" and record["protected"]
    write_image(target, result.to_encode(0), source=source)
    written = read_image(target).pixels
    assert torch.equal(written, result.images[0])
    x0, y0, x1, y1 = pixel_bounds(face_regions(faces, 1.0)[0].tolist(), *written.shape[-2:])
    before, after = source.pixels[None, :, y0:y1, x0:x1], written[None, :, y0:y1, x0:x1]
    assert float(dssim(before, after)[0]) == pytest.approx(record["dssim"], abs=1e-5)


def test_faces_whose_regions_overlap_are_escalated_together():
    """Clusters: faces of one photo whose regions touch, directly or through a neighbour."""
    from facecloak.faces import Faces
    from facecloak.protection import _overlap_clusters

    boxes = torch.tensor([[0, 0, 10, 10], [8, 0, 18, 10], [16, 0, 26, 10], [40, 0, 50, 10], [0, 0, 10, 10]])
    boxes = boxes.float()
    faces = Faces(
        boxes=boxes,
        landmarks=torch.zeros(5, 5, 2),
        scores=torch.ones(5),
        image_index=torch.tensor([0, 0, 0, 0, 1]),
    )
    assert _overlap_clusters(faces, boxes) == [[0, 1, 2], [3], [4]]


def test_an_escalated_face_is_pushed_from_its_person_mean_over_the_whole_call(lfw_dir, dlib_resnet, detector):
    """Person-level cloaking with escalation: a face that fell short is cloaked again from the mean of
    its person's photos in the call (the reference its first cloak and its check measured), not
    from a regrouping of the few faces that fell short (alone among them, a face lost its person)."""
    from facecloak.cloak import UntargetedCloak

    names = [f"Tony_Blair/Tony_Blair_000{k}.jpg" for k in (1, 2, 3)]
    photos = [read_image(lfw_dir / "images" / name).pixels for name in names]
    faces = detector(photos)
    weak = UntargetedCloak([dlib_resnet], "low", steps=1, detector=detector, seed=0)
    strong = UntargetedCloak([dlib_resnet], "mid", steps=1, detector=detector, seed=0)
    first = CloakFaces(weak).protect(photos, faces)
    counts = [record["reference_photos"] for record in first.records]
    blair = [n for n, count in enumerate(counts) if count == 3]
    assert len(blair) == 3  # one person's three photos, grouped
    references = weak.person_references()
    records = [dict(record, protected=n != blair[0]) for n, record in enumerate(first.records)]
    escalate(strong, photos, faces, first.images, records, "low", references=references)
    used = strong.person_references()
    assert used is not None and used[1].tolist() == [3]
    assert torch.allclose(used[0][0], references[0][0][blair[0] : blair[0] + 1])
    strong(photos, faces.select([blair[0]]))  # a later call without references groups its own faces
    assert strong.person_references() is None  # one face: nothing to group, its own embedding


def test_a_files_records_do_not_carry_its_place_in_the_chunk(samples_dir, detector):
    """A batch's second photo reported ``"image_index": 1`` in its own file's face records."""
    photos = [read_image(samples_dir / name).pixels for name in ("astronaut.jpg", "group.jpg")]
    result = AnonymizeFaces(Anonymizer("blur")).protect(photos, detector(photos))
    assert [len(result.records_for(k)) for k in (0, 1)] == [1, 4]
    assert all("image_index" not in record for k in (0, 1) for record in result.records_for(k))
    assert [record["image_index"] for record in result.records] == [0, 1, 1, 1, 1]  # the chunk's own


def test_escalating_never_spends_less_than_the_level_it_escalates_from(dlib_resnet):
    """``--level low --max-dssim 0.02 --escalate`` went on at mid's own cap, 0.008: a smaller one."""
    from facecloak.cloak.budget import LEVELS

    larger = CloakFaces.create("untargeted", [dlib_resnet], "low", escalate=True, max_dssim=0.02, steps=90)
    assert larger.escalate_to.level == "mid"
    assert larger.escalate_to.budget.max_dssim == 0.02 and larger.escalate_to.budget.steps == 90
    smaller = CloakFaces.create("untargeted", [dlib_resnet], "low", escalate=True, max_dssim=0.003, steps=5)
    assert smaller.escalate_to.budget == LEVELS["mid"]  # smaller overrides: the level's own
