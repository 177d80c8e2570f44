"""Face models the user attaches: ONNX or MXNet files, wrapped as differentiable embedders.

``facecloak models add NAME FILE ...`` writes a small model card (JSON) into the user's config
folder (``$XDG_CONFIG_HOME/facecloak/models``, default ``~/.config/facecloak/models``) that refers
to the user's file; nothing is copied and nothing is downloaded. On first listing, every card
there is registered like a built-in model, so ``embed``, ``verify``, ``cloak --models`` and
``evaluate --attackers`` can use it by name.

ONNX files are converted with onnx2torch; MXNet files (``NAME-symbol.json`` with its
``NAME-0000.params``) with facecloak's own reader (`facecloak.models.mxnet_import`). Both become
``nn.Module``s that gradients flow through. The wrapper turns facecloak's chips (RGB in [0, 1])
into what the file expects: optionally BGR, 0..255, minus ``mean`` and divided by ``std`` (both in
the model's own channel order), optionally channels-last (NHWC). A model either aligns by five
landmarks onto a template, or sees a "box crop" (the detection box widened by a margin).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.models.fold import fold_fx_batch_norm
from facecloak.models.registry import (
    _REGISTRY,
    ARCFACE_TEMPLATE_112,
    Embedder,
    FaceModelCard,
    register_embedder,
    unregister_embedder,
)

DEFAULT_THRESHOLDS = {"cosine": 0.6, "euclidean": 1.0}
"""Match thresholds used when the user gives none (calibrate with --threshold for real use)."""

CROPS = ("landmarks", "box")
"""How a plug-in sees a face: aligned by five landmarks onto a template, or a widened box crop."""

LAYOUTS = ("nchw", "nhwc")

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def config_dir() -> Path:
    """Where added models' cards live (respects XDG_CONFIG_HOME)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "facecloak" / "models"


