"""The face models the user added: their cards in the config folder, registered at import.

``facecloak models add NAME FILE ...`` writes a small model card (JSON) into the user's config
folder (``$XDG_CONFIG_HOME/facecloak/models``, default ``~/.config/facecloak/models``) that refers
to the user's file; nothing is copied and nothing is downloaded. `facecloak.models` calls
`register_user_models` when it is imported, so every card there is registered like a built-in
model and ``embed``, ``verify``, ``cloak --models`` and ``evaluate --attackers`` can use it by name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from facecloak.errors import (
    FacecloakError,
    InvalidInputError,
    ModelNotFoundError,
    UnknownModelError,
    shown_path,
)
from facecloak.io import write_bytes_atomic
from facecloak.models.loaders import (
    MODEL_FILE_PATTERNS,
    file_fingerprint,
    files_read,
    load_network,
    missing_model_file,
)
from facecloak.models.plugins import NAME_PATTERN, PluginEmbedder, check_plugin_card, load_model_file
from facecloak.models.registry import (
    UNREADABLE,
    FaceModelCard,
    get_card,
    is_builtin,
    list_embedders,
    register_embedder,
    unregister_embedder,
)

__all__ = [
    "BROKEN_CARDS",
    "add_user_model",
    "config_dir",
    "find_model_files",
    "is_user_model",
    "models_search_roots",
    "register_user_models",
    "remove_user_model",
    "save_user_card",
]


def config_dir() -> Path:
    """Where added models' cards live (respects XDG_CONFIG_HOME)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "facecloak" / "models"


def add_user_model(name: str, file: Path, **card_options) -> FaceModelCard:
    """Check that ``file`` loads and embeds, then save its card to `config_dir` and register it."""
    if is_builtin(name):
        raise InvalidInputError(f"{name!r} is a built-in model; choose another name")
    model = load_model_file(file, name=name, **card_options)
    save_user_card(model.card)
    return model.card


def save_user_card(card: FaceModelCard, *, replacing: FaceModelCard | None = None) -> None:
    """Write ``card`` to `config_dir` atomically and (re-)register it.

    ``replacing``: the card this one updates, read when the work began; if the file no longer
    holds it (the model was removed, or added again from another file, while a calibration ran
    for minutes), nothing is written: the old copy written back undid that without a word.
    """
    target = config_dir() / f"{card.name}.json"
    if replacing is not None:
        try:
            current = _read_card(target)
        except (OSError, ValueError, TypeError, KeyError):
            current = None
        if current != replacing:
            what = "removed" if not target.is_file() else "changed (added again?)"
            raise InvalidInputError(
                f"model {card.name} was {what} while this ran; nothing saved: run it again"
            )
    write_bytes_atomic(target, json.dumps(card.to_dict(), indent=2).encode(), overwrite=True)
    _register(card)


def is_user_model(name: str) -> bool:
    """Whether ``name`` is a model the user added: registered from its card in `config_dir`.

    Not a file test: a hand-made ``dlib-resnet.json`` made the built-in look added (so it could
    be calibrated, replaced and removed), and a broken card looked registered.
    """
    return name in list_embedders() and not is_builtin(name)


def remove_user_model(name: str) -> None:
    """Forget an added model, or delete its broken card (the model file is left alone).

    Only a card's own name is looked up: ``../../x`` once deleted ``x.json`` outside the config
    folder. A broken card may have a name no model can have (``My Model.json``, listed by
    `facecloak models` as unreadable): it is removed by its file's name.
    """
    target = config_dir() / f"{name}.json"
    broken = isinstance(name, str) and any(path == target for path, _ in BROKEN_CARDS)
    if is_builtin(name) and not broken:  # a broken card named like one is the user's, and removable
        raise InvalidInputError(f"{name!r} is a built-in model; only added models can be removed")
    named = isinstance(name, str) and (NAME_PATTERN.fullmatch(name) or broken)
    if not (named and target.is_file()):
        raise UnknownModelError(f"no added model named {name!r} (see `facecloak models`)")  # usage: 2
    target.unlink()
    if not is_builtin(name):
        unregister_embedder(name)


def _register(card: FaceModelCard) -> None:
    file = Path(card.weights)
    params = card.extra.get("params")

    def locate() -> Path:
        missing = missing_model_file(file, params)
        if missing is not None:
            raise ModelNotFoundError(
                f"model {card.name} is not available: its file {missing} is not there (moved or deleted?); "
                f"add it again with `facecloak models add {card.name} FILE`"
            )
        expected = card.extra.get("fingerprint")
        if expected and file_fingerprint(files_read(file, params)) != expected:
            # other weights under the old threshold: "SAME person" or "DIFFERENT" by another model's scale
            raise ModelNotFoundError(
                f"model {card.name} is not available: its file {file} changed since it was added "
                f"(other weights?); add it again with `facecloak models add {card.name} FILE`, "
                "then calibrate it"
            )
        return file

    @register_embedder(card, locate=locate, user=True)
    def factory(weights: Path | None) -> PluginEmbedder:
        other = weights is not None and Path(weights) != file  # a file given for this call: its own params
        return PluginEmbedder(card, load_network(weights, None) if other else load_network(file, params))


BROKEN_CARDS: list[tuple[Path, str]] = []
"""Cards in the config folder that could not be read, with the reason (``facecloak models`` shows them)."""


def register_user_models() -> None:
    """Register every card in `config_dir`; a broken card is listed in `BROKEN_CARDS`, not fatal."""
    BROKEN_CARDS.clear()
    UNREADABLE.clear()
    folder = config_dir()
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        try:
            _register(_read_card(path))
        except (OSError, ValueError, TypeError, KeyError, FacecloakError) as error:
            reason = f"unreadable model card ({type(error).__name__}: {error})"
            remedy = f"fix it, or remove it: facecloak models remove {shlex.quote(path.stem)}"
            if not path.is_file():  # a folder named like a card: `models remove` deletes cards only
                remedy = "it is not a file: move it out of the folder"
            BROKEN_CARDS.append((path, f"{reason}; {remedy}"))
            UNREADABLE[path.stem] = f"{shown_path(path)}: {reason}; {remedy}"
            if is_user_model(path.stem):  # its earlier, readable card no longer holds
                unregister_embedder(path.stem)


def _read_card(path: Path) -> FaceModelCard:
    """The card in ``path``, checked as an added one is: its own file's name, never a built-in's.

    A card edited to name ``dlib-resnet`` replaced the built-in model for every command, and a
    name that is no string (or unlike its file) broke every listing of the models.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    name = data.get("name")
    if name != path.stem or not NAME_PATTERN.fullmatch(path.stem):
        raise ValueError(f"its name {name!r} must be its file's name, a valid model name")
    if is_builtin(name):
        raise ValueError(f"{name!r} is a built-in model's name")
    data["template"] = tuple(tuple(point) for point in data["template"])
    card = FaceModelCard(**data)
    check_plugin_card(card)
    if card.embedding_dim < 1:  # measured when added; the evaluator sizes its tables by it
        raise ValueError(f"embedding width {card.embedding_dim} must be at least 1")
    return card


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
    added = {str(Path(get_card(name).weights).resolve()) for name in list_embedders()}
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
            found.append((name, Path(os.path.abspath(file)), readme.resolve() if readme else None))
    return found
