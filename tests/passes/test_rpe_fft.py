"""rpe-fft: exact Toeplitz products by FFT, the kernelized attention, Toeplitz proofs (positive and negative),
T5 detection with a shared bias, causal and padded cases, unseen lengths, ONNX parity, bad input."""
import math

import pytest
import torch
from torch import nn

from rewrite import RewriteError, api
from rewrite.passes.rpe_fft import RPEFFTAttention, ToeplitzBias
from rewrite.passes.rpe_fft.kernel import toeplitz_apply, toeplitz_dense, toeplitz_spectrum
from rewrite.testing import RPEAttention


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, RPEFFTAttention)]


@pytest.mark.parametrize("n", [1, 2, 37, 64])
@pytest.mark.parametrize("full", [False, True])
def test_fft_toeplitz_product_equals_the_dense_product(n, full):
    gen = torch.Generator().manual_seed(n)
    c = torch.randn(3, 2 * n - 1, dtype=torch.float64, generator=gen)
    u = torch.randn(2, 3, 5, n, dtype=torch.float64, generator=gen)
    want = torch.einsum("hij,bhkj->bhki", toeplitz_dense(c, n), u)
    got = toeplitz_apply(toeplitz_spectrum(c, n, full)[:, None, :], u, full)
    assert float((got - want).abs().max()) < 1e-12


def _exact(q, k, v, table, scale, causal=False, keep=None):
    n = q.shape[-2]
    scores = scale * q @ k.transpose(-1, -2) + toeplitz_dense(table, n)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    if keep is not None:
        scores = scores.masked_fill(keep[:, None, None, :] == 0, -math.inf)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_kernelized_attention_estimates_softmax_attention(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(2, 3, 29, 16, generator=gen) for _ in range(3))
    table = 0.5 * torch.randn(3, 57, generator=gen)
    attention = RPEFFTAttention(ToeplitzBias(table, "none"), 16, 0.25, features=4096, causal=causal, chunk=512)
    exact = _exact(q, k, v, table, 0.25, causal)
    assert float((attention(q, k, v) - exact).norm() / exact.norm()) < 0.03


def test_the_in_place_inference_kernel_equals_the_autograd_form():
    """Inference reuses its FFT buffers (out=, in place); training and export run the plain form."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (0.3 * torch.randn(2, 3, 40, 16, generator=gen) for _ in range(3))
    attention = RPEFFTAttention(ToeplitzBias(0.5 * torch.randn(3, 79, generator=gen), "none"), 16, 0.25,
                                features=12, chunk=5)  # 5 does not divide 12: batches of 4
    assert attention._chunk(torch.zeros(2, 3, 17, 40), 40) == 4
    with torch.no_grad():
        in_place = attention(q, k, v)
    trained = attention(q.requires_grad_(), k, v)
    torch.testing.assert_close(in_place, trained.detach(), rtol=1e-5, atol=1e-6)


class SDPABias(nn.Module):
    """The same attention written with scaled_dot_product_attention and a float mask (ALiBi slopes)."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.register_buffer("slopes", torch.tensor([0.5 ** (i + 1) for i in range(heads)]))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        distance = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs()
        bias = -self.slopes[:, None, None] * distance  # (heads, n, n): depends on j − i only
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("model, tail", [(RPEAttention(), "none"), (SDPABias(), "linear")],
                         ids=["matmul-div-learned-table", "sdpa-alibi"])
