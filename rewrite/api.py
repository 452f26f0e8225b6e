"""The library API the CLI wraps: optimize, diff, explain, load. Each is a short script of steps that live
in the modules owning them: inputs (model, inputs, data), modes (whole model, block by block, a checkpoint
folder), judge (the before/after diff), emit.write (artifacts)."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewrite import (calibration, capture, checkpoint, distributed, inputs as steps, judge, measure, modes, registry,
                     spec, text, verify)
from rewrite.emit import hf, write
from rewrite.emit.hf import guard_save_pretrained
from rewrite.errors import ArtifactError, InvalidValue, RewriteError
from rewrite.loading import Trust
from rewrite.modes import Progress, Result  # noqa: F401  (rewrite.Result)
from rewrite.output import OutputFolder
from rewrite.report import RunReport


def _check_arguments(**values: Any) -> None:
    """Whole-number arguments of the API, checked before any work: InvalidValue with a sentence, never a bare
    ValueError from deep inside (`seed="abc"`)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 1):
            least = "a whole number" if name == "seed" else "a whole number ≥ 1"
            raise InvalidValue(f"{name}={value!r}: give {least}, e.g. {name}={0 if name == 'seed' else 8}")


def _check_flags(**values: Any) -> None:
    """Yes/no arguments are booleans: `strict="no"` would otherwise read as True."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise InvalidValue(f"{name}={value!r}: give True or False")


def _check_paths(**values: Any) -> None:
    for name, value in values.items():
        if value is not None and not isinstance(value, (str, Path)):
            raise InvalidValue(f"{name}={value!r}: give a folder path (str or pathlib.Path) or None")


def _check_timeout(seconds: Any) -> None:
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not 0 < seconds < float("inf")):
        raise InvalidValue(f"pass_timeout={seconds!r}: give a number of seconds > 0, e.g. pass_timeout=600, or None")


def optimize(model: nn.Module | str, example_inputs: Any, passes: str | list, *, calib: Any = None,
             eval: Any = None, metric: str | None = None, emit: str | list[str] | None = None,
             out: str | Path | None = None, force: bool = False, strict: bool = False, seed: int = 0,
             recover: str | None = None, budget: str | None = None,
             calib_batches: int = calibration.MAX_BATCHES, measure_latency: bool = True,
             trusted: Any = False, floor: str | None = None, mask_input: str | None = None,
             blockwise: bool = False, profile: bool = False, progress: Progress | None = None,
             allow_artifact_errors: bool = False, tokenizer: Any = None, seq_len: int = text.SEQ_LEN,
             pass_timeout: float | None = None, search: dict | None = None, reuse: modes.Reuse | None = None
             ) -> Result:
    """Capture `model`, run `passes` with verification, measure before/after, and emit artifacts to `out`.

    `model` is a module or a spec for `rewrite.load` (then `example_inputs=None` takes the inputs a .pt2 or
    factory bundles; a pickled module needs `trusted=True` or "pickle", a checkpoint or tokenizer whose config
    names its own Python code `trusted=True` or "remote-code"). The user's model is never modified; every
    input is checked before work starts; `out` appears complete or not at all. Raises RewriteError with a
    one-line message on bad input. `blockwise=True` rewrites a transformer stack one block at a time
    (`rewrite.blockwise`); `profile=True` adds the top ops by self time of both models (and of the ONNX
    file when emitted) to the report. An artifact that failed to export or differs from the verified model
    raises ArtifactError after the output folder is written (its `.result` is the Result), unless
    `allow_artifact_errors=True`; the CLI exits 3 there. `calib` and `eval` may be lists of strings: they
    are tokenized (`tokenizer`, else the one beside the model's weights) into windows of `seq_len` tokens,
    and `eval` text is scored by perplexity unless `metric` says otherwise (`rewrite.text`). A pass whose
    `call` runs past `pass_timeout` seconds is stopped and rolled back (on the main thread). `search`:
    what `rewrite.tune` tried (its Pareto front), kept in the report. `reuse`: a `modes.Reuse` that runs on
    the same model, inputs and data (only the passes differ) share: the checks, the capture, the original's
    outputs and score are made once (whole-model runs).
    """
    say = progress or (lambda message, done=None, total=None: None)
    _check_arguments(seed=seed, seq_len=seq_len, calib_batches=calib_batches)
    _check_flags(force=force, strict=strict, measure_latency=measure_latency, blockwise=blockwise, profile=profile,
                 allow_artifact_errors=allow_artifact_errors)
    _check_paths(out=out)
    _check_timeout(pass_timeout)
    trust = Trust.of(trusted)
    distributed.init_from_env()  # under torchrun: recovery runs data-parallel, rank 0 alone writes
    pass_list = spec.with_budget(spec.parse_spec(passes), budget)  # cheap checks before any loading
    distributed.agree({"passes": spec.format_spec(pass_list), "seed": seed, "recover": recover,
                       "calib_batches": calib_batches, "seq_len": seq_len, "output folder": str(out),
                       "model": model if isinstance(model, (str, Path)) else type(model).__name__,
                       "calibration data": calib, "example inputs": example_inputs})
    emitters, recovery = write.emitters(emit, out), spec.recover_spec(recover)
    if checkpoint.is_checkpoint(model) and checkpoint.by_blocks(model, trust.remote_code):
        modes.refuse_for_checkpoints(out, emitters, eval)
        folder = OutputFolder(out, force, protect=steps.model_file(model))
        calib, _, _ = steps.tokenized(model, calib, None, None, tokenizer, seq_len, calib_batches, trust.remote_code)
        return modes.checkpoint_folder(Path(model), example_inputs, pass_list, calib, folder, seed,
                                       strict, calib_batches, say, recovery, trust.remote_code,
                                       pass_timeout)
    modes.refuse_artifacts_in_memory_blockwise(blockwise, out)
    floor_value = spec.metric_floor(floor)
    calibration.check_count(calib_batches, "--calib-batches")
    writes = out is not None and distributed.rank() == 0
    folder = OutputFolder(out, force, protect=steps.model_file(model)) if writes else None
    reuse = reuse if reuse is not None and not blockwise else None
    job = _prepared(reuse, say, model, example_inputs, pass_list, calib=calib, eval=eval, metric=metric,
                    tokenizer=tokenizer, seq_len=seq_len, calib_batches=calib_batches, seed=seed, trusted=trust,
                    mask_input=mask_input, needs_eval=floor_value is not None)
    with folder.staging() if folder else contextlib.nullcontext() as stage:
        run = (modes.block_by_block(job, pass_list, recovery, seed, strict, say, pass_timeout) if blockwise else
               modes.whole_model(job, pass_list, emitters, recovery, seed, strict, floor_value, say, pass_timeout,
                                 reuse))
        report = RunReport(pipeline=spec.format_spec(pass_list),
                           capture=run.captured.note if blockwise else run.captured.describe(),
                           inputs=calibration.describe(job.data.batches), records=run.records,
                           warnings=job.warnings + run.warnings,
                           compared=judge.compared(job.model, mask_input, job.masks, floor_value, job.metric),
                           search=search or {})
        judge.before_after(report, job.model, run.rewritten, job.inputs, job.data.batches, job.masks, job.eval_data,
                           job.metric, latency=measure_latency, profile=profile, own_class=run.own_class, say=say,
                           before=job.outputs, after=run.outputs, original_score=reuse.score if reuse else None)
        if reuse is not None and report.metric:
            reuse.score = report.metric["original"]
        if run.own_class:  # your class back, its folder as your config says: generate() runs with its KV cache
            capture.set_cache_flags(run.rewritten, job.use_cache)
        if folder is not None:  # the verified graph is what export takes (your class may return a KV cache)
            write.emit_all(report, job.model, run.graph, run.captured, emitters, stage, measure_latency, profile, say)
            if run.own_class and hf.is_hf(run.rewritten):
                say("writing the model folder")
                write.emit_hf(report, run.rewritten, stage)
            for artifact in report.artifacts:
                artifact.path = folder.final(artifact.path)
            report.recipe = write.recipe(report, seed, job.inputs, pass_list)
            report.write(stage)
    result = Result(guard_save_pretrained(run.rewritten, job.model), report, run.captured, pass_list, seed)
    if report.problems() and not allow_artifact_errors:
        raise ArtifactError(f"{'; '.join(report.problems())} (allow_artifact_errors=True accepts it)", result)
    return result


def _prepared(reuse: modes.Reuse | None, say: Progress, model: Any, example_inputs: Any, passes: list,
              **options: Any) -> steps.Job:
    """The checked job: made (`inputs.prepare`), or a run before this one's with these passes' warnings."""
    if reuse is not None and reuse.job is not None:
        torch.manual_seed(options["seed"])  # as prepare leaves it: a run reusing the job rewrites what a fresh one does
        return dataclasses.replace(reuse.job, warnings=steps.data_warnings(reuse.job.data, passes))
    say("loading the model" if isinstance(model, (str, Path)) else "checking the model and its inputs")
    if reuse is None:
        return steps.prepare(model, example_inputs, passes, **options)
    with reuse.shared_setup():
        reuse.job = steps.prepare(model, example_inputs, passes, **options)
    return reuse.job


def diff(original: nn.Module | str, rewritten: nn.Module | str, inputs: Any, *, eval: Any = None,
         metric: str | None = None, trusted: Any = False, measure_latency: bool = True) -> RunReport:
    """Outputs, latency, size and (with eval data and a metric) accuracy of two models side by side."""
    a, b = steps.resolve(original, trusted), steps.resolve(rewritten, trusted)
    original, rewritten = steps.private_copy(a.module), steps.private_copy(b.module)
    inputs = next((x for x in (inputs, a.inputs, b.inputs) if x is not None), None)
    args = steps.check_model_and_inputs(original, inputs)
    steps.check_model_and_inputs(rewritten, args)
    for module in (original, rewritten):
        capture.without_kv_cache(module, args)
    report = RunReport(pipeline="(diff)", capture="-", inputs=calibration.describe([args]))
    try:
        report.error_vs_original = verify.compare([capture.run(original, args)],
                                                  [capture.run(rewritten, args)]).to_dict()
    except ValueError as exc:
        raise RewriteError(f"the two models' outputs differ in structure ({exc}): diff compares two versions "
                           "of one model") from None
    if measure_latency:
        judge.add_timing(report, measure.compare_torch(original, rewritten, args), original, rewritten)
    if eval is not None:
        judge.score(report, original, rewritten, steps.evaluation_data(eval, metric, original), metric)
    return report


def explain(model: nn.Module | str, inputs: Any, pass_name: str, node: str | None = None, *,
            trusted: Any = False) -> list[str]:
    """Why a pass's patterns do (not) match in the captured model: its matches and refusals, and with
    `node`, the first difference between each pattern and the graph ending at that node."""
    cls = registry.load_pass(pass_name)
    loaded = steps.resolve(model, trusted)
    model = steps.private_copy(loaded.module)
    args = steps.check_model_and_inputs(model, loaded.inputs if inputs is None else inputs)
    captured = capture.capture(model, args)
    if not captured.graph:
        return [captured.note]
    if not cls.patterns():
        return [f"{pass_name} matches no graph pattern (it works layer by layer: {cls.applies_to})"]
    lines = []
    for pattern in cls.patterns():
        found = pattern.find(captured.module)
        ends = ", ".join(m.outputs[0].name for m in found) if found else f"none ({found.reason})"
        lines.append(f"{pattern.name}: matches at {ends}")
        lines += [f"{pattern.name}: refused at {m.outputs[0].name}: {why}" for m, why in pattern.refusals(captured.module)]
        if node:
            lines.append(f"{pattern.name} at {node}: {pattern.explain(captured.module, node)}")
    return lines


def load(path: str, trusted: Any = False) -> nn.Module:
    """A model from a .pt2, a folder, a pickled module (only with `trusted=True` or "pickle") or
    `package.module:factory`; a folder whose config names its own code needs "remote-code"."""
    return checkpoint.load_model(path, trusted).module
