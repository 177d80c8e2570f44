"""Fold inference-time BatchNorm (and BatchNorm exported as Mul/Add) into the convolution before it.

In inference a BatchNorm is a per-channel ``scale x + shift``, so ``bn(conv(x))`` is one
convolution with scaled filters and a shifted bias: the same function to float rounding, with one
pass over the activations fewer per pair, which is much of what a small network costs on a CPU.
`facecloak.models.mxnet.MXNetGraph.fold_batch_norm` does it for MXNet graphs; this module
does it for ``torch.fx`` graphs, the form onnx2torch gives ONNX models. It folds:

- ``BatchNorm1d/2d/3d`` (eval statistics) after a ``Conv1d/2d/3d`` or a ``Linear``;
- a multiplication, division, addition or subtraction by a constant that varies along the channel
  axis only (how TensorFlow and some ONNX exporters write a frozen BatchNorm), after a convolution.

A pair is folded only when the convolution's output has no other reader and its module is used
once; everything else is left as it is. The new weights are computed in float64, then cast back.

Example:
    >>> module = convert(onnx.load("model.onnx"))  # doctest: +SKIP
    >>> fold_fx_batch_norm(module)  # doctest: +SKIP
    13
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import Tensor, fx, nn

__all__ = ["fold_fx_batch_norm"]

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ARITHMETIC = {
    torch.mul: "mul",
    operator.mul: "mul",
    torch.div: "div",
    operator.truediv: "div",
    torch.add: "add",
    operator.add: "add",
    torch.sub: "sub",
    operator.sub: "sub",
}


@torch.no_grad()
def fold_fx_batch_norm(module: nn.Module) -> int:
    """Fold BatchNorm-like per-channel affine nodes of a ``torch.fx.GraphModule`` into convolutions, in place.

    Args:
        module: a ``GraphModule`` (anything else is left alone).

    Returns:
        How many nodes were folded away.
    """
    if not isinstance(module, fx.GraphModule):
        return 0
    uses = Counter(node.target for node in module.graph.nodes if node.op == "call_module")
    folded = 0
    for node in list(module.graph.nodes):
        producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if producer is None or len(producer.users) != 1 or producer.op != "call_module":
            continue
        if uses[producer.target] != 1:
            continue
        layer = _last_layer(module.get_submodule(str(producer.target)))
        if layer is None:
            continue
        scale_shift = _affine_of(module, node, layer)
        if scale_shift is None:
            continue
        _apply(layer, *scale_shift)
        node.replace_all_uses_with(producer)
        module.graph.erase_node(node)
        folded += 1
    if folded:
        module.graph.lint()
        module.delete_all_unused_submodules()
        module.recompile()
    return folded


def _last_layer(layer: nn.Module) -> nn.Module | None:
    """The convolution (or linear layer) whose output ``layer`` returns, if it is one."""
    while isinstance(layer, nn.Sequential) and len(layer):
        layer = layer[-1]
    return layer if isinstance(layer, (*_CONVOLUTIONS, nn.Linear)) else None


def _affine_of(module: fx.GraphModule, node: fx.Node, layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)`` per output channel if ``node`` computes ``scale * input + shift``, else None."""
    channels = layer.out_channels if isinstance(layer, _CONVOLUTIONS) else layer.out_features
    if node.op == "call_module":
        target = module.get_submodule(str(node.target))
        if isinstance(target, _BATCH_NORMS) and not target.training and target.running_mean is not None:
            if isinstance(layer, nn.Linear) and not isinstance(target, nn.BatchNorm1d):
                return None
            scale = target.running_var.double().add(target.eps).rsqrt()
            if target.weight is not None:
                scale = scale * target.weight.double()
            shift = -target.running_mean.double() * scale
            if target.bias is not None:
                shift = shift + target.bias.double()
            return (scale, shift) if len(scale) == channels else None
        function = getattr(target, "math_op_function", None)  # onnx2torch's OnnxBinaryMathOperation
        if function is None or getattr(target, "broadcast", None) == 1 or len(node.args) != 2:
            return None
    elif node.op == "call_function":
        function = node.target
        if len(node.args) != 2 or node.kwargs:
            return None
    else:
        return None
    kind = _ARITHMETIC.get(function)
    constant = _constant(module, node.args[1])
    if kind is None or constant is None or not isinstance(layer, _CONVOLUTIONS):
        return None
    spatial = layer.weight.ndim - 2
    if constant.ndim > spatial + 2 or any(size != 1 for size in constant.shape[-spatial:]):
        return None
    leading = constant.shape[: constant.ndim - spatial] if constant.ndim > spatial else ()
    if any(size != 1 for size in leading[:-1]) or (leading and leading[-1] not in (1, channels)):
        return None  # varies along something other than the channels (or the batch)
    values = constant.double().reshape(-1).expand(channels)
    ones, zeros = torch.ones_like(values), torch.zeros_like(values)
    return {
        "mul": (values, zeros),
        "div": (1 / values, zeros),
        "add": (ones, values),
        "sub": (ones, -values),
    }[kind]


def _constant(module: fx.GraphModule, argument: object) -> Tensor | None:
    """The tensor a ``get_attr`` node holds, if ``argument`` is one."""
    if not isinstance(argument, fx.Node) or argument.op != "get_attr":
        return None
    value = module
    for part in str(argument.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, Tensor) and value.is_floating_point() else None


def _apply(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Make ``layer(x)`` compute ``scale * layer(x) + shift`` per output channel."""
    weight = layer.weight
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    weight.copy_((weight.double() * scale.view(-1, *[1] * (weight.ndim - 1))).to(weight.dtype))
    new_bias = (bias * scale + shift).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)
