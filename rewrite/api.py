"""The library API the CLI wraps: optimize, diff, load."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rewrite import (__version__, calibration, capture, checkpoint, distributed, measure, pipeline, registry, spec,
                     text, transplant, verify)
from rewrite.emit import hf
from rewrite.errors import ArtifactError, RewriteError, first_line
from rewrite.emit.hf import guard_save_pretrained
from rewrite.output import OutputFolder
from rewrite.pass_base import Approx, Pass, PassContext
from rewrite.report import Artifact, Measurement, RunReport

Progress = Callable[..., None]  # (message, done=None, total=None)


@dataclass
class Result:
    """The rewritten model, its report, and the capture it came from.

    `model` is built for the shapes of the example inputs when export specialized them (the report's
    capture line says so) or a pass did (t1 builds DFT matrices for one grid); `model_for(*inputs)`
    captures and rewrites again for other shapes with the same passes, verified strictly on those
    inputs, and caches the result by shape.
    """

    model: nn.Module
    report: RunReport
    captured: capture.Captured
    passes: list[Pass] = field(default_factory=list)
    seed: int = 0
    _by_shape: dict = field(default_factory=dict, repr=False)

    def model_for(self, *inputs: Any) -> nn.Module:
        key = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in inputs)
        if key == _shape_key(self.captured):
            return self.model
        # Even a dynamic capture may have been made shape-specific by a pass (t1's DFT matrices): rewrite again.
        if key not in self._by_shape:
            self._by_shape[key] = self._rewrite_for(tuple(inputs))
        return self._by_shape[key]

    def _rewrite_for(self, inputs: tuple) -> nn.Module:
        needy = [p.name for p in self.passes if p.needs_calibration]
        if needy:
            raise RewriteError(f"{', '.join(needy)} need calibration data at this shape: run rewrite.optimize "
                               "again with inputs and --calib of this shape")
        original = self.captured.original
        captured = capture.capture(original, inputs)
        data = calibration.synthetic(inputs, self.seed)
        ctx = PassContext(calibration=data.batches, original=original, seed=self.seed, synthetic_calibration=True)
        module, _records = pipeline.run_passes(captured, self.passes, ctx, strict=True)
        return module


def _shape_key(captured: capture.Captured) -> tuple:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in captured.example_inputs)


def optimize(model: nn.Module | str, example_inputs: Any, passes: str | list, *, calib: Any = None,
             eval: Any = None, metric: str | None = None, emit: str | list[str] | None = None,
             out: str | Path | None = None, force: bool = False, strict: bool = False, seed: int = 0,
             recover: str | None = None, budget: str | None = None,
             calib_batches: int = calibration.MAX_BATCHES, measure_latency: bool = True,
             trusted: bool = False, floor: str | None = None, mask_input: str | None = None,
             blockwise: bool = False, profile: bool = False, progress: Progress | None = None,
             allow_artifact_errors: bool = False, tokenizer: Any = None, seq_len: int = text.SEQ_LEN) -> Result:
    """Capture `model`, run `passes` with verification, measure before/after, and emit artifacts to `out`.

    `model` is a module or a spec for `rewrite.load` (then `example_inputs=None` takes the inputs a .pt2 or
    factory bundles; a pickled module needs `trusted=True`). The user's model is never modified; every
    input is checked before work starts; `out` appears complete or not at all. Raises RewriteError with a
    one-line message on bad input. `blockwise=True` rewrites a transformer stack one block at a time
    (`rewrite.blockwise`); `profile=True` adds the top ops by self time of both models (and of the ONNX
    file when emitted) to the report. An artifact that failed to export or differs from the verified model
    raises ArtifactError after the output folder is written (its `.result` is the Result), unless
    `allow_artifact_errors=True`; the CLI exits 3 there. `calib` and `eval` may be lists of strings: they
    are tokenized (`tokenizer`, else the one beside the model's weights) into windows of `seq_len` tokens,
    and `eval` text is scored by perplexity unless `metric` says otherwise (`rewrite.text`).
    """
    say = progress or (lambda message, done=None, total=None: None)
    distributed.init_from_env()  # under torchrun: recovery runs data-parallel, rank 0 alone writes
    pass_list = spec.with_budget(spec.parse_spec(passes), budget)  # cheap checks before any loading
    emitters = _emitters(emit, out)
    recovery = spec.recover_spec(recover)
    if checkpoint.is_checkpoint(model):
        _refuse_for_checkpoints(out, emitters, eval)
        calib, _, _ = _tokenized(model, calib, None, None, tokenizer, seq_len, calib_batches)
        return _optimize_checkpoint(Path(model), example_inputs, pass_list, calib, OutputFolder(out, force), seed,
                                    strict, calib_batches, say, recovery)
    if blockwise and out is not None:
        # Its blocks are captured one by one, with the calls calibration made (attention_mask=None); a second
        # export of the whole model traces other calls (a materialized causal mask), so it cannot be emitted.
        raise RewriteError("--blockwise on a model in memory does not write artifacts yet: save the model with "
                           "save_pretrained and give that checkpoint folder, which is written block by block "
                           "(Python: leave out=None to get the rewritten model back)")
    floor_value = spec.metric_floor(floor)
    calibration.check_count(calib_batches, "--calib-batches")
    source = (Path(model),) if isinstance(model, (str, Path)) and Path(model).exists() else ()
    writes = out is not None and distributed.rank() == 0
    folder = OutputFolder(out, force, protect=source) if writes else None
    say("loading the model" if isinstance(model, (str, Path)) else "checking the model and its inputs")
    loaded, _ = _resolve(model, trusted)
    calib_is_text = text.is_texts(calib)
    calib, eval, metric = _tokenized(loaded.module, calib, eval, metric, tokenizer, seq_len, calib_batches)
    if example_inputs is None and loaded.inputs is None and calib_is_text:
        example_inputs = calib[0]  # text in: the first calibration window is the example
    model, inputs, bundled_calib = _model_and_inputs(loaded, example_inputs)
    calib = bundled_calib if calib is None else calib
    torch.manual_seed(seed)
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    cache_note = capture.without_kv_cache(model, inputs)
    data, warns = _calibration(calib, model, inputs, seed, pass_list, calib_batches)
    eval_data = _eval_data(eval, metric, model) if eval is not None else None
    if floor_value is not None and eval_data is None:
        raise RewriteError("--floor metric=... needs eval data and a metric: add --eval FILE --metric NAME")
    metric_floor = floor_value
    masks = calibration.masks(data.batches, calibration.mask_index(model, mask_input))
    with folder.staging() if folder else contextlib.nullcontext() as stage:
        if blockwise:
            outcome = _blockwise(model, data, pass_list, recovery, seed, strict, say)
            rewritten, records = outcome.model, outcome.records
            graph = rewritten
            warns += [cache_note] if cache_note else []
            captured = capture.Captured(model, inputs, graph=False, note=outcome.summary, original=model)
        else:
            say("capturing")
            captured = capture.capture(model, inputs)
            _check_shapes(captured, data.batches, "calibration")
            if eval_data is not None:
                _check_shapes(captured, eval_data[0], "eval")
            if not captured.graph:
                warns.append(captured.note)
            ctx = PassContext(calibration=data.batches, targets=data.targets, original=model, seed=seed,
                              synthetic_calibration=data.synthetic, emit=tuple(emitters), recover=recovery,
                              evaluate=measure.evaluator(metric, *eval_data) if eval_data else None, metric=metric,
                              masks=masks, metric_floor=metric_floor)
            graph, records = pipeline.run_passes(captured, pass_list, ctx, strict=strict, progress=say)
            say("putting the rewritten layers into your model")
            graph_passes = [p.name for p, r in zip(pass_list, records) if p.level == "graph" and r.status == "applied"]
            own, lost = transplant.choose(graph, model, graph_passes, data.batches, masks)
            rewritten = own if own is not None else capture.accept_original_calls(graph, model, inputs)
            warns += [w for w in (cache_note if own is None else None, lost) if w]
        report = RunReport(pipeline=spec.format_spec(pass_list), capture=captured.note if blockwise else captured.describe(),
                           inputs=calibration.describe(data.batches), records=records, warnings=warns,
                           compared=_compared(model, mask_input, masks, metric_floor, metric))
        report.error_vs_original = verify.compare(
            [capture.run(model, b) for b in data.batches], [capture.run(rewritten, b) for b in data.batches],
            masks=masks).to_dict()
        if measure_latency:
            say("measuring latency (eager torch, original and rewritten in alternating rounds)")
            _add_timing(report, measure.compare_torch(model, rewritten, inputs), model, rewritten)
        if measure_latency and rewritten is not graph and measure.generates(rewritten):
            say("measuring generation (prefill, then 64 new tokens with the KV cache; alternating rounds)")
            generation = measure.compare_generation(model, rewritten)
            report.speeds += [generation["prefill"].speed, generation["decode"].speed]
            report.generation = {k: generation[k] for k in ("prompt_tokens", "new_tokens", "prefill_ms",
                                                            "decode_tokens_per_s")}
        if eval_data is not None:
            _score(report, model, rewritten, eval_data, metric)
        if profile:
            say("profiling (eager torch)")
            report.profiles = {f"torch, {label}": measure.profile_torch(m, inputs)
                               for label, m in (("original", model), ("rewritten", rewritten))}
        if folder is not None:  # the verified graph is what export takes (your class may return a KV cache)
            _emit_all(report, model, graph, captured, emitters, stage, measure_latency, say)
            if rewritten is not graph and hf.is_hf(rewritten):
                say("writing the folder from_pretrained loads")
                _emit_hf(report, rewritten, stage, use_cache)
            onnx = next((a.path for a in report.artifacts if a.kind == "onnx" and a.path), None)
            if profile and onnx:
                report.profiles["onnxruntime, rewritten"] = measure.profile_onnx(onnx, inputs)
            for artifact in report.artifacts:
                artifact.path = folder.final(artifact.path)
            report.recipe = _recipe(report, seed, inputs, pass_list)
            report.write(stage)
    if rewritten is not graph and use_cache is not None:
        rewritten.config.use_cache = use_cache  # your class back: generate() runs with its KV cache again
    result = Result(guard_save_pretrained(rewritten, model), report, captured, pass_list, seed)
    if report.problems() and not allow_artifact_errors:
        raise ArtifactError(f"{'; '.join(report.problems())} (allow_artifact_errors=True accepts it)", result)
    return result


def _refuse_for_checkpoints(out: Any, emitters: list[str], eval: Any) -> None:
    why = ("no output folder (-o): it is written block by block" if out is None else
           "--emit " + ",".join(e for e in emitters if e != "pt2")
           if any(e != "pt2" for e in emitters) else "--eval" if eval is not None else None)
    if why:
        raise RewriteError(f"a checkpoint folder is rewritten block by block, which does not take {why} yet: "
                           "rewrite.load the output and run that step on it")


def _optimize_checkpoint(folder: Path, example_inputs: Any, passes: list[Pass], calib: Any, out: OutputFolder,
                         seed: int, strict: bool, calib_batches: int, say: Progress, recovery: Any = None) -> Result:
    """A Hugging Face checkpoint folder, block by block: one block in memory at a time, each written as
    soon as it is rewritten (`rewrite.checkpoint`)."""
    from rewrite import blockwise
    from rewrite.emit.pt2 import export_program
    say("reading the checkpoint (weights outside the stack of blocks)")
    lazy = checkpoint.Lazy(folder)
    lazy.check_disk(out.path.parent if out.path.parent.exists() else Path.cwd())
    if calib is None and example_inputs is None:
        raise RewriteError("a checkpoint folder comes without inputs: give calibration token ids with --calib")
    data = calibration.from_user(calib if calib is not None else example_inputs, lazy.model, "calibration",
                                 calib_batches)
    with out.staging() as stage:
        shards = hf.Sharded(lazy.model, stage)  # the same blocks again, as a folder from_pretrained loads

        def keep(index: int, rewritten: nn.Module, captured: capture.Captured, _flat: Any) -> nn.Module:
            torch.export.save(export_program(rewritten, captured), stage / checkpoint.block_file(index))
            shards.add(rewritten, f"model-{index + 1:05d}.safetensors", ("block.", f"{lazy.stack}.{index}."))
            return checkpoint.OnDisk(out.final(stage / checkpoint.block_file(index)))

        outcome = blockwise.run(lazy.model, data.batches, passes, seed=seed, strict=strict, recover=recovery, say=say,
                                load=lazy.load, keep=keep)
        aliases = checkpoint.write_rest(lazy.model, lazy.stack, stage)
        checkpoint.write_manifest(stage, folder, lazy.stack, len(lazy.blocks), outcome.layout, aliases)
        shards.add(lazy.model, "model-00000.safetensors")
        shards.finish(json.loads((folder / "config.json").read_text()))
        _copy_tokenizer(folder, stage)
        report = RunReport(pipeline=spec.format_spec(passes), capture=outcome.summary,
                           inputs=calibration.describe(data.batches), records=outcome.records,
                           warnings=["the whole model was never in memory, so its outputs were not compared with the "
                                     "original: each block was verified on its own calibration activations"])
        report.artifacts.append(Artifact("blocks", out.final(stage / checkpoint.MANIFEST), None,
                                         "rewrite.load(folder) builds the rewritten model"))
        if shards.problem:
            report.warnings.append(f"no from_pretrained form: {first_line(shards.problem, 300)}")
        else:
            report.artifacts.append(_hf_artifact(stage / "config.json", hf.COMPRESSED))
            report.artifacts[-1].path = out.final(report.artifacts[-1].path)
        report.write(stage)
    captured = capture.Captured(lazy.model, data.batches[0], graph=False, note=outcome.summary)
    return Result(guard_save_pretrained(lazy.model, None), report, captured, passes, seed)


def _blockwise(model: nn.Module, data: calibration.Data, passes: list[Pass], recovery: Any, seed: int, strict: bool,
               say: Progress):
    from rewrite import blockwise
    return blockwise.run(copy.deepcopy(model), data.batches, passes, seed=seed, strict=strict, recover=recovery,
                         say=say)


def diff(original: nn.Module | str, rewritten: nn.Module | str, inputs: Any, *, eval: Any = None,
         metric: str | None = None, trusted: bool = False, measure_latency: bool = True) -> RunReport:
    """Outputs, latency, size and (with eval data and a metric) accuracy of two models side by side."""
    (a, _), (b, _) = _resolve(original, trusted), _resolve(rewritten, trusted)
    original, rewritten = _private_copy(a.module), _private_copy(b.module)
    inputs = next((x for x in (inputs, a.inputs, b.inputs) if x is not None), None)
    args = _check_model_and_inputs(original, inputs)
    _check_model_and_inputs(rewritten, args)
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
        _add_timing(report, measure.compare_torch(original, rewritten, args), original, rewritten)
    if eval is not None:
        _score(report, original, rewritten, _eval_data(eval, metric, original), metric)
    return report


def explain(model: nn.Module | str, inputs: Any, pass_name: str, node: str | None = None, *,
            trusted: bool = False) -> list[str]:
    """Why a pass's patterns do (not) match in the captured model: its matches and refusals, and with
    `node`, the first difference between each pattern and the graph ending at that node."""
    cls = registry.load_pass(pass_name)
    model, args, _ = _model_and_inputs(_resolve(model, trusted)[0], inputs)
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


def load(path: str, trusted: bool = False) -> nn.Module:
    """A model from a .pt2, a pickled module (only with `trusted=True`) or `package.module:factory`."""
    return checkpoint.load_model(path, trusted).module


# --- steps ---------------------------------------------------------------------------------------

def _model_and_inputs(loaded: Any, example_inputs: Any) -> tuple[nn.Module, tuple, Any]:
    """(a private eval-mode copy of what `rewrite.load` gave, checked inputs, bundled calibration)."""
    model = _private_copy(loaded.module)
    inputs = _check_model_and_inputs(model, loaded.inputs if example_inputs is None else example_inputs)
    return model, inputs, loaded.calibration


def _resolve(model: Any, trusted: bool) -> tuple[Any, tuple[Path, ...]]:
    """(what `rewrite.load` gives, the model file) from a module or a load spec."""
    from rewrite.loading import Loaded
    if isinstance(model, (str, Path)):
        return checkpoint.load_model(str(model), trusted), ((Path(model),) if Path(model).exists() else ())
    if not isinstance(model, nn.Module):
        raise RewriteError(f"expected a torch.nn.Module or a model path, got {type(model).__name__}")
    return Loaded(model), ()


def _private_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model).eval()
    except Exception as exc:
        raise RewriteError(f"cannot copy the model ({type(model).__name__}: {first_line(exc)}); rewrite works "
                           "on a private copy so yours is never modified: make the module deep-copyable") from exc


def _check_model_and_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise RewriteError("no example inputs: give them (CLI: --inputs FILE or --input-shape 8,3,32,32)")
    inputs = calibration.as_args(example_inputs, model, "example input")
    calibration.check_finite(inputs, "the example inputs")
    try:
        capture.run(model, inputs)
    except Exception as exc:
        shapes = calibration.describe([inputs])
        raise RewriteError(f"the model rejects the example inputs {shapes}: {first_line(exc)}; "
                           "give inputs of the shape the model expects (--inputs or --input-shape)") from exc
    return inputs


def _calibration(calib: Any, model: nn.Module, inputs: tuple, seed: int, passes: list[Pass],
                 max_batches: int) -> tuple[calibration.Data, list[str]]:
    if calib is None:
        data = calibration.synthetic(inputs, seed)
        approximate = [p.name for p in passes if isinstance(p.contract, Approx) or p.needs_calibration]
        warns = [f"no calibration data: {', '.join(approximate)} verified on synthetic inputs only; "
                 "pass --calib for a trustworthy error"] if approximate else []
        return data, warns
    data = calibration.from_user(calib, model, "calibration", max_batches)
    for i, batch in enumerate(data.batches):
        try:
            capture.run(model, batch)
        except Exception as exc:
            raise RewriteError(f"calibration batch {i} {calibration.describe([batch])} is rejected by the model: "
                               f"{first_line(exc)}") from exc
    return data, []


def _tokenized(model: Any, calib: Any, eval: Any, metric: str | None, tokenizer: Any, seq_len: int,
               calib_batches: int) -> tuple[Any, Any, str | None]:
    """Calibration and evaluation text (lists of strings) as token windows; other data as it came. Eval
    windows of the calibration text itself start after the calibration windows."""
    if not (text.is_texts(calib) or text.is_texts(eval)):
        return calib, eval, metric
    tok = text.tokenizer_for(model, tokenizer)
    calib_text = "\n\n".join(calib) if text.is_texts(calib) else None
    if calib_text is not None:
        calib = text.windows(tok, calib_text, seq_len, calib_batches)
    if text.is_texts(eval):
        eval_text = "\n\n".join(eval)
        skip = len(calib) if eval_text == calib_text else 0
        eval = text.windows(tok, eval_text, seq_len, 10_000, skip=skip, what="eval")
        metric = metric or "perplexity"
    return calib, eval, metric


def _compared(model: nn.Module, mask_input: str | None, masks: list | None, floor: float | None,
              metric: str | None) -> str:
    """What verification compared, in words, for the report."""
    where = "all output positions"
    if masks is not None:
        name = mask_input or next(n for n in calibration.MASK_NAMES if n in inspect.signature(model.forward).parameters)
        where = f"outputs at positions where {name} is 1 (padding excluded)"
    sign = "≥" if measure.HIGHER_IS_BETTER.get(metric or "", True) else "≤"
    decided = f"; approximate passes accepted by {metric} {sign} {floor:g} on the eval data" if floor is not None else ""
    return where + decided


def _check_shapes(captured: capture.Captured, batches: list[tuple], what: str) -> None:
    for i, batch in enumerate(batches):
        problem = captured.shape_problem(batch)
        if problem:
            raise RewriteError(f"{what} batch {i} {problem}: give {what} batches of the example inputs' shape "
                               "(or example inputs of theirs)")


def _add_timing(report: RunReport, timed: measure.Timed, original: nn.Module, rewritten: nn.Module) -> None:
    for label, module, (p50, p90, runs) in (("original", original, timed.original),
                                            ("rewritten", rewritten, timed.rewritten)):
        report.measurements.append(Measurement(label, timed.speed.backend, p50, p90, runs,
                                               measure.param_count(module), measure.state_size(module),
                                               capture.layer_count(module)))
    report.speeds.append(timed.speed)


def _eval_data(eval: Any, metric: str | None, model: nn.Module) -> tuple[list[tuple], list[Any]]:
    if metric is None:
        raise RewriteError(f"eval data given without a metric: add --metric {'|'.join(measure.METRICS)}")
    measure.metric_fn(metric)  # unknown names fail here
    data = calibration.from_user(eval, model, "eval", max_batches=10_000)
    if data.targets is None and metric == "perplexity":  # a language model's targets are its own token ids
        return data.batches, [batch[0] for batch in data.batches]
    if data.targets is None:
        raise RewriteError('eval data has no targets: save {"inputs": [...], "targets": [...]} with torch.save')
    return data.batches, data.targets


def _score(report: RunReport, original: nn.Module, rewritten: nn.Module, eval_data: tuple, metric: str) -> None:
    report.metric_name = metric
    for label, module in (("original", original), ("rewritten", rewritten)):
        report.metric[label] = measure.evaluator(metric, *eval_data)(module)


def _emitters(emit: str | list[str] | None, out: Any) -> list[str]:
    names = [e.strip() for e in (emit.split(",") if isinstance(emit, str) else emit or []) if e.strip()]
    for name in names:
        registry.load_emitter(name)  # unknown names fail before any work
    if names and out is None:
        raise RewriteError("emitting artifacts needs an output folder: give -o DIR (Python: out=...)")
    return ["pt2"] + [n for n in names if n != "pt2"]


def _emit_all(report: RunReport, original: nn.Module, rewritten: nn.Module, captured: capture.Captured,
              names: list[str], out_dir: Path, measure_latency: bool, say: Progress) -> None:
    for name in names:
        say(f"emitting {name}")
        artifact = registry.load_emitter(name)(rewritten, captured, out_dir)
        report.artifacts.append(artifact)
        if name == "onnx" and artifact.path and measure_latency:
            say("measuring latency (onnxruntime, in a worker process)")
            _ort_timing(report, original, captured, Path(artifact.path))


def _emit_hf(report: RunReport, model: nn.Module, out_dir: Path, use_cache: bool | None) -> None:
    """config.json + model.safetensors (+ the tokenizer beside the original's weights) for from_pretrained;
    a warning, not a failed artifact, where a rewritten layer has no such form (.pt2 holds the model)."""
    kept, model.config.use_cache = model.config.use_cache, use_cache  # the folder says what your config said
    try:
        form = hf.save(model, out_dir)
    except RewriteError as exc:
        report.warnings.append(f"no model folder: {first_line(exc, 300)}")
        return
    finally:
        model.config.use_cache = kept
    _copy_tokenizer(Path(str(getattr(model.config, "_name_or_path", "") or "-")), out_dir)
    report.artifacts.append(_hf_artifact(out_dir / "config.json", form))


def _copy_tokenizer(source: Path, out_dir: Path) -> None:
    for name in text.TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "chat_template.jinja"):
        if source.is_dir() and (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)


def _hf_artifact(config: Path, form: str) -> Artifact:
    quantized = "quantization_config" in json.loads(config.read_text())
    how = ("rewrite.load(DIR) gives your class back (from_pretrained cannot: factorized layers)"
           if form == hf.LAYERS else "AutoModel*.from_pretrained(DIR) loads it" +
           (" (with pip install compressed-tensors)" if quantized else ""))
    return Artifact("hf", str(config), None, how)


def _ort_timing(report: RunReport, original: nn.Module, captured: capture.Captured, rewritten_path: Path) -> None:
    from rewrite.emit import onnx as onnx_emit
    with tempfile.TemporaryDirectory() as tmp:
        original_path = Path(tmp) / "original.onnx"
        try:
            original_captured = capture.Captured(original, captured.example_inputs, True, captured.dynamic_dims)
            onnx_emit.export_onnx(original, original_captured, original_path)
        except Exception as exc:
            report.warnings.append(f"the original model does not export to ONNX, so onnxruntime latency is not "
                                   f"compared: {onnx_emit.first_line(exc)}")
            return
        timed = measure.compare_onnx(original_path, rewritten_path, captured.example_inputs)
        sizes = [_onnx_size(original_path), _onnx_size(rewritten_path)]
    for label, (p50, p90, runs), size in zip(("original", "rewritten"), (timed.original, timed.rewritten), sizes):
        report.measurements.append(Measurement(label, "onnxruntime", p50, p90, runs, size_bytes=size))
    report.speeds.append(timed.speed)


def _onnx_size(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def _recipe(report: RunReport, seed: int, inputs: tuple, passes: list[Pass]) -> dict:
    return {
        "pipeline": spec.format_spec(passes), "seed": seed, "input_sha256": _hash(inputs),
        # What each pass chose by measuring (t1's forms, searched ranks), so a run can be reproduced.
        "passes": [{"spec": r.spec, "status": r.status, "choices": r.stats} for r in report.records],
        "versions": {"rewrite": __version__, "torch": torch.__version__, "python": os.sys.version.split()[0]},
    }


def _hash(inputs: tuple) -> str:
    h = hashlib.sha256()
    for x in inputs:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
