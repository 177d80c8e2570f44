"""Foreign model files -> differentiable torch modules: ONNX (onnx2torch) and MXNet (our own reader).

Nothing is fetched: the user names the file. Inference BatchNorm layers are folded into the
convolution before them (`facecloak.models.fold`, `MXNetGraph.fold_batch_norm`). Every failure is a
one-line `ModelNotFoundError` naming the file (the convention of `facecloak.models.file_reader`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecloak.errors import FacecloakError, ModelNotFoundError
from facecloak.models.fold import fold_fx_batch_norm
from facecloak.models.mxnet import load_mxnet_model
from facecloak.models.mxnet.graph import _default_params_path

__all__ = ["MODEL_FILE_PATTERNS", "declared_input_shape", "load_network", "missing_model_file"]

MODEL_FILE_PATTERNS = ("*.onnx", "*-symbol.json")
"""Files `load_network` reads: ONNX models and MXNet graphs (with their params beside them)."""


def _pairwise(operator, *tensors: Tensor) -> Tensor:
    out = tensors[0]
    for tensor in tensors[1:]:
        out = operator(out, tensor)
    return out


def _fast_elementwise(network: nn.Module) -> nn.Module:
    """Make onnx2torch's Min/Max nodes (ReLU6 in TensorFlow exports) pairwise ``minimum``/``maximum``.

    onnx2torch broadcasts every input to the full shape, stacks and reduces: the same values at
    several times the cost, forward and backward, on every cloak step. Pairwise is exact.
    """
    try:
        from onnx2torch.node_converters.min_max import OnnxMinMax
    except ImportError:  # pragma: no cover - another onnx2torch layout: keep its own
        return network
    for module in network.modules():
        if isinstance(module, OnnxMinMax):
            operator = torch.minimum if module._op_type == "Min" else torch.maximum
            module.apply_reduction = functools.partial(_pairwise, operator)
    return network


def _scalar_constant(network: nn.Module, node) -> float | None:
    """The value of an fx ``get_attr`` node holding a one-element tensor, else None."""
    if getattr(node, "op", None) != "get_attr":
        return None
    value = network
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    return None


def _fuse_relu6(network: nn.Module) -> nn.Module:
    """Rewrite ``Max(Min(Relu(x), a), b)`` (TensorFlow's ReLU6 in ONNX) as one ``hardtanh(x, 0, a)``.

    Three passes over memory become one, forward and backward: about a quarter of the HSE
    MobileNet's time. ``hardtanh`` (PyTorch's ReLU6), not ``clamp``: the same values, and a
    backward pass ten times faster on the CPU (one fused kernel instead of two comparisons and a
    select; the gradient differs only at exactly 0 or ``a``, where ``Relu`` already passes none).
    Only the exact case ``b <= 0 <= a`` is rewritten, where both are the same function; anything
    else is left as it was.
    """
    graph = getattr(network, "graph", None)
    if graph is None:
        return network
    modules = dict(network.named_modules())

    def kind(node) -> str | None:
        if node.op != "call_module":
            return None
        module = modules.get(str(node.target))
        if isinstance(module, nn.ReLU):
            return "Relu"
        return getattr(module, "_op_type", None)

    changed = False
    for node in list(graph.nodes):
        if kind(node) != "Max" or len(node.args) != 2:
            continue
        inner = node.args[0]
        if not hasattr(inner, "op") or kind(inner) != "Min" or len(inner.args) != 2 or len(inner.users) != 1:
            continue
        relu = inner.args[0]
        if not hasattr(relu, "op") or kind(relu) != "Relu" or len(relu.users) != 1:
            continue
        high, low = _scalar_constant(network, inner.args[1]), _scalar_constant(network, node.args[1])
        if high is None or low is None or not low <= 0.0 <= high:
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(F.hardtanh, (relu.args[0], 0.0, high))
        node.replace_all_uses_with(fused)
        for dead in (node, inner, relu):
            graph.erase_node(dead)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        network.recompile()
    return network


def load_network(file: Path, params: str | None = None) -> nn.Module:
    """An ONNX or MXNet file as a differentiable torch module (no weights are fetched).

    ``params``: an MXNet graph's params file, by name beside it (default: the highest epoch there).

    Inference BatchNorm layers (and BatchNorm exported as a per-channel multiply and add) are
    folded into the convolution before them (`facecloak.models.fold`,
    `MXNetGraph.fold_batch_norm`): the same function to float rounding (MobileFace V2's
    embeddings move by under 2e-6 relative), one pass over memory fewer per layer.
    """
    file = Path(file)
    if not file.is_file():
        raise ModelNotFoundError("model file not found", file)
    name = file.name.lower()
    if name.endswith(".onnx"):
        try:
            import onnx
            from onnx2torch import convert
        except ImportError:
            raise ModelNotFoundError(
                "ONNX models need the onnx extra: pip install 'facecloak[onnx]'", file
            ) from None
        try:
            network = _fuse_relu6(_fast_elementwise(convert(onnx.load(str(file)))))
        except Exception as error:  # onnx and onnx2torch raise many types for a bad file
            detail = str(error).splitlines()[0][:120] if str(error) else ""
            raise ModelNotFoundError(
                f"not a usable ONNX model ({type(error).__name__}: {detail})", file
            ) from None
        fold_fx_batch_norm(network.eval())
        return check_finite_weights(network, file)
    if file.name.endswith("-symbol.json"):
        try:
            graph = load_mxnet_model(file, file.with_name(params) if params else None)
            graph.fold_batch_norm()
        except FacecloakError:
            raise
        except Exception as error:  # a params array of another shape: a torch traceback at first use
            detail = str(error).splitlines()[0][:120] if str(error) else ""
            raise ModelNotFoundError(
                f"its params do not fit the graph ({type(error).__name__}: {detail}): "
                "the -symbol.json and the .params beside it must be one model's",
                file,
            ) from None
        return check_finite_weights(graph, file)
    if name.endswith(".json"):  # the params are found by the graph's name: "pass params=" was no option here
        raise ModelNotFoundError(
            "an MXNet graph must be named NAME-symbol.json, with its NAME-0000.params beside it", file
        )
    raise ModelNotFoundError("unsupported model file: expected .onnx or an MXNet NAME-symbol.json", file)


def check_finite_weights(network: nn.Module, file: Path) -> nn.Module:
    """``network``, unless a weight or buffer holds NaN or infinity (a damaged or badly exported file).

    Such a file embedded every face as NaN: `verify` said "DIFFERENT people: distance nan", and a
    cloak blamed the photo ("pixels must hold finite values").
    """
    for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            reason = f"its weights hold NaN or infinite values ({name}): a damaged file"
            raise ModelNotFoundError(reason, file)
    return network


def declared_input_shape(file: Path) -> tuple[str, tuple[int | None, ...]] | None:
    """The name and shape of the input an ONNX file declares (a dynamic dim is None), else None.

    Read so that ``models add`` can check its input size and layout against the file: a
    channels-last 224 px file added as 112 px ran (its pooling takes any size) and was saved as a
    card that embedded garbage. None for an MXNet graph, which declares no shape, or a file with
    no single declared image input.
    """
    if not Path(file).name.lower().endswith(".onnx"):
        return None
    try:
        import onnx

        graph = onnx.load(str(file), load_external_data=False).graph
    except Exception:  # unreadable: `load_network` says why
        return None
    weights = {initializer.name for initializer in graph.initializer}
    inputs = [entry for entry in graph.input if entry.name not in weights]
    if len(inputs) != 1 or not inputs[0].type.HasField("tensor_type"):
        return None
    tensor = inputs[0].type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = tuple(
        dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in tensor.shape.dim
    )
    return inputs[0].name, dims


def files_read(file: Path, params: str | None = None) -> list[Path]:
    """The files `load_network` reads for ``file``: the file, and an MXNet graph's params beside it."""
    file = Path(file)
    if file.name.endswith("-symbol.json"):
        return [file, file.with_name(params) if params else _default_params_path(file, None)]
    return [file]


FINGERPRINT_BYTES = 1 << 20


def file_fingerprint(files: list[Path]) -> str:
    """What ``files`` hold, cheaply: each one's size and the SHA-256 of its first and last MiB.

    An added model's card named a path, not what was there: weights re-exported to the same path,
    or another epoch dropped beside an MXNet graph, were used with the old threshold without a
    word. Two MiB a file, so a 250 MB model costs milliseconds at every start, not a full hash.
    """
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            digest.update(f"{Path(file).name}:{size}:".encode())
            digest.update(stream.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                stream.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(stream.read())
    return digest.hexdigest()[:32]


def missing_model_file(file: Path, params: str | None = None) -> Path | None:
    """The first file `load_network` would read for ``file`` that is not there, else None.

    An MXNet graph needs its params beside it: with them moved away, the model was listed as
    available and every command that uses all available models failed on it.
    """
    for path in files_read(file, params):
        if not path.is_file():
            return path
    return None
