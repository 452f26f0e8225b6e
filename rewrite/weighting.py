"""Factorizations weighted by what the model does with a layer, and ranks spent under one global budget.

For a Linear y = W x, with H = Σ x xᵀ over the calibration tokens (padding left out) and G = Σ g gᵀ over
the gradients g = ∂ℓ/∂y of a loss ℓ on the model's outputs, the change of the model's outputs that a
replacement Ŵ makes is, to second order and in K-FAC's Kronecker approximation,

    E[(gᵀ (W − Ŵ) x)²] ≈ ‖R (W − Ŵ) L‖²_F,   H = L Lᵀ (Cholesky),  G = Rᵀ R.

So the best rank-r replacement is Ŵ = R⁻¹ [R W L]_r L⁻¹ (a truncated SVD of the weighted weight), and
dropping its i-th singular value costs σ_i², in the same units for every layer: one budget can be spent
across all layers where it hurts least. Without gradients (R = I) this is the activation-aware
whitening of SVD-LLM, exact on the calibration set: ‖(W − Ŵ) X‖²_F = Σ_{i>r} σ_i², and a truncation at
full rank gives W back.

Papers: Wang, Zheng, Zhang, Zhang, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
Language Model Compression", ICLR 2025 (arXiv:2403.07378); Martens & Grosse, "Optimizing Neural Networks
with Kronecker-factored Approximate Curvature", ICML 2015 (K-FAC).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from rewrite.errors import RewriteError

DAMPING = 1e-2  # of the mean diagonal: keeps L and R invertible where the calibration spans few directions
FULL_GRAM = 8192  # wider sides keep only G's diagonal: a full 49152-wide LM head's would be 19 GB


@dataclass
class Moments:
    """Per layer path: H = Σ x xᵀ over its input tokens, and G = Σ g gᵀ over its output gradients (if taken;
    only its diagonal, a vector, for outputs wider than FULL_GRAM)."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    tokens: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ x over the same tokens, per path
    counts: dict[str, int] = field(default_factory=dict)  # how many tokens each path's sums hold

    def with_constant(self, path: str) -> torch.Tensor:
        """Σ x̃ x̃ᵀ with x̃ = [x; 1]: the gram of the inputs and a constant (what a bias reads)."""
        gram, total = self.inputs[path], self.sums[path]
        count = torch.tensor([[float(self.counts[path])]], dtype=torch.float64)
        return torch.cat([torch.cat([gram, total[:, None]], 1), torch.cat([total[None], count], 1)], 0)


def moments(module: nn.Module, paths: list[str], batches: list[tuple], masks: list | None = None,
            loss: Callable[[Any, int], torch.Tensor] | None = None) -> Moments:
    """H of each Linear at `paths` over `batches`, and G too when `loss(outputs, batch_index)` is given (one
    backward per batch). Only the layers' weights take gradients while it runs, and none is left behind."""
    found = Moments({p: _zeros(module, p, "in") for p in paths},
                    {p: _zeros(module, p, "out") for p in paths} if loss else {})
    keep: list = [None]  # the current batch's token mask

    def on_input(path):
        def hook(_layer, args):
            rows = _rows(args[0].detach(), keep[0])
            found.inputs[path].add_((rows.T @ rows).double())
            found.sums[path] = found.sums.get(path, 0) + rows.double().sum(0)
            found.counts[path] = found.counts.get(path, 0) + rows.shape[0]
        return hook

    def on_output(path):
        def hook(_layer, _args, y):
            if y.requires_grad:
                y.register_hook(_add_gram(found.outputs[path], keep[0]))
        return hook

    hooks = [module.get_submodule(p).register_forward_pre_hook(on_input(p)) for p in paths]
    if loss:
        hooks += [module.get_submodule(p).register_forward_hook(on_output(p)) for p in paths]
    with _gradients_for(module, paths, enabled=loss is not None):
        try:
            for i, batch in enumerate(batches):
                keep[0] = masks[i] if masks else None
                with torch.set_grad_enabled(loss is not None):
                    out = module(*batch)
                    if loss:
                        loss(out, i).backward()
                found.tokens += _count(batch, keep[0])
        finally:
            for hook in hooks:
                hook.remove()
    return found


