"""Run MXNet face models (``NAME-symbol.json`` + ``NAME-0000.params``) as differentiable PyTorch modules.

Much of the published face-recognition zoo (insightface's ArcFace ResNets and MobileFaceNets,
MobileFace, ...) ships only as an MXNet symbol graph plus a binary ``.params`` file. MXNet is no longer
maintained and does not install on current Pythons, so this package reads both formats itself:

- `params`: the ``.params`` reader, following ``NDArray::Save``/``NDArray::Load`` (mxnet
  ``src/ndarray/ndarray.cc``);
- `ops`: MXNet operators as ``torch.nn.functional`` calls, attributes parsed once at load time;
- `graph`: `MXNetGraph` executes the JSON graph node by node, so gradients reach the input image,
  which is what cloaking needs; `load_mxnet_model` pairs a symbol file with its weights.

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

from facecloak.models.mxnet.graph import MXNetGraph, load_mxnet_model
from facecloak.models.mxnet.ops import SUPPORTED_OPERATORS
from facecloak.models.mxnet.params import read_mxnet_params

__all__ = ["SUPPORTED_OPERATORS", "MXNetGraph", "load_mxnet_model", "read_mxnet_params"]
