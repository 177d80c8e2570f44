"""``facecloak evaluate``: measure what a protection buys against simulated scrapers."""

from __future__ import annotations

import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import click

from facecloak.cli.options import (
    CONTEXT,
    FolderPath,
    donor_margin_option,
    fallback_option,
    finish_option,
    given_on_command_line,
    keep_mouth_option,
    say_left_out,
    usable_device,
)
from facecloak.cli.running import fail
from facecloak.defaults import MAX_SEED, STRONGEST_LEVEL, UPLOADS
from facecloak.errors import EXIT_USAGE, DonorBankError, FacecloakError, ImageWriteError


@click.command(context_settings=CONTEXT)
# DATA is checked by the evaluator (`list_people`): one line with its path and reason, not click's usage text
@click.argument("data", type=click.Path(path_type=Path))
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
@fallback_option
@donor_margin_option
@finish_option
@keep_mouth_option
@click.option(
    "--level",
    type=click.Choice(["low", "mid", "high", "all"]),
    default="mid",
    show_default=True,
    help="cloak: budget level; 'all' runs the three and plots quality vs protection.",
)
@click.option(
    "--mode",
    type=click.Choice(["untargeted", "targeted"]),
    default="untargeted",
    show_default=True,
    help="cloak: push each face away from its own identity, or pull it toward a synthetic identity "
    "keyed per person (as `facecloak cloak --mode`).",
)
@click.option(
    "--escalate",
    is_flag=True,
    help="cloak: a face that falls short is cloaked again at the next level, as `facecloak cloak "
    "--escalate` does; the report counts such faces.",
)
@click.option(
    "--person-level/--per-photo",
    default=None,
    help="cloak: push each photo from its person's photos (the default) or from itself only.",
)
@click.option(
    "--models",
    default=None,
    help="cloak: models to attack; replace: recognisers that check each new face "
    "(comma-separated; the bank must hold them). Default: all available.",
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
    default=",".join(UPLOADS),
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
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=0,
    show_default=True,
    help="Seed of the draw of people and of the cloak.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where clean embeddings are cached between runs. Default: $XDG_CACHE_HOME/facecloak/embeddings "
    "(~/.cache/...).",
)
@click.option(
    "--device", default=None, callback=usable_device, help="torch device. Default: CUDA if present."
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=FolderPath(file_okay=False, path_type=Path),
    required=True,
    help="Report folder.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def evaluate(
    data,
    method,
    donor_bank,
    donors_per_face,
    fallback,
    donor_margin,
    finish_near_misses,
    keep_mouth,
    level,
    mode,
    escalate,
    person_level,
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
    from facecloak._checks import split_names
    from facecloak.evaluate import EvaluationRequest, run_evaluation
    from facecloak.report import summary_table, write_html, write_json

    _refuse_options_of_other_methods(method)
    if protected_dir is not None:
        _refuse_protection_options()
    if cache is None:  # XDG_CACHE_HOME was ignored: the cache went to ~/.cache whatever it said
        from facecloak.models.parsed_cache import facecloak_cache_dir

        cache = facecloak_cache_dir() / "embeddings"
    if protected_dir is None and method in ("cloak", "replace"):
        say_left_out(models)
    request = EvaluationRequest(
        data=data,
        method=method,
        level=level,
        mode=mode,
        escalate=escalate,
        person_level=person_level,
        models=models,
        protected_dir=protected_dir,
        people=people,
        control=control,
        min_photos=min_photos,
        probes=probes,
        attackers=attackers,
        uploads=tuple(split_names(uploads)),
        adaptive=adaptive,
        adaptive_people=adaptive_people,
        max_distractors=max_distractors,
        leave_one_out=leave_one_out,
        seed=seed,
        cache=cache,
        device=device,
        donors=donor_bank,
        donors_per_face=donors_per_face,
        fallback=fallback,
        donor_margin=donor_margin,
        finish=finish_near_misses,
        keep_mouth=keep_mouth,
    )
    if method == "replace" and not donor_bank:
        raise click.UsageError("--method replace needs --donors BANK (see `facecloak donors add`)")
    if method == "replace":  # a missing or empty bank: said at once, before any model is loaded
        from facecloak.donor_bank import load_bank

        try:
            load_bank(donor_bank, embeddings=False)
        except FacecloakError as error:
            fail(error, EXIT_USAGE)
    _make_cache_folder(cache)
    made = not out_dir.exists()
    _make_report_folder(out_dir)
    try:
        with _stage_progress(quiet) as progress:
            result = run_evaluation(request, on_progress=progress)
    except FacecloakError as error:
        if made:  # a DATA mistyped left an empty report folder behind
            with suppress(OSError):
                out_dir.rmdir()
        fail(error, EXIT_USAGE if isinstance(error, DonorBankError) else error.exit_code)  # as anonymize
    write_json(result, out_dir / "report.json")
    write_html(result, out_dir / "report.html")
    click.echo(summary_table(result))
    shared = result.settings.get("donor_people_among_protected")
    if shared:  # the protocol wants donors from other people: said, not hidden in the JSON
        click.echo(
            f"note: {len(shared)} protected person(s) are donors in the bank too ({', '.join(shared[:5])}"
            f"{' ...' if len(shared) > 5 else ''}): a new face is kept from matching them only by the "
            "look-alike cut-off; a bank of other people measures replacement cleanly",
            err=True,
        )
    click.echo(f"report: {out_dir / 'report.html'} and {out_dir / 'report.json'}")


def _make_report_folder(out_dir: Path) -> None:
    """Make -o before any work: one that cannot be made failed only at the end, the evaluation lost."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(ImageWriteError(f"cannot create the report folder ({error.strerror})", out_dir))


def _make_cache_folder(cache: Path) -> None:
    """Make --cache before any work: one that cannot be made was a traceback after the first attacker."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(ImageWriteError(f"cannot create the embedding cache folder ({error.strerror})", cache))


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


_METHOD_OPTIONS = {
    "cloak": (
        ("level", "--level"),
        ("mode", "--mode"),
        ("escalate", "--escalate"),
        ("person_level", "--person-level/--per-photo"),
    ),
    "replace": (
        ("donor_bank", "--donors"),
        ("donors_per_face", "--donors-per-face"),
        ("fallback", "--fallback"),
        ("donor_margin", "--donor-margin"),
        ("finish_near_misses", "--finish/--no-finish"),
        ("keep_mouth", "--keep-mouth"),
    ),
}


def _refuse_protection_options() -> None:
    """With ``--protected-dir`` nothing is protected here: an option saying how was ignored.

    (``--protected-dir DIR --level high --escalate --mode targeted`` ran with none of them, its
    rows at level "-", and loaded ``--models`` for nothing.)
    """
    taken = [("method", "--method"), ("models", "--models")]
    taken += [option for options in _METHOD_OPTIONS.values() for option in options]
    for name, flag in taken:
        if given_on_command_line(name):
            raise click.UsageError(
                f"{flag} says how to protect the photos, and with --protected-dir they were protected "
                "elsewhere: leave it out"
            )


def _refuse_options_of_other_methods(method: str) -> None:
    """A usage error for an option another ``--method`` takes: it was ignored without a word.

    (``evaluate --method blur --escalate`` ran a blur and reported nothing of the option.)
    """
    params = click.get_current_context().params
    for owner, options in _METHOD_OPTIONS.items():
        for name, flag in options:
            if method != owner and given_on_command_line(name):
                if flag.startswith("--finish/"):  # the spelling given, not the pair
                    flag = "--finish" if params.get(name) else "--no-finish"
                raise click.UsageError(f"{flag} is for --method {owner} (this is --method {method})")
    if params.get("escalate") and params.get("level") == STRONGEST_LEVEL:
        # `facecloak cloak` refuses it; here it ran a plain `high` cloak reported as escalating
        raise click.UsageError(f"--escalate has no level above --level {STRONGEST_LEVEL} to go to")
    if params.get("adaptive") is None and given_on_command_line("adaptive_people"):
        raise click.UsageError("--adaptive-people is for --adaptive (add --adaptive, or drop it)")
    targeted = params.get("mode") == "targeted"
    if method == "cloak" and targeted and given_on_command_line("person_level"):
        # a targeted cloak drops it, and the report's settings listed it as used
        raise click.UsageError(
            "--person-level/--per-photo is for --mode untargeted (a targeted cloak pulls to its key)"
        )
    if method not in ("cloak", "replace") and given_on_command_line("models"):
        raise click.UsageError(
            f"--models is for --method cloak or replace (this is --method {method}); "
            "the models that try to match the faces are --attackers"
        )
