"""W → (U_r S_r^½)(S_r^½ V_rᵀ D⁻¹) with W·D = U S Vᵀ, D = diag(√Î): Fisher-weighted SVD of Linear layers.

Î_j = Σ_samples Σ_i (∂L/∂W_ij)² is the Fisher importance of input feature j; weighting the
factorization by it keeps the directions the task loss is sensitive to, at the cost of a worse plain
reconstruction. The first Linear has no bias; the second keeps the original bias.

Paper: Hsu, Hua, Tang, Lin, Shen, Jin, "Language model compression with weighted low-rank
factorization", ICLR 2022 (arXiv:2207.00112).

Loss for the Fisher: with calibration targets, cross-entropy (integer targets) or MSE; without labels,
the sampled-label Fisher of a Gaussian output model, L = ⟨f(x), ε⟩ with ε ~ N(0, I) per sample, whose
expected squared gradient is diag(JᵀJ) (a self-distillation loss against the original would have zero
gradient at the original weights). fisher=exact uses per-sample gradients; fisher=batch squares
mini-batch gradients (cheaper, biased); fisher=none is plain SVD, the baseline.
Contract: approximate, SQNR ≥ min-sqnr dB on calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from rewrite import compress
from rewrite.errors import RewriteError
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor
from rewrite.passes.lowrank import LowRankLinear, factorize_linears


def fisher_svd(linear: nn.Linear, importance: torch.Tensor | None, rank: int) -> LowRankLinear:
    """The weighted closed form; `importance` None gives plain truncated SVD. In float32: at 7B dimensions
    (11008 × 4096) a float64 copy, its scaled copy and the factors were 1.4 GB of the block's peak."""
    w = linear.weight.detach().float()
    scale = torch.ones(w.shape[1]) if importance is None else \
        (importance.double() + 1e-6 * importance.double().mean().clamp_min(1e-30)).sqrt().float()
    u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
    del w
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]) / scale
    second = u[:, :rank] * root
    return LowRankLinear(first, second, None if linear.bias is None else linear.bias.detach())


def fisher_importance(module: nn.Module, paths: list[str], batches: list[tuple], targets: list[Any] | None,
                      per_sample: bool, seed: int) -> dict[str, torch.Tensor]:
    """Per-input-feature Fisher sums for each Linear at `paths`."""
    weights = {p: module.get_submodule(p).weight for p in paths}
    sums = {p: torch.zeros(w.shape[1], dtype=torch.float64) for p, w in weights.items()}
    every = list(module.parameters())
    flags = [q.requires_grad for q in every]
    for q in every:  # gradients for the factorized weights only
        q.requires_grad_(False)
    # Each gradient is squared into its sums and freed as soon as backward has made it: one layer's
    # gradient in memory at a time, not all of a block's (0.8 GB at 7B dimensions).
    for w in weights.values():
        w.requires_grad_(True)
    hooks = [w.register_post_accumulate_grad_hook(_square_into(sums[p])) for p, w in weights.items()]
    gen = torch.Generator().manual_seed(seed)
    try:
        for i, batch in enumerate(batches):
            target = targets[i] if targets is not None else None
            for sample in (_samples(batch) if per_sample else [(batch, target)]):
                _accumulate(module, sample[0], sample[1] if per_sample else target, gen)
    finally:
        for hook in hooks:
            hook.remove()
        for q, flag in zip(every, flags):
            q.grad = None
            q.requires_grad_(flag)
    return sums


def _square_into(total: torch.Tensor):
    def hook(weight: torch.Tensor) -> None:
        total.add_(weight.grad.square().sum(dim=0, dtype=torch.float64))
        weight.grad = None
    return hook


def _samples(batch: tuple) -> list[tuple[tuple, None]]:
    n = next(x.shape[0] for x in batch if isinstance(x, torch.Tensor))
    return [(tuple(x[i:i + 1] if isinstance(x, torch.Tensor) else x for x in batch), None) for i in range(n)]


def _accumulate(module, batch, target, gen) -> None:
    loss = _loss(module(*batch), target, gen)
    if not loss.requires_grad:
        raise RewriteError("fwsvd: the model's outputs carry no gradient (integer outputs?): "
                           "give --calib with targets, or use lowrank instead")
    loss.backward()


def _loss(outputs: Any, target: Any, gen: torch.Generator) -> torch.Tensor:
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise RewriteError("fwsvd: the model returns no floating-point output to take gradients of")
    if target is None:  # sampled-label Fisher: E[(Jᵀε)²] = diag(JᵀJ)
        return sum((t * torch.randn(t.shape, generator=gen)).sum() for t in leaves)
    out = leaves[0]
    if not target.is_floating_point():
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1).long(), reduction="sum")
    return 0.5 * (out - target).square().sum()


@dataclass(frozen=True)
class FisherSVD(compress.Factorizes, SqnrFloor, Pass):
    name = "fwsvd"
    paper = "Hsu et al., Language model compression with weighted low-rank factorization, ICLR 2022 (arXiv:2207.00112)"
    summary = "Linears → two low-rank Linears by Fisher-weighted SVD (fisher=none: plain SVD baseline)"
    applies_to = "Linear layers (target=ffn: Linear→activation→Linear pairs; target=all)"
    needs_calibration = True
    level = "module"
    recoverable = True  # its factors train like lowrank's (the benchmark's `--recover` rows were no-ops)

    rank: int = 0
    param_ratio: float = 0.5
    fisher: Literal["batch", "exact", "none"] = "batch"
    target: Literal["ffn", "all"] = "ffn"
    budget_sqnr: float = 0.0
    budget_metric: float = 0.0
    min_sqnr: float = 10.0

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        paths = [p for p, _ in compress.target_linears(module, self.target)]
        if not paths:
            return PassResult(module, False, skipped=[("model", f"no Linear layers (target={self.target})")])
        importance = {} if self.fisher == "none" else fisher_importance(
            module, paths, ctx.calibration, ctx.targets, self.fisher == "exact", ctx.seed)

        def build(linear: nn.Linear, path: str, ratio: float) -> nn.Module | str:
            rank = compress.saving_rank(linear, self.rank, ratio)
            return rank if isinstance(rank, str) else fisher_svd(linear, importance.get(path), rank)

        result = factorize_linears(self, module, ctx, build)
        result.stats["fisher"] = self.fisher + ("" if ctx.targets is None or self.fisher == "none" else " (labels)")
        return result
