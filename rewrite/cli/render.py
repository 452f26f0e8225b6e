"""Rich rendering of a RunReport for the terminal, and the progress display for long work."""
from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import typer

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from rewrite.errors import RewriteError, first_line
from rewrite.report import RunReport


def _console(stderr: bool) -> Console:
    probe = Console(stderr=stderr)
    # Pipes and CI logs default to 80 columns, which folds every number in the tables.
    return probe if probe.is_terminal else Console(stderr=stderr, width=160)


console = _console(stderr=False)
errors = _console(stderr=True)


def table(rows: list[list[str]], title: str) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for name in rows[0]:
        t.add_column(name, overflow="fold")
    for row in rows[1:]:
        t.add_row(*(Text(cell) for cell in row))  # plain text: a reason may quote "[...]" from a library
    return t


def show_report(report: RunReport) -> None:
    """Every text that comes from the run (reasons, layer names, warnings) is escaped: an error quoted from a
    library, such as gloo's "[/pytorch/.../pair.cc:553]", is text, not rich markup."""
    console.print(f"[bold]pipeline[/] {escape(report.pipeline)}   [bold]capture[/] {escape(report.capture)}")
    if report.compared:
        console.print(f"[bold]compared[/] {escape(report.compared)}")
    for w in report.warnings:
        errors.print(f"[yellow]warning:[/] {escape(w)}")
    if report.records:
        console.print(table(report.pass_rows(), "passes"))
        for name, where, why in report.skip_lines():
            console.print(f"  [dim]{escape(f'{name} skipped {where}: {why}')}[/]")
    if report.measurements:
        console.print(table(report.measurement_rows(), "before / after"))
    for label, ops in report.profiles.items():
        console.print(f"[bold]where the time goes[/] ({escape(label)}): " + escape(", ".join(
            f"{op} {ms:.3g} ms ({share:.0%})" for op, ms, share in ops[:5])), highlight=False)
    for line in report.verdicts():
        style = "bold red" if "SLOWER" in line else ""
        console.print(f"[{style}]{escape(line)}[/]" if style else escape(line))


@contextmanager
def progress() -> Iterator:
    """The current stage, a bar when the stage counts steps (layers searched, recovery steps), and the
    elapsed time; yields the callback the library calls: (message, done=None, total=None).

    A live display only on a terminal: in a pipe or CI log it is noise (and leaves a blank line behind); there,
    `heartbeat` lines instead."""
    if not errors.is_terminal:
        yield heartbeat(errors)
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=errors, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(message: str, done: int | None = None, total: int | None = None) -> None:
            bar.tasks[0].total = total  # rich's update() ignores total=None: a stage that counts nothing
            bar.update(task, description=message, completed=done or 0)
        yield update


HEARTBEAT_S = 15.0  # in a pipe or a log: a plain progress line at most this often


def heartbeat(out: Console) -> Callable:
    """The progress callback where no live display can go (a pipe, a CI log, nohup): a `progress:` line at most
    every HEARTBEAT_S seconds, so a long search shows where it is (SmolLM2's dgq run was silent for minutes);
    work shorter than that prints nothing."""
    start = last = time.monotonic()

    def update(message: str, done: int | None = None, total: int | None = None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < HEARTBEAT_S:
            return
        last = now
        count = f" ({done}/{total})" if total else ""
        out.print(f"progress: {message}{count}, {now - start:.0f} s", markup=False, highlight=False, soft_wrap=True)
    return update


_said_error = False


def say_error(line: str) -> None:
    """`error: <line>` on stderr, once per command: under torchrun, the SIGTERM that stops a rank can land while
    that rank is already reporting its own failure, and the user must read one cause, not two."""
    global _said_error
    if not _said_error:
        _said_error = True
        typer.echo(f"error: {line}", err=True)


def user_errors(command: Callable) -> Callable:
    """Bad input → `error: <one line>` on stderr and exit code 2; a bug → its one-line cause and exit 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        global _said_error
        _said_error = False  # once per command: tests run many in one process
        try:
            return command(*args, **kwargs)
        except RewriteError as exc:
            say_error(first_line(exc, 400))
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort):
            raise  # a command's own exit code
        except Exception as exc:
            if os.environ.get("REWRITE_TRACEBACK"):
                raise
            # imported here: `rewrite --help` answers without loading torch
            from rewrite import distributed
            if distributed.lost_peer(exc):
                say_error(f"rank {os.environ.get('RANK', '?')} lost contact with another process of this torchrun "
                          f"run ({first_line(exc, 120)}); nothing was written to the output folder")
                raise typer.Exit(1) from None
            say_error(f"unexpected {type(exc).__name__}: {first_line(exc, 200)} (a bug in rewrite or a "
                      "plugin; REWRITE_TRACEBACK=1 shows where)")
            raise typer.Exit(1) from None
    return wrapper