def template_for(spec: str, input_size: int) -> tuple[tuple[float, float], ...]:
    """Landmark template in chip pixels: "arcface", "dlib", or a JSON file of 5 [x, y] points."""
    if spec == "arcface":
        points = ARCFACE_TEMPLATE_112
        scale = input_size / 112.0
    elif spec == "dlib":
        from facecloak.models.dlib_resnet import DLIB_CHIP_TEMPLATE_150

        points = DLIB_CHIP_TEMPLATE_150
        scale = input_size / 150.0
    else:
        path = Path(spec)
        try:
            points = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise InvalidInputError(
                f"template must be arcface, dlib or a JSON file of 5 points ({error})", path
            ) from None
        if not (isinstance(points, list) and len(points) == 5 and all(len(p) == 2 for p in points)):
            raise InvalidInputError("template file must hold 5 [x, y] points in chip pixels", path)
        scale = 1.0
    return tuple((float(x) * scale, float(y) * scale) for x, y in points)


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
        out = self.network(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.flatten(1)
        if self.card.distance == "cosine":
            out = nn.functional.normalize(out, dim=1)
        return out


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


def load_network(file: Path) -> nn.Module:
    """An ONNX or MXNet file as a differentiable torch module (no weights are fetched).

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
            network = _fast_elementwise(convert(onnx.load(str(file))))
        except Exception as error:  # onnx and onnx2torch raise many types for a bad file
            detail = str(error).splitlines()[0][:120] if str(error) else ""
            raise ModelNotFoundError(
                f"not a usable ONNX model ({type(error).__name__}: {detail})", file
            ) from None
        fold_fx_batch_norm(network.eval())
        return network
    if name.endswith("-symbol.json") or name.endswith(".json"):
        from facecloak.models.mxnet_import import load_mxnet_model

        graph = load_mxnet_model(file)
        graph.fold_batch_norm()
        return graph
    raise ModelNotFoundError("unsupported model file: expected .onnx or an MXNet NAME-symbol.json", file)


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
    if not NAME_PATTERN.match(name):
        raise InvalidInputError(f"model name {name!r}: use lower-case letters, digits, '.', '_' or '-'")
    if metric not in DEFAULT_THRESHOLDS:
        raise InvalidInputError(f"metric must be cosine or euclidean, got {metric!r}")
    if crop not in CROPS:
        raise InvalidInputError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if margin < 0:
        raise InvalidInputError(f"margin must be >= 0 pixels, got {margin}")
    extra = {
        "mean": list(mean),
        "std": list(std),
        "bgr": bool(bgr),
        "template_spec": template,
        "layout": layout,
    }
    if crop == "box":
        extra["margin"] = float(margin)
    return FaceModelCard(
        name=name,
        input_size=int(input_size),
        template=template_for(template, int(input_size)),
        embedding_dim=int(embedding_dim),
        distance=metric,  # type: ignore[arg-type]
        match_threshold=float(threshold if threshold is not None else DEFAULT_THRESHOLDS[metric]),
        weights=str(Path(file).resolve()),
        license="user-supplied file (see its source)",
        description=f"user model from {Path(file).name}"
        + (f", box crop +{margin:g} px" if crop == "box" else ""),
        alignment="box" if crop == "box" else "similarity",
        extra=extra,
    )


def load_model_file(file: Path, **card_options) -> PluginEmbedder:
    """Import ``file`` and wrap it with a card built from ``card_options`` (see `make_card`).

    The embedding width is measured with one forward pass. Used by ``models add`` and by
    benchmarks and tests that attach a model without touching the user's config.
    """
    name = card_options.pop("name", Path(file).stem.lower().replace("-symbol", ""))
    card = make_card(name, Path(file), **card_options)
    network = load_network(Path(file))
    probe = PluginEmbedder(card, network).eval().requires_grad_(False)
    with torch.no_grad():
        output = probe(torch.full((1, 3, card.input_size, card.input_size), 0.5))
    if output.ndim != 2 or not torch.isfinite(output).all():
        raise ModelNotFoundError(
            f"model output is not a finite embedding (shape {tuple(output.shape)})", file
        )
    card = FaceModelCard(**{**card.__dict__, "embedding_dim": int(output.shape[1])})
    model = PluginEmbedder(card, network)
    return model.eval().requires_grad_(False)


def add_user_model(name: str, file: Path, **card_options) -> FaceModelCard:
    """Check that ``file`` loads and embeds, then save its card to `config_dir` and register it."""
    if name in _REGISTRY and not (config_dir() / f"{name}.json").is_file():
        raise InvalidInputError(f"{name!r} is a built-in model; choose another name")
    model = load_model_file(file, name=name, **card_options)
    save_user_card(model.card)
    return model.card


def save_user_card(card: FaceModelCard) -> None:
    """Write ``card`` to `config_dir` atomically and (re-)register it."""
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{card.name}.json"
    temporary = target.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(card.to_dict(), indent=2))
    temporary.replace(target)
    _register(card)


def is_user_model(name: str) -> bool:
    """Whether ``name`` was added by the user (its card lives in `config_dir`)."""
    return (config_dir() / f"{name}.json").is_file()


def remove_user_model(name: str) -> None:
    """Forget an added model (its file is left alone)."""
    target = config_dir() / f"{name}.json"
    if not target.is_file():
        raise ModelNotFoundError(f"no added model named {name!r} (see `facecloak models`)")
    target.unlink()
    unregister_embedder(name)


def _register(card: FaceModelCard) -> None:
    file = Path(card.weights)

    def locate() -> Path | None:
        return file if file.is_file() else None

    @register_embedder(card, locate=locate)
    def factory(weights: Path | None) -> PluginEmbedder:
        return PluginEmbedder(card, load_network(weights or file))


BROKEN_CARDS: list[tuple[Path, str]] = []
"""Cards in the config folder that could not be read, with the reason (``facecloak models`` shows them)."""


def register_user_models() -> None:
    """Register every card in `config_dir`; a broken card is listed in `BROKEN_CARDS`, not fatal."""
    BROKEN_CARDS.clear()
    folder = config_dir()
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            data["template"] = tuple(tuple(point) for point in data["template"])
            _register(FaceModelCard(**data))
        except (OSError, ValueError, TypeError, KeyError) as error:
            BROKEN_CARDS.append((path, f"unreadable model card ({type(error).__name__}: {error})"))


MODEL_FILE_PATTERNS = ("*.onnx", "*-symbol.json")
"""Files `find_model_files` offers to add: ONNX models and MXNet graphs (with their params)."""


def models_search_roots() -> list[Path]:
    """Where `facecloak models` looks for model files to suggest: FACECLOAK_MODELS, else ../shared/models."""
    given = os.environ.get("FACECLOAK_MODELS")
    return [Path(given)] if given else [Path("..") / "shared" / "models"]


def find_model_files(roots: list[Path] | None = None) -> list[tuple[str, Path, Path | None]]:
    """Model files under ``roots`` that are not added yet: (suggested name, file, README or None).

    Only files `add_user_model` can load are listed (ONNX; MXNet ``NAME-symbol.json`` with its
    ``NAME-0000.params`` beside it). The name is the file's folder (or its stem when a folder
    holds several models), made lower-case to fit `NAME_PATTERN`.
    """
    found = []
    added = {str(Path(_REGISTRY[name].card.weights).resolve()) for name in _REGISTRY}
    for root in roots if roots is not None else models_search_roots():
        if not root.is_dir():
            continue
        files = sorted(f for pattern in MODEL_FILE_PATTERNS for f in root.rglob(pattern) if f.is_file())
        for file in files:
            if file.name.endswith("-symbol.json"):
                params = file.with_name(file.name[: -len("-symbol.json")] + "-0000.params")
                if not params.is_file():
                    continue
            if str(file.resolve()) in added:
                continue
            alone = sum(f.parent == file.parent for f in files) == 1
            if alone and file.parent != root:
                stem = file.parent.name
            else:
                stem = file.name.removesuffix("-symbol.json").removesuffix(".onnx")
            name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:64] or "model"
            readme = next((r for r in sorted(file.parent.glob("README*")) if r.is_file()), None)
            found.append((name, file.resolve(), readme.resolve() if readme else None))
    return found
