"""Factored convolutions (chains of smaller convs) and the decompositions that initialize them.

W ∈ R^{O×I×k₁…k_d} (groups = 1) and its three factored forms, each run as a chain of standard convs:

- CP (one-way filters): W[o,i,κ] = Σ_r A[o,r] B[i,r] Π_a K_a[κ_a,r]
  → 1×1 (I→R, Bᵀ) → one depthwise 1-D filter per axis (K_a, R groups) → 1×1 (R→O, A, bias).
  R(I + O + Σk_a) weights. Decomposed by CP-ALS (alternating least squares from an SVD start).
- Tucker-2: W = core ×₀ U_out ×₁ U_in → 1×1 (I→R_in) → k…k conv (R_in→R_out) → 1×1 (R_out→O).
  I·R_in + R_in·R_out·Πk + R_out·O weights. Decomposed by truncated HOSVD (closed form).
- separable (2-D only, AIMET's spatial SVD): M[(i,y),(o,x)] = W[o,i,y,x] ≈ U_R S_R V_Rᵀ
  → k_h×1 conv (I→R) → 1×k_w conv (R→O). R(I·k_h + O·k_w) weights; truncated SVD (Eckart–Young).

Stride, dilation and padding (numbers, 'same', 'valid', any padding mode) split per axis exactly: the
1×1 convs have no bias and no padding, so zero padding commutes with them, and a separable kernel's
per-axis filters compose to the full one (cross-correlation indices add per axis).
"""
from __future__ import annotations

import math

import torch
from torch import nn

FORMATS = ("cp", "tucker2", "separable")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _axis(conv: nn.Module, axis: int, attr: str, fill):
    """conv's stride/padding/dilation/kernel along one spatial axis, `fill` on the others."""
    value = getattr(conv, attr)
    if isinstance(value, str):
        return value
    return tuple(v if a == axis else fill for a, v in enumerate(value))


def _pointwise(conv: nn.Module, c_in: int, c_out: int, bias: bool) -> nn.Module:
    return _CONV[len(conv.kernel_size)](c_in, c_out, 1, bias=bias)


class FactoredConv(nn.Module):
    """A chain of convs standing for one conv; `format` and `ranks` say which factorization."""

    def __init__(self, format: str, ranks: tuple[int, ...], layers: list[nn.Module]):
        super().__init__()
        self.format, self.ranks = format, ranks
        self.chain = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain(x)

    def dense_weight(self) -> torch.Tensor:
        """The O×I×k… kernel this chain computes (bias aside), rebuilt from its factors."""
        return dense_from(self)


def cp_chain(conv: nn.Module, rank: int) -> FactoredConv:
    """1×1 → depthwise 1-D filter per axis → 1×1, weights left at their default init."""
    d = len(conv.kernel_size)
    layers = [_pointwise(conv, conv.in_channels, rank, bias=False)]
    for axis in range(d):
        layers.append(_CONV[d](rank, rank, _axis(conv, axis, "kernel_size", 1), stride=_axis(conv, axis, "stride", 1),
                               padding=_axis(conv, axis, "padding", 0), dilation=_axis(conv, axis, "dilation", 1),
                               groups=rank, bias=False, padding_mode=conv.padding_mode))
    layers.append(_pointwise(conv, rank, conv.out_channels, bias=conv.bias is not None))
    return FactoredConv("cp", (rank,), layers)


