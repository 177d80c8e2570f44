"""Reading donor banks: where they live, what a bank holds, loading and listing them.

The on-disk layout is described in `facecloak.donors`, which writes banks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak import io
from facecloak.errors import DonorBankError, FacecloakError
from facecloak.models.registry import Embedder, FaceModelCard
from facecloak.synthesis import (
    CHIP_SIZE_PX,
    DETAIL_SCALE,
    FACE_STATISTICS,
    face_statistics,
    window_outside_share,
)

BANK_FORMAT = 1
"""Version of the on-disk layout; a bank of another version is refused with a way out."""

BANK_FILES = ("bank.json", "embeddings.npz", "chips")
"""What a bank writes in its folder: all that removing the bank deletes, with the folder if
nothing else is left in it."""

DEFAULT_BANK = "default"
DONOR_MIN_FACE_PX = 60
"""Smallest donor face (shorter box side) taken: smaller faces make blurry new faces."""

DONOR_MIN_SCORE = 0.95
"""Smallest detector confidence of a donor face."""

DONOR_MAX_YAW = 0.45
"""Donors turned further than this (`facecloak.synthesis.estimate_pose` units) are skipped."""

DONOR_MAX_OUTSIDE = 0.1
"""Most of a donor's replaced region that may lie beyond its photo's edge
(`facecloak.synthesis.window_outside_share`). Among the first 300 LFW people with one or two
photos, 4 of 296 donors taken before this check had 40-74% of it beyond the edge (a face cut off
by the frame, its chip half black or showing the person beside it), every other at most 2%."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

BANK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9 ._-]{0,62}[A-Za-z0-9._-])?$")
"""A bank's name: `NAME_PATTERN` with spaces inside. A folder ``my bank`` (made by its path or
copied into `data_dir`) was listed by ``donors list`` under a name no command would open."""


