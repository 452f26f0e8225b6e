import pytest
import torch
from torch import nn

from rewrite import api
from rewrite.passes.inplace import Inplace, write_into
from rewrite.testing import check_pass


class Block(nn.Module):
    """An FNO-style block: layer outputs that die at an add, a GELU, and soft-gating's x + w·skip."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.mlp = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.gate = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        y = nn.functional.gelu(self.a(x) + self.b(x))
        return torch.tanh(self.mlp(y) + self.gate * x)


def _written(gm) -> list[str]:
    return [n.args[0] for n in gm.graph.nodes if n.target is write_into]


def test_ops_whose_operand_dies_there_write_into_it_with_the_same_outputs():
    model, x = Block().eval(), torch.randn(2, 4, 8, 8)
    result = check_pass(Inplace(), model, (x,))
    record = result.report.records[0]
    assert record.status == "applied" and record.stats == {"addcmul": 1, "in_place": 4}
    assert sorted(_written(result.model)) == ["add", "addcmul", "gelu", "tanh"]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-6, atol=1e-6)
        x_before = x.clone()
        result.model(x)
    assert torch.equal(x, x_before)  # the user's input is never written: it is a graph input


class Shared(nn.Module):
    """Every operand is still needed afterwards, is a graph input, or is a parameter: nothing to reuse."""

    def __init__(self):
        super().__init__()
        self.lin, self.bias = nn.Linear(4, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = self.lin(x)
        v = h.view(-1)  # a view of h that is read later
        g = torch.relu(h)  # h is read again below
        return g + h, torch.sigmoid(x), self.bias * 2, v.sum()


def test_operands_read_later_inputs_and_parameters_are_left_alone():
    model, x = Shared().eval(), torch.randn(3, 4)
    result = api.optimize(model, (x,), "inplace", measure_latency=False)
    record = result.report.records[0]
    written = _written(result.model) if record.status == "applied" else []
    assert "relu" not in written and "sigmoid" not in written and "mul" not in written
    with torch.no_grad():
        for got, want in zip(result.model(x), model(x)):
            torch.testing.assert_close(got, want)


class Broadcasting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.lin(x) + y  # lin(x) (B, 1, 4) dies here, but the sum is (B, 3, 4): it cannot hold it


def test_a_result_wider_than_its_operand_runs_out_of_place():
    model, x, y = Broadcasting().eval(), torch.randn(2, 1, 4), torch.randn(2, 3, 4)
    result = check_pass(Inplace(), model, (x, y))
    assert _written(result.model) == ["add"]  # chosen from the graph; the shapes are checked at run time
    with torch.no_grad():
        torch.testing.assert_close(result.model(x, y), model(x, y))


def test_training_runs_out_of_place_and_gets_the_same_gradients():
    model, x = Block(), torch.randn(2, 4, 8, 8)
    result = api.optimize(model, (x,), "inplace", measure_latency=False)
    rewritten = result.model
    rewritten(x).square().sum().backward()
    model(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), rewritten.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_onnx_export_of_the_rewritten_graph_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = Block().eval(), torch.randn(2, 4, 8, 8)
    result = api.optimize(model, (x,), "inplace", emit="onnx", out=tmp_path, measure_latency=False)
    [art] = [a for a in result.report.artifacts if a.kind == "onnx"]
    assert art.parity["max_abs"] < 1e-5, art.note


class NewGELU(nn.Module):
    """GPT-2's GELU: constant factors (x + 0.044715·x³) are no addcmul (it takes three tensors)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return 0.5 * h * (1.0 + torch.tanh(0.79788456 * (h + 0.044715 * torch.pow(h, 3.0))))


def test_a_constant_factor_is_not_fused_into_addcmul():
    model, x = NewGELU().eval(), torch.randn(3, 4)
    result = check_pass(Inplace(), model, (x,))
    assert result.report.records[0].stats["addcmul"] == 0
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_a_graph_without_elementwise_ops_has_nothing_to_rewrite():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    record = api.optimize(model, (torch.randn(2, 4),), "inplace", measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite"


def test_calibration_probes_know_the_rewritten_graph_writes_in_place():
    from rewrite.calibration import Suffixes
    model, x = Block().eval(), torch.randn(2, 4, 8, 8)
    result = api.optimize(model, (x,), "inplace", measure_latency=False)
    assert Suffixes.usable(api.optimize(model, (x,), "fold-bn", measure_latency=False).model, [(x,)])
    assert not Suffixes.usable(result.model, [(x,)])  # a kept value could be overwritten by a later op
