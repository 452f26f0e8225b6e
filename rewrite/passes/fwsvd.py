"""W → R⁻¹ [R W L]_r L⁻¹ (whiten=true, the default) or (U_r S_r^½)(S_r^½ V_rᵀ D⁻¹) with W·D = U S Vᵀ,
D = diag(√Î) (whiten=false, the paper's form): Fisher-weighted SVD of Linear layers.

whiten=true: L Lᵀ = Σ x xᵀ over the layer's calibration inputs, Rᵀ R = Σ g gᵀ over its output gradients
(the Fisher of the same loss, taken per token; `rewrite.weighting`). Each dropped singular value then
costs σ² of the model's output error in one unit for all layers, so `param-ratio` is one budget for the
whole model: it keeps that fraction of the target Linears' weights, and the ranks go where they hurt
least. fisher=none with whiten is SVD-LLM's activation whitening alone (a uniform ratio per layer, since
its errors are per layer). On pretrained MiniLM the whitened Fisher form keeps a held-out embedding
cosine of 0.96 with 25% of the FFN weights removed, where the paper's form keeps 0.74
(benchmarks/compress_minilm.py).

Î_j = Σ_samples Σ_i (∂L/∂W_ij)² is the Fisher importance of input feature j; weighting the
factorization by it keeps the directions the task loss is sensitive to, at the cost of a worse plain
reconstruction. The first Linear has no bias; the second keeps the original bias.

Papers: Hsu, Hua, Tang, Lin, Shen, Jin, "Language model compression with weighted low-rank
factorization", ICLR 2022 (arXiv:2207.00112); the whitening: Wang et al., SVD-LLM (arXiv:2403.07378).

Loss for the Fisher: with calibration targets, cross-entropy (integer targets) or MSE; without labels,
for outputs with `logits` (Hugging Face classifiers and language models) cross-entropy against labels
drawn from the model's own softmax (the true Fisher of its predictive distribution); otherwise
the sampled-label Fisher of a Gaussian output model, L = ⟨f(x), ε⟩ with ε ~ N(0, I) per sample, whose
expected squared gradient is diag(JᵀJ) (a self-distillation loss against the original would have zero
gradient at the original weights). fisher=exact uses per-sample gradients; fisher=batch squares
mini-batch gradients (cheaper, biased); with whiten, both take the same per-token output gradients.
fisher=none is plain SVD (whiten=false) or SVD-LLM (whiten=true), the baselines.
Contract: approximate, SQNR ≥ min-sqnr dB on calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rewrite import compress, weighting
from rewrite.errors import RewriteError
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor
from rewrite.passes.lowrank import LowRankLinear, factorize_linears
from rewrite.patterns import shared_weight


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
    loss = weighting.fisher_loss(module(*batch), target, gen)
    if not loss.requires_grad:
        raise RewriteError("fwsvd: the model's outputs carry no gradient (integer outputs?): "
                           "give --calib with targets, or use lowrank instead")
    loss.backward()


@dataclass(frozen=True)
class FisherSVD(compress.Factorizes, SqnrFloor, Pass):
    name = "fwsvd"
    paper = "Hsu et al., Language model compression with weighted low-rank factorization, ICLR 2022 (arXiv:2207.00112)"
    summary = "Linears → two low-rank Linears by whitened, Fisher-weighted SVD; ranks under one parameter budget"
    applies_to = ("Linear layers, GPT-2 Conv1D and 1×1 convolutions (target=ffn: Linear→activation→Linear pairs; "
                  "target=all)")
    needs_calibration = True
    level = "module"
    recoverable = True  # its factors train like lowrank's (the benchmark's `--recover` rows were no-ops)
    # MiniLM, half the FFN weights, 200 steps: held-out cosine 0.880 at lr 1e-3 (no step beat the start), 0.904 at
    # 3e-4, 0.906 at 1e-4
    recovery_lr = 1e-4

    rank: int = 0
    param_ratio: float = 0.8
    fisher: Literal["batch", "exact", "none"] = "batch"
    whiten: bool = True
    target: Literal["ffn", "all"] = "ffn"
    budget_sqnr: float = 0.0
    budget_metric: float = 0.0
    min_sqnr: float = 10.0

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        compress.linearize_targets(module, self.target)  # GPT-2's Conv1D and 1×1 convolutions, as Linears
        paths = [p for p, _ in compress.target_linears(module, self.target) if not shared_weight(module, p)]
        if not paths:  # no target, or each is read elsewhere too (ALBERT's shared layers): no weight to take a
            return factorize_linears(self, module, ctx, lambda *_: "unused")  # gradient for; it says why of each
        build, how = self._whitened(module, paths, ctx) if self.whiten else self._weighted(module, paths, ctx)
        result = factorize_linears(self, module, ctx, build)
        result.stats["fisher"] = self.fisher + ("" if ctx.targets is None or self.fisher == "none" else " (labels)")
        result.stats["ranks"] = how
        return result

    def _weighted(self, module, paths, ctx):
        """The paper's form: input features weighted by the Fisher sums, a uniform ratio per layer."""
        importance = {} if self.fisher == "none" else fisher_importance(
            module, paths, ctx.calibration, ctx.targets, self.fisher == "exact", ctx.seed)

        def build(linear: nn.Linear, path: str, ratio: float) -> nn.Module | str:
            rank = compress.saving_rank(linear, self.rank, ratio)
            return rank if isinstance(rank, str) else fisher_svd(linear, importance.get(path), rank)
        return build, "uniform"

    def _whitened(self, module, paths, ctx):
        """Whitened (and Fisher-weighted) spectra; with the Fisher, one global budget sets the ranks."""
        gen = torch.Generator().manual_seed(ctx.seed)
        loss = None if self.fisher == "none" else \
            (lambda out, i: weighting.fisher_loss(out, ctx.targets[i] if ctx.targets is not None else None, gen))
        found = weighting.moments(module, paths, ctx.calibration, ctx.masks, loss)
        _check_gradients(found, loss)
        spectra = {p: weighting.WeightedSpectrum(module.get_submodule(p).weight, found.inputs[p],
                                                 found.outputs.get(p)) for p in paths}
        searching = self.budget_sqnr or self.budget_metric
        allocated = None if searching or self.rank or loss is None else weighting.allocate(spectra, self.param_ratio)

        def build(linear: nn.Linear, path: str, ratio: float) -> nn.Module | str:
            if path not in spectra:
                return compress.SHARED
            rank = allocated.get(path) if allocated is not None else compress.saving_rank(linear, self.rank, ratio)
            if rank is None:
                return f"kept dense: the global budget (param-ratio={self.param_ratio:g}) cuts where it hurts less"
            if isinstance(rank, str):
                return rank
            first, second = spectra[path].factors(rank)
            return LowRankLinear(first, second, None if linear.bias is None else linear.bias.detach())
        return build, "global" if allocated is not None else "uniform"


def _check_gradients(found: weighting.Moments, loss) -> None:
    if loss is not None and not any(bool(g.any()) for g in found.outputs.values()):
        raise RewriteError("fwsvd: the model's outputs do not move with the layers to factorize (their gradient is "
                           "zero on every calibration batch: integer outputs, or a head whose weights are all zero, "
                           "as timm's Mixer starts): use fwsvd{fisher=none}, or give --calib with targets")