def data_dir() -> Path:
    """Where banks live: ``$XDG_DATA_HOME/facecloak/donors`` (default ``~/.local/share/...``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "facecloak" / "donors"


def bank_folder(name: str | Path) -> Path:
    """The folder of bank ``name``: a name in `data_dir`, or the path of a bank folder itself.

    A bank of `data_dir` comes before a folder of the same name in the working directory: `donors
    list` names it, and `donors remove NAME` run beside a copy called NAME deleted the copy.
    """
    given = Path(name).expanduser()
    if os.sep in str(name):
        return given
    named = data_dir() / str(name)
    if BANK_NAME_PATTERN.match(str(name)) and (named / "bank.json").is_file():
        return named
    if (given / "bank.json").is_file():
        return given
    if not BANK_NAME_PATTERN.match(str(name)):
        raise DonorBankError(f"bank name {name!r} must be letters, digits, '.', '_', '-' or spaces inside")
    return named


def model_fingerprint(model: Embedder | FaceModelCard) -> str:
    """A short hash of a model's card: what changes its embeddings (template, threshold, weights)."""
    card = model if isinstance(model, FaceModelCard) else model.card
    text = json.dumps(card.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class DonorBank:
    """A loaded bank: statistics and embeddings in memory, chips read from disk when needed.

    Attributes:
        name: the bank's name (its folder's name).
        folder: where it lives.
        donors: one manifest record per donor (``id``, ``source``, ``licence``, ...).
        points: (N, 5, 2) landmarks in chip pixels.
        pose: (N, 3) ``yaw, pitch, roll`` (`facecloak.synthesis.estimate_pose`).
        stats: (N, len(FACE_STATISTICS)) colour and appearance statistics
            (`facecloak.synthesis.FACE_STATISTICS`).
        embeddings: model name -> (N, D) embedding of each donor's chip.
        models: model name -> {"fingerprint", "metric", "threshold"} the bank was built with.
        sources: one record per ``add`` (folder, licence note, photos, skipped).
        outside: (N,) share of each donor's replaced region beyond its photo's edge; NaN for a
            donor added before photo sizes were stored (`facecloak donors refresh` measures it).
    """

    name: str
    folder: Path
    donors: list[dict]
    points: Tensor
    pose: Tensor
    stats: Tensor
    embeddings: dict[str, Tensor]
    models: dict[str, dict]
    sources: list[dict] = field(default_factory=list)
    outside: Tensor | None = None
    _chips: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.outside is None:
            self.outside = outside_shares(self.donors)

    @property
    def usable(self) -> Tensor:
        """(N,) donors a new face may be made from: not cut off by their photo's edge."""
        return ~(self.outside > DONOR_MAX_OUTSIDE)  # NaN (not measured) counts as usable

    def __len__(self) -> int:
        return len(self.donors)

    @property
    def ids(self) -> list[str]:
        """Donor ids, in row order."""
        return [donor["id"] for donor in self.donors]

    def chips(self, rows: Sequence[int]) -> Tensor:
        """(K, 3, S, S) float chips of donors at ``rows`` (read once, then kept as uint8)."""
        out = []
        for row in rows:
            if row not in self._chips:
                pixels = self._read_chip(row, f"{self.donors[row]['id']}.png")
                if pixels.shape[-2:] != (CHIP_SIZE_PX, CHIP_SIZE_PX):
                    raise DonorBankError(
                        f"chip of donor {self.donors[row]['id']} has the wrong size", self.folder
                    )
                self._chips[row] = (pixels * 255).round().to(torch.uint8)
            out.append(self._chips[row].float() / 255)
        return torch.stack(out) if out else torch.zeros(0, 3, CHIP_SIZE_PX, CHIP_SIZE_PX)

    def _read_chip(self, row: int, name: str) -> Tensor:
        """(3, h, w) pixels of one chip file of donor ``row``.

        A chip deleted or damaged by hand failed every photo whose donors included it with only
        the file's path: the error says which donor it is and how to mend the bank.
        """
        try:
            return io.read_image(self.folder / "chips" / name).pixels
        except FacecloakError as error:
            donor_id = self.donors[row]["id"]
            raise DonorBankError(
                f"chip of donor {donor_id} is missing or unreadable ({error.reason}); "
                f"run `facecloak donors remove {self._called()} --donor {donor_id}` "
                "(and `facecloak donors add` its photo again to keep it)",
                error.path,
            ) from None

    def detail_scale(self, row: int) -> int:
        """How much finer than its chip a donor's detail chip is (1: it has none)."""
        return int(self.donors[row].get("detail_scale", 1))

    def detail_chips(self, rows: Sequence[int]) -> Tensor:
        """(K, 3, 2S, 2S) detail chips of donors at ``rows`` (`facecloak.synthesis.DETAIL_SCALE`).

        A donor without one (its photo held no more detail than its chip) gives its chip, upsampled
        onto the same pixel grid. Read from disk on every call: large, and only large faces need them.
        """
        out = []
        size = CHIP_SIZE_PX * DETAIL_SCALE
        for row in rows:
            if self.detail_scale(row) == DETAIL_SCALE:
                pixels = self._read_chip(row, f"{self.donors[row]['id']}@{DETAIL_SCALE}x.jpg")
                if pixels.shape[-2:] != (size, size):
                    raise DonorBankError(
                        f"detail chip of donor {self.donors[row]['id']} has the wrong size", self.folder
                    )
            else:
                chip = self.chips([row])
                pixels = F.interpolate(chip, scale_factor=DETAIL_SCALE, mode="bilinear", align_corners=False)[
                    0
                ]
            out.append(pixels.clamp(0, 1))
        return torch.stack(out) if out else torch.zeros(0, 3, size, size)

    def check_enough_donors(self, wanted: int, *, option: str | None = "--donors-per-face") -> None:
        """Refuse a bank with fewer usable donors than a face mixes (one line, the way out in it).

        Donors cut off by their photo's edge are never used: a bank short of usable ones blurred
        every face ("no donor set could be used") instead of saying why. ``option``: the option
        that asks for fewer, named in the message; None where there is none (the service).
        """
        usable = int(self.usable.sum())
        if usable < wanted:
            cut_off = f" ({len(self) - usable} cut off by their photo's edge)" if usable < len(self) else ""
            fewer = f"{option} {wanted}" if option else f"the {wanted} a new face mixes"
            way_out = " or ask for fewer" if option else ""
            raise DonorBankError(
                f"bank {self.name!r} holds {usable} usable donor(s){cut_off}, fewer than {fewer}: "
                f"add donors (`facecloak donors add`){way_out}"
            )

    def check_for_replacing(
        self, model_names: Sequence[str], wanted: int, *, option: str | None = "--donors-per-face"
    ) -> list[str]:
        """Before any work: the bank serves faces checked by ``model_names``, ``wanted`` donors each.

        Returns the bank's models not among them (a model removed since the bank was built: its
        check is not run, which the caller says). Cards alone are read: no model is loaded.

        Raises:
            DonorBankError: built with other cards for these models, or too few usable donors.
        """
        from facecloak.models import get_card

        self.check_models([get_card(name) for name in model_names], exact=False)
        self.check_enough_donors(wanted, option=option)
        return [name for name in self.models if name not in model_names]

    def check_models(self, models: Sequence[Embedder | FaceModelCard], *, exact: bool = True) -> None:
        """Raise `DonorBankError` unless the bank was built with these models (same cards).

        ``exact``: with no others either (adding donors embeds each with every model of the bank);
        a replacement checked by fewer recognisers than the bank holds needs only theirs. Cards
        alone will do: the command line checks a bank before it loads any model.
        """
        cards = [model if isinstance(model, FaceModelCard) else model.card for model in models]
        wanted = {card.name: model_fingerprint(card) for card in cards}
        have = {name: entry["fingerprint"] for name, entry in self.models.items()}
        held = have if exact else {name: have.get(name) for name in wanted}
        if wanted != held:
            # a bank holding a model this run lacks was told to refresh, which re-embeds it with
            # this run's models only: its other recognisers' embeddings were dropped
            lacking = sorted(set(have) - set(wanted)) if exact else []
            fix = (
                f"register {', '.join(lacking)} (`facecloak models add`) to use it, or run "
                f"`facecloak donors refresh {self._called()}` to re-embed its donors with this run's "
                f"models only (dropping {', '.join(lacking)})"
                if lacking
                else f"run `facecloak donors refresh {self._called()}` to re-embed its donors"
            )
            # a model added again or calibrated keeps its name: "built with mf but this run uses mf"
            changed = sorted(name for name in wanted if held.get(name) not in (None, wanted[name]))
            since = (
                f" ({', '.join(changed)} changed since: its card's file, input settings or threshold)"
                if changed
                else ""
            )
            raise DonorBankError(
                f"bank {self.name!r} was built with models {_describe(have)} but this run uses "
                f"{_describe(wanted)}{since}; {fix}"
            )
        # a table of the wrong width or with NaNs (embeddings.npz edited or overwritten by hand)
        # was a traceback from inside the first distance, after every model had been loaded
        for card in cards:
            table = self.embeddings.get(card.name)
            if table is None:
                continue
            # a bank all of whose donors were removed holds no row of any width: adding donors to
            # it again was refused as damaged, and `donors refresh` could not mend it
            if (
                table.ndim != 2
                or (len(table) and table.shape[1] != card.embedding_dim)
                or not bool(torch.isfinite(table).all())
            ):
                raise DonorBankError(
                    f"bank embeddings of {card.name} are damaged (shape {tuple(table.shape)}, "
                    f"expected (donors, {card.embedding_dim}) finite values); "
                    f"run `facecloak donors refresh {self._called()}`",
                    self.folder / "embeddings.npz",
                )

    def _called(self) -> str:
        """What to give a command for this bank: its name in the data folder, else its path."""
        return _called(self.name, self.folder)

    def summary(self) -> dict:
        """Name, folder, size, models and licence notes, for ``facecloak donors list``."""
        return {
            "name": self.name,
            "folder": str(self.folder),
            "donors": len(self),
            "models": sorted(self.models),
            "licences": sorted({donor.get("licence", "") for donor in self.donors}),
            "sources": [source.get("folder") for source in self.sources],
            "cut_off": int((~self.usable).sum()),
            "unmeasured": int(self.outside.isnan().sum()),
        }


def _called(name: str, folder: Path) -> str:
    """What to give a command for the bank in ``folder``: ``name`` where that finds it, else its path.

    A bank given by its path outside the data folder was told to run ``--bank NAME``, which
    made or mended another bank, in the data folder. Quoted for a shell where it must be (a
    space): ``donors refresh my bank`` named two banks.
    """
    try:
        found = bank_folder(name).resolve() == folder.resolve()
    except DonorBankError:  # not a valid name
        found = False
    return shlex.quote(name if found else str(folder))


def _describe(models: dict[str, str]) -> str:
    return ", ".join(sorted(models)) if models else "(none)"


# -- reading -----------------------------------------------------------------------------------


def load_bank(
    name: str | Path = DEFAULT_BANK, *, allow_empty: bool = False, embeddings: bool = True
) -> DonorBank:
    """Load a bank by name (or folder path).

    ``embeddings``: read ``embeddings.npz`` too. `facecloak.donors.refresh_bank` loads without
    them: it writes them anew from the chips, so a bank whose embeddings are missing or damaged is
    mended by the command its error names.

    Raises:
        DonorBankError: no such bank, an empty bank, or a damaged one; the message says what to run.
    """
    folder = bank_folder(name)
    manifest_path = folder / "bank.json"
    label = Path(name).name
    called = _called(label, folder)
    if not manifest_path.is_file():
        raise DonorBankError(
            f"no donor bank {label!r} (looked in {folder}); create it with "
            f"`facecloak donors add PHOTOS_DIR --bank {called}`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DonorBankError(f"bank manifest is unreadable ({error})", manifest_path) from None
    if not isinstance(manifest, dict):  # `[]` or `null` was a traceback from every listing of banks
        raise DonorBankError("bank manifest is damaged (not a JSON object)", manifest_path)
    if manifest.get("format") != BANK_FORMAT:
        raise DonorBankError(
            f"bank format {manifest.get('format')} is not {BANK_FORMAT}; remove it with `facecloak "
            f"donors remove {_called(folder.name, folder)}` and add its photos again",
            manifest_path,
        )
    donors = manifest.get("donors", [])
    if not donors and not allow_empty:
        raise DonorBankError(
            f"donor bank {label!r} is empty; "
            f"add photos with `facecloak donors add PHOTOS_DIR --bank {called}`"
        )
    try:  # a manifest edited by hand: one line that says so, not a traceback from every command
        ids = [d["id"] for d in donors]
        complete = all(len(d["stats"]) == len(FACE_STATISTICS) for d in donors)
        points = _tensor([d["chip_landmarks"] for d in donors], (0, 5, 2))
        pose = _tensor([d["pose"] for d in donors], (0, 3))
        stats = _tensor([d["stats"] for d in donors] if complete else [], (0, len(FACE_STATISTICS)))
        outside = outside_shares(donors)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise DonorBankError(
            f"bank manifest is damaged (a donor record is incomplete: {type(error).__name__} {error})",
            manifest_path,
        ) from None
    # chips are files named by id: an id such as '../../x' was read, and `donors remove` deleted
    # its files, outside the bank
    strange = next((i for i in ids if not (isinstance(i, str) and NAME_PATTERN.match(i))), None)
    if strange is not None:
        raise DonorBankError(
            f"bank manifest is damaged (donor id {strange!r} is not a plain name: "
            "letters, digits, '.', '_' or '-')",
            manifest_path,
        )
    # a donor copied in from another bank under an id this one holds: both records read the one
    # chip and embedding, so a face was made from another donor than its record (and list) said
    twice = next(((i, n) for i, n in Counter(ids).items() if n > 1), None)
    if twice is not None:
        raise DonorBankError(
            f"bank manifest is damaged (donor id {twice[0]!r} is given to {twice[1]} donors); "
            "give each its own id and chip, or remove the copies from bank.json",
            manifest_path,
        )
    wrong = _wrong_field(manifest, donors)
    if wrong is not None:  # a hand edit of a field `donors list` or `donors add` reads: a traceback
        raise DonorBankError(f"bank manifest is damaged ({wrong})", manifest_path)
    bank = DonorBank(
        name=label,  # the folder's: a copied or renamed bank is called by its new name
        folder=folder,
        donors=donors,
        points=points,
        pose=pose,
        stats=stats,
        embeddings=_read_embeddings(folder, called, ids, manifest.get("models", {})) if embeddings else {},
        models=manifest.get("models", {}),
        sources=manifest.get("sources", []),
        outside=outside,
    )
    if not complete:
        # made by an older facecloak, before its last statistic: computed from the stored chips
        # (a second or so for a few hundred donors; `facecloak donors refresh` stores them)
        bank.stats = _statistics_from_chips(bank)
    return bank


def _wrong_field(manifest: dict, donors: list[dict]) -> str | None:
    """What is of the wrong type among the manifest's fields that commands read, or None."""
    models = manifest.get("models", {})
    if not isinstance(models, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str) for entry in models.values()
    ):
        return "'models' must map each model's name to its record with a 'fingerprint'"
    sources = manifest.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(source, dict) for source in sources):
        return "'sources' must be a list of records"
    for donor in donors:
        if not isinstance(donor.get("source"), str):
            return f"donor {donor['id']} has no 'source' text"
        if not isinstance(donor.get("licence", ""), str):
            return f"the 'licence' of donor {donor['id']} is not text"
        scale = donor.get("detail_scale", 1)
        if not isinstance(scale, int) or isinstance(scale, bool):
            return f"the 'detail_scale' of donor {donor['id']} is not a whole number"
    return None


