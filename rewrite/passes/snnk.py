"""down(f(up(x))) → V·Ψ(W)·Φ(x): feed-forward blocks as Scalable Neural Network Kernel layers.

With x̃ = [x; 1] and w̃ⱼ = [wⱼ; bⱼ] (so up(x)ⱼ = w̃ⱼ·x̃), one seeded random matrix G ∈ R^{m×(d+1)} (rows
N(0, I), optionally orthogonal blocks with chi-distributed norms) is shared by both feature maps:

    Φ(x) = ReLU(G x̃)/√m,   Ψ(w̃) = ReLU(G w̃)/√m,   E[Ψ(w̃)·Φ(x)] = ‖w̃‖‖x̃‖(sin θ + (π − θ) cos θ)/(2π)

(the order-1 arc-cosine kernel, Cho & Saul 2009). The layer ReLU(up(x)) becomes Ψ(W̃)·Φ(x), a different
function: Ψ starts at φ(W̃) from the trained weights and needs recovery (`--recover`), as in the paper.
Bundling folds the next Linear in: down(Ψ Φ(x)) = (V Ψ) Φ(x) + c, so the block is one fixed m-wide
projection, a ReLU and one trainable m → l' Linear: m·(d + l') multiply-adds per token instead of
2·d·l, and m·l' trained parameters instead of 2·d·l.

Paper: Sehanobish, Choromanski et al., "Scalable Neural Network Kernels", ICLR 2024 (arXiv:2310.13225).
Contract: approximate (SQNR ≥ min-sqnr after the optional recovery). init=weights is the paper's Ψ = φ(W̃);
init=fit fits the bundled Linear by ridge regression of the block's outputs on Φ(x) over the calibration
activations (closed form; measuring to choose an initialization). Only ReLU features (kind=relu) are
built so far; gated feed-forward blocks (SwiGLU) have no kernel form here and are skipped with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rewrite.errors import InvalidValue
from rewrite.match import replace_match
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor, is_graph
from rewrite.patterns import feed_forward, gated_feed_forward


def random_features(m: int, dim: int, orthogonal: bool, seed: int) -> torch.Tensor:
    """G ∈ R^{m×dim}, rows N(0, I); orthogonal: blocks of orthonormal rows rescaled by chi(dim) norms
    (same marginals, lower variance)."""
    gen = torch.Generator().manual_seed(seed)
    if not orthogonal:
        return torch.randn(m, dim, generator=gen)
    blocks = []
    for _ in range(math.ceil(m / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed, unbiased rows
    rows = torch.cat(blocks)[:m]
    norms = torch.randn(m, dim, generator=gen).norm(dim=1, keepdim=True)
    return rows * norms


def relu_features(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Φ(z) = ReLU(G z̃)/√m for z of shape (..., d), z̃ = [z; 1]."""
    return torch.relu(z @ g[:, :-1].T + g[:, -1]) / math.sqrt(g.shape[0])


class SNNKBlock(nn.Module):
    """Φ(x) followed by one trainable m → l' Linear (the bundled V·Ψ and the second Linear's bias)."""

    def __init__(self, g: torch.Tensor, out: nn.Linear):
        super().__init__()
        self.register_buffer("g_weight", g[:, :-1].contiguous())  # fixed: drawn once, stored, never trained
        self.register_buffer("g_bias", g[:, -1].contiguous())
        self.out = out
        self.scale = 1 / math.sqrt(g.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(nn.functional.linear(x, self.g_weight, self.g_bias)) * self.scale)


def bundle(up: nn.Linear, down: nn.Linear, g: torch.Tensor) -> SNNKBlock:
    """V·Ψ(W̃) as one Linear: Ψ = φ(W̃) from the trained first layer, V the second layer's weight."""
    with torch.no_grad():
        w_tilde = torch.cat([up.weight, (up.bias if up.bias is not None else torch.zeros(up.out_features))[:, None]], 1)
        psi = torch.relu(w_tilde @ g.T) / math.sqrt(g.shape[0])  # Ψ(w̃ⱼ) for every row: (l, m)
        out = nn.Linear(g.shape[0], down.out_features, bias=down.bias is not None)
        out.weight.copy_(down.weight @ psi)
        if down.bias is not None:
            out.bias.copy_(down.bias)
    return SNNKBlock(g, out)


