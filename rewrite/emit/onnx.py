"""ONNX via torch.onnx.export(dynamo=True), checked with onnx.checker and run in onnxruntime for parity."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from rewrite import errors, kernels
from rewrite.ort import feed, run, session  # noqa: F401  (emitted models are run with these)
from rewrite.capture import Captured
from rewrite.emit import parity
from rewrite.report import Artifact


def export_onnx(module: nn.Module, captured: Captured, path: Path) -> None:
    for logger in ("torch.onnx", "onnxscript"):  # onnxscript's constant folding warns of what it leaves unfolded
        logging.getLogger(logger).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        table = kernels.onnx_translations()
        try:
            torch.onnx.export(module, captured.export_inputs, str(path), dynamo=True, verbose=False,
                              dynamic_shapes=captured.dynamic_shapes, custom_translation_table=table)
        except Exception:  # a rewrite may have made some dims static
            torch.onnx.export(module, captured.example_inputs, str(path), dynamo=True, verbose=False,
                              custom_translation_table=table)
    import onnx
    onnx.checker.check_model(str(path), full_check=False)


def first_line(exc: BaseException) -> str:
    """The exporter's messages are long: keep the first line of the error and of its root cause."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return " / ".join(dict.fromkeys(errors.first_line(e) for e in (exc, root)))


def why_not_exported(exc: BaseException) -> str:
    """Why the exporter failed, in the user's terms where the reason is a known one (an FNO's complex FFT
    outputs gave 'Failed to decompose the FX graph … slice_scatter … complex dtype'), else its first lines."""
    said = first_line(exc)
    if "complex" in said:
        return "it computes with complex tensors, which ONNX has no type for"
    return said


def emit_onnx(module: nn.Module, captured: Captured, out_dir: Path) -> Artifact:
    path = out_dir / "model.onnx"
    try:
        export_onnx(module, captured, path)
    except Exception as exc:
        return Artifact("onnx", "", None, f"ONNX export failed: {why_not_exported(exc)}")
    inputs = captured.example_inputs
    try:
        got = run(session(path), inputs)
    except Exception as exc:  # exported and checked, but onnxruntime cannot run it: not a usable artifact
        path.unlink(missing_ok=True)
        return Artifact("onnx", "", None, f"onnxruntime cannot run the exported model: {first_line(exc)}")
    return Artifact("onnx", str(path), parity(module, captured, got))
