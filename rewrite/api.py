"""The library API the CLI wraps: optimize, diff, load."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rewrite import __version__, calibration, capture, measure, pipeline, registry, verify
from rewrite.errors import RewriteError, first_line
from rewrite.pass_base import Approx, Pass, PassContext
from rewrite.recover import RecoverSpec
from rewrite.report import Measurement, RunReport

Progress = Callable[[str], None]


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
        needy = [p.name for p in self.passes if p.needs_calibration or (p.recoverable and
                                                                         getattr(p, "mode", "") == "t1")]
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


def optimize(model: nn.Module, example_inputs: Any, passes: str | list[Pass], *, calib: Any = None,
             eval: Any = None, metric: str | None = None, emit: str | list[str] | None = None,
             out: str | Path | None = None, force: bool = False, strict: bool = False, seed: int = 0,
             recover: str | None = None, budget: str | None = None,
             calib_batches: int = calibration.MAX_BATCHES,
             measure_latency: bool = True, progress: Progress | None = None) -> Result:
    """Capture `model`, run `passes` with verification, measure before/after, and emit artifacts to `out`.

    The user's model is never modified. Raises RewriteError with a one-line message on bad input.
    """
    say = progress or (lambda _msg: None)
    model = _private_copy(model)  # eval() and every measurement act on our copy, never the user's module
    inputs = _check_model_and_inputs(model, example_inputs)
    pass_list = pipeline.with_budget(pipeline.parse_spec(passes), budget)
    emitters = _emitters(emit, out)
    recovery = RecoverSpec.parse(recover)
    out_dir = _prepare_out(out, force) if out is not None else None
    torch.manual_seed(seed)
    data, warns = _calibration(calib, model, inputs, seed, pass_list, calib_batches)
    say("capturing")
    captured = capture.capture(model, inputs)
    if not captured.graph:
        warns.append(captured.note)
    eval_data = _eval_data(eval, metric, model) if eval is not None else None
    ctx = PassContext(calibration=data.batches, targets=data.targets, original=model, seed=seed,
                      synthetic_calibration=data.synthetic, emit=tuple(emitters), recover=recovery,
                      evaluate=measure.evaluator(metric, *eval_data) if eval_data else None, metric=metric)
    rewritten, records = pipeline.run_passes(captured, pass_list, ctx, strict=strict, progress=say)
    report = RunReport(pipeline=pipeline.format_spec(pass_list), capture=captured.describe(),
                       inputs=calibration.describe(data.batches), records=records, warnings=warns)
    report.error_vs_original = verify.compare(
        [capture.run(model, b) for b in data.batches], [capture.run(rewritten, b) for b in data.batches]).to_dict()
    if measure_latency:
        say("measuring latency (eager torch)")
        report.measurements += [_measure("original", model, inputs), _measure("rewritten", rewritten, inputs)]
    if eval_data is not None:
        _score(report, model, rewritten, eval_data, metric)
    if out_dir is not None:
        _emit_all(report, model, rewritten, captured, emitters, out_dir, measure_latency, say)
        _write_report(report, out_dir, seed, inputs, pass_list)
    return Result(rewritten, report, captured, pass_list, seed)


def diff(original: nn.Module, rewritten: nn.Module, inputs: Any, *, eval: Any = None,
         metric: str | None = None) -> RunReport:
    """Outputs, latency, size and (with eval data and a metric) accuracy of two models side by side."""
    original, rewritten = _private_copy(original), _private_copy(rewritten)
    args = _check_model_and_inputs(original, inputs)
    _check_model_and_inputs(rewritten, args)
    report = RunReport(pipeline="(diff)", capture="-", inputs=calibration.describe([args]))
    report.error_vs_original = verify.compare([capture.run(original, args)], [capture.run(rewritten, args)]).to_dict()
    report.measurements += [_measure("original", original, args), _measure("rewritten", rewritten, args)]
    if eval is not None:
        _score(report, original, rewritten, _eval_data(eval, metric, original), metric)
    return report


def load(path: str) -> nn.Module:
    """A model from a .pt2, a pickled module or `package.module:factory` (see rewrite.loading)."""
    from rewrite.loading import load as _load
    return _load(path)[0]


# --- steps ---------------------------------------------------------------------------------------

def _private_copy(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise RewriteError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model).eval()


def _check_model_and_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    inputs = calibration.as_args(example_inputs, model, "example input")
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


def _measure(label: str, module: nn.Module, inputs: tuple) -> Measurement:
    p50, p90, runs = measure.torch_latency(module, inputs)
    return Measurement(label, "torch", p50, p90, runs, measure.param_count(module), measure.state_size(module),
                       capture.layer_count(module))


def _eval_data(eval: Any, metric: str | None, model: nn.Module) -> tuple[list[tuple], list[Any]]:
    if metric is None:
        raise RewriteError("eval data given without a metric: add --metric rel-l2|top1|cosine")
    measure.metric_fn(metric)  # unknown names fail here
    data = calibration.from_user(eval, model, "eval", max_batches=10_000)
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


def _prepare_out(out: str | Path, force: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RewriteError(f"output path {str(path)!r} is a file: give a folder with -o")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise RewriteError(f"output folder {str(path)!r} already holds files: choose another -o or add --force")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _emit_all(report: RunReport, original: nn.Module, rewritten: nn.Module, captured: capture.Captured,
              names: list[str], out_dir: Path, measure_latency: bool, say: Progress) -> None:
    for name in names:
        say(f"emitting {name}")
        artifact = registry.load_emitter(name)(rewritten, captured, out_dir)
        report.artifacts.append(artifact)
        if name == "onnx" and artifact.path and measure_latency:
            say("measuring latency (onnxruntime)")
            report.measurements += _ort_measurements(report, original, captured, Path(artifact.path))


def _ort_measurements(report: RunReport, original: nn.Module, captured: capture.Captured,
                      rewritten_path: Path) -> list[Measurement]:
    from rewrite.emit import onnx as onnx_emit
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        original_path = Path(tmp) / "original.onnx"
        try:
            original_captured = capture.Captured(original, captured.example_inputs, True, captured.dynamic_dims)
            onnx_emit.export_onnx(original, original_captured, original_path)
            rows.append(_ort_row("original", original_path, captured.example_inputs))
        except Exception as exc:
            rows.append(Measurement("original (not exportable to ONNX)", "onnxruntime"))
            report.warnings.append(f"the original model does not export to ONNX: {onnx_emit.first_line(exc)}")
    rows.append(_ort_row("rewritten", rewritten_path, captured.example_inputs))
    return rows


def _ort_row(label: str, path: Path, inputs: tuple) -> Measurement:
    from rewrite.emit import onnx as onnx_emit
    sess = onnx_emit.session(path)
    feed = onnx_emit.feed(sess, inputs)
    p50, p90, runs = measure.latency(lambda: sess.run(None, feed))
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return Measurement(label, "onnxruntime", p50, p90, runs, size_bytes=size)


def _write_report(report: RunReport, out_dir: Path, seed: int, inputs: tuple, passes: list[Pass]) -> None:
    report.recipe = {
        "pipeline": pipeline.format_spec(passes), "seed": seed, "input_sha256": _hash(inputs),
        "versions": {"rewrite": __version__, "torch": torch.__version__, "python": os.sys.version.split()[0]},
    }
    (out_dir / "report.md").write_text(report.to_markdown())
    (out_dir / "report.json").write_text(report.to_json())
    (out_dir / "recipe.json").write_text(json.dumps(report.recipe, indent=2))


def _hash(inputs: tuple) -> str:
    h = hashlib.sha256()
    for x in inputs:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
