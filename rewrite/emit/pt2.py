"""`.pt2` via torch.export.save; reloaded with torch.export.load and compared with the in-memory module."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rewrite import capture
from rewrite.capture import Captured
from rewrite.emit import parity
from rewrite.errors import RewriteError
from rewrite.report import Artifact


def export_program(module: nn.Module, captured: Captured) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, captured.export_inputs, dynamic_shapes=captured.dynamic_shapes,
                                   strict=False)
    except Exception:
        return torch.export.export(module, captured.example_inputs, strict=False)  # dims the rewrite made static


def emit_pt2(module: nn.Module, captured: Captured, out_dir: Path) -> Artifact:
    try:
        program = export_program(module, captured)
    except Exception as exc:
        return _pickled(module, out_dir, f"not exportable ({capture.explain_failure(exc, module)})")
    path = out_dir / "model.pt2"
    save_program(program, path)
    reloaded = torch.export.load(path).module()
    inputs = captured.example_inputs
    return Artifact("pt2", str(path), parity(module, captured, capture.run(reloaded, inputs)))


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    _through_memory(lambda f: torch.export.save(program, f), path)


def _through_memory(save: Callable[[Any], None], path: Path) -> None:
    """torch's zip writer aborts the whole process when a write to disk fails (a full disk, a file-size
    limit): its destructor throws. Built in memory and written by Python, a failed write is an OSError."""
    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getbuffer())


def _pickled(module: nn.Module, out_dir: Path, why: str) -> Artifact:
    path = out_dir / "model.pt"
    try:
        _through_memory(lambda f: torch.save(module, f), path)
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
