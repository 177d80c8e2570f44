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
from pathlib import Path

from facecloak.errors import FacecloakError, InvalidInputError, ModelNotFoundError
from facecloak.io import write_bytes_atomic
from facecloak.models.loaders import MODEL_FILE_PATTERNS, load_network
from facecloak.models.plugins import PluginEmbedder, load_model_file
from facecloak.models.registry import (
    FaceModelCard,
    get_card,
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
    if name in list_embedders() and not is_user_model(name):
        raise InvalidInputError(f"{name!r} is a built-in model; choose another name")
    model = load_model_file(file, name=name, **card_options)
    save_user_card(model.card)
    return model.card


def save_user_card(card: FaceModelCard) -> None:
    """Write ``card`` to `config_dir` atomically and (re-)register it."""
    target = config_dir() / f"{card.name}.json"
    write_bytes_atomic(target, json.dumps(card.to_dict(), indent=2).encode(), overwrite=True)
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
        except (OSError, ValueError, TypeError, KeyError, FacecloakError) as error:
            BROKEN_CARDS.append((path, f"unreadable model card ({type(error).__name__}: {error})"))


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
            found.append((name, file.resolve(), readme.resolve() if readme else None))
    return found
