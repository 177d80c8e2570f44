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
from facecloak.protection import AnonymizeFaces, CloakFaces, Protection, ProtectionResult


@pytest.fixture(scope="module")
def group(samples_dir, detector):
    image = read_image(samples_dir / "group.jpg").pixels
    return image, detector([image])


def test_check_image_list_takes_a_batch_or_a_list():
    batch = torch.rand(2, 3, 8, 6)
    assert [tuple(p.shape) for p in check_image_list(batch)] == [(3, 8, 6), (3, 8, 6)]
    photos = [torch.rand(3, 8, 6), torch.rand(3, 5, 7)]
    assert check_image_list(photos) == photos and check_image_list(()) == []
    for bad in (torch.rand(3, 8, 6), [torch.rand(3, 8, 6) * 3], [torch.rand(1, 8, 6)], ["photo.jpg"], "x"):
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
