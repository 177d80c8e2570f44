"""The ``facecloak`` command: parse options, call the Python API, print the report, exit.

Exit codes: 0 every face found was protected; 1 finished, but an image had no face or a face
fell short of its target, or no image was found; 2 usage error; 3 a file failed (missing,
unreadable or unwritable; the others were still processed).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import click

from facecloak import __version__
from facecloak.batch import Options
from facecloak.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNPROTECTED,
    EXIT_USAGE,
    FacecloakError,
    InvalidInputError,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _io_options(function: Callable) -> Callable:
    """Options every photo-writing command shares."""
    decorators = [
        click.option(
            "-o",
            "--output",
            "out_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Output folder (the input tree is mirrored under it). Default: beside each input, "
            "as <name>_<tag>.<ext>. Inputs are never overwritten.",
        ),
        click.option(
            "--format",
            "format_name",
            type=click.Choice(["jpeg", "png", "webp", "tiff", "bmp", "heif"], case_sensitive=False),
            default=None,
            help="Output format. Default: the input's own (GIF becomes PNG).",
        ),
        click.option(
            "--keep-metadata",
            is_flag=True,
            help="Keep EXIF (camera, date...) minus GPS. Default: drop all EXIF; the colour profile is kept.",
        ),
        click.option("--overwrite", is_flag=True, help="Replace earlier outputs (never an input)."),
        click.option(
            "--jpeg-quality",
            type=click.IntRange(1, 100),
            default=None,
            help="Re-encode JPEG/WebP outputs whole at this quality. Default: a JPEG written from a "
            "JPEG keeps the input's own quantisation and re-encodes only the 8x8 blocks around the "
            "faces (every other block stays bit-exact); other outputs use 95.",
        ),
        click.option(
            "--json", "as_json", is_flag=True, help="Print the full report as one JSON document on stdout."
        ),
        click.option(
            "--jsonl",
            "as_jsonl",
            is_flag=True,
            help="Print one JSON line per file on stdout as each is done, then a summary line (for pipes).",
        ),
        click.option(
            "--progress",
            "progress_mode",
            type=click.Choice(["auto", "bar", "plain", "none"]),
            default="auto",
            show_default=True,
            help="Progress on stderr: a live bar, plain lines (for logs), or none. auto: bar on a "
            "terminal, plain otherwise.",
        ),
        click.option(
            "-q", "--quiet", is_flag=True, help="No progress, and per-file lines only for problems."
        ),
    ]
    function = _detect_options(function)
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _detect_options(function: Callable, *, verify: bool = False) -> Callable:
    """Options of face detection and of reading images.

    ``verify`` drops the ``--threshold`` alias of ``--detect-threshold`` (verify has two
    thresholds; there ``--threshold`` is a deprecated alias added by the command itself).
    """
    decorators = [
        click.option(
            "--detect-threshold",
            "--threshold",
            "threshold",
            type=click.FloatRange(0, 1),
            default=0.9,
            show_default=True,
            help="Face detection confidence. Lower finds more faces (profiles, blur) and more false ones.",
        ),
        click.option(
            "--min-face",
            type=click.IntRange(4, None),
            default=20,
            show_default=True,
            help="Smallest face side to look for, in pixels. Smaller is slower.",
        ),
        click.option(
            "--device", default=None, help="torch device, e.g. cpu or cuda:0. Default: CUDA if present."
        ),
        click.option(
            "--max-pixels",
            type=click.IntRange(1, None),
            default=None,
            help="Refuse images with more pixels (decompression-bomb guard). Default 120,000,000.",
        ),
    ]
    if verify:
        decorators[0] = click.option(
            "--detect-threshold",
            "threshold",
            type=click.FloatRange(0, 1),
            default=0.9,
            show_default=True,
            help="Face detection confidence (not the same-person threshold: see --match-threshold).",
        )
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _verify_detect_options(function: Callable) -> Callable:
    return _detect_options(function, verify=True)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="facecloak")
def main() -> None:
    """Protect the faces in your photos from face-search scrapers.

    \b
    facecloak cloak photo.jpg                 cloak every face -> photo_cloaked.jpg
    facecloak anonymize photos/ -o out/       blur every face in a folder
    facecloak detect photo.jpg --json         list the faces found
    facecloak evaluate DATA --method cloak    measure what a protection buys

    Exit codes: 0 all faces protected (inputs whose output exists are skipped); 1 an image had
    no face, a face was not protected, or no image was found; 2 usage error; 3 some file failed
    (missing, unreadable, unwritable; the others were still done).
    """


def _options(out_dir: Path | None, **values) -> Options:
    return Options(
        out_dir=str(out_dir) if out_dir else None,
        format=values.get("format_name"),
        keep_metadata=values.get("keep_metadata", False),
        overwrite=values.get("overwrite", False),
        max_pixels=values.get("max_pixels"),
        min_score=values.get("threshold", 0.9),
        min_size=values.get("min_face", 20),
        device=values.get("device"),
        jpeg_quality=values.get("jpeg_quality"),
    )


def _print_file(as_json: bool, as_jsonl: bool, quiet: bool) -> Callable:
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


def _run_protection(
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
        _require_paths(paths)
        try:
            from facecloak.distributed import run_distributed
        except ImportError as error:
            raise click.UsageError(f"--ray needs pip install 'facecloak[ray]' ({error})") from None
    mode = "none" if quiet else io_values["progress_mode"]
    try:
        with BatchDisplay(command, mode, on_file=_print_file(as_json, as_jsonl, quiet)) as display:

            def build_now():
                if loading:
                    display.status(loading)
                return build()

            if ray_address is not None:
                uris = [
                    _URI.sub(lambda m: m.group(0) + "/", str(p)) if _URI.match(str(p)) else p for p in paths
                ]
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
        _fail(error)


def _finish(report, as_json: bool, as_jsonl: bool, quiet: bool) -> None:
    """Print the final table and the summary (or the JSON), then exit with the report's code."""
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    elif as_jsonl:
        summary = {key: value for key, value in report.to_dict().items() if key != "files"}
        click.echo(json.dumps({"summary": summary}))
    else:
        rows = report.table()
        if not quiet and len(rows) > 1:
            click.echo(_render_table(rows))
        click.echo(str(report), err=report.exit_code != EXIT_OK)
    sys.exit(report.exit_code)


