"""rewrite: capture a PyTorch model, apply verified rewrite passes from papers, measure, emit .pt2 / ONNX.

The names below load on first use (PEP 562), so `rewrite --help` and a mistyped pass name answer before
torch is imported.
"""
import importlib

__version__ = "0.1.0"

from rewrite.errors import ArtifactError, CaptureError, InvalidValue, PassError, RewriteError  # noqa: E402

_LAZY = {"optimize": "rewrite.api", "tune": "rewrite.tune", "diff": "rewrite.api", "load": "rewrite.api", "Result": "rewrite.api",
         "train": "rewrite.recover", "Pass": "rewrite.pass_base", "PassResult": "rewrite.pass_base",
         "PassContext": "rewrite.pass_base", "Exact": "rewrite.pass_base", "Approx": "rewrite.pass_base",
         "SqnrFloor": "rewrite.pass_base"}

__all__ = ["optimize", "tune", "diff", "load", "train", "Result", "Pass", "PassResult", "PassContext", "Exact", "Approx",
           "SqnrFloor", "RewriteError", "ArtifactError", "CaptureError", "InvalidValue", "PassError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rewrite' has no attribute {name!r}")
