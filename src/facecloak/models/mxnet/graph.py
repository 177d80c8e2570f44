"""An MXNet symbol graph (``NAME-symbol.json``) with its weights, run as a differentiable torch module.

`MXNetGraph` executes the JSON graph node by node with the operators of
`facecloak.models.mxnet.ops`; `load_mxnet_model` finds the ``.params`` beside the symbol file and
reads it with `facecloak.models.mxnet.params`.
"""

from __future__ import annotations

import glob
import json
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.models.mxnet.ops import (
    BATCH_NORM_STATES,
    BUILDERS,
    LABEL_INPUTS,
    Attrs,
    OpFn,
    build_convolution,
    build_fully_connected,
    node_attrs,
)
from facecloak.models.mxnet.params import read_params_file

__all__ = ["MXNetGraph", "load_mxnet_model"]

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
    attrs: Attrs


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
        self.feature_hook: Callable[[Tensor], Tensor] | None = None
        """Applied to every convolution's output when set (`facecloak.cloak.dropout`)."""
        symbol_where = None if symbol_path is None else str(symbol_path)
        params_where = None if params_path is None else str(params_path)

        def fail(reason: str) -> NoReturn:
            raise ModelNotFoundError(reason, symbol_where) from None

        _check_graph(graph, symbol_where)
        nodes, heads = graph["nodes"], graph.get("heads")
        try:
            node_inputs = [[(int(ref[0]), int(ref[1])) for ref in node.get("inputs", [])] for node in nodes]
            head = self._pick_output(nodes, heads, output, fail)
        except (TypeError, ValueError, IndexError) as err:
            fail(f"not an MXNet symbol graph: malformed inputs or heads ({err})")
        for index, refs in enumerate(node_inputs):
            if any(not 0 <= ref < index for ref, _ in refs):
                fail(f"node {index} ({nodes[index].get('name')}) is not in topological order")

        # Keep the nodes the output depends on; label inputs of loss heads are never needed.
        needed = {head[0]}
        label_refs: set[tuple[int, int]] = set()
        for index in range(head[0], -1, -1):
            if index not in needed:
                continue
            op = str(nodes[index].get("op", "null"))
            for slot, ref in enumerate(node_inputs[index]):
                if LABEL_INPUTS.get(op) == slot:
                    label_refs.add((index, slot))
                else:
                    needed.add(ref[0])

        # Unsupported operators are reported before anything else, in graph order.
        for index in sorted(needed):
            op, name = str(nodes[index].get("op", "null")), str(nodes[index].get("name", index))
            if op != "null" and op not in BUILDERS:
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
            fail("graph has no data input (every input node is a weight)")
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
            attrs = Attrs(node_attrs(node), op, name, symbol_where)
            refs: list[tuple[str, Any, int]] = []
            for slot, (ref, out_index) in enumerate(node_inputs[index]):
                if (index, slot) in label_refs:
                    continue
                if nodes[ref].get("op", "null") == "null" and ref != self._input_node:
                    refs.append(weight_ref(str(nodes[ref].get("name"))))
                else:
                    refs.append(("value", ref, out_index))
            if op == "BatchNorm" and len(refs) < 5:  # pre-0.9 graphs leave out the aux states
                refs += [weight_ref(f"{name}_{state}") for state in BATCH_NORM_STATES[len(refs) - 1 :]]
            if op == "BatchNorm" and len(refs) != 5:
                attrs.fail(f"expected 5 inputs, got {len(refs)}")
            steps.append(_Step(index, name, op, BUILDERS[op](attrs), tuple(refs), attrs))

        for step in steps:
            for kind, ref, out_index in step.inputs:
                if kind == "value" and out_index != 0:
                    fail(
                        f"node {step.name} reads output {out_index} of node {ref}; only output 0 is supported"
                    )
        if head[1] != 0:
            fail(f"output {head[1]} of node {head[0]} is requested; only output 0 is supported")

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
        builder = build_convolution if producer.op == "Convolution" else build_fully_connected
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
        fail: Callable[[str], NoReturn],
    ) -> tuple[int, int]:
        """Find the (node, output index) to return: `output` by name, else the graph's first head."""
        if output is None:
            if not isinstance(heads, list) or not heads:
                fail("not an MXNet symbol graph: no 'heads'")
            return int(heads[0][0]), int(heads[0][1])
        candidates = [(output, 0)]
        suffixed = re.fullmatch(r"(.+)_output(\d*)", output)  # MXNet's internal names: fc1_output
        if suffixed:
            candidates.append((suffixed.group(1), int(suffixed.group(2) or 0)))
        for candidate, out_index in candidates:
            for index in range(len(nodes) - 1, -1, -1):
                if nodes[index].get("name") == candidate and nodes[index].get("op", "null") != "null":
                    return index, out_index
        fail(f"the graph has no operator node named {output!r}")

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
                if self.feature_hook is not None and step.op == "Convolution":
                    values[step.node] = self.feature_hook(values[step.node])
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
    weights = read_params_file(params_path)
    model = MXNetGraph(
        graph,
        weights.arrays,
        aux_names=weights.aux_names,
        output=output,
        symbol_path=symbol_json,
        params_path=params_path,
    )
    return model.eval()