def _render_table(rows: list[list[str]]) -> str:
    """Plain aligned columns (readable in a terminal, a log or a pipe); numbers right-aligned.

    Columns with nothing to say (every value "-", e.g. cloak distances in an anonymise run) are left out.
    """
    keep = [k for k in range(len(rows[0])) if any(row[k] != "-" for row in rows[1:])]
    rows = [[row[k] for k in keep] for row in rows]
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    numeric = [all(_is_number(row[k]) for row in rows[1:]) for k in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    return text == "-" or text.rstrip("x").replace(".", "", 1).replace("/", "", 1).isdigit()


def _fail(error: FacecloakError, code: int = EXIT_FAILED) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(code)


def _print_per_file(
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
                fields = {key: value for key, value in face.items() if key != "image_index"}
                click.echo(json.dumps({**head, "face": index, **fields}))
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


_JSONL_OPTION = click.option(
    "--jsonl", "as_jsonl", is_flag=True, help="Print one JSON line per face (for pipes: grep, head, jq)."
)


def _require_paths(paths: tuple[Path, ...]) -> None:
    """For Ray only: local paths must exist (URIs such as s3://... are checked by the workers)."""
    missing = [str(path) for path in paths if not path.exists() and not _URI.match(str(path))]
    if missing:
        raise click.UsageError(f"no such file or folder: {', '.join(missing)}")


_URI = re.compile(r"^[a-z][a-z0-9+.-]*:/")  # s3://..., gs://... (a Path keeps one slash of the two)


def _ray_option(function: Callable) -> Callable:
    """``--ray [ADDRESS]``: run the batch on a Ray cluster (facecloak.distributed)."""
    return click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="",
        default=None,
        metavar="[ADDRESS]",
        help="Run on Ray: --ray alone starts or joins the local cluster (RAY_ADDRESS), --ray=ADDRESS joins "
        "that one (e.g. ray://head:10001). Inputs may be s3:// or other pyarrow URIs; needs -o and "
        "pip install 'facecloak[ray]'. Put it after the paths.",
    )(function)


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_detect_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@_JSONL_OPTION
def detect(paths, threshold, min_face, device, max_pixels, as_json, as_jsonl) -> None:
    """List the faces found in photos (boxes, confidence, five landmarks).

    A missing or unreadable file gets one error line and the others are still listed (exit 3).

    \b
    facecloak detect photo.jpg
    facecloak detect photos/ --json > faces.json
    facecloak detect photos/ --jsonl | head -3
    """
    from facecloak.commands import detect_files

    options = _options(None, threshold=threshold, min_face=min_face, device=device, max_pixels=max_pixels)
    try:
        results = detect_files(paths, options)
    except FacecloakError as error:
        _fail(error)

    def describe(face: dict) -> str:
        box = ", ".join(f"{v:.0f}" for v in face["box"])
        return f"box ({box})  score {face['score']:.3f}"

    _print_per_file(results, as_json, describe, as_jsonl=as_jsonl, paths=paths)


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["blur", "pixelate", "mask", "replace"]),
    default="blur",
    show_default=True,
    help="blur: Gaussian blur scaled to the face; pixelate: mosaic; mask: solid fill; "
    "replace: a new face mixed from --donors, checked to match nobody.",
)
@click.option(
    "--shape",
    type=click.Choice(["ellipse", "box"]),
    default="ellipse",
    show_default=True,
    help="Region shape.",
)
@click.option(
    "--mask-scale",
    type=click.FloatRange(0.5, 4.0),
    default=1.3,
    show_default=True,
    help="Region size relative to the detected box. Larger also covers hair and ears.",
)
@click.option(
    "--strength",
    type=click.FloatRange(0.01, 2.0),
    default=None,
    help="blur: sigma as a fraction of the face size [default 0.25]. Lower keeps more of the face.",
)
@click.option(
    "--blocks",
    type=click.IntRange(1, 64),
    default=None,
    help="pixelate: mosaic blocks across the face [default 8]. More blocks keep more identity.",
)
@click.option(
    "--feather",
    type=click.FloatRange(0, 1),
    default=None,
    help="Soft edge as a fraction of the region (blur default 0.15, others 0).",
)
@click.option(
    "--donors",
    "donor_bank",
    default=None,
    help="replace: the donor bank (a name from `facecloak donors list`, or a bank folder).",
)
@click.option(
    "--donors-per-face",
    type=click.IntRange(2, 8),
    default=3,
    show_default=True,
    help="replace: donors mixed into each new face. More: each donor shows less, the face is more average.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="replace: seed of the donor draw and the grain."
)
@_io_options
@_ray_option
def anonymize(
    paths,
    method,
    shape,
    mask_scale,
    strength,
    blocks,
    feather,
    donor_bank,
    donors_per_face,
    seed,
    **io_values,
) -> None:
    """Blur, pixelate, mask or replace every face, at the photo's full resolution.

    Pixels outside the face regions are left exactly as they were (for a JPEG, every 8x8 block
    away from the faces stays bit-exact). Outputs are written atomically as <name>_<method>.<ext>
    (photo_blur.jpg, photo_pixelate.jpg, photo_mask.jpg, photo_replace.jpg); inputs are never
    overwritten; an input whose output exists is skipped unless --overwrite; EXIF (GPS above
    all) is dropped unless --keep-metadata.

    --method replace puts a new face mixed from several donors of a bank (`facecloak donors add`)
    in place of each face, keeping hair, ears and background. Each new face is checked after
    JPEG 75: found again by the detector, and on every available recogniser beyond the match
    threshold from the original face and from every donor used; a face that fails is retried
    with other donors, then reported as NOT protected (exit code 1). Faces under --min-face
    (default 40 px with replace) are blurred instead, and reported.

    \b
    facecloak anonymize photo.jpg
    facecloak anonymize photos/ -o anonymized/ --method pixelate --blocks 6
    facecloak anonymize photos/ -o out/ --method mask --shape box --json
    facecloak anonymize photos/ -o out/ --method replace --donors mybank
    """
    from facecloak.anonymize import Anonymizer
    from facecloak.pipeline import ProtectorSpec
    from facecloak.protection import AnonymizeFaces

    if method == "replace":
        _replace_command(paths, donor_bank, donors_per_face, seed, io_values)
        return
    if donor_bank is not None:
        raise click.UsageError("--donors is for --method replace")
    options = _options(**{k: v for k, v in io_values.items() if k != "ray_address"})
    params = {"scale": mask_scale, "shape": shape, "feather": feather}
    if method == "blur":
        params["strength"] = strength
    elif method == "pixelate":
        params["blocks"] = blocks
    elif strength is not None or blocks is not None:
        raise click.UsageError("--strength is for blur and --blocks for pixelate")
    try:
        anonymizer = Anonymizer(method, **params)
        spec = ProtectorSpec("anonymize", {"method": method, **params})
    except FacecloakError as error:
        _fail(error, EXIT_USAGE)
    report = _run_protection(
        "anonymize",
        method,
        paths,
        options,
        lambda: AnonymizeFaces(anonymizer),
        io_values,
        spec=spec,
        ray_address=io_values.get("ray_address"),
    )
    report.options.update(method=method)
    _finish(report, io_values["as_json"], io_values["as_jsonl"], io_values["quiet"])


