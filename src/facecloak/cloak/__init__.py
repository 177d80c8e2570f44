"""Cloaking: adversarial perturbations that move a face's embedding away from its identity.

One class per method behind one contract (`Cloak.__call__(images, faces) -> CloakResult`):
`UntargetedCloak` (default) and `TargetedCloak`. `create_cloak` builds one by name. `AwayCloak`
pushes faces away from given embeddings (face replacement finishes its near misses with it).

Modules: `base` (the contract and the optimisation loop), `budget` (preset levels, the perceptual
per-pixel limits, the DSSIM cap), `eot` (simulated uploads), `regions` (the crops a cloak may
change), `verify` (the check after a real JPEG re-encode, and the per-face records), and one file
per method (`untargeted`, `targeted`, `away`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from facecloak._checks import check_choice
from facecloak.cloak.away import AwayCloak
from facecloak.cloak.base import Cloak, CloakResult
from facecloak.cloak.budget import LEVELS, CloakBudget
from facecloak.cloak.targeted import TargetedCloak
from facecloak.cloak.untargeted import UntargetedCloak
from facecloak.cloak.verify import VERIFY_JPEG_QUALITY
from facecloak.errors import InvalidInputError
from facecloak.models.registry import Embedder

CLOAK_METHODS: dict[str, type[Cloak]] = {"untargeted": UntargetedCloak, "targeted": TargetedCloak}
DEFAULT_MODE = "untargeted"


def create_cloak(mode: str, models: Sequence[Embedder], level: str = "mid", **kwargs) -> Cloak:
    """Build the cloak method ``mode`` ("untargeted" or "targeted"); ``None`` keywords keep defaults."""
    check_choice(mode, tuple(CLOAK_METHODS), "mode")
    options = {key: value for key, value in kwargs.items() if value is not None}
    if mode != "targeted":
        options.pop("identity_key", None)
    else:  # a targeted cloak's reference is its key's target, never the person; it pulls, not pushes
        options.pop("person_level", None)
        options.pop("laggard_weight", None)
        options.pop("people_per_photo", None)
    unknown = sorted(set(options) - _keywords(CLOAK_METHODS[mode]))
    if unknown:  # was a raw TypeError from deep in the class chain
        raise InvalidInputError(f"the {mode} cloak takes no {', '.join(unknown)}")
    return CLOAK_METHODS[mode](models, level, **options)


def _keywords(cloak_class: type) -> set[str]:
    """The keyword arguments a cloak class's constructors, its own and its bases', take by name."""
    names: set[str] = set()
    for klass in cloak_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            names |= {
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            }
    return names - {"self", "models", "level"}


__all__ = [
    "AwayCloak",
    "CLOAK_METHODS",
    "DEFAULT_MODE",
    "LEVELS",
    "VERIFY_JPEG_QUALITY",
    "Cloak",
    "CloakBudget",
    "CloakResult",
    "TargetedCloak",
    "UntargetedCloak",
    "create_cloak",
]
