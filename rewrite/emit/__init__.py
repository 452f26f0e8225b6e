"""Emitters: a rewritten module → an artifact on disk, reloaded and checked for parity with the module.

Each emitter is `emit(module, captured, out_dir) -> Artifact`, registered under the
`rewrite.emitters` entry-point group like passes are.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from rewrite import capture, verify
from rewrite.capture import Captured
from rewrite.report import Artifact


def parity(module: nn.Module, captured: Captured, got: Any) -> dict[str, Any]:
    """An artifact's outputs `got` on the example inputs against the verified module's; and, for
    report.Artifact's accuracy rule, the artifact's and the module's distance from the original model."""
    inputs = captured.example_inputs
    want = capture.run(module, inputs)
    result = verify.compare([want], [got]).to_dict()
    if result["rel_l2"] > Artifact.PARITY_REL_L2 and captured.original not in (None, module):
        reference = [capture.run(captured.original, inputs)]
        result["vs_original_rel_l2"] = verify.compare(reference, [got]).rel_l2
        result["rewrite_rel_l2"] = verify.compare(reference, [want]).rel_l2
    return result
