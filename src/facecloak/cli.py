"""The ``facecloak`` command: parse options, call the Python API, print the report, exit.

Exit codes: 0 every face found was protected; 1 finished, but an image had no face or a face
fell short of its target; 2 usage error; 3 a file failed (the others were still processed).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import click

from facecloak import __version__
from facecloak.batch import EXIT_FAILED, EXIT_OK, EXIT_UNPROTECTED, EXIT_USAGE, Options
from facecloak.errors import FacecloakError, InvalidInputError

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
            default=95,
            show_default=True,
            help="JPEG/WebP quality.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-file lines."),
    ]
    function = _detect_options(function)
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _detect_options(function: Callable) -> Callable:
    """Options of face detection and of reading images."""
    decorators = [
        click.option(
            "--threshold",
            type=click.FloatRange(0, 1),
            default=0.9,
            show_default=True,
            help="Detection confidence. Lower finds more faces (profiles, blur) and more false ones.",
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
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="facecloak")
def main() -> None:
    """Protect the faces in your photos from face-search scrapers.

    \b
    facecloak cloak photo.jpg                 near-invisible cloak -> photo_cloaked.jpg
    facecloak anonymize photos/ -o out/       blur every face in a folder
    facecloak detect photo.jpg --json         list the faces found
    facecloak evaluate DATA --method cloak    measure what a protection buys

    Exit codes: 0 all faces protected; 1 an image had no face or a face was not protected;
    2 usage error; 3 some file failed.
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
        jpeg_quality=values.get("jpeg_quality", 95),
    )


@contextmanager
def _progress(quiet: bool, label: str):
    """A rich progress bar on stderr; yields a callback ``(done, total)``."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _finish(report, as_json: bool, quiet: bool) -> None:
    """Print per-file lines, errors and the summary, then exit with the report's code."""
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for outcome in report.outcomes:
            if outcome.status == "failed":
                click.echo(outcome.message, err=True)
            elif not quiet or outcome.status != "protected":
                click.echo(outcome.message)
        click.echo(str(report), err=report.exit_code != EXIT_OK)
    sys.exit(report.exit_code)


def _fail(error: FacecloakError, code: int = EXIT_FAILED) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(code)


def _print_per_file(results: list[dict], as_json: bool, describe: Callable[[dict], str]) -> None:
    """Print per-file face listings (or JSON), then exit: 3 a file failed, 1 an image had no face."""
    if as_json:
        click.echo(json.dumps(results, indent=2))
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


def _require_paths(paths: tuple[Path, ...]) -> None:
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise click.UsageError(f"no such file or folder: {', '.join(missing)}")


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_detect_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def detect(paths, threshold, min_face, device, max_pixels, as_json) -> None:
    """List the faces found in photos (boxes, confidence, five landmarks).

    \b
    facecloak detect photo.jpg
    facecloak detect photos/ --json > faces.json
    """
    from facecloak.batch import detect_files

    _require_paths(paths)
    options = _options(None, threshold=threshold, min_face=min_face, device=device, max_pixels=max_pixels)
    try:
        results = detect_files(paths, options)
    except FacecloakError as error:
        _fail(error)

    def describe(face: dict) -> str:
        box = ", ".join(f"{v:.0f}" for v in face["box"])
        return f"box ({box})  score {face['score']:.3f}"

    _print_per_file(results, as_json, describe)


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

    Pixels outside the face regions are left exactly as they were. Outputs are written
    atomically as <name>_anonymized.<ext>; inputs are never overwritten; EXIF (GPS above all)
    is dropped unless --keep-metadata.

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
    from facecloak.batch import AnonymizeFaces, run_batch

    _require_paths(paths)
    as_json, quiet = io_values.pop("as_json"), io_values.pop("quiet")
    if method == "replace":
        _replace_command(paths, donor_bank, donors_per_face, seed, as_json, quiet, io_values)
        return
    if donor_bank is not None:
        raise click.UsageError("--donors is for --method replace")
    options = _options(io_values.pop("out_dir"), **io_values)
    params = {"scale": mask_scale, "shape": shape, "feather": feather}
    if method == "blur":
        params["strength"] = strength
    elif method == "pixelate":
        params["blocks"] = blocks
    elif strength is not None or blocks is not None:
        raise click.UsageError("--strength is for blur and --blocks for pixelate")
    try:
        protector = AnonymizeFaces(Anonymizer(method, **params))
        with _progress(quiet or as_json, "anonymizing") as progress:
            report = run_batch(paths, protector, options, command="anonymize", on_progress=progress)
    except FacecloakError as error:
        _fail(error)
    _finish(report, as_json, quiet)


