"""Public test kit for pass authors (ours and plugins'): toy models and `check_pass`.

`check_pass(MyPass(), model, inputs)` runs the pass through the real pipeline with `strict=True`,
so the pass's declared contract is verified exactly as users get it, and checks graph hygiene.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from rewrite import api, capture
from rewrite.pass_base import Pass


class ConvBN(nn.Module):
    """conv → BN → ReLU, twice, then a Linear → BatchNorm1d head."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
                    3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv1, self.bn1 = conv(3, 8, 3, padding=1), bn(8)
        self.conv2, self.bn2 = conv(8, 8, 3, padding=1, bias=False), bn(8)
        self.fc, self.bn_fc = nn.Linear(8, 4), nn.BatchNorm1d(4)
        self.dims = dims
        randomize_batchnorm(self)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn_fc(self.fc(x.mean(tuple(range(2, 2 + self.dims)))))

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 3, *[8] * self.dims),)


class ParallelBranches(nn.Module):
    """UniRepLKNet-style: depthwise 5x5, 3x3 dilated 2 and 3x3 dilated 1 branches with BN, plus identity."""

    def __init__(self, channels: int = 6):
        super().__init__()
        specs = [(5, 1), (3, 2), (3, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=d * (k - 1) // 2, dilation=d,
                                             groups=channels, bias=False) for k, d in specs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in specs)
        randomize_batchnorm(self)

    def forward(self, x):
        out = x
        for conv, bn in zip(self.convs, self.bns):
            out = out + bn(conv(x))
        return out

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 6, 12, 12),)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def example_inputs(self) -> tuple:
        return (torch.randn(4, 16),)


class SpectralConv(nn.Module):
    """A hand-written truncated spectral conv (Li et al. style corner modes), 1-D or 2-D."""

    def __init__(self, channels: int, modes: int, dims: int, bias: bool = False):
        super().__init__()
        self.modes, self.dims = modes, dims
        shape = (channels, channels) + (modes,) * dims
        self.w = nn.Parameter(torch.randn(*shape, 2 if dims == 2 else 1, dtype=torch.cfloat) / channels)
        self.bias = nn.Parameter(0.1 * torch.randn(channels, *[1] * dims)) if bias else None

    def forward(self, x):
        n = x.shape[2:]
        m = self.modes
        x_ft = torch.fft.rfftn(x, dim=tuple(range(2, 2 + self.dims)))
        out = torch.zeros(x.shape[0], self.w.shape[1], *x_ft.shape[2:], dtype=torch.cfloat)
        if self.dims == 1:
            out[:, :, :m] = torch.einsum("bix,iox->box", x_ft[:, :, :m], self.w[..., 0])
        else:
            out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m, :m], self.w[..., 0])
            out[:, :, -m:, :m] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m:, :m], self.w[..., 1])
        y = torch.fft.irfftn(out, s=n, dim=tuple(range(2, 2 + self.dims)))
        return y if self.bias is None else y + self.bias


class ToyFNO(nn.Module):
    """lift → 2 × (spectral + 1×1 skip, GELU) → project, on a 1-D or 2-D grid."""

    def __init__(self, dims: int = 2, size: int = 16, channels: int = 6, modes: int = 4):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.dims, self.size = dims, size
        self.lift, self.project = conv(1, channels, 1), conv(channels, 1, 1)
        self.spectral = nn.ModuleList(SpectralConv(channels, modes, dims) for _ in range(2))
        self.skips = nn.ModuleList(conv(channels, channels, 1) for _ in range(2))

    def forward(self, x):
        x = self.lift(x)
        for spectral, skip in zip(self.spectral, self.skips):
            x = torch.nn.functional.gelu(spectral(x) + skip(x))
        return self.project(x)

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 1, *[self.size] * self.dims),)


class SpectralChains(nn.Module):
    """Linear spectral chains that t1 fuses exactly: two spectral convs with nothing between them, one
    tensor feeding two spectral convs, an fftshift/ifftshift pair and an rfft → irfft round trip."""

    def __init__(self, size: int = 16, channels: int = 4, modes: int = 4):
        super().__init__()
        self.size = size
        self.lift, self.project = nn.Conv2d(1, channels, 1), nn.Conv2d(channels, 1, 1)
        self.first, self.second, self.branch = (SpectralConv(channels, modes, 2, bias=True) for _ in range(3))

    def forward(self, x):
        h = self.lift(x)
        y = torch.nn.functional.gelu(self.second(self.first(h)) + self.branch(h))
        y = torch.fft.ifftshift(torch.fft.fftshift(y, dim=(-2, -1)), dim=(-2, -1))
        y = torch.fft.irfftn(torch.fft.rfftn(y, dim=(-2, -1)), s=y.shape[-2:], dim=(-2, -1))
        return self.project(y)

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 1, self.size, self.size),)


