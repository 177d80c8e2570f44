"""``facecloak cloak``: an adversarial cloak on every face, against the chosen face models."""

from __future__ import annotations

from pathlib import Path

import click

from facecloak.batch_types import Options
from facecloak.cli import running
from facecloak.cli.options import (
    CONTEXT,
    FiniteFloatRange,
    batch_options,
    io_options,
    ray_option,
    say_left_out,
)
from facecloak.cli.running import fail_run, finish, run_protection
from facecloak.defaults import CPU_CLOAK_BATCH, GPU_CLOAK_BATCH, MAX_SEED, STRONGEST_LEVEL
from facecloak.errors import FacecloakError


@click.command(context_settings=CONTEXT)
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
    "DSSIM cap 0.004 / 0.008 / 0.012 over the face's detection box). "
    "Higher protects more, on unseen models too; low rarely passes several models at once.",
)
@click.option(
    "--models",
    default=None,
    help="Comma-separated face models to attack together (see `facecloak models`). Default: all available.",
)
@click.option(
    "--identity-key",
    default=None,
    envvar="FACECLOAK_IDENTITY_KEY",
    help="targeted: a per-person secret; photos cloaked with the same key are pulled the same way. "
    "Or set FACECLOAK_IDENTITY_KEY, which keeps the key out of `ps` and the shell's history.",
)
@click.option(
    "--steps", type=click.IntRange(0, 10_000), default=None, help="Most steps per face [level's default]."
)
@click.option(
    "--max-dssim", type=FiniteFloatRange(0.0001, 0.5), default=None, help="DSSIM cap [level's default]."
)
@click.option(
    "--diversity",
    type=FiniteFloatRange(0, 1),
    default=None,
    help="Transfer: share of steps that also zoom and shift each face's crop at random (input diversity) "
    "[measured default, see README].",
)
@click.option(
    "--smoothing",
    type=FiniteFloatRange(0, 8),
    default=None,
    help="Transfer: Gaussian sigma (chip pixels) smoothing each step's gradient (translation invariance) "
    "[measured default].",
)
@click.option(
    "--models-per-step",
    type=click.IntRange(1, 64),
    default=None,
    help="How many of the models each optimisation step goes through, a random subset each step, "
    "every model in the same share of the steps "
    "[all of one or two; all but one from three on: a third faster with three, about as strong].",
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
    help="Use every step and then the whole DSSIM cap (more distance on the attacked models, which "
    "is what transfers to others) or stop once the attacked models are past the aim (faster, a "
    "smaller change) [measured default].",
)
@click.option(
    "--person-level/--per-photo",
    default=None,
    help="untargeted: push each face away from the mean of every photo of the same person in its batch "
    "(faces within every model's threshold of each other), not only from its own photo: a scraper "
    "matches other photos of you (OPOM; README) [measured default].",
)
@click.option(
    "--laggard-weight",
    type=FiniteFloatRange(0, 20),
    default=None,
    help="untargeted: extra pull on a model the face is still near (under 1.25x its threshold), so the "
    "budget goes first where the face would be NOT protected; 0: every model pulled alike "
    "[measured default].",
)
@click.option(
    "--escalate",
    is_flag=True,
    help="Cloak a face that falls short again at the next level (low -> mid, mid -> high: a faint "
    "change at 100%), with that level's own steps and DSSIM cap (or yours, where larger), and keep "
    "it if it then passes; the summary lists such faces.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=0,
    show_default=True,
    help="Seed of the random draws: the same photos, cloaked together in one chunk, give the same "
    "result again; a photo cloaked beside other photos gets other draws, and another cloak.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=None,
    help=f"Photos cloaked together in one optimisation [{CPU_CLOAK_BATCH} on the CPU; on a GPU up to "
    f"{GPU_CLOAK_BATCH}, as its free memory allows].",
)
@io_options(cloak=True)
@ray_option
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
    models_per_step,
    update,
    spend_budget,
    person_level,
    laggard_weight,
    escalate,
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
    a face whose distance from its own identity (untargeted: the mean of the same person's clean
    photos in its batch, its own photo's face alone with --per-photo) does not pass every model's
    match threshold is reported as NOT protected (exit code 1).

    \b
    facecloak cloak photo.jpg
    facecloak cloak photos/ -o cloaked/ --level high
    facecloak cloak photos/ -o out/ --mode targeted --identity-key "my secret" --json
    """
    from_environment = click.get_current_context().get_parameter_source("identity_key")
    if mode != "targeted" and from_environment == click.core.ParameterSource.ENVIRONMENT:
        identity_key = None  # a key kept in the environment for targeted runs does not refuse the others
    if mode == "targeted" and not identity_key:
        raise click.UsageError(
            "--mode targeted needs --identity-key: a per-person secret, so that every photo of the "
            "person is pulled the same way (a random direction per photo would not hide them)"
        )
    if mode != "targeted" and identity_key:  # ignored before: an untargeted cloak where one was meant
        raise click.UsageError("--identity-key is for --mode targeted (add --mode targeted, or drop the key)")
    if mode == "targeted":  # a targeted cloak drops them, yet the report listed them as used
        untargeted_only = {"--person-level/--per-photo": person_level, "--laggard-weight": laggard_weight}
        for flag, value in untargeted_only.items():
            if value is not None:
                raise click.UsageError(f"{flag} is for --mode untargeted (a targeted cloak pulls to its key)")
    if escalate and level == STRONGEST_LEVEL:  # nothing above it: the report said "escalate" of nothing
        raise click.UsageError(f"--escalate has no level above --level {level} to go to")
    from facecloak._checks import split_names
    from facecloak._device import cloak_batch_size
    from facecloak.models import choose_embedders, get_card
    from facecloak.pipeline import ProtectorSpec
    from facecloak.protection import CloakFaces

    options = batch_options(**{k: v for k, v in io_values.items() if k != "ray_address"})
    options = Options(**{**options.__dict__, "chunk": batch_size or cloak_batch_size(options.device)})
    ray_address = io_values.get("ray_address")
    transfer = dict(
        diversity=diversity,
        smoothing=smoothing,
        models_per_step=models_per_step,
        update=update,
        spend_budget=spend_budget,
        person_level=person_level,
        laggard_weight=laggard_weight,
    )
    try:
        if ray_address is None:
            names = choose_embedders(models)
            say_left_out(models)
        else:  # on Ray each actor loads the models (their files may be there only): names known here
            names = split_names(models)
            for name in names:  # a misspelt one died in every actor, a Ray traceback and exit 1
                get_card(name)
        spec = ProtectorSpec.cloak(
            mode,
            level,
            names or None,
            identity_key=identity_key,
            steps=steps,
            max_dssim=max_dssim,
            seed=seed,
            escalate=escalate or None,  # absent unless asked: earlier batches' journals still match
            **transfer,
        )
    except FacecloakError as error:
        fail_run("cloak", error, io_values)
    names = spec.params["models"]
    if models_per_step is not None and models_per_step > len(names):
        raise click.BadParameter(
            f"{models_per_step} > the {len(names)} model(s) attacked", param_hint="--models-per-step"
        )

    def build() -> CloakFaces:
        embedders = [running.create_model(name, options.device) for name in names]
        return CloakFaces.create(
            mode,
            embedders,
            level,
            escalate=escalate,
            steps=steps,
            max_dssim=max_dssim,
            seed=seed,
            identity_key=identity_key,
            **transfer,
        )

    report = run_protection(
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
    chosen = dict(transfer, steps=steps, max_dssim=max_dssim, escalate=escalate or None)
    given = {key: value for key, value in chosen.items() if value is not None}  # else: the defaults
    report.options.update(mode=mode, level=level, models=names, seed=seed, **given)
    finish(report, io_values["as_json"], io_values["as_jsonl"], io_values["quiet"])
