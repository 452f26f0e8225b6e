"""The matcher: alternatives, reasons, multi-input replacement, attention in two spellings, a region across
two submodules of a Hugging Face block."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewrite import capture
from rewrite.match import Match, NoMatch, Pattern, Variant, replace_match


def _graph(model, *inputs):
    return capture.capture(model.eval(), inputs).module


class _FFN(nn.Module):
    def __init__(self, act, d=8, h=16):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, h), act, nn.Linear(h, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


FFN = Pattern("ffn", Variant(_FFN(nn.GELU()), (torch.randn(2, 8),), name="gelu"),
              Variant(_FFN(nn.ReLU()), (torch.randn(2, 8),), name="relu"))


@pytest.mark.parametrize("act, variant", [(nn.GELU(), "gelu"), (nn.ReLU(), "relu")])
def test_alternatives_match_each_spelling_and_layers_match_by_type(act, variant):
    gm = _graph(_FFN(act, d=12, h=48), torch.randn(3, 12))  # other sizes than the pattern's
    [match] = FFN.find(gm)
    assert match.variant == variant and isinstance(match.layer(gm, "up"), nn.Linear)
    assert [n.op for n in match.inputs] == ["placeholder"] and match.outputs[0].name.startswith("down")


def test_no_match_is_falsy_and_explains_itself():
    gm = _graph(_FFN(nn.Tanh()), torch.randn(2, 8))
    found = FFN.find(gm)
    assert isinstance(found, NoMatch) and not found and "no subgraph matches 'ffn'" in found.reason
    assert found.or_else("Linear → GELU → Linear") == "no part of the model has the form Linear → GELU → Linear"
    why = FFN.explain(gm, "down")
    assert "tanh" in why and "where the pattern has" in why


def test_a_check_refuses_with_its_reason():
    wide_only = Pattern("ffn", *FFN.variants, check=lambda m, gm: None if m.layer(gm, "up").out_features > 32
                        else "hidden layer too narrow")
    gm = _graph(_FFN(nn.GELU()), torch.randn(2, 8))
    found = wide_only.find(gm)
    assert not found and "hidden layer too narrow" in found.reason
    assert found.or_else("Linear → GELU → Linear") == found.reason  # a refusal's reason is the better one
    assert "too narrow" in wide_only.explain(gm, "down")


class _Leaky(nn.Module):
    """The FFN's hidden activation is also read elsewhere: replacing the block would not remove it."""

    def __init__(self):
        super().__init__()
        self.ffn = _FFN(nn.GELU())

    def forward(self, x):
        h = self.ffn.act(self.ffn.up(x))
        return self.ffn.down(h), h.sum()


def test_a_region_whose_inner_value_escapes_is_not_matched_and_says_why():
    gm = _graph(_Leaky(), torch.randn(2, 8))
    assert not FFN.find(gm)
    assert "also used outside the pattern" in FFN.explain(gm, "ffn_down")


class _Attention(nn.Module):
    """q·kᵀ/√d + bias → softmax → ·v, written out by hand."""

    def forward(self, q, k, v, bias):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias, dim=-1) @ v


class _SDPA(nn.Module):
    def forward(self, q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _qkvb(n=6, d=4):
    return (torch.randn(2, 3, n, d), torch.randn(2, 3, n, d), torch.randn(2, 3, n, d), torch.randn(n, n))


ATTENTION = Pattern("attention-with-bias", Variant(_Attention(), _qkvb(), ignore_literals=True, name="explicit"),
                    Variant(_SDPA(), _qkvb(), name="sdpa"))


@pytest.mark.parametrize("model, variant", [(_Attention(), "explicit"), (_SDPA(), "sdpa")])
def test_attention_in_two_spellings_binds_q_k_v_and_bias(model, variant):
    inputs = _qkvb(n=9, d=8)
    gm = _graph(model, *inputs)
    [match] = ATTENTION.find(gm)
    assert match.variant == variant
    assert [n.name for n in match.inputs] == ["q", "k", "v", "bias"]


def test_multi_input_replacement_keeps_numerics_and_metadata():
    inputs = _qkvb(n=9, d=8)
    gm = _graph(_Attention(), *inputs)
    [match] = ATTENTION.find(gm)
    val = match.outputs[0].meta["val"]
    new = replace_match(gm, match, _SDPA(), match.inputs, match.outputs, name="fused_attention")
    assert new.meta["val"] is val and new.op == "call_module"
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "softmax" in str(n.target)]
    torch.testing.assert_close(gm(*inputs), _Attention()(*inputs), rtol=1e-5, atol=1e-6)