def fit_output(block: SNNKBlock, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> None:
    """init=fit: the bundled m → l' Linear by ridge regression of the block's own outputs y on Φ(x)
    (closed form, on calibration activations), instead of V·φ(W)."""
    with torch.no_grad():
        phi = torch.relu(nn.functional.linear(x, block.g_weight, block.g_bias)) * block.scale
        design = torch.cat([phi, torch.ones(len(phi), 1)], 1).double()
        gram = design.T @ design + ridge * len(design) * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ y.double())  # (m + 1, l')
        block.out.weight.copy_(solution[:-1].T.float())
        if block.out.bias is not None:
            block.out.bias.copy_(solution[-1].float())


def _block_activations(gm: nn.Module, match, batches: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of the block's first Linear, outputs of its last) over the calibration batches, flattened."""
    seen: dict[str, list[torch.Tensor]] = {"x": [], "y": []}
    hooks = [match.layer(gm, "up").register_forward_hook(lambda m, a, out: seen["x"].append(a[0].detach())),
             match.layer(gm, "down").register_forward_hook(lambda m, a, out: seen["y"].append(out.detach()))]
    try:
        with torch.no_grad():
            for batch in batches:
                gm(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    return (torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]]),
            torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["y"]]))


@dataclass(frozen=True)
class ScalableKernels(SqnrFloor, Pass):
    name = "snnk"
    paper = "Sehanobish, Choromanski et al., Scalable Neural Network Kernels, ICLR 2024 (arXiv:2310.13225)"
    summary = "feed-forward blocks → random-feature kernel layers Φ(x) then one m-wide Linear (bundled)"
    applies_to = "Linear → activation → Linear blocks (also across submodules); gated blocks are skipped"
    recoverable = True
    needs_recovery = True

    features: int = 64
    kind: Literal["auto", "relu"] = "auto"
    init: Literal["weights", "fit"] = "weights"
    orthogonal: bool = True
    bundle: bool = True
    seed: int = 0
    min_sqnr: float = 10.0

    def __post_init__(self):
        if self.features <= 0:
            raise InvalidValue(f"features={self.features}: give a positive number of random features (8–256)")
        if not self.bundle:
            raise InvalidValue("bundle=false is not built yet: the unbundled Ψ·Φ layer needs its own module")

    @classmethod
    def patterns(cls) -> list:
        return [feed_forward()]

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        if not is_graph(module):
            return PassResult(module, False, skipped=[("model", "snnk needs a captured graph")])
        gated = [(m["up"].target, "gated feed-forward (SwiGLU): no kernel form of the gated product is built here")
                 for m in gated_feed_forward().find(module) or []]
        found = feed_forward().find(module)
        if not found:
            return PassResult(module, False, skipped=gated or [("model", found.reason)])
        done, skipped, before, after = [], gated, 0, 0
        for i, match in enumerate(found):
            up, down = match.layer(module, "up"), match.layer(module, "down")
            saved = self._why_not(up, down)
            if saved:
                skipped.append((match["up"].target, saved))
                continue
            g = random_features(self.features, up.in_features + 1, self.orthogonal, self.seed + i)
            block = bundle(up, down, g)
            if self.init == "fit":
                fit_output(block, *_block_activations(module, match, ctx.calibration))
            name = match["up"].target.replace(".", "_") + "_snnk"
            replace_match(module, match, block, match.inputs, match.outputs, name=name)
            done.append(match["up"].target)
            before += sum(p.numel() for p in (*up.parameters(), *down.parameters()))
            after += sum(p.numel() for p in block.parameters())
        module.delete_all_unused_submodules()
        stats = {"blocks": len(done), "features": self.features, "kind": "relu", "init": self.init,
                 "trained_params": f"{before:,} → {after:,}"}
        return PassResult(module, bool(done), stats, skipped)

    def _why_not(self, up: nn.Linear, down: nn.Linear) -> str | None:
        if self.features * down.out_features >= up.weight.numel() + down.weight.numel():
            return (f"features={self.features} would not save parameters "
                    f"({self.features}·{down.out_features} ≥ 2·{up.in_features}·{up.out_features})")
        return None
