"""MXNet operators as torch functions, and typed access to their string attributes.

Each builder parses a node's attributes once, at load time, and returns ``fn(inputs) -> Tensor``
in MXNet 1.x semantics (defaults included); `BUILDERS` maps every supported operator name
(aliases included) to its builder. `facecloak.models.mxnet.graph` wires them into a module.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak.errors import InvalidInputError, ModelNotFoundError

# --------------------------------------------------------------------------------------------------
# attribute parsing: MXNet writes every attribute as a string ("(3, 3)", "True", "1e-05", "None")
# --------------------------------------------------------------------------------------------------


class Attrs:
    """Typed access to one node's string attributes, failing with the node named."""

    def __init__(self, raw: Mapping[str, Any], op: str, node: str, path: str | None) -> None:
        self.raw = {str(k): str(v) for k, v in raw.items()}
        self.op = op
        self.node = node
        self.path = path

    def fail(self, reason: str) -> NoReturn:
        """Raise `ModelNotFoundError` naming the operator and node (the readers' one error convention)."""
        where = f"MXNet operator {self.op!r} (node {self.node})"
        raise ModelNotFoundError(f"{where}: {reason}", self.path) from None

    def _value(self, key: str) -> str | None:
        value = self.raw.get(key)
        return None if value is None or value.strip() in ("None", "") else value.strip()

    def text(self, key: str, default: str) -> str:
        """The attribute as a string (quotes stripped), or ``default``."""
        value = self._value(key)
        return default if value is None else value.strip("'\"")

    def flag(self, key: str, default: bool) -> bool:
        """The attribute as a bool (True/False/1/0), or ``default``."""
        value = self._value(key)
        if value is None:
            return default
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        self.fail(f"attribute {key}={value!r} is not a boolean")

    def number(self, key: str, default: float | None) -> float | None:
        """The attribute as a float, or ``default``."""
        value = self._value(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            self.fail(f"attribute {key}={value!r} is not a number")

    def integer(self, key: str, default: int) -> int:
        """The attribute as an int, or ``default``."""
        value = self.number(key, default)
        if value is None or value != int(value):
            self.fail(f"attribute {key}={self.raw.get(key)!r} is not an integer")
        return int(value)

    def integers(self, key: str, default: tuple[int, ...] = ()) -> tuple[int, ...]:
        """The attribute as a tuple of ints (``"(3, 3)"``), or ``default``."""
        value = self._value(key)
        if value is None:
            return default
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            self.fail(f"attribute {key}={value!r} is not a tuple of integers")
        items = parsed if isinstance(parsed, (tuple, list)) else (parsed,)
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            self.fail(f"attribute {key}={value!r} is not a tuple of integers")
        return tuple(items)


def node_attrs(node: Mapping[str, Any]) -> dict[str, Any]:
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


def _spatial(attrs: Attrs, key: str, n_dims: int, default: int) -> tuple[int, ...]:
    value = attrs.integers(key) or (default,) * n_dims
    if len(value) != n_dims:
        attrs.fail(f"attribute {key}={value} does not match a {n_dims}-d kernel")
    return value


def _check_layout(attrs: Attrs) -> None:
    layout = attrs.text("layout", "")
    if layout and layout not in ("NCW", "NCHW", "NCDHW"):
        attrs.fail(f"layout {layout!r} is not supported (channels-first only)")


def build_convolution(attrs: Attrs, *, with_bias: bool | None = None) -> OpFn:
    """``Convolution`` (1-3 d, grouped, dilated); ``with_bias`` overrides ``no_bias`` (BN folding)."""
    _check_layout(attrs)
    kernel = attrs.integers("kernel")
    if not 1 <= len(kernel) <= 3:
        attrs.fail(f"kernel {kernel} must have 1 to 3 dimensions")
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


def _build_batch_norm(attrs: Attrs) -> OpFn:
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


def _build_activation(attrs: Attrs) -> OpFn:
    act_type = attrs.text("act_type", "")
    functions: dict[str, Callable[[Tensor], Tensor]] = {
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softrelu": F.softplus,
        "softsign": F.softsign,
    }
    if act_type not in functions:
        attrs.fail(f"act_type {act_type!r} is not supported")
    function = functions[act_type]
    return lambda inputs: function(inputs[0])


def _build_leaky_relu(attrs: Attrs) -> OpFn:
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
    attrs.fail(f"act_type {act_type!r} is not supported")


def _pool_out_size(size: int, kernel: int, stride: int, pad: int, full: bool) -> int:
    """Output length under MXNet's ``valid`` (floor) or ``full`` (ceil) pooling convention."""
    span = size + 2 * pad - kernel
    return 1 + (-(-span // stride) if full else span // stride)


def _build_pooling(attrs: Attrs) -> OpFn:
    _check_layout(attrs)
    pool_type = attrs.text("pool_type", "max")
    if pool_type not in ("max", "avg", "sum"):
        attrs.fail(f"pool_type {pool_type!r} is not supported")
    convention = attrs.text("pooling_convention", "valid")
    if convention not in ("valid", "full"):
        attrs.fail(f"pooling_convention {convention!r} is not supported")
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
        attrs.fail(f"kernel {kernel} must have 1 to 3 dimensions")
    n_dims = len(kernel)
    stride = _spatial(attrs, "stride", n_dims, 1)
    pad = _spatial(attrs, "pad", n_dims, 0)
    if pool_type == "sum" and n_dims == 1:
        attrs.fail("1-d sum pooling is not supported")
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


def build_fully_connected(attrs: Attrs, *, with_bias: bool | None = None) -> OpFn:
    """``FullyConnected``; ``with_bias`` overrides ``no_bias`` (BN folding)."""
    no_bias = attrs.flag("no_bias", False) if with_bias is None else not with_bias
    flatten = attrs.flag("flatten", True)

    def fully_connected(inputs: list[Tensor]) -> Tensor:
        x = inputs[0].flatten(1) if flatten else inputs[0]
        return F.linear(x, inputs[1], inputs[2] if len(inputs) > 2 and not no_bias else None)

    return fully_connected


def _build_scalar(function: Callable[[Tensor, float], Tensor], attrs: Attrs) -> OpFn:
    scalar = attrs.number("scalar", None)
    if scalar is None:
        attrs.fail("attribute scalar is missing")
    return lambda inputs: function(inputs[0], scalar)


def _build_concat(attrs: Attrs) -> OpFn:
    dim = attrs.integer("dim", 1)
    return lambda inputs: torch.cat(inputs, dim=dim)


def _reshape_target(in_shape: Sequence[int], spec: Sequence[int], attrs: Attrs) -> list[int]:
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
            attrs.fail(f"shape code {code} is not supported")
        j += 1
    return out


def _build_reshape(attrs: Attrs) -> OpFn:
    spec = attrs.integers("shape")
    if not spec:
        attrs.fail("attribute shape is missing (target_shape is not supported)")
    reverse = attrs.flag("reverse", False)
    if reverse and -4 in spec:
        attrs.fail("reverse=True together with -4 is not supported")

    def reshape(inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        if reverse:
            target = _reshape_target(x.shape[::-1], spec[::-1], attrs)[::-1]
        else:
            target = _reshape_target(x.shape, spec, attrs)
        return x.reshape(target)

    return reshape


def _build_l2_normalization(attrs: Attrs) -> OpFn:
    eps = attrs.number("eps", 1e-10)
    mode = attrs.text("mode", "instance")
    if mode not in ("instance", "channel", "spatial"):
        attrs.fail(f"mode {mode!r} is not supported")

    def l2_normalization(inputs: list[Tensor]) -> Tensor:
        x = inputs[0]
        dims = {"instance": tuple(range(1, x.ndim)), "channel": (1,), "spatial": tuple(range(2, x.ndim))}
        return x / torch.sqrt(x.square().sum(dim=dims[mode], keepdim=True) + eps)

    return l2_normalization


def _build_softmax_output(attrs: Attrs) -> OpFn:
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


def _build_softmax(attrs: Attrs, *, log: bool = False) -> OpFn:
    axis = attrs.integer("axis", -1)
    temperature = attrs.number("temperature", None)
    if attrs.flag("use_length", False):
        attrs.fail("use_length=True is not supported")

    def softmax(inputs: list[Tensor]) -> Tensor:
        x = inputs[0] if temperature is None else inputs[0] / temperature
        return x.log_softmax(dim=axis) if log else x.softmax(dim=axis)

    return softmax


def _build_softmax_activation(attrs: Attrs) -> OpFn:
    mode = attrs.text("mode", "instance")
    if mode == "channel":
        return lambda inputs: inputs[0].softmax(dim=1)
    return lambda inputs: inputs[0].flatten(1).softmax(dim=1).reshape(inputs[0].shape)


def _build_clip(attrs: Attrs) -> OpFn:
    low, high = attrs.number("a_min", None), attrs.number("a_max", None)
    if low is None or high is None:
        attrs.fail("attributes a_min and a_max are required")
    if low > high:
        attrs.fail(f"a_min {low} is above a_max {high}")
    return lambda inputs: _bounded(inputs[0], low, high)


def _bounded(x: Tensor, low: float, high: float) -> Tensor:
    """``x.clamp(low, high)``'s values, through ``hardtanh``.

    Its backward is one fused kernel, ten times faster on the CPU than clamp's (a cloak step of
    MobileFace V2, whose ReLU6 is a max and a min, spent a third of its time there). The gradient
    differs only where ``x`` equals a bound.
    """
    return F.hardtanh(x, low, high)


def _simple(function: Callable[..., Tensor]) -> Callable[[Attrs], OpFn]:
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


BUILDERS: dict[str, Callable[[Attrs], OpFn]] = {
    "Convolution": build_convolution,
    "BatchNorm": _build_batch_norm,
    "Activation": _build_activation,
    "LeakyReLU": _build_leaky_relu,
    "Pooling": _build_pooling,
    "FullyConnected": build_fully_connected,
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
        BUILDERS[_name] = _simple(_function)
for _names, _scalar_function in (
    (("_plus_scalar", "_PlusScalar"), lambda x, s: x + s),
    (("_minus_scalar", "_MinusScalar"), lambda x, s: x - s),
    (("_rminus_scalar", "_RMinusScalar"), lambda x, s: s - x),
    (("_mul_scalar", "_MulScalar"), lambda x, s: x * s),
    (("_div_scalar", "_DivScalar"), lambda x, s: x / s),
    (("_rdiv_scalar", "_RDivScalar"), lambda x, s: s / x),
    (("_maximum_scalar", "_MaximumScalar"), lambda x, s: _bounded(x, s, math.inf)),
    (("_minimum_scalar", "_MinimumScalar"), lambda x, s: _bounded(x, -math.inf, s)),
    (("_power_scalar", "_PowerScalar"), lambda x, s: x**s),
):
    for _name in _names:
        BUILDERS[_name] = partial(_build_scalar, _scalar_function)
del _names, _name, _function, _scalar_function

LABEL_INPUTS: dict[str, int] = {
    "SoftmaxOutput": 1,
    "Softmax": 1,
    "LinearRegressionOutput": 1,
    "MAERegressionOutput": 1,
    "LogisticRegressionOutput": 1,
}
"""Loss heads: input index of the label, which inference never reads."""

BATCH_NORM_STATES = ("gamma", "beta", "moving_mean", "moving_var")
"""BatchNorm's inputs after the data, named ``<node>_<state>`` when very old graphs leave them out."""

SUPPORTED_OPERATORS: frozenset[str] = frozenset(BUILDERS)
"""MXNet operator names `MXNetGraph` can execute (aliases included)."""
