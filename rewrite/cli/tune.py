"""`rewrite tune MODEL --target latency=0.5`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rewrite.cli import render
from rewrite.cli.optimize import MODEL_HELP, REMOTE_CODE_HELP, TRUST_HELP, _data, _example_inputs, _stem, trust_kinds


def tune(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    target: Annotated[str, typer.Option(help="latency=F: the rewritten model's time as a fraction of the "
                                        "original's")] = "latency=0.5",
    time: Annotated[str, typer.Option("--time", help="how long to search, e.g. 10m, 90s")] = "10m",
    backend: Annotated[str, typer.Option(help="where latency is timed: torch (eager) or onnxruntime")] = "torch",
    floor: Annotated[Optional[str], typer.Option(help="metric=Y: accept approximate passes by --metric on --eval "
                                                 "data instead of their SQNR floor")] = None,
    inputs: Annotated[Optional[Path], typer.Option(help="example inputs saved with torch.save")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="random example inputs, e.g. 8,3,32,32")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="calibration data saved with torch.save")] = None,
    calib_text: Annotated[Optional[Path], typer.Option(help="calibration text (UTF-8 or .jsonl)")] = None,
    eval: Annotated[Optional[Path], typer.Option("--eval", help='{"inputs": ..., "targets": ...} for --metric')] = None,
    eval_text: Annotated[Optional[Path], typer.Option(help="held-out text scored by perplexity")] = None,
    metric: Annotated[Optional[str], typer.Option(help="rel-l2 | top1 | cosine | embedding-cosine | perplexity: what the search "
                                                  "maximizes (else output SQNR against the original)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder [rewrite-out/<model>-tuned]")] = None,
    force: Annotated[bool, typer.Option(help="replace what an earlier rewrite run wrote in the output folder")] = False,
    seed: Annotated[int, typer.Option(help="seed for synthetic data and randomized passes")] = 0,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_HELP)] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=REMOTE_CODE_HELP)] = False,
) -> None:
    """Search pipelines of the registered passes for the most accurate one that meets --target, and write it."""
    from rewrite import tune as search
    goal, limit = search.parse_target(target), search.parse_time(time)  # bad values fail before any loading
    search.check_backend(backend)
    trusted = trust_kinds(trust_pickle, trust_remote_code)
    out_dir = out or Path("rewrite-out") / f"{_stem(model)}-tuned"
    with render.progress() as say:
        result = search.tune(model, _example_inputs(inputs, input_shape), target=f"latency={goal:g}",
                             time_limit=limit, calib=_data(calib, calib_text, "calib"),
                             eval=_data(eval, eval_text, "eval"), metric=metric, floor=floor, out=out_dir,
                             force=force, seed=seed, trusted=trusted, backend=backend, progress=say)
    render.show_report(result.report)
    chosen = result.report.search
    render.console.print(f"chose {chosen['kept']} ({'meets' if chosen['met'] else 'does NOT meet'} {target}); "
                         f"wrote {out_dir}/ (report.md with the front, recipe.json: rewrite optimize MODEL --recipe "
                         f"{out_dir}/recipe.json reproduces it)", markup=False, soft_wrap=True)
