"""Option blocks several commands share, written once, and turning their values into `Options`.

Every default shown in ``--help`` comes from `facecloak.defaults` (or the library it describes),
so the CLI, batch `Options`, the service and the docs agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import click

from facecloak.batch_types import Options
from facecloak.defaults import (
    CLOAK_OUTPUT_FORMAT,
    DETECT_ROTATIONS,
    MIN_FACE_PX,
    MIN_FACE_SCORE,
    OUTPUT_FORMAT_ALIASES,
    REPLACE_FALLBACKS,
    ROTATION_MODES,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def usable_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--device``'s check, for every command that takes one: refused as the options are read.

    A device this machine lacks is refused before any photo or model is touched (`default_device`
    raises the one-line error). Deep in a batch, with its threads running, it ended in a C++
    abort; elsewhere in torch's traceback.
    """
    if value:
        from facecloak._device import default_device

        default_device(value)
    return value


OUTPUT_FORMAT_CHOICES = ["input", "jpeg", "png", "webp", "tiff", "bmp", "heif"]
"""``--format`` values: a format, or ``input`` for each input's own (GIF becomes PNG)."""


class FormatChoice(click.Choice):
    """`click.Choice` of `OUTPUT_FORMAT_CHOICES` that also takes a suffix's name (jpg, tif, heic)."""

    def __init__(self) -> None:
        super().__init__(OUTPUT_FORMAT_CHOICES, case_sensitive=False)

    def convert(self, value, param, ctx):
        """``value`` with an alias replaced by its format's name, then checked as a choice."""
        if isinstance(value, str):
            value = OUTPUT_FORMAT_ALIASES.get(value.lower().lstrip("."), value)
        chosen = super().convert(value, param, ctx)
        if chosen == "heif" and not _heif_writable():  # it wrote JPEG files without a word
            self.fail("heif needs pillow-heif: pip install 'facecloak[heic]'", param, ctx)
        return chosen


def _heif_writable() -> bool:
    """Whether pillow-heif loads here (imported only when HEIF is asked for)."""
    from facecloak.io.read import HEIF_AVAILABLE

    return HEIF_AVAILABLE


