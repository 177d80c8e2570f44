"""Run MXNet face models (``NAME-symbol.json`` + ``NAME-0000.params``) as differentiable PyTorch modules.

Much of the published face-recognition zoo (insightface's ArcFace ResNets and MobileFaceNets,
MobileFace, ...) ships only as an MXNet symbol graph plus a binary ``.params`` file. MXNet is no longer
maintained and does not install on current Pythons, so this module reads both formats itself: the
``.params`` reader follows ``NDArray::Save``/``NDArray::Load`` (mxnet ``src/ndarray/ndarray.cc``) and
`MXNetGraph` executes the JSON graph node by node with ``torch.nn.functional``, so gradients reach the
input image, which is what cloaking needs.

Convention:
    - `MXNetGraph.forward` takes exactly what the graph's data input takes, e.g. for MobileFace
      ``(N, 3, 112, 112)`` RGB in 0..255; preprocessing written into the graph (``(x - 127.5) / 128``)
      runs inside it. Nothing is added or guessed.
    - Always inference: BatchNorm uses its moving statistics, Dropout is the identity, loss heads
      (``SoftmaxOutput``) ignore their label input and return their forward output.
    - Weights are frozen (``requires_grad=False``); floating-point weights are stored as float32,
      move or cast the module once after building it (``.to(device)``, ``.double()``).
    - Operator semantics (defaults included) are MXNet 1.x's, e.g. BatchNorm ``eps=1e-3`` and
      ``fix_gamma=True`` (gamma read as 1) unless the graph says otherwise.

Example:
    >>> model = load_mxnet_model(Path("MobileFace_Identification_V2-symbol.json"))  # doctest: +SKIP
    >>> model(torch.rand(2, 3, 112, 112) * 255).shape  # doctest: +SKIP
    torch.Size([2, 256])

"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecloak.errors import InvalidInputError, ModelNotFoundError

__all__ = ["SUPPORTED_OPERATORS", "MXNetGraph", "load_mxnet_model", "read_mxnet_params"]

# --------------------------------------------------------------------------------------------------
# .params reader
# --------------------------------------------------------------------------------------------------

PARAMS_FILE_MAGIC = 0x112
"""First uint64 of an ``NDArray::Save`` list file."""
NDARRAY_V1_MAGIC = 0xF993FAC8
"""Array record with int64 dims, no storage type (MXNet 0.9 - 0.11)."""
NDARRAY_V2_MAGIC = 0xF993FAC9
"""Array record with a storage type before the int64 dims (MXNet >= 0.11)."""
NDARRAY_V3_MAGIC = 0xF993FACA
"""Like V2, written under numpy shape semantics: ndim 0 is a scalar, ndim -1 an unknown shape."""

_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
}
"""MXNet type flags (``mshadow::TypeFlag``) this reader understands."""


@dataclass(frozen=True)
class _ParamsFile:
    """What a ``.params`` file holds: arrays by bare name, and which names were ``aux:`` states."""

    arrays: dict[str, np.ndarray]
    aux_names: frozenset[str]


class _Reader:
    """Bounds-checked little-endian reads, so a damaged file fails with a reason, never a crash."""

    def __init__(self, stream: BinaryIO, size: int, path: Path) -> None:
        self.stream = stream
        self.left = size
        self.path = path

    def fail(self, reason: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"not a valid MXNet .params file: {reason}", self.path)

    def read(self, n_bytes: int, what: str) -> bytes:
        if n_bytes > self.left:
            raise self.fail(f"truncated while reading {what}")
        data = self.stream.read(n_bytes)
        if len(data) != n_bytes:
            raise self.fail(f"truncated while reading {what}")
        self.left -= n_bytes
        return data

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def array_bytes(self, n_bytes: int, what: str) -> bytearray:
        if n_bytes > self.left:
            raise self.fail(f"truncated while reading {what} ({n_bytes} bytes needed, {self.left} left)")
        buffer = bytearray(n_bytes)  # writable, so numpy and torch can share it without a copy
        if self.stream.readinto(buffer) != n_bytes:
            raise self.fail(f"truncated while reading {what}")
        self.left -= n_bytes
        return buffer


def _read_ndarray(reader: _Reader, index: int) -> np.ndarray:
    """Read one ``NDArray::Save`` record (V3, V2, V1 or pre-0.9 legacy), as ``NDArray::Load`` does."""
    what = f"array {index}"
    (magic,) = reader.unpack("I", f"{what} header")
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (storage_type,) = reader.unpack("i", f"{what} storage type")
        if storage_type != 0:
            raise reader.fail(f"{what} has sparse storage type {storage_type}, only dense (0) is supported")
    if magic in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (ndim,) = reader.unpack("i", f"{what} ndim")
        if ndim > 32:
            raise reader.fail(f"{what} claims {ndim} dimensions")
        shape = reader.unpack(f"{max(ndim, 0)}q", f"{what} shape")
    else:  # pre-0.9 files: no magic, the uint32 just read is ndim and the dims are uint32
        ndim = magic
        if ndim > 32:
            raise reader.fail(f"bad array magic 0x{magic:08X} for {what}")
        shape = reader.unpack(f"{ndim}I", f"{what} shape")
    # An empty NDArray is written as its shape alone: ndim 0 (-1 under numpy shape semantics).
    if (ndim == 0 and magic != NDARRAY_V3_MAGIC) or ndim < 0 or any(d < 0 for d in shape):
        return np.zeros((0,), dtype=np.float32)
    _device_type, _device_id, type_flag = reader.unpack("iii", f"{what} context and dtype")
    dtype = _DTYPES.get(type_flag)
    if dtype is None:
        raise reader.fail(f"{what} has unknown dtype flag {type_flag}")
    n_bytes = math.prod(shape) * dtype.itemsize
    data = np.frombuffer(reader.array_bytes(n_bytes, f"{what} data"), dtype=dtype).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _read_params_file(path: Path) -> _ParamsFile:
    """Parse a ``.params`` file into named arrays, remembering which were ``aux:`` (running) states."""
    path = Path(path)
    try:
        stream = path.open("rb")
    except OSError as err:
        raise ModelNotFoundError(f"cannot open MXNet .params file: {err.strerror or err}", path) from err
    with stream:
        reader = _Reader(stream, os.fstat(stream.fileno()).st_size, path)
        (magic,) = reader.unpack("Q", "file header")
        if magic != PARAMS_FILE_MAGIC:
            raise reader.fail(f"bad file magic 0x{magic:X} (expected 0x{PARAMS_FILE_MAGIC:X})")
        _reserved, n_arrays = reader.unpack("QQ", "file header")
        arrays = [_read_ndarray(reader, index) for index in range(n_arrays)]
        (n_names,) = reader.unpack("Q", "name count")
        if n_names != n_arrays:
            raise reader.fail(f"{n_arrays} arrays but {n_names} names")
        named: dict[str, np.ndarray] = {}
        aux_names: set[str] = set()
        for index, array in enumerate(arrays):
            (length,) = reader.unpack("Q", f"name {index} length")
            try:
                full_name = reader.read(length, f"name {index}").decode("utf-8")
            except UnicodeDecodeError as err:
                raise reader.fail(f"name {index} is not UTF-8") from err
            kind, sep, name = full_name.partition(":")
            if not sep or kind not in ("arg", "aux"):
                kind, name = "arg", full_name
            if name in named:
                raise reader.fail(f"parameter {name!r} appears twice")
            named[name] = array
            if kind == "aux":
                aux_names.add(name)
    return _ParamsFile(named, frozenset(aux_names))


def read_mxnet_params(path: Path) -> dict[str, np.ndarray]:
    """Read an MXNet ``.params`` file without MXNet.

    Reads every array format MXNet has written (pre-0.9 legacy, V1 ``0xF993FAC8``, V2 ``0xF993FAC9``,
    V3 numpy-shape), dense storage only, dtypes float32/64/16, uint8, int8, int32, int64 and bool.
    The ``arg:``/``aux:`` prefixes are dropped; `MXNetGraph` gets the distinction from the file
    itself (aux arrays become buffers), so callers rarely need it.

    Args:
        path: the ``NAME-EPOCH.params`` file.

    Returns:
        Arrays by parameter name (e.g. ``"conv1_weight"``, ``"bn1_moving_mean"``), native byte order,
        in file order.

    Raises:
        ModelNotFoundError: missing or unreadable file, bad magic, truncated data, unknown dtype,
            sparse storage; the message is one line naming the file.

    Example:
        >>> arrays = read_mxnet_params(Path("MobileFace_Identification_V2-0000.params"))  # doctest: +SKIP
        >>> arrays["conv1_weight"].shape  # doctest: +SKIP
        (32, 3, 3, 3)

    """
    return _read_params_file(path).arrays


# --------------------------------------------------------------------------------------------------
# attribute parsing: MXNet writes every attribute as a string ("(3, 3)", "True", "1e-05", "None")
# --------------------------------------------------------------------------------------------------


class _Attrs:
    """Typed access to one node's string attributes, failing with the node named."""

    def __init__(self, raw: Mapping[str, Any], op: str, node: str, path: str | None) -> None:
        self.raw = {str(k): str(v) for k, v in raw.items()}
        self.op = op
        self.node = node
        self.path = path

    def fail(self, reason: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"MXNet operator {self.op!r} (node {self.node}): {reason}", self.path)

    def _value(self, key: str) -> str | None:
        value = self.raw.get(key)
        return None if value is None or value.strip() in ("None", "") else value.strip()

    def text(self, key: str, default: str) -> str:
        value = self._value(key)
        return default if value is None else value.strip("'\"")

    def flag(self, key: str, default: bool) -> bool:
        value = self._value(key)
        if value is None:
            return default
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise self.fail(f"attribute {key}={value!r} is not a boolean")

    def number(self, key: str, default: float | None) -> float | None:
        value = self._value(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise self.fail(f"attribute {key}={value!r} is not a number") from None

    def integer(self, key: str, default: int) -> int:
        value = self.number(key, default)
        if value is None or value != int(value):
            raise self.fail(f"attribute {key}={self.raw.get(key)!r} is not an integer")
        return int(value)

    def integers(self, key: str, default: tuple[int, ...] = ()) -> tuple[int, ...]:
        value = self._value(key)
        if value is None:
            return default
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise self.fail(f"attribute {key}={value!r} is not a tuple of integers") from None
        items = parsed if isinstance(parsed, (tuple, list)) else (parsed,)
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            raise self.fail(f"attribute {key}={value!r} is not a tuple of integers")
        return tuple(items)


def _node_attrs(node: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the three places MXNet versions put attributes: ``attr`` < ``param`` < ``attrs``."""
    merged: dict[str, Any] = {}
    for key in ("attr", "param", "attrs"):
        value = node.get(key)
        if isinstance(value, Mapping):
            merged.update(value)
    return merged


# --------------------------------------------------------------------------------------------------
# operators: each builder parses attributes once, at load time, and returns fn(inputs) -> Tensor
# --------------------------------------------------------------------------------------------------

OpFn = Callable[[list[Tensor]], Tensor]


def _spatial(attrs: _Attrs, key: str, n_dims: int, default: int) -> tuple[int, ...]:
    value = attrs.integers(key) or (default,) * n_dims
    if len(value) != n_dims:
        raise attrs.fail(f"attribute {key}={value} does not match a {n_dims}-d kernel")
    return value


def _check_layout(attrs: _Attrs) -> None:
    layout = attrs.text("layout", "")
    if layout and layout not in ("NCW", "NCHW", "NCDHW"):
        raise attrs.fail(f"layout {layout!r} is not supported (channels-first only)")


def _build_convolution(attrs: _Attrs, *, with_bias: bool | None = None) -> OpFn:
    _check_layout(attrs)
    kernel = attrs.integers("kernel")
    if not 1 <= len(kernel) <= 3:
        raise attrs.fail(f"kernel {kernel} must have 1 to 3 dimensions")
    n_dims = len(kernel)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n_dims]
    stride = _spatial(attrs, "stride", n_dims, 1)
    pad = _spatial(attrs, "pad", n_dims, 0)
    dilate = _spatial(attrs, "dilate", n_dims, 1)
    groups = attrs.integer("num_group", 1)
    no_bias = attrs.flag("no_bias", False) if with_bias is None else not with_bias

    def convolution(inputs: list[Tensor]) -> Tensor:
        bias = inputs[2] if len(inputs) > 2 and not no_bias else None
        return conv(inputs[0], inputs[1], bias, stride, pad, dilate, groups)

    return convolution


def _build_batch_norm(attrs: _Attrs) -> OpFn:
    eps = attrs.number("eps", 1e-3)
    fix_gamma = attrs.flag("fix_gamma", True)
    axis = attrs.integer("axis", 1)

    def batch_norm(inputs: list[Tensor]) -> Tensor:
        x, gamma, beta, mean, var = inputs[:5]
        if fix_gamma:  # MXNet ignores the stored gamma and uses 1
            gamma = torch.ones_like(gamma)
        moved = x.movedim(axis, 1) if axis not in (1, 1 - x.ndim) else x
        out = F.batch_norm(moved, mean, var, gamma, beta, training=False, eps=eps)
        return out.movedim(1, axis) if moved is not x else out

    return batch_norm


def _build_activation(attrs: _Attrs) -> OpFn:
    act_type = attrs.text("act_type", "")
    functions: dict[str, Callable[[Tensor], Tensor]] = {
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softrelu": F.softplus,
        "softsign": F.softsign,
    }
    if act_type not in functions:
        raise attrs.fail(f"act_type {act_type!r} is not supported")
    function = functions[act_type]
    return lambda inputs: function(inputs[0])


def _build_leaky_relu(attrs: _Attrs) -> OpFn:
    act_type = attrs.text("act_type", "leaky")
    slope = attrs.number("slope", 0.25)
    if act_type == "leaky":
        return lambda inputs: F.leaky_relu(inputs[0], slope)
    if act_type == "prelu":  # gamma: one slope per channel (axis 1), or a single one
        return lambda inputs: F.prelu(inputs[0], inputs[1].reshape(-1))
    if act_type == "elu":
        return lambda inputs: F.elu(inputs[0], alpha=slope)
    if act_type == "selu":
        return lambda inputs: F.selu(inputs[0])
    if act_type == "gelu":
        return lambda inputs: F.gelu(inputs[0])
    if act_type == "rrelu":  # inference: the mean of the random slope range
        mean_slope = (attrs.number("lower_bound", 0.125) + attrs.number("upper_bound", 0.334)) / 2
        return lambda inputs: F.leaky_relu(inputs[0], mean_slope)
    raise attrs.fail(f"act_type {act_type!r} is not supported")


def _pool_out_size(size: int, kernel: int, stride: int, pad: int, full: bool) -> int:
    """Output length under MXNet's ``valid`` (floor) or ``full`` (ceil) pooling convention."""
    span = size + 2 * pad - kernel
    return 1 + (-(-span // stride) if full else span // stride)


def _build_pooling(attrs: _Attrs) -> OpFn:
    _check_layout(attrs)
    pool_type = attrs.text("pool_type", "max")
    if pool_type not in ("max", "avg", "sum"):
        raise attrs.fail(f"pool_type {pool_type!r} is not supported")
    convention = attrs.text("pooling_convention", "valid")
    if convention not in ("valid", "full"):
        raise attrs.fail(f"pooling_convention {convention!r} is not supported")
    full = convention == "full"
    count_include_pad = attrs.flag("count_include_pad", True)

    if attrs.flag("global_pool", False):

        def global_pool(inputs: list[Tensor]) -> Tensor:
            x = inputs[0]
            dims = tuple(range(2, x.ndim))
            if pool_type == "max":
                return x.amax(dim=dims, keepdim=True)
            return x.mean(dim=dims, keepdim=True) if pool_type == "avg" else x.sum(dim=dims, keepdim=True)

        return global_pool

    kernel = attrs.integers("kernel")
    if not 1 <= len(kernel) <= 3:
        raise attrs.fail(f"kernel {kernel} must have 1 to 3 dimensions")
    n_dims = len(kernel)
    stride = _spatial(attrs, "stride", n_dims, 1)
    pad = _spatial(attrs, "pad", n_dims, 0)
    if pool_type == "sum" and n_dims == 1:
        raise attrs.fail("1-d sum pooling is not supported")
    if pool_type == "max":
        function = partial(
            {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n_dims],
            kernel_size=kernel,
            stride=stride,
            padding=pad,
            ceil_mode=full,
        )
    else:
        options: dict[str, Any] = {"count_include_pad": count_include_pad}
        if pool_type == "sum":
            options = {"count_include_pad": True, "divisor_override": 1}
        function = partial(
            {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n_dims],
            kernel_size=kernel,
            stride=stride,
            padding=pad,
            ceil_mode=full,
            **options,
        )

    def pooling(inputs: list[Tensor]) -> Tensor:
        out = function(inputs[0])
        expected = tuple(
            _pool_out_size(size, k, s, p, full)
            for size, k, s, p in zip(inputs[0].shape[2:], kernel, stride, pad, strict=True)
        )
        if tuple(out.shape[2:]) != expected:  # torch drops a last window that starts in the padding
            raise InvalidInputError(
                f"MXNet Pooling node {attrs.node}: input {tuple(inputs[0].shape)} gives a window lying "
                "entirely in the padding, which is not supported"
            )
        return out

    return pooling


def _build_fully_connected(attrs: _Attrs, *, with_bias: bool | None = None) -> OpFn:
    no_bias = attrs.flag("no_bias", False) if with_bias is None else not with_bias
    flatten = attrs.flag("flatten", True)

    def fully_connected(inputs: list[Tensor]) -> Tensor:
        x = inputs[0].flatten(1) if flatten else inputs[0]
        return F.linear(x, inputs[1], inputs[2] if len(inputs) > 2 and not no_bias else None)

    return fully_connected


def _build_scalar(function: Callable[[Tensor, float], Tensor], attrs: _Attrs) -> OpFn:
    scalar = attrs.number("scalar", None)
    if scalar is None:
        raise attrs.fail("attribute scalar is missing")
    return lambda inputs: function(inputs[0], scalar)


def _build_concat(attrs: _Attrs) -> OpFn:
    dim = attrs.integer("dim", 1)
    return lambda inputs: torch.cat(inputs, dim=dim)


def _reshape_target(in_shape: Sequence[int], spec: Sequence[int], attrs: _Attrs) -> list[int]:
    """MXNet's Reshape codes: 0 copy, -1 infer, -2 copy the rest, -3 merge two, -4 split one."""
    out: list[int] = []
    src = 0
    j = 0
    while j < len(spec):
        code = spec[j]
        if code > 0:
            out.append(code)
            src += 1
        elif code == 0:
            out.append(in_shape[src])
            src += 1
        elif code == -1:
            out.append(-1)
            src += 1
        elif code == -2:
            out.extend(in_shape[src:])
            src = len(in_shape)
        elif code == -3:
            out.append(in_shape[src] * in_shape[src + 1])
            src += 2
        elif code == -4:
            first, second = spec[j + 1], spec[j + 2]
            first = in_shape[src] // second if first == -1 else first
            second = in_shape[src] // first if second == -1 else second
            out.extend((first, second))
            src += 1
            j += 2
        else:
            raise attrs.fail(f"shape code {code} is not supported")
        j += 1
    return out


def _build_reshape(attrs: _Attrs) -> OpFn:
    spec = attrs.integers("shape")
    if not spec:
        raise attrs.fail("attribute shape is missing (target_shape is not supported)")
    reverse = attrs.flag("reverse", False)
    if reverse and -4 in spec:
        raise attrs.fail("reverse=True together with -4 is not supported")

    def reshape(inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        if reverse:
            target = _reshape_target(x.shape[::-1], spec[::-1], attrs)[::-1]
        else:
            target = _reshape_target(x.shape, spec, attrs)
        return x.reshape(target)

    return reshape


def _build_l2_normalization(attrs: _Attrs) -> OpFn:
    eps = attrs.number("eps", 1e-10)
    mode = attrs.text("mode", "instance")
    if mode not in ("instance", "channel", "spatial"):
        raise attrs.fail(f"mode {mode!r} is not supported")

    def l2_normalization(inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        dims = {"instance": tuple(range(1, x.ndim)), "channel": (1,), "spatial": tuple(range(2, x.ndim))}
        return x / torch.sqrt(x.square().sum(dim=dims[mode], keepdim=True) + eps)

    return l2_normalization


def _build_softmax_output(attrs: _Attrs) -> OpFn:
    multi_output = attrs.flag("multi_output", False)
    preserve_shape = attrs.flag("preserve_shape", False)

    def softmax_output(inputs: list[Tensor]) -> Tensor:  # the label input is never read
        x = inputs[0]
        if multi_output:
            return x.softmax(dim=1)
        if preserve_shape:
            return x.softmax(dim=-1)
        return x.flatten(1).softmax(dim=1).reshape(x.shape)

    return softmax_output


def _build_softmax(attrs: _Attrs, *, log: bool = False) -> OpFn:
    axis = attrs.integer("axis", -1)
    temperature = attrs.number("temperature", None)
    if attrs.flag("use_length", False):
        raise attrs.fail("use_length=True is not supported")

    def softmax(inputs: list[Tensor]) -> Tensor:
        x = inputs[0] if temperature is None else inputs[0] / temperature
        return x.log_softmax(dim=axis) if log else x.softmax(dim=axis)

    return softmax


def _build_softmax_activation(attrs: _Attrs) -> OpFn:
    mode = attrs.text("mode", "instance")
    if mode == "channel":
        return lambda inputs: inputs[0].softmax(dim=1)
    return lambda inputs: inputs[0].flatten(1).softmax(dim=1).reshape(inputs[0].shape)


def _build_clip(attrs: _Attrs) -> OpFn:
    low, high = attrs.number("a_min", None), attrs.number("a_max", None)
    if low is None or high is None:
        raise attrs.fail("attributes a_min and a_max are required")
    return lambda inputs: inputs[0].clamp(low, high)


def _simple(function: Callable[..., Tensor]) -> Callable[[_Attrs], OpFn]:
    """Build an attribute-less operator that applies `function` to its inputs."""
    return lambda attrs: lambda inputs: function(*inputs)


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)


def _identity(x: Tensor) -> Tensor:
    return x


def _sum_all(*inputs: Tensor) -> Tensor:
    total = inputs[0]
    for term in inputs[1:]:
        total = total + term
    return total


_BUILDERS: dict[str, Callable[[_Attrs], OpFn]] = {
    "Convolution": _build_convolution,
    "BatchNorm": _build_batch_norm,
    "Activation": _build_activation,
    "LeakyReLU": _build_leaky_relu,
    "Pooling": _build_pooling,
    "FullyConnected": _build_fully_connected,
    "Flatten": _simple(_flatten),
    "flatten": _simple(_flatten),
    "Dropout": _simple(_identity),
    "identity": _simple(_identity),
    "_copy": _simple(_identity),
    "Concat": _build_concat,
    "concat": _build_concat,
    "Reshape": _build_reshape,
    "reshape": _build_reshape,
    "L2Normalization": _build_l2_normalization,
    "SoftmaxOutput": _build_softmax_output,
    "Softmax": _build_softmax_output,  # pre-1.0 name of SoftmaxOutput
    "softmax": _build_softmax,
    "log_softmax": partial(_build_softmax, log=True),
    "SoftmaxActivation": _build_softmax_activation,
    "LinearRegressionOutput": _simple(lambda x, *label: x),
    "MAERegressionOutput": _simple(lambda x, *label: x),
    "LogisticRegressionOutput": _simple(lambda x, *label: torch.sigmoid(x)),
    "clip": _build_clip,
    "add_n": _simple(_sum_all),
    "ElementWiseSum": _simple(_sum_all),
    "sigmoid": _simple(torch.sigmoid),
    "tanh": _simple(torch.tanh),
    "relu": _simple(F.relu),
}
for _names, _function in (
    (("elemwise_add", "_Plus", "_plus", "_add", "broadcast_add", "broadcast_plus"), torch.add),
    (("elemwise_sub", "_Minus", "_minus", "_sub", "broadcast_sub", "broadcast_minus"), torch.sub),
    (("elemwise_mul", "_Mul", "_mul", "broadcast_mul"), torch.mul),
    (("elemwise_div", "_Div", "_div", "broadcast_div"), torch.div),
    (("_maximum", "_Maximum", "broadcast_maximum"), torch.maximum),
    (("_minimum", "_Minimum", "broadcast_minimum"), torch.minimum),
):
    for _name in _names:
        _BUILDERS[_name] = _simple(_function)
for _names, _scalar_function in (
    (("_plus_scalar", "_PlusScalar"), lambda x, s: x + s),
    (("_minus_scalar", "_MinusScalar"), lambda x, s: x - s),
    (("_rminus_scalar", "_RMinusScalar"), lambda x, s: s - x),
    (("_mul_scalar", "_MulScalar"), lambda x, s: x * s),
    (("_div_scalar", "_DivScalar"), lambda x, s: x / s),
    (("_rdiv_scalar", "_RDivScalar"), lambda x, s: s / x),
    (("_maximum_scalar", "_MaximumScalar"), lambda x, s: x.clamp(min=s)),
    (("_minimum_scalar", "_MinimumScalar"), lambda x, s: x.clamp(max=s)),
    (("_power_scalar", "_PowerScalar"), lambda x, s: x**s),
):
    for _name in _names:
        _BUILDERS[_name] = partial(_build_scalar, _scalar_function)
del _names, _name, _function, _scalar_function

_LABEL_INPUTS: dict[str, int] = {
    "SoftmaxOutput": 1,
    "Softmax": 1,
    "LinearRegressionOutput": 1,
    "MAERegressionOutput": 1,
    "LogisticRegressionOutput": 1,
}
"""Loss heads: input index of the label, which inference never reads."""

_BATCH_NORM_STATES = ("gamma", "beta", "moving_mean", "moving_var")
"""BatchNorm's inputs after the data, named ``<node>_<state>`` when very old graphs leave them out."""

SUPPORTED_OPERATORS: frozenset[str] = frozenset(_BUILDERS)
"""MXNet operator names `MXNetGraph` can execute (aliases included)."""


# --------------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One operator node, ready to run: inputs are ("value", node, output) or ("param", attr name)."""

    node: int
    name: str
    op: str
    function: OpFn
    inputs: tuple[tuple[str, Any, int], ...]
    attrs: _Attrs


def _safe_attr_name(name: str, taken: Collection[str]) -> str:
    """Turn an MXNet parameter name into a module attribute name (no dots, no nn.Module clash)."""
    base = re.sub(r"\W", "_", name) or "param"
    if base[0].isdigit() or hasattr(nn.Module, base):
        base = "p_" + base
    candidate, suffix = base, 1
    while candidate in taken:
        candidate, suffix = f"{base}_{suffix}", suffix + 1
    return candidate


class MXNetGraph(nn.Module):
    """An MXNet symbol graph with its weights, executed node by node in the JSON's topological order.

    Only the nodes the chosen output depends on are kept (a training graph's classifier and its
    ``fc7_weight`` are never loaded), every operator is checked and its attributes parsed at
    construction, and a missing weight fails here rather than at the first forward pass.

    Attributes:
        input_name: name of the graph's data input (``"data"`` for nearly every model).
        output_name: name of the node whose output `forward` returns.
        operator_counts: how often each MXNet operator occurs in the kept nodes.
        names: MXNet parameter name -> attribute name under ``self.weights`` (``state_dict`` keys are
            ``"weights.<attribute name>"``, identical to the MXNet name unless it had odd characters).

    """

    def __init__(
        self,
        graph: Mapping[str, Any],
        params: Mapping[str, np.ndarray],
        *,
        aux_names: Collection[str] = (),
        output: str | None = None,
        symbol_path: str | Path | None = None,
        params_path: str | Path | None = None,
    ) -> None:
        """Build the module from a parsed ``-symbol.json`` and the arrays of a ``.params`` file.

        Args:
            graph: the JSON object of the symbol file (``nodes``, ``heads``, ...).
            params: arrays by bare name, as `read_mxnet_params` returns them.
            aux_names: names that were ``aux:`` states; they become buffers, the others frozen
                parameters (a caller may unfreeze those to fine-tune).
            output: node to return instead of the graph's first head, e.g. ``"fc1"`` or
                ``"fc1_output"`` for a training graph that ends in a classifier.
            symbol_path: named in errors about the graph.
            params_path: named in errors about missing weights.

        Raises:
            ModelNotFoundError: malformed graph, unsupported operator or attribute, unknown `output`,
                a weight the graph needs but `params` lacks.

        """
        super().__init__()
        symbol_where = None if symbol_path is None else str(symbol_path)
        params_where = None if params_path is None else str(params_path)

        def fail(reason: str) -> ModelNotFoundError:
            return ModelNotFoundError(reason, symbol_where)

        _check_graph(graph, symbol_where)
        nodes, heads = graph["nodes"], graph.get("heads")
        try:
            node_inputs = [[(int(ref[0]), int(ref[1])) for ref in node.get("inputs", [])] for node in nodes]
            head = self._pick_output(nodes, heads, output, fail)
        except (TypeError, ValueError, IndexError) as err:
            raise fail(f"not an MXNet symbol graph: malformed inputs or heads ({err})") from err
        for index, refs in enumerate(node_inputs):
            if any(not 0 <= ref < index for ref, _ in refs):
                raise fail(f"node {index} ({nodes[index].get('name')}) is not in topological order")

        # Keep the nodes the output depends on; label inputs of loss heads are never needed.
        needed = {head[0]}
        label_refs: set[tuple[int, int]] = set()
        for index in range(head[0], -1, -1):
            if index not in needed:
                continue
            op = str(nodes[index].get("op", "null"))
            for slot, ref in enumerate(node_inputs[index]):
                if _LABEL_INPUTS.get(op) == slot:
                    label_refs.add((index, slot))
                else:
                    needed.add(ref[0])

        # Unsupported operators are reported before anything else, in graph order.
        for index in sorted(needed):
            op, name = str(nodes[index].get("op", "null")), str(nodes[index].get("name", index))
            if op != "null" and op not in _BUILDERS:
                raise ModelNotFoundError(f"unsupported MXNet operator {op!r} (node {name})", symbol_where)

        aux = frozenset(aux_names)
        self.weights = nn.Module()
        self.names: dict[str, str] = {}
        input_nodes = [
            i
            for i in sorted(needed)
            if nodes[i].get("op", "null") == "null" and nodes[i].get("name") not in params
        ]
        named_data = [i for i in input_nodes if nodes[i].get("name") == "data"]
        if not input_nodes:
            raise fail("graph has no data input (every input node is a weight)")
        self._input_node = (named_data or input_nodes)[0]
        self.input_name = str(nodes[self._input_node].get("name"))
        missing = [str(nodes[i].get("name")) for i in input_nodes if i != self._input_node]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelNotFoundError(
                f"parameter {shown} used by the graph is missing from the params file", params_where
            )

        def weight_ref(name: str) -> tuple[str, Any, int]:
            if name not in self.names:
                if name not in params:
                    raise ModelNotFoundError(
                        f"parameter {name} used by the graph is missing from the params file", params_where
                    )
                array = np.asarray(params[name])
                tensor = torch.from_numpy(np.ascontiguousarray(array))
                if tensor.is_floating_point():
                    tensor = tensor.float()
                attr = _safe_attr_name(name, self.names.values())
                if name in aux:
                    self.weights.register_buffer(attr, tensor)
                else:
                    self.weights.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
                self.names[name] = attr
            return ("param", self.names[name], 0)

        steps: list[_Step] = []
        for index in sorted(needed):
            node = nodes[index]
            op, name = str(node.get("op", "null")), str(node.get("name", index))
            if op == "null":
                continue
            attrs = _Attrs(_node_attrs(node), op, name, symbol_where)
            refs: list[tuple[str, Any, int]] = []
            for slot, (ref, out_index) in enumerate(node_inputs[index]):
                if (index, slot) in label_refs:
                    continue
                if nodes[ref].get("op", "null") == "null" and ref != self._input_node:
                    refs.append(weight_ref(str(nodes[ref].get("name"))))
                else:
                    refs.append(("value", ref, out_index))
            if op == "BatchNorm" and len(refs) < 5:  # pre-0.9 graphs leave out the aux states
                refs += [weight_ref(f"{name}_{state}") for state in _BATCH_NORM_STATES[len(refs) - 1 :]]
            if op == "BatchNorm" and len(refs) != 5:
                raise attrs.fail(f"expected 5 inputs, got {len(refs)}")
            steps.append(_Step(index, name, op, _BUILDERS[op](attrs), tuple(refs), attrs))

        for step in steps:
            for kind, ref, out_index in step.inputs:
                if kind == "value" and out_index != 0:
                    raise fail(
                        f"node {step.name} reads output {out_index} of node {ref}; only output 0 is supported"
                    )
        if head[1] != 0:
            raise fail(f"output {head[1]} of node {head[0]} is requested; only output 0 is supported")

        self._output_node = head[0]
        self.output_name = str(nodes[head[0]].get("name", head[0]))
        self._set_steps(steps)

    def _set_steps(self, steps: Sequence[_Step]) -> None:
        """Install the steps to run, and plan when each intermediate can be freed."""
        self._steps = tuple(steps)
        self.operator_counts = Counter(step.op for step in steps)
        # Free each intermediate after its last reader, so deep graphs keep little alive.
        last_use: dict[int, int] = {}
        for position, step in enumerate(steps):
            for kind, ref, _ in step.inputs:
                if kind == "value":
                    last_use[ref] = position
        release_after: list[list[int]] = [[] for _ in steps]
        for ref, position in last_use.items():
            if ref != self._output_node:
                release_after[position].append(ref)
        self._release_after = tuple(tuple(refs) for refs in release_after)

    @torch.no_grad()
    def fold_batch_norm(self) -> int:
        """Fold each BatchNorm that reads a Convolution or FullyConnected output into its weights.

        Inference BatchNorm is a per-channel ``scale x + shift`` (``scale = gamma / sqrt(var + eps)``,
        ``shift = beta - mean scale``), so ``bn(conv(x, W, b))`` is ``conv(x, W scale, b scale +
        shift)``: the same function (computed in float64, then float32: outputs agree to about
        1e-6) with one pass over memory fewer per folded pair. A pair is folded only when the BN
        is the producer's only reader, normalises channel axis 1, and the producer's weights are
        used by no other node. The folded weights replace the producer's (``state_dict`` then has
        no BatchNorm entries for it; a producer without bias gains ``<node>_folded_bias``).

        Returns:
            How many BatchNorm nodes were folded.

        Example:
            >>> model = load_mxnet_model(Path("MobileFace_Identification_V2-symbol.json"))  # doctest: +SKIP
            >>> model.fold_batch_norm()  # doctest: +SKIP
            37
        """
        readers: Counter[Any] = Counter({self._output_node: 1})
        for step in self._steps:
            readers.update(ref for kind, ref, _ in step.inputs if kind == "value")
            readers.update(("param", ref) for kind, ref, _ in step.inputs if kind == "param")
        position_of = {step.node: i for i, step in enumerate(self._steps)}
        steps: list[_Step | None] = list(self._steps)
        folded = 0
        for i, step in enumerate(self._steps):
            if step.op != "BatchNorm" or step.inputs[0][0] != "value" or step.inputs[0][1] not in position_of:
                continue
            producer = self._steps[position_of[step.inputs[0][1]]]
            if not self._foldable(producer, step, readers):
                continue
            steps[position_of[producer.node]] = None
            steps[i] = self._fold_pair(producer, step)
            folded += 1
        if folded:
            self._set_steps([step for step in steps if step is not None])
            used = {ref for step in self._steps for kind, ref, _ in step.inputs if kind == "param"}
            for name, attr in list(self.names.items()):
                if attr not in used:
                    delattr(self.weights, attr)
                    del self.names[name]
        return folded

    @staticmethod
    def _foldable(producer: _Step, bn: _Step, readers: Counter[Any]) -> bool:
        if producer.op not in ("Convolution", "FullyConnected") or readers[producer.node] != 1:
            return False
        if bn.attrs.integer("axis", 1) != 1 or any(kind != "param" for kind, _, _ in bn.inputs[1:5]):
            return False
        if producer.op == "FullyConnected" and not producer.attrs.flag("flatten", True):
            return False  # the BN's axis 1 is not the output features then
        if len(producer.inputs) < 2 or producer.inputs[1][0] != "param":
            return False
        return all(readers[("param", ref)] == 1 for kind, ref, _ in producer.inputs[1:] if kind == "param")

    def _fold_pair(self, producer: _Step, bn: _Step) -> _Step:
        """One step computing ``bn(producer(x))``, under the BN's node (its readers are unchanged)."""
        gamma, beta, mean, var = (getattr(self.weights, ref).double() for _, ref, _ in bn.inputs[1:5])
        if bn.attrs.flag("fix_gamma", True):
            gamma = torch.ones_like(gamma)
        scale = gamma / torch.sqrt(var + bn.attrs.number("eps", 1e-3))
        weight_ref = producer.inputs[1][1]
        weight = getattr(self.weights, weight_ref)
        weight.copy_((weight.double() * scale.view(-1, *[1] * (weight.ndim - 1))).to(weight.dtype))
        has_bias = len(producer.inputs) > 2 and not producer.attrs.flag("no_bias", False)
        bias_value = (
            getattr(self.weights, producer.inputs[2][1]).double() if has_bias else torch.zeros_like(scale)
        )
        new_bias = ((bias_value - mean) * scale + beta).to(weight.dtype)
        if has_bias:
            bias_ref = producer.inputs[2][1]
            getattr(self.weights, bias_ref).copy_(new_bias)
        else:
            bias_name = f"{producer.name}_folded_bias"
            bias_ref = _safe_attr_name(bias_name, self.names.values())
            self.weights.register_parameter(bias_ref, nn.Parameter(new_bias, requires_grad=False))
            self.names[bias_name] = bias_ref
        builder = _build_convolution if producer.op == "Convolution" else _build_fully_connected
        return _Step(
            bn.node,
            f"{producer.name}+{bn.name}",
            producer.op,
            builder(producer.attrs, with_bias=True),
            (producer.inputs[0], producer.inputs[1], ("param", bias_ref, 0)),
            producer.attrs,
        )

    @staticmethod
    def _pick_output(
        nodes: list[Mapping[str, Any]],
        heads: Any,
        output: str | None,
        fail: Callable[[str], ModelNotFoundError],
    ) -> tuple[int, int]:
        """Find the (node, output index) to return: `output` by name, else the graph's first head."""
        if output is None:
            if not isinstance(heads, list) or not heads:
                raise fail("not an MXNet symbol graph: no 'heads'")
            return int(heads[0][0]), int(heads[0][1])
        candidates = [(output, 0)]
        suffixed = re.fullmatch(r"(.+)_output(\d*)", output)  # MXNet's internal names: fc1_output
        if suffixed:
            candidates.append((suffixed.group(1), int(suffixed.group(2) or 0)))
        for candidate, out_index in candidates:
            for index in range(len(nodes) - 1, -1, -1):
                if nodes[index].get("name") == candidate and nodes[index].get("op", "null") != "null":
                    return index, out_index
        raise fail(f"the graph has no operator node named {output!r}")

    def forward(self, x: Tensor) -> Tensor:
        """Run the graph on `x`, exactly what the MXNet data input takes.

        Args:
            x: the graph's input, e.g. ``(N, 3, 112, 112)`` RGB 0..255 for MobileFace; any
                preprocessing the graph contains is applied by it.

        Returns:
            The chosen output, e.g. ``(N, 256)`` MobileFace embeddings (not normalised unless the
            graph normalises them).

        Raises:
            InvalidInputError: `x` is not a floating-point tensor, or an operator rejects its shape.

        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise InvalidInputError(f"MXNet graph input must be a floating-point tensor, got {_describe(x)}")
        values: dict[int, Tensor] = {self._input_node: x}
        for position, step in enumerate(self._steps):
            inputs = [
                values[ref] if kind == "value" else getattr(self.weights, ref) for kind, ref, _ in step.inputs
            ]
            try:
                values[step.node] = step.function(inputs)
            except (RuntimeError, ValueError) as err:
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                raise InvalidInputError(
                    f"MXNet node {step.name} ({step.op}) failed for input {tuple(x.shape)}: {err}"
                ) from err
            for ref in self._release_after[position]:
                values.pop(ref, None)
        return values[self._output_node]

    def extra_repr(self) -> str:
        """Summarise input, output and operators, so ``print(model)`` stays short."""
        ops = ", ".join(f"{op}x{count}" for op, count in self.operator_counts.most_common())
        return (
            f"input={self.input_name!r}, output={self.output_name!r}, nodes={len(self._steps)}, ops=[{ops}]"
        )


def _check_graph(graph: object, where: str | Path | None) -> None:
    """Reject JSON that is not a symbol graph before any weights are read."""
    nodes = graph.get("nodes") if isinstance(graph, Mapping) else None
    if not isinstance(nodes, list) or not nodes or not all(isinstance(node, Mapping) for node in nodes):
        raise ModelNotFoundError("not an MXNet symbol graph: no 'nodes' list", where)


def _describe(x: object) -> str:
    return f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__


# --------------------------------------------------------------------------------------------------
# loading from files
# --------------------------------------------------------------------------------------------------

_EPOCH_RE = re.compile(r"-(\d+)\.params$")


def _default_params_path(symbol_json: Path, epoch: int | None) -> Path:
    """``PREFIX-symbol.json`` -> ``PREFIX-EPOCH.params``: the epoch named, else the highest on disk."""
    if not symbol_json.name.endswith("-symbol.json"):
        raise ModelNotFoundError(
            "cannot find the weights of a symbol file not named '<prefix>-symbol.json'; pass params=",
            symbol_json,
        )
    prefix = symbol_json.name[: -len("-symbol.json")]
    if epoch is not None:
        return symbol_json.with_name(f"{prefix}-{epoch:04d}.params")
    epochs: list[tuple[int, Path]] = []
    for candidate in symbol_json.parent.glob(f"{glob.escape(prefix)}-*.params"):
        found = _EPOCH_RE.search(candidate.name)
        if found and candidate.name == f"{prefix}-{found.group(1)}.params":
            epochs.append((int(found.group(1)), candidate))
    if not epochs:
        return symbol_json.with_name(f"{prefix}-0000.params")  # missing: reported by the reader
    return max(epochs)[1]


def load_mxnet_model(
    symbol_json: Path,
    params: Path | None = None,
    *,
    epoch: int | None = None,
    output: str | None = None,
) -> MXNetGraph:
    """Load an MXNet checkpoint (``PREFIX-symbol.json`` + ``PREFIX-EPOCH.params``) as a PyTorch module.

    The module is frozen and in eval mode; gradients flow to its input only, as cloaking needs.

    Args:
        symbol_json: the ``-symbol.json`` graph.
        params: the weights; by default the ``PREFIX-EPOCH.params`` beside `symbol_json`, for
            `epoch` if given, else the highest epoch present (usually ``-0000``).
        epoch: which checkpoint epoch to load when `params` is not given.
        output: node to return instead of the graph's first head (``"fc1"``, ``"fc1_output"``), for
            training graphs that end in a classifier.

    Returns:
        The graph as an `MXNetGraph`, on the CPU, float32.

    Raises:
        ModelNotFoundError: a file is missing, unreadable or malformed, an operator is unsupported,
            or a weight is missing; one line naming the file.

    Example:
        >>> model = load_mxnet_model(Path("MobileFace_Identification_V2-symbol.json"))  # doctest: +SKIP
        >>> model.input_name, model.output_name  # doctest: +SKIP
        ('data', 'fc5_bn')

    """
    symbol_json = Path(symbol_json)
    try:
        text = symbol_json.read_text(encoding="utf-8")
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot read MXNet symbol file: {err.strerror or err}", symbol_json
        ) from err
    except UnicodeDecodeError as err:
        raise ModelNotFoundError("MXNet symbol file is not UTF-8 text", symbol_json) from err
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(f"MXNet symbol file is not valid JSON: {err}", symbol_json) from err
    _check_graph(graph, symbol_json)
    params_path = Path(params) if params is not None else _default_params_path(symbol_json, epoch)
    weights = _read_params_file(params_path)
    model = MXNetGraph(
        graph,
        weights.arrays,
        aux_names=weights.aux_names,
        output=output,
        symbol_path=symbol_json,
        params_path=params_path,
    )
    return model.eval()
