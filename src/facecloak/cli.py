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
from facecloak.errors import FacecloakError

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
            "--jpeg-quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG/WebP quality."
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
        click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0. Default: CUDA if present."),
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
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True
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
                box = ", ".join(f"{v:.0f}" for v in face["box"])
                click.echo(f"  box ({box})  score {face['score']:.3f}")
    failed = any("error" in r for r in results)
    no_face = any(not r.get("faces") for r in results if "error" not in r)
    sys.exit(EXIT_FAILED if failed else EXIT_UNPROTECTED if no_face else EXIT_OK)


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["blur", "pixelate", "mask"]),
    default="blur",
    show_default=True,
    help="blur: Gaussian blur scaled to the face; pixelate: mosaic; mask: solid fill.",
)
@click.option(
    "--shape", type=click.Choice(["ellipse", "box"]), default="ellipse", show_default=True, help="Region shape."
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
@_io_options
def anonymize(paths, method, shape, mask_scale, strength, blocks, feather, **io_values) -> None:
    """Blur, pixelate or mask every face, at the photo's full resolution.

    Pixels outside the face regions are left exactly as they were. Outputs are written
    atomically as <name>_anonymized.<ext>; inputs are never overwritten; EXIF (GPS above all)
    is dropped unless --keep-metadata.

    \b
    facecloak anonymize photo.jpg
    facecloak anonymize photos/ -o anonymized/ --method pixelate --blocks 6
    facecloak anonymize photos/ -o out/ --method mask --shape box --json
    """
    from facecloak.anonymize import Anonymizer
    from facecloak.batch import AnonymizeFaces, run_batch

    _require_paths(paths)
    as_json, quiet = io_values.pop("as_json"), io_values.pop("quiet")
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


__all__ = ["main", "EXIT_OK", "EXIT_UNPROTECTED", "EXIT_USAGE", "EXIT_FAILED"]
