import pytest
import torch
from torch import nn

from rewrite import api
from rewrite.passes.pointwise import PointwiseMatmul


class Lifting(nn.Module):
    """A neural operator's ends: 1×1 lifting and projection around a 3×3 conv and a strided 1×1."""

    def __init__(self):
        super().__init__()
        self.lift = nn.Conv2d(3, 16, 1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 16, 1, stride=2)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.project = nn.Conv2d(16, 1, 1, bias=False)

    def forward(self, x):
        return self.project(self.grouped(self.down(torch.relu(self.mix(torch.relu(self.lift(x)))))))


@pytest.mark.parametrize("form", ["matmul", "linear"])
def test_one_by_one_convolutions_become_gemms_with_the_same_outputs(form):
    model, x = Lifting().eval(), torch.randn(2, 3, 12, 12)
    result = api.optimize(model, (x,), f"pointwise{{form={form}}}", measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["forms"] == {"lift": form, "project": form}
    assert isinstance(result.model.lift, PointwiseMatmul) and isinstance(result.model.mix, nn.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    reasons = dict(record.skipped)
    assert "not 1×1" in reasons["mix"] and "strided" in reasons["down"] and "groups=4" in reasons["grouped"]


def test_auto_keeps_the_faster_gemm_unless_the_conv_is_clearly_faster_and_records_the_times():
    from rewrite.passes.pointwise import TIE
    model, x = Lifting().eval(), torch.randn(1, 3, 16, 16)
    record = api.optimize(model, (x,), "pointwise", measure_latency=False).report.records[0]
    for path in ("lift", "project"):
        timed = record.stats["ms"][path]
        assert set(timed) == {"conv", "matmul", "linear"}
        gemm = min(timed["matmul"], timed["linear"])
        chosen = record.stats["forms"].get(path, "conv")
        if chosen == "conv":
            assert timed["conv"] < (1 - TIE) * gemm
        else:
            assert timed[chosen] == gemm and timed["conv"] >= (1 - TIE) * gemm


def test_conv1d_and_conv3d_channel_mlps_and_onnx_export(tmp_path):
    model = nn.Sequential(nn.Conv1d(4, 8, 1), nn.GELU(), nn.Conv1d(8, 2, 1)).eval()
    x = torch.randn(2, 4, 50)
    result = api.optimize(model, (x,), "pointwise{form=matmul}", emit="onnx", out=tmp_path, measure_latency=False)
    assert result.report.records[0].stats["rewritten"] == 2
    [onnx] = [a for a in result.report.artifacts if a.kind == "onnx"]
    assert onnx.parity["max_abs"] < 1e-5
    cube = nn.Sequential(nn.Conv3d(2, 3, 1)).eval()
    y = torch.randn(1, 2, 4, 5, 6)
    out = api.optimize(cube, (y,), "pointwise{form=linear}", measure_latency=False)
    torch.testing.assert_close(out.model(y), cube(y), rtol=1e-5, atol=1e-5)


def test_a_model_without_one_by_one_convolutions_has_nothing_to_rewrite():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    record = api.optimize(model, (torch.randn(1, 3, 8, 8),), "pointwise", measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite" and "not 1×1" in dict(record.skipped)["0"]
