"""MXNet importer: .params reader, operator semantics against hand-built torch, MobileFace on real faces."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.models.mxnet import MXNetGraph, load_mxnet_model, read_mxnet_params

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("FACECLOAK_MODELS", REPO.parent / "shared" / "models"))
DATA = Path(os.environ.get("FACECLOAK_DATA", REPO.parent / "shared" / "data"))
MOBILEFACE_JSON = MODELS / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
LFW = DATA / "lfw" / "images"

_DTYPE_FLAGS = {np.float32: 0, np.float64: 1, np.float16: 2, np.uint8: 3, np.int32: 4, np.int64: 6}


# ------------------------------------------------------------------------------------------------
# writers for synthetic models, following mxnet src/ndarray/ndarray.cc NDArray::Save
# ------------------------------------------------------------------------------------------------


def _array_record(array: np.ndarray, fmt: str, dtype_flag: int | None = None, stype: int = 0) -> bytes:
    flag = _DTYPE_FLAGS[array.dtype.type] if dtype_flag is None else dtype_flag
    if fmt == "v2":
        head = struct.pack("<Ii", 0xF993FAC9, stype) + struct.pack(
            f"<I{array.ndim}q", array.ndim, *array.shape
        )
    elif fmt == "v1":
        head = struct.pack("<I", 0xF993FAC8) + struct.pack(f"<I{array.ndim}q", array.ndim, *array.shape)
    else:  # legacy: ndim first, uint32 dims
        head = struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape)
    return head + struct.pack("<iii", 1, 0, flag) + array.astype(array.dtype.newbyteorder("<")).tobytes()


def _params_bytes(arrays: dict[str, np.ndarray], aux: set[str] = frozenset(), fmt: str = "v2") -> bytes:
    out = struct.pack("<QQQ", 0x112, 0, len(arrays))
    out += b"".join(_array_record(a, fmt) for a in arrays.values())
    out += struct.pack("<Q", len(arrays))
    for name in arrays:
        encoded = (("aux:" if name in aux else "arg:") + name).encode()
        out += struct.pack("<Q", len(encoded)) + encoded
    return out


def _node(op: str, name: str, inputs: tuple[int, ...] = (), key: str = "attrs", **attrs: Any) -> dict:
    node: dict[str, Any] = {"op": op, "name": name, "inputs": [[i, 0, 0] for i in inputs]}
    if attrs:
        node[key] = {k: str(v) for k, v in attrs.items()}
    return node


def _graph(nodes: list[dict], head: int | None = None) -> dict:
    return {
        "nodes": nodes,
        "arg_nodes": [i for i, n in enumerate(nodes) if n["op"] == "null"],
        "heads": [[len(nodes) - 1 if head is None else head, 0, 0]],
        "attrs": {"mxnet_version": ["int", 10200]},
    }


def _tiny_model(key: str = "attrs") -> tuple[dict, dict[str, np.ndarray], set[str]]:
    """Preprocess -> conv(stride 2, bias) -> BN(fix_gamma False) -> PReLU -> FC, like a face net."""
    rng = np.random.default_rng(0)
    params = {
        "conv0_weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "conv0_bias": rng.normal(size=4).astype(np.float32),
        "bn0_gamma": rng.uniform(0.5, 2, size=4).astype(np.float32),
        "bn0_beta": rng.normal(size=4).astype(np.float32),
        "bn0_moving_mean": rng.normal(size=4).astype(np.float32),
        "bn0_moving_var": rng.uniform(0.5, 2, size=4).astype(np.float32),
        "relu0_gamma": rng.uniform(0.05, 0.5, size=4).astype(np.float32),
        "fc1_weight": rng.normal(size=(5, 4 * 4 * 4)).astype(np.float32),
        "fc1_bias": rng.normal(size=5).astype(np.float32),
    }
    conv = {"kernel": "(3, 3)", "stride": "(2, 2)", "pad": "(1, 1)", "num_filter": "4"}
    nodes = [
        _node("null", "data"),
        _node("_minus_scalar", "minus0", (0,), key, scalar=127.5),
        _node("_mul_scalar", "mul0", (1,), key, scalar=0.0078125),
        _node("null", "conv0_weight"),
        _node("null", "conv0_bias"),
        _node("Convolution", "conv0", (2, 3, 4), key, **conv),
        _node("null", "bn0_gamma"),
        _node("null", "bn0_beta"),
        _node("null", "bn0_moving_mean"),
        _node("null", "bn0_moving_var"),
        _node("BatchNorm", "bn0", (5, 6, 7, 8, 9), key, fix_gamma="False", eps="2e-05"),
        _node("null", "relu0_gamma"),
        _node("LeakyReLU", "relu0", (10, 11), key, act_type="prelu"),
        _node("Flatten", "flatten0", (12,)),
        _node("null", "fc1_weight"),
        _node("null", "fc1_bias"),
        _node("FullyConnected", "fc1", (13, 14, 15), key, num_hidden=5),
    ]
    return _graph(nodes), params, {"bn0_moving_mean", "bn0_moving_var"}


def _tiny_reference(x: torch.Tensor, params: dict[str, np.ndarray]) -> torch.Tensor:
    p = {k: torch.from_numpy(v).double() for k, v in params.items()}
    y = (x - 127.5) * 0.0078125
    y = F.conv2d(y, p["conv0_weight"], p["conv0_bias"], stride=2, padding=1)
    scale = p["bn0_gamma"] / torch.sqrt(p["bn0_moving_var"] + 2e-5)
    y = (y - p["bn0_moving_mean"][:, None, None]) * scale[:, None, None] + p["bn0_beta"][:, None, None]
    y = torch.where(y > 0, y, y * p["relu0_gamma"][:, None, None])
    return y.flatten(1) @ p["fc1_weight"].T + p["fc1_bias"]


def _write_model(tmp_path: Path, graph: dict, params: dict, aux: set[str], fmt: str = "v2") -> Path:
    symbol = tmp_path / "tiny-symbol.json"
    symbol.write_text(json.dumps(graph))
    (tmp_path / "tiny-0000.params").write_bytes(_params_bytes(params, aux, fmt))
    return symbol


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------
# .params reader
# ------------------------------------------------------------------------------------------------


class TestReadParams:
    @pytest.mark.parametrize("fmt", ["v2", "v1", "legacy"])
    def test_feature_all_formats_and_dtypes(self, tmp_path: Path, fmt: str) -> None:
        arrays = {
            "w": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
            "h": np.array([1.5, -2.25], dtype=np.float16),
            "d": np.array([[1e-300, 3.0]], dtype=np.float64),
            "i": np.array([-3, 7], dtype=np.int32),
            "b": np.array([0, 255], dtype=np.uint8),
            "l": np.array([2**40], dtype=np.int64),
        }
        path = tmp_path / "m-0000.params"
        path.write_bytes(_params_bytes(arrays, {"w"}, fmt))
        read = read_mxnet_params(path)
        assert list(read) == list(arrays)  # prefixes dropped, file order kept
        for name, array in arrays.items():
            assert read[name].dtype == array.dtype
            np.testing.assert_array_equal(read[name], array)

    def test_exception_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "absent-0000.params"
        with pytest.raises(ModelNotFoundError) as err:
            read_mxnet_params(path)
        _assert_one_line_naming(err, path, "cannot open")

    @pytest.mark.parametrize("cut", [4, 30, 60, -3])
    def test_exception_truncated(self, tmp_path: Path, cut: int) -> None:
        data = _params_bytes({"w": np.ones((4, 4), np.float32)})
        path = tmp_path / "t-0000.params"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelNotFoundError) as err:
            read_mxnet_params(path)
        _assert_one_line_naming(err, path, "truncated")

    def test_exception_wrong_magic(self, tmp_path: Path) -> None:
        path = tmp_path / "bad-0000.params"
        path.write_bytes(struct.pack("<Q", 0x113) + _params_bytes({"w": np.ones(2, np.float32)})[8:])
        with pytest.raises(ModelNotFoundError) as err:
            read_mxnet_params(path)
        _assert_one_line_naming(err, path, "bad file magic")

    def test_exception_wrong_array_magic(self, tmp_path: Path) -> None:
        path = tmp_path / "bad-0000.params"
        path.write_bytes(struct.pack("<QQQI", 0x112, 0, 1, 0xDEADBEEF) + b"\0" * 64)
        with pytest.raises(ModelNotFoundError) as err:
            read_mxnet_params(path)
        _assert_one_line_naming(err, path, "bad array magic")

    def test_exception_unknown_dtype(self, tmp_path: Path) -> None:
        record = _array_record(np.ones(2, np.float32), "v2", dtype_flag=9)
        path = tmp_path / "dtype-0000.params"
        path.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + record + struct.pack("<QQ", 1, 5) + b"arg:w")
        with pytest.raises(ModelNotFoundError) as err:
            read_mxnet_params(path)
        _assert_one_line_naming(err, path, "unknown dtype flag 9")

    def test_exception_sparse(self, tmp_path: Path) -> None:
        record = _array_record(np.ones(2, np.float32), "v2", stype=1)
        path = tmp_path / "sparse-0000.params"
        path.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + record + struct.pack("<QQ", 1, 5) + b"arg:w")
        with pytest.raises(ModelNotFoundError) as err:
            read_mxnet_params(path)
        _assert_one_line_naming(err, path, "sparse")

    def test_exception_hostile_size(self, tmp_path: Path) -> None:
        # A header claiming 2**40 elements must fail on the size check, not try to allocate.
        head = struct.pack("<QQQIiIq", 0x112, 0, 1, 0xF993FAC9, 0, 1, 2**40) + struct.pack("<iii", 1, 0, 0)
        path = tmp_path / "huge-0000.params"
        path.write_bytes(head + b"\0" * 16)
        with pytest.raises(ModelNotFoundError) as err:
            read_mxnet_params(path)
        _assert_one_line_naming(err, path, "truncated")


# ------------------------------------------------------------------------------------------------
# graph execution on a tiny synthetic model
# ------------------------------------------------------------------------------------------------


class TestTinyModel:
    @pytest.mark.parametrize("fmt", ["v2", "legacy"])
    def test_feature_matches_hand_built_torch(self, tmp_path: Path, fmt: str) -> None:
        graph, params, aux = _tiny_model()
        model = load_mxnet_model(_write_model(tmp_path, graph, params, aux, fmt))
        x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 255
        expected = _tiny_reference(x, params)
        torch.testing.assert_close(model(x.float()).double(), expected, rtol=1e-4, atol=1e-4)
        assert (model.input_name, model.output_name) == ("data", "fc1")
        assert not model.training
        assert set(dict(model.named_buffers())) == {"weights.bn0_moving_mean", "weights.bn0_moving_var"}
        assert all(not p.requires_grad for p in model.parameters())

    @pytest.mark.parametrize("key", ["param", "attr"])
    def test_feature_old_attribute_keys(self, key: str) -> None:
        graph, params, aux = _tiny_model(key)
        x = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 255
        model = MXNetGraph(graph, params, aux_names=aux).double()
        torch.testing.assert_close(model(x), _tiny_reference(x, params))

    def test_gradcheck(self) -> None:
        graph, params, aux = _tiny_model()
        model = MXNetGraph(graph, params, aux_names=aux).double()
        x = (torch.rand(1, 3, 8, 8, dtype=torch.float64) * 255).requires_grad_()
        assert torch.autograd.gradcheck(model, (x,))

    def test_batch_norm_defaults_fix_gamma_and_eps(self) -> None:
        rng = np.random.default_rng(1)
        params = {n: rng.uniform(0.5, 2, size=3).astype(np.float32) for n in ("g", "b", "m", "v")}
        nodes = [_node("null", "data")] + [_node("null", n) for n in ("g", "b", "m", "v")]
        nodes.append(_node("BatchNorm", "bn", (0, 1, 2, 3, 4)))
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        out = MXNetGraph(_graph(nodes), params).double()(x)
        p = {k: torch.from_numpy(v).double()[:, None, None] for k, v in params.items()}
        torch.testing.assert_close(out, (x - p["m"]) / torch.sqrt(p["v"] + 1e-3) + p["b"])  # gamma read as 1

    def test_default_params_path_picks_highest_epoch(self, tmp_path: Path) -> None:
        graph, params, aux = _tiny_model()
        symbol = _write_model(tmp_path, graph, params, aux)
        doubled = {k: v * 2 if k == "fc1_bias" else v for k, v in params.items()}
        (tmp_path / "tiny-0012.params").write_bytes(_params_bytes(doubled, aux))
        x = torch.rand(1, 3, 8, 8) * 255
        latest, first = load_mxnet_model(symbol), load_mxnet_model(symbol, epoch=0)
        torch.testing.assert_close(latest(x) - first(x), torch.from_numpy(params["fc1_bias"])[None])
        explicit = load_mxnet_model(symbol, tmp_path / "tiny-0012.params")
        torch.testing.assert_close(explicit(x), latest(x))

    def test_output_selects_an_internal_node(self) -> None:
        graph, params, aux = _tiny_model()
        model = MXNetGraph(graph, params, aux_names=aux, output="flatten0_output")
        assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 64)
        assert model.output_name == "flatten0"
        assert "fc1_weight" not in model.names  # weights past the chosen output are not loaded

    def test_exception_bad_input(self) -> None:
        graph, params, aux = _tiny_model()
        model = MXNetGraph(graph, params, aux_names=aux)
        with pytest.raises(InvalidInputError, match="floating-point"):
            model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
        with pytest.raises(InvalidInputError, match="fc1") as err:
            model(torch.zeros(1, 3, 16, 16))  # FC width no longer matches
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# operator semantics, one tiny graph per operator
# ------------------------------------------------------------------------------------------------


def _run_op(
    op: str, x: torch.Tensor, n_inputs: int = 1, params: dict | None = None, **attrs: Any
) -> torch.Tensor:
    """data -> op(data, *params) ; with n_inputs=2 and no params: op(data, data * 2)."""
    nodes = [_node("null", "data")]
    inputs = [0]
    if n_inputs == 2 and not params:
        nodes.append(_node("_mul_scalar", "twice", (0,), scalar=2))
        inputs.append(1)
    for name in params or {}:
        inputs.append(len(nodes))
        nodes.append(_node("null", name))
    nodes.append(_node(op, "op0", tuple(inputs), **attrs))
    return MXNetGraph(_graph(nodes), params or {}).double()(x)


X = torch.randn(2, 4, 6, 6, dtype=torch.float64)
GRID = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3)

OP_CASES = [
    ("relu", "Activation", {"act_type": "relu"}, X, X.clamp(min=0)),
    ("sigmoid", "Activation", {"act_type": "sigmoid"}, X, torch.sigmoid(X)),
    ("tanh", "Activation", {"act_type": "tanh"}, X, torch.tanh(X)),
    ("softrelu", "Activation", {"act_type": "softrelu"}, X, torch.log1p(torch.exp(X))),
    ("leaky", "LeakyReLU", {"slope": 0.1}, X, torch.where(X > 0, X, 0.1 * X)),
    ("elu", "LeakyReLU", {"act_type": "elu", "slope": 0.5}, X, torch.where(X > 0, X, 0.5 * torch.expm1(X))),
    ("max_valid", "Pooling", {"kernel": (2, 2), "stride": (2, 2)}, GRID, torch.tensor([[[[4.0]]]])),
    (
        "max_full",
        "Pooling",
        {"kernel": (2, 2), "stride": (2, 2), "pooling_convention": "full"},
        GRID,
        torch.tensor([[[[4.0, 5], [7, 8]]]]),
    ),
    (
        "avg_full",
        "Pooling",
        {"kernel": (2, 2), "stride": (2, 2), "pool_type": "avg", "pooling_convention": "full"},
        GRID,
        torch.tensor([[[[2.0, 3.5], [6.5, 8]]]]),
    ),
    (
        "avg_pad_in",
        "Pooling",
        {"kernel": (3, 3), "pad": (1, 1), "pool_type": "avg"},
        GRID[..., :1, :1] + 9,
        torch.tensor([[[[1.0]]]]),
    ),
    (
        "avg_pad_out",
        "Pooling",
        {"kernel": (3, 3), "pad": (1, 1), "pool_type": "avg", "count_include_pad": False},
        GRID[..., :1, :1] + 9,
        torch.tensor([[[[9.0]]]]),
    ),
    (
        "global_avg",
        "Pooling",
        {"kernel": (7, 7), "global_pool": True, "pool_type": "avg"},
        X,
        X.mean((2, 3), keepdim=True),
    ),
    ("global_max", "Pooling", {"global_pool": "True"}, X, X.amax((2, 3), keepdim=True)),
    ("flatten", "Flatten", {}, X, X.reshape(2, -1)),
    ("dropout", "Dropout", {"p": 0.5}, X, X),
    ("copy", "_copy", {}, X, X),
    ("plus", "_plus_scalar", {"scalar": 1.5}, X, X + 1.5),
    ("minus", "_minus_scalar", {"scalar": 1.5}, X, X - 1.5),
    ("rminus", "_rminus_scalar", {"scalar": 1.5}, X, 1.5 - X),
    ("mul", "_mul_scalar", {"scalar": 3}, X, X * 3),
    ("div", "_div_scalar", {"scalar": 4}, X, X / 4),
    ("rdiv", "_rdiv_scalar", {"scalar": 4}, X.exp(), 4 / X.exp()),
    ("relu6", "_minimum_scalar", {"scalar": 0.5}, X, X.clamp(max=0.5)),
    ("max", "_maximum_scalar", {"scalar": 0}, X, X.clamp(min=0)),
    ("clip", "clip", {"a_min": -0.5, "a_max": 0.5}, X, X.clamp(-0.5, 0.5)),
    ("reshape", "Reshape", {"shape": (0, -1)}, X, X.reshape(2, -1)),
    ("reshape_codes", "Reshape", {"shape": (-3, -2)}, X, X.reshape(8, 6, 6)),
    ("reshape_split", "Reshape", {"shape": (0, -4, 2, -1, -2)}, X, X.reshape(2, 2, 2, 6, 6)),
    ("l2norm", "L2Normalization", {}, X, X / X.flatten(1).norm(dim=1)[:, None, None, None]),
    ("softmax", "softmax", {"axis": 1}, X, X.softmax(1)),
]


@pytest.mark.parametrize(
    ("op", "attrs", "x", "expected"), [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES]
)
def test_operator(op: str, attrs: dict, x: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(_run_op(op, x, **attrs), expected.double())


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("elemwise_add", X * 3),
        ("_Plus", X * 3),
        ("broadcast_add", X * 3),
        ("elemwise_sub", -X),
        ("elemwise_mul", X * X * 2),
        ("broadcast_mul", X * X * 2),
        ("Concat", torch.cat([X, X * 2], 1)),
    ],
)
def test_binary_operator(op: str, expected: torch.Tensor) -> None:
    torch.testing.assert_close(_run_op(op, X, n_inputs=2), expected)


def test_grouped_dilated_convolution() -> None:
    weight = np.random.default_rng(2).normal(size=(8, 2, 3, 3)).astype(np.float32)
    out = _run_op(
        "Convolution",
        X,
        params={"w": weight},
        kernel=(3, 3),
        num_group=2,
        dilate=(2, 2),
        pad=(2, 2),
        no_bias=True,
        num_filter=8,
    )
    torch.testing.assert_close(
        out, F.conv2d(X, torch.from_numpy(weight).double(), groups=2, dilation=2, padding=2)
    )


def test_fully_connected_without_flatten() -> None:
    weight = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)
    out = _run_op("FullyConnected", X, params={"w": weight}, num_hidden=3, no_bias=True, flatten=False)
    torch.testing.assert_close(out, X @ torch.from_numpy(weight).double().T)


def test_softmax_output_ignores_its_label() -> None:
    nodes = [_node("null", "data"), _node("null", "softmax_label"), _node("SoftmaxOutput", "softmax", (0, 1))]
    x = torch.randn(2, 5, dtype=torch.float64)
    model = MXNetGraph(_graph(nodes), {}).double()
    torch.testing.assert_close(model(x), x.softmax(1))
    assert model.input_name == "data"


def test_unsupported_attribute_is_reported() -> None:
    nodes = [_node("null", "data"), _node("Activation", "act0", (0,), act_type="mish")]
    with pytest.raises(ModelNotFoundError, match="act0.*'mish'"):
        MXNetGraph(_graph(nodes), {})


# ------------------------------------------------------------------------------------------------
# errors from the graph side
# ------------------------------------------------------------------------------------------------


class TestGraphErrors:
    def test_exception_unknown_operator(self, tmp_path: Path) -> None:
        graph, params, aux = _tiny_model()
        graph["nodes"][13] = _node("FancyFlatten", "flatten0", (12,))
        symbol = _write_model(tmp_path, graph, params, aux)
        with pytest.raises(ModelNotFoundError) as err:
            load_mxnet_model(symbol)
        _assert_one_line_naming(err, symbol, "unsupported MXNet operator 'FancyFlatten' (node flatten0)")

    def test_exception_missing_param(self, tmp_path: Path) -> None:
        graph, params, aux = _tiny_model()
        del params["bn0_moving_var"]
        symbol = _write_model(tmp_path, graph, params, aux)
        with pytest.raises(ModelNotFoundError) as err:
            load_mxnet_model(symbol)
        _assert_one_line_naming(err, tmp_path / "tiny-0000.params", "bn0_moving_var", "missing")

    def test_exception_missing_files(self, tmp_path: Path) -> None:
        with pytest.raises(ModelNotFoundError) as err:
            load_mxnet_model(tmp_path / "none-symbol.json")
        _assert_one_line_naming(err, tmp_path / "none-symbol.json", "cannot read")
        graph, params, aux = _tiny_model()
        symbol = _write_model(tmp_path, graph, params, aux)
        (tmp_path / "tiny-0000.params").unlink()
        with pytest.raises(ModelNotFoundError) as err:
            load_mxnet_model(symbol)
        _assert_one_line_naming(err, tmp_path / "tiny-0000.params", "cannot open")

    def test_exception_not_a_graph(self, tmp_path: Path) -> None:
        symbol = tmp_path / "junk-symbol.json"
        symbol.write_text("{not json")
        with pytest.raises(ModelNotFoundError) as err:
            load_mxnet_model(symbol)
        _assert_one_line_naming(err, symbol, "not valid JSON")
        symbol.write_text('{"nodes": []}')
        with pytest.raises(ModelNotFoundError) as err:
            load_mxnet_model(symbol, tmp_path / "whatever.params")
        _assert_one_line_naming(err, symbol, "no 'nodes'")


# ------------------------------------------------------------------------------------------------
# MobileFace V2, real weights on real faces
# ------------------------------------------------------------------------------------------------

SAME_PEOPLE = ["Andre_Agassi", "Adrien_Brody", "Ann_Veneman", "Abdullah_Gul"]
CENTRE_BOX = (58, 50, 192, 184)
"""Rough face box in a 250x250 LFW image (face centred, a little above the middle): not aligned."""


@pytest.fixture(scope="module")
def mobileface() -> MXNetGraph:
    if not MOBILEFACE_JSON.exists():
        pytest.skip(f"MobileFace V2 not found at {MOBILEFACE_JSON} (set FACECLOAK_MODELS)")
    return load_mxnet_model(MOBILEFACE_JSON)


def _lfw_crop(person: str, number: int) -> torch.Tensor:
    """(3, 112, 112) float RGB in 0..255: the rough centre crop of an LFW image."""
    image_module = pytest.importorskip("PIL.Image")
    path = LFW / person / f"{person}_{number:04d}.jpg"
    if not path.exists():
        pytest.skip(f"LFW image {path} not found (set FACECLOAK_DATA)")
    with image_module.open(path) as image:
        chip = image.convert("RGB").crop(CENTRE_BOX).resize((112, 112), image_module.BILINEAR)
        return torch.from_numpy(np.array(chip)).permute(2, 0, 1).float()


def test_mobileface_graph(mobileface: MXNetGraph) -> None:
    assert (mobileface.input_name, mobileface.output_name) == ("data", "fc5_bn")
    assert mobileface.operator_counts["Convolution"] == 37
    assert mobileface.operator_counts["_minus_scalar"] == 1  # (x - 127.5) * (1 / 128) inside the graph


def test_mobileface_embeds_real_faces(mobileface: MXNetGraph) -> None:
    chips = torch.stack([_lfw_crop("Andre_Agassi", 1), _lfw_crop("Ann_Veneman", 1)])
    batched = mobileface(chips)
    assert batched.shape == (2, 256)
    assert torch.isfinite(batched).all()
    single = torch.cat([mobileface(chips[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-3)

    x = chips[:1].clone().requires_grad_()
    F.normalize(mobileface(x), dim=1)[0, 0].backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_mobileface_same_person_is_closer(mobileface: MXNetGraph) -> None:
    chips = torch.stack([_lfw_crop(person, number) for person in SAME_PEOPLE for number in (1, 2)])
    with torch.no_grad():
        embeddings = F.normalize(mobileface(chips), dim=1)
    similarity = embeddings @ embeddings.T
    same = torch.tensor([similarity[2 * i, 2 * i + 1] for i in range(len(SAME_PEOPLE))])
    person = torch.arange(len(SAME_PEOPLE)).repeat_interleave(2)
    different = similarity[person[:, None] != person[None, :]]
    assert same.min() > different.max(), (same, different.max())


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (
            "shape",
            "its params do not fit the graph",
        ),  # a torch RuntimeError traceback, at add and at every use
        ("nan", "NaN or infinite"),  # every face embedded as NaN: "DIFFERENT people: distance nan"
        ("constant", "same embedding"),  # every face at one point: a cloak "protected" with nothing changed
    ],
)
def test_a_model_that_cannot_embed_faces_is_refused_in_one_line(
    tmp_path: Path, damage: str, said: str
) -> None:
    from facecloak.models.plugins import load_model_file

    graph, params, aux = _tiny_model()
    if damage == "shape":
        params["conv0_bias"] = np.zeros(5, np.float32)
    elif damage == "nan":
        params["fc1_weight"][0, 0] = np.nan
    else:
        params["fc1_weight"][:] = 0
    symbol = _write_model(tmp_path, graph, params, aux)
    with pytest.raises(ModelNotFoundError) as err:
        load_model_file(symbol, name="tiny", input_size=8, crop="box", metric="cosine", threshold=0.5)
    _assert_one_line_naming(err, symbol, said)
