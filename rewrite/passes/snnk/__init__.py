"""down(f(up(x))) → V·Ψ(W)·Φ(x): feed-forward blocks as Scalable Neural Network Kernel layers.

With x̃ = [x; 1] and w̃ⱼ = [wⱼ; bⱼ] (so up(x)ⱼ = w̃ⱼ·x̃), one seeded random matrix G (stored, never
trained, shared by both maps) gives feature maps with E[Ψ(w̃)·Φ(x̃)] = k(w̃ᵀx̃) (`features.py`: ReLU
features for the arc-cosine kernel, the Gaussian trick for exp and sin/cos, random Maclaurin features
of a fitted polynomial for GELU/tanh/sigmoid/SiLU). The layer f(up(x)) becomes Ψ(W̃)·Φ(x): Ψ is a
trainable (l × m) matrix initialized at φ(W̃) from the trained weights (the paper's init), an
approximation that recovery (`--recover`) trains toward the original. Bundling folds the next Linear
in exactly: down(Ψ Φ(x)) = (V Ψ) Φ(x) + c, so the block is one fixed m-wide projection, a feature map and
one trainable m → l' Linear: m·(d + l') multiply-adds per token instead of 2·d·l.

Gated blocks (down(act(gate(x)) ⊙ up(x)): SwiGLU, GeGLU, ReGLU): a kernel form of the whole gated product would
be a bilinear map of Φ(x) ⊗ x (m·d·l' weights, more than the block), so only the gate branch is kernelized:
act(gate(x)) ≈ Ψ(W̃_gate)·Φ(x), the unbundled SNNK layer; the product with up(x) and `down` stay.
The gate's l·d weights become l·m trainable ones plus the fixed G.

Paper: Sehanobish, Choromanski et al., "Scalable Neural Network Kernels", ICLR 2024 (arXiv:2310.13225).
Contract: approximate (SQNR ≥ min-sqnr after the optional recovery). init=weights is the paper's Ψ = φ(W̃);
init=fit (bundled blocks) fits the m → l' Linear by ridge regression of the block's outputs on Φ(x)
over the calibration activations (closed form; measuring to choose an initialization).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from rewrite.calibration import layer_values
from rewrite.errors import InvalidValue
from rewrite.match import replace_match
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor, is_graph
from rewrite.passes.snnk.features import FeatureMap, random_features, relu_features, rows_needed, series_coefficients
from rewrite.patterns import feed_forward, gated_feed_forward

__all__ = ["ScalableKernels", "SNNKLayer", "SNNKBlock", "FeatureMap", "bundle", "random_features", "relu_features"]

# The activation each feed-forward variant matched, as a function of the pre-activation z (for series fits).
_ACTIVATION = {"ReLU": torch.relu, "GELU": nn.functional.gelu, "SiLU": nn.functional.silu, "Tanh": torch.tanh,
               "TanhGELU": lambda z: nn.functional.gelu(z, approximate="tanh"), "Sigmoid": torch.sigmoid,
               "QuickGELU": lambda z: z * torch.sigmoid(1.702 * z), "SquaredReLU": lambda z: torch.relu(z).square(),
               "Hardswish": nn.functional.hardswish, "exp": torch.exp, "sin": torch.sin, "cos": torch.cos}
_AUTO = {"ReLU": "relu", "GELU": "relu", "TanhGELU": "relu", "QuickGELU": "relu", "SiLU": "relu", "Hardswish": "relu",
         "Tanh": "series", "Sigmoid": "series", "SquaredReLU": "series", "exp": "exp", "sin": "fourier", "cos": "fourier"}
_ESTIMATES = {"exp": ("exp",), "fourier": ("sin", "cos")}  # kinds that estimate one activation exactly


class SNNKLayer(nn.Module):
    """f(up(x)) ≈ Ψ·Φ(x): the feature map, then the trainable (l × width) Ψ, initialized at φ(W̃)."""

    def __init__(self, features: FeatureMap, psi: torch.Tensor):
        super().__init__()
        self.features = features
        self.psi = nn.Linear(psi.shape[1], psi.shape[0], bias=False)
        with torch.no_grad():
            self.psi.weight.copy_(psi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.psi(self.features(x))


class SNNKBlock(nn.Module):
    """Φ(x) followed by one trainable width → l' Linear (the bundled V·Ψ and the second Linear's bias)."""

    def __init__(self, features: FeatureMap, out: nn.Linear):
        super().__init__()
        self.features, self.out = features, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def snnk_layer(up: nn.Linear, features: FeatureMap) -> SNNKLayer:
    """The unbundled layer for up + activation, Ψ = φ(W̃) from the trained weights."""
    with torch.no_grad():
        bias = up.bias if up.bias is not None else torch.zeros(up.out_features)
        return SNNKLayer(features, features.psi(torch.cat([up.weight, bias[:, None]], 1)))


def bundle(layer: SNNKLayer, down: nn.Linear) -> SNNKBlock:
    """down(Ψ Φ(x)) = (V Ψ) Φ(x) + c: exact, one Linear fewer."""
    out = nn.Linear(layer.psi.in_features, down.out_features, bias=down.bias is not None)
    with torch.no_grad():
        out.weight.copy_(down.weight @ layer.psi.weight)
        if down.bias is not None:
            out.bias.copy_(down.bias)
    return SNNKBlock(layer.features, out)


def fit_output(block: SNNKBlock, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> None:
    """init=fit: the bundled Linear by ridge regression of the block's own outputs y on Φ(x)
    (closed form, on calibration activations), instead of V·φ(W)."""
    with torch.no_grad():
        phi = block.features(x)
        design = torch.cat([phi, torch.ones(len(phi), 1)], 1).double()
        gram = design.T @ design + ridge * len(design) * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ y.double())  # (width + 1, l')
        block.out.weight.copy_(solution[:-1].T.float())
        if block.out.bias is not None:
            block.out.bias.copy_(solution[-1].float())


def _block_activations(gm: nn.Module, match, batches: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of the block's first Linear, outputs of its last) over the calibration batches, flattened."""
    up, down = match["up"].target, match["down"].target
    seen = layer_values(gm, [up, down], batches, outputs=(down,))  # one run: up's inputs, down's outputs
    return tuple(torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[p]]) for p in (up, down))