def test_two_spellings_are_found_proven_and_rewritten(model, tail):
    model = model.eval()
    x = (torch.randn(2, 10, 32),)
    result = api.optimize(model, x, "rpe-fft{features=256,min-sqnr=-100}", calib=[x], measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["attentions"] == 1 and record.stats["tails"] == tail
    assert len(_attention_modules(result.model)) == 1
    ops = [str(n.target) for n in result.model.graph.nodes if n.op == "call_function"]
    assert not any("softmax" in op or "scaled_dot_product" in op for op in ops)


def test_unseen_lengths_run_and_lengths_past_the_models_own_table_are_refused():
    model = RPEAttention(max_len=64).eval()
    x = model.example_inputs()
    result = api.optimize(model, x, "rpe-fft{features=256,min-sqnr=-100}", calib=[x], measure_latency=False)
    assert result.report.records[0].stats["longest_table"] == 64  # the learned table covers |j − i| < 64
    y = torch.randn(2, 50, 32)
    assert result.model(y).shape == (2, 50, 32)
    with pytest.raises(ValueError, match="longer than the 64"):
        result.model(torch.randn(1, 70, 32))


class DataBias(RPEAttention):
    """A bias computed from the input: not a relative position."""

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = x.mean(-1)[:, None, :, None] * torch.ones(1, self.heads, 1, n)
        return self.out(((q @ k.transpose(-2, -1) / 8 + bias).softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class AbsoluteBias(RPEAttention):
    """A learned n×n bias: data-independent but not Toeplitz."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 10, 10))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(((q @ k.transpose(-2, -1) / 8 + self.table[:, :n, :n]).softmax(-1) @ v)
                        .transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("model, why", [(DataBias(), "depends on"), (AbsoluteBias(), "not a function of j − i")])
def test_biases_that_are_not_toeplitz_are_skipped_with_the_reason(model, why):
    x = (torch.randn(2, 10, 32),)
    record = api.optimize(model.eval(), x, "rpe-fft", calib=[x], measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite" and why in record.reason


class CausalRPE(RPEAttention):
    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None] + self.max_len - 1
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        bias = self.rel_bias[:, offsets].masked_fill(future, float("-inf"))
        return self.out(((q @ k.transpose(-2, -1) / 8 + bias).softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


def test_a_causal_mask_becomes_a_causal_toeplitz_product():
    model = CausalRPE().eval()
    with torch.no_grad():
        model.qkv.weight.mul_(0.2)  # small q/k norms: the feature estimate is then close
    x = (torch.randn(2, 12, 32),)
    result = api.optimize(model, x, "rpe-fft{features=2048,min-sqnr=-100}", calib=[x], measure_latency=False)
    [attention] = _attention_modules(result.model)
    assert attention.causal
    first = result.model(x[0][:, :5])  # causality: a prefix's outputs do not depend on what follows it
    torch.testing.assert_close(result.model(x[0])[:, :5], first, rtol=1e-4, atol=1e-5)
    assert result.report.records[0].error["sqnr_db"] > 15


def _t5():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = transformers.T5EncoderModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return model, (ids, mask)


@pytest.mark.slow
def test_t5_encoder_shares_one_bias_table_keeps_its_padding_mask_and_exports(tmp_path):
    model, inputs = _t5()
    result = api.optimize(model, inputs, "rpe-fft{features=64,min-sqnr=-100}", calib=[inputs], emit="onnx",
                          out=tmp_path / "o", measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["attentions"] == 2 and record.stats["bias_tables"] == 1
    assert record.stats["tails"] == "flat"  # T5's log buckets saturate at max_distance: exact past the table
    first, second = _attention_modules(result.model)
    assert first.bias is second.bias  # one table, one spectrum cache for both layers
    ids, mask = torch.randint(0, 100, (3, 40)), torch.ones(3, 40, dtype=torch.long)
    mask[0, 30:] = 0
    changed = ids.clone()
    changed[0, 30:] = 7  # padded tokens must not change what the kept tokens see
    out = result.model(ids, mask)
    out2 = result.model(changed, mask)
    hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0, :30]
    hidden2 = (out2.last_hidden_state if hasattr(out2, "last_hidden_state") else out2[0])[0, :30]
    torch.testing.assert_close(hidden, hidden2, rtol=1e-4, atol=1e-5)
    onnx = next(a for a in result.report.artifacts if a.kind == "onnx")
    assert onnx.problem is None and onnx.parity["max_abs"] < 1e-4


def test_onnx_parity_at_an_unseen_length(tmp_path):
    from rewrite.emit import onnx as onnx_emit
    model = RPEAttention().eval()
    x = model.example_inputs()
    result = api.optimize(model, x, "rpe-fft{features=32,min-sqnr=-100}", calib=[x], emit="onnx", out=tmp_path / "o",
                          measure_latency=False)
    onnx = next(a for a in result.report.artifacts if a.kind == "onnx")
    assert onnx.problem is None and onnx.parity["max_abs"] < 1e-4
    y = torch.randn(3, 33, 32)
    got = onnx_emit.run(onnx_emit.session(onnx.path), (y,))[0]
    torch.testing.assert_close(got, result.model(y), rtol=1e-4, atol=1e-5)


def test_bad_feature_count_is_a_one_line_error():
    with pytest.raises(RewriteError, match="positive number of random features"):
        api.optimize(RPEAttention(), RPEAttention().example_inputs(), "rpe-fft{features=0}", measure_latency=False)


def test_no_attention_is_nothing_to_rewrite():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    record = api.optimize(model, (torch.randn(2, 8),), "rpe-fft", measure_latency=False).report.records[0]
    assert record.status == "nothing to rewrite" and "no part of the model has the form softmax(q·kᵀ·s + B)·v" \
        in record.reason  # what it looks for, not the pattern's name ("no subgraph matches 'attention-with-bias'")
