"""Model registry, and the whole recognition pipeline against dlib's (alignment: test_align.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from facecloak.datasets import read_lfw_pairs
from facecloak.embed import embed_faces
from facecloak.errors import InvalidInputError, ModelNotFoundError, UnknownModelError
from facecloak.evaluate import PipelineAttacker, lfw_verification
from facecloak.io import read_image, to_uint8
from facecloak.models import (
    available_embedders,
    choose_embedders,
    create_embedder,
    embedder_status,
    get_card,
    list_embedders,
)
from facecloak.models.dlib_format import locate_package_model


def dlib_files() -> Path:
    return locate_package_model("shape_predictor_5_face_landmarks.dat").parent


# -- registry -----------------------------------------------------------------------------------


def test_registry_lists_builtin_models_and_why_not():
    names = list_embedders()
    assert {"dlib-resnet", "facenet-vggface2", "facenet-casia"} <= set(names)
    assert "dlib-resnet" in available_embedders()
    ok, reason = embedder_status("facenet-vggface2")
    assert not ok and "FACECLOAK_FACENET_VGGFACE2" in reason and "never downloaded" in reason


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError, match="known: dlib-resnet"):
        create_embedder("arcface-r999")


def test_a_models_option_is_read_one_way_everywhere(tmp_path, monkeypatch):
    """`--models` of cloak, anonymize, evaluate and the service all go through choose_embedders."""
    assert choose_embedders(None) == available_embedders()
    for nothing in ("", ",", " , "):  # `--models ,` meant every model, without a word
        with pytest.raises(InvalidInputError, match="no model named"):
            choose_embedders(nothing)
    monkeypatch.delenv("FACECLOAK_FACENET_CASIA", raising=False)
    # a registered model without its weights here: refused before any photo (it failed each photo)
    with pytest.raises(ModelNotFoundError, match="FACECLOAK_FACENET_CASIA") as info:
        choose_embedders("dlib-resnet,facenet-casia")
    assert not isinstance(info.value, UnknownModelError)
    (tmp_path / "casia.pt").write_bytes(b"weights")
    monkeypatch.setenv("FACECLOAK_FACENET_CASIA", str(tmp_path / "casia.pt"))
    assert choose_embedders(" dlib-resnet , ,facenet-casia") == ["dlib-resnet", "facenet-casia"]
    with pytest.raises(UnknownModelError, match="'arcface-r999'"):
        choose_embedders("dlib-resnet,arcface-r999")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        create_embedder("facenet-vggface2", weights=tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value) and "\n" not in str(info.value)


def test_a_device_that_does_not_exist_here_is_a_one_line_error():
    """``--device cuda`` without a GPU (or a GPU number this machine lacks, or a misspelt device)
    was torch's traceback from inside the model's ``.to``."""
    for device in ("cuda:99", "gpu"):
        with pytest.raises(InvalidInputError, match="device") as info:
            create_embedder("dlib-resnet", device=device)
        assert "\n" not in str(info.value)
    if not torch.backends.mps.is_available():  # the detector took "mps" and failed inside torch
        from facecloak.detect import FaceDetector

        with pytest.raises(InvalidInputError, match="'mps' cannot be used here") as info:
            FaceDetector(device="mps")
        assert "\n" not in str(info.value)


def test_facenet_loads_only_a_state_dict_from_a_user_file(tmp_path):
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    weights = tmp_path / "vggface2.pt"
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), weights)
    model = create_embedder("facenet-vggface2", weights=weights, device="cpu")
    out = model(torch.rand(2, 3, 160, 160))
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-4)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="junk.pt"):
        create_embedder("facenet-vggface2", weights=tmp_path / "junk.pt")


def test_facenet_takes_facenet_pytorchs_own_file_and_refuses_a_partial_one(tmp_path):
    """facenet-pytorch's weight files hold the training classifier too (``logits.*``): a strict
    load refused them; a file without it was loaded non-strictly, so a partial state dict ran
    with random layers instead of failing."""
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=False).eval()
    state = net.state_dict()
    shipped = {**state, "logits.weight": torch.randn(7, 512), "logits.bias": torch.randn(7)}
    torch.save(shipped, tmp_path / "vggface2.pt")
    model = create_embedder("facenet-vggface2", weights=tmp_path / "vggface2.pt", device="cpu")
    chips = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(model(chips), net((chips * 255.0 - 127.5) / 128.0), atol=1e-5)
    torch.save({k: v for k, v in state.items() if not k.startswith("repeat_3")}, tmp_path / "part.pt")
    with pytest.raises(ModelNotFoundError, match="do not fit"):
        create_embedder("facenet-vggface2", weights=tmp_path / "part.pt", device="cpu")


def test_facenet_names_the_keys_a_file_does_not_fit_by(tmp_path):
    """torch lists the keys on lines after its first, so the one-line error said only "Error(s) in
    loading state_dict for InceptionResnetV1:" of a file with an unexpected, missing or misshapen key."""
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    state = InceptionResnetV1(pretrained=None, classify=False).state_dict()
    edits = {
        "unexpected keys (1): head.weight": {**state, "head.weight": torch.zeros(1)},
        "missing keys (1): block8.conv2d.weight": {
            k: v for k, v in state.items() if k != "block8.conv2d.weight"
        },
        "keys of another shape (1): last_bn.weight": {**state, "last_bn.weight": torch.zeros(3)},
    }
    for words, edited in edits.items():
        torch.save(edited, tmp_path / "edited.pt")
        with pytest.raises(ModelNotFoundError, match="do not fit") as info:
            create_embedder("facenet-vggface2", weights=tmp_path / "edited.pt", device="cpu")
        assert words in str(info.value)


