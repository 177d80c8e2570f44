"""Folding inference BatchNorm into convolutions: same outputs, fewer nodes, gradients still flow."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from facecloak.models.fold import fold_fx_batch_norm
from facecloak.models.mxnet import load_mxnet_model


def randomise_statistics(*norms: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in norms:
            for tensor, low, high in (
                (norm.running_mean, -1, 1),
                (norm.running_var, 0.5, 2),
                (norm.weight, 0.5, 2),
                (norm.bias, -1, 1),
            ):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


class SmallNet(nn.Module):
    """conv -> BN, depthwise conv (no bias) -> x * c + d, linear -> BN1d; and a BN it must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.register_buffer("shift", torch.linspace(-1, 1, 8).view(8, 1, 1))
        self.shared = nn.Conv2d(8, 8, 1)
        self.bn_after_shared = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.depthwise(x) * self.scale + self.shift)
        y = self.shared(x)
        x = self.bn_after_shared(y) + y  # y has two readers: not foldable
        return self.bn1d(self.fc(x.mean(dim=(2, 3))))


def test_fx_fold_is_exact_and_removes_the_nodes():
    net = SmallNet()
    randomise_statistics(net.bn, net.bn_after_shared, net.bn1d)
    graph = torch.fx.symbolic_trace(net.eval())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = graph(x)
    assert fold_fx_batch_norm(graph) == 4  # bn, the multiply, the add, bn1d
    kinds = Counter(type(module).__name__ for module in graph.modules())
    assert kinds["BatchNorm2d"] == 1 and kinds["BatchNorm1d"] == 0
    assert graph.depthwise.bias is not None
    chips = x.clone().requires_grad_(True)
    out = graph(chips)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert chips.grad is not None and torch.isfinite(chips.grad).all()
    assert fold_fx_batch_norm(nn.Linear(2, 2)) == 0  # not a graph: left alone


def test_mxnet_fold_on_mobileface(mobileface_dir):
    symbol = mobileface_dir / "MobileFace_Identification_V2-symbol.json"
    original, folded = load_mxnet_model(symbol), load_mxnet_model(symbol)
    assert folded.fold_batch_norm() == original.operator_counts["BatchNorm"] == 38
    assert "BatchNorm" not in folded.operator_counts
    assert folded.operator_counts["Convolution"] == 37
    assert not any("moving_var" in key for key in folded.state_dict())
    x = (torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 255).requires_grad_(True)
    expected = original(x).detach()
    out = folded(x)
    assert float((out.detach() - expected).abs().max() / expected.abs().max()) < 1e-5
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_hse_onnx_fold(tmp_path):
    """The HSE MobileNet (BatchNorm frozen as Mul and Add after each depthwise conv), if present."""
    pytest.importorskip("onnx2torch")
    from conftest import models_root
    from facecloak.models.loaders import load_network

    path = models_root() / "hse-mobilenet-vggface2" / "hse_mobilenet_vggface2.onnx"
    if not path.is_file():
        pytest.skip(f"shared HSE model not found at {path}")
    import onnx
    from onnx2torch import convert

    original = convert(onnx.load(str(path))).eval()
    folded = load_network(path)
    names = Counter(type(module).__name__ for module in folded.modules())
    assert (
        names["OnnxBinaryMathOperation"]
        == Counter(type(module).__name__ for module in original.modules())["OnnxBinaryMathOperation"] - 26
    )
    x = torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(2)) * 255 - 120
    with torch.no_grad():
        expected, out = original(x), folded(x)
    assert float((out - expected).abs().max() / expected.abs().max()) < 1e-5
