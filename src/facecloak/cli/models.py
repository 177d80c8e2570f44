"""``facecloak models``: list the face models, add, calibrate and remove the user's own."""

from __future__ import annotations

from pathlib import Path

import click

from facecloak.cli.options import CONTEXT, FiniteFloatRange, given_on_command_line, usable_device
from facecloak.cli.running import fail
from facecloak.errors import EXIT_FAILED, FacecloakError, InvalidInputError


@click.group(context_settings=CONTEXT, invoke_without_command=True)
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
    from facecloak.models.registry import is_builtin
    from facecloak.models.user_models import BROKEN_CARDS, find_model_files, models_search_roots

    unusable = []  # added models whose file is gone: as broken as an unreadable card
    for name in list_embedders():
        card = get_card(name)
        ok, where = embedder_status(name)
        state = "available" if ok else "NOT available"
        click.echo(
            f"{name:<22} {state:<14} {card.input_size}px {card.embedding_dim}-d {card.distance} "
            f"< {card.match_threshold}  {card.description}"
        )
        click.echo(f"{'':<22} {'weights:' if ok else 'why:'} {where}")
        if not ok and not is_builtin(name):
            unusable.append(name)
    for path, reason in BROKEN_CARDS:
        click.echo(f"error: {path}: {reason}", err=True)
    for name in unusable:
        click.echo(
            f"error: model {name} was added but cannot be used: add it again with its file, or "
            f"`facecloak models remove {name}`",
            err=True,
        )
    click.echo(
        "\nTo add a face model (an ONNX file, or an MXNet NAME-symbol.json with its NAME-0000.params):\n"
        "  facecloak models add NAME FILE [--input-size PX] [--template arcface|dlib|points.json]\n"
        "                       [--crop box --margin PX] [--layout nchw|nhwc]\n"
        "                       [--mean R G B] [--std R G B] [--bgr] [--metric cosine|euclidean] "
        "[--threshold T]\n"
        "It is checked (loaded and run once) and then usable by name: cloak --models NAME, verify "
        "--model NAME,\nevaluate --attackers NAME. See `facecloak models add --help`."
    )
    roots = [root for root in models_search_roots() if root.is_dir()]
    found = find_model_files(roots) if roots else []
    where = " or ".join(str(root) for root in roots)
    if not roots:  # it said "no model file under ../shared/models" of a folder that is not there
        looked = " or ".join(str(root) for root in models_search_roots())
        click.echo(f"\nNo folder of model files here ({looked}): set FACECLOAK_MODELS to one.")
    elif not found:
        click.echo(
            f"\nNo model file under {where} that is not added already "
            "(set FACECLOAK_MODELS to look elsewhere)."
        )
    else:
        click.echo(f"\nModel files found under {where}, not added yet:")
    for name, file, readme in found:
        click.echo(f"  facecloak models add {name} {file}")
        note = (
            f"read {readme} for its input size, mean/std, channel order and threshold first; "
            if readme
            else ""
        )
        click.echo(f"      {note}then `facecloak models calibrate {name} PEOPLE_FOLDER` sets its threshold")
    if (
        BROKEN_CARDS or unusable
    ):  # a model the user added is unusable: a script checking the listing must see it
        context.exit(EXIT_FAILED)


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
    type=FiniteFloatRange(0),
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
@click.option(
    "--metric",
    type=click.Choice(["cosine", "euclidean"]),
    default="cosine",
    show_default=True,
    help="How two embeddings' distance is measured (the one the model was trained and published with).",
)
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
    facecloak models add mobileface MobileFace_Identification_V2-symbol.json --threshold 0.73
    facecloak models add hse-mobilenet hse_mobilenet_vggface2.onnx --crop box --margin 10 \\
        --input-size 224 --layout nhwc --bgr --mean 103.939 116.779 123.68
    facecloak models calibrate hse-mobilenet ../shared/data/lfw/images
    """
    from facecloak.models.registry import get_card
    from facecloak.models.user_models import add_user_model, is_user_model

    # each was dropped without a word: a landmark crop has no margin, a box crop no template
    if crop != "box" and given_on_command_line("margin"):
        raise click.UsageError("--margin is for --crop box (a landmark crop is set by --template)")
    if crop == "box" and given_on_command_line("template"):
        raise click.UsageError("--template is for --crop landmarks (a box crop is set by --margin)")
    previous = get_card(name) if is_user_model(name) else None
    try:
        if file.is_dir():  # it said "model file not found" of a folder that is there
            raise InvalidInputError(
                "a folder, not a model file: give the .onnx or NAME-symbol.json file in it", file
            )
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
        fail(error, error.exit_code)
    click.echo(
        f"added {card.name}: {card.input_size}px -> {card.embedding_dim}-d, "
        f"{card.distance} < {card.match_threshold}"
    )
    if card.extra.get("batch") == 1:
        click.echo(
            f"note: {file.name} takes one face at a time (its batch is fixed to 1): it runs chip by chip, "
            "slower than a file exported with a free batch size",
            err=True,
        )
    if previous is not None:  # a calibrated threshold must not be lost without a word
        click.echo(
            f"note: this replaced the earlier card of {name} (threshold {previous.match_threshold}, "
            f"file {previous.weights})",
            err=True,
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
    type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
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
@click.option(
    "--device", default=None, callback=usable_device, help="cpu, cuda, cuda:1 ... [CUDA if present]"
)
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
        # already cut to what a card keeps (`calibrate._rounded_down`): rounded again, a threshold
        # under 1e-4 went up to 0.0001 and admitted more than --far
        threshold = result.threshold
        save_user_card(replace(card, match_threshold=threshold), replacing=card)  # unwritable: one line
    except FacecloakError as error:
        fail(error, error.exit_code)
    click.echo(f"{result.summary()}\nsaved: {name} now matches below {threshold}")


@models.command("remove", context_settings=CONTEXT)
@click.argument("name")
def models_remove(name) -> None:
    """Forget an added model (the model file itself is left alone)."""
    from facecloak.models.user_models import remove_user_model

    try:
        remove_user_model(name)
    except FacecloakError as error:
        fail(error)
    click.echo(f"removed {name}")
