"""`rewrite optimize MODEL --passes SPEC`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rewrite import spec
from rewrite.errors import RewriteError
from rewrite.cli import render

MODEL_HELP = ("a .pt2 ExportedProgram (carries its example inputs), package.module:factory / file.py:factory "
              "returning a module or (module, example_inputs), or a module saved with torch.save(model) "
              "(runs code from the file: needs --trust-pickle), or a Hugging Face checkpoint folder (config.json + "
              "safetensors; rewritten block by block, weights read one block at a time)")
TRUST_HELP = "load a pickled module (or a .pt2 holding pickled objects): runs code stored in the file"
REMOTE_CODE_HELP = ("load a checkpoint or tokenizer whose config.json names its own Python files (auto_map): runs "
                    "that code")


def optimize(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    passes: Annotated[Optional[str], typer.Option("--passes", "-p", help="pipeline, e.g. fold-bn,reparam or "
                                                  "dgq{group=128}")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="a recipe.json an earlier run (or rewrite tune) wrote: its "
                                                   "pipeline and seed, reproduced")] = None,
    inputs: Annotated[Optional[Path], typer.Option(help="example inputs saved with torch.save")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="random example inputs, e.g. 8,3,32,32")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="calibration data saved with torch.save")] = None,
    eval: Annotated[Optional[Path], typer.Option("--eval", help='{"inputs": ..., "targets": ...} for --metric')] = None,
    metric: Annotated[Optional[str], typer.Option(help="rel-l2 | top1 | cosine | embedding-cosine | perplexity (token ids; targets optional)")] = None,
    calib_text: Annotated[Optional[Path], typer.Option(help="calibration text: UTF-8, or .jsonl with a \"text\" "
                                                       "field; tokenized into --seq-len windows")] = None,
    eval_text: Annotated[Optional[Path], typer.Option(help="held-out text scored by perplexity (windows never "
                                                      "overlap calibration's)")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="tokenizer name or folder for text [the model's "
                                                     "folder]")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per text window")] = 512,
    emit: Annotated[str, typer.Option(help="artifacts besides .pt2: onnx, compiled")] = "",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder [rewrite-out/<model>]")] = None,
    force: Annotated[bool, typer.Option(help="replace what an earlier rewrite run wrote in the output folder")] = False,
    strict: Annotated[bool, typer.Option(help="a pass that breaks its contract is an error, not a rollback")] = False,
    seed: Annotated[int, typer.Option(help="seed for synthetic data and randomized passes")] = 0,
    recover: Annotated[Optional[str], typer.Option(help="distill approximate rewrites: [local,]steps=N[,lr=X] (local: each swapped layer alone)")] = None,
    budget: Annotated[Optional[str], typer.Option(help="factorizing passes (fwsvd, lowrank): params=F keeps that fraction of their weights; sqnr=DB or metric=Y searches per-layer ranks within it")] = None,
    calib_batches: Annotated[int, typer.Option(help="at most this many calibration batches")] = 8,
    latency: Annotated[bool, typer.Option(help="measure latency before and after")] = True,
    floor: Annotated[Optional[str], typer.Option(help="metric=Y: accept approximate passes by the --metric "
                                                 "score on --eval data instead of their SQNR floor")] = None,
    mask_input: Annotated[Optional[str], typer.Option(help="the input whose 0s mark padding not to compare "
                                                      "[auto: attention_mask]")] = None,
    profile: Annotated[bool, typer.Option(help="add the top ops by self time (eager torch, onnxruntime) to the "
                                               "report")] = False,
    blockwise: Annotated[bool, typer.Option(help="rewrite the stack of repeated blocks one block at a time "
                                                 "(always so for a checkpoint folder)")] = False,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_HELP)] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=REMOTE_CODE_HELP)] = False,
    pass_timeout: Annotated[Optional[float], typer.Option(help="stop and roll back a pass whose rewrite runs "
                                                          "longer than this many seconds")] = None,
    allow_artifact_errors: Annotated[bool, typer.Option(help="exit 0 even when an artifact failed to export or "
                                                        "differs from the verified model")] = False,
) -> None:
    """Rewrite MODEL with the given passes, verify each, measure, and write artifacts and a report."""
    passes, seed = _pipeline(passes, recipe, seed)
    spec.parse_spec(passes)  # a typo fails before any model file is read, and before torch loads
    from rewrite import api, distributed  # torch: only once the command runs
    example = _example_inputs(inputs, input_shape)
    out_dir = out or Path("rewrite-out") / _stem(model)
    calib_data = _data(calib, calib_text, "calib")
    eval_data = _data(eval, eval_text, "eval")
    trusted = trust_kinds(trust_pickle, trust_remote_code)
    with render.progress() as say:
        result = api.optimize(model, example, passes, calib=calib_data, eval=eval_data, metric=metric,
                              emit=emit, out=out_dir, force=force, strict=strict, seed=seed,
                              recover=recover, budget=budget, calib_batches=calib_batches,
                              measure_latency=latency, trusted=trusted, floor=floor, mask_input=mask_input,
                              blockwise=blockwise, profile=profile, progress=say, tokenizer=tokenizer,
                              seq_len=seq_len, pass_timeout=pass_timeout,
                              allow_artifact_errors=True)  # reported below: exit 3
    if distributed.rank() != 0:
        return  # under torchrun, rank 0 alone reports and writes
    render.show_report(result.report)
    render.console.print(f"wrote {out_dir}/ (report.md, report.json, recipe.json)", markup=False)
    problems = result.report.problems()
    if problems:
        word = "warning" if allow_artifact_errors else "error"
        render.errors.print(f"{word}: {'; '.join(problems)}" + ("" if allow_artifact_errors else
                            " (--allow-artifact-errors accepts it)"), markup=False, soft_wrap=True)
        if not allow_artifact_errors:
            raise typer.Exit(3)


def _pipeline(passes: str | None, recipe: Path | None, seed: int) -> tuple[str, int]:
    """--passes, or the pipeline and seed of --recipe (not both)."""
    if (passes is None) == (recipe is None):
        raise RewriteError("give the pipeline with --passes SPEC, or a recipe.json with --recipe (one of them)")
    if recipe is None:
        return passes, seed
    from rewrite.tune import recipe_spec
    return recipe_spec(recipe)


def trust_kinds(pickle: bool, remote_code: bool) -> list[str]:
    """The flags as the API's `trusted=` kinds, each announced before any file is read."""
    from rewrite import loading
    for on, notice in ((pickle, loading.PICKLE_NOTICE), (remote_code, loading.REMOTE_CODE_NOTICE)):
        if on:
            render.errors.print(notice, markup=False)
    return [kind for on, kind in ((pickle, "pickle"), (remote_code, "remote-code")) if on]


def _data(tensors: Path | None, text_file: Path | None, what: str) -> object:
    """--calib / --eval (token tensors) or --calib-text / --eval-text (a text, as a one-string list)."""
    from rewrite import calibration, text
    if tensors is not None and text_file is not None:
        raise RewriteError(f"--{what} and --{what}-text both given: give one of them")
    name = "calibration" if what == "calib" else "eval"
    if text_file is not None:
        return [text.read(text_file, name)]
    data = calibration.load_file(tensors, name) if tensors else None
    if text.is_texts(data):
        raise RewriteError(f"{name} data has the wrong structure (a list of strings): give text with "
                           f"--{what}-text FILE, or token ids as tensors")
    return data


def _example_inputs(inputs: Path | None, shape: str | None) -> object:
    """The inputs given on the command line, or None to use those the model file or factory bundles."""
    from rewrite import calibration, loading
    if inputs is not None:
        return calibration.load_file(inputs, "inputs")
    if shape is not None:
        return loading.input_shapes(shape)
    return None


def _stem(model: str) -> str:
    name = model.rpartition(":")[2] if ":" in model and not Path(model).exists() else Path(model).stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