def tucker2_chain(conv: nn.Module, rank_in: int, rank_out: int) -> FactoredConv:
    d = len(conv.kernel_size)
    core = _CONV[d](rank_in, rank_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
    layers = [_pointwise(conv, conv.in_channels, rank_in, bias=False), core,
              _pointwise(conv, rank_out, conv.out_channels, bias=conv.bias is not None)]
    return FactoredConv("tucker2", (rank_in, rank_out), layers)


def separable_chain(conv: nn.Module, rank: int) -> FactoredConv:
    """k_h×1 (I→R) then 1×k_w (R→O): Conv2d only."""
    first = nn.Conv2d(conv.in_channels, rank, _axis(conv, 0, "kernel_size", 1), stride=_axis(conv, 0, "stride", 1),
                      padding=_axis(conv, 0, "padding", 0), dilation=_axis(conv, 0, "dilation", 1), bias=False,
                      padding_mode=conv.padding_mode)
    second = nn.Conv2d(rank, conv.out_channels, _axis(conv, 1, "kernel_size", 1), stride=_axis(conv, 1, "stride", 1),
                       padding=_axis(conv, 1, "padding", 0), dilation=_axis(conv, 1, "dilation", 1),
                       bias=conv.bias is not None, padding_mode=conv.padding_mode)
    return FactoredConv("separable", (rank,), [first, second])


def chain_params(conv: nn.Module, format: str, rank: int) -> int:
    """Weights of a factored form at `rank` (Tucker-2: rank_in = rank_out = rank), biases aside."""
    o, i, ks = conv.out_channels, conv.in_channels, conv.kernel_size
    if format == "cp":
        return rank * (i + o + sum(ks))
    if format == "tucker2":
        return i * rank + rank * rank * math.prod(ks) + rank * o
    return rank * (i * ks[0] + o * ks[1])


def full_rank(conv: nn.Module, format: str) -> int:
    """The largest rank that still saves weights (CP) or is meaningful (Tucker-2, separable)."""
    o, i, ks = conv.out_channels, conv.in_channels, conv.kernel_size
    if format == "tucker2":
        return min(i, o)
    if format == "separable":
        return min(i * ks[0], o * ks[1])
    return max(1, (o * i * math.prod(ks)) // (i + o + sum(ks)))


def rank_for_ratio(conv: nn.Module, format: str, ratio: float) -> int:
    """The largest rank whose factored weights are at most `ratio` of the conv's."""
    budget = ratio * conv.weight.numel()
    rank = 1
    while rank < full_rank(conv, format) and chain_params(conv, format, rank + 1) <= budget:
        rank += 1
    return rank


# --- decompositions ---------------------------------------------------------------------------------

def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Rows indexed by the factors' row indices in row-major order, matching `_unfold`'s columns."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def cp_als(t: torch.Tensor, rank: int, iterations: int = 200, tol: float = 1e-7, seed: int = 0) -> list[torch.Tensor]:
    """Factors F_n (shape dim_n × rank) with t ≈ Σ_r ⊗_n F_n[:, r], by alternating least squares.

    Start: leading left singular vectors of each unfolding (random columns past a mode's size), which
    makes the result deterministic for a given seed. Columns of every factor but the first are kept at
    unit norm (scale moves into the first), which keeps the iteration well conditioned. Memory stays
    O(numel·rank / largest mode): no Khatri–Rao product over all other modes is formed.
    """
    t = t.double()
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for mode in range(t.dim()):
        u = torch.linalg.svd(_unfold(t, mode), full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            u = torch.cat([u, torch.randn(t.shape[mode], rank - u.shape[1], generator=gen, dtype=t.dtype)], 1)
        factors.append(u)
    norm_sq, previous = float((t * t).sum()), math.inf
    for iteration in range(iterations):
        for mode in range(t.dim()):
            others = [f for m, f in enumerate(factors) if m != mode]
            gram = math.prod(f.T @ f for f in others)
            # damping for rank-deficient starts; its floor keeps an all-zero kernel (a zero-initialized
            # residual branch folded with its BatchNorm, as timm's ResNets have) solvable: its factors are zero
            damping = max(1e-12 * float(gram.diagonal().mean()), 1e-30)
            gram = gram + damping * torch.eye(rank, dtype=t.dtype)
            product = _mttkrp(t, factors, mode)
            factors[mode] = torch.linalg.solve(gram, product.T).T
            if mode > 0:
                scale = factors[mode].norm(dim=0).clamp_min(1e-30)
                factors[mode] = factors[mode] / scale
                factors[0] = factors[0] * scale
        if iteration % 10 == 9:  # ‖t − t̂‖² = ‖t‖² − 2⟨t, t̂⟩ + ‖t̂‖², from Gram matrices (no reconstruction)
            inner = float((_mttkrp(t, factors, 0) * factors[0]).sum())
            fitted = float(math.prod(f.T @ f for f in factors).sum())
            error = math.sqrt(max(norm_sq - 2 * inner + fitted, 0.0) / max(norm_sq, 1e-30))
            if previous - error < tol:
                break
            previous = error
    return factors


def _mttkrp(t: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """Σ over every other mode of t · Π F_m[i_m, r]: (dim_mode × rank), contracting the largest mode first."""
    others = sorted((m for m in range(t.dim()) if m != mode), key=lambda m: -t.shape[m])
    current = torch.tensordot(t, factors[others[0]], dims=([others[0]], [0]))  # remaining modes…, r
    axes = [m for m in range(t.dim()) if m != others[0]]
    for m in others[1:]:
        where = axes.index(m)
        shape = [1] * current.dim()
        shape[where], shape[-1] = t.shape[m], factors[m].shape[1]
        current = (current * factors[m].reshape(shape)).sum(where)
        axes.pop(where)
    return current


def cp_dense(factors: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor: F_0 @ (Khatri–Rao of the rest)ᵀ, so only the rest's rows times rank are formed."""
    shape = [f.shape[0] for f in factors]
    if len(factors) == 1:
        return factors[0].sum(1)
    return (factors[0] @ _khatri_rao(factors[1:]).T).reshape(shape)


ALS_BUDGET = 3e9  # multiply-adds per layer: large layers at high rank get fewer sweeps (at least 10)


def als_sweeps(w: torch.Tensor, rank: int) -> int:
    """Sweeps of CP-ALS for a kernel: 200 for small layers; a ResNet's 512×512×3×3 at rank 573 would take
    minutes per layer at 200, so the work is bounded (recovery does the rest). Deterministic: by size."""
    per_sweep = 4 * w.numel() * rank
    return int(max(10, min(200, ALS_BUDGET // per_sweep)))


def decompose_cp(conv: nn.Module, rank: int, seed: int = 0) -> FactoredConv:
    w = conv.weight.detach()
    a, b, *axes = cp_als(w, rank, iterations=als_sweeps(w, rank), seed=seed)
    chain = cp_chain(conv, rank)
    d = len(axes)
    with torch.no_grad():
        chain.chain[0].weight.copy_(b.T.reshape(rank, -1, *[1] * d).float())
        for axis, k in enumerate(axes):
            shape = [rank, 1] + [k.shape[0] if a_ == axis else 1 for a_ in range(d)]
            chain.chain[1 + axis].weight.copy_(k.T.reshape(shape).float())
        chain.chain[-1].weight.copy_(a.reshape(*a.shape, *[1] * d).float())
        _copy_bias(conv, chain.chain[-1])
    return chain


def decompose_tucker2(conv: nn.Module, rank_in: int, rank_out: int) -> FactoredConv:
    w = conv.weight.detach().double()
    u_out = torch.linalg.svd(_unfold(w, 0), full_matrices=False)[0][:, :rank_out]
    u_in = torch.linalg.svd(_unfold(w, 1), full_matrices=False)[0][:, :rank_in]
    core = torch.einsum("oi...,op,iq->pq...", w, u_out, u_in)
    chain = tucker2_chain(conv, rank_in, rank_out)
    d = len(conv.kernel_size)
    with torch.no_grad():
        chain.chain[0].weight.copy_(u_in.T.reshape(rank_in, -1, *[1] * d).float())
        chain.chain[1].weight.copy_(core.float())
        chain.chain[2].weight.copy_(u_out.reshape(*u_out.shape, *[1] * d).float())
        _copy_bias(conv, chain.chain[2])
    return chain


def decompose_separable(conv: nn.Module, rank: int) -> FactoredConv:
    w = conv.weight.detach().double()
    o, i, kh, kw = w.shape
    m = w.permute(1, 2, 0, 3).reshape(i * kh, o * kw)  # M[(i,y),(o,x)]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    first = (u[:, :rank] * root).reshape(i, kh, rank).permute(2, 0, 1)[..., None]      # (R, I, kh, 1)
    second = (root[:, None] * vh[:rank]).reshape(rank, o, kw).permute(1, 0, 2)[:, :, None, :]  # (O, R, 1, kw)
    chain = separable_chain(conv, rank)
    with torch.no_grad():
        chain.chain[0].weight.copy_(first.float())
        chain.chain[1].weight.copy_(second.float())
        _copy_bias(conv, chain.chain[1])
    return chain


def _copy_bias(conv: nn.Module, last: nn.Module) -> None:
    if conv.bias is not None:
        last.bias.copy_(conv.bias.detach())


def dense_from(chain: FactoredConv) -> torch.Tensor:
    """The full kernel a factored chain computes, from its factors (for tests and weight errors)."""
    layers = list(chain.chain)
    if chain.format == "cp":
        first, *axes, last = layers
        factors = [last.weight.flatten(1), first.weight.flatten(1).T] + [
            k.weight.reshape(k.weight.shape[0], -1).T for k in axes]
        return cp_dense([f.double() for f in factors]).float()
    if chain.format == "tucker2":
        first, core, last = layers
        return torch.einsum("pq...,op,qi->oi...", core.weight, last.weight.flatten(1), first.weight.flatten(1))
    first, second = layers
    return torch.einsum("riy,orx->oiyx", first.weight[..., 0], second.weight[:, :, 0, :])


def random_init(chain: FactoredConv, gain: float = 1 / 3) -> FactoredConv:
    """A priori: each conv of the chain N(0, g^(1/L)/fan_in), so the chain scales activations' variance by
    `gain` like the dense layer's default init does (kaiming_uniform(a=√5): fan_in·Var(w) = 1/3)."""
    layers = [m for m in chain.chain]
    with torch.no_grad():
        for layer in layers:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0, math.sqrt(gain ** (1 / len(layers)) / fan_in))
            if layer.bias is not None:
                layer.bias.zero_()
    return chain
