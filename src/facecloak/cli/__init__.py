"""The ``facecloak`` command: parse options, call the Python API, print the report, exit.

Exit codes: 0 every face found was protected; 1 finished, but an image had no face or a face
fell short of its target, or no image was found; 2 usage error; 3 a file failed (missing,
unreadable or unwritable; the others were still processed); 130 stopped by Ctrl-C.

One module per command group: `faces` (detect, embed, verify), `anonymize`, `cloak`, `models`,
`donors`, `evaluate`, `serve`. They share `facecloak.cli.options` (the option blocks several
commands take, written once) and `facecloak.cli.running` (running a batch with its progress,
printing results, exiting). Each module defines plain click commands; this one adds them to
`main`, the ``facecloak`` entry point.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

import click

from facecloak import __version__
from facecloak.cli import anonymize, cloak, donors, evaluate, faces, models, serve
from facecloak.cli.options import CONTEXT, JSON_OUTPUT
from facecloak.cli.running import echo_end_document
from facecloak.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNPROTECTED,
    EXIT_USAGE,
    FacecloakError,
)


class _Commands(click.Group):
    """The command group: any facecloak error one line, and Ctrl-C its own exit code.

    A `FacecloakError` a command did not catch itself (a device this machine does not have,
    found before the batch starts) is ``error: <reason>`` and its exit code, never a traceback.
    click turns Ctrl-C into "Aborted!" and exit code 1, which a script reads as "a face NOT
    protected". Every output is written whole or not at all, so the same command again goes on.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FacecloakError as error:
            self._json_document(ctx, str(error), error.exit_code)
            click.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)
        except click.UsageError as error:  # click's own refusals: `| jq` got nothing on stdout
            self._json_document(ctx, error.format_message(), EXIT_USAGE)
            raise
        except BrokenPipeError:  # click made this exit code 1, read as "a face NOT protected"
            _silence_stdout()
            click.echo(
                "error: stdout was closed (the program reading it stopped): the run stopped there; "
                "every output written so far is whole, and the same command again goes on",
                err=True,
            )
            ctx.exit(EXIT_FAILED)
        except KeyboardInterrupt:
            if _COMMAND_LINE["running"]:  # the run is stopping: another Ctrl-C must not cut that short
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            message = (
                "interrupted: every output written so far is whole; the same command again goes on from there"
            )
            self._json_document(ctx, message, EXIT_INTERRUPTED)
            click.echo(message, err=True)
            ctx.exit(EXIT_INTERRUPTED)

    @staticmethod
    def _json_document(ctx: click.Context, error: str, exit_code: int) -> None:
        """With --json/--jsonl, the run's end on stdout too: a script reading it got nothing at Ctrl-C."""
        if ctx.meta.get(JSON_OUTPUT):
            echo_end_document(ctx.invoked_subcommand, error, exit_code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test runner's): nothing to flush
        pass


@click.group(cls=_Commands, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="facecloak")
def main() -> None:
    """Protect the faces in your photos from face-search scrapers.

    \b
    facecloak cloak photo.jpg                 cloak every face -> photo_cloaked.png
    facecloak anonymize photos/ -o out/       blur every face in a folder
    facecloak detect photo.jpg --json         list the faces found
    facecloak evaluate DATA --method cloak    measure what a protection buys

    Exit codes: 0 all faces protected (inputs whose output exists are skipped); 1 an image had
    no face, a face was not protected, or no image was found; 2 usage error; 3 some file failed
    (missing, unreadable, unwritable; the others were still done); 130 stopped by Ctrl-C.
    verify: 0 the same person, 1 different people, 3 a photo without a face or unreadable.
    """
    from facecloak._allocator import tune_allocator

    tune_allocator()  # batches reuse freed memory instead of page-faulting it in again


for _command in (
    anonymize.anonymize,
    cloak.cloak,
    faces.detect,
    donors.donors,
    faces.embed,
    evaluate.evaluate,
    models.models,
    serve.serve,
    faces.verify,
):
    main.add_command(_command)
del _command

_COMMAND_LINE = {"running": False}
"""Whether `command_line` runs this process (not a test's in-process `CliRunner`)."""


def command_line() -> None:
    """The ``facecloak`` command: `main`, and a Ctrl-C stop that a second Ctrl-C cannot spoil.

    After a stop by Ctrl-C (exit code 130), the interpreter's own teardown let torch's native
    threads abort the process (exit code 134) or a late Ctrl-C print a traceback from an exit
    handler, after every output had been written whole. So once stopped, further Ctrl-C are
    ignored, the exit handlers run, and the process leaves without the native teardown.
    """
    _COMMAND_LINE["running"] = True
    try:
        main()
    except SystemExit as stop:
        if stop.code != EXIT_INTERRUPTED:
            raise
        _leave_interrupted()


def _leave_interrupted() -> None:
    """Run the exit handlers with Ctrl-C ignored, then leave with 130 before the native teardown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INTERRUPTED)


__all__ = [
    "main",
    "command_line",
    "EXIT_OK",
    "EXIT_UNPROTECTED",
    "EXIT_USAGE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
]
