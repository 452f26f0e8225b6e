"""`rewrite diff ORIGINAL REWRITTEN --inputs FILE`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rewrite.cli import render
from rewrite.cli.optimize import MODEL_HELP, REMOTE_CODE_HELP, TRUST_HELP, _example_inputs, trust_kinds


def diff(
    original: Annotated[str, typer.Argument(help=MODEL_HELP)],
    rewritten: Annotated[str, typer.Argument(help="the rewritten model, in any form MODEL accepts")],
    inputs: Annotated[Optional[Path], typer.Option(help="inputs saved with torch.save")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="random inputs, e.g. 8,3,32,32")] = None,
    eval: Annotated[Optional[Path], typer.Option("--eval", help='{"inputs": ..., "targets": ...} for --metric')] = None,
    metric: Annotated[Optional[str], typer.Option(help="rel-l2 | top1 | cosine | embedding-cosine | perplexity (token ids; targets optional)")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_HELP)] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=REMOTE_CODE_HELP)] = False,
) -> None:
    """Outputs, latency, size and accuracy of two models side by side."""
    from rewrite import api, calibration  # torch: only once the command runs
    example = _example_inputs(inputs, input_shape)
    eval_data = calibration.load_file(eval, "eval") if eval else None
    trusted = trust_kinds(trust_pickle, trust_remote_code)
    with render.progress() as say:
        say("measuring both models (alternating rounds)")
        report = api.diff(original, rewritten, example, eval=eval_data, metric=metric, trusted=trusted)
    render.show_report(report)
