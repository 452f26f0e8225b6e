"""W x + b → U(V x) + b (LowRank) or U·blockdiag(V₁…V_B)·x + b (BlockDense): structured FFN layers.

LowRank: truncated SVD W ≈ U_R S_R V_Rᵀ, V = √S_R V_Rᵀ, U = U_R √S_R (Eckart–Young optimal).
BlockDense: W = [W₁ | … | W_B] by input blocks, each W_k ≈ rank-R/B SVD (Frobenius-optimal for that
structure, since U·blockdiag(V)x = Σ_k U_k V_k x_k). Parameters: (N+M)R and R(M + N/B).

Paper: Wei, Moalla, Pascanu, Gulcehre, "Building on Efficient Foundations: Effectively Training LLMs
with Structured Feedforward Layers", NeurIPS 2024 (arXiv:2406.16450). The paper trains these layers;
here they are fitted to a trained layer in closed form, then optionally recovered (--recover) with the
paper's self-guided mixing: o = α·W x + (1−α)·structured(x), α falling 1 → 0 on a cosine schedule over
the first half of recovery, after which the dense W is dropped.

whiten=true (the default): each factor pair is fitted to the layer's outputs on the calibration inputs
rather than to its weights: W ≈ [W L]_R L⁻¹ with L Lᵀ = Σ x xᵀ (SVD-LLM's whitening, `rewrite.weighting`;
BlockDense whitens each input block by its own diagonal block of Σ x xᵀ). On pretrained MiniLM's FFNs
at param-ratio 0.75 the held-out embedding cosine is 0.93 whitened against 0.74 from the weights alone.

Contract: approximate, SQNR ≥ min-sqnr dB on calibration data (see compress.search_ratios for budgets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rewrite import compress, weighting
from rewrite.errors import InvalidValue
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor
from rewrite.patterns import set_submodule, shared_weight


class LowRankLinear(nn.Module):
    """second(first(x)): first = Linear(in → r, no bias), second = Linear(r → out, original bias)."""

    # No dense weight is kept (forming it on each read would cost more than the layer): `weight` is None, as a Linear's
    # absent bias is, so code that checks it (T5's FFN casts to `wo.weight`'s dtype if it is a tensor) runs.
    weight = None

    def __init__(self, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.first = nn.Linear(first.shape[1], first.shape[0], bias=False)
        self.second = nn.Linear(second.shape[1], second.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.first.weight.copy_(first)
            self.second.weight.copy_(second)
            if bias is not None:
                self.second.bias.copy_(bias)

    takes_children = True  # its factors may be rewritten layers themselves (dgq after fwsvd): from_state takes them

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], children: dict[str, nn.Module] | None = None
                   ) -> "LowRankLinear":
        """The layer its state dict describes (a saved model folder, `rewrite.checkpoint.load_layers`); a factor
        given in `children` (rebuilt by its own class) replaces the plain Linear."""
        children = children or {}
        first = children.get("first") or compress.linear_from(tensors, "first.")
        second = children.get("second") or compress.linear_from(tensors, "second.")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.first, layer.second = first, second
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class BlockDenseLinear(nn.Module):
    """U · blockdiag(V₁…V_B) · x + b with V: (B, R/B, N/B), U: (M, R)."""

    weight = None  # no dense weight, as `LowRankLinear`

    def __init__(self, blocks: torch.Tensor, mix: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.blocks = nn.Parameter(blocks.clone())
        self.mix = nn.Linear(mix.shape[1], mix.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.mix.weight.copy_(mix)
            if bias is not None:
                self.mix.bias.copy_(bias)

    takes_children = True

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], children: dict[str, nn.Module] | None = None
                   ) -> "BlockDenseLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.blocks = nn.Parameter(tensors["blocks"].clone())
        layer.mix = (children or {}).get("mix") or compress.linear_from(tensors, "mix.")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, r, n = self.blocks.shape
        h = torch.einsum("...bn,brn->...br", x.reshape(*x.shape[:-1], b, n), self.blocks)
        return self.mix(h.reshape(*x.shape[:-1], b * r))


class GuidedLinear(nn.Module):
    """Self-guided mixing for recovery: α·dense(x) + (1−α)·structured(x); the dense path is dropped at α=0."""

    def __init__(self, dense: nn.Linear, structured: nn.Module):
        super().__init__()
        self.dense, self.structured, self.alpha = dense, structured, 1.0

    def recovery_progress(self, fraction: float) -> None:
        """Cosine from 1 to 0 over the first half of recovery (the paper uses 30–50% of training)."""
        self.alpha = 0.5 * (1 + math.cos(math.pi * min(1.0, fraction / 0.5)))
        if self.alpha == 0.0:
            self.dense = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is None:
            return self.structured(x)
        return self.alpha * self.dense(x) + (1 - self.alpha) * self.structured(x)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) with second @ first the best rank-`rank` approximation of `weight`."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float()


def low_rank(linear: nn.Linear, rank: int, gram: torch.Tensor | None = None) -> LowRankLinear:
    """The best rank-`rank` pair for the weights, or with `gram` (Σ x xᵀ) for the outputs on those inputs."""
    first, second = weighting.WeightedSpectrum(linear.weight, gram).factors(rank) if gram is not None else \
        svd_factors(linear.weight.detach(), rank)
    return LowRankLinear(first, second, None if linear.bias is None else linear.bias.detach())


def block_dense(linear: nn.Linear, rank: int, blocks: int, gram: torch.Tensor | None = None) -> BlockDenseLinear:
    """Each input block's rank-R/B fit; with `gram` (Σ x xᵀ), fitted to its outputs (its diagonal block)."""
    w = linear.weight.detach()
    per, width = rank // blocks, w.shape[1] // blocks
    grams = [None] * blocks if gram is None else \
        [gram[k * width:(k + 1) * width, k * width:(k + 1) * width] for k in range(blocks)]
    firsts, seconds = zip(*(weighting.WeightedSpectrum(chunk, g).factors(per)
                            for chunk, g in zip(w.chunk(blocks, dim=1), grams)))
    return BlockDenseLinear(torch.stack(firsts), torch.cat(seconds, dim=1),
                            None if linear.bias is None else linear.bias.detach())


