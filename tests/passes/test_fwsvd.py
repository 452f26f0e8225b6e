import pytest
import torch
from torch import nn

from rewrite import api
from rewrite.pass_base import Pass
from rewrite.passes.fwsvd import FisherSVD, fisher_importance, fisher_svd
from rewrite.passes.lowrank import LowRankLinear
from rewrite.testing import check_pass
from tests.passes.test_lowrank import FFN


def test_factors_reproduce_the_weighted_rank_r_matrix():
    layer = nn.Linear(20, 12)
    importance = torch.rand(20) + 0.1
    new = fisher_svd(layer, importance, 4)
    d = importance.double().sqrt()
    u, s, vh = torch.linalg.svd(layer.weight.double() * d, full_matrices=False)
    want = (u[:, :4] * s[:4]) @ vh[:4] / d
    got = new.second.weight.double() @ new.first.weight.double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert new.first.bias is None and torch.equal(new.second.bias, layer.bias)


def test_full_rank_is_the_layer_itself():
    layer = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fisher_svd(layer, torch.rand(8) + 0.1, 6)(x), layer(x), rtol=1e-4, atol=1e-5)


def test_weighting_protects_the_important_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, bias=False)
    importance = torch.ones(16)
    importance[:4] = 1e4  # only the first 4 inputs matter
    x = torch.zeros(64, 16)
    x[:, :4] = torch.randn(64, 4)
    weighted = (fisher_svd(layer, importance, 4)(x) - layer(x)).norm()
    plain = (fisher_svd(layer, None, 4)(x) - layer(x)).norm()
    assert weighted < 0.05 * plain


def test_exact_per_sample_fisher_differs_from_the_batch_estimate():
    torch.manual_seed(0)
    model = FFN().eval()
    batches = [(torch.randn(4, 32),)]
    exact = fisher_importance(model, ["up1"], batches, None, per_sample=True, seed=0)["up1"]
    batch = fisher_importance(model, ["up1"], batches, None, per_sample=False, seed=0)["up1"]
    assert exact.shape == (32,) and (exact > 0).all() and not torch.allclose(exact, batch)
    assert all(p.grad is None for p in model.parameters())


def test_pass_replaces_ffn_linears_and_reports_the_fisher_kind():
    model = FFN().eval()
    calib = [torch.randn(8, 32) for _ in range(2)]
    result = check_pass(FisherSVD(param_ratio=0.5, min_sqnr=0), model, (calib[0],), calib=calib)
    assert sum(isinstance(m, LowRankLinear) for m in result.model.modules()) == 4
    assert result.report.records[0].stats["fisher"] == "batch"


def test_labels_give_a_cross_entropy_fisher():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    x = torch.randn(32, 16)
    calib = {"inputs": [x], "targets": [torch.randint(0, 5, (32,))]}
    result = api.optimize(model, (x,), "fwsvd{param-ratio=0.5,min-sqnr=0}", calib=calib, measure_latency=False)
    assert result.report.records[0].stats["fisher"] == "batch (labels)"


def test_integer_outputs_without_gradients_are_a_clear_error():
    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 4)

        def forward(self, x):
            return self.down(torch.relu(self.up(x))).argmax(-1)

    with pytest.raises(api.RewriteError, match="no floating-point output|no gradient"):
        api.optimize(Argmax(), (torch.randn(4, 8),), "fwsvd", calib=[torch.randn(4, 8)], measure_latency=False)


def test_a_zero_head_that_hides_the_layers_gradients_names_the_fix():
    model = nn.Sequential(FFN(), nn.Linear(32, 10)).eval()
    nn.init.zeros_(model[1].weight)  # timm's Mixer starts so: the outputs ignore every layer before the head
    calib = [torch.randn(8, 32) for _ in range(2)]
    with pytest.raises(api.RewriteError, match=r"head whose weights are all zero.*fwsvd\{fisher=none\}"):
        api.optimize(model, (calib[0],), "fwsvd", calib=calib, measure_latency=False)
    result = api.optimize(model, (calib[0],), "fwsvd{fisher=none,param-ratio=0.5}", calib=calib, measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and "the outputs are the original's bit for bit" in record.reason


def test_recovery_trains_the_fisher_factors_toward_the_original():
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(32, 32) for _ in range(4)]
    record = api.optimize(model, (calib[0],), "fwsvd{param-ratio=0.3,min-sqnr=0}", calib=calib,
                          recover="steps=100,lr=3e-3", measure_latency=False).report.records[0]
    assert record.status == "applied" and record.stats["recovery_steps"] > 0
    assert record.stats["sqnr_db_held_out"] > record.stats["sqnr_db_before_recovery"]
    assert record.stats["recovery_lr"] == 3e-3  # the lr the user gave


