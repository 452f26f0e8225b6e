"""BN(conv(x)) → conv'(x): fold an eval-mode BatchNorm into the Conv1d/2d/3d or Linear before it.

    W' = W·γ/σ (per output channel),  b' = β + (b − μ)·γ/σ,  σ = √(var + eps)

Paper: standard inference folding (Ioffe & Szegedy, "Batch Normalization", ICML 2015, §3.2 at inference).
Contract: exact (float tolerance). Applies when the layer's output feeds only the BatchNorm and the
BatchNorm has running statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from rewrite.pass_base import Exact, Pass, PassContext, PassResult
from rewrite.patterns import layer_of, set_submodule

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_FOR_BN = {nn.BatchNorm1d: (nn.Conv1d, nn.Linear), nn.BatchNorm2d: (nn.Conv2d,), nn.BatchNorm3d: (nn.Conv3d,)}


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name = "fold-bn"
    paper = "Ioffe & Szegedy, Batch Normalization, ICML 2015 (inference-time folding)"
    summary = "fold eval-mode BatchNorm into the preceding Conv/Linear"
    contract = Exact()
    shrinks = True
    applies_to = "Conv1d/2d/3d or Linear followed by BatchNorm"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded, skipped = 0, []
        for node in list(gm.graph.nodes):
            bn = layer_of(gm, node, _BN)
            if bn is None:
                continue
            producer = node.args[0]
            reason = self._why_not(gm, bn, producer)
            if reason:
                skipped.append((node.target, reason))
                continue
            layer = gm.get_submodule(producer.target)
            fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
            set_submodule(gm, producer.target, fuse(layer.eval(), bn.eval()))
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            folded += 1
        gm.delete_all_unused_submodules()
        return PassResult(gm, folded > 0, {"folded": folded}, skipped)

    @staticmethod
    def _why_not(gm: fx.GraphModule, bn: nn.Module, producer: object) -> str | None:
        layer = layer_of(gm, producer, _CONV_FOR_BN[type(bn)])
        if layer is None:
            return "input is not a Conv/Linear of matching rank"
        if bn.running_mean is None or bn.running_var is None:
            return "BatchNorm has no running statistics (track_running_stats=False)"
        if len(producer.users) != 1:
            return f"the output of {producer.target} is also used elsewhere"
        if isinstance(layer, nn.Linear) and _rank(producer) != 2:
            return "BatchNorm1d after a Linear on 3-D input normalizes another axis"
        return None


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if val is not None else None