class FolderPath(click.Path):
    """click's Path, refusing an empty value: ``-o ""`` (an unset ``$OUT``) wrote into the current folder."""

    def convert(self, value, param, ctx):
        """The path, or a usage error naming the option for an empty one."""
        if isinstance(value, str) and not value.strip():
            self.fail("is empty (an unset variable?): name a folder, or leave the option out", param, ctx)
        return super().convert(value, param, ctx)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and the infinities.

    NaN passed every bound (it compares False): ``--max-dssim nan`` failed every photo,
    ``--laggard-weight nan`` was taken for 0, and ``verify --match-threshold nan`` said "DIFFERENT
    people" and wrote NaN into its JSON.
    """

    def convert(self, value, param, ctx):
        """The number, or a usage error naming the option."""
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def given_on_command_line(name: str) -> bool:
    """Whether the option of parameter ``name`` was given, not left at its default.

    How a command tells an option that another mode or method takes apart from its default, to
    refuse it instead of ignoring it without a word.
    """
    source = click.get_current_context().get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


JSON_OUTPUT = "facecloak.json_output"
"""`click.Context.meta` key (shared by every context of a run): the command promised JSON on stdout."""


def remember_json_output(context: click.Context, parameter: click.Parameter, value: bool) -> bool:
    """Note a --json/--jsonl run, so that a Ctrl-C the command group catches still prints its document.

    Its options are eager: read before ``--device``, whose refusal as the options are read must
    print the document too (``--device cuda:x --json`` printed nothing on stdout).
    """
    if value:
        context.meta[JSON_OUTPUT] = True
    return value


def io_options(function: Callable | None = None, *, cloak: bool = False) -> Callable:
    """Options every photo-writing command shares; ``cloak``: outputs default to `CLOAK_OUTPUT_FORMAT`."""
    if function is None:
        return lambda wrapped: io_options(wrapped, cloak=cloak)
    format_help = (
        f"Output format. Default: {CLOAK_OUTPUT_FORMAT} (a JPEG's rounding is charged to the cloak's "
        "visibility cap, so it would have to shrink; the upload site re-encodes it anyway); input: "
        "each input's own."
        if cloak
        else "Output format. Default: the input's own (GIF becomes PNG)."
    )
    decorators = [
        click.option(
            "-o",
            "--output",
            "out_dir",
            # a file in its way is the batch's "cannot create the output folder" (exit 3, and the
            # --json document), as for -o file/sub; click's own check gave usage text and exit 2
            type=FolderPath(path_type=Path),
            default=None,
            help="Output folder (the input tree is mirrored under it). Default: beside each input, "
            "as <name>_<tag>.<ext>. Inputs are never overwritten.",
        ),
        click.option(
            "--format",
            "format_name",
            type=FormatChoice(),
            default=CLOAK_OUTPUT_FORMAT if cloak else "input",
            help=format_help,
        ),
        click.option(
            "--keep-metadata",
            is_flag=True,
            help=(
                "Keep EXIF (camera, date...) minus GPS and any thumbnail or preview. "
                "Default: drop all EXIF; the colour profile is kept."
            ),
        ),
        click.option("--overwrite", is_flag=True, help="Replace earlier outputs (never an input)."),
        click.option(
            "--jpeg-quality",
            type=click.IntRange(1, 100),
            default=None,
            help="Re-encode JPEG/WebP/HEIF outputs whole at this quality. Default: a JPEG written from a "
            "JPEG keeps the input's own quantisation and re-encodes only the 8x8 blocks around the "
            "faces (every other block stays bit-exact); other outputs use 95.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            callback=remember_json_output,
            is_eager=True,
            help="Print the full report as one JSON document on stdout.",
        ),
        click.option(
            "--jsonl",
            "as_jsonl",
            is_flag=True,
            callback=remember_json_output,
            is_eager=True,
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
    function = detect_options(function)
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def detect_options(function: Callable, *, verify: bool = False) -> Callable:
    """Options of face detection and of reading images.

    ``verify`` drops the ``--threshold`` alias of ``--detect-threshold`` (verify has two
    thresholds; there ``--threshold`` is a deprecated alias added by the command itself).
    """
    decorators = [
        click.option(
            "--detect-threshold",
            "--threshold",
            "threshold",
            type=FiniteFloatRange(0, 1),
            default=MIN_FACE_SCORE,
            show_default=True,
            help="Face detection confidence. Lower finds more faces (profiles, blur) and more false ones.",
        ),
        click.option(
            "--min-face",
            type=click.IntRange(4, None),
            default=MIN_FACE_PX,
            show_default=True,
            help="Smallest face side to look for, in pixels. Smaller is slower.",
        ),
        click.option(
            "--rotations",
            type=click.Choice(ROTATION_MODES),
            default=DETECT_ROTATIONS,
            show_default=True,
            help="Also look for faces in each photo turned by 90, 180 and 270 degrees (a scan, a "
            "photo lying on its side or upside down): all = every photo (4 detections each), "
            "auto = only photos with no upright face (misses some), none = upright only.",
        ),
        click.option(
            "--device",
            default=None,
            callback=usable_device,
            help="torch device, e.g. cpu or cuda:0. Default: CUDA if present.",
        ),
        click.option(
            "--max-pixels",
            type=click.IntRange(1, None),
            default=None,
            help="Refuse images with more pixels (decompression-bomb guard). Default 120,000,000, "
            "or FACECLOAK_MAX_PIXELS if set.",
        ),
    ]
    if verify:
        decorators[0] = click.option(
            "--detect-threshold",
            "threshold",
            type=FiniteFloatRange(0, 1),
            default=MIN_FACE_SCORE,
            show_default=True,
            help="Face detection confidence (not the same-person threshold: see --match-threshold).",
        )
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def verify_detect_options(function: Callable) -> Callable:
    """`detect_options` for ``verify``: ``--detect-threshold`` only (there ``--threshold`` is its own)."""
    return detect_options(function, verify=True)


QUALITY_FORMATS = ("input", "jpeg", "webp", "heif")
"""``--format`` values whose outputs can be lossy, so ``--jpeg-quality`` applies (input: some may be)."""


def batch_options(out_dir: Path | None, **values) -> Options:
    """The batch `Options` from a command's option values (defaults as in `facecloak.defaults`)."""
    format_name = (values.get("format_name") or "input").lower()
    if values.get("jpeg_quality") is not None and format_name not in QUALITY_FORMATS:
        # a lossless output has no quality: a cloak (PNG by default) ignored it without a word
        raise click.UsageError(
            f"--jpeg-quality is for JPEG, WebP or HEIF outputs (this is --format {format_name}); "
            "add --format jpeg, or --format input for each input's own"
        )
    if values.get("max_pixels") is None:
        from facecloak.errors import InvalidInputError
        from facecloak.io import max_pixels_default

        try:  # a bad FACECLOAK_MAX_PIXELS failed every file, one by one, as that file's fault (exit 3)
            max_pixels_default()
        except InvalidInputError as error:
            raise click.UsageError(str(error)) from None
    return Options(
        out_dir=str(out_dir) if out_dir else None,
        format=None if format_name == "input" else format_name,
        keep_metadata=values.get("keep_metadata", False),
        overwrite=values.get("overwrite", False),
        max_pixels=values.get("max_pixels"),
        min_score=values.get("threshold", MIN_FACE_SCORE),
        min_size=values.get("min_face", MIN_FACE_PX),
        rotations=values.get("rotations", DETECT_ROTATIONS),
        device=values.get("device"),
        jpeg_quality=values.get("jpeg_quality"),
    )


JSONL_OPTION = click.option(
    "--jsonl",
    "as_jsonl",
    is_flag=True,
    callback=remember_json_output,
    is_eager=True,
    help="Print one JSON line per face (for pipes: grep, head, jq).",
)


