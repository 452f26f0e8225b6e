"""rewrite: capture a PyTorch model, apply verified rewrite passes from papers, measure, emit .pt2 / ONNX."""
__version__ = "0.1.0"

from rewrite.api import Result, diff, load, optimize  # noqa: E402
from rewrite.errors import ArtifactError, CaptureError, InvalidValue, PassError, RewriteError  # noqa: E402
from rewrite.pass_base import Approx, Exact, Pass, PassContext, PassResult, SqnrFloor  # noqa: E402
from rewrite.recover import train  # noqa: E402

__all__ = ["optimize", "diff", "load", "train", "Result", "Pass", "PassResult", "PassContext", "Exact", "Approx", "SqnrFloor",
           "RewriteError", "ArtifactError", "CaptureError", "InvalidValue", "PassError", "__version__"]
