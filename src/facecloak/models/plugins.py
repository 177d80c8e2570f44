"""Face models the user attaches (ONNX or MXNet files), wrapped as differentiable embedders.

This module is the wrapper: `PluginEmbedder` turns facecloak's chips (RGB in [0, 1]) into what
the file expects: optionally BGR, 0..255, minus ``mean`` and divided by ``std`` (both in the
model's own channel order), optionally channels-last (NHWC); `make_card` describes such a model.
A model either aligns by five landmarks onto a template, or sees a "box crop" (the detection box
widened by a margin). Reading the files is `facecloak.models.loaders`; remembering the models
the user added is `facecloak.models.user_models`.
"""

from __future__ import annotations

import os
import re
from copy import deepcopy
from pathlib import Path

import torch
from torch import Tensor, nn

from facecloak._checks import is_finite_number
from facecloak.errors import FacecloakError, InvalidInputError, ModelNotFoundError
from facecloak.models.loaders import declared_input_shape, file_fingerprint, files_read, load_network
from facecloak.models.registry import Embedder, FaceModelCard
from facecloak.models.templates import template_for

__all__ = [
    "CROPS",
    "DEFAULT_THRESHOLDS",
    "LAYOUTS",
    "NAME_PATTERN",
    "PluginEmbedder",
    "check_plugin_card",
    "load_model_file",
    "make_card",
]

DEFAULT_THRESHOLDS = {"cosine": 0.6, "euclidean": 1.0}
"""Match thresholds used when the user gives none (calibrate with --threshold for real use)."""

CROPS = ("landmarks", "box")
"""How a plug-in sees a face: aligned by five landmarks onto a template, or a widened box crop."""

LAYOUTS = ("nchw", "nhwc")

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A model's name, matched whole (``fullmatch``: ``$`` let a trailing newline in)."""


class _DidNotRun(ModelNotFoundError):
    """The file raised on the chips it was given (a hand-edited card's input size or layout)."""