def _low_rank(linear: nn.Linear, rank: int, gen: torch.Generator) -> None:
    """Weights as trained layers have them: a few strong directions plus small noise (random weights
    are full rank, and no factorization or quantization test on them says anything)."""
    out, inp = linear.weight.shape
    u, v = torch.randn(out, rank, generator=gen), torch.randn(rank, inp, generator=gen)
    with torch.no_grad():
        linear.weight.copy_((u @ v + 0.05 * torch.randn(out, inp, generator=gen)) / inp ** 0.5)


class FFN(nn.Module):
    """A transformer feed-forward block: LayerNorm → Linear → GELU → (dropout) → Linear, plus the residual.
    Width 128 so that group-128 quantization applies; low-rank-structured weights."""

    def __init__(self, width: int = 128, hidden: int = 256, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.drop = nn.Dropout(0.1)
        _low_rank(self.up, 8, gen)
        _low_rank(self.down, 8, gen)

    def forward(self, x):
        return x + self.down(self.drop(torch.nn.functional.gelu(self.up(self.norm(x)))))

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 6, 128),)


class GatedFFN(nn.Module):
    """Llama's SwiGLU feed-forward: down(silu(gate(x)) · up(x))."""

    def __init__(self, width: int = 128, hidden: int = 256, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gate, self.up, self.down = (nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False),
                                         nn.Linear(hidden, width, bias=False))
        for layer in (self.gate, self.up, self.down):
            _low_rank(layer, 8, gen)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 6, 128),)


class TinyRMSNorm(nn.Module):
    """Llama's RMSNorm as Hugging Face writes it: weight · x/rms(x)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class TinyDecoder(nn.Module):
    """Token embedding → two pre-norm SwiGLU blocks with residuals → final RMSNorm → output head: a Llama
    decoder's residual stream without attention."""

    def __init__(self, vocab: int = 64, width: int = 64, hidden: int = 128):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(TinyRMSNorm(width) for _ in range(2))
        self.blocks = nn.ModuleList(GatedFFN(width, hidden, seed) for seed in range(2))
        self.norm, self.head = TinyRMSNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return self.head(self.norm(x))

    def example_inputs(self) -> tuple:
        return (torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),)


class RPEAttention(nn.Module):
    """Single-block self-attention with a learned relative-position bias b[j − i] per head (Toeplitz)."""

    def __init__(self, width: int = 32, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.rel_bias = nn.Parameter(0.5 * torch.randn(heads, 2 * max_len - 1))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None] + self.max_len - 1
        bias = self.rel_bias[:, offsets]  # (heads, n, n), depends on j − i only
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5 + bias
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 10, 32),)


class ChannelMLP(nn.Module):
    """A neural operator's pointwise ends on a 64×64 grid: 1×1 lifting 3 → 32, GELU, 1×1 projection 32 → 1
    (oneDNN's 1×1 convolution to one channel is several times slower than the same GEMM)."""

    def __init__(self):
        super().__init__()
        self.lift, self.project = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 1, 1)

    def forward(self, x):
        return self.project(torch.nn.functional.gelu(self.lift(x)))

    def example_inputs(self) -> tuple:
        return (torch.randn(4, 3, 64, 64),)


TOY_MODELS = [ConvBN, ParallelBranches, TinyMLP, ToyFNO, SpectralChains, FFN, GatedFFN, RPEAttention, ChannelMLP,
              TinyDecoder]


def register_toy(model_class: type) -> type:
    """Add a plugin's toy model (a module class with `example_inputs()`) to the conformance set."""
    if model_class not in TOY_MODELS:
        TOY_MODELS.append(model_class)
    return model_class


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(1 + 0.3 * torch.randn(n, generator=gen))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=gen))
    model.eval()


def check_pass(pass_: Pass, model: nn.Module, inputs: tuple, calib: object = None) -> api.Result:
    """Run one pass strictly (contract violations raise) and check the graph it leaves behind."""
    result = api.optimize(model, inputs, [pass_], calib=calib, strict=True, measure_latency=False)
    if isinstance(result.model, fx.GraphModule):
        result.model.graph.lint()
        record = result.report.records[0]
        if record.status == "applied" and pass_.level == "graph":
            stamped = [n for n in result.model.graph.nodes if n.meta.get("rewrite.pass") == pass_.name]
            removed_only = len(result.model.graph.nodes) < len(capture.capture(model, inputs).module.graph.nodes)
            assert stamped or removed_only, f"{pass_.name} changed the graph but stamped no node with its name"
    return result
