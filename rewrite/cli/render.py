"""Rich rendering of a RunReport for the terminal, and the progress display for long work."""
from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import typer

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

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
        t.add_row(*row)
    return t


def show_report(report: RunReport) -> None:
    console.print(f"[bold]pipeline[/] {report.pipeline}   [bold]capture[/] {report.capture}")
    if report.compared:
        console.print(f"[bold]compared[/] {report.compared}")
    for w in report.warnings:
        errors.print(f"[yellow]warning:[/] {w}")
    if report.records:
        console.print(table(report.pass_rows(), "passes"))
        for name, where, why in report.skip_lines():
            console.print(f"  [dim]{name} skipped {where}: {why}[/]")
    if report.measurements:
        console.print(table(report.measurement_rows(), "before / after"))
    for label, ops in report.profiles.items():
        console.print(f"[bold]where the time goes[/] ({label}): " + ", ".join(
            f"{op} {ms:.3g} ms ({share:.0%})" for op, ms, share in ops[:5]), markup=True, highlight=False)
    for line in report.verdicts():
        style = "bold red" if "SLOWER" in line else ""
        console.print(f"[{style}]{line}[/]" if style else line)


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


def _lost_peer(exc: BaseException) -> bool:
    """A collective failed because another process of a torchrun run died or stopped answering."""
    import torch.distributed as dist
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and isinstance(exc, (dist.DistError, RuntimeError)) and (
        isinstance(exc, dist.DistError) or any(s in str(exc) for s in ("Connection closed by peer", "Timed out",
                                                                         "Connection reset by peer", "gloo")))


def user_errors(command: Callable) -> Callable:
    """Bad input → `error: <one line>` on stderr and exit code 2; a bug → its one-line cause and exit 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RewriteError as exc:
            typer.echo(f"error: {first_line(exc, 400)}", err=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort):
            raise  # a command's own exit code
        except Exception as exc:
            if os.environ.get("REWRITE_TRACEBACK"):
                raise
            if _lost_peer(exc):
                typer.echo(f"error: rank {os.environ.get('RANK', '?')} lost contact with another process of this "
                           f"torchrun run ({first_line(exc, 120)}); nothing was written to the output folder",
                           err=True)
                raise typer.Exit(1) from None
            typer.echo(f"error: unexpected {type(exc).__name__}: {first_line(exc, 200)} (a bug in rewrite or a "
                       "plugin; REWRITE_TRACEBACK=1 shows where)", err=True)
            raise typer.Exit(1) from None
    return wrapper
