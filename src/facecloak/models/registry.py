"""Face-embedding models by name: a card per model, a factory per card, nothing downloaded.

The registry knows cards and factories only: it imports no model. Built-in models register
themselves when `facecloak.models` imports them; models the user added are registered by
`facecloak.models.user_models`, also from `facecloak.models`' import. A model is registered with
its `FaceModelCard` (input size, alignment template, distance and
match threshold, where its weights come from). `create_embedder` builds it from an installed
package or a file the user names; a model whose weights are missing raises
`ModelNotFoundError` saying why, it never falls back to random weights or a download.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from facecloak._checks import is_finite_number, split_names
from facecloak._device import default_device
from facecloak.errors import InvalidInputError, ModelNotFoundError, UnknownModelError


@dataclass(frozen=True)
class FaceModelCard:
    """What the pipeline needs to know to feed, compare and cite a face-embedding model.

    Attributes:
        name: registry name, e.g. ``"dlib-resnet"``.
        input_size: side of the square aligned chip, in pixels.
        template: where the five landmarks (`facecloak.faces.LANDMARK_NAMES`) land in the chip,
            in chip pixels (integer values at pixel centres).
        embedding_dim: width of the embedding.
        distance: ``"euclidean"`` on raw embeddings or ``"cosine"`` (1 - cosine similarity).
        match_threshold: same person when the distance is below this.
        weights: where the weights come from (package file or user path; never a URL).
        license: licence of the weights.
        description: one line for ``facecloak models``.
        weights_env: environment variable that may name the weights file.
        landmarks: which five points ``template`` refers to: "mtcnn" (eye centres, nose tip,
            mouth corners, as detected) or "dlib5" (dlib's eye corners and nose base, found by
            facecloak's port of dlib's shape predictor inside the MTCNN box).
        alignment: "similarity" (least squares onto the template), "dlib" (dlib's
            ``get_face_chip_details``: the same fit kept as a rectangle and an angle) or "box"
            (no landmarks: the detection box widened by ``extra["margin"]`` pixels, resized).
        extra: model-specific settings (plug-ins: input mean, std, channel order).
    """

    name: str
    input_size: int
    template: tuple[tuple[float, float], ...]
    embedding_dim: int
    distance: Literal["euclidean", "cosine"]
    match_threshold: float
    weights: str
    license: str
    description: str = ""
    weights_env: str | None = None
    landmarks: Literal["mtcnn", "dlib5"] = "mtcnn"
    alignment: Literal["similarity", "dlib", "box"] = "similarity"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a NaN threshold blacked out the cloaked face, a negative one called an untouched face
        # protected: every card, added, calibrated or read from a file, is checked once here
        self._check_shape()
        threshold = self.match_threshold
        largest = 2.0 if self.distance == "cosine" else math.inf
        if not (is_finite_number(threshold) and 0 < threshold < largest):  # JSON's true is no threshold
            bound = "between 0 and 2 (a cosine distance)" if self.distance == "cosine" else "positive"
            raise InvalidInputError(f"model {self.name!r}: match threshold {threshold!r} must be {bound}")

    def _check_shape(self) -> None:
        """Refuse field values no model can run with (a card edited by hand is read through here).

        Without this, a card naming an unknown metric was compared as cosine, and a chip size,
        template or ``extra`` of the wrong type failed with a traceback in the middle of a cloak.
        """

        def whole(value: object, least: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        points = self.template
        problem = None
        if not isinstance(self.name, str) or not self.name:
            problem = "name must be a non-empty string"
        elif self.distance not in ("euclidean", "cosine"):
            problem = f"distance {self.distance!r} must be euclidean or cosine"
        elif not whole(self.input_size, 1) or not whole(self.embedding_dim, 0):
            problem = f"input size {self.input_size!r} and width {self.embedding_dim!r} must be whole numbers"
        elif not (
            isinstance(points, tuple)
            and len(points) == 5
            and all(
                isinstance(p, tuple) and len(p) == 2 and all(is_finite_number(v) for v in p) for p in points
            )
        ):
            problem = f"template {points!r} must be five (x, y) chip pixels"
        elif not _spread_in_chip(points, self.input_size):
            # five points in one spot aligned every face onto one pixel: the model then called
            # everyone the same person (distance 0)
            problem = (
                f"template {points!r} must lie inside the {self.input_size} px chip, spread over it "
                "(not in one spot or on one line)"
            )
        elif self.alignment not in ("similarity", "dlib", "box"):
            problem = f"alignment {self.alignment!r} must be similarity, dlib or box"
        elif self.landmarks not in ("mtcnn", "dlib5"):
            problem = f"landmarks {self.landmarks!r} must be mtcnn or dlib5"
        elif not isinstance(self.extra, dict) or not isinstance(self.weights, str):
            problem = "extra must be a mapping and weights a string"
        if problem:
            raise InvalidInputError(f"model {self.name!r}: {problem}")

    def to_dict(self) -> dict:
        """The card as plain JSON-ready data."""
        return asdict(self)


class Embedder(nn.Module):
    """Base of every face model: aligned RGB chips in [0, 1] -> embeddings.

    Subclasses set ``card`` and implement ``forward(chips: (N, 3, S, S)) -> (N, D)``; they do
    their own normalisation inside ``forward``, so callers never care about mean/std or BGR.
    """

    card: FaceModelCard

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Distance between embeddings ``a`` and ``b`` (broadcast over leading dims) in the card's metric."""
        return embedding_distance(a, b, self.card.distance)