def _add_gram(total: torch.Tensor, mask: torch.Tensor | None):
    def hook(grad: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
        total.add_(_gram(grad, mask) if total.dim() == 2 else _squares(grad, mask))
    return hook


def _zeros(module: nn.Module, path: str, side: str) -> torch.Tensor:
    layer = module.get_submodule(path)
    n = layer.in_features if side == "in" else layer.out_features
    return torch.zeros(n, dtype=torch.float64) if side == "out" and n > FULL_GRAM else \
        torch.zeros(n, n, dtype=torch.float64)


def _squares(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() >= 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).double().square().sum(0)


def _gram(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ over tokens of x xᵀ; a (batch, seq) mask that fits the leading axes keeps only real tokens."""
    flat = _rows(x, mask)
    return (flat.T @ flat).double()


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The tokens of x as float32 rows, those a fitting (batch, seq) padding mask drops left out."""
    if mask is not None and x.dim() >= 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).float()


def _count(batch: tuple, mask: torch.Tensor | None) -> int:
    if mask is not None:
        return int(mask.bool().sum())
    first = next((x for x in batch if isinstance(x, torch.Tensor)), None)
    return 0 if first is None else int(math.prod(first.shape[:-1]) if first.dim() > 1 else first.shape[0])


class _gradients_for:
    """Within: gradients flow into the weights at `paths` only (so outputs carry them), and none is kept."""

    def __init__(self, module: nn.Module, paths: list[str], enabled: bool):
        self.module, self.paths, self.enabled = module, paths, enabled

    def __enter__(self):
        if self.enabled:
            self.flags = [(q, q.requires_grad) for q in self.module.parameters()]
            for q, _ in self.flags:
                q.requires_grad_(False)
            for p in self.paths:
                self.module.get_submodule(p).weight.requires_grad_(True)

    def __exit__(self, *exc):
        if self.enabled:
            for q, flag in self.flags:
                q.grad = None
                q.requires_grad_(flag)


def cholesky_root(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = gram + damping·mean(diag)·I (float64); a vector is a diagonal gram."""
    if gram.dim() == 1:
        gram = torch.diag(gram)
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(gram.double() + damping * scale * eye)


class WeightedSpectrum:
    """The SVD of R W L for one layer: its factors at any rank, and what each truncation costs."""

    def __init__(self, weight: torch.Tensor, inputs: torch.Tensor | None, outputs: torch.Tensor | None = None,
                 damping: float = DAMPING):
        w = weight.detach().double()
        self.shape = tuple(w.shape)
        self.left = cholesky_root(inputs, damping) if inputs is not None else None  # L: input side
        self.right = cholesky_root(outputs, damping).T if outputs is not None else None  # R, upper
        weighted = w if self.left is None else w @ self.left
        weighted = weighted if self.right is None else self.right @ weighted
        u, self.s, vh = torch.linalg.svd(weighted, full_matrices=False)
        # Kept in float32 (the spectrum in float64): all of SmolLM2's 210 layers are 3 GB so, not 6.
        self.u, self.vh = u.float(), vh.float()
        self.left = None if self.left is None else self.left.float()
        self.right = None if self.right is None else self.right.float()

    def dropped(self, rank: int) -> float:
        """Σ_{i≥rank} σ_i²: the weighted error of a rank-`rank` truncation."""
        return float(self.s[rank:].square().sum())

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second), float32, with second @ first = R⁻¹ [R W L]_rank L⁻¹."""
        root = self.s[:rank].sqrt()
        first = root[:, None] * self.vh[:rank].double()
        second = self.u[:, :rank].double() * root
        if self.left is not None:
            first = torch.linalg.solve_triangular(self.left.double(), first, upper=False, left=False)
        if self.right is not None:
            second = torch.linalg.solve_triangular(self.right.double(), second, upper=True)
        return first.float(), second.float()


def fisher_loss(outputs: Any, target: Any, gen: torch.Generator) -> torch.Tensor:
    """The loss whose output gradients make a Fisher (the module docstring of `rewrite.passes.fwsvd` says why
    each): cross-entropy or MSE against targets; without them, labels drawn from the model's own softmax
    (outputs with `logits`) or the Gaussian sampled-label loss ⟨f(x), ε⟩."""
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise RewriteError("the model returns no floating-point output to take gradients of")
    logits = getattr(outputs, "logits", None)
    if target is None and isinstance(logits, torch.Tensor) and logits.is_floating_point():
        return _sampled_cross_entropy(logits, gen)
    if target is None:  # sampled-label Fisher: E[(Jᵀε)²] = diag(JᵀJ)
        return sum((t * torch.randn(t.shape, generator=gen)).sum() for t in leaves)
    out = leaves[0]
    if not target.is_floating_point():
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1).long(), reduction="sum")
    return 0.5 * (out - target).square().sum()


