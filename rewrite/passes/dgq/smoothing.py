"""Outlier smoothing (DGQ §3.3, percentile clipping): x·W = (x/s)·(s·W), exact in float.

Input channels of a Linear above the top 0.5% of its input's channel peaks get s = peak / that baseline;
x is divided where it is made (a LayerNorm's weight and bias, an RMSNorm's weight, the rows of `up` in a
gated block) and the consuming Linears' columns are multiplied, so the int8 activation grid no longer
spends its range on a few channels.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from rewrite.calibration import channel_peaks
from rewrite.patterns import attribute, shared_weight


def smooth_outliers(module: nn.Module, batches: list[tuple], top: float = 0.005) -> tuple[int, list]:
    """Percentile clipping (DGQ §3.3): input channels of Linears above the top-0.5% abs-max of their input
    are scaled down where that input is made, and up in the consuming Linears' columns (exact in float).
    Where the input is made: a LayerNorm's weight and bias, an RMSNorm's weight (Llama: `weight * x̂`), or
    the rows of `up` in a gated block `act(gate(x)) * up(x)` (before `down`). Only where that value feeds
    nothing but Linears: post-LN residuals (BERT) would see the scaling."""
    if not isinstance(module, fx.GraphModule):
        return 0, [("smooth", "needs a captured graph")]
    points, skipped = _smoothing_points(module)
    peaks = channel_peaks(module, [consumers[0].target for _, consumers, _ in points], batches)
    for node, consumers, divide in points:
        peak = peaks[consumers[0].target]
        keep = int(top * peak.numel() + 1.5)
        baseline = peak.sort().values[-keep]
        scale = torch.where(peak > baseline, peak / baseline.clamp_min(1e-12), torch.ones_like(peak))
        with torch.no_grad():
            divide(scale)
            for user in consumers:
                module.get_submodule(user.target).weight.mul_(scale)
    return len(points), skipped

def _smoothing_points(gm: fx.GraphModule) -> tuple[list, list]:
    """(node, its consuming Linear nodes, a function dividing the node's output channels by a scale) for
    every value that only Linears read and whose channels an exact rescaling can reach."""
    points, skipped = [], []
    for node in gm.graph.nodes:
        divide = _channel_divider(gm, node)
        if divide is None:
            continue
        consumers = [u for u in node.users if u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Linear)]
        if not consumers or len(consumers) != len(node.users):
            if node.target != torch.ops.aten.mul.Tensor or _norm_weight(node):  # a norm's output: say why
                skipped.append((node.name, "a norm output that also feeds non-Linear ops (e.g. a residual): not "
                                           "smoothed"))
            continue
        if any(shared_weight(gm, u.target) for u in consumers):
            skipped.append((node.name, "feeds a Linear whose weight is tied to another use: not smoothed"))
            continue
        points.append((node, consumers, divide))
    return points, skipped

def _norm_weight(node: fx.Node) -> fx.Node | None:
    """The 1-D parameter of a `weight * x` product (an RMSNorm's last step), or None."""
    return next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                 and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == 1), None)

def _channel_divider(gm: fx.GraphModule, node: fx.Node):
    """How to divide `node`'s output channels by a scale exactly, or None."""
    def get_attr(arg) -> bool:  # a tensor used here only (dividing a shared one would change its other uses)
        return isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1

    def divide_attrs(*targets):
        def divide(scale):
            for target in targets:
                attribute(gm, target).div_(scale)
        return divide

    if node.op != "call_function":
        return None
    if node.target == torch.ops.aten.layer_norm.default and len(node.args) >= 4 and all(map(get_attr, node.args[2:4])):
        return divide_attrs(node.args[2].target, node.args[3].target)
    if node.target != torch.ops.aten.mul.Tensor or len(node.args) != 2:
        return None
    weight = _norm_weight(node)
    if weight is not None and get_attr(weight):  # RMSNorm: weight * normalized
        return divide_attrs(weight.target)
    ups = [a for a in node.args if isinstance(a, fx.Node) and a.op == "call_module" and len(a.users) == 1
           and isinstance(gm.get_submodule(a.target), nn.Linear)]
    if ups:  # gated block: act(gate(x)) * up(x) → divide up's output rows
        up = gm.get_submodule(ups[-1].target)
        return lambda scale: (up.weight.div_(scale[:, None]), up.bias.div_(scale) if up.bias is not None else None)
    return None
