"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

This is the network behind dlib's ``face_recognition_model_v1`` and the ``face_recognition``
package, the most common embedder in hobby scrapers, so it is the first model a cloak must fool.
The port is exact: on real LFW chips it matches dlib's own descriptors to about 1e-6, and unlike
dlib it is differentiable with respect to the chip.

Architecture (dlib's ``dnn_face_recognition_ResNet`` example, ``anet_type``), input to output:
    - ``input_rgb_image_sized<150>``: RGB 0..255, minus the per-channel mean, divided by 256.
    - stem: ``con<32,7,7,2,2>`` (no padding) -> ``affine`` -> ``relu`` -> ``max_pool<3,3,2,2>``
      (no padding): 150 -> 72 -> 35 pixels.
    - ``alevel4``: 3 ``ares<32>``; ``alevel3``: ``ares_down<64>`` + 3 ``ares<64>``; ``alevel2``:
      ``ares_down<128>`` + 2 ``ares<128>``; ``alevel1``: ``ares_down<256>`` + 2 ``ares<256>``;
      ``alevel0``: one ``ares_down<256>``. Spatial size 35 -> 17 -> 8 -> 4 -> 2.
    - ``avg_pool_everything`` -> ``fc_no_bias<128>``; ``loss_metric`` only trains, so the output is
      the raw 128-d descriptor, not L2-normalised. dlib's "same person below 0.6" is measured on
      these raw descriptors, which is why `DlibResNet` returns them as they are.

dlib's names are kept (``con``, ``affine``, ``ares``, ``ares_down``, ``alevel0`` ... ``alevel4``,
``fc``) so the code can be read side by side with the C++ template. Note that dlib numbers the
levels from the output end: ``alevel4`` runs first.

Example:
    >>> model = load_dlib_resnet(locate_dlib_resnet_weights())  # doctest: +SKIP
    >>> model(torch.rand(2, 3, 150, 150)).shape  # doctest: +SKIP
    torch.Size([2, 128])

"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.models.dlib_format import DlibLayer, locate_package_model, read_dlib_net
from facecloak.models.registry import Embedder, FaceModelCard, register_embedder
from facecloak.models.templates import DLIB_5POINT_TEMPLATE_150, DLIB_CHIP_SIZE_PX

__all__ = [
    "DLIB_MEAN_RGB",
    "DLIB_RESNET_CARD",
    "DLIB_RESNET_FILENAME",
    "Affine",
    "ARes",
    "AResDown",
    "DlibResNet",
    "add_prev",
    "load_dlib_resnet",
    "locate_dlib_resnet_weights",
]

DLIB_RESNET_FILENAME = "dlib_face_recognition_resnet_model_v1.dat"
"""The weights file, as shipped in the ``face_recognition_models`` package's ``models/`` folder."""

DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
"""dlib's ``input_rgb_image`` default mean (0..255); the value in the file is used when loading."""

DLIB_RESNET_CARD = FaceModelCard(
    name="dlib-resnet",
    input_size=DLIB_CHIP_SIZE_PX,
    template=DLIB_5POINT_TEMPLATE_150,
    landmarks="dlib5",
    alignment="dlib",
    embedding_dim=128,
    distance="euclidean",
    match_threshold=0.6,
    weights=f"{DLIB_RESNET_FILENAME} from the face-recognition-models package",
    license="CC0 (face_recognition_models package; dlib model by Davis King)",
    description="dlib's face-recognition ResNet (used by face_recognition), raw 128-d descriptors",
)


# --------------------------------------------------------------------------------------------------
# layers


