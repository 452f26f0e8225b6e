"""The `rewrite` command: typer glue over the library API, one file per command group.

Every way a command can fail ends in one `error:` line on stderr: bad input and unmet preconditions
(RewriteError) and malformed command lines (click's usage errors) exit 2; a bug in rewrite or a
plugin exits 1 with its one-line cause (REWRITE_TRACEBACK=1 shows the traceback).
"""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")  # third-party deprecation chatter; our own warnings are in the report

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from rewrite.cli import diff, optimize, passes, tune  # noqa: E402
from rewrite.cli.render import say_error, user_errors  # noqa: E402


# Click's exception base, whether typer vendors click (0.2x) or uses the click package (older releases).
UsageErrors = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """Click's usage errors (a missing option, `--seed abc`) as one `error:` line instead of a boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageErrors as exc:
            code = _usage_error(exc)
        except typer.Abort:
            code = 130
        sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: Exception) -> int:
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # `rewrite` or `rewrite passes` alone: typer showed the help
        return 0
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    words = (ctx.command_path.split()[1:] if ctx else [])
    command = " ".join(["rewrite", *words, "--help"])
    typer.echo(f"error: {message} (see `{command}`)", err=True)
    return 2


app = typer.Typer(cls=OneLineErrors, help="Capture a PyTorch model, apply verified rewrite passes, measure, "
                  "emit .pt2 / ONNX.", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command("optimize")(user_errors(optimize.optimize))
app.command("diff")(user_errors(diff.diff))
app.command("tune")(user_errors(tune.tune))
app.add_typer(passes.app, name="passes")


def main() -> None:
    """Console entry point. SIGTERM unwinds like Ctrl-C, so no half-written output is left behind."""
    signal.signal(signal.SIGTERM, _stopped)
    app()


def _stopped(*_: object) -> None:
    """One line, then unwind. Under torchrun, SIGTERM is how the launcher ends the other processes of a run
    in which one process failed."""
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    why = (f"rank {rank} was stopped by torchrun: another process of this run failed (torchrun's summary names "
           "it)" if rank is not None else "stopped by SIGTERM")
    say_error(f"{why}; nothing was written to the output folder")
    sys.exit(143)
