"""What a batch shows while it runs: a live bar on a terminal, plain lines otherwise, or nothing.

Everything here goes to stderr, so stdout carries only results (per-file lines, the final
table, or the ``--json`` / ``--jsonl`` documents) and stays parseable. The bar (rich) is used
when stderr is a terminal; piped or redirected, the same information comes as plain lines, at
most one every `PLAIN_EVERY_S` seconds while a cloak optimises.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from facecloak.batch import BatchPlan, ProgressEvent
from facecloak.errors import shown_path

PROGRESS_MODES = ("auto", "bar", "plain", "none")

PLAIN_EVERY_S = 5.0
"""Shortest interval between two plain progress lines of the same stage (optimisation steps)."""


def resolve_mode(mode: str, stream: TextIO | None = None) -> str:
    """Resolve "auto": "bar" when ``stream`` (default stderr) is a terminal, else "plain"."""
    if mode != "auto":
        return mode
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "plain"


def format_seconds(seconds: float | None) -> str:
    """0:01:05 style, or "?" when unknown.

    Example:
        >>> format_seconds(65.2)
        '0:01:05'
    """
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def describe(event: ProgressEvent) -> str:
    """One line saying where the batch is (no newline)."""
    parts = [f"photos {event.files_done}/{event.files_total}"]
    if event.faces_total is not None:
        parts.append(f"faces {event.faces_done}/{event.faces_total}")
    if event.stage == "load":
        parts.insert(0, "loading the face detector")
    elif event.stage == "detect":
        parts.insert(0, "detecting faces")
    elif event.stage in ("protect", "check") and event.steps:
        if event.stage == "check":
            parts.append(f"step {event.step}/{event.steps} done, checking after a JPEG 75 re-encode")
        elif event.step == 0:
            parts.append("optimising")
        else:
            parts.append(f"step {event.step}/{event.steps}")
        if event.distance is not None:
            aim = f" (aim {event.aim:g}x)" if event.aim else ""
            parts.append(f"distance {event.distance:.2f}x threshold{aim}")
    if event.eta_seconds is not None:
        parts.append(f"ETA {format_seconds(event.eta_seconds)}")
    if event.current:
        more = len(event.current) - 3
        names = ", ".join(shown_path(name) for name in event.current[:3])  # one line, whatever the names
        parts.append(names + (f" +{more}" if more > 0 else ""))
    return ", ".join(parts)


class BatchDisplay:
    """Progress on stderr for one batch; call it with each `ProgressEvent`.

    Args:
        command: shown first on every line ("cloak", "anonymize").
        mode: "bar", "plain" or "none" ("auto" is resolved here against stderr).
        on_file: called with every finished file's event (the CLI prints its line there).
    """

    def __init__(self, command: str, mode: str = "auto", on_file=None) -> None:
        self.command = command
        self.mode = resolve_mode(mode)
        self.on_file = on_file
        self._bar = None
        self._task = None
        self._last_line = 0.0
        self._last_stage: tuple | None = None
        self._plan_shown = False

    def __enter__(self) -> BatchDisplay:
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            self._bar = Progress(  # on a narrow terminal the status is cut at its end (file names)
                TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=20),
                TimeElapsedColumn(),
                TextColumn(
                    "{task.fields[status]}",
                    markup=False,
                    table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
                ),
                console=Console(stderr=True),
                transient=True,
                expand=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.command, total=1000, status="planning")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def __call__(self, event: ProgressEvent) -> None:
        """Show ``event``: the plan line, a bar update or a plain line, or hand a file to ``on_file``."""
        if event.stage == "file":
            if self.on_file is not None:
                self.on_file(event)
        elif event.stage == "plan" and event.plan is not None:
            self.show_plan(event.plan)
        else:
            self._progress(event)

    def show_plan(self, plan: BatchPlan) -> None:
        """Say once, before any work, how many photos will be done, skipped and failed."""
        if not self._plan_shown and not plan.empty:
            self._say(plan_line(self.command, plan))
        self._plan_shown = True

    def status(self, text: str) -> None:
        """Say what is happening outside a batch's own events (loading models)."""
        if self._bar is not None:
            self._bar.update(self._task, status=text)
        elif self.mode == "plain":
            self._say(f"{self.command}: {text}")

    def _progress(self, event: ProgressEvent) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=int(1000 * event.fraction), status=describe(event))
            return
        if self.mode != "plain":
            return
        now = time.monotonic()
        new_stage = (event.stage, event.current) != self._last_stage
        if new_stage or now - self._last_line >= PLAIN_EVERY_S:
            self._last_stage = (event.stage, event.current)
            self._say(f"{self.command}: {describe(event)}")

    def _say(self, line: str) -> None:
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)
        self._last_line = time.monotonic()


def plan_line(command: str, plan: BatchPlan) -> str:
    """The line said before any work: how many photos to do, skip and fail."""
    line = f"{command}: {len(plan.todo)} photo(s) to do"
    if plan.written_before:  # a resumed run: they were counted as to do, and took no time
        line += f" ({plan.written_before} of them done by an earlier run: skipped if unchanged)"
    if plan.existing:
        line += f", {len(plan.existing)} skipped: output exists (--overwrite redoes them)"
    if plan.failed:  # unreadable, or an output that would clash: not only "cannot be read"
        line += f", {len(plan.failed)} failed already (named at the end)"
    return line
