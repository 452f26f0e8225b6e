"""The `rewrite` command: typer glue over the library API, one file per command group."""
from __future__ import annotations

import warnings

import typer

from rewrite.cli import diff, optimize, passes
from rewrite.cli.render import user_errors

app = typer.Typer(help="Capture a PyTorch model, apply verified rewrite passes, measure, emit .pt2 / ONNX.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command("optimize")(user_errors(optimize.optimize))
app.command("diff")(user_errors(diff.diff))
app.add_typer(passes.app, name="passes")


def main() -> None:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal deprecations, not the user's
    app()