def _replace_command(paths, donor_bank, donors_per_face, seed, io_values) -> None:
    """``anonymize --method replace``: load the bank and every available model, run the batch."""
    from facecloak.detect import MIN_FACE_PX, FaceDetector
    from facecloak.donors import load_bank
    from facecloak.errors import DonorBankError
    from facecloak.pipeline import ProtectorSpec
    from facecloak.protection import ReplaceFaces
    from facecloak.replace import REPLACE_MIN_FACE_PX, FaceReplacer

    if donor_bank is None:
        raise click.UsageError(
            "--method replace needs --donors BANK; "
            "create a bank with `facecloak donors add PHOTOS_DIR --bank NAME`"
        )
    if io_values.get("ray_address") is not None:
        raise click.UsageError("--method replace does not run on Ray (--ray) yet; run it without --ray")
    source = click.get_current_context().get_parameter_source("min_face")
    explicit = source is not None and source.name != "DEFAULT"
    min_face = io_values["min_face"] if explicit else REPLACE_MIN_FACE_PX
    io_values["min_face"] = min(min_face, MIN_FACE_PX)  # smaller faces are found, then blurred
    options = _options(**{k: v for k, v in io_values.items() if k != "ray_address"})
    try:
        bank = load_bank(donor_bank)
        model_names = _model_names(None)
    except DonorBankError as error:
        _fail(error, EXIT_USAGE)
    except FacecloakError as error:
        _fail(error, error.exit_code)
    spec = ProtectorSpec(
        "replace",
        {
            "donors": str(bank.folder),
            "donors_per_face": donors_per_face,
            "seed": seed,
            "min_face": min_face,
            "models": model_names,
        },
    )

    def build() -> ReplaceFaces:
        models = [_create_model(name, options.device) for name in model_names]
        detector = FaceDetector(min_score=options.min_score, min_size=options.min_size, device=options.device)
        replacer = FaceReplacer(
            bank, models, donors_per_face=donors_per_face, seed=seed, min_face=min_face, detector=detector
        )
        return ReplaceFaces(replacer)

    report = _run_protection(
        "anonymize",
        "replace",
        paths,
        options,
        build,
        io_values,
        "loading the face models",
        spec=spec,
        ray_address=None,
    )
    report.options.update(
        method="replace",
        donors=str(bank.folder),
        donors_per_face=donors_per_face,
        seed=seed,
        min_face=min_face,
        models=model_names,
    )
    _finish(report, io_values["as_json"], io_values["as_jsonl"], io_values["quiet"])


def _model_names(names: str | None) -> list[str]:
    """The named models (comma-separated), checked to exist, or every model available here."""
    from facecloak.models import available_embedders, get_card

    wanted = [name.strip() for name in names.split(",") if name.strip()] if names else available_embedders()
    if not wanted:
        raise FacecloakError("no face model is available here; see `facecloak models`")
    for name in wanted:
        get_card(name)  # an unknown name fails now, before any photo is read
    return wanted


