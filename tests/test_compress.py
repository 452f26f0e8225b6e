import pytest
import torch
from torch import nn

from rewrite import compress


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d(6, 10, 1), (2, 6, 7)), (nn.Conv2d(6, 10, 1), (2, 6, 5, 3)),
                                         (nn.Conv3d(6, 10, 1, bias=False), (2, 6, 3, 4, 2))])
def test_a_pointwise_convolution_is_its_linear_over_channels_and_goes_back(conv, shape):
    x = torch.randn(shape)
    wrapped = compress.OverChannels.from_conv(conv)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), conv(x), rtol=1e-5, atol=1e-6)
        back = wrapped.as_conv()
        assert type(back) is type(conv)
        torch.testing.assert_close(back(x), conv(x), rtol=0, atol=0)


def test_only_1x1_convolutions_with_stride_1_no_padding_and_one_group_are_wrapped():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1, stride=2),
                          nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        want = model(x)
        assert compress.linearize_pointwise(model) == 2
        assert [type(m).__name__ for m in model] == ["OverChannels"] + ["Conv2d"] * 4 + ["OverChannels"]
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        compress.restore_pointwise(model, [])
    assert all(type(m) is nn.Conv2d for m in model)


def test_wrapped_layers_a_pass_rewrote_stay_and_skipped_paths_are_the_model_s_own():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1))
    compress.linearize_pointwise(model)
    model[0].linear = nn.Sequential(model[0].linear)  # as a pass would rewrite it: no longer a plain Linear
    named = compress.restore_pointwise(model, [("1.linear", "kept"), ("keep", "names no Linear")])
    assert named == [("1", "kept"), ("keep", "names no Linear")]
    assert type(model[0]) is compress.OverChannels and type(model[1]) is nn.Conv2d


def test_a_model_without_pointwise_convolutions_is_left_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 4))
    assert compress.linearize_pointwise(model) == 0 and compress.unread_convs(model) == ""


class _Experts(nn.Module):
    """A mixture-of-experts block as transformers 5 stores it: one 3-D weight per projection, no Linears."""

    def __init__(self, experts: int = 4, width: int = 16, hidden: int = 32):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * hidden, width) / width ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # every expert on every token, averaged (a toy router)
        gate, up = torch.einsum("tw,ehw->eth", x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("eth,ewh->tw", nn.functional.silu(gate) * up, self.down_proj) / len(self.down_proj)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(16, 16), "experts": _Experts()})
                                     for _ in range(2)])
        self.router = nn.Parameter(torch.randn(1, 16))  # below the share worth naming

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * self.router
        for block in self.blocks:
            x = x + block["experts"](block["attn"](x))
        return x


def test_weights_outside_linears_are_named_once_per_kind_with_their_share():
    from rewrite import capture
    model = MoE().eval()
    eager = compress.unread_weights(model, "dgq quantizes Linears")
    captured = capture.capture(model, (torch.randint(0, 64, (8,)),)).module
    graph = compress.unread_weights(captured, "dgq quantizes Linears")
    assert len(eager) == 1 and eager == graph  # 12,288 of 13,872; the embedding table (a lookup) is not named
    where, why = eager[0]
    assert where == "blocks.*.experts"
    assert why.startswith("gate_up_proj and down_proj: 3-D weights (89% of the model's), not in Linear layers")


def test_a_model_of_linears_embeddings_and_1x1_convolutions_has_no_unread_weights_and_a_3x3_one_is_named():
    model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Conv1d(16, 16, 1))
    assert compress.unread_weights(model, "x") == []
    model.append(nn.Conv1d(16, 16, 3))  # a spatial convolution: dgq leaves it in float
    [(where, why)] = compress.unread_weights(model, "dgq reads Linears")
    assert where == "4" and why.startswith("convolution weights (") and "kernel (3,) is not 1×1; dgq reads" in why


@pytest.mark.parametrize("path, pattern", [("model.layers.3.mlp.experts", "model.layers.*.mlp.experts"),
                                           ("encoder.layers.encoder_layer_11.self_attention",  # torchvision's ViT
                                            "encoder.layers.encoder_layer_*.self_attention"),
                                           ("blocks.fc2", "blocks.fc2")])
def test_holders_in_numbered_blocks_are_named_by_one_pattern(path, pattern):
    assert compress._pattern(path) == pattern


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.body, self.head = nn.Embedding(64, 16), nn.Linear(16, 16), nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight  # tied, as SmolLM2's: the graph reads the table as head.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_a_table_tied_to_the_head_is_an_embedding_under_either_name():
    from rewrite import capture
    model = _TiedLM().eval()
    captured = capture.capture(model, (torch.randint(0, 64, (8,)),)).module
    assert compress.unread_weights(captured, "x") == compress.unread_weights(model, "x") == []
