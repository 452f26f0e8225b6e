import pytest
import torch
from torch import nn

import rewrite
from rewrite import api, verify
from rewrite.passes.prune import (
    PrunedLinear,
    PruneFFN,
    allocate_units,
    refit,
    removal_order,
)
from rewrite.testing import check_pass
from tests import fresh
from tests.passes.test_lowrank import FFN


class Gated(nn.Module):
    """A SwiGLU block with a residual, and a projection before it that is no FFN."""

    def __init__(self, d=16, hidden=48):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        x = self.proj(x)
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _gram(x):
    x = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
    return x.T @ x


def test_the_greedy_costs_add_up_to_the_refit_s_error_in_the_metric():
    """OBS bookkeeping: Σ δ over the removed columns is the G-weighted error of the least-squares refit."""
    torch.manual_seed(0)
    x = torch.randn(500, 24) @ torch.randn(24, 24)
    w, a = torch.randn(10, 25), torch.randn(10, 10)
    metric, gram = a @ a.T, _gram(x)
    order, costs = removal_order(w, gram, metric, steps=15, fixed=(24,))
    assert 24 not in order and len(set(order)) == 15
    kept = sorted(set(range(25)) - set(order))
    error = w.double().clone()
    error[:, kept] -= refit(w, gram, kept).double()
    damped = gram + 1e-2 * gram.diagonal()[:24].mean() * torch.eye(25, dtype=torch.float64)
    assert sum(costs) == pytest.approx(float(torch.trace(metric.double() @ error @ damped @ error.T)), rel=1e-6)


def test_a_unit_that_is_a_copy_of_another_goes_first_and_costs_little():
    torch.manual_seed(0)
    x, w = torch.randn(300, 8), torch.randn(4, 9)
    _, independent = removal_order(w, _gram(x), None, steps=1, fixed=(8,))
    x[:, 5] = x[:, 2]  # unit 5 carries nothing unit 2 does not: only the damping keeps it from being free
    order, costs = removal_order(w, _gram(x), None, steps=1, fixed=(8,))
    assert order[0] in (2, 5) and costs[0] < 0.2 * independent[0]


def test_the_budget_goes_to_the_cheapest_units_across_blocks():
    counts = allocate_units({"a": [1.0, 2.0, 50.0], "b": [0.5, 40.0, 60.0]}, {"a": 10, "b": 10}, remove=30)
    assert counts == {"a": 2, "b": 1}


def test_a_pruned_ffn_is_narrower_and_its_refit_keeps_the_output():
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(64, 32) for _ in range(4)]
    result = check_pass(PruneFFN(param_ratio=0.75, min_sqnr=5), model, (calib[0],), calib=calib)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["blocks"] == 2
    assert record.stats["target_weights_kept"] == pytest.approx(0.75, abs=0.01)
    narrowed = [p for p, m in result.model.named_modules() if isinstance(m, PrunedLinear)]
    assert sorted(narrowed) == ["down1", "down2", "up1", "up2"]  # proj is no FFN and stays
    assert result.model.get_submodule("up1").out_features == result.model.get_submodule("down1").in_features < 128
    assert record.params_after < record.params_before


def test_the_refit_beats_dropping_the_units_alone():
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(64, 32) for _ in range(4)]
    pruned = api.optimize(model, (calib[0],), "prune{param-ratio=0.6,min-sqnr=-100}", calib=calib,
                          measure_latency=False).model
    x = torch.randn(256, 32)
    h = torch.nn.functional.gelu(model.up1(model.proj(x)))
    kept = [j for j in range(128) if any(torch.equal(model.up1.weight[j], r) for r in pruned.up1.weight)]
    dropped = (model.down1(h) - (h[:, kept] @ model.down1.weight[:, kept].T + model.down1.bias)).norm()
    refitted = (model.down1(h) - pruned.down1(h[:, kept])).norm()
    assert len(kept) == pruned.up1.out_features and refitted < 0.8 * dropped


def test_gate_and_up_lose_the_same_units_and_the_down_gains_a_bias():
    torch.manual_seed(0)
    model = Gated().eval()
    calib = [torch.randn(64, 16) for _ in range(4)]
    result = check_pass(PruneFFN(param_ratio=0.7, min_sqnr=0), model, (calib[0],), calib=calib)
    gate, up, down = (result.model.get_submodule(p) for p in ("gate", "up", "down"))
    kept = [j for j in range(48) if any(torch.equal(model.gate.weight[j], r) for r in gate.weight)]
    assert torch.equal(up.weight, model.up.weight[kept]) and down.in_features == len(kept) < 48
    assert down.bias is not None and gate.bias is None