def _create_model(name: str, device: str | None):
    from facecloak.models import create_embedder

    return create_embedder(name, device=device)


def _load_models(names: str | None, device: str | None) -> list:
    """Build the named models (comma-separated), or every model available here."""
    return [_create_model(name, device) for name in _model_names(names)]


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--mode",
    type=click.Choice(["untargeted", "targeted"]),
    default="untargeted",
    show_default=True,
    help="untargeted: push each face away from its own identity (measured stronger, see README); "
    "targeted: pull it toward a synthetic identity derived from --identity-key.",
)
@click.option(
    "--level",
    type=click.Choice(["low", "mid", "high"]),
    default="mid",
    show_default=True,
    help="How visible: low is not seen at 200% zoom, mid not at 100%, high is faint at 100% "
    "(per-pixel allowance 1.0 / 1.6 / 2.0 x the just-noticeable difference; "
    "DSSIM cap 0.004 / 0.008 / 0.012). "
    "Higher protects more, on unseen models too.",
)
@click.option(
    "--models",
    default=None,
    help="Comma-separated face models to attack together (see `facecloak models`). Default: all available.",
)
@click.option(
    "--identity-key",
    default=None,
    help="targeted: a per-person secret; photos cloaked with the same key get the same target.",
)
@click.option(
    "--steps", type=click.IntRange(0, 10_000), default=None, help="Most steps per face [level's default]."
)
@click.option(
    "--max-dssim", type=click.FloatRange(0.0001, 0.5), default=None, help="DSSIM cap [level's default]."
)
@click.option(
    "--diversity",
    type=click.FloatRange(0, 1),
    default=None,
    help="Transfer: share of steps that also zoom and shift each face's crop at random (input diversity) "
    "[measured default, see README].",
)
@click.option(
    "--smoothing",
    type=click.FloatRange(0, 8),
    default=None,
    help="Transfer: Gaussian sigma (chip pixels) smoothing each step's gradient (translation invariance) "
    "[measured default].",
)
@click.option(
    "--update",
    type=click.Choice(["adam", "momentum"]),
    default=None,
    help="Step rule: adam, or momentum (MI-FGSM sign steps) [adam].",
)
@click.option(
    "--spend-budget/--stop-at-aim",
    default=None,
    help="Use every step (more distance on the attacked models, which is what transfers to others) "
    "or stop once the attacked models are past the aim (faster) [measured default].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=8,
    show_default=True,
    help="Photos cloaked together in one optimisation (larger uses the GPU better).",
)
@_io_options
@_ray_option
def cloak(
    paths,
    mode,
    level,
    models,
    identity_key,
    steps,
    max_dssim,
    diversity,
    smoothing,
    update,
    spend_budget,
    seed,
    batch_size,
    **io_values,
) -> None:
    """Cloak every face: a change kept under what people notice, that face models mis-recognise.

    Each face is optimised at the photo's native resolution against every chosen face model at
    once, through simulated JPEG, rescaling, blur and landmark noise, within the level's per-pixel
    (JND) and DSSIM budget: `mid` is not seen at 100% zoom, `high` is faint. Models the cloak did
    not attack are fooled only part of the time (README: leave-one-out results); attack every
    model you can add. Then each photo is re-encoded as JPEG 75 and detected from scratch:
    a face whose distance from its own identity does not pass every model's match threshold
    is reported as NOT protected (exit code 1).

    \b
    facecloak cloak photo.jpg
    facecloak cloak photos/ -o cloaked/ --level high
    facecloak cloak photos/ -o out/ --mode targeted --identity-key "my secret" --json
    """
    from facecloak.cloak import create_cloak
    from facecloak.pipeline import ProtectorSpec
    from facecloak.protection import CloakFaces

    options = _options(**{k: v for k, v in io_values.items() if k != "ray_address"})
    options = Options(**{**options.__dict__, "chunk": batch_size})
    ray_address = io_values.get("ray_address")
    transfer = dict(diversity=diversity, smoothing=smoothing, update=update, spend_budget=spend_budget)
    try:
        if ray_address is None:
            names = _model_names(models)
        else:  # on Ray each actor loads the models; here only their names are needed
            names = [name for name in (models or "").replace(" ", "").split(",") if name]
        spec = ProtectorSpec.cloak(
            mode,
            level,
            names or None,
            identity_key=identity_key,
            steps=steps,
            max_dssim=max_dssim,
            seed=seed,
            **transfer,
        )
    except FacecloakError as error:
        _fail(error)
    names = spec.params["models"]

    def build() -> CloakFaces:
        embedders = [_create_model(name, options.device) for name in names]
        return CloakFaces(
            create_cloak(
                mode,
                embedders,
                level,
                steps=steps,
                max_dssim=max_dssim,
                seed=seed,
                identity_key=identity_key,
                **transfer,
            )
        )

    report = _run_protection(
        "cloak",
        CloakFaces.tag,
        paths,
        options,
        build,
        io_values,
        loading=f"loading {', '.join(names)}",
        spec=spec,
        ray_address=ray_address,
    )
    report.options.update(mode=mode, level=level, models=names, seed=seed)
    _finish(report, io_values["as_json"], io_values["as_jsonl"], io_values["quiet"])


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_name", default="dlib-resnet", show_default=True, help="Face model.")
@_detect_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (with the full vectors).")
@_JSONL_OPTION
def embed(paths, model_name, threshold, min_face, device, max_pixels, as_json, as_jsonl) -> None:
    """Print the embedding of every face found.

    \b
    facecloak embed photo.jpg --json
    facecloak embed photos/ --jsonl > embeddings.jsonl
    """
    from facecloak.commands import embed_files

    options = _options(None, threshold=threshold, min_face=min_face, device=device, max_pixels=max_pixels)
    try:
        model = _load_models(model_name, device)[0]
        results = embed_files(paths, model, options)
    except FacecloakError as error:
        _fail(error)

    def describe(face: dict) -> str:
        head = " ".join(f"{v:+.3f}" for v in face["embedding"][:6])
        return f"[{head} ...] ({len(face['embedding'])}-d, {model_name})"

    _print_per_file(results, as_json, describe, as_jsonl=as_jsonl, paths=paths)


