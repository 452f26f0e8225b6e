import sys
from pathlib import Path

import onnx
import pytest
import torch

from rewrite import api
from rewrite.emit import onnx as onnx_emit

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    from cnn import build
    model, inputs = build()
    out = tmp_path_factory.mktemp("out")
    result = api.optimize(model, inputs, "fold-bn,reparam", emit="onnx", out=out)
    return model, inputs, result, out


@pytest.mark.slow
def test_pt2_reloads_and_matches_the_original(cnn_run):
    model, inputs, result, out = cnn_run
    reloaded = torch.export.load(out / "model.pt2").module()
    x = torch.randn(3, 3, 40, 40)  # other batch and resolution: dims stayed dynamic
    torch.testing.assert_close(reloaded(x), model(x), rtol=1e-4, atol=1e-5)
    [pt2] = [a for a in result.report.artifacts if a.kind == "pt2"]
    assert pt2.parity["max_abs"] == 0.0


@pytest.mark.slow
def test_onnx_passes_the_checker_and_matches_in_onnxruntime(cnn_run):
    model, inputs, result, out = cnn_run
    onnx.checker.check_model(str(out / "model.onnx"))
    session = onnx_emit.session(out / "model.onnx")
    x = torch.randn(5, 3, 32, 32)
    got = onnx_emit.run(session, (x,))[0]
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-4)


def test_an_example_of_one_row_writes_a_pt2_and_onnx_of_any_batch(tmp_path):
    """The artifacts are exported again from the rewritten graph: traced at the example's one row, export fixed
    the batch of the .pt2 and the ONNX file to 1 (and torch warned of it on the user's terminal)."""
    from rewrite.testing import TinyMLP
    model = TinyMLP()
    calib = [(torch.randn(1, 16),) for _ in range(2)]
    api.optimize(model, calib[0], "fold-bn", calib=calib, emit="onnx", out=tmp_path, measure_latency=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(torch.export.load(tmp_path / "model.pt2").module()(x), model(x))
    got = onnx_emit.run(onnx_emit.session(tmp_path / "model.onnx"), (x,))[0]
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_report_files_and_latency_per_backend(cnn_run):
    _, _, result, out = cnn_run
    assert {"report.md", "report.json", "recipe.json", "model.pt2", "model.onnx"} <= {p.name for p in out.iterdir()}
    backends = {(m.label, m.backend) for m in result.report.measurements}
    assert backends == {("original", "torch"), ("rewritten", "torch"),
                        ("original", "onnxruntime"), ("rewritten", "onnxruntime")}
    layers = {m.label: m.layers for m in result.report.measurements if m.backend == "torch"}
    assert layers["rewritten"] < layers["original"]
    assert "fold-bn" in (out / "report.md").read_text()


@pytest.mark.slow
def test_compiled_aotinductor_package(tmp_path):
    from rewrite.testing import TinyMLP
    model = TinyMLP().eval()
    x = model.example_inputs()
    result = api.optimize(model, x, "fold-bn", emit="compiled", out=tmp_path, measure_latency=False)
    [art] = [a for a in result.report.artifacts if a.kind == "compiled"]
    assert art.path, art.note
    compiled = torch._inductor.aoti_load_package(art.path)
    torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)


class _Spectral(torch.nn.Module):
    """A spectral layer as FNOs have them: complex weights on the low modes of an rFFT."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, dtype=torch.cfloat))

    def forward(self, x):
        f = torch.fft.rfft(x)
        f = torch.cat([f[..., :4] * self.w, torch.zeros_like(f[..., 4:])], -1)
        return torch.fft.irfft(f, n=x.shape[-1])


def test_an_original_that_onnx_cannot_hold_says_why_in_words():
    """The README's main job once printed the exporter's 'Failed to decompose the FX graph … slice_scatter
    does not support automatic differentiation for outputs with complex dtype' as its reason."""
    from rewrite import capture
    from rewrite.emit import write
    from rewrite.report import RunReport
    model, x = _Spectral().eval(), torch.randn(2, 16)
    report = RunReport("drop-noops", "graph", "x")
    write.ort_timing(report, model, capture.capture(model, (x,)), Path("never-read.onnx"))
    [warning] = report.warnings
    assert "complex tensors, which ONNX has no type for" in warning and "Failed to decompose" not in warning