@dataclass(frozen=True)
class ScalableKernels(SqnrFloor, Pass):
    name = "snnk"
    paper = "Sehanobish, Choromanski et al., Scalable Neural Network Kernels, ICLR 2024 (arXiv:2310.13225)"
    summary = "feed-forward blocks → random-feature kernel layers Φ(x) then one m-wide Linear (bundled)"
    applies_to = "Linear → activation → Linear blocks (also across submodules), and SwiGLU gates"
    recoverable = True
    needs_recovery = True

    features: int = 64
    kind: Literal["auto", "relu", "exp", "fourier", "series"] = "auto"
    init: Literal["weights", "fit"] = "weights"
    orthogonal: bool = True
    bundle: bool = True
    gated: bool = True
    degree: int = 4
    radius: float = 3.0
    seed: int = 0
    min_sqnr: float = 10.0

    def __post_init__(self):
        if self.features <= 0:
            raise InvalidValue(f"features={self.features}: give a positive number of random features (8–256)")
        if not 1 <= self.degree <= 8:
            raise InvalidValue(f"degree={self.degree}: series features need a polynomial degree from 1 to 8")
        if self.init == "fit" and not self.bundle:
            raise InvalidValue("init=fit fits the bundled Linear: use it with bundle=true")

    @classmethod
    def patterns(cls) -> list:
        return [feed_forward(), gated_feed_forward()]

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        if not is_graph(module):
            return PassResult(module, False, skipped=[("model", "snnk needs a captured graph")])
        gates = gated_feed_forward().find(module) or []
        found = feed_forward().find(module)
        if not found and not gates:
            return PassResult(module, False, skipped=[("model", found.or_else(self.applies_to))])
        done, skipped, before, after, forms = [], [], 0, 0, {}
        for i, match in enumerate([*(found or []), *gates]):
            gated = match.pattern == "gated-feed-forward"
            first = match.layer(module, "gate" if gated else "up")
            reason, built = self._rewrite(module, match, gated, i, ctx)
            if reason:
                skipped.append((match["gate" if gated else "up"].target, reason))
                continue
            done.append(match["gate" if gated else "up"].target)
            form = "gate" if gated else "bundled" if isinstance(built, SNNKBlock) else "unbundled"
            forms[form] = forms.get(form, 0) + 1
            replaced = [first] if gated or not self.bundle else [first, match.layer(module, "down")]
            before += sum(p.numel() for layer in replaced for p in layer.parameters())
            after += sum(p.numel() for p in built.parameters() if p.requires_grad)
        module.delete_all_unused_submodules()
        kinds = sorted({self._kind(m.variant) for m in [*(found or []), *gates]})
        stats = {"blocks": len(done), "features": self.features, "kind": ",".join(k or "-" for k in kinds),
                 "forms": ", ".join(f"{k} {v}" for k, v in sorted(forms.items())) or "-", "init": self.init, "rewritten_params": f"{before:,} → {after:,}"}
        return PassResult(module, bool(done), stats, skipped)

    def _kind(self, activation: str) -> str | None:
        if self.kind == "auto":
            return _AUTO[activation]
        if activation not in _ESTIMATES.get(self.kind, (activation,)):
            return None
        return self.kind

    def _rewrite(self, gm: fx.GraphModule, match, gated: bool, index: int, ctx: PassContext):
        """(reason, None) or (None, the module that now runs in the graph)."""
        if gated and not self.gated:
            return "gated feed-forward (SwiGLU) left alone (gated=false)", None
        activation = match.variant  # the activation's name (a gated match: its gate's, `patterns.GATES`)
        kind = self._kind(activation)
        if kind is None:
            return (f"kind={self.kind} estimates {' or '.join(_ESTIMATES[self.kind])}, not {activation} "
                    f"(kind=auto picks {_AUTO[activation]})"), None
        up = match.layer(gm, "gate" if gated else "up")
        down = match.layer(gm, "down")
        bundled = self.bundle and not gated
        saved = self._why_not(up, down, bundled)
        if saved:
            return saved, None
        layer = snnk_layer(up, self._feature_map(kind, activation, up.in_features + 1, index))
        if gated:  # silu(gate(x)) → Ψ Φ(x); the product with up(x) and `down` stay
            act = next(iter(match["gate"].users))
            replace_match(gm, match, layer, [match["gate"].args[0]], [act], name=match["gate"].target.replace(".", "_") + "_snnk")
            return None, layer
        if not bundled:
            replace_match(gm, match, layer, match.inputs, [match["down"].args[0]], name=match["up"].target.replace(".", "_") + "_snnk")
            return None, layer
        block = bundle(layer, down)
        if self.init == "fit":
            fit_output(block, *_block_activations(gm, match, ctx.calibration))
        replace_match(gm, match, block, match.inputs, match.outputs, name=match["up"].target.replace(".", "_") + "_snnk")
        return None, block

    def _feature_map(self, kind: str, activation: str, dim: int, index: int) -> FeatureMap:
        rows = rows_needed(kind, self.features, self.degree)
        # Series features multiply several rows per feature: those rows must be independent, not orthogonal.
        g = random_features(rows, dim, self.orthogonal and kind != "series", self.seed + index)
        if kind == "series":
            return FeatureMap(kind, g, series_coefficients(_ACTIVATION[activation], self.degree, self.radius))
        return FeatureMap(kind, g, sin=activation == "sin")

    def _why_not(self, up: nn.Linear, down: nn.Linear, bundled: bool) -> str | None:
        width = self.features * (2 if self.kind == "fourier" else 1)
        new = width * down.out_features if bundled else width * up.out_features
        old = up.weight.numel() + (down.weight.numel() if bundled else 0)
        if new >= old:
            return (f"features={self.features} would not save parameters ({new:,} trainable weights vs {old:,}); "
                    f"use fewer features")
        return None