def _replace_command(paths, donor_bank, donors_per_face, seed, as_json, quiet, io_values) -> None:
    """``anonymize --method replace``: load the bank and every available model, run the batch."""
    from facecloak.batch import ReplaceFaces, run_batch
    from facecloak.detect import MIN_FACE_PX, FaceDetector
    from facecloak.donors import load_bank
    from facecloak.errors import DonorBankError
    from facecloak.replace import REPLACE_MIN_FACE_PX, FaceReplacer

    if donor_bank is None:
        raise click.UsageError(
            "--method replace needs --donors BANK; "
            "create a bank with `facecloak donors add PHOTOS_DIR --bank NAME`"
        )
    source = click.get_current_context().get_parameter_source("min_face")
    explicit = source is not None and source.name != "DEFAULT"
    min_face = io_values["min_face"] if explicit else REPLACE_MIN_FACE_PX
    io_values["min_face"] = min(min_face, MIN_FACE_PX)  # smaller faces are found, then blurred
    options = _options(io_values.pop("out_dir"), **io_values)
    try:
        bank = load_bank(donor_bank)
        models = _load_models(None, options.device)
        detector = FaceDetector(min_score=options.min_score, min_size=options.min_size, device=options.device)
        replacer = FaceReplacer(
            bank, models, donors_per_face=donors_per_face, seed=seed, min_face=min_face, detector=detector
        )
    except DonorBankError as error:
        _fail(error, EXIT_USAGE)
    except FacecloakError as error:
        _fail(error, EXIT_USAGE if isinstance(error, InvalidInputError) else EXIT_FAILED)
    try:
        with _progress(quiet or as_json, "replacing") as progress:
            report = run_batch(
                paths,
                ReplaceFaces(replacer),
                options,
                detector=detector,
                command="anonymize",
                on_progress=progress,
            )
    except FacecloakError as error:
        _fail(error)
    report.options.update(
        method="replace",
        donors=str(bank.folder),
        donors_per_face=donors_per_face,
        seed=seed,
        min_face=min_face,
        models=[m.card.name for m in models],
    )
    _finish(report, as_json, quiet)


def _load_models(names: str | None, device: str | None) -> list:
    """Build the named models (comma-separated), or every model available here."""
    from facecloak.models import available_embedders, create_embedder

    wanted = [name.strip() for name in names.split(",") if name.strip()] if names else available_embedders()
    if not wanted:
        raise FacecloakError("no face model is available here; see `facecloak models`")
    return [create_embedder(name, device=device) for name in wanted]


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
    help="Budget: DSSIM cap 0.004 / 0.012 / 0.017 on the face. Higher protects more and shows more.",
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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=8,
    show_default=True,
    help="Photos cloaked together in one optimisation (larger uses the GPU better).",
)
@_io_options
def cloak(paths, mode, level, models, identity_key, steps, max_dssim, seed, batch_size, **io_values) -> None:
    """Cloak every face: a near-invisible change that face-search scrapers mis-recognise.

    Each face is optimised at the photo's native resolution against every chosen face model at
    once, through simulated JPEG, rescaling, blur and landmark noise, within the level's DSSIM
    and L-infinity caps. Then each photo is re-encoded as JPEG 75 and detected from scratch:
    a face whose distance from its own identity does not pass every model's match threshold
    is reported as NOT protected (exit code 1).

    \b
    facecloak cloak photo.jpg
    facecloak cloak photos/ -o cloaked/ --level high
    facecloak cloak photos/ -o out/ --mode targeted --identity-key "my secret" --json
    """
    from facecloak.batch import CloakFaces, run_batch
    from facecloak.cloak import create_cloak

    _require_paths(paths)
    as_json, quiet = io_values.pop("as_json"), io_values.pop("quiet")
    options = _options(io_values.pop("out_dir"), **io_values)
    options = Options(**{**options.__dict__, "chunk": batch_size})
    try:
        embedders = _load_models(models, options.device)
        method = create_cloak(
            mode, embedders, level, steps=steps, max_dssim=max_dssim, seed=seed, identity_key=identity_key
        )
        with _progress(quiet or as_json, "cloaking") as progress:
            report = run_batch(paths, CloakFaces(method), options, command="cloak", on_progress=progress)
    except FacecloakError as error:
        _fail(error)
    report.options.update(mode=mode, level=level, models=[m.card.name for m in embedders], seed=seed)
    _finish(report, as_json, quiet)


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_name", default="dlib-resnet", show_default=True, help="Face model.")
@_detect_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the full vectors).")
def embed(paths, model_name, threshold, min_face, device, max_pixels, as_json) -> None:
    """Print the embedding of every face found.

    \b
    facecloak embed photo.jpg --json
    """
    from facecloak.batch import embed_files

    _require_paths(paths)
    options = _options(None, threshold=threshold, min_face=min_face, device=device, max_pixels=max_pixels)
    try:
        model = _load_models(model_name, device)[0]
        results = embed_files(paths, model, options)
    except FacecloakError as error:
        _fail(error)

    def describe(face: dict) -> str:
        head = " ".join(f"{v:+.3f}" for v in face["embedding"][:6])
        return f"[{head} ...] ({len(face['embedding'])}-d, {model_name})"

    _print_per_file(results, as_json, describe)