def _sampled_cross_entropy(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A classifier's or language model's own Fisher: cross-entropy against labels drawn from its softmax
    (SmolLM2, 20% of its Linear weights removed: perplexity 1.89x fp32 with it, 2.11x with the Gaussian model)."""
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        drawn = torch.multinomial(flat.detach().float().softmax(-1), 1, generator=gen).squeeze(-1)
    return nn.functional.cross_entropy(flat, drawn, reduction="sum")


FREE_ERROR = 1e-4  # cuts are always taken while all of them together cost under this share of the energy


def allocate(spectra: dict[str, WeightedSpectrum], keep: float) -> dict[str, int | None]:
    """Ranks that keep at most `keep` of the layers' weights at the least total Σ dropped σ²; None = stay dense.

    A Lagrangian split: for a price λ per parameter each layer takes the rank (or dense) that minimises
    dropped + λ·params, and λ is bisected until the parameters fit. A rank-r pair costs r(in+out)
    parameters, so a layer is factorized only below the break-even rank in·out/(in+out). The price never
    falls below FREE_ERROR·(energy / parameters): what is nearly free (a layer of low rank) is cut even
    past the budget, since all such cuts together cost at most about FREE_ERROR of the output energy."""
    total = sum(s.shape[0] * s.shape[1] for s in spectra.values())
    free = FREE_ERROR * sum(float(s.s.square().sum()) for s in spectra.values()) / max(total, 1)
    tails = {p: _tail_energy(s) for p, s in spectra.items()}

    def choose(price: float) -> dict[str, int | None]:
        return {p: _cheapest(s.shape, tails[p], price) for p, s in spectra.items()}

    def params(ranks) -> int:
        return sum(s.shape[0] * s.shape[1] if ranks[p] is None else ranks[p] * sum(s.shape)
                   for p, s in spectra.items())

    low, high = 1e-30, 1e30
    for _ in range(200):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if params(choose(mid)) > keep * total else (low, mid)
        if high / low < 1 + 1e-9:
            break
    return choose(max(high, free))


def _tail_energy(spectrum: WeightedSpectrum) -> torch.Tensor:
    """tail[r] = Σ_{i≥r} σ_i², r = 0 … len(σ)."""
    energy = spectrum.s.square()
    return torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])


def _cheapest(shape: tuple[int, int], tail: torch.Tensor, price: float) -> int | None:
    out, inp = shape
    usable = min(len(tail) - 1, math.ceil(out * inp / (out + inp)) - 1)  # ranks that save parameters
    if usable < 1:
        return None
    ranks = torch.arange(1, usable + 1, dtype=torch.float64)
    cost = tail[1:usable + 1] + price * ranks * (out + inp)
    best = int(cost.argmin())
    return best + 1 if float(cost[best]) < price * out * inp else None