class Affine(nn.Module):
    """dlib's ``affine_`` layer: a per-channel ``scale * x + shift``.

    dlib replaces each trained batch norm with this frozen affine map; keeping it as its own layer
    (rather than folding it into the convolution) keeps the weights exactly as stored.

    Args:
        channels: number of channels ``C``; input ``(N, C, H, W)``.

    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """Scale and shift each channel of ``x`` ``(N, C, H, W)``."""
        return torch.addcmul(self.shift[:, None, None], x, self.scale[:, None, None])  # one pass, not two


def add_prev(x: Tensor, y: Tensor) -> Tensor:
    """Add ``x + y`` as dlib's ``add_prev_`` does, zero-padding the smaller at the end of each dim.

    dlib sizes the output to the larger of each dimension and treats missing entries as zeros:
    extra channels are appended, extra rows and columns go at the bottom and right. This is how its
    downsampling blocks add a 32-channel shortcut to a 64-channel branch without a projection.
    """
    if x.shape == y.shape:
        return x + y
    channels, height, width = (max(a, b) for a, b in zip(x.shape[1:], y.shape[1:], strict=True))

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, width - t.shape[3], 0, height - t.shape[2], 0, channels - t.shape[1]))

    return pad(x) + pad(y)


def scale_gradient(x: Tensor, share: float) -> Tensor:
    """``x`` unchanged going forward; going back, only ``share`` of its gradient passes.

    The skip gradient method (Wu et al., ICLR 2020) sets ``share`` < 1 on residual branches so
    an attack follows the skip connections' lower-level, more transferable features.
    """
    if share == 1.0 or not x.requires_grad:
        return x
    return x * share + (x * (1.0 - share)).detach()


class ARes(nn.Module):
    """dlib's ``ares<N>``: ``relu(x + affine(con(relu(affine(con(x))))))``, 3x3 convs, stride 1.

    Args:
        channels: ``N``, the block's input and output channels.

    """

    DLIB_LAYERS = ("tag", "con", "affine", "relu", "con", "affine", "add_prev", "relu")
    """The dlib layers this block is made of, input to output (``tag`` stands for tag or skip)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.con1 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine1 = Affine(channels)
        self.con2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)

    branch_gradient = 1.0
    """Share of the gradient that flows back through the residual branch (`scale_gradient`)."""

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)``."""
        y = F.relu(self.affine1(self.con1(x)))
        y = scale_gradient(self.affine2(self.con2(y)), self.branch_gradient)
        return F.relu(x + y)


class AResDown(nn.Module):
    """dlib's ``ares_down<N>``: halves the resolution, with a parameter-free shortcut.

    ``relu(add_prev(affine(con(relu(affine(con_s2(x))))), avg_pool_2x2(x)))``. The first conv has
    stride 2 and, as dlib's default for strided convs, no padding; the shortcut is a 2x2 average
    pool, stride 2, with no projection. Where the two differ in size (channels, or 3 vs 4 pixels at
    the 8 -> 4 step), `add_prev` zero-pads the smaller one.

    Args:
        in_channels: channels of the input.
        out_channels: ``N``, channels of the output.

    """

    DLIB_LAYERS = (
        "tag", "con", "affine", "relu", "con", "affine", "tag", "tag", "avg_pool", "add_prev", "relu",
    )  # fmt: skip
    """The dlib layers this block is made of, input to output (``tag`` stands for tag or skip)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.con1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=0)
        self.affine1 = Affine(out_channels)
        self.con2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.affine2 = Affine(out_channels)

    branch_gradient = 1.0
    """Share of the gradient that flows back through the residual branch (`scale_gradient`)."""

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, ceil((H - 1) / 2), ...)``."""
        y = F.relu(self.affine1(self.con1(x)))
        y = scale_gradient(self.affine2(self.con2(y)), self.branch_gradient)
        return F.relu(add_prev(y, F.avg_pool2d(x, 2, stride=2)))


# --------------------------------------------------------------------------------------------------
# the network


class DlibResNet(Embedder):
    """dlib's face-recognition ResNet: aligned 150x150 RGB chips -> raw 128-d descriptors.

    Build it with `load_dlib_resnet` (or ``create_embedder("dlib-resnet")``); a bare
    ``DlibResNet()`` has random weights.

    Args:
        mean_rgb: per-channel mean (0..255) subtracted from the input, normally read from the file.

    """

    card = DLIB_RESNET_CARD

    def __init__(self, mean_rgb: tuple[float, float, float] = DLIB_MEAN_RGB) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.con = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.affine = Affine(32)
        self.alevel4 = nn.Sequential(ARes(32), ARes(32), ARes(32))
        self.alevel3 = nn.Sequential(AResDown(32, 64), ARes(64), ARes(64), ARes(64))
        self.alevel2 = nn.Sequential(AResDown(64, 128), ARes(128), ARes(128))
        self.alevel1 = nn.Sequential(AResDown(128, 256), ARes(256), ARes(256))
        self.alevel0 = AResDown(256, 256)
        self.fc = nn.Linear(256, 128, bias=False)

    @torch.no_grad()
    def fold_affine(self) -> DlibResNet:
        """Fold every frozen affine (batch-norm) layer into the conv before it, in place.

        ``affine(con(x)) = con'(x)`` with the filters scaled per output channel and the bias
        shifted: the same function (to float rounding) with a third fewer passes over memory,
        which is most of what a small CPU network spends its time on.
        """
        pairs = [(self, "con", "affine")]
        for level in (self.alevel4, self.alevel3, self.alevel2, self.alevel1, [self.alevel0]):
            for block in level:
                pairs += [(block, "con1", "affine1"), (block, "con2", "affine2")]
        for owner, con_name, affine_name in pairs:
            affine = getattr(owner, affine_name)
            if not isinstance(affine, Affine):
                continue
            con = getattr(owner, con_name)
            con.weight.mul_(affine.scale.view(-1, 1, 1, 1))
            con.bias.mul_(affine.scale).add_(affine.shift)
            setattr(owner, affine_name, nn.Identity())
        return self

    def forward(self, chips: Tensor) -> Tensor:
        """Embed aligned chips.

        Args:
            chips: ``(N, 3, 150, 150)`` float RGB in [0, 1], aligned like dlib's ``get_face_chip``
                with padding 0.25.

        Returns:
            ``(N, 128)`` descriptors, not normalised: exactly what dlib's
            ``compute_face_descriptor`` returns for the same chip.

        """
        if chips.ndim != 4 or tuple(chips.shape[1:]) != (3, DLIB_CHIP_SIZE_PX, DLIB_CHIP_SIZE_PX):
            raise InvalidInputError(f"chips must have shape (N, 3, 150, 150), got {tuple(chips.shape)}")
        x = ((chips * 255.0 - self.mean) / 256.0).contiguous(memory_format=torch.channels_last)
        x = F.relu(self.affine(self.con(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.alevel4(x)
        x = self.alevel3(x)
        x = self.alevel2(x)
        x = self.alevel1(x)
        x = self.alevel0(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x)


def _expected_layers(model: DlibResNet) -> list[str]:
    """List the dlib layer kinds of ``model``, input to output, as the .dat file must hold them."""
    kinds = ["con", "affine", "relu", "max_pool"]
    for level in (model.alevel4, model.alevel3, model.alevel2, model.alevel1, [model.alevel0]):
        for block in level:
            kinds.extend(block.DLIB_LAYERS)
    return [*kinds, "avg_pool", "fc"]


# --------------------------------------------------------------------------------------------------
# loading


def locate_dlib_resnet_weights() -> Path | None:
    """Find the weights file inside the installed ``face_recognition_models`` package, if any."""
    return locate_package_model(DLIB_RESNET_FILENAME)


def _load_con(conv: nn.Conv2d, layer: DlibLayer, fail: Callable[[str], NoReturn]) -> None:
    out_channels, in_channels, kh, kw = conv.weight.shape
    expected = (out_channels, kh, kw, *conv.stride, *conv.padding)
    if layer.config != expected:
        fail(f"con settings {layer.config}, expected {expected}")
    assert layer.params is not None
    if layer.params.size != out_channels * in_channels * kh * kw + out_channels:
        fail(f"con with {layer.params.size} parameters, expected {conv.weight.numel() + out_channels}")
    split = conv.weight.numel()
    conv.weight.data.copy_(torch.from_numpy(layer.params[:split].reshape(conv.weight.shape)))
    assert conv.bias is not None
    conv.bias.data.copy_(torch.from_numpy(layer.params[split:]))


def _load_affine(affine: Affine, layer: DlibLayer, fail: Callable[[str], NoReturn]) -> None:
    channels = affine.scale.numel()
    assert layer.params is not None
    if layer.config != (0,) or layer.params.size != 2 * channels:
        fail(
            f"affine with {layer.params.size} parameters in mode {layer.config}, expected {2 * channels} in 0"
        )
    affine.scale.data.copy_(torch.from_numpy(layer.params[:channels]))
    affine.shift.data.copy_(torch.from_numpy(layer.params[channels:]))


@register_embedder(DLIB_RESNET_CARD, locate=locate_dlib_resnet_weights)
def load_dlib_resnet(path: Path | str) -> DlibResNet:
    """Build `DlibResNet` from dlib's ``dlib_face_recognition_resnet_model_v1.dat``.

    The file is parsed with `read_dlib_net` (no dlib, no pickle), its layer sequence is checked
    against the architecture, and the weights are copied in forward order. Weight-key mapping
    (dlib layers counted in forward order, input first):

    =========================================  ================================================
    state_dict key                             dlib source
    =========================================  ================================================
    ``mean``                                   ``input_rgb_image_sized`` avg_red/green/blue
    ``con.weight`` / ``con.bias``              con_ #0 params: ``(32, 3, 7, 7)`` filters, then
                                               32 biases
    ``affine.scale`` / ``affine.shift``        affine_ #0 params: 32 gammas, then 32 betas
    ``alevel4.{0,1,2}.con{1,2}.*``             con_ #1-#6, two per ``ares<32>``, same layout
    ``alevel4.{0,1,2}.affine{1,2}.*``          affine_ #1-#6
    ``alevel3.0.*`` (``ares_down<64>``),       con_/affine_ #7-#14, ``con1`` has stride 2
    ``alevel3.{1,2,3}.*``
    ``alevel2.{0,1,2}.*``                      con_/affine_ #15-#20
    ``alevel1.{0,1,2}.*``                      con_/affine_ #21-#26
    ``alevel0.*`` (``ares_down<256>``)         con_/affine_ #27-#28
    ``fc.weight``                              fc_ params ``(256, 128)`` (inputs, outputs),
                                               transposed; no bias (bias mode 1)
    =========================================  ================================================

    Args:
        path: the ``.dat`` file.

    Returns:
        The model on the CPU, float32, in eval mode.

    Raises:
        ModelNotFoundError: the file is missing, truncated, or is not this network.

    """
    net = read_dlib_net(path)

    def fail(reason: str) -> NoReturn:
        raise ModelNotFoundError(f"not dlib's face recognition ResNet: {reason}", path)

    if net.input_size not in (None, (DLIB_CHIP_SIZE_PX, DLIB_CHIP_SIZE_PX)):
        fail(f"input size {net.input_size}, expected 150x150")
    model = DlibResNet(net.mean_rgb)
    kinds = [layer.kind for layer in net.layers]
    expected = _expected_layers(model)
    if kinds != expected:
        kinds.append("the end")
        expected.append("the end")
        index = next(
            i for i, (ours, theirs) in enumerate(zip(kinds, expected, strict=False)) if ours != theirs
        )
        fail(f"layer {index} is {kinds[index]}, expected {expected[index]}")

    pools = [layer.config for layer in net.layers if layer.kind in ("max_pool", "avg_pool")]
    if pools != [(3, 3, 2, 2, 0, 0)] + [(2, 2, 2, 2, 0, 0)] * 4 + [(0, 0, 1, 1, 0, 0)]:
        fail(f"pooling settings {pools}")
    trained = [layer for layer in net.layers if layer.kind in ("con", "affine")]
    ours = [module for module in model.modules() if isinstance(module, (nn.Conv2d, Affine))]
    for module, layer in zip(ours, trained, strict=True):
        if isinstance(module, nn.Conv2d):
            _load_con(module, layer, fail)
        else:
            _load_affine(module, layer, fail)

    fc = net.layers[-1]
    assert fc.params is not None
    if fc.config != (128, 256, 1) or fc.params.size != 256 * 128:
        fail(f"fc settings (outputs, inputs, bias mode) {fc.config}, expected (128, 256, 1)")
    model.fc.weight.data.copy_(torch.from_numpy(fc.params.reshape(256, 128).T.copy()))
    # channels-last weights: the CPU's convolutions run a forward pass 1.4x faster, and a cloak
    # step's forward and backward 1.2x (2 cores); the values are unchanged.
    return model.fold_affine().eval().to(memory_format=torch.channels_last)
