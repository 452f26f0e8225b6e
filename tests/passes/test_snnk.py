"""snnk: feature maps against their kernel, exact bundling, detection across submodules, ONNX, bad input."""
import math

import pytest
import torch
from torch import nn

from rewrite import RewriteError, api
from rewrite.passes.snnk import FeatureMap, SNNKBlock, SNNKLayer, ScalableKernels, bundle, snnk_layer
from rewrite.passes.snnk.features import random_features, relu_features, rows_needed, series_coefficients
from rewrite.testing import FFN, GatedFFN, TinyMLP


def _arc_cosine(x, y):
    """E_g[ReLU(g·x) ReLU(g·y)] for g ~ N(0, I): ‖x‖‖y‖(sin θ + (π − θ) cos θ)/(2π)."""
    cos = float(x @ y / (x.norm() * y.norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return float(x.norm() * y.norm()) * (math.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_relu_features_estimate_the_arc_cosine_kernel(orthogonal):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
    g = random_features(40_000, 8, orthogonal, seed=0)
    estimate = float(relu_features(x, g) @ relu_features(y, g))
    want = _arc_cosine(torch.cat([x, torch.ones(1)]), torch.cat([y, torch.ones(1)]))
    assert estimate == pytest.approx(want, rel=0.03)


def _mc(kind, w, x, m=200_000, coefficients=None, sin=False, orthogonal=False):
    """Ψ(w̃)·Φ(x̃) with m features (one shared G), for Monte Carlo checks against the kernel."""
    rows = rows_needed(kind, m, len(coefficients or [0]) - 1)
    fm = FeatureMap(kind, random_features(rows, w.numel(), orthogonal, seed=5), coefficients, sin=sin)
    return float(fm.psi(w[None])[0] @ fm(x[:-1]))  # x̃ = [x; 1]: the map appends the 1 itself


def _small(n=5, scale=0.3, seed=2):
    gen = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(n, generator=gen)
    x = torch.cat([scale * torch.randn(n - 1, generator=gen), torch.ones(1)])
    return w, x


def test_exp_features_estimate_exp_of_the_pre_activation():
    w, x = _small()
    assert _mc("exp", w, x) == pytest.approx(math.exp(float(w @ x)), rel=0.02)


@pytest.mark.parametrize("fn, sin", [(math.sin, True), (math.cos, False)])
def test_fourier_features_estimate_sin_and_cos(fn, sin):
    w, x = _small(scale=0.4)
    z = float(w @ x)
    assert _mc("fourier", w, x, sin=sin) == pytest.approx(fn(z), abs=0.02)


def test_series_features_estimate_the_fitted_polynomial():
    w, x = _small(scale=0.5)
    coefficients = series_coefficients(torch.tanh, 3, 2.0)
    z = float(w @ x)
    poly = sum(a * z ** n for n, a in enumerate(coefficients))
    assert _mc("series", w, x, coefficients=coefficients) == pytest.approx(poly, abs=0.02)
    grid = torch.linspace(-2, 2, 101, dtype=torch.float64)
    fit = sum(a * grid ** n for n, a in enumerate(series_coefficients(torch.tanh, 7, 2.0)))
    assert float((fit - torch.tanh(grid)).abs().max()) < 0.01  # degree 7 is tanh on [−2, 2] to 1e-2


def test_one_random_matrix_is_shared_and_bundling_is_exact():
    up, down = nn.Linear(6, 12), nn.Linear(12, 5)
    g = random_features(32, 7, True, seed=3)
    layer = snnk_layer(up, FeatureMap("relu", g))
    x = torch.randn(4, 6)
    w_tilde = torch.cat([up.weight, up.bias[:, None]], 1)
    psi = torch.relu(w_tilde @ g.T) / math.sqrt(32)  # Ψ(W̃) with the same G as Φ
    torch.testing.assert_close(layer(x), relu_features(x, g) @ psi.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bundle(layer, down)(x), down(layer(x)), rtol=1e-5, atol=1e-6)  # bundling is exact
    assert torch.equal(layer.features.g_weight, g[:, :-1]) and not layer.features.g_weight.requires_grad


def test_ffn_becomes_one_snnk_block_and_recovery_repairs_it():
    model = TinyMLP()
    x = model.example_inputs()
    raw = api.optimize(model, x, "snnk{features=16,min-sqnr=-100}", calib=[x] * 2, measure_latency=False)
    [record] = raw.report.records
    assert record.status == "applied" and record.stats["rewritten_params"] == "676 → 68"
    assert [type(m) for m in raw.model.modules()].count(SNNKBlock) == 1
    calib = [(torch.randn(32, 16),) for _ in range(12)]
    rec = api.optimize(model, calib[0], "snnk{features=64}", calib=calib, recover="steps=400,lr=3e-3",
                       measure_latency=False).report.records[0]
    # Measured: 3.9 dB right after the swap, 6.4 dB on the held-out batches after recovery.
    assert rec.stats["sqnr_db_held_out"] > rec.stats["sqnr_db_before_recovery"] + 2


def test_detection_across_two_hugging_face_submodules():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=128, num_hidden_layers=1)
    layer = transformers.models.bert.modeling_bert.BertLayer(cfg).eval()
    x = (torch.randn(2, 5, 32),)
    result = api.optimize(layer, x, "snnk{features=8,min-sqnr=-100}", calib=[x] * 2, measure_latency=False)
    [record] = result.report.records
    assert record.status == "applied" and record.stats["blocks"] == 1
    names = [n for n, m in result.model.named_modules() if isinstance(m, SNNKBlock)]
    assert names == ["intermediate_dense_snnk"]  # intermediate.dense → GELU → output.dense, one block


def test_onnx_parity(tmp_path):
    model = FFN()
    x = model.example_inputs()
    result = api.optimize(model, x, "snnk{features=32,min-sqnr=-100}", calib=[x] * 2, emit="onnx",
                          out=tmp_path / "o", measure_latency=False)
    onnx = next(a for a in result.report.artifacts if a.kind == "onnx")
    assert onnx.problem is None and onnx.parity["max_abs"] < 1e-4


def test_the_gate_of_a_gated_block_becomes_an_snnk_layer():
    model = GatedFFN()
    x = model.example_inputs()
    result = api.optimize(model, x, "snnk{features=16,min-sqnr=-100}", calib=[x] * 2, measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["forms"] == "gate 1" and record.stats["kind"] == "relu"
    layers = [m for m in result.model.modules() if isinstance(m, SNNKLayer)]
    assert len(layers) == 1 and layers[0].psi.weight.shape == (model.gate.out_features, 16)
    ops = [str(n.target) for n in result.model.graph.nodes if n.op == "call_function"]
    assert any("mul" in op for op in ops) and not any("silu" in op for op in ops)  # product kept, SiLU gone
    skipped = api.optimize(model, x, "snnk{gated=false}", calib=[x] * 2, measure_latency=False).report.records[0]
    assert skipped.status == "nothing to rewrite" and "gated=false" in skipped.reason


def test_unbundled_form_keeps_the_second_linear():
    model = FFN()
    x = model.example_inputs()
    result = api.optimize(model, x, "snnk{features=16,bundle=false,min-sqnr=-100}", calib=[x] * 2,
                          measure_latency=False)
    assert result.report.records[0].status == "applied"
    assert sum(isinstance(m, SNNKLayer) for m in result.model.modules()) == 1
    assert not any(isinstance(m, SNNKBlock) for m in result.model.modules())


def test_a_kind_that_does_not_estimate_the_activation_is_refused_with_the_reason():
    model = FFN()  # GELU
    record = api.optimize(model, model.example_inputs(), "snnk{kind=exp}", measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite" and "kind=exp estimates exp, not GELU" in record.reason


def test_sin_activation_uses_fourier_features():
    class Siren(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 64), nn.Linear(64, 8)

        def forward(self, x):
            return self.down(torch.sin(self.up(x)))
    model = Siren()
    x = (torch.randn(4, 8),)
    record = api.optimize(model, x, "snnk{features=16,min-sqnr=-100}", calib=[x] * 2,
                          measure_latency=False).report.records[0]
    assert record.status == "applied" and record.stats["kind"] == "fourier"


@pytest.mark.parametrize("spec, text", [("snnk{features=0}", "positive number"),
                                         ("snnk{features=1024}", "would not save parameters")])
def test_bad_feature_counts(spec, text):
    model = TinyMLP()
    if "0}" in spec:
        with pytest.raises(RewriteError, match=text):
            api.optimize(model, model.example_inputs(), spec, measure_latency=False)
    else:
        record = api.optimize(model, model.example_inputs(), spec, measure_latency=False).report.records[0]
        assert record.status == "nothing to rewrite" and text in record.reason


def test_pass_metadata():
    assert ScalableKernels().contract.min_sqnr_db == 10.0 and ScalableKernels.recoverable


def test_init_fit_starts_closer_than_the_weights_init():
    model = FFN()
    calib = [(torch.randn(4, 6, 128),) for _ in range(4)]
    sqnr = {}
    for init in ("weights", "fit"):
        result = api.optimize(model, calib[0], f"snnk{{features=32,init={init},min-sqnr=-100}}", calib=calib,
                              measure_latency=False)
        sqnr[init] = result.report.records[0].error["sqnr_db"]
    assert sqnr["fit"] > sqnr["weights"] + 3, sqnr


@pytest.mark.slow
def test_llama_decoder_end_to_end_with_onnx_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    result = api.optimize(model, (ids,), "snnk{features=16,min-sqnr=-100}", calib=[(ids,)] * 2, emit="onnx",
                          out=tmp_path / "o", measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["forms"] == "gate 2"
    assert record.stats["rewritten_params"] == "22,016 → 5,504"  # gate_proj 64·172 → Ψ 172·16, per layer
    names = [n for n, m in result.model.named_modules() if isinstance(m, SNNKLayer)]
    assert names == ["model_layers_0_mlp_gate_proj_snnk", "model_layers_1_mlp_gate_proj_snnk"]
    onnx = next(a for a in result.report.artifacts if a.kind == "onnx")
    assert onnx.problem is None and onnx.parity["max_abs"] < 1e-4


def test_every_feed_forward_variant_has_its_function_and_a_default_feature_kind():
    """A new activation among the feed-forward patterns needs snnk's function of it and its kind=auto choice."""
    from rewrite.passes.snnk import _ACTIVATION, _AUTO
    from rewrite.patterns import feed_forward
    names = {variant.name for variant in feed_forward().variants}
    assert names <= set(_ACTIVATION) and names <= set(_AUTO)
