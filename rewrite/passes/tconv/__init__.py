"""W ∗ x → A ∗ (K_d ∗ … (K₁ ∗ (B ∗ x))): convolutions as chains of one-way filters (tensor-factored convs).

A conv kernel W ∈ R^{O×I×k₁…k_d} is replaced by a compressed tensor format run as a chain of small convs
(`factors.py` has the three formats and their equations): CP, W[o,i,κ] = Σ_r A[o,r] B[i,r] Π_a K_a[κ_a,r]
(1×1 → a depthwise 1-D filter per axis → 1×1: the paper's one-way filters), Tucker-2 (1×1 → k…k core →
1×1) and spatially separable (k×1 → 1×k, AIMET's spatial SVD).

Paper: Boukraichi, Akkari, Casenave, Ryckelynck, "A priori compression of convolutional neural networks
for wave simulators", 2023 (arXiv:2304.04964): the format is fixed before training (init=random, with a
variance-preserving initialization; train with `rewrite.train`). init=decompose (default) initializes the
chain from a trained kernel instead (CP-ALS, truncated HOSVD or SVD), reports the kernel's relative
reconstruction error per layer, and is usually followed by `--recover`: weight error is a poor guide to
output error, so ranks follow `param-ratio`, or the per-layer search of `budget-sqnr` / `--budget
metric=` on calibration outputs (the same search as fwsvd and lowrank).

Contract: init=decompose, SQNR ≥ min-sqnr dB on calibration data (after the optional recovery);
init=random has none (a new, untrained architecture: its error is reported, never judged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rewrite import compress, measure
from rewrite.calibration import layer_values
from rewrite.errors import InvalidValue
from rewrite.pass_base import Approx, Pass, PassContext, PassResult
from rewrite.passes.tconv import factors
from rewrite.patterns import CONVS, layers, set_submodule

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class TensorFactoredConv(Pass):
    name = "tconv"
    paper = "Boukraichi et al., A priori compression of CNNs for wave simulators, 2023 (arXiv:2304.04964)"
    summary = "convs → chains of one-way filters (CP), Tucker-2 or k×1·1×k; a priori or from trained kernels"
    contract_note = "SQNR ≥ min-sqnr dB (init=decompose, 10 by default); none for init=random (to be trained)"
    applies_to = "Conv1d/2d/3d with groups=1 and a kernel larger than 1 (transposed and grouped convs skipped)"
    level = "module"
    recoverable = True
    shrinks = True
    reads = ("Conv1d", "Conv2d", "Conv3d")

    format: Literal["cp", "tucker2", "separable"] = "cp"
    rank: int = 0
    param_ratio: float = 0.25
    init: Literal["decompose", "random"] = "decompose"
    budget_sqnr: float = 0.0
    budget_metric: float = 0.0
    min_sqnr: float = 10.0
    seed: int = 0

    @classmethod
    def finds_nothing_in(cls, module: nn.Module) -> bool:
        return all(_kind_not_factored(conv) for _, conv in layers(module, CONVS + _TRANSPOSED))

    def __post_init__(self):
        if self.rank < 0 or not 0 < self.param_ratio < 1:
            raise InvalidValue("rank must be > 0 (or 0 to follow param-ratio) and param-ratio in (0, 1)")
        if self.init == "random" and (self.budget_sqnr or self.budget_metric):
            raise InvalidValue("a budget searches ranks on outputs; init=random has none to keep: drop the budget")

    @property
    def contract(self) -> Approx:  # type: ignore[override]
        return Approx(min_sqnr_db=-math.inf if self.init == "random" else self.min_sqnr)

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        candidates, skipped = [], []
        for path, conv in layers(module, CONVS + _TRANSPOSED):
            reason = self._why_not(conv)
            (skipped.append((path, reason)) if reason else candidates.append((path, conv)))
        ratios = self._ratios(module, candidates, ctx)
        shapes = _input_shapes(module, [p for p, _ in candidates], ctx.calibration[:1])
        done, errors, slower = [], [], []
        for n, (path, conv) in enumerate(candidates):
            ctx.step(f"factoring {path}", n, len(candidates))
            if path not in ratios:
                skipped.append((path, "no rank stays within the budget"))
                continue
            chain = self._build(conv, ratios[path])
            if isinstance(chain, str):
                skipped.append((path, chain))
                continue
            errors.append(f"{path} {_kernel_error(conv, chain):.3f}")
            if path in shapes:
                slower += _if_slower(path, conv, chain, shapes[path])
            set_submodule(module, path, chain)
            done.append(f"{path}:{'/'.join(map(str, chain.ranks))}")
        stats = {"factorized": len(done), "format": self.format, "init": self.init, "ranks": ", ".join(done) or "-",
                 "kernel_rel_err": ", ".join(errors) if self.init == "decompose" else "n/a (init=random)",
                 "slower_here": ", ".join(slower) or "none"}
        return PassResult(module, bool(done), stats, skipped)

    def _why_not(self, conv: nn.Module) -> str | None:
        if reason := _kind_not_factored(conv):
            return reason
        if self.format == "separable" and not isinstance(conv, nn.Conv2d):
            return "format=separable (k×1 then 1×k) is for Conv2d: use format=cp or tucker2"
        rank, full = self._rank(conv, self.param_ratio), factors.full_rank(conv, self.format)
        if rank > full:
            return f"rank {rank} is above this layer's full rank {full}"
        if factors.chain_params(conv, self.format, rank) >= conv.weight.numel():
            return (f"rank {rank} would not save weights ({factors.chain_params(conv, self.format, rank):,} "
                    f"vs {conv.weight.numel():,})")
        return None

    def _rank(self, conv: nn.Module, ratio: float) -> int:
        return self.rank or factors.rank_for_ratio(conv, self.format, ratio)

    def _build(self, conv: nn.Module, ratio: float) -> factors.FactoredConv:
        rank = self._rank(conv, ratio)
        if self.init == "random":
            blank = {"cp": lambda: factors.cp_chain(conv, rank), "separable": lambda: factors.separable_chain(conv, rank),
                     "tucker2": lambda: factors.tucker2_chain(conv, rank, rank)}[self.format]()
            return factors.random_init(blank)
        if self.format == "cp":
            return factors.decompose_cp(conv, rank, seed=self.seed)
        if self.format == "tucker2":
            return factors.decompose_tucker2(conv, rank, rank)
        return factors.decompose_separable(conv, rank)

    def _ratios(self, module: nn.Module, candidates: list, ctx: PassContext) -> dict[str, float]:
        """param-ratio for every layer, or per-layer ratios searched against the budget on calibration outputs."""
        if not (self.budget_sqnr or self.budget_metric) or not candidates:
            return {p: self.param_ratio for p, _ in candidates}
        built: dict[tuple[str, float], nn.Module] = {}  # CP-ALS is the slow part: decompose once per ratio

        def build(conv, path, ratio):
            return built.setdefault((path, ratio), self._build(conv, ratio))
        reference = compress.reference_outputs(module, ctx.calibration)
        within = compress.budget_check(self.budget_sqnr, self.budget_metric, ctx.calibration, reference,
                                       ctx.evaluate, ctx.metric, ctx.masks)
        return compress.search_ratios(module, [p for p, _ in candidates], build, ctx.calibration, reference, within,
                                      grid=(0.05, 0.1, 0.2, 0.33, 0.5))


def _kind_not_factored(conv: nn.Module) -> str | None:
    """Why no option factors this conv (None when its kind can be)."""
    if isinstance(conv, _TRANSPOSED):
        return "transposed conv: not supported"
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}): its kernels are already per group; not factored"
    if math.prod(conv.kernel_size) == 1:
        return "1×1 conv: nothing to factor"
    return None


def _kernel_error(conv: nn.Module, chain: factors.FactoredConv) -> float:
    """‖W − W_factored‖_F / ‖W‖_F: weights only (output error is what the pipeline judges)."""
    with torch.no_grad():
        w = conv.weight.detach()
        return float((chain.dense_weight() - w).norm() / w.norm().clamp_min(1e-30))


def _input_shapes(module: nn.Module, paths: list[str], batches: list[tuple]) -> dict[str, torch.Size]:
    """The input shape of each layer on the first calibration batch (for timing it where it runs)."""
    return {p: seen[0].shape for p, seen in layer_values(module, paths, batches[:1]).items() if seen}


def _if_slower(path: str, conv: nn.Module, chain: nn.Module, shape: torch.Size) -> list[str]:
    """A short timing of both on this machine (to say so, not to refuse: the user chose the format)."""
    x = torch.randn(shape)
    dense_ms, chain_ms = measure.best_times({"dense": conv, "chain": chain}, (x,), min_rounds=3, budget_s=0.05).values()
    return [f"{path} ({chain_ms / dense_ms:.1f}x the dense time)"] if chain_ms > dense_ms * 1.1 else []
