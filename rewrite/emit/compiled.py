"""An AOTInductor package (`model.aoti.pt2`): compiled ahead of time for this machine's CPU (CUDA where present)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewrite.capture import Captured
from rewrite.emit import parity
from rewrite.emit.pt2 import export_program
from rewrite.errors import first_line
from rewrite.report import Artifact


def emit_compiled(module: nn.Module, captured: Captured, out_dir: Path) -> Artifact:
    path = out_dir / "model.aoti.pt2"
    try:
        program = export_program(module, captured)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        compiled = torch._inductor.aoti_load_package(str(path))
    except Exception as exc:
        return Artifact("compiled", "", None, f"AOTInductor compile failed: {first_line(exc, 200)}")
    inputs = captured.example_inputs
    return Artifact("compiled", str(path), parity(module, captured, compiled(*inputs)))
