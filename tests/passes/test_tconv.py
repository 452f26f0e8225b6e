"""tconv: factored chains equal the dense conv built from their factors; decompositions; the pass on a CNN."""
import pytest
import torch
from torch import nn

from rewrite import RewriteError, api, train
from rewrite.passes.tconv import factors
from rewrite.testing import ConvBN

SHAPES = [
    nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 3), dilation=(1, 2)),
    nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"),
    nn.Conv2d(6, 8, 3, padding="valid", bias=False),
    nn.Conv1d(4, 6, 5, padding="same"),
    nn.Conv1d(4, 6, 3, stride=2, dilation=2),
    nn.Conv3d(3, 5, 3, padding=1, padding_mode="circular"),
]


def _dense_twin(conv, chain):
    """A dense conv of the same geometry whose kernel is rebuilt from the chain's factors."""
    dense = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, padding_mode=conv.padding_mode, bias=conv.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(chain.dense_weight())
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    return dense


CASES = [(conv, fmt) for conv in SHAPES for fmt in ("cp", "tucker2", "separable")
         if fmt != "separable" or isinstance(conv, nn.Conv2d)]  # separable is 2-D only (tested below)


@pytest.mark.parametrize("conv, format", CASES,
                         ids=[f"{f}-{type(c).__name__}-{c.stride}-{c.padding}-{c.padding_mode}" for c, f in CASES])
def test_chain_equals_the_dense_conv_of_its_factors(conv, format):
    chain = {"cp": lambda: factors.decompose_cp(conv, 4), "tucker2": lambda: factors.decompose_tucker2(conv, 3, 4),
             "separable": lambda: factors.decompose_separable(conv, 4)}[format]()
    x = torch.randn(2, conv.in_channels, *[11] * len(conv.kernel_size))
    with torch.no_grad():
        torch.testing.assert_close(chain(x), _dense_twin(conv, chain)(x), rtol=1e-5, atol=1e-5)


def test_cp_als_recovers_a_tensor_of_that_rank():
    gen = torch.Generator().manual_seed(0)
    truth = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (8, 6, 5, 5)]
    tensor = factors.cp_dense(truth)
    found = factors.cp_als(tensor, 3)
    assert float((factors.cp_dense(found) - tensor).norm() / tensor.norm()) < 1e-6


@pytest.mark.parametrize("format", ["cp", "tucker2", "separable"])
def test_an_all_zero_kernel_factors_to_zero(format):
    """timm's ResNets zero-initialize each residual branch's last BatchNorm: after fold-bn its conv is all
    zero, and CP's least squares met a singular Gram matrix there (the pass rolled back with LinAlgError)."""
    conv = nn.Conv2d(6, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    chain = {"cp": lambda: factors.decompose_cp(conv, 4), "tucker2": lambda: factors.decompose_tucker2(conv, 3, 4),
             "separable": lambda: factors.decompose_separable(conv, 4)}[format]()
    assert torch.equal(chain.dense_weight(), torch.zeros_like(conv.weight))


def test_full_rank_tucker_and_separable_are_exact():
    conv = nn.Conv2d(4, 5, 3)
    for chain in (factors.decompose_tucker2(conv, 4, 5), factors.decompose_separable(conv, 12)):
        torch.testing.assert_close(chain.dense_weight(), conv.weight.detach(), rtol=1e-5, atol=1e-6)


def test_parameter_ratio_picks_the_largest_rank_within_it():
    conv = nn.Conv2d(32, 32, 5)
    rank = factors.rank_for_ratio(conv, "cp", 0.1)
    assert factors.chain_params(conv, "cp", rank) <= 0.1 * conv.weight.numel() < factors.chain_params(conv, "cp", rank + 1)


class WaveCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Conv2d(3, 16, 5, padding=2), nn.Conv2d(16, 16, 5, padding=2), nn.Conv2d(16, 1, 1)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.mid(torch.nn.functional.gelu(self.inp(x)))))