@main.command(context_settings=CONTEXT)
@click.argument("first", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_name", default="dlib-resnet", show_default=True, help="Face model.")
@click.option(
    "--match-threshold",
    type=click.FloatRange(0, None),
    default=None,
    help="Same person when the distance is below this. Default: the model's own threshold "
    "(see `facecloak models`: dlib-resnet 0.6, euclidean). Lower is stricter.",
)
@_verify_detect_options
@click.option(
    "--threshold",
    "deprecated_threshold",
    type=click.FloatRange(0, 1),
    default=None,
    hidden=True,
    help="Deprecated alias of --detect-threshold.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def verify(first, second, model_name, match_threshold, deprecated_threshold, as_json, **detection) -> None:
    """Say whether two photos show the same person (largest face of each).

    Two thresholds: --match-threshold decides "same person" from the distance between the two
    faces (default: the model's own); --detect-threshold is the face detector's confidence.
    Exit code 0 when they match, 1 when they do not, 3 when a photo has no face or fails.

    \b
    facecloak verify me.jpg me_cloaked.jpg
    facecloak verify me.jpg other.jpg --match-threshold 0.5 --json
    """
    from facecloak.commands import verify_files

    if deprecated_threshold is not None:
        click.echo(
            "warning: verify --threshold is deprecated: it sets the face detection confidence; "
            "use --detect-threshold for that, or --match-threshold for the same-person threshold",
            err=True,
        )
        detection["threshold"] = deprecated_threshold
    options = _options(None, **detection)
    try:
        model = _load_models(model_name, options.device)[0]
        result = verify_files(first, second, model, options, match_threshold=match_threshold)
    except FacecloakError as error:
        _fail(error)
    if as_json:
        click.echo(json.dumps(result))
    else:
        same = result["same_person"]
        verdict = "SAME person" if same else "DIFFERENT people"
        relation = "<" if same else ">="
        click.echo(
            f"{verdict}: distance {result['distance']:.4f} ({result['metric']}) {relation} "
            f"match threshold {result['match_threshold']:g} ({model_name})"
        )
    sys.exit(EXIT_OK if result["same_person"] else EXIT_UNPROTECTED)


@main.group(context_settings=CONTEXT, invoke_without_command=True)
@click.pass_context
def models(context) -> None:
    """List the face models, whether each is available here (and why not), and how to add one.

    Model files found under FACECLOAK_MODELS (default ../shared/models) that are not added yet
    are listed with the command that adds them.

    \b
    facecloak models
    facecloak models add mobileface ../shared/models/mobileface-v2/MobileFace_Identification_V2-symbol.json
    facecloak models add arcface ./arcface-r50.onnx --template arcface --metric cosine
    facecloak models remove arcface
    """
    if context.invoked_subcommand is not None:
        return
    from facecloak.models import embedder_status, get_card, list_embedders
    from facecloak.models.user_models import BROKEN_CARDS, find_model_files, models_search_roots

    for name in list_embedders():
        card = get_card(name)
        ok, where = embedder_status(name)
        state = "available" if ok else "NOT available"
        click.echo(
            f"{name:<22} {state:<14} {card.input_size}px {card.embedding_dim}-d {card.distance} "
            f"< {card.match_threshold}  {card.description}"
        )
        click.echo(f"{'':<22} {'weights:' if ok else 'why:'} {where}")
    for path, reason in BROKEN_CARDS:
        click.echo(f"error: {path}: {reason}", err=True)
    click.echo(
        "\nTo add a face model (an ONNX file, or an MXNet NAME-symbol.json with its NAME-0000.params):\n"
        "  facecloak models add NAME FILE [--input-size PX] [--template arcface|dlib|points.json]\n"
        "                       [--mean R G B] [--std R G B] [--bgr] [--metric cosine|euclidean] "
        "[--threshold T]\n"
        "It is checked (loaded and run once) and then usable by name: cloak --models NAME, verify "
        "--model NAME,\nevaluate --attackers NAME. See `facecloak models add --help`."
    )
    roots = models_search_roots()
    found = find_model_files(roots)
    where = " or ".join(str(root) for root in roots)
    if not found:
        click.echo(f"\nNo model files found under {where} (set FACECLOAK_MODELS to look elsewhere).")
        return
    click.echo(f"\nModel files found under {where}, not added yet:")
    for name, file, readme in found:
        click.echo(f"  facecloak models add {name} {file}")
        note = (
            f"read {readme} for its input size, mean/std, channel order and threshold first; "
            if readme
            else ""
        )
        click.echo(f"      {note}calibrate --threshold for real use")


@models.command("add", context_settings=CONTEXT)
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--input-size", type=click.IntRange(16, 1024), default=112, show_default=True, help="Chip side in pixels."
)
@click.option(
    "--template",
    default="arcface",
    show_default=True,
    help="Where the 5 landmarks go in the chip: arcface, dlib, or a JSON file of 5 [x, y] chip pixels.",
)
@click.option(
    "--mean",
    nargs=3,
    type=float,
    default=(0.0, 0.0, 0.0),
    show_default=True,
    help="Subtracted from 0..255 pixel values, in the model's own channel order (B, G, R with --bgr).",
)
@click.option(
    "--std", nargs=3, type=float, default=(1.0, 1.0, 1.0), show_default=True, help="Divides after the mean."
)
@click.option("--bgr", is_flag=True, help="The model takes BGR channel order.")
@click.option(
    "--crop",
    type=click.Choice(["landmarks", "box"]),
    default="landmarks",
    show_default=True,
    help="landmarks: 5 points aligned onto --template; box: the detection box widened by --margin, resized.",
)
@click.option(
    "--margin",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Pixels added around a box crop.",
)
@click.option(
    "--layout",
    type=click.Choice(["nchw", "nhwc"]),
    default="nchw",
    show_default=True,
    help="Input layout the file expects (nhwc: channels last, as TensorFlow exports).",
)
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Same person below this distance [cosine 0.6, euclidean 1.0]; set it with `models calibrate`.",
)
def models_add(  # noqa: D301 - click help keeps the backslash line breaks
    name, file, input_size, template, mean, std, bgr, crop, margin, layout, metric, threshold
) -> None:
    """Attach a face model from an ONNX file or an MXNet NAME-symbol.json (+ NAME-0000.params).

    The file is loaded and run once to check it; its card (a reference to the file, not a copy)
    goes to $XDG_CONFIG_HOME/facecloak/models. Nothing is downloaded.

    \b
    facecloak models add arcface-r100 model.onnx --mean 127.5 127.5 127.5 --std 128 128 128
    facecloak models add mobileface MobileFace_Identification_V2-symbol.json --threshold 0.65
    facecloak models add hse-mobilenet hse_mobilenet_vggface2.onnx --crop box --margin 10 \\
        --input-size 224 --layout nhwc --bgr --mean 103.939 116.779 123.68
    facecloak models calibrate hse-mobilenet ../shared/data/lfw/images
    """
    from facecloak.models.user_models import add_user_model

    try:
        card = add_user_model(
            name,
            file,
            input_size=input_size,
            template=template,
            mean=mean,
            std=std,
            bgr=bgr,
            metric=metric,
            threshold=threshold,
            crop=crop,
            margin=margin,
            layout=layout,
        )
    except FacecloakError as error:
        _fail(error, error.exit_code)
    click.echo(
        f"added {card.name}: {card.input_size}px -> {card.embedding_dim}-d, "
        f"{card.distance} < {card.match_threshold}"
    )
    if threshold is None:
        click.echo(
            f"note: the threshold {card.match_threshold} is a default guess; "
            "set it from labelled photos with\n"
            f"  facecloak models calibrate {card.name} PEOPLE_FOLDER",
            err=True,
        )