def require_paths(paths: tuple[Path, ...]) -> None:
    """For Ray only: local paths must exist (URIs such as s3://... are checked by the workers)."""
    missing = [str(path) for path in paths if not path.exists() and not URI.match(str(path))]
    if missing:
        raise click.UsageError(f"no such file or folder: {', '.join(missing)}")


URI = re.compile(r"^[a-z][a-z0-9+.-]*:/")  # s3://..., gs://... (a Path keeps one slash of the two)


def uri_of(path: Path | str) -> str:
    """The URI a user typed, from the Path click made of it: ``s3:/b/k`` -> ``s3://b/k``.

    A ``file:`` URI has an empty host, so its three slashes come back: one added slash made
    ``file:///tmp/x`` the host ``tmp``.
    """
    text = str(path)
    if text.startswith("file:/"):
        return "file:///" + text[len("file:/") :].lstrip("/")
    return URI.sub(lambda match: match.group(0) + "/", text)


def _ray_address(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """Refuse a photo taken for the cluster's address: ``--ray photos/ -o out`` joined "photos/".

    ``--ray`` takes an optional value, so a path right after it became the address, and the batch
    went on without that path (or stopped on "Missing argument PATHS").
    """
    if value and "://" not in value and Path(value).exists():
        raise click.UsageError(
            f"--ray took {value!r}, a file or folder here, for the cluster's address: put --ray after "
            "the paths, or give the address as --ray=ADDRESS"
        )
    return value


def ray_option(function: Callable) -> Callable:
    """``--ray [ADDRESS]``: run the batch on a Ray cluster (facecloak.distributed)."""
    return click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="",
        default=None,
        callback=_ray_address,
        metavar="[ADDRESS]",
        help="Run on Ray: --ray alone starts or joins the local cluster (RAY_ADDRESS), --ray=ADDRESS joins "
        "that one (e.g. ray://head:10001). Inputs may be s3:// or other pyarrow URIs; needs -o and "
        "pip install 'facecloak[ray]'. Put it after the paths.",
    )(function)


def say_unchecked(bank: str, unchecked: list[str], checked_with: list[str]) -> None:
    """A note on a bank's models that are not registered here: fewer checks (it ran without a word)."""
    if unchecked:
        click.echo(
            f"note: bank {bank!r} also holds {', '.join(unchecked)}, which is not registered here: "
            f"new faces are checked with {', '.join(checked_with)} only (`facecloak models` lists them)",
            err=True,
        )


def say_left_out(models: str | None) -> None:
    """A note for each added model a default run (no ``--models``) leaves out, and why.

    An added model whose file was moved, or whose card is broken, was dropped from "every
    available model" without a word: the cloak attacked fewer models than the user added.
    """
    if models is not None:
        return
    from facecloak.models.registry import unusable_added_models
    from facecloak.models.user_models import BROKEN_CARDS

    for name, why in unusable_added_models():
        click.echo(f"note: added model {name} is left out of this run: {why}", err=True)
    for path, why in BROKEN_CARDS:
        click.echo(f"note: the model card {path} is left out of this run: {why}", err=True)


def donor_margin_option(function: Callable) -> Callable:
    """``--donor-margin``: how strict replace's donor check is (see `facecloak.replace.DONOR_MARGIN`)."""
    return click.option(
        "--donor-margin",
        type=FiniteFloatRange(min=0.5, max=3.0),
        default=None,
        help="replace: how far each new face must be from every donor used, in each recogniser's "
        "thresholds (default: each model's own, 1.05 for dlib-resnet and 1.08 for others). Lower "
        "replaces more faces; a scraper may then match a few to a donor.",
    )(function)


def fallback_option(function: Callable) -> Callable:
    """``--fallback blur|keep``: what replace does with a face no donor mix protects."""
    return click.option(
        "--fallback",
        type=click.Choice(REPLACE_FALLBACKS),
        default=REPLACE_FALLBACKS[0],
        show_default=True,
        help="replace: a face no donor mix protects is blurred instead, or keeps its best try "
        "(reported NOT protected; anonymize exits 1).",
    )(function)


def finish_option(function: Callable) -> Callable:
    """``--finish/--no-finish``: whether replace finishes a near miss with a faint cloak."""
    return click.option(
        "--finish/--no-finish",
        "finish_near_misses",
        default=True,
        show_default=True,
        help="replace: a new face within 0.8-1.15 of a recogniser's threshold (a near miss, or a thin "
        "pass another recogniser may still link) gets a faint cloak (level low; mid for one that low leaves "
        "short) that pushes it from the original face and its donors, and is checked again; --no-finish "
        "blurs near misses instead.",
    )(function)


def keep_mouth_option(function: Callable) -> Callable:
    """``--keep-mouth``: replace keeps the person's own lips (the expression) and replaces the rest."""
    return click.option(
        "--keep-mouth",
        is_flag=True,
        default=False,
        help="replace: keep the person's own lips and mouth (an open laugh, teeth, lipstick stay as they "
        "are) and replace the rest of the face. More natural expressions; the lips carry a little of the "
        "person, so somewhat fewer new faces pass every check.",
    )(function)
