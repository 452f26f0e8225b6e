import pytest
import torch
from torch import nn

from rewrite import api, compress
from rewrite.errors import RewriteError
from rewrite.passes.lowrank import BlockDenseLinear, LowRankLinear, StructuredFFN, block_dense, low_rank
from rewrite.testing import ConvBN, check_pass


class FFN(nn.Module):
    """Two transformer-style FFN blocks and an attention-like projection that is not an FFN."""

    def __init__(self, d=32, hidden=128):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.up1, self.down1 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.up2, self.down2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        x = self.proj(x)
        x = x + self.down1(torch.nn.functional.gelu(self.up1(x)))
        return x + self.down2(torch.relu(self.up2(x)))


def _low_rank_weight(out, inp, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g) / rank


def test_truncated_svd_reproduces_an_exact_rank_layer():
    layer = nn.Linear(24, 40)
    with torch.no_grad():
        layer.weight.copy_(_low_rank_weight(40, 24, 5))
    x = torch.randn(7, 24)
    torch.testing.assert_close(low_rank(layer, 5)(x), layer(x), rtol=1e-4, atol=1e-4)


def test_truncated_svd_is_the_eckart_young_optimum():
    layer = nn.Linear(30, 20)
    w = layer.weight.detach().double()
    s = torch.linalg.svdvals(w)
    err = compress.weight_error(layer, low_rank(layer, 6))
    assert err == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-4)


def test_block_dense_is_blockwise_svd():
    layer = nn.Linear(32, 16, bias=False)
    with torch.no_grad():  # each input block exactly rank 2 → rank 2·4 = 8 reproduces it
        layer.weight.copy_(torch.cat([_low_rank_weight(16, 8, 2, seed=k) for k in range(4)], dim=1))
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(block_dense(layer, 8, 4)(x), layer(x), rtol=1e-4, atol=1e-4)


def test_ffn_linears_are_replaced_and_the_projection_is_not():
    model = FFN().eval()
    x = (torch.randn(4, 10, 32),)
    result = check_pass(StructuredFFN(param_ratio=0.5, min_sqnr=0), model, x)
    kinds = {p: type(m) for p, m in result.model.named_modules() if p in ("proj", "up1", "down1", "up2", "down2")}
    assert kinds["proj"] is nn.Linear and all(kinds[k] is LowRankLinear for k in ("up1", "down1", "up2", "down2"))
    record = result.report.records[0]
    assert record.params_after < record.params_before


def test_blockdense_structure():
    model = FFN().eval()
    result = check_pass(StructuredFFN(structure="blockdense", blocks=4, param_ratio=0.5, min_sqnr=0), model,
                        (torch.randn(4, 10, 32),))
    assert sum(isinstance(m, BlockDenseLinear) for m in result.model.modules()) == 4


def test_rank_that_saves_nothing_is_skipped_with_reason():
    model = FFN().eval()
    result = check_pass(StructuredFFN(rank=100, min_sqnr=0), model, (torch.randn(4, 32),))
    record = result.report.records[0]
    assert record.status == "nothing to rewrite" and "would not save parameters" in record.reason


