"""`.pt2` via torch.export.save; reloaded with torch.export.load and compared with the in-memory module."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewrite import capture
from rewrite.capture import Captured
from rewrite.emit import parity
from rewrite.errors import RewriteError
from rewrite.report import Artifact


def export_program(module: nn.Module, captured: Captured) -> torch.export.ExportedProgram:
    inputs = captured.example_inputs
    try:
        return torch.export.export(module, inputs, dynamic_shapes=captured.dynamic_shapes, strict=False)
    except Exception:
        return torch.export.export(module, inputs, strict=False)  # dims the rewrite made static


def emit_pt2(module: nn.Module, captured: Captured, out_dir: Path) -> Artifact:
    try:
        program = export_program(module, captured)
    except Exception as exc:
        return _pickled(module, out_dir, f"not exportable ({capture.explain_failure(exc, module)})")
    path = out_dir / "model.pt2"
    torch.export.save(program, path)
    reloaded = torch.export.load(path).module()
    inputs = captured.example_inputs
    return Artifact("pt2", str(path), parity(module, captured, capture.run(reloaded, inputs)))


def _pickled(module: nn.Module, out_dir: Path, why: str) -> Artifact:
    path = out_dir / "model.pt"
    try:
        torch.save(module, path)
    except Exception as exc:  # some graph modules hold local functions: then there is no artifact to write
        path.unlink(missing_ok=True)
        return Artifact("pt2", None, None, f"{why}; a pickled copy failed too ({type(exc).__name__})")
    return Artifact("pt", str(path), None, f"saved as a pickled module instead: {why}")


def load_pt2(path: str | Path) -> tuple[nn.Module, tuple]:
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise RewriteError(f"{str(path)!r} is not a readable .pt2 ExportedProgram ({type(exc).__name__}); "
                           "re-save it with torch.export.save") from exc
    args, kwargs = program.example_inputs or ((), {})
    return program.module(), tuple(args) + tuple(kwargs.values())
