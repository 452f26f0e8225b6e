import pytest
import torch
from torch import nn

from rewrite.passes.reparam import ReparamLargeKernel, _densify
from rewrite.testing import ParallelBranches, check_pass


def _convs(gm):
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]


def test_branches_and_identity_merge_into_one_large_kernel():
    model = ParallelBranches()
    x = torch.randn(2, 6, 12, 12)
    result = check_pass(ReparamLargeKernel(), model, (x,))
    [conv] = _convs(result.model)
    assert conv.kernel_size == (5, 5) and conv.groups == 6 and conv.dilation == (1, 1)
    assert [n.op for n in result.model.graph.nodes].count("call_function") == 0  # no add left
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_dilated_kernel_densifies_onto_every_rth_tap():
    conv = nn.Conv2d(1, 1, 3, dilation=3, padding=3, bias=False)
    dense = _densify(conv)
    assert dense.shape[-2:] == (7, 7)
    x = torch.randn(1, 1, 9, 9)
    torch.testing.assert_close(nn.functional.conv2d(x, dense, padding=3), conv(x))


class _Conv1dBranches(nn.Module):
    """Non-depthwise 1-D branches (groups=1, bias, no BN) also merge."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 4, 7, padding=3)
        self.b = nn.Conv1d(4, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_plain_conv1d_branches_merge():
    model = _Conv1dBranches().eval()
    x = torch.randn(2, 4, 20)
    result = check_pass(ReparamLargeKernel(), model, (x,))
    assert result.report.records[0].stats == {"merged_groups": 1}
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


class _Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=4)
        self.b = nn.Conv2d(4, 4, 5, padding=2, stride=2, groups=4)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _DifferentInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(torch.relu(x))


@pytest.mark.parametrize("model, reason", [(_Strided(), "stride"), (_DifferentInputs(), "different inputs")])
def test_incompatible_branches_are_skipped_with_reason(model, reason):
    result = check_pass(ReparamLargeKernel(), model.eval(), (torch.randn(2, 4, 8, 8),))
    record = result.report.records[0]
    assert record.status == "nothing to rewrite" and reason in record.reason


def test_a_plain_residual_add_is_not_a_match():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    result = check_pass(ReparamLargeKernel(), model, (torch.randn(1, 3, 8, 8),))
    assert result.report.records[0].status == "nothing to rewrite"
