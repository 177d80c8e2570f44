"""``facecloak detect``, ``embed`` and ``verify``: look at faces, change nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from facecloak.cli.options import (
    CONTEXT,
    JSONL_OPTION,
    FiniteFloatRange,
    batch_options,
    detect_options,
    given_on_command_line,
    remember_json_output,
    verify_detect_options,
)
from facecloak.cli.running import echo_end_document, fail, load_models, print_per_file
from facecloak.errors import EXIT_OK, EXIT_UNPROTECTED, FacecloakError


def _fail_listing(command: str, error: FacecloakError, as_json: bool) -> None:
    """`fail`, and with --json/--jsonl the end document on stdout: a pipe into jq got nothing."""
    if as_json:
        echo_end_document(command, str(error), error.exit_code)
    fail(error)


@click.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@detect_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=remember_json_output,
    is_eager=True,
    help="Print one JSON document instead of a table.",
)
@JSONL_OPTION
def detect(paths, as_json, as_jsonl, **detection) -> None:
    """List the faces found in photos (boxes, confidence, five landmarks).

    A missing or unreadable file gets one error line and the others are still listed (exit 3).

    \b
    facecloak detect photo.jpg
    facecloak detect photos/ --json > faces.json
    facecloak detect photos/ --jsonl | head -3
    """
    if as_json and as_jsonl:  # refused before any photo is read, not after all are detected
        raise click.UsageError("--json and --jsonl cannot be used together")
    from facecloak.commands import detect_files

    options = batch_options(None, **detection)
    try:
        results = detect_files(paths, options)
    except FacecloakError as error:
        _fail_listing("detect", error, as_json or as_jsonl)

    def describe(face: dict) -> str:
        box = ", ".join(f"{v:.0f}" for v in face["box"])
        return f"box ({box})  score {face['score']:.3f}"

    print_per_file(results, as_json, describe, as_jsonl=as_jsonl, paths=paths)


@click.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_name", default="dlib-resnet", show_default=True, help="Face model.")
@detect_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=remember_json_output,
    is_eager=True,
    help="Print one JSON document (with the full vectors).",
)
@JSONL_OPTION
def embed(paths, model_name, as_json, as_jsonl, **detection) -> None:
    """Print the embedding of every face found.

    \b
    facecloak embed photo.jpg --json
    facecloak embed photos/ --jsonl > embeddings.jsonl
    """
    if as_json and as_jsonl:  # refused before any photo is read, not after all are detected
        raise click.UsageError("--json and --jsonl cannot be used together")
    from facecloak.commands import embed_files

    options = batch_options(None, **detection)
    try:
        model = _one_model(model_name, options.device)
        results = embed_files(paths, model, options)
    except FacecloakError as error:
        _fail_listing("embed", error, as_json or as_jsonl)

    def describe(face: dict) -> str:
        head = " ".join(f"{v:+.3f}" for v in face["embedding"][:6])
        return f"[{head} ...] ({len(face['embedding'])}-d, {model.card.name})"

    print_per_file(results, as_json, describe, as_jsonl=as_jsonl, paths=paths)


@click.command(context_settings=CONTEXT)
@click.argument("first", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_name", default="dlib-resnet", show_default=True, help="Face model.")
@click.option(
    "--match-threshold",
    type=FiniteFloatRange(0, None),
    default=None,
    help="Same person when the distance is below this. Default: the model's own threshold "
    "(see `facecloak models`: dlib-resnet 0.6, euclidean). Lower is stricter.",
)
@verify_detect_options
@click.option(
    "--threshold",
    "deprecated_threshold",
    type=FiniteFloatRange(0, 1),
    default=None,
    hidden=True,
    help="Deprecated alias of --detect-threshold.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=remember_json_output,
    is_eager=True,
    help="Print one JSON document.",
)
def verify(first, second, model_name, match_threshold, deprecated_threshold, as_json, **detection) -> None:
    """Say whether two photos show the same person (largest face of each).

    Two thresholds: --match-threshold decides "same person" from the distance between the two
    faces (default: the model's own); --detect-threshold is the face detector's confidence.
    Exit code 0 when they match, 1 when they do not, 3 when a photo has no face or fails.

    \b
    facecloak verify me.jpg me_cloaked.png
    facecloak verify me.jpg other.jpg --match-threshold 0.5 --json
    """
    from facecloak.commands import verify_files

    if deprecated_threshold is not None and given_on_command_line("threshold"):
        # the alias overwrote the value given to --detect-threshold itself
        raise click.UsageError("--threshold (deprecated) is --detect-threshold: give only one of them")
    if deprecated_threshold is not None:
        click.echo(
            "warning: verify --threshold is deprecated: it sets the face detection confidence; "
            "use --detect-threshold for that, or --match-threshold for the same-person threshold",
            err=True,
        )
        detection["threshold"] = deprecated_threshold
    options = batch_options(None, **detection)
    try:
        model = _one_model(model_name, options.device)
        result = verify_files(first, second, model, options, match_threshold=match_threshold)
    except FacecloakError as error:
        if as_json:  # stdout still gets the one document it promises
            echo_end_document("verify", str(error), error.exit_code)
        fail(error)
    if as_json:
        click.echo(json.dumps(result))
    else:
        same = result["same_person"]
        verdict = "SAME person" if same else "DIFFERENT people"
        relation = "<" if same else ">="
        click.echo(
            f"{verdict}: distance {result['distance']:.4f} ({result['metric']}) {relation} "
            f"match threshold {result['match_threshold']:g} ({model.card.name})"
        )
    sys.exit(EXIT_OK if result["same_person"] else EXIT_UNPROTECTED)


def _one_model(name: str, device: str | None):
    """The one model ``--model`` names.

    A list (``a,b``) or an empty name was taken: the first model used, the raw text printed as its name.
    """
    from facecloak._checks import split_names

    names = split_names(name)
    if len(names) != 1:
        raise click.UsageError(
            f"--model {name!r}: give one model name, e.g. dlib-resnet (see `facecloak models`)"
        )
    return load_models(names[0], device)[0]