@main.command(context_settings=CONTEXT)
@click.argument("first", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_name", default="dlib-resnet", show_default=True, help="Face model.")
@_detect_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(first, second, model_name, threshold, min_face, device, max_pixels, as_json) -> None:
    """Say whether two photos show the same person (largest face of each).

    Exit code 0 when they match, 1 when they do not, 3 when a photo has no face or fails.

    \b
    facecloak verify me.jpg me_cloaked.jpg
    """
    from facecloak.batch import verify_files

    options = _options(None, threshold=threshold, min_face=min_face, device=device, max_pixels=max_pixels)
    try:
        model = _load_models(model_name, device)[0]
        result = verify_files(first, second, model, options)
    except FacecloakError as error:
        _fail(error)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        verdict = "SAME person" if result["same_person"] else "DIFFERENT people"
        click.echo(
            f"{verdict}: distance {result['distance']:.4f} ({result['metric']}), "
            f"threshold {result['threshold']} ({model_name})"
        )
    sys.exit(EXIT_OK if result["same_person"] else EXIT_UNPROTECTED)


@main.group(context_settings=CONTEXT, invoke_without_command=True)
@click.pass_context
def models(context) -> None:
    """List the face models, and whether each is available here (and why not).

    \b
    facecloak models
    facecloak models add arcface ./arcface-r50.onnx --template arcface --metric cosine
    facecloak models remove arcface
    """
    if context.invoked_subcommand is not None:
        return
    from facecloak.models import embedder_status, get_card, list_embedders

    for name in list_embedders():
        card = get_card(name)
        ok, where = embedder_status(name)
        state = "available" if ok else "NOT available"
        click.echo(
            f"{name:<22} {state:<14} {card.input_size}px {card.embedding_dim}-d {card.distance} "
            f"< {card.match_threshold}  {card.description}"
        )
        click.echo(f"{'':<22} {'weights:' if ok else 'why:'} {where}")
    from facecloak.models.plugins import BROKEN_CARDS

    for path, reason in BROKEN_CARDS:
        click.echo(f"error: {path}: {reason}", err=True)


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
    help="Subtracted from 0..255 RGB.",
)
@click.option(
    "--std", nargs=3, type=float, default=(1.0, 1.0, 1.0), show_default=True, help="Divides after the mean."
)
@click.option("--bgr", is_flag=True, help="The model takes BGR channel order.")
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Same person below this distance [cosine 0.6, euclidean 1.0]; calibrate it for real use.",
)
def models_add(name, file, input_size, template, mean, std, bgr, metric, threshold) -> None:
    """Attach a face model from an ONNX file or an MXNet NAME-symbol.json (+ NAME-0000.params).

    The file is loaded and run once to check it; its card (a reference to the file, not a copy)
    goes to $XDG_CONFIG_HOME/facecloak/models. Nothing is downloaded.

    \b
    facecloak models add arcface-r100 model.onnx --mean 127.5 127.5 127.5 --std 128 128 128
    facecloak models add mobileface MobileFace_Identification_V2-symbol.json --threshold 0.65
    """
    from facecloak.models.plugins import add_user_model

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
        )
    except FacecloakError as error:
        _fail(error, EXIT_USAGE if isinstance(error, InvalidInputError) else EXIT_FAILED)
    click.echo(
        f"added {card.name}: {card.input_size}px -> {card.embedding_dim}-d, "
        f"{card.distance} < {card.match_threshold}"
    )


@models.command("remove", context_settings=CONTEXT)
@click.argument("name")
def models_remove(name) -> None:
    """Forget an added model (the model file itself is left alone)."""
    from facecloak.models.plugins import remove_user_model

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
@click.option("--adaptive", is_flag=True, help="Add an adaptive attacker that learns to undo the protection.")
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
        _fail(error, EXIT_USAGE if "unknown" in str(error) else EXIT_FAILED)
    write_json(result, out_dir / "report.json")
    write_html(result, out_dir / "report.html")
    click.echo(summary_table(result))
    click.echo(f"report: {out_dir / 'report.html'} and {out_dir / 'report.json'}")


@contextmanager
def _stage_progress(quiet: bool):
    """A progress bar per evaluation stage; yields a callback ``(stage, done, total)``."""
    if quiet:
        yield None
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
