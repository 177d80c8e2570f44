"""Feature dropout: each surrogate becomes a random self-ensemble while the cloak is optimised.

DFANet (Zhong & Deng, 2021) drops a share of every convolution's output at each attack step, so
the perturbation cannot lean on a few units of one network and carries over better to networks it
never saw. The clean embeddings and every check stay on the exact, undropped model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def _drop(features: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """Zero a random ``rate`` of ``features`` and rescale the rest (inverted dropout)."""
    keep = torch.rand(features.shape, generator=generator, device=features.device) >= rate
    return features * keep.to(features.dtype) / (1.0 - rate)


@contextmanager
def feature_dropout(models: Sequence[nn.Module], rate: float, generator: torch.Generator) -> Iterator[None]:
    """Within the block, every convolution of ``models`` drops ``rate`` of its outputs at random.

    Works on any torch module whose convolutions are `nn.Conv2d` (our dlib port, ONNX imports) and
    on imported MXNet graphs (their ``feature_hook``). ``rate`` 0 changes nothing.
    """
    if rate <= 0:
        yield
        return
    if not 0 < rate < 1:
        raise ValueError(f"feature dropout rate must be in [0, 1), got {rate}")

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        return _drop(output, rate, generator)

    handles = []
    graphs = []
    try:
        for model in models:
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    handles.append(module.register_forward_hook(hook))
                elif hasattr(module, "feature_hook"):
                    module.feature_hook = lambda output: _drop(output, rate, generator)
                    graphs.append(module)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for graph in graphs:
            graph.feature_hook = None
