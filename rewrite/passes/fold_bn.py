"""BN(conv(x)) → conv'(x): fold an eval-mode BatchNorm into the Conv1d/2d/3d or Linear before it.

    W' = W·γ/σ (per output channel),  b' = β + (b − μ)·γ/σ,  σ = √(var + eps)

or, a BatchNorm1d on (batch, features) before a Linear (LeViT's head), into the Linear after it:

    W' = W·diag(γ/σ),  b' = b + W·(β − μ·γ/σ)

Paper: standard inference folding (Ioffe & Szegedy, "Batch Normalization", ICML 2015, §3.2 at inference).
Contract: exact (float tolerance). Applies when the layer's output feeds only the BatchNorm (the matcher
refuses a region whose inner value escapes), or only LeViT's LinearNorm around it: BatchNorm1d over the
Linear's output flattened to (batch × tokens, features), then reshaped back. Capture only lifts BatchNorms
with running statistics, so a BatchNorm without them is never a match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from rewrite import compress
from rewrite.match import Match, Pattern, Variant, cached_pattern, erase_dead
from rewrite.pass_base import Exact, Pass, PassContext, PassResult
from rewrite.patterns import set_submodule

_PAIRS = [(nn.Conv1d, nn.BatchNorm1d, (1, 2, 5)), (nn.Linear, nn.BatchNorm1d, (1, 2)),
          (nn.Conv2d, nn.BatchNorm2d, (1, 2, 5, 5)), (nn.Conv3d, nn.BatchNorm3d, (1, 2, 3, 3, 3))]


class _LayerBN(nn.Module):
    def __init__(self, layer: type, bn: type):
        super().__init__()
        self.layer = layer(2, 2) if layer is nn.Linear else layer(2, 2, 1)
        self.bn = bn(2)

    def forward(self, x):
        return self.bn(self.layer(x))


class _TokensBN(nn.Module):
    """LeViT's LinearNorm (timm): a Linear on (batch, tokens, features), BatchNorm1d over every token of every
    sequence, per feature, and the tokens put back."""

    def __init__(self):
        super().__init__()
        self.layer, self.bn = nn.Linear(2, 2), nn.BatchNorm1d(2)

    def forward(self, x):
        y = self.layer(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class _BNLinear(nn.Module):
    """LeViT's NormLinear (timm): BatchNorm1d on (batch, features), then a Linear (its dropout is gone at capture)."""

    def __init__(self):
        super().__init__()
        self.bn, self.layer = nn.BatchNorm1d(2), nn.Linear(2, 2)

    def forward(self, x):
        return self.layer(self.bn(x))


BN_FIRST = "BatchNorm1d+Linear"


@cached_pattern
def layer_bn() -> Pattern:
    """Conv/Linear → BatchNorm of matching rank; a Linear only on 2-D input (BatchNorm1d on 3-D input
    normalizes the sequence axis's neighbour, not the Linear's features), or on 3-D input whose tokens the
    BatchNorm sees as rows (LeViT), or a BatchNorm1d on 2-D input before a Linear."""
    variants = [Variant(_LayerBN(layer, bn), (torch.randn(*shape),), name=f"{layer.__name__}+{bn.__name__}")
                for layer, bn, shape in _PAIRS]
    tokens = Variant(_TokensBN(), (torch.randn(2, 3, 2),), name="Linear+BatchNorm1d over tokens")
    before = Variant(_BNLinear(), (torch.randn(2, 2),), name=BN_FIRST)
    return Pattern("layer-batchnorm", *variants, tokens, before, check=_check)


def _check(match: Match, gm: fx.GraphModule) -> str | None:
    val = match["bn"].args[0].meta.get("val")
    if isinstance(match.layer(gm, "layer"), nn.Linear) and (val is None or val.dim() != 2):
        return "BatchNorm1d after a Linear on 3-D input normalizes another axis"
    return None


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name = "fold-bn"
    paper = "Ioffe & Szegedy, Batch Normalization, ICML 2015 (inference-time folding)"
    summary = "fold eval-mode BatchNorm into the preceding Conv/Linear (or the Linear after a BatchNorm1d)"
    contract = Exact()
    shrinks = True
    applies_to = "Conv1d/2d/3d or Linear followed by BatchNorm; BatchNorm1d followed by a Linear"

    @classmethod
    def finds_nothing_in(cls, module: nn.Module) -> bool:
        return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

    @classmethod
    def patterns(cls) -> list[Pattern]:
        return [layer_bn()]

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        found = layer_bn().find(gm)
        for match in found or []:
            layer, bn = match.layer(gm, "layer"), match.layer(gm, "bn")
            if match.variant == BN_FIRST:
                set_submodule(gm, match["layer"].target, _into_next_linear(bn.eval(), layer))
                match["bn"].replace_all_uses_with(match["bn"].args[0])
            else:
                fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
                set_submodule(gm, match["layer"].target, fuse(layer.eval(), bn.eval()))
                match.outputs[0].replace_all_uses_with(match["layer"])  # the BatchNorm, or the tokens put back
            erase_dead(gm, list(match.nodes.values()))
        gm.delete_all_unused_submodules()
        folded = {m["bn"].target for m in found or []}
        return PassResult(gm, bool(folded), {"folded": len(folded)}, _near_misses(gm, folded))


def _into_next_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """W' = W·diag(γ/σ), b' = b + W·(β − μ·γ/σ): the Linear of the normalized input."""
    with torch.no_grad():
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # capture lifts affine BatchNorms only
        shift = bn.bias - bn.running_mean * scale
        bias = linear.weight @ shift + (linear.bias if linear.bias is not None else 0.0)
        return compress.linear_from({"weight": linear.weight * scale, "bias": bias})


def _near_misses(gm: fx.GraphModule, folded: set[str]) -> list[tuple[str, str]]:
    """Every BatchNorm left, with the matcher's reason (its input is no layer, or the layer's output is
    also used elsewhere, or the check refused it)."""
    bns = [n for n in gm.graph.nodes if n.op == "call_module" and n.target not in folded
           and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]
    return [(n.target, _reason(gm, n)) for n in bns]


def _reason(gm: fx.GraphModule, bn: fx.Node) -> str:
    producer = bn.args[0]
    if not (isinstance(producer, fx.Node) and producer.op == "call_module"
            and isinstance(gm.get_submodule(producer.target), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))):
        return "input is not a Conv/Linear of matching rank"
    if len(producer.users) > 1:
        return f"the output of {producer.target} is also used elsewhere"
    return layer_bn().explain(gm, bn.name)
