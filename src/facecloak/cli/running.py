"""Running a command's work and ending it: the batch with its progress, printed results, exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click

from facecloak.batch_types import Options
from facecloak.cli.options import URI, require_paths, say_left_out, uri_of
from facecloak.errors import EXIT_FAILED, EXIT_OK, EXIT_UNPROTECTED, FacecloakError


def file_printer(as_json: bool, as_jsonl: bool, quiet: bool) -> Callable:
    """What to print as each file finishes: its line (stdout; errors on stderr) or its JSON line."""
    from dataclasses import asdict

    def print_file(event) -> None:
        outcome = event.outcome
        if outcome.status == "failed":
            click.echo(outcome.message, err=True)
        if as_jsonl:
            click.echo(json.dumps(asdict(outcome)))
        elif as_json or outcome.status in ("failed", "skipped"):
            return
        elif not quiet or outcome.status != "protected":
            click.echo(outcome.message)

    return print_file


def run_protection(
    command: str,
    tag: str,
    paths,
    options: Options,
    build: Callable,
    io_values: dict,
    loading: str = "",
    *,
    spec=None,
    ray_address: str | None = None,
):
    """Run a batch with its progress display; the protector is built only if there is work.

    Three ways, one set of rules (an output that exists and is not this batch's own is skipped
    unless --overwrite; a missing or unreadable path is one file's error; no image at all exits 1):

    - ``--ray``: on a Ray cluster (`facecloak.distributed`), journaled into -o;
    - ``-o OUT``: journaled and resumable (`facecloak.pipeline`): a killed batch run again does only
      what is left, outputs its journal recorded are "done earlier";
    - neither: planned (`facecloak.batch.plan_batch`), then written beside each input.
    """
    from facecloak.batch import plan_batch, run_batch
    from facecloak.progress import BatchDisplay

    as_json, as_jsonl, quiet = io_values["as_json"], io_values["as_jsonl"], io_values["quiet"]
    if as_json and as_jsonl:
        raise click.UsageError("--json and --jsonl cannot be used together")
    if ray_address is not None:
        if not options.out_dir:
            raise click.UsageError("--ray needs an output folder (-o)")
        require_paths(paths)
        try:
            from facecloak.distributed import run_distributed
        except ImportError as error:
            raise click.UsageError(f"--ray needs pip install 'facecloak[ray]' ({error})") from None
    mode = "none" if quiet else io_values["progress_mode"]
    try:
        with BatchDisplay(command, mode, on_file=file_printer(as_json, as_jsonl, quiet)) as display:

            def build_now():
                if loading:
                    display.status(loading)
                return build()

            if ray_address is not None:
                uris = [uri_of(p) if URI.match(str(p)) else p for p in paths]
                return run_distributed(
                    uris, spec, options, address=ray_address or None, command=command, on_progress=display
                )
            if options.out_dir:
                from facecloak.pipeline import run_resumable_batch

                return run_resumable_batch(
                    paths,
                    None,
                    options,
                    settings=spec.settings(),
                    command=command,
                    on_progress=display,
                    tag=tag,
                    build=build_now,
                )
            plan = plan_batch(paths, tag, options)
            display.show_plan(plan)
            protector = build_now() if plan.todo else None
            return run_batch(paths, protector, options, command=command, on_progress=display, plan=plan)
    except FacecloakError as error:
        fail_run(command, error, io_values)


def fail_run(command: str, error: FacecloakError, io_values: dict, code: int | None = None) -> None:
    """`fail` for a batch command that cannot start: with --json/--jsonl, stdout still gets its document.

    ``{"command", "error", "exit_code"}``, whether the batch was refused before it began (an unknown
    model, a missing donor bank) or as it started (an output folder that cannot be made).
    """
    exit_code = error.exit_code if code is None else code
    if io_values.get("as_json") or io_values.get("as_jsonl"):
        echo_end_document(command, str(error), exit_code)
    fail(error, exit_code)


def echo_end_document(command: str | None, error: str, exit_code: int) -> None:
    """The one JSON document a --json/--jsonl run prints on stdout when it ends without a report."""
    click.echo(json.dumps({"command": command, "error": error, "exit_code": exit_code}))


def finish(report, as_json: bool, as_jsonl: bool, quiet: bool) -> None:
    """Print the final table and the summary (or the JSON), then exit with the report's code."""
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    elif as_jsonl:
        summary = {key: value for key, value in report.to_dict().items() if key != "files"}
        click.echo(json.dumps({"summary": summary}))
    else:
        rows = report.table()
        if not quiet and len(rows) > 1:
            click.echo(render_table(rows))
        click.echo(str(report), err=report.exit_code != EXIT_OK)
    sys.exit(report.exit_code)


def render_table(rows: list[list[str]]) -> str:
    """Plain aligned columns (readable in a terminal, a log or a pipe); numbers right-aligned.

    Columns with nothing to say (every value "-", e.g. cloak distances in an anonymise run) are left out.
    """
    keep = [k for k in range(len(rows[0])) if any(row[k] != "-" for row in rows[1:])]
    rows = [[row[k] for k in keep] for row in rows]
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    numeric = [all(is_number(row[k]) for row in rows[1:]) for k in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def is_number(text: str) -> bool:
    """Whether a table cell is a number (or "-"), so its column is right-aligned."""
    return text == "-" or text.rstrip("x").replace(".", "", 1).replace("/", "", 1).isdigit()


def fail(error: FacecloakError, code: int | None = None) -> None:
    """Print ``error: <one line>`` on stderr and exit with ``code``, by default the error's own.

    2 for a usage error such as an unknown model, 3 for a file that failed.
    """
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code if code is None else code)


def print_per_file(
    results: list[dict], as_json: bool, describe: Callable[[dict], str], *, as_jsonl: bool = False, paths=()
) -> None:
    """Print per-file face listings (or JSON), then exit: 3 a file failed, 1 an image had no face.

    ``--json`` prints one compact document (a list, one entry per file); ``--jsonl`` one line
    per face (``path``, ``face`` index and the face's fields), a line with ``"face": null`` for
    an image without faces and one with ``error`` for a file that failed.
    """
    if as_json and as_jsonl:
        raise click.UsageError("--json and --jsonl cannot be used together")
    if not results:
        click.echo(f"error: no image found in {', '.join(map(str, paths))}; nothing to do", err=True)
        if as_json:  # a pipe into jq still gets a document: the empty list
            click.echo(json.dumps([]))
        sys.exit(EXIT_UNPROTECTED)
    if as_json:
        click.echo(json.dumps(results))
    elif as_jsonl:
        for result in results:
            if "error" in result:
                click.echo(f"error: {result['error']}", err=True)
                click.echo(json.dumps(result))
                continue
            head = {key: value for key, value in result.items() if key != "faces"}
            if not result["faces"]:
                click.echo(json.dumps({**head, "face": None}))
            for index, face in enumerate(result["faces"]):
                click.echo(json.dumps({**head, "face": index, **face}))
    else:
        for result in results:
            if "error" in result:
                click.echo(f"error: {result['error']}", err=True)
                continue
            faces = result["faces"]
            click.echo(f"{result['path']}: {len(faces)} face(s)" + ("" if faces else " -- NO face found"))
            for face in faces:
                click.echo(f"  {describe(face)}")
    failed = any("error" in r for r in results)
    no_face = any(not r.get("faces") for r in results if "error" not in r)
    sys.exit(EXIT_FAILED if failed else EXIT_UNPROTECTED if no_face else EXIT_OK)


def create_model(name: str, device: str | None):
    """Build face model ``name`` (the one place commands build models; tests cache it)."""
    from facecloak.models import create_embedder

    return create_embedder(name, device=device)


def load_models(names: str | None, device: str | None) -> list:
    """Build the named models (comma-separated), or every model available here."""
    from facecloak.models import choose_embedders

    chosen = choose_embedders(names)
    say_left_out(names)
    return [create_model(name, device) for name in chosen]