def _statistics_from_chips(bank: DonorBank, chunk: int = 64) -> Tensor:
    """Every donor's `face_statistics`, from its stored chip, a chunk at a time (none kept in memory)."""
    parts = []
    for start in range(0, len(bank), chunk):
        rows = range(start, min(len(bank), start + chunk))
        parts.append(face_statistics(bank.chips(rows)))
        for row in rows:
            bank._chips.pop(row, None)
    return torch.cat(parts)


def outside_shares(donors: Sequence[dict]) -> Tensor:
    """(N,) `window_outside_share` of each donor record; NaN where it holds no ``photo_size``."""
    shares = torch.full((len(donors),), math.nan)
    sized = [i for i, donor in enumerate(donors) if donor.get("photo_size")]
    if sized:
        landmarks = torch.tensor([donors[i]["landmarks"] for i in sized], dtype=torch.float32)
        width, height = torch.tensor([donors[i]["photo_size"] for i in sized], dtype=torch.float32).unbind(1)
        shares[sized] = window_outside_share(landmarks, width, height)
    return shares


def _tensor(rows: list, empty_shape: tuple[int, ...]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(empty_shape)


def _read_embeddings(folder: Path, called: str, ids: list[str], models: dict) -> dict[str, Tensor]:
    """Each model's (N, D) embeddings of donors ``ids``; ``called``: the bank as a command names it."""
    path = folder / "embeddings.npz"
    if not ids:
        return {name: torch.zeros(0, 1) for name in models}
    try:
        with np.load(path) as data:
            stored_ids = [str(v) for v in data["ids"]]
            tables = {name: data[name] for name in models}
        if any(len(table) != len(stored_ids) for table in tables.values()):
            raise ValueError("a model's table and the ids differ in length")
        # a table of text (or of records) was a ValueError traceback from the conversion below
        tables = {name: np.asarray(table, dtype=np.float32) for name, table in tables.items()}
    # a truncated or overwritten file is not a zip (BadZipFile) or ends early (EOFError): the same
    # one-line error with its fix as a missing file, not a traceback from every command that loads it
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DonorBankError(
            f"bank embeddings are missing or damaged ({error}); run `facecloak donors refresh {called}`",
            path,
        ) from None
    row = {donor_id: i for i, donor_id in enumerate(stored_ids)}
    missing = [donor_id for donor_id in ids if donor_id not in row]
    if missing:
        raise DonorBankError(
            f"{len(missing)} donor(s) have no embedding; run `facecloak donors refresh {called}`", path
        )
    order = [row[donor_id] for donor_id in ids]
    return {name: torch.from_numpy(np.ascontiguousarray(table[order])) for name, table in tables.items()}


def list_banks() -> list[dict]:
    """Summaries of every bank in `data_dir` (a damaged one says why)."""
    root = data_dir()
    summaries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            summaries.append(load_bank(folder, allow_empty=True).summary())
        except FacecloakError as error:
            summaries.append({"name": folder.name, "folder": str(folder), "error": str(error)})
    return summaries


# -- writing -----------------------------------------------------------------------------------