def test_pass_factors_every_eligible_conv_and_reports_kernel_errors():
    model = WaveCNN().eval()
    x = (torch.randn(2, 3, 16, 16),)
    result = api.optimize(model, x, "tconv{param-ratio=0.5,min-sqnr=-100}", calib=[x], measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["factorized"] == 2
    assert ("out", "1×1 conv: nothing to factor") in [tuple(s) for s in record.skipped]
    assert record.stats["kernel_rel_err"].startswith("inp ") and "mid " in record.stats["kernel_rel_err"]
    assert record.params_after < record.params_before
    assert sum(isinstance(m, factors.FactoredConv) for m in result.model.modules()) == 2


def test_onnx_parity(tmp_path):
    model = WaveCNN().eval()
    x = (torch.randn(2, 3, 16, 16),)
    result = api.optimize(model, x, "tconv{format=tucker2,min-sqnr=-100}", calib=[x], emit="onnx", out=tmp_path / "o",
                          measure_latency=False)
    onnx = next(a for a in result.report.artifacts if a.kind == "onnx")
    assert onnx.problem is None and onnx.parity["max_abs"] < 1e-4


def test_budget_search_picks_per_layer_ranks_on_outputs():
    model = WaveCNN().eval()
    with torch.no_grad():  # mid's kernel has Tucker rank 4: a small rank reproduces it, inp's does not
        core = torch.randn(4, 4, 5, 5)
        model.mid.weight.copy_(torch.einsum("pqyx,op,iq->oiyx", core, torch.randn(16, 4), torch.randn(16, 4)) / 20)
    calib = [(torch.randn(2, 3, 16, 16),) for _ in range(2)]
    record = api.optimize(model, calib[0], "tconv{format=tucker2,budget-sqnr=40,min-sqnr=40}", calib=calib,
                          measure_latency=False).report.records[0]
    assert record.status == "applied" and record.error["sqnr_db"] >= 40
    assert record.stats["ranks"] == "mid:4/4" and ("inp", "no rank stays within the budget") in map(tuple, record.skipped)


def test_a_priori_chain_trains_from_scratch_with_the_helper():
    torch.manual_seed(0)
    teacher = nn.Conv2d(2, 2, 3, padding=1)  # a target any rank-2 CP chain can fit: a separable kernel
    with torch.no_grad():
        teacher.weight.copy_(torch.einsum("oi,y,x->oiyx", torch.randn(2, 2), torch.randn(3), torch.randn(3)))
    student = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)).eval()
    result = api.optimize(student, (torch.randn(4, 2, 8, 8),), "tconv{init=random,rank=2}", measure_latency=False)
    assert result.report.records[0].status == "applied"
    batches = [(torch.randn(8, 2, 8, 8),) for _ in range(8)]
    with torch.no_grad():
        targets = [teacher(*b) for b in batches]
    log = train(result.model, batches, targets, steps=600, lr=1e-2)
    assert log["loss_after"] < 0.05 * log["loss_before"], log


@pytest.mark.parametrize("conv, text", [
    (nn.ConvTranspose2d(4, 4, 3), "transposed"),  # capture leaves it an aten op: no layer to match
    (nn.Conv2d(4, 4, 3, groups=4), "grouped conv (groups=4)"),
    (nn.Conv1d(4, 4, 3), "format=separable (k×1 then 1×k) is for Conv2d"),
])
def test_unsupported_convs_are_skipped_with_the_reason(conv, text):
    model = nn.Sequential(conv).eval()
    x = (torch.randn(1, 4, *[8] * (conv.weight.dim() - 2)),)
    record = api.optimize(model, x, "tconv{format=separable}", measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite" and text in record.reason


@pytest.mark.parametrize("spec, text", [("tconv{rank=-1}", "rank must be > 0"), ("tconv{param-ratio=1.5}", "param-ratio"),
                                         ("tconv{init=random,budget-sqnr=20}", "drop the budget")])
def test_bad_options_are_one_line_errors(spec, text):
    with pytest.raises(RewriteError, match=text):
        api.optimize(ConvBN(), (torch.randn(1, 3, 8, 8),), spec, measure_latency=False)


def test_a_rank_above_the_full_rank_is_skipped():
    model = nn.Sequential(nn.Conv2d(4, 4, 3)).eval()
    record = api.optimize(model, (torch.randn(1, 4, 8, 8),), "tconv{format=tucker2,rank=9}",
                          measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite" and "above this layer's full rank 4" in record.reason
