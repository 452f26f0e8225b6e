"""rewrite: capture a PyTorch model, apply verified rewrite passes from papers, measure, emit .pt2 / ONNX."""
import os

__version__ = "0.1.0"
# torch's OpenMP threads must not spin while onnxruntime is timed on the same 2 cores (design.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rewrite.api import Result, diff, load, optimize  # noqa: E402
from rewrite.errors import CaptureError, PassError, RewriteError  # noqa: E402
from rewrite.pass_base import Approx, Exact, Pass, PassContext, PassResult  # noqa: E402

__all__ = ["optimize", "diff", "load", "Result", "Pass", "PassResult", "PassContext", "Exact", "Approx",
           "RewriteError", "CaptureError", "PassError", "__version__"]
