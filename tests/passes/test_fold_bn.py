import pytest
import torch
from torch import nn

from rewrite.passes.fold_bn import FoldBatchNorm
from rewrite.testing import ConvBN, check_pass, randomize_batchnorm


def _kinds(gm):
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_and_linear_batchnorms_fold(dims):
    model = ConvBN(dims)
    result = check_pass(FoldBatchNorm(), model, model.example_inputs())
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in _kinds(result.model))
    assert result.report.records[0].stats == {"folded": 3}
    x = model.example_inputs()[0]
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


class _SharedConv(nn.Module):
    """The conv output feeds the BN and something else: folding would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        randomize_batchnorm(self)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Untracked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class _NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_conv_with_another_user_is_skipped_with_reason():
    result = check_pass(FoldBatchNorm(), _SharedConv(), (torch.randn(2, 3, 8, 8),))
    record = result.report.records[0]
    assert record.status == "nothing to rewrite" and "also used elsewhere" in record.reason


def test_batchnorm_without_running_stats_is_left_alone():
    result = check_pass(FoldBatchNorm(), _Untracked(), (torch.randn(2, 3, 8, 8),))
    assert result.report.records[0].status == "nothing to rewrite"


def test_no_batchnorm_means_nothing_to_rewrite():
    result = check_pass(FoldBatchNorm(), _NoBN(), (torch.randn(2, 3, 8, 8),))
    record = result.report.records[0]
    assert record.status == "nothing to rewrite" and "BatchNorm" in record.reason


class _LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: BatchNorm1d over every token of every sequence, per feature."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear, self.bn = nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _LeViTMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.act, self.ln2 = _LinearNorm(8, 16), nn.Hardswish(), _LinearNorm(16, 8)
        randomize_batchnorm(self)

    def forward(self, x):
        return self.ln2(self.act(self.ln1(x)))


def test_levit_s_batchnorm_over_tokens_folds_and_leaves_a_feed_forward():
    from rewrite.patterns import feed_forward
    model, x = _LeViTMlp().eval(), torch.randn(2, 5, 8)
    result = check_pass(FoldBatchNorm(), model, (x,))
    assert result.report.records[0].stats == {"folded": 2}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in _kinds(result.model))
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
    [match] = feed_forward().find(result.model)  # prune, fwsvd and snnk now see Linear → Hardswish → Linear
    assert match.variant == "Hardswish"


def test_a_batchnorm_over_the_tokens_of_4d_input_is_not_folded():
    """flatten(0, 1) of (batch, heads, tokens, features) leaves BatchNorm1d a 3-D input: it normalizes axis 1."""
    model = _LinearNorm(8, 6)
    model.bn = nn.BatchNorm1d(4)  # the axis it normalizes: the 4 tokens, not the 6 features
    randomize_batchnorm(model)
    result = check_pass(FoldBatchNorm(), model.eval(), (torch.randn(2, 3, 4, 8),))
    record = result.report.records[0]
    assert record.status == "nothing to rewrite" and "matching rank" in record.reason


class _NormLinear(nn.Module):
    """timm LeViT's head: BatchNorm1d on (batch, features), dropout, then a Linear."""

    def __init__(self):
        super().__init__()
        self.bn, self.drop, self.linear = nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 3)
        randomize_batchnorm(self)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


def test_a_batchnorm_before_a_linear_folds_into_it():
    model, x = _NormLinear().eval(), torch.randn(5, 8)
    result = check_pass(FoldBatchNorm(), model, (x,))
    assert result.report.records[0].stats == {"folded": 1}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in _kinds(result.model))
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