def _spread_in_chip(points: tuple[tuple[float, float], ...], size: int) -> bool:
    """Whether template ``points`` lie in a ``size`` px chip, spread over it.

    Some three of them must span a triangle of at least `MIN_TEMPLATE_AREA` of the chip.
    """
    if not all(0 <= value <= size for point in points for value in point):
        return False
    largest = max(
        abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay)) / 2
        for (ax, ay), (bx, by), (cx, cy) in itertools.combinations(points, 3)
    )
    return largest >= MIN_TEMPLATE_AREA * size * size


MIN_TEMPLATE_AREA = 0.005


def embedding_distance(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Euclidean distance, or 1 - cosine similarity, along the last dimension."""
    if metric == "euclidean":
        return (a - b).square().sum(-1).clamp_min(1e-12).sqrt()
    # normalise, then a dot product: the value of `cosine_similarity`, several times faster when
    # one side broadcasts (a table against itself, many faces against one reference)
    return 1.0 - (nn.functional.normalize(a, dim=-1) * nn.functional.normalize(b, dim=-1)).sum(-1)


def distance_matrix(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """(n, m) `embedding_distance` between each row of ``a`` (n, D) and each row of ``b`` (m, D)."""
    if metric == "euclidean":
        return torch.cdist(a.double(), b.double()).to(a.dtype)
    a_unit = torch.nn.functional.normalize(a, dim=1)
    b_unit = torch.nn.functional.normalize(b, dim=1)
    return 1.0 - a_unit @ b_unit.T


def weights_stamp(card: FaceModelCard) -> str:
    """Path, size and modification time of the weights files a card names (its file, or its variable's).

    The card alone names a file, not what is in it: a model file replaced at the same path (a
    re-exported plug-in, another file under the same environment variable) kept the old model's
    cached embeddings, and the evaluation scored the new model's gallery against them.
    """
    named = [card.weights, os.environ.get(card.weights_env, "") if card.weights_env else ""]
    files = [Path(value).expanduser() for value in named if value and Path(value).expanduser().is_file()]
    # an MXNet graph reads its params beside it (NAME-symbol.json, NAME-0000.params)
    files += [
        params
        for file in list(files)
        if file.name.endswith("-symbol.json")
        for params in sorted(file.parent.glob(f"{file.name[: -len('-symbol.json')]}-*.params"))
    ]
    stamps = []
    for file in files:
        stat = file.stat()
        stamps.append(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(stamps)


def model_identity(name: str) -> str:
    """Model ``name`` as what makes its outputs: its card (threshold, crop, input) and its weights' stamp.

    A resumed batch recorded models by name: a model removed and added again under the same name
    with another threshold, or another network, kept the outputs cloaked against the old one.
    """
    card = get_card(name)
    text = json.dumps([card.to_dict(), weights_stamp(card)], sort_keys=True, default=str)
    return f"{name}@{hashlib.sha256(text.encode()).hexdigest()[:12]}"


Factory = Callable[[Path | None], Embedder]
WeightsLocator = Callable[[], Path | None]


@dataclass(frozen=True)
class _Entry:
    card: FaceModelCard
    factory: Factory
    locate: WeightsLocator  # weights found here without the user's help, else None (or it raises why not)
    user: bool = False  # added by the user (`facecloak.models.user_models`), not built in


_REGISTRY: dict[str, _Entry] = {}


def register_embedder(card: FaceModelCard, locate: WeightsLocator = lambda: None, *, user: bool = False):
    """Register the decorated factory ``f(weights_path | None) -> Embedder`` under ``card.name``.

    ``user``: the model is one the user added, which the user may replace, calibrate and remove.
    """

    def decorator(factory: Factory) -> Factory:
        _REGISTRY[card.name] = _Entry(card, factory, locate, user)
        return factory

    return decorator


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a model facecloak itself registers (never replaced by a user's card)."""
    return name in _REGISTRY and not _REGISTRY[name].user


def unregister_embedder(name: str) -> None:
    """Forget a registered model (used when the user removes a plug-in)."""
    _REGISTRY.pop(name, None)


def list_embedders(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, built-in first."""
    return [name for name in _REGISTRY if fnmatch.fnmatch(name, pattern)]


def get_card(name: str) -> FaceModelCard:
    """The card of a registered model."""
    return _entry(name).card


UNREADABLE: dict[str, str] = {}
"""Names whose card the user added could not be read (`facecloak.models.user_models`), with why:
asked for by name, such a model is that error, not an "unknown face model"."""


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        if name in UNREADABLE:
            raise UnknownModelError(UNREADABLE[name])
        raise UnknownModelError(f"unknown face model {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def resolve_weights(name: str, weights: Path | str | None = None) -> Path:
    """Where ``name``'s weights are: the given path, else its environment variable, else its package.

    Raises:
        ModelNotFoundError: nothing found, with the reason and how to provide the file.
    """
    entry = _entry(name)
    card = entry.card
    if weights is None and card.weights_env and os.environ.get(card.weights_env):
        weights = os.environ[card.weights_env]
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"weights file not found for model {name}", path)
        return path
    found = entry.locate()
    if found is None:
        hint = ""
        if card.weights_env:
            hint = f"; to use it, set the environment variable {card.weights_env} to that file's path"
        raise ModelNotFoundError(f"model {name} is not available: {card.weights}{hint}")
    return found


def embedder_status(name: str) -> tuple[bool, str]:
    """Whether ``name`` can be built here without further input, and where from or why not."""
    try:
        return True, str(resolve_weights(name))
    except ModelNotFoundError as error:
        return False, error.reason


def available_embedders() -> list[str]:
    """Names of the models whose weights are present on this machine."""
    return [name for name in list_embedders() if embedder_status(name)[0]]


def unusable_added_models() -> list[tuple[str, str]]:
    """(name, why) of each model the user added that cannot be used here (its file moved or gone).

    Every command's default, every available model, leaves them out (a cloak should not fail on
    them); the commands say so (`facecloak.cli.options.say_left_out`), since a cloak then attacks
    fewer models than were added.
    """
    left_out = []
    for name, entry in _REGISTRY.items():
        if entry.user:
            usable, why = embedder_status(name)
            if not usable:
                left_out.append((name, why))
    return left_out


def choose_embedders(names: str | None) -> list[str]:
    """The models named (comma-separated), each registered and available here; none: every available one.

    The one reading of a ``--models`` option (command line, evaluator, replacer): an unknown name,
    or a model whose weights are not here, fails here, before any photo is read (a model without
    its weights was found only when the batch loaded it, and reported as a failed photo).
    """
    if names is not None and not split_names(names):  # `--models ,` or "" meant every model, unsaid
        raise InvalidInputError(f"no model named in {names!r}: name one or more, or leave it out for all")
    wanted = split_names(names) or available_embedders()
    if not wanted:
        raise ModelNotFoundError("no face model is available here; see `facecloak models`")
    for name in wanted:
        _entry(name)
        resolve_weights(name)
    return wanted


def create_embedder(
    name: str, *, weights: Path | str | None = None, device: str | torch.device | None = None
) -> Embedder:
    """Build model ``name`` in eval mode with frozen parameters, on ``device`` (default: CUDA if present).

    A device that does not exist here (``cuda`` without a GPU, ``cuda:7`` on a machine with one,
    a misspelt name) is a one-line error, not torch's traceback.
    """
    path = resolve_weights(name, weights)
    model = _entry(name).factory(path)
    model.eval().requires_grad_(False)
    try:
        return model.to(default_device(device))
    except (RuntimeError, AssertionError) as error:  # torch: no driver, not compiled with CUDA, bad ordinal
        detail = (str(error).splitlines() or [""])[0][:160]
        raise InvalidInputError(f"device {device!r} cannot be used here ({detail})") from None
