"""Skip-gradient surrogates: residual networks back-propagate mostly through their skips.

The skip gradient method (Wu et al., "Skip connections matter", ICLR 2020) scales the gradient
that flows back through each residual branch by ``share`` < 1, leaving the forward pass exact.
The attack then leans on the lower-level features the skips carry, which other networks share,
instead of the deep features particular to one model. Models opt in by giving their residual
blocks a ``branch_gradient`` attribute (our dlib port does); others are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


@contextmanager
def skip_gradient(models: Sequence[nn.Module], share: float) -> Iterator[None]:
    """Within the block, residual branches of ``models`` pass back ``share`` of their gradient.

    ``share`` 1 changes nothing; the forward pass (embeddings, distances, checks) is never changed.
    """
    if not 0 < share <= 1:
        raise ValueError(f"skip-gradient share must be in (0, 1], got {share}")
    if share == 1.0:
        yield
        return
    blocks = [module for model in models for module in model.modules() if hasattr(module, "branch_gradient")]
    try:
        for block in blocks:
            block.branch_gradient = share
        yield
    finally:
        for block in blocks:
            del block.branch_gradient  # back to the class default