def test_a_threshold_of_true_is_refused():
    """JSON's ``true`` reads as 1: a card edited to ``"match_threshold": true`` was listed and used as
    ``< True``, and printed as a threshold of ``true`` in JSON output."""
    card = get_card("dlib-resnet")
    with pytest.raises(InvalidInputError, match="match threshold True"):
        type(card)(**{**card.__dict__, "match_threshold": True})


@pytest.mark.parametrize("name", available_embedders())
def test_every_available_model(name):
    model = create_embedder(name, device="cpu")
    card = get_card(name)
    chips = torch.rand(2, 3, card.input_size, card.input_size, requires_grad=True)
    out = model(chips)
    assert out.shape == (2, card.embedding_dim)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert chips.grad is not None and torch.isfinite(chips.grad).all() and chips.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())  # frozen once, at creation
    if card.distance == "cosine":
        assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-4)


# -- the whole pipeline -------------------------------------------------------------------------


def test_whole_pipeline_agrees_with_dlibs(lfw_dir, detector, dlib_resnet):
    """Our detection + landmarks + alignment + network vs dlib's HOG + predictor + network."""
    dlib = pytest.importorskip("dlib")
    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_files() / "shape_predictor_5_face_landmarks.dat"))
    recogniser = dlib.face_recognition_model_v1(
        str(dlib_files() / "dlib_face_recognition_resnet_model_v1.dat")
    )
    model = dlib_resnet
    files = sorted((lfw_dir / "images").glob("*/*.jpg"))
    random.Random(11).shuffle(files)
    cosines = []
    for path in files[:60]:
        image = read_image(path)
        array = to_uint8(image.pixels)
        found = hog(array, 1)
        faces = detector([image.pixels])
        if not len(found) or not len(faces):
            continue
        k = int(
            np.argmin(
                [abs((r.left() + r.right()) / 2 - 125) + abs((r.top() + r.bottom()) / 2 - 125) for r in found]
            )
        )
        theirs = np.array(recogniser.compute_face_descriptor(array, predictor(array, found[k]), 0))
        centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
        j = int((centres - 125).norm(dim=1).argmin())
        ours = embed_faces([image.pixels], faces.select([j]), model)[0].numpy()
        cosines.append(float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs)))
    assert len(cosines) >= 50
    assert np.mean(cosines) >= 0.99, np.mean(cosines)


def test_lfw_verification_accuracy(lfw_dir, remembering_detector, dlib_resnet):
    """5-fold protocol on a subset of the shared pairs (all 3,000 are in scripts/eval_lfw_verification.py)."""
    pairs = read_lfw_pairs(lfw_dir / "pairs.txt")
    subset = [pair for i, pair in enumerate(pairs) if (i % 300) < 40]  # 40 same + 40 different per fold
    attacker = PipelineAttacker(dlib_resnet, remembering_detector)
    result = lfw_verification(subset, [attacker])["dlib-resnet"]
    assert result["pairs"] == 400
    assert result["accuracy"] >= 0.98, result
