"""``facecloak donors``: the donor banks that face replacement draws new faces from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from facecloak.cli.options import CONTEXT, usable_device
from facecloak.cli.running import fail, fail_run, load_models
from facecloak.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNPROTECTED,
    EXIT_USAGE,
    DonorBankError,
    FacecloakError,
    InvalidInputError,
    shown_path,
)


@click.group(context_settings=CONTEXT)
def donors() -> None:
    """Donor banks: the faces `anonymize --method replace` makes new faces from.

    A bank is a folder under $XDG_DATA_HOME/facecloak/donors/NAME (bank.json, chips/, embeddings.npz):
    copy it, inspect it, delete it. Donor photos are yours: your own stock photos, or a face set
    whose licence allows it. facecloak ships none and downloads none.

    \b
    facecloak donors add stock_photos/ --bank mybank --licence "own photos, CC0"
    facecloak donors list
    facecloak donors list mybank
    facecloak donors remove mybank --donor d00007
    facecloak donors refresh mybank          after `facecloak models add`
    """


@donors.command("add", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--bank", default="default", show_default=True, help="Bank name (created if missing) or folder."
)
@click.option(
    "--licence",
    "--license",
    "licence",
    default="",
    help="Where the photos come from and under which licence; stored with every donor.",
)
@click.option("--all-faces", is_flag=True, help="Take every usable face of a photo, not only the largest.")
@click.option(
    "--device", default=None, callback=usable_device, help="torch device. Default: CUDA if present."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def donors_add(paths, bank, licence, all_faces, device, as_json) -> None:
    """Detect, align and store the donor faces of photos (files or folders) in a bank.

    Each photo gives its largest clear, near-frontal face of at least 60 px; a photo without one
    is listed and skipped. Every available face model embeds each donor, so new faces can be
    checked against it. Exit code 1 when a photo was skipped, 3 when a file failed.
    """
    from facecloak.donors import add_donors

    try:  # a missing path is one file's error in the report (exit 3), as in every other command
        models = load_models(None, device)
        report = add_donors(paths, models, bank=bank, licence=licence, all_faces=all_faces)
    except FacecloakError as error:  # the bank asked for is wrong: usage; a file that failed: its own code
        usage = isinstance(error, DonorBankError | InvalidInputError)
        fail_run("donors add", error, {"as_json": as_json}, EXIT_USAGE if usage else None)
    if not licence:
        click.echo(
            "note: no --licence given; record where these photos come from and their licence", err=True
        )
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else str(report))
    sys.exit(EXIT_FAILED if report.failed else EXIT_UNPROTECTED if report.skipped else EXIT_OK)


@donors.command("list", context_settings=CONTEXT)
@click.argument("bank", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def donors_list(bank, as_json) -> None:
    """List the banks, or the donors of one bank (id, licence note, source photo)."""
    from facecloak.donor_bank import data_dir, list_banks, load_bank

    if bank is None:
        banks = list_banks()
        # a damaged bank is listed as an error line, the others still listed, and the exit code
        # says it (it was 0: a script reading the listing could not tell)
        damaged = any("error" in entry for entry in banks)
        if as_json:
            click.echo(json.dumps(banks, indent=2))
            sys.exit(EXIT_FAILED if damaged else EXIT_OK)
        if not banks:
            click.echo(
                f"no donor bank in {data_dir()}; "
                "create one with `facecloak donors add PHOTOS_DIR --bank NAME`"
            )
        for entry in banks:
            if "error" in entry:
                click.echo(f"error: {entry['error']}", err=True)
                continue
            click.echo(
                f"{entry['name']:<20} {entry['donors']:>5} donor(s)  models: {', '.join(entry['models'])}  "
                f"({entry['folder']})"
            )
            for note in _edge_notes(entry):
                click.echo(f"  {note}")
        sys.exit(EXIT_FAILED if damaged else EXIT_OK)
    try:
        data = load_bank(bank, allow_empty=True)
    except FacecloakError as error:
        fail(error, EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({**data.summary(), "donor_records": data.donors}, indent=2))
        return
    click.echo(f"{data.name}: {len(data)} donor(s), models {', '.join(sorted(data.models))} ({data.folder})")
    for note in _edge_notes(data.summary()):
        click.echo(f"  {note}")
    for donor, usable in zip(data.donors, data.usable.tolist()):
        detail = f"  detail chip {donor['detail_scale']}x" if donor.get("detail_scale", 1) > 1 else ""
        unused = "" if usable else "  CUT OFF (not used)"
        # a licence note (or file name) holding a newline showed as a second donor line: one that
        # forged a donor the bank does not hold, or hid the real donor's source photo
        licence, source = shown_path(donor.get("licence") or "-"), shown_path(donor["source"])
        click.echo(f"  {donor['id']}  licence: {licence}{detail}{unused}  {source}")


def _edge_notes(summary: dict) -> list[str]:
    """What `donors list` says of a bank's donors cut off by their photo's edge (`DonorBank.summary`).

    The bank is called as a command finds it (`donor_bank._called`): ``my bank`` quoted, a bank
    outside the data folder by its path.
    """
    from facecloak.donor_bank import _called

    called = _called(summary["name"], Path(summary["folder"]))
    notes = []
    if summary["cut_off"]:
        notes.append(
            f"{summary['cut_off']} donor(s) cut off by their photo's edge, never used "
            f"(`facecloak donors remove {called} --donor ID` removes one)"
        )
    if summary["unmeasured"]:
        notes.append(
            f"{summary['unmeasured']} donor(s) added before photo sizes were stored: "
            f"`facecloak donors refresh {called}` checks them for faces cut off by the photo's edge"
        )
    return notes


@donors.command("remove", context_settings=CONTEXT)
@click.argument("bank")
@click.option(
    "--donor", "ids", multiple=True, help="Remove only this donor (repeatable). Default: the whole bank."
)
def donors_remove(bank, ids) -> None:
    """Remove a whole bank, or some of its donors."""
    from facecloak.donor_bank import bank_folder
    from facecloak.donors import remove_donors
    from facecloak.errors import shown_path

    try:
        folder = None if ids else bank_folder(bank)
        count = remove_donors(bank, ids)
    except FacecloakError as error:
        fail(error, EXIT_USAGE)
    if ids:
        click.echo(f"removed {count} donor(s)")
        return
    donors = "its donors" if count is None else f"{count} donor(s)"  # None: a damaged manifest
    click.echo(f"removed {donors} and bank {bank}")
    if folder.is_dir() and not folder.is_symlink():
        click.echo(f"kept {shown_path(folder)}: it holds files the bank did not write")


@donors.command("refresh", context_settings=CONTEXT)
@click.argument("bank")
@click.option(
    "--device", default=None, callback=usable_device, help="torch device. Default: CUDA if present."
)
def donors_refresh(bank, device) -> None:
    """Re-embed a bank's donors with every face model available now (from its stored chips)."""
    from facecloak.donors import refresh_bank

    try:
        data = refresh_bank(bank, load_models(None, device))
    except FacecloakError as error:
        fail(error, EXIT_USAGE)
    click.echo(f"{data.name}: {len(data)} donor(s) re-embedded with {', '.join(sorted(data.models))}")