class PluginEmbedder(Embedder):
    """An imported network behind facecloak's chip contract.

    ``forward(chips (N, 3, S, S) RGB in [0, 1]) -> (N, D)``; unit-norm when the card's metric is
    cosine, raw otherwise.
    """

    def __init__(self, card: FaceModelCard, network: nn.Module) -> None:
        super().__init__()
        self.card = card
        self.network = network
        extra = card.extra
        self.register_buffer(
            "mean", torch.tensor(extra.get("mean", [0.0, 0.0, 0.0]), dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(extra.get("std", [1.0, 1.0, 1.0]), dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.bgr = bool(extra.get("bgr", False))
        self.channels_last_input = extra.get("layout", "nchw") == "nhwc"
        # a file exported for one face at a time (its batch fixed to 1, as many ArcFace exports
        # are) runs once per chip: slower, but it was refused outright
        self.one_chip_at_a_time = extra.get("batch") == 1

    def _inference_network(self) -> nn.Module:
        """The network with channels-last weights and no weight gradients (`_network_for_pass`).

        Built on first use, rebuilt if the network was moved or its weights changed since
        (fine-tuning).
        """
        key = (tuple((p.data_ptr(), p._version) for p in self.network.parameters()), self.training)
        if getattr(self, "_inference_key", None) != key:
            copy = deepcopy(self.network).to(memory_format=torch.channels_last)
            copy.train(self.training)
            for parameter in copy.parameters():
                parameter.requires_grad_(False)
            for module in copy.modules():  # a tap or dropout on the original must not live on here
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
                if getattr(module, "feature_hook", None) is not None:
                    module.feature_hook = None
            self._inference = [copy]  # a list: not registered as a submodule (no state_dict entry)
            self._inference_key = key
        return self._inference[0]

    def _network_for_pass(self, x: Tensor) -> nn.Module:
        """The channels-last copy, unless this pass must reach the weights or their hooks, or runs on a GPU.

        The CPU's convolutions run a forward pass 1.4-1.5x faster with channels-last weights (HSE
        MobileNet, MobileFace V2; batches of 32), and a cloak step's forward and backward pass to
        the input too: the HSE MobileNet 10-45% faster on 2 cores at batches of 1 to 16, 12-35%
        on one, MobileFace V2 the same (2026-12-06). A pass whose weights take gradients
        (fine-tuning) needs the original; a GPU's gradient passes keep it (not measured there).
        """
        if self._hooked():
            return self.network
        if not torch.is_grad_enabled():
            return self._inference_network()
        if x.device.type != "cpu" or any(p.requires_grad for p in self.network.parameters()):
            return self.network
        return self._inference_network()

    def _hooked(self) -> bool:
        """Whether something watches or changes the network's layers: a `FeatureTap`, feature dropout.

        They hook the original's modules, so while they do, passes run the original (the copy
        would bypass them: the intermediate-feature loss found no features on a plug-in, and
        dropout changed nothing).
        """
        listed_for = getattr(self, "_watched_network", [None])  # a list: not registered as a submodule
        if listed_for[0] is not self.network:  # the modules listed once: 0.3 -> 0.015 ms a pass
            self._watched = [(m, hasattr(m, "feature_hook")) for m in self.network.modules()]
            self._watched_network = [self.network]
        return any(
            module._forward_hooks or module._forward_pre_hooks or (graph and module.feature_hook is not None)
            for module, graph in self._watched
        )

    def forward(self, chips: Tensor) -> Tensor:
        """Embed (N, 3, S, S) RGB chips in [0, 1]."""
        x = chips.flip(1) if self.bgr else chips
        x = (x * 255.0 - self.mean) / self.std  # mean and std are in the model's channel order
        if self.channels_last_input:
            x = x.permute(0, 2, 3, 1)  # the file itself takes NHWC
        else:
            # channels-last memory: the layout the CPU's convolution kernels are fastest in
            # (MobileFace V2: forward 20% faster); the values are unchanged.
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            out = self._run(self._network_for_pass(x), x)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # torch and onnx2torch raise many types for a shape they cannot take
            # the MXNet graph says which node failed (InvalidInputError) but not which file, and
            # exited 2 as a usage error: wrapped like an ONNX file's, it names the file and the fix
            if isinstance(error, FacecloakError) and not isinstance(error, InvalidInputError):
                raise
            detail = (str(error).splitlines() or [""])[0][:160]
            raise _DidNotRun(
                f"model {self.card.name} does not run on {len(chips)} {chips.shape[-2]}x{chips.shape[-1]} "
                f"{self.card.extra.get('layout', 'nchw')} chips ({type(error).__name__}: {detail}): "
                "was its card edited? Add the file again with its input size and layout",
                self.card.weights,
            ) from error
        out = self._one_vector_per_chip(out, len(chips))
        if self.card.distance == "cosine":
            out = nn.functional.normalize(out, dim=1)
        return out

    def _run(self, network: nn.Module, x: Tensor) -> Tensor:
        """The network's (first) output for the batch ``x``: whole, or chip by chip for a batch-1 file."""

        def first(out) -> Tensor:
            return out[0] if isinstance(out, (tuple, list)) else out

        if self.one_chip_at_a_time and len(x) > 1:
            return torch.cat([first(network(x[i : i + 1])) for i in range(len(x))])
        return first(network(x))

    def _one_vector_per_chip(self, out: Tensor, count: int) -> Tensor:
        """The network's output as (N, D): (N, D, 1, 1) and (N, 1, 1, D) flattened, anything else refused.

        Flattening whatever came out took a feature map as a 24,200-d "embedding" and crashed on
        one number per face (IndexError). The width is checked against the card's once it is
        measured (non-zero): a card pointed at another file failed deep inside the evaluator.
        """
        width = self.card.embedding_dim
        if (
            out.ndim < 2
            or out.shape[0] != count
            or sum(size != 1 for size in out.shape[1:]) > 1
            or (width and out[0].numel() != width)
        ):
            wanted = f"one {width}-d embedding" if width else "one embedding vector"
            raise InvalidInputError(  # the file named: a card edited by hand is read back unchecked
                f"model {self.card.name}: output {tuple(out.shape)} for {count} chips is not "
                f"{wanted} per chip",
                self.card.weights,
            )
        return out.flatten(1)


def make_card(
    name: str,
    file: Path,
    *,
    input_size: int = 112,
    template: str = "arcface",
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
    std: tuple[float, float, float] = (1.0, 1.0, 1.0),
    bgr: bool = False,
    metric: str = "cosine",
    threshold: float | None = None,
    embedding_dim: int = 0,
    crop: str = "landmarks",
    margin: float = 0.0,
    layout: str = "nchw",
) -> FaceModelCard:
    """The card of a user model (the embedding width is measured when the model is added).

    ``crop="landmarks"`` aligns five landmarks onto ``template``; ``crop="box"`` feeds the
    detection box widened by ``margin`` pixels (clipped to the photo) and resized, no alignment.
    ``layout`` is the input the file expects: "nchw" or "nhwc" (channels last, TensorFlow's).
    """
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise InvalidInputError(f"model name {name!r}: use lower-case letters, digits, '.', '_' or '-'")
    if metric not in DEFAULT_THRESHOLDS:
        raise InvalidInputError(f"metric must be cosine or euclidean, got {metric!r}")
    if crop not in CROPS:
        raise InvalidInputError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    extra = {
        "mean": list(mean),
        "std": list(std),
        "bgr": bool(bgr),
        "template_spec": template,
        "layout": layout,
    }
    if crop == "box":
        extra["margin"] = float(margin)
    card = FaceModelCard(
        name=name,
        input_size=int(input_size),
        template=template_for(template, int(input_size)),
        embedding_dim=int(embedding_dim),
        distance=metric,  # type: ignore[arg-type]
        match_threshold=float(threshold if threshold is not None else DEFAULT_THRESHOLDS[metric]),
        # absolute, links kept: a model file is recognised by its name (``.onnx``, ``-symbol.json``)
        # and MXNet's params are found beside it, so the target of a link (a download cache's
        # ``blobs/<hash>``) was saved as a card that no longer loaded
        weights=os.path.abspath(Path(file).expanduser()),
        license="user-supplied file (see its source)",
        description=f"user model from {Path(file).name}"
        + (f", box crop +{margin:g} px" if crop == "box" else ""),
        alignment="box" if crop == "box" else "similarity",
        extra=extra,
    )
    check_plugin_card(card)
    return card


def check_plugin_card(card: FaceModelCard) -> None:
    """Refuse a plug-in card whose input settings `PluginEmbedder` cannot apply.

    Checked when a card is made and when one is read back: a mean of two numbers or a layout of
    "hwc" edited into a card was registered as available and failed with a traceback on first
    use, and ``--margin nan`` was saved as a card that no longer loaded.
    """
    extra = card.extra

    def finite_triple(value: object) -> bool:
        return (
            isinstance(value, (list, tuple)) and len(value) == 3 and all(is_finite_number(v) for v in value)
        )

    mean, std, margin = extra.get("mean", [0.0] * 3), extra.get("std", [1.0] * 3), extra.get("margin", 0.0)
    problem = None
    if not finite_triple(mean) or not finite_triple(std) or 0 in std:
        problem = f"mean {mean!r} and std {std!r} must be three finite numbers each (std not 0)"
    elif not isinstance(extra.get("bgr", False), bool):
        problem = f"bgr {extra.get('bgr')!r} must be true or false"
    elif extra.get("layout", "nchw") not in LAYOUTS:
        problem = f"layout {extra.get('layout')!r} must be one of {', '.join(LAYOUTS)}"
    elif not is_finite_number(margin) or margin < 0:
        problem = f"margin {margin!r} must be a finite number of pixels >= 0"
    elif "params" in extra and not (
        isinstance(extra["params"], str) and re.fullmatch(r"[^/\\]+\.params", extra["params"])
    ):
        problem = f"params {extra['params']!r} must be the name of a .params file beside the graph"
    elif not isinstance(extra.get("fingerprint", ""), str):
        problem = f"fingerprint {extra['fingerprint']!r} must be text"
    elif extra.get("batch", 1) != 1:
        problem = f"batch {extra.get('batch')!r} must be 1 (a file that takes one chip at a time) or absent"
    if problem:
        raise InvalidInputError(f"model {card.name!r}: {problem}")


def _probe(card: FaceModelCard, network: nn.Module) -> tuple[FaceModelCard, Tensor]:
    """The card as the file runs, and its output for two different chips.

    A file that cannot take two chips at once, gives one output for both, or gives a pair unlike
    the two chips alone (its batch fixed to 1, as many exports are) gets ``batch: 1``: it runs one
    chip at a time. A file that fails on one chip too raises the batch's error.
    """
    size = card.input_size
    ramp = torch.linspace(0.2, 0.8, size).expand(3, size, size)
    chips = torch.stack([ramp, ramp.flip(-1).flip(-2)])  # two chips, so a mixed-up batch shows
    probe = PluginEmbedder(card, network).eval()
    with torch.no_grad():
        single = torch.cat([probe(chip[None]) for chip in chips])  # what a chip-by-chip run gives
        try:
            together = probe(chips)
            if torch.allclose(together, single, rtol=1e-3, atol=1e-4):
                return card, together
        except (_DidNotRun, InvalidInputError):
            pass
    return FaceModelCard(**{**card.__dict__, "extra": {**card.extra, "batch": 1}}), single


def _check_declared_input(card: FaceModelCard, file: Path) -> None:
    """Refuse an input size or layout unlike the 4-D input the file declares (dynamic dims match anything).

    Running the file is no check of it: the HSE MobileNet (224 px, channels last) ran on 112 px
    NHWC chips, its pooling taking any size, and was saved as a card that embedded garbage.
    """
    declared = declared_input_shape(file)
    if declared is None or len(declared[1]) != 4:
        return
    name, dims = declared
    size, layout = card.input_size, card.extra["layout"]
    wanted = (None, 3, size, size) if layout == "nchw" else (None, size, size, 3)
    if all(have is None or want is None or have == want for have, want in zip(dims, wanted)):
        return
    shape = ", ".join("N" if dim is None else str(dim) for dim in dims)
    hint = ""
    if dims[1] == 3 and dims[2] is not None and dims[2] == dims[3]:
        hint = f": add it with --input-size {dims[2]} --layout nchw"
    elif dims[3] == 3 and dims[1] is not None and dims[1] == dims[2]:
        hint = f": add it with --input-size {dims[1]} --layout nhwc"
    raise ModelNotFoundError(
        f"the file declares its input {name!r} as ({shape}), not {size}x{size} {layout} chips{hint}", file
    )


def load_model_file(file: Path, **card_options) -> PluginEmbedder:
    """Import ``file`` and wrap it with a card built from ``card_options`` (see `make_card`).

    The embedding width is measured on two chips (`_probe`): a file that runs only on one chip at
    a time is run chip by chip from then on; one that fails at this input size or layout, or
    gives no embedding, is refused here with a one-line error, not when it is first used (a
    traceback then).
    Used by ``models add`` and by benchmarks and tests that attach a model without touching the
    user's config.
    """
    name = card_options.pop("name", Path(file).stem.lower().replace("-symbol", ""))
    card = make_card(name, Path(file), **card_options)
    network = load_network(Path(file))
    _check_declared_input(card, Path(file))
    size = card.input_size
    try:
        card, output = _probe(card, network)
    except Exception as error:  # torch and onnx2torch raise many types for a shape they cannot take
        if isinstance(error, FacecloakError) and not isinstance(error, _DidNotRun):
            raise ModelNotFoundError(error.reason, file) from None
        cause = error.__cause__ if isinstance(error, _DidNotRun) else error
        detail = (str(cause).splitlines() or [""])[0][:160]
        raise ModelNotFoundError(
            f"model does not run on {size}x{size} {card.extra['layout']} chips "
            f"({type(cause).__name__}: {detail}): check the input size and layout",
            file,
        ) from None
    if output.ndim != 2 or not torch.isfinite(output).all():
        raise ModelNotFoundError(
            f"model output is not a finite embedding (shape {tuple(output.shape)})", file
        )
    if bool((output.norm(dim=1) < 1e-6).any()) or torch.allclose(output[0], output[1], rtol=1e-4, atol=1e-6):
        # every face then sat at one point: "DIFFERENT people" for any pair (all zeros, cosine) or
        # "SAME" (a constant), and a cloak against it was "protected" with nothing changed
        raise ModelNotFoundError(
            "model gives the same embedding (or none) for two different chips: not a face-embedding model",
            file,
        )
    # the files as they are now: an MXNet graph's params by name (a later epoch dropped beside it
    # is not taken up), and what they hold (`file_fingerprint`: a file replaced is noticed)
    read = files_read(Path(file))
    pinned = {"params": read[1].name} if len(read) > 1 else {}
    extra = {**card.extra, **pinned, "fingerprint": file_fingerprint(read)}
    card = FaceModelCard(**{**card.__dict__, "embedding_dim": int(output.shape[1]), "extra": extra})
    model = PluginEmbedder(card, network)
    return model.eval().requires_grad_(False)
