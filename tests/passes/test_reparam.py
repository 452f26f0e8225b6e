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
    def __init__(self, mode="zeros"):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=4, padding_mode=mode)
        self.b = nn.Conv2d(4, 4, 5, padding=2, stride=2, groups=4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_equal_strides_merge_exactly():
    result = check_pass(ReparamLargeKernel(), _Strided(), (torch.randn(2, 4, 12, 12),))
    [conv] = _convs(result.model)
    assert conv.stride == (2, 2) and conv.kernel_size == (5, 5)


class _DifferentInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(torch.relu(x))


@pytest.mark.parametrize("model, reason", [(_Strided("reflect"), "padded"),
                                                  (_DifferentInputs(), "different inputs")])
def test_incompatible_branches_are_skipped_with_reason(model, reason):
    result = check_pass(ReparamLargeKernel(), model.eval(), (torch.randn(2, 4, 8, 8),))
    record = result.report.records[0]
    assert record.status == "nothing to rewrite" and reason in record.reason


def test_a_plain_residual_add_is_not_a_match():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    result = check_pass(ReparamLargeKernel(), model, (torch.randn(1, 3, 8, 8),))
    assert result.report.records[0].status == "nothing to rewrite"


class _InPlaceRepVGG(nn.Module):
    """timm's spelling: `x = conv_1x1(x) + conv_kxk(x); x += identity(x)` with a BatchNorm identity."""

    def __init__(self, c=8, stride=1):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c))
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c) if stride == 1 else None

    def forward(self, x):
        identity = self.identity(x) if self.identity is not None else None
        y = self.pw(x) + self.kxk(x)
        if identity is not None:
            y += identity
        return torch.relu(y)


@pytest.mark.parametrize("stride", [1, 2])
def test_in_place_sums_and_bn_identities_merge_completely(stride):
    from rewrite.testing import randomize_batchnorm
    model = nn.Sequential(_InPlaceRepVGG(stride=stride), _InPlaceRepVGG()).eval()
    randomize_batchnorm(model)
    result = check_pass(ReparamLargeKernel(), model, (torch.randn(2, 8, 12, 12),))
    assert len(_convs(result.model)) == 2  # one conv per block: no branch, BN or in-place add left running
    assert not [n for n in result.model.graph.nodes if n.op == "call_function" and "add" in str(n.target)]


@pytest.mark.slow
@pytest.mark.parametrize("name, params", [("repvgg_a0", 8_309_384), ("mobileone_s0", 2_078_504)])
def test_timm_reparam_models_reach_timms_own_deploy_form(name, params):
    """The models that showed the in-place-add bug: parameters now equal timm's reparameterize_model."""
    from rewrite import api
    from rewrite.testing import randomize_batchnorm
    from tests.conftest import timm
    model = timm().create_model(name, pretrained=False).eval()
    randomize_batchnorm(model)
    result = api.optimize(model, (torch.randn(2, 3, 64, 64),), "fold-bn,reparam", measure_latency=False)
    fold, reparam = result.report.records
    assert fold.status == reparam.status == "applied", reparam.reason
    assert reparam.params_after == params and not reparam.reason  # no growth flag