class FusedGated(nn.Module):
    """Phi-3's MLP: gate and up as one Linear whose output is chunked in two, with a residual."""

    def __init__(self, d=16, hidden=48):
        super().__init__()
        self.gate_up, self.down = nn.Linear(d, 2 * hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(up * nn.functional.silu(gate))


def test_a_fused_gate_up_loses_each_units_gate_row_and_up_row_together():
    """Unit j of a fused gate_up is row j and row 48 + j. With the first 24 units dead (both rows zero, so
    silu(0)·0 = 0) and half the units to go, those are what goes, and the output stays the same: removing the
    wrong rows would change it."""
    torch.manual_seed(0)
    model = FusedGated().eval()
    dead = torch.arange(24)
    with torch.no_grad():
        model.gate_up.weight[dead] = 0
        model.gate_up.weight[dead + 48] = 0
    calib = [torch.randn(64, 16) for _ in range(4)]
    result = check_pass(PruneFFN(param_ratio=0.5, min_sqnr=0), model, (calib[0],), calib=calib)
    gate_up, down = result.model.get_submodule("gate_up"), result.model.get_submodule("down")
    assert result.report.records[0].status == "applied"
    assert gate_up.out_features == 48 and down.in_features == 24
    kept = torch.arange(24, 48)
    assert torch.equal(gate_up.weight, model.gate_up.weight[torch.cat([kept, kept + 48])])
    torch.testing.assert_close(result.model(calib[1]), model(calib[1]), rtol=1e-4, atol=1e-5)


def test_a_non_elementwise_middle_is_left_alone_with_the_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.down(torch.softmax(self.up(x), -1))  # softmax mixes the hidden units

    calib = [torch.randn(16, 8) for _ in range(2)]
    record = api.optimize(Mixed(), (calib[0],), "prune{min-sqnr=-100}", calib=calib,
                          measure_latency=False).report.records[0]
    assert record.status != "applied"


def test_a_model_without_a_feed_forward_block_is_not_touched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).eval()
    record = api.optimize(model, (torch.randn(4, 8),), "prune", calib=[torch.randn(4, 8)],
                          measure_latency=False).report.records[0]
    assert record.status != "applied" and "feed-forward" in " ".join(why for _, why in record.skipped)