@models.command("calibrate", context_settings=CONTEXT)
@click.argument("name")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--far",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=1e-3,
    show_default=True,
    help="False-accept rate the threshold admits among different-person pairs.",
)
@click.option(
    "--max-photos",
    type=click.IntRange(10),
    default=1200,
    show_default=True,
    help="Embed at most this many photos (people with 2+ photos first); more is slower and steadier.",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [CUDA if present]")
def models_calibrate(name, data, far, max_photos, device) -> None:
    """Set an added model's match threshold from a folder of labelled photos (one sub-folder per person).

    Every same-person and different-person pair of the photos' centre faces is scored; the
    threshold admits --far of the different-person pairs. The card is updated in place.

    \b
    facecloak models calibrate hse-mobilenet ../shared/data/lfw/images
    facecloak models calibrate mobileface ./people --far 1e-4 --max-photos 3000
    """
    from dataclasses import replace

    from facecloak.calibrate import calibrate_threshold
    from facecloak.models import create_embedder, get_card
    from facecloak.models.user_models import is_user_model, save_user_card

    try:
        card = get_card(name)
        if not is_user_model(name):
            raise InvalidInputError(
                f"{name} is a built-in model with a published threshold; calibrate added models"
            )
        model = create_embedder(name, device=device)
        result = calibrate_threshold(model, data, far=far, max_photos=max_photos)
    except FacecloakError as error:
        _fail(error, error.exit_code)
    save_user_card(replace(card, match_threshold=round(result.threshold, 4)))
    click.echo(f"{result.summary()}\nsaved: {name} now matches below {round(result.threshold, 4)}")


@models.command("remove", context_settings=CONTEXT)
@click.argument("name")
def models_remove(name) -> None:
    """Forget an added model (the model file itself is left alone)."""
    from facecloak.models.user_models import remove_user_model

    try:
        remove_user_model(name)
    except FacecloakError as error:
        _fail(error)
    click.echo(f"removed {name}")


@main.group(context_settings=CONTEXT)
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
@click.option("--device", default=None, help="torch device. Default: CUDA if present.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def donors_add(paths, bank, licence, all_faces, device, as_json) -> None:
    """Detect, align and store the donor faces of photos (files or folders) in a bank.

    Each photo gives its largest clear, near-frontal face of at least 60 px; a photo without one
    is listed and skipped. Every available face model embeds each donor, so new faces can be
    checked against it. Exit code 1 when a photo was skipped, 3 when a file failed.
    """
    from facecloak.donors import add_donors

    _require_paths(paths)
    try:
        models = _load_models(None, device)
        report = add_donors(paths, models, bank=bank, licence=licence, all_faces=all_faces)
    except FacecloakError as error:
        _fail(error, EXIT_USAGE)
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
    from facecloak.donors import data_dir, list_banks, load_bank

    if bank is None:
        banks = list_banks()
        if as_json:
            click.echo(json.dumps(banks, indent=2))
            return
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
        return
    try:
        data = load_bank(bank, allow_empty=True)
    except FacecloakError as error:
        _fail(error, EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({**data.summary(), "donor_records": data.donors}, indent=2))
        return
    click.echo(f"{data.name}: {len(data)} donor(s), models {', '.join(sorted(data.models))} ({data.folder})")
    for donor in data.donors:
        click.echo(f"  {donor['id']}  licence: {donor.get('licence') or '-'}  {donor['source']}")


@donors.command("remove", context_settings=CONTEXT)
@click.argument("bank")
@click.option(
    "--donor", "ids", multiple=True, help="Remove only this donor (repeatable). Default: the whole bank."
)
def donors_remove(bank, ids) -> None:
    """Remove a whole bank, or some of its donors."""
    from facecloak.donors import remove_donors

    try:
        count = remove_donors(bank, ids)
    except FacecloakError as error:
        _fail(error, EXIT_USAGE)
    click.echo(f"removed {count} donor(s)" + ("" if ids else f" and bank {bank}"))


@donors.command("refresh", context_settings=CONTEXT)
@click.argument("bank")
@click.option("--device", default=None, help="torch device. Default: CUDA if present.")
def donors_refresh(bank, device) -> None:
    """Re-embed a bank's donors with every face model available now (from its stored chips)."""
    from facecloak.donors import refresh_bank

    try:
        data = refresh_bank(bank, _load_models(None, device))
    except FacecloakError as error:
        _fail(error, EXIT_USAGE)
    click.echo(f"{data.name}: {len(data)} donor(s) re-embedded with {', '.join(sorted(data.models))}")


@main.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["cloak", "blur", "pixelate", "mask", "replace", "none"]),
    default="cloak",
    show_default=True,
    help="Protection to measure ('none' is the baseline; 'replace' needs --donors).",
)
@click.option("--donors", "donor_bank", default=None, help="replace: the donor bank (name or folder).")
@click.option(
    "--donors-per-face",
    type=click.IntRange(2, 8),
    default=3,
    show_default=True,
    help="replace: donors per face.",
)
@click.option(
    "--level",
    type=click.Choice(["low", "mid", "high", "all"]),
    default="mid",
    show_default=True,
    help="cloak: budget level; 'all' runs the three and plots quality vs protection.",
)
@click.option(
    "--mode", type=click.Choice(["untargeted", "targeted"]), default="untargeted", show_default=True
)
@click.option(
    "--models", default=None, help="cloak: models to attack (comma-separated). Default: all available."
)
@click.option(
    "--protected-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Take already protected photos from DIR/<person>/<photo>[_tag].<ext> instead of protecting.",
)
@click.option(
    "--people", type=click.IntRange(1, None), default=20, show_default=True, help="People to protect."
)
@click.option(
    "--control",
    type=click.IntRange(0, None),
    default=20,
    show_default=True,
    help="Unprotected control people.",
)
@click.option(
    "--min-photos", type=click.IntRange(2, None), default=10, show_default=True, help="Photos a person needs."
)
@click.option(
    "--probes", type=click.IntRange(1, None), default=2, show_default=True, help="Clean probes per person."
)
@click.option(
    "--attackers",
    default=None,
    help="Comma-separated scrapers: registry models and 'dlib-cpp' (dlib's own C++ pipeline). "
    "Default: every available model, plus dlib-cpp when dlib-bin is installed.",
)
@click.option(
    "--uploads",
    default="none,jpeg95,jpeg75,jpeg50,downscale0.5,blur",
    show_default=True,
    help="Upload transforms, one table row each.",
)
@click.option(
    "--max-distractors",
    type=click.IntRange(0, None),
    default=None,
    help="Use at most this many photos of other people as distractors [all].",
)
@click.option(
    "--adaptive",
    type=click.Choice(["linear", "finetune", "both"]),
    is_flag=False,
    flag_value="linear",
    default=None,
    help="Add an adaptive attacker that learns to undo the protection from people it protected itself: "
    "linear (a learnt map of embeddings; --adaptive alone) or finetune (FaceCure: the model's last block "
    "fine-tuned; re-embeds the gallery, so pair it with --max-distractors).",
)
@click.option(
    "--adaptive-people",
    type=click.IntRange(1, None),
    default=20,
    show_default=True,
    help="People outside the test whose protected photos the adaptive attacker learns from.",
)
@click.option("--leave-one-out", is_flag=True, help="cloak: also cloak without each model and measure on it.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the draw of people and of the cloak."
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".cache" / "facecloak" / "embeddings",
    show_default=True,
    help="Where clean embeddings are cached between runs.",
)
@click.option("--device", default=None, help="torch device. Default: CUDA if present.")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Report folder.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def evaluate(
    data,
    method,
    donor_bank,
    donors_per_face,
    level,
    mode,
    models,
    protected_dir,
    people,
    control,
    min_photos,
    probes,
    attackers,
    uploads,
    max_distractors,
    adaptive,
    adaptive_people,
    leave_one_out,
    seed,
    cache,
    device,
    out_dir,
    quiet,
) -> None:
    """Measure how much matching accuracy a scraper loses against a protection.

    Protected people's photos are protected, pass through each upload transform (JPEG, downscale,
    blur) into a scraper's gallery with everyone else's clean photos, and each attacker identifies
    every held-out clean probe by nearest neighbour. Writes report.json and report.html to -o.

    \b
    facecloak evaluate ../shared/data/lfw/images --method none -o reports/none
    facecloak evaluate ../shared/data/lfw/images --method cloak --level all --adaptive -o reports/cloak
    facecloak evaluate photos_by_person/ --protected-dir cloaked/ --people 5 -o reports/mine
    facecloak evaluate ../shared/data/lfw/images --method replace --donors lfwbank -o reports/replace
    """
    from facecloak.evaluate import EvaluationRequest, run_evaluation
    from facecloak.report import summary_table, write_html, write_json

    request = EvaluationRequest(
        data=data,
        method=method,
        level=level,
        mode=mode,
        models=models,
        protected_dir=protected_dir,
        people=people,
        control=control,
        min_photos=min_photos,
        probes=probes,
        attackers=attackers,
        uploads=tuple(u.strip() for u in uploads.split(",") if u.strip()),
        adaptive=adaptive,
        adaptive_people=adaptive_people,
        max_distractors=max_distractors,
        leave_one_out=leave_one_out,
        seed=seed,
        cache=cache,
        device=device,
        donors=donor_bank,
        donors_per_face=donors_per_face,
    )
    if method == "replace" and not donor_bank:
        raise click.UsageError("--method replace needs --donors BANK (see `facecloak donors add`)")
    try:
        with _stage_progress(quiet) as progress:
            result = run_evaluation(request, on_progress=progress)
    except FacecloakError as error:
        _fail(error, error.exit_code)
    write_json(result, out_dir / "report.json")
    write_html(result, out_dir / "report.html")
    click.echo(summary_table(result))
    click.echo(f"report: {out_dir / 'report.html'} and {out_dir / 'report.json'}")