def test_a_feed_forward_block_across_two_hugging_face_submodules_is_replaced():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)
    layer = transformers.models.bert.modeling_bert.BertLayer(cfg).eval()
    x = torch.randn(2, 5, 32)
    gm = _graph(layer, x)
    [match] = FFN.find(gm)
    up, down = match.layer(gm, "up"), match.layer(gm, "down")
    assert match["up"].target.startswith("intermediate") and match["down"].target.startswith("output")
    replacement = _FFN(nn.GELU(), 32, 64)
    replacement.up, replacement.down = up, down
    replace_match(gm, match, replacement, match.inputs, match.outputs, name="ffn")
    assert gm.get_submodule("ffn") is replacement
    torch.testing.assert_close(gm(x)[0] if isinstance(gm(x), tuple) else gm(x), layer(x)[0] if isinstance(
        layer(x), tuple) else layer(x), rtol=1e-5, atol=1e-5)


def test_in_place_and_out_of_place_adds_are_one_spelling():
    class Sum(nn.Module):
        def forward(self, a, b):
            return torch.relu(a + b)

    class InPlace(nn.Module):
        def forward(self, a, b):
            c = a * 1.0
            c += b
            return torch.relu(c)

    pattern = Pattern("add-relu", Variant(Sum(), (torch.randn(3), torch.randn(3))))
    assert isinstance(pattern.find(_graph(InPlace(), torch.randn(3), torch.randn(3)))[0], Match)


class _CastNorm(nn.Module):
    """Hugging Face's RMSNorm: a `.to()` inside, which export checks with an `_assert_tensor_metadata` node."""

    def __init__(self, d=8):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.weight * h.to(torch.float32)


class _Fused(nn.Module):
    def forward(self, x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, 1e-5)


def test_a_pattern_with_a_cast_matches_at_any_literal_and_its_dtype_checks_go_with_the_region():
    """Export checks each `.to()` with an `_assert_tensor_metadata` node: a match is not refused as leaking
    through it, and replacing the region erases the checks of what it erased. Literals ignored means any two
    literals match (the pattern's ε is 1e-6, the graph's 1e-5), never a pattern node against a literal."""
    from rewrite.passes.rotate import rms_norm
    x = torch.randn(2, 3, 8)
    norm = _CastNorm()
    gm = _graph(norm, x)
    [match] = rms_norm().find(gm)
    assert match.variant == "cast" and match.inputs[1].op == "get_attr"
    replace_match(gm, match, _Fused(), match.inputs, match.outputs, name="fused_norm")
    assert not [n for n in gm.graph.nodes if "rsqrt" in str(n.target) or "pow" in str(n.target)]
    torch.testing.assert_close(gm(x), norm(x), rtol=1e-5, atol=1e-6)


def test_building_a_pattern_leaves_the_global_random_state_alone():
    """Pattern factories make example modules and inputs; they draw from a generator of their own, so a run's
    random draws do not depend on whether an earlier run in the process built the pattern first."""
    from rewrite.match import cached_pattern

    @cached_pattern
    def made() -> Pattern:
        return Pattern("linear", Variant(nn.Linear(3, 3), (torch.randn(2, 3),)))

    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    pattern = made()
    assert torch.equal(torch.rand(3), want) and made() is pattern


@pytest.mark.parametrize("act,variant", [(F.silu, "SiLU"), (lambda h: F.gelu(h, approximate="tanh"), "GELU"),
                                         (F.relu, "ReLU")])
def test_gated_feed_forwards_match_with_the_gates_activation_named(act, variant):
    """SwiGLU, GeGLU (Gemma's tanh GELU) and ReGLU blocks are all gated feed-forwards; the match names the gate's
    activation, which snnk's kernel features follow. An ungated block is not one."""
    from rewrite.patterns import gated_feed_forward

    class Gated(nn.Module):
        def __init__(self, gated=True):
            super().__init__()
            self.gate, self.up, self.down, self.gated = nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(12, 6), gated

        def forward(self, x):
            return self.down(act(self.gate(x)) * self.up(x) if self.gated else act(self.gate(x)))

    [match] = gated_feed_forward().find(_graph(Gated(), torch.randn(3, 6)))
    assert match.variant == variant and {match[k].target for k in ("gate", "up", "down")} == {"gate", "up", "down"}
    assert not gated_feed_forward().find(_graph(Gated(gated=False), torch.randn(3, 6)))


@pytest.mark.parametrize("spelling,variant", [("FactoredTanhGELU", "TanhGELU"), ("QuickGELU", "QuickGELU"),
                                              ("SquaredReLU", "SquaredReLU")])
def test_bloom_s_clip_s_and_nemotron_s_activations_are_feed_forwards_named_for_their_function(spelling, variant):
    """BLOOM writes tanh-GELU as x·0.5·(1 + tanh(c·x·(1 + a·x²))), CLIP uses x·σ(1.702·x), Nemotron relu(x)²: all
    are feed-forwards, the match named for the function (snnk's features follow it)."""
    from rewrite import patterns

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(6, 12), getattr(patterns, spelling)(), nn.Linear(12, 6)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    [match] = patterns.feed_forward().find(_graph(Block(), torch.randn(3, 6)))
    assert match.variant == variant and (match["up"].target, match["down"].target) == ("up", "down")