class ConvMLP(nn.Module):
    """PoolFormer's and ConvNeXt-atto's block: an MLP of 1×1 convolutions, between a 3×3 stem and a 1×1 head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mlp = nn.Sequential(nn.Conv2d(16, 64, 1), nn.GELU(), nn.Conv2d(64, 16, 1))
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.mlp(x))


@pytest.mark.parametrize("spec, inner", [("prune", "PrunedLinear"), ("fwsvd", "LowRankLinear")])
def test_an_mlp_of_1x1_convolutions_is_rewritten_as_its_linears_over_channels(spec, inner):
    """They once said "its 2 1×1 convolutions are not read". Each is now its Linear over the channels of every
    grid point (`compress.OverChannels`); the 1×1 head, in no feed-forward block, and the 3×3 stem stay."""
    torch.manual_seed(0)
    model = ConvMLP().eval()
    calib = [(torch.randn(4, 3, 8, 8),) for _ in range(4)]
    result = api.optimize(model, calib[0], f"{spec}{{min-sqnr=0}}", calib=calib, measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied"
    assert {type(result.model.get_submodule(f"mlp.{i}")).__name__ for i in (0, 2)} == {"OverChannels"}
    assert {type(result.model.get_submodule(f"mlp.{i}.linear")).__name__ for i in (0, 2)} == {inner}
    assert type(result.model.stem) is type(result.model.head) is nn.Conv2d
    assert record.error["sqnr_db"] > 15
    with torch.no_grad():  # the rewritten model is channels-first to its callers, at another grid size too
        x = torch.randn(2, 3, 5, 7)
        assert result.model(x).shape == model(x).shape == (2, 8, 5, 7)


@pytest.mark.parametrize("spec, hint", [("prune", ""), ("fwsvd", ": target=all takes them")])
def test_1x1_convolutions_in_no_feed_forward_block_are_named(spec, hint):
    """MobileNet's pointwise convolutions sit between norms and depthwise ones: no MLP to prune or factorize."""
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, groups=16),
                          nn.Conv2d(16, 4, 1)).eval()
    calib = [(torch.randn(2, 4, 6, 6),) for _ in range(2)]
    record = api.optimize(model, calib[0], spec, calib=calib, measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite"
    assert f"its 2 1×1 convolutions are in no feed-forward block (1×1 conv → activation → 1×1 conv){hint}" in \
        record.reason


def test_param_ratio_outside_zero_one_is_a_clear_error():
    with pytest.raises(api.RewriteError, match="param-ratio"):
        api.optimize(FFN(), (torch.randn(2, 32),), "prune{param-ratio=1.5}", calib=[torch.randn(2, 32)])


def _tiny_llama():
    """A random two-block Llama (hidden 32, FFN 96) and three calibration batches of token ids."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    calib = [(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    return transformers.LlamaForCausalLM(cfg).eval(), calib


@pytest.mark.slow
def test_a_pruned_llama_keeps_its_class_and_loads_back_with_generate(tmp_path):
    model, calib = _tiny_llama()
    result = rewrite.optimize(model, calib[0], "prune{param-ratio=0.7,min-sqnr=-100}", calib=calib,
                              measure_latency=False)
    assert type(result.model).__name__ == "LlamaForCausalLM" and result.report.records[0].status == "applied"
    assert result.model.model.layers[0].mlp.down_proj.in_features < 96
    # the report's rows are the pass's own, named by each block's down projection, as in a graph
    assert [row["layer"] for row in result.report.records[0].layers] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # per-layer errors judge each narrowed MLP as a whole (its Linears no longer take the originals' inputs)
    rows = verify.layer_errors(model, result.model, calib[0])
    assert [row["layer"] for row in rows] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(0 < row["sqnr_db"] < 100 and row["bytes_after"] < row["bytes_before"] for row in rows)
    result.model.save_pretrained(tmp_path / "p")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    code = ("import sys, torch, rewrite\n"
            "m = rewrite.load(sys.argv[1])\n"
            "ids = torch.load(sys.argv[2])\n"
            "torch.save({'cls': type(m).__name__, 'logits': m(ids).logits.detach()}, sys.argv[3])\n")
    reloaded = fresh.run(code, tmp_path / "p", ids, tmp_path)
    assert reloaded["cls"] == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(reloaded["logits"], result.model(ids).logits)


def test_local_recovery_fits_the_refit_down_linears_not_the_narrowed_ups():
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(64, 32) for _ in range(8)]
    record = api.optimize(model, (calib[0],), "prune{param-ratio=0.6,min-sqnr=0}", calib=calib, measure_latency=False,
                          recover="local,steps=20").report.records[0]
    assert record.status == "applied" and record.stats["recovery_layers"] == 2


def test_block_by_block_each_decoder_block_loses_its_share():
    model, calib = _tiny_llama()
    records = rewrite.optimize(model, calib[0], "prune{param-ratio=0.7,min-sqnr=-100}", calib=calib,
                               measure_latency=False, blockwise=True).report.records
    assert [r.name for r in records] == ["prune @ model.layers.0", "prune @ model.layers.1"]
    assert all(r.status == "applied" and r.stats["target_weights_kept"] == pytest.approx(0.7, abs=0.01)
               for r in records)


def test_a_later_pass_s_patterns_take_the_narrowed_linears():
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(64, 32) for _ in range(4)]
    records = api.optimize(model, (calib[0],), "prune{param-ratio=0.8,min-sqnr=-100},lowrank{param-ratio=0.5,min-sqnr=-100}",
                           calib=calib, measure_latency=False).report.records
    assert [r.status for r in records] == ["applied", "applied"] and records[1].params_after < records[0].params_after


def test_integer_outputs_rank_units_by_each_block_s_own_output_error():
    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.head = nn.Linear(8, 64), nn.Linear(64, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(x + self.down(torch.relu(self.up(x)))).argmax(-1)

    torch.manual_seed(0)
    calib = [torch.randn(32, 8) for _ in range(3)]
    record = api.optimize(Argmax().eval(), (calib[0],), "prune{param-ratio=0.7,min-sqnr=-100}", calib=calib,
                          measure_latency=False).report.records[0]
    assert record.status == "applied" and record.stats["target_weights_kept"] == pytest.approx(0.7, abs=0.02)


def test_the_report_rows_are_each_narrowed_block_s_output_sqnr():
    """In a graph a narrowed Linear cannot be run alone: the pass gives the rows, from the grams it holds."""
    torch.manual_seed(0)
    model = FFN().eval()
    calib = [torch.randn(64, 32) for _ in range(4)]
    result = api.optimize(model, (calib[0],), "prune{param-ratio=0.75,min-sqnr=-100}", calib=calib,
                          measure_latency=False)
    rows = result.report.records[0].layers
    assert [row["layer"] for row in rows] == ["down1", "down2"]
    x = torch.cat(calib)
    h = torch.nn.functional.gelu(model.up1(model.proj(x)))
    kept = [j for j in range(128) if any(torch.equal(model.up1.weight[j], r) for r in result.model.up1.weight)]
    want, got = model.down1(h), result.model.down1(h[:, kept])
    sqnr = 10 * torch.log10(want.square().sum() / (want - got).square().sum())
    assert rows[0]["sqnr_db"] == pytest.approx(float(sqnr.detach()), abs=0.05)
    assert all(row["bytes_after"] < row["bytes_before"] for row in rows)