@dataclass(frozen=True)
class StructuredFFN(compress.Factorizes, SqnrFloor, Pass):
    name = "lowrank"
    paper = "Wei et al., Structured Feedforward Layers, NeurIPS 2024 (arXiv:2406.16450)"
    summary = "FFN Linears → low-rank or block-dense factors (whitened truncated SVD closed forms)"
    applies_to = ("Linear layers, GPT-2 Conv1D and 1×1 convolutions (target=ffn: Linear→activation→Linear pairs; "
                  "target=all)")
    level = "module"
    recoverable = True
    # MiniLM, half the FFN weights, 200 steps: held-out cosine 0.845 at lr 1e-3 and 3e-4 (no step beat the start),
    # 0.875 at 1e-4
    recovery_lr = 1e-4
    calibration_note = "needed (whiten=true, the default); optional (whiten=false)"

    structure: Literal["lowrank", "blockdense"] = "lowrank"
    rank: int = 0
    param_ratio: float = 0.8
    blocks: int = 4
    target: Literal["ffn", "all"] = "ffn"
    budget_sqnr: float = 0.0
    budget_metric: float = 0.0
    guided: bool = False
    whiten: bool = True
    min_sqnr: float = 10.0

    @property
    def needs_calibration(self) -> bool:
        return self.whiten  # the whitening is Σ x xᵀ over the calibration inputs

    def __post_init__(self):
        super().__post_init__()
        if self.blocks < 1:
            raise InvalidValue("blocks must be ≥ 1")

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        compress.linearize_targets(module, self.target)  # GPT-2's Conv1D and 1×1 convolutions, as Linears
        paths = [p for p, _ in compress.target_linears(module, self.target) if not shared_weight(module, p)]
        grams = weighting.moments(module, paths, ctx.calibration, ctx.masks).inputs if self.whiten and paths else {}
        return factorize_linears(self, module, ctx, lambda linear, path, ratio:
                                 self._build(linear, ratio, grams.get(path)))

    def _build(self, linear: nn.Linear, ratio: float, gram: torch.Tensor | None) -> nn.Module | str:
        if self.structure == "blockdense":
            n, m = linear.in_features, linear.out_features
            if n % self.blocks:
                return f"in_features {n} not divisible by blocks={self.blocks}"
            rank = self.rank or int(ratio * n * m / (m + n / self.blocks))  # params R(M + N/B) = ratio·N·M
            rank = max(self.blocks, rank // self.blocks * self.blocks)
            saves = rank * (linear.out_features + linear.in_features / self.blocks) < linear.weight.numel()
            return block_dense(linear, rank, self.blocks, gram) if saves else "rank would not save parameters"
        rank = compress.saving_rank(linear, self.rank, ratio)
        return rank if isinstance(rank, str) else low_rank(linear, rank, gram)


def _weights(layer: nn.Module) -> int:
    """Weights of a replacement, biases left out (its bias is the original's)."""
    return sum(q.numel() for name, q in layer.named_parameters() if not name.endswith("bias"))


def factorize_linears(pass_: Pass, module: nn.Module, ctx: PassContext, build) -> PassResult:
    """The shared loop of lowrank and fwsvd: choose layers, ratios (global or searched), swap, report."""
    targets = compress.target_linears(module, pass_.target)
    # target=all: what no Linear holds (MoE experts, spatial convolutions) is named; target=ffn says it elsewhere
    unread = compress.unread_weights(module, f"{pass_.name} factorizes Linears and 1×1 convolutions", "dense") \
        if pass_.target == "all" else []
    if not targets:
        return PassResult(module, False, skipped=[("model", compress.no_targets(module, pass_.target)), *unread])
    ratios = {p: pass_.param_ratio for p, _ in targets}
    searching = bool(pass_.budget_sqnr or pass_.budget_metric)
    if searching and targets:
        reference = compress.reference_outputs(module, ctx.calibration)
        within = compress.budget_check(pass_.budget_sqnr, pass_.budget_metric, ctx.calibration, reference,
                                       ctx.evaluate, ctx.metric, ctx.masks)
        usable = [p for p, m in targets if not isinstance(build(m, p, 0.2), str)]
        ratios = compress.search_ratios(module, usable, build, ctx.calibration, reference, within)
    done, skipped, errors, held = [], unread, [], ctx.leave_as_is
    for path, linear in targets:
        if path in held:
            skipped.append((path, held[path]))
            continue
        if path not in ratios:
            skipped.append((path, "no ratio stays within the budget"))
            continue
        if shared_weight(module, path):
            skipped.append((path, compress.SHARED))
            continue
        replacement = build(linear, path, ratios[path])
        if isinstance(replacement, str):
            skipped.append((path, replacement))
            continue
        errors.append(compress.weight_error(linear, replacement))
        if getattr(pass_, "guided", False) and ctx.recover is not None:
            replacement = GuidedLinear(linear, replacement)
        set_submodule(module, path, replacement)
        done.append(path)
    before = sum(linear.weight.numel() for p, linear in targets if not shared_weight(module, p))
    after = before - sum(linear.weight.numel() - _weights(module.get_submodule(p)) for p, linear in targets if p in done)
    stats = {"factorized": len(done), "mean_weight_rel_err": round(sum(errors) / len(errors), 4) if errors else 0,
             "target_weights_kept": round(after / before, 4) if before else 1.0}
    if searching:
        stats["ratios"] = ",".join(f"{r:g}" for r in sorted(set(ratios.values())))
    return PassResult(module, bool(done), stats, compress.restore_pointwise(module, skipped))