@main.command(context_settings=CONTEXT)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind. 0.0.0.0 exposes the service."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0. Default: CUDA if present.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Model workers, each with its own copy of the models (one per GPU; on a CPU keep 1).",
)
@click.option(
    "--models", default=None, help="Comma-separated models the cloak attacks. Default: all available."
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1, 4096),
    default=50,
    show_default=True,
    help="Upload cap (413 above).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1, None),
    default=50_000_000,
    show_default=True,
    help="Pixel cap, read from the image header before decoding (413 above).",
)
@click.option(
    "--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True, help="Photos per model call."
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(0, 1000),
    default=10.0,
    show_default=True,
    help="How long a worker waits for more photos to batch after the first.",
)
@click.option(
    "--queue-size",
    type=click.IntRange(1, 100_000),
    default=32,
    show_default=True,
    help="Photos waiting at most; more get 503 with Retry-After.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1, None),
    default=300.0,
    show_default=True,
    help="Per-request limit, s (504).",
)
@click.option(
    "--api-keys",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File of accepted API keys, one per line. Default: no key needed.",
)
@click.option(
    "--cors-origin", multiple=True, help="Allow this origin by CORS (repeatable). Default: CORS off."
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def serve(
    host,
    port,
    device,
    workers,
    models,
    max_upload_mb,
    max_pixels,
    max_batch,
    batch_wait_ms,
    queue_size,
    timeout,
    api_keys,
    cors_origin,
    log_level,
) -> None:
    """Run the HTTP service and its web page (FastAPI on uvicorn).

    Open http://127.0.0.1:8000/ for the page, /docs for the API. The models are loaded once at
    start-up; concurrent uploads are batched onto them. Needs pip install 'facecloak[serve]'.

    \b
    facecloak serve
    curl -F image=@photo.jpg -F method=blur http://127.0.0.1:8000/v1/anonymize -o out.jpg
    curl -F image=@photo.jpg -F level=high -F response=json http://127.0.0.1:8000/v1/cloak
    """
    try:
        import uvicorn

        from facecloak.service import ServiceSettings, create_app
    except ImportError as error:
        raise click.UsageError(f"the service needs pip install 'facecloak[serve]' ({error})") from None
    import logging

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServiceSettings(
        device=device,
        workers=workers,
        models=tuple(name.strip() for name in models.split(",") if name.strip()) if models else None,
        max_upload_bytes=max_upload_mb * 1024 * 1024,
        max_pixels=max_pixels,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        queue_size=queue_size,
        request_timeout_s=timeout,
        api_keys_file=api_keys,
        cors_origins=tuple(cors_origin),
    )
    try:
        settings.api_keys()
    except (OSError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_keys:
        click.echo(
            f"warning: serving on {host} without --api-keys: anyone who reaches it can use it", err=True
        )
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)


@contextmanager
def _stage_progress(quiet: bool):
    """A progress bar per evaluation stage (plain lines when stderr is not a terminal).

    Yields a callback ``(stage, done, total)``.
    """
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        import time

        from facecloak.progress import PLAIN_EVERY_S

        said: dict[str, float] = {}

        def say(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if stage not in said or done >= total or now - said[stage] >= PLAIN_EVERY_S:
                said[stage] = now
                click.echo(f"{stage}: {done}/{total}", err=True)

        yield say
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, int] = {}
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


__all__ = ["main", "EXIT_OK", "EXIT_UNPROTECTED", "EXIT_USAGE", "EXIT_FAILED"]


if __name__ == "__main__":  # python -m facecloak.cli (python -m facecloak works too)
    main()
