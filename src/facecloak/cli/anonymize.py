"""``facecloak anonymize``: blur, pixelate, mask or replace every face."""

from __future__ import annotations

from pathlib import Path

import click

from facecloak.cli import running
from facecloak.cli.options import (
    CONTEXT,
    FiniteFloatRange,
    batch_options,
    donor_margin_option,
    fallback_option,
    finish_option,
    given_on_command_line,
    io_options,
    keep_mouth_option,
    ray_option,
    say_left_out,
    say_unchecked,
)
from facecloak.cli.running import fail_run, finish, run_protection
from facecloak.defaults import MAX_BLOCKS, MAX_FEATHER, MAX_SEED, MIN_SCALE, MIN_STRENGTH, REGION_SCALE
from facecloak.errors import EXIT_USAGE, FacecloakError


@click.command(context_settings=CONTEXT)
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
    type=FiniteFloatRange(MIN_SCALE, 4.0),
    default=REGION_SCALE,
    show_default=True,
    help="Region size relative to the detected box. Larger also covers hair and ears; under "
    f"{MIN_SCALE} a recognition model still matched faces.",
)
@click.option(
    "--strength",
    type=FiniteFloatRange(MIN_STRENGTH, 2.0),
    default=None,
    help=f"blur: sigma as a fraction of the face size [default 0.25]. Under {MIN_STRENGTH} a "
    "recognition model still matched faces.",
)
@click.option(
    "--blocks",
    type=click.IntRange(1, MAX_BLOCKS),
    default=None,
    help=f"pixelate: mosaic blocks across the face [default 8], each at least 5 px (a smaller face "
    f"gets fewer). Fewer hide more; over {MAX_BLOCKS} a recognition model still matched faces.",
)
@click.option(
    "--feather",
    type=FiniteFloatRange(0, MAX_FEATHER),
    default=None,
    help=f"Soft edge as a fraction of the region (blur default 0.15, others 0; at most {MAX_FEATHER}: "
    "a softer edge leaves the face's rim as it was).",
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
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=0,
    show_default=True,
    help="replace: seed of the donor draw, the grain and the finish (a photo comes out the same with "
    "the same photos beside it in its chunk; elsewhere a finished face can differ by a few levels).",
)
@fallback_option
@donor_margin_option
@finish_option
@keep_mouth_option
@io_options
@ray_option
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
    fallback,
    donor_margin,
    finish_near_misses,
    keep_mouth,
    **io_values,
) -> None:
    """Blur, pixelate, mask or replace every face, at the photo's full resolution.

    Pixels outside the face regions are left exactly as they were (for a JPEG, every 8x8 block
    away from the faces stays bit-exact). Outputs are written atomically as <name>_<method>.<ext>
    (photo_blur.jpg, photo_pixelate.jpg, photo_mask.jpg, photo_replace.jpg); inputs are never
    overwritten; an input whose output exists is skipped unless --overwrite (with -o, an output
    this command wrote with other settings is redone); EXIF (GPS above
    all) is dropped unless --keep-metadata.

    --method replace puts a new face mixed from several donors of a bank (`facecloak donors add`)
    in place of each face, keeping hair, ears and background. Each new face is checked after
    JPEG 75: found again by the detector, and on every available recogniser beyond the match
    threshold from the original face and from every donor used; a face that fails is retried
    with other donors; a near miss or thin pass gets a faint cloak that finishes it (--no-finish:
    none), then is checked again (--keep-mouth: the person's own lips stay, the rest is new); a
    face that still fails is blurred instead and reported (with
    --fallback keep: its best try is kept and reported as NOT protected, exit code 1). Faces under
    --min-face (default 40 px with replace) are blurred instead, and reported.

    \b
    facecloak anonymize photo.jpg
    facecloak anonymize photos/ -o anonymized/ --method pixelate --blocks 6
    facecloak anonymize photos/ -o out/ --method mask --shape box --json
    facecloak anonymize photos/ -o out/ --method replace --donors mybank
    """
    from facecloak.anonymize import Anonymizer
    from facecloak.pipeline import ProtectorSpec
    from facecloak.protection import AnonymizeFaces

    if strength is not None and method != "blur":
        raise click.UsageError(f"--strength is for --method blur (this is --method {method})")
    if blocks is not None and method != "pixelate":
        raise click.UsageError(f"--blocks is for --method pixelate (this is --method {method})")
    if method != "replace":
        for name, flag in (
            ("donors_per_face", "--donors-per-face"),
            ("seed", "--seed"),
            ("fallback", "--fallback"),
        ):
            if given_on_command_line(name):
                raise click.UsageError(f"{flag} is for --method replace")
    if method == "replace":
        for name, flag in (("feather", "--feather"), ("shape", "--shape"), ("mask_scale", "--mask-scale")):
            if given_on_command_line(name):
                # the new face's region follows its landmarks: these would be ignored without a word
                raise click.UsageError(f"{flag} is for --method blur, pixelate or mask")
        replacer_options = {
            "donors_per_face": donors_per_face,
            "seed": seed,
            "fallback": fallback,
            "donor_margin": donor_margin,
            "finish": finish_near_misses,
            "keep_mouth": keep_mouth,
        }
        _replace_command(paths, donor_bank, replacer_options, io_values)
        return
    if donor_bank is not None:
        raise click.UsageError("--donors is for --method replace")
    if donor_margin is not None:
        raise click.UsageError("--donor-margin is for --method replace")
    if given_on_command_line("finish_near_misses"):  # --finish too: it was taken without a word
        flag = "--finish" if finish_near_misses else "--no-finish"
        raise click.UsageError(f"{flag} is for --method replace")
    if keep_mouth:
        raise click.UsageError("--keep-mouth is for --method replace")
    options = batch_options(**{k: v for k, v in io_values.items() if k != "ray_address"})
    params = {"scale": mask_scale, "shape": shape, "feather": feather}
    if method == "blur":
        params["strength"] = strength
    elif method == "pixelate":
        params["blocks"] = blocks
    try:
        anonymizer = Anonymizer(method, **params)
        spec = ProtectorSpec("anonymize", {"method": method, **params})
    except FacecloakError as error:
        fail_run("anonymize", error, io_values, EXIT_USAGE)
    report = run_protection(
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
    finish(report, io_values["as_json"], io_values["as_jsonl"], io_values["quiet"])


def _replace_command(paths, donor_bank, replacer_options: dict, io_values) -> None:
    """``anonymize --method replace``: load the bank and every available model, run the batch.

    ``replacer_options``: the `FaceReplacer` settings of the command line (donors per face, seed,
    fallback, donor margin, finish, keep mouth), recorded in the journal and the report as given.
    """
    from facecloak.detect import MIN_FACE_PX, detector_for
    from facecloak.donor_bank import load_bank
    from facecloak.errors import DonorBankError
    from facecloak.models import choose_embedders
    from facecloak.pipeline import ProtectorSpec
    from facecloak.protection import ReplaceFaces
    from facecloak.replace import DONORS_PER_FACE, REPLACE_MIN_FACE_PX, FaceReplacer

    if donor_bank is None:
        raise click.UsageError(
            "--method replace needs --donors BANK; "
            "create a bank with `facecloak donors add PHOTOS_DIR --bank NAME`"
        )
    if io_values.get("ray_address") is not None:
        raise click.UsageError("--method replace does not run on Ray (--ray) yet; run it without --ray")
    min_face = io_values["min_face"] if given_on_command_line("min_face") else REPLACE_MIN_FACE_PX
    io_values["min_face"] = min(min_face, MIN_FACE_PX)  # smaller faces are found, then blurred
    options = batch_options(**{k: v for k, v in io_values.items() if k != "ray_address"})
    try:
        bank = load_bank(donor_bank)
        model_names = choose_embedders(None)
        say_left_out(None)
        # before any work: found building the replacer, every photo failed (exit 3)
        unchecked = bank.check_for_replacing(
            model_names, replacer_options.get("donors_per_face", DONORS_PER_FACE)
        )
    except DonorBankError as error:
        fail_run("anonymize", error, io_values, EXIT_USAGE)
    except FacecloakError as error:
        fail_run("anonymize", error, io_values)
    say_unchecked(bank.name, unchecked, model_names)
    settings = {"donors": str(bank.folder), "min_face": min_face, "models": model_names, **replacer_options}
    spec = ProtectorSpec("replace", settings)

    def build() -> ReplaceFaces:
        models = [running.create_model(name, options.device) for name in model_names]
        detector = detector_for(options)
        replacer = FaceReplacer(bank, models, min_face=min_face, detector=detector, **replacer_options)
        return ReplaceFaces(replacer)

    report = run_protection(
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
    report.options.update(method="replace", **settings)
    finish(report, io_values["as_json"], io_values["as_jsonl"], io_values["quiet"])