def compressible(model: nn.Module) -> nn.Module:
    """Trained layers have decaying spectra; random ones do not. Give every Linear σ_k ∝ 0.8^k."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            q1, _ = torch.linalg.qr(torch.randn(m.out_features, m.out_features, generator=g))
            q2, _ = torch.linalg.qr(torch.randn(m.in_features, m.in_features, generator=g))
            k = min(m.in_features, m.out_features)
            with torch.no_grad():
                m.weight.copy_(q1[:, :k] @ torch.diag(0.8 ** torch.arange(k, dtype=torch.float32)) @ q2[:, :k].T)
    return model.eval()


def test_budget_search_respects_its_budget():
    torch.manual_seed(0)
    model = compressible(FFN())
    x = torch.randn(16, 32)
    calib = [torch.randn(16, 32) for _ in range(4)]
    result = api.optimize(model, (x,), "lowrank{budget-sqnr=25,min-sqnr=0}", calib=calib, measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.error["sqnr_db"] >= 25 - 1e-6
    loose = api.optimize(model, (x,), "lowrank{budget-sqnr=5,min-sqnr=0}", calib=calib, measure_latency=False)
    assert loose.report.records[0].params_after <= record.params_after


@pytest.mark.parametrize("spec, message", [("lowrank{param-ratio=1.5}", "param-ratio in"),
                                           ("lowrank{rank=-1}", "rank must be"),
                                           ("lowrank{param-ratio=0}", "param-ratio in")])
def test_bad_ranks_and_ratios_are_one_line_errors(spec, message):
    with pytest.raises(RewriteError, match=message):
        api.optimize(FFN(), (torch.randn(2, 32),), spec, measure_latency=False)


def test_guided_recovery_ends_structured_and_better():
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(32, 32) for _ in range(4)]
    plain = api.optimize(model, (calib[0],), "lowrank{param-ratio=0.3,min-sqnr=0}", calib=calib, measure_latency=False)
    guided = api.optimize(model, (calib[0],), "lowrank{param-ratio=0.3,guided=on,min-sqnr=0}", calib=calib,
                          recover="steps=150,lr=3e-3", measure_latency=False)
    assert guided.report.records[0].error["sqnr_db"] > plain.report.records[0].error["sqnr_db"]
    assert all(m.dense is None for m in guided.model.modules() if hasattr(m, "recovery_progress"))


def test_no_linear_means_nothing_to_rewrite():
    model = ConvBN()
    record = check_pass(StructuredFFN(), model, model.example_inputs()).report.records[0]
    assert record.status == "nothing to rewrite"


def test_torch_transformer_encoder_ffns_are_found_through_dropout():
    layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = (torch.randn(2, 12, 64),)
    result = api.optimize(model, x, "lowrank{param-ratio=0.5,min-sqnr=0}", measure_latency=False)
    swapped = sorted(p for p, m in result.model.named_modules() if isinstance(m, LowRankLinear))
    assert swapped == [f"layers.{i}.{name}" for i in range(2) for name in ("linear1", "linear2")]


def test_cli_budget_sets_the_search_and_rejects_other_kinds():
    torch.manual_seed(0)
    model = compressible(FFN())
    calib = [torch.randn(16, 32) for _ in range(2)]
    result = api.optimize(model, (calib[0],), "lowrank{min-sqnr=0}", calib=calib, budget="sqnr=25",
                          measure_latency=False)
    assert result.report.records[0].spec == "lowrank{budget-sqnr=25,min-sqnr=0}"
    with pytest.raises(RewriteError, match="needs eval data"):
        api.optimize(model, (calib[0],), "lowrank", budget="metric=0.9", measure_latency=False)


def test_metric_budget_searches_against_the_eval_metric():
    torch.manual_seed(0)
    model = compressible(FFN())
    calib = [torch.randn(16, 32) for _ in range(2)]
    x = torch.randn(64, 32)
    with torch.no_grad():
        eval_data = {"inputs": [x], "targets": [model(x)]}
    result = api.optimize(model, (calib[0],), "lowrank{min-sqnr=0}", calib=calib, eval=eval_data, metric="rel-l2",
                          budget="metric=0.05", measure_latency=False)
    assert result.report.records[0].status == "applied"
    assert result.report.metric["rewritten"] <= 0.05


def test_gated_feed_forward_blocks_have_all_three_linears_factorized():
    from rewrite.testing import GatedFFN
    model = GatedFFN().eval()
    x = model.example_inputs()
    record = api.optimize(model, x, "lowrank{param-ratio=0.5,min-sqnr=-100}", calib=[x],
                          measure_latency=False).report.records[0]
    assert record.status == "applied" and record.stats["factorized"] == 3  # gate, up and down


@pytest.mark.parametrize("structure", ["lowrank", "blockdense"])
def test_whitened_factors_fit_the_outputs_better_than_the_weights(structure):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(256, 32) * torch.logspace(0, -2, 32)  # uneven inputs: the weights alone mislead
    errors = []
    for whiten in ("true", "false"):
        spec = f"lowrank{{structure={structure},blocks=2,param-ratio=0.5,target=all,whiten={whiten},min-sqnr=-100}}"
        new = api.optimize(layer, (x[:8],), spec, calib=[x], measure_latency=False).model
        with torch.no_grad():
            errors.append(float((new(x) - layer(x)).square().sum()))
    assert errors[0] < 0.5 * errors[1]


@pytest.mark.parametrize("name", ["lowrank", "fwsvd"])
def test_a_model_whose_linears_are_in_no_feed_forward_block_is_told_to_take_target_all(name):
    """Attention-only Linears (a mixture of experts' FFN weights are 3-D tensors, not Linears): nothing to
    rewrite at target=ffn, and the reason says that target=all takes the others."""
    class AttentionOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ x

    x = torch.randn(2, 5, 8)
    record = api.optimize(AttentionOnly(), (x,), name, calib=[(x,)], measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite" and "target=all takes the other Linears" in record.reason


def test_target_all_names_the_expert_weights_it_leaves_dense():
    from tests.test_compress import MoE
    torch.manual_seed(0)
    calib = [(torch.randint(0, 64, (8,)),) for _ in range(4)]
    result = api.optimize(MoE().eval(), calib[0], "lowrank{target=all,whiten=false,min-sqnr=-100}", calib=calib,
                          measure_latency=False)
    [why] = [why for where, why in result.report.records[0].skipped if where == "blocks.*.experts"]
    assert "lowrank factorizes Linears and 1×1 convolutions, so they stay dense" in why
