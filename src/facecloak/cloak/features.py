"""Intermediate-feature loss: push a middle layer's features away, not only the embedding.

Feature-level attacks (ILA, Huang et al. 2019; FIA, Wang et al. 2021) transfer better than
attacks on the last layer alone: middle layers hold edges, textures and parts that networks
trained on other data learn too, while the embedding is particular to one model. A `FeatureTap`
records one convolution's output at a chosen relative depth of each model during a forward pass;
`feature_displacement` measures how far a cloaked face's features moved from its clean ones.
"""

from __future__ import annotations

from torch import Tensor, nn


class FeatureTap:
    """Records the output of the convolution at relative ``depth`` (0 first, 1 last) of a model.

    Works on torch modules built of `nn.Conv2d` (our dlib port, ONNX imports) and on imported
    MXNet graphs (their ``feature_hook``, called on every convolution's output in order). Use as
    a context manager; after each forward pass inside it, ``value`` holds that pass's features.

    Example:
        >>> with FeatureTap(model, 0.5) as tap:  # doctest: +SKIP
        ...     model(chips)
        >>> tap.value.shape  # doctest: +SKIP
        torch.Size([8, 64, 36, 36])
    """

    def __init__(self, model: nn.Module, depth: float) -> None:
        if not 0 <= depth <= 1:
            raise ValueError(f"feature depth must be in [0, 1], got {depth}")
        self.model, self.depth = model, float(depth)
        self.value: Tensor | None = None
        self._handles: list = []
        self._graph: nn.Module | None = None
        self._previous = None
        self._count = 0

    def _record(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        self.value = output

    def __enter__(self) -> FeatureTap:
        convolutions = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        graphs = [m for m in self.model.modules() if hasattr(m, "feature_hook")]
        if convolutions:
            chosen = convolutions[round(self.depth * (len(convolutions) - 1))]
            self._handles.append(chosen.register_forward_hook(self._record))
        elif graphs:
            self._tap_graph(graphs[0])
        else:
            raise ValueError(f"{type(self.model).__name__} has no convolution to take features from")
        return self

    def _tap_graph(self, graph: nn.Module) -> None:
        total = sum(1 for step in getattr(graph, "_steps", ()) if step.op == "Convolution")
        if total == 0:
            raise ValueError("the imported graph has no convolution to take features from")
        wanted = round(self.depth * (total - 1))
        previous = graph.feature_hook

        def hook(output: Tensor) -> Tensor:
            output = previous(output) if previous is not None else output
            if self._count == wanted:
                self.value = output
            self._count += 1
            return output

        def reset(_module: nn.Module, _inputs: tuple) -> None:
            self._count = 0

        self._graph, self._previous = graph, previous
        graph.feature_hook = hook
        self._handles.append(graph.register_forward_pre_hook(reset))

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._graph is not None:
            self._graph.feature_hook = self._previous
            self._graph = None


def feature_displacement(cloaked: Tensor, clean: Tensor) -> Tensor:
    """(n,) relative distance ``||cloaked - clean|| / ||clean||`` of (n, ...) feature maps."""
    clean = clean.detach()
    difference = (cloaked - clean).flatten(1).norm(dim=1)
    return difference / clean.flatten(1).norm(dim=1).clamp_min(1e-6)
