"""Step 4 of a run: the artifacts in the output folder. The emitters asked for (.pt2 always; onnx, compiled),
onnxruntime timing of an ONNX file against the original's, the Hugging Face folder of a model that came back
as its own class, and the recipe that reproduces the run."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rewrite import __version__, capture, measure, registry, spec, text
from rewrite.emit import hf
from rewrite.errors import RewriteError, first_line
from rewrite.pass_base import Pass
from rewrite.report import Artifact, Measurement, RunReport

TOKENIZER_FILES = text.TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "chat_template.jinja")


def emitters(emit: str | list[str] | None, out: Any) -> list[str]:
    """The emitters asked for, checked before any work: .pt2 first, always."""
    names = [e.strip() for e in (emit.split(",") if isinstance(emit, str) else emit or []) if e.strip()]
    for name in names:
        registry.load_emitter(name)  # unknown names fail before any work
    if names and out is None:
        raise RewriteError("emitting artifacts needs an output folder: give -o DIR (Python: out=...)")
    return ["pt2"] + [n for n in names if n != "pt2"]


def emit_all(report: RunReport, original: nn.Module, rewritten: nn.Module, captured: capture.Captured,
             names: list[str], out_dir: Path, measure_latency: bool, profile: bool, say: Callable[..., None]) -> None:
    for name in names:
        say(f"emitting {name}")
        artifact = registry.load_emitter(name)(rewritten, captured, out_dir)
        report.artifacts.append(artifact)
        if name == "onnx" and artifact.path and measure_latency:
            say("measuring latency (onnxruntime, in a worker process)")
            ort_timing(report, original, captured, Path(artifact.path))
        if name == "onnx" and artifact.path and profile:
            report.profiles["onnxruntime, rewritten"] = measure.profile_onnx(artifact.path, captured.example_inputs)


def emit_hf(report: RunReport, model: nn.Module, out_dir: Path) -> None:
    """The model's folder (compressed-tensors for from_pretrained, or rewrite's layers folder) with the
    tokenizer beside the original's weights; a warning, not a failed artifact, where a rewritten layer has no
    saved form (.pt2 holds the model)."""
    try:
        saved = hf.save(model, out_dir)
    except RewriteError as exc:
        report.warnings.append(f"no model folder: {first_line(exc, 300)}")
        return
    copy_tokenizer(Path(str(getattr(model.config, "_name_or_path", "") or "-")), out_dir)
    report.artifacts.append(hf_artifact(out_dir / "config.json", saved.form, saved.why_not_compressed))


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    """The tokenizer files beside the model's weights, and the Python files its config names (auto_map), so
    the output loads as the input did. A file that leads outside the folder is not copied (a link to
    /etc/passwd named tokenizer.json would otherwise land in the output)."""
    names = list(TOKENIZER_FILES) + _code_files(source / "config.json") + _code_files(source / "tokenizer_config.json")
    for name in dict.fromkeys(names):
        if source.is_dir() and (source / name).is_file() and text.is_inside(source, source / name):
            shutil.copyfile(source / name, out_dir / name)


def _code_files(config: Path) -> list[str]:
    try:
        auto_map = json.loads(config.read_text()).get("auto_map") or {}
        refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    except (OSError, ValueError, AttributeError):
        return []
    return [ref.rsplit(".", 1)[0] + ".py" for ref in refs if "--" not in ref and "/" not in ref]


def hf_artifact(config: Path, form: str, why_not_compressed: str = "") -> Artifact:
    quantized = "quantization_config" in json.loads(config.read_text())
    cannot = why_not_compressed or "its layers have no standard form"
    how = (f"rewrite.load(DIR) gives your class back (from_pretrained cannot: {cannot})"
           if form == hf.LAYERS else "AutoModel*.from_pretrained(DIR) loads it" +
           (" (with pip install compressed-tensors)" if quantized else ""))
    return Artifact("hf", str(config), None, how)


def ort_timing(report: RunReport, original: nn.Module, captured: capture.Captured, rewritten_path: Path) -> None:
    from rewrite.emit import onnx as onnx_emit
    with tempfile.TemporaryDirectory() as tmp:
        original_path = Path(tmp) / "original.onnx"
        try:
            original_captured = capture.Captured(original, captured.example_inputs, True, captured.dynamic_dims)
            onnx_emit.export_onnx(original, original_captured, original_path)
        except Exception as exc:
            report.warnings.append(f"the original model does not export to ONNX, so onnxruntime latency is not "
                                   f"compared: {onnx_emit.why_not_exported(exc)} (the rewritten model does export)")
            return
        timed = measure.compare_onnx(original_path, rewritten_path, captured.example_inputs)
        sizes = [_onnx_size(original_path), _onnx_size(rewritten_path)]
    for label, (p50, p90, runs), size in zip(("original", "rewritten"), (timed.original, timed.rewritten), sizes):
        report.measurements.append(Measurement(label, "onnxruntime", p50, p90, runs, size_bytes=size))
    report.speeds.append(timed.speed)


def _onnx_size(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def recipe(report: RunReport, seed: int, inputs: tuple, passes: list[Pass]) -> dict:
    return {
        "pipeline": spec.format_spec(_pinned(passes, report.records)), "asked": spec.format_spec(passes),
        "seed": seed, "input_sha256": _hash(inputs),
        # What each pass chose by measuring (t1's forms, searched ranks), so a run can be reproduced.
        "passes": [{"spec": r.spec, "status": r.status, "choices": r.stats} for r in report.records],
        "versions": {"rewrite": __version__, "torch": torch.__version__, "python": os.sys.version.split()[0]},
    }


def _pinned(passes: list[Pass], records: list) -> list[Pass]:
    """The pipeline with what each applied pass chose by timing fixed as options: `--recipe` then makes
    the same model under any load (a run that chose otherwise would differ in the last bits)."""
    if len(records) != len(passes):  # block by block: one record per block and pass
        return passes
    return [p.pinned(r.stats or {}) for p, r in zip(passes, records)]  # a choice not to rewrite is a choice too


def _hash(inputs: tuple) -> str:
    h = hashlib.sha256()
    for x in inputs:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
