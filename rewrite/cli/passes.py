"""`rewrite passes list` / `rewrite passes show NAME`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rewrite import registry
from rewrite.cli import render

app = typer.Typer(help="Registered passes, built-in or from plugins.", no_args_is_help=True)


@app.command("list")
@render.user_errors
def list_passes(
    markdown: Annotated[bool, typer.Option(help="a Markdown table with each pass's contract (imports passes)")] = False,
    builtin: Annotated[bool, typer.Option(help="only the passes that ship with rewrite")] = False,
) -> None:
    """Every registered pass with the distribution that provides it (reads metadata only)."""
    entries = {n: e for n, e in registry.registered().items() if not builtin or e.distribution.startswith("rewrite ")}
    if markdown:
        render.console.print(markdown_table(list(entries)), markup=False, soft_wrap=True)
        return
    rows = [["pass", "from", "defined in"]] + [[e.name, e.distribution, e.value] for e in entries.values()]
    render.console.print(render.table(rows, f"{len(entries)} passes"))


@app.command("show")
@render.user_errors
def show(name: Annotated[str, typer.Argument(help="a pass name from `rewrite passes list`")]) -> None:
    """A pass's contract, options (types and defaults), paper and what it applies to."""
    cls = registry.load_pass(name)
    entry = registry.registered()[name]
    render.console.print(f"[bold]{cls.name}[/]  ({entry.distribution})\n{cls.summary}\n"
                         f"paper: {cls.paper}\ncontract: {cls.contract_text()}\n"
                         f"applies to: {cls.applies_to}\ncalibration: {cls.calibration_text()}\n"
                         f"works without a graph: {cls.level == 'module'}", markup=True)
    rows = [["option", "type", "default"]] + [[n, t, repr(d)] for n, t, d in cls.options()]
    if len(rows) > 1:
        render.console.print(render.table(rows, "options"))


@app.command("explain")
@render.user_errors
def explain(
    name: Annotated[str, typer.Argument(help="a pass name from `rewrite passes list`")],
    model: Annotated[str, typer.Option("--model", help="the model, in any form `rewrite optimize` takes")],
    node: Annotated[Optional[str], typer.Option(help="a graph node name: why the pattern does not end there")] = None,
    inputs: Annotated[Optional[Path], typer.Option(help="example inputs saved with torch.save")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="random example inputs, e.g. 8,3,32,32")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="load a pickled module")] = False,
) -> None:
    """Where a pass's patterns match in MODEL, where they were refused and why (--node: why not there)."""
    from rewrite import api
    from rewrite.cli.optimize import _example_inputs
    for line in api.explain(model, _example_inputs(inputs, input_shape), name, node, trusted=trust_pickle):
        render.console.print(line, markup=False, soft_wrap=True)


def markdown_table(names: list[str]) -> str:
    """The README's pass table, generated from each pass's metadata so the docs cannot drift."""
    lines = ["| pass | what it does | contract | calibration | paper |", "|---|---|---|---|---|"]
    for name in names:
        cls = registry.load_pass(name)
        lines.append(f"| `{name}` | {cls.summary} | {cls.contract_text()} | "
                     f"{cls.calibration_text()} | {cls.paper} |")
    return "\n".join(lines)
