"""`rewrite passes list` / `rewrite passes show NAME`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from rewrite import registry
from rewrite.errors import RewriteError
from rewrite.pass_base import written
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
    render.console.print(f"[bold]{escape(cls.name)}[/]  " + escape(  # a plugin's text may hold "[...]"
        f"({entry.distribution})\n{cls.summary}\npaper: {cls.paper}\ncontract: {cls.contract_text()}\n"
        f"applies to: {cls.applies_to}\ncalibration: {cls.calibration_text()}\n"
        f"works without a graph: {_without_graph(cls)}"))
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
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="run the Python files a "
                                                    "checkpoint's config.json names")] = False,
) -> None:
    """Where a pass's patterns match in MODEL, where they were refused and why (--node: why not there)."""
    from rewrite import api
    from rewrite.cli.optimize import _example_inputs, trust_kinds
    trusted = trust_kinds(trust_pickle, trust_remote_code)
    for line in api.explain(model, _example_inputs(inputs, input_shape), name, node, trusted=trusted):
        render.console.print(line, markup=False, soft_wrap=True)


@app.command("docs")
@render.user_errors
def docs(folder: Annotated[Path, typer.Argument(help="where the pages go, e.g. docs/passes")]) -> None:
    """Write one Markdown page per built-in pass, generated from its metadata and docstring."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in builtin_passes():
        (folder / f"{name}.md").write_text(markdown_page(name))
    render.console.print(f"wrote {len(builtin_passes())} pages to {folder}", markup=False)


def builtin_passes() -> list[str]:
    return [n for n, e in registry.registered().items() if e.distribution.startswith("rewrite ")]


def markdown_table(names: list[str], links: str | None = None) -> str:
    """The README's pass table, generated from each pass's metadata so the docs cannot drift (`links`: the
    folder of the pass pages, to link each name to its page)."""
    lines = ["| pass | what it does | contract | calibration | paper |", "|---|---|---|---|---|"]
    for name in names:
        label = f"[`{name}`]({links}/{name}.md)" if links else f"`{name}`"
        try:
            cls = registry.load_pass(name)
        except RewriteError as exc:  # a broken plugin is a row that says so; the other passes still list
            lines.append(f"| {label} | {exc} | | | |")
            continue
        lines.append(f"| {label} | {cls.summary} | {cls.contract_text()} | "
                     f"{cls.calibration_text()} | {cls.paper} |")
    return "\n".join(lines)


def markdown_page(name: str) -> str:
    """A pass's page: what it does, its contract and paper, its options, the rewrite as its module states it."""
    import inspect
    cls = registry.load_pass(name)
    doc = inspect.cleandoc(inspect.getmodule(cls).__doc__ or "").strip()
    options = "\n".join(f"| `{n}` | `{t}` | `{d!r}` |" for n, t, d in cls.options())
    calib = " --calib calib.pt" if cls.needs_calibration else ""
    example = "{" + ",".join(f"{n}={written(d)}" for n, _t, d in cls.options()[:2]) + "}" if cls.options() else ""
    return "\n".join([
        f"# `{name}`: {cls.summary}", "",
        "<!-- generated by `rewrite passes docs docs/passes`; tests/test_readme.py keeps it in sync -->", "",
        "| | |", "|---|---|", f"| paper | {cls.paper} |", f"| contract | {cls.contract_text()} |",
        f"| applies to | {cls.applies_to} |", f"| calibration | {cls.calibration_text()} |",
        f"| works without a graph | {_without_graph(cls)} |", "",
        "## Options", "", "| option | type | default |", "|---|---|---|", options or "| (none) | | |", "",
        f"Options go in braces in the pipeline, e.g. `{name}{example}` (these are the defaults).", "",
        "## Example", "", "```bash", f"rewrite optimize model.pt2 --passes {name}{calib} -o out", "```", "",
        "## The rewrite", "", doc, ""])


def _without_graph(cls) -> str:
    """Module-level passes run on an eager module; one that only reads the graph says so (`graph_note`)."""
    return cls.graph_note or ("yes" if cls.level == "module" else "no (needs a captured graph)")