def test_recovery_without_an_lr_takes_the_pass_s_own():
    torch.manual_seed(0)
    calib = [torch.randn(16, 32) for _ in range(2)]
    record = api.optimize(FFN().eval(), (calib[0],), "fwsvd{param-ratio=0.5,min-sqnr=-100}", calib=calib,
                          recover="steps=2", measure_latency=False).report.records[0]
    assert record.stats["recovery_lr"] == FisherSVD.recovery_lr < Pass.recovery_lr


def test_whitened_fisher_ranks_share_one_budget_across_layers():
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(16, 32) for _ in range(4)]
    record = api.optimize(model, (calib[0],), "fwsvd{param-ratio=0.6,min-sqnr=-100}", calib=calib,
                          measure_latency=False).report.records[0]
    assert record.status == "applied" and record.stats["ranks"] == "global"
    assert record.stats["target_weights_kept"] <= 0.6


def test_budget_params_sets_the_factorizing_passes_ratio():
    from rewrite.spec import parse_spec, with_budget
    (fwsvd,) = with_budget(parse_spec("fwsvd"), "params=0.7")
    assert fwsvd.param_ratio == 0.7
    with pytest.raises(api.RewriteError, match="fraction of weights to keep"):
        with_budget(parse_spec("fwsvd"), "params=7")


def test_without_the_fisher_the_whitened_ratio_is_uniform():
    model = FFN().eval()
    calib = [torch.randn(16, 32) for _ in range(2)]
    record = api.optimize(model, (calib[0],), "fwsvd{fisher=none,param-ratio=0.5,min-sqnr=-100}", calib=calib,
                          measure_latency=False).report.records[0]
    assert record.stats["ranks"] == "uniform" and record.stats["factorized"] == 4


def _tiny_gpt2():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    calib = [(torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    return transformers.GPT2LMHeadModel(cfg).eval(), calib


def test_a_conv1d_is_the_linear_of_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    from rewrite.compress import conv1d_as_linear, is_conv1d
    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 5, 16)
    assert is_conv1d(conv) and not is_conv1d(torch.nn.Linear(16, 24))
    torch.testing.assert_close(conv1d_as_linear(conv)(x), conv(x))


@pytest.mark.parametrize("spec, expected", [("fwsvd{target=all,min-sqnr=-100}", 8), ("fwsvd{min-sqnr=-100}", 4),
                                            ("lowrank{param-ratio=0.5,min-sqnr=-100}", 4)])
def test_gpt2_conv1d_layers_are_factorized(spec, expected):
    import rewrite
    from rewrite.passes.lowrank import LowRankLinear
    model, calib = _tiny_gpt2()
    before = [p for p, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    result = rewrite.optimize(model, calib[0], spec, calib=calib, measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied", record.reason
    factorized = [p for p, m in result.model.named_modules() if isinstance(m, LowRankLinear)]
    assert len(factorized) == record.stats["factorized"] and 0 < len(factorized) <= expected
    assert all(".mlp." in p for p in factorized) or "target=all" in spec
    assert len(before) == 8 and all(type(m).__name__ == "Conv1D" for p, m in model.named_modules() if p in before)
    assert record.params_after < record.params_before
    assert hasattr(result.model, "generate")


def test_the_layers_the_pipeline_says_to_leave_are_left_with_its_reason():
    """ctx.leave_as_is (your class reads them as tensors: nn.MultiheadAttention's projections) is honoured by the
    factorizing passes too, so the class comes back."""
    from tests.passes.test_dgq import _PooledEncoder
    torch.manual_seed(0)
    calib = [(torch.randn(2, 5, 16),) for _ in range(4)]
    result = api.optimize(_PooledEncoder().eval(), calib[0], "fwsvd{target=all,param-ratio=0.5,min-sqnr=-100}",
                          calib=calib, measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied", record.reason
    skipped = dict(record.skipped)
    assert "reads its weight as a tensor" in skipped["attn.out_proj"] and "attn.in_proj" in skipped
    assert type(result.model) is _PooledEncoder and isinstance(result.model.attn.out_proj, nn.Linear)
    assert not isinstance(result.model.attn.out_proj, LowRankLinear)
