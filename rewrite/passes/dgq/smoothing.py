"""Channel smoothing, searched: x·W = (x/s)·(s·W), exact in float, with s chosen per input to minimize
the quantized layers' estimated output error.

Where a value is made (a LayerNorm's weight and bias, an RMSNorm's weight, the rows of `up` in a gated
block) its channels are divided by s and the consuming Linears' columns multiplied by s. Candidates for s:
none; DGQ §3.3's percentile clipping (channels above the top 0.5% of the input's channel peaks brought down
to that baseline); and AWQ's activation-aware scales s = mean|x|^α, α = 0.1 … 1 (Lin et al., arXiv:2306.00978;
SmoothQuant's migration, Xiao et al., arXiv:2211.10438, is the same family). Each is judged by the error it
leaves, estimated on the calibration inputs through xᵀx's diagonal: the 4-bit weights' rounding error
Σ_k E[x_k²]·Σ_o (Q(s·W)_ok/s_k − W_ok)² (round to nearest, asymmetric groups) plus the int8 activations'
Σ_k E[e_k²]·s_k²·‖W_:k‖² (e: x/s's rounding error at its per-token or static scale). Percentile clipping
alone, the paper's rule, made SmolLM2's 4-bit weights worse than no smoothing on unseen text: it favours
the int8 activations only.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from rewrite.calibration import InputStats, input_stats
from rewrite.passes.dgq import kernels
from rewrite.patterns import attribute, shared_weight

ALPHAS = tuple(i / 10 for i in range(1, 11))  # AWQ's exponents (its code tries 20 in [0, 1))
TOP = 0.005  # percentile clipping's share of channels above the baseline (DGQ's code)
SAMPLE_ROWS = 256  # tokens whose int8 rounding estimates the activations' error
WEIGHT_ROWS = 512  # output rows that estimate a candidate's error (gate and up together have 3,072 in SmolLM2)


def smooth_inputs(module: nn.Module, batches: list[tuple], group: int = 64, act: str | None = "per-token",
                  rotated=lambda path: False) -> tuple[dict[str, int], list]:
    """Choose and apply s at every value that only Linears read and whose channels an exact rescaling can
    reach. group: the weights' quantization group; act: "per-token", "static", "tensor" (int8 activations at that
    scale) or None (weights only); rotated(path): the Linear's input is rotated online after (left alone: the
    rotation spreads what s would move). Returns how many inputs took each kind of scale, and what was skipped."""
    if not isinstance(module, fx.GraphModule):
        return {}, [("smooth", "needs a captured graph")]
    points, skipped = _smoothing_points(module, rotated)
    stats = input_stats(module, [consumers[0].target for _, consumers, _ in points], batches, SAMPLE_ROWS)
    chosen: dict[str, int] = {}
    for node, consumers, divide in points:
        linears = [module.get_submodule(user.target) for user in consumers]
        kind, scale = best_scale(torch.cat([linear.weight.detach() for linear in linears]).float(),
                                 stats[consumers[0].target], group, act)
        chosen[kind] = chosen.get(kind, 0) + 1
        if scale is None:
            continue
        with torch.no_grad():
            divide(scale)
            for linear in linears:
                linear.weight.mul_(scale)
    return chosen, skipped


def best_scale(weight: torch.Tensor, stats: InputStats, group: int, act: str | None
               ) -> tuple[str, torch.Tensor | None]:
    """(kind, s) of the candidate with the lowest estimated output error (s None: no smoothing wins). The
    errors are sums over output rows: every n-th row, up to `WEIGHT_ROWS`, estimates them for every candidate
    alike."""
    weight = weight[::max(1, len(weight) // WEIGHT_ROWS)]
    candidates = {"none": None, "clip": _clip_scale(stats.peak)}
    floor = stats.mean_abs.max().clamp_min(1e-12) * 1e-4  # dead channels: no scale of 0
    for alpha in ALPHAS:
        s = stats.mean_abs.clamp_min(floor).pow(alpha)
        candidates[f"α={alpha:.1f}"] = s / (s.max() * s.min()).sqrt()
    errors = {kind: estimated_error(weight, stats, s, group, act) for kind, s in candidates.items()}
    kind = min(errors, key=errors.get)
    return ("activation-aware" if kind.startswith("α") else kind), candidates[kind]


def estimated_error(weight: torch.Tensor, stats: InputStats, s: torch.Tensor | None, group: int,
                    act: str | None) -> float:
    """Mean squared output error of W (O, K) at 4 bits and its input x/s at int8, through xᵀx's diagonal."""
    s = torch.ones(weight.shape[1]) if s is None else s
    k = weight.shape[1]
    groups = nn.functional.pad(weight * s, (0, -k % group)).reshape(weight.shape[0], -1, group)
    low = groups.amin(-1, keepdim=True)
    step = ((groups.amax(-1, keepdim=True) - low) / 15).clamp_min_(1e-12)
    u = groups.sub_(low).div_(step)  # in place: the codes' real values, then their rounding error in steps
    residual = torch.round(u).sub_(u).mul_(step).square_().sum(0).reshape(-1)[:k]
    error = float(residual @ (stats.mean_square / s.square()))
    if act is None:
        return error
    x = stats.rows / s
    unit = activation_step(x, act)
    e = torch.round(x / unit).mul_(unit).sub_(x)
    return error + float(e.square_().mean(0) @ (s.square() * weight.square().sum(0)))


def activation_step(x: torch.Tensor, act: str) -> torch.Tensor:
    """The int8 grid step of x's activations, as the kernels make it: per token, per tensor with a zero point
    (act=tensor: it moves the grid, never its step), or static: max|x|/127 over the tensor."""
    if act == "tensor":
        return kernels.tensor_codes(x)[1]
    if act == "per-token":
        return kernels.activation_codes(x, torch.empty(0))[1]
    return kernels.static_scale(x)


def _clip_scale(peak: torch.Tensor) -> torch.Tensor:
    """DGQ §3.3: channels above the top `TOP` share of the peaks are scaled down to that baseline."""
    keep = int(TOP * peak.numel() + 1.5)
    baseline = peak.sort().values[-keep]
    return torch.where(peak > baseline, peak / baseline.clamp_min(1e-12), torch.ones_like(peak))

def _smoothing_points(gm: fx.GraphModule, rotated) -> tuple[list, list]:
    """(node, its consuming Linear nodes, a function dividing the node's output channels by a scale) for
    every value that only Linears read and whose channels an exact rescaling can reach."""
    points, skipped = [], []
    for node in gm.graph.nodes:
        divide = _channel_divider(gm, node)
        if divide is None:
            continue
        consumers = [u for u in node.users if u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Linear)]
        if not consumers:
            continue  # no Linear reads it (Qwen3's per-head q_norm feeds RoPE; a head that reads a slice): no candidate
        if len(consumers) != len(node.users):
            if node.target != torch.ops.aten.mul.Tensor or _norm_weight(node):  # a norm's output: say why
                skipped.append((node.name, "a norm output that also feeds non-Linear ops (e.g. a residual): not "
                                           "smoothed"))
            continue
        if any(shared_weight(gm, u.target) for u in consumers):
            skipped.append((node.name, "feeds a Linear whose weight is tied to another use: not smoothed"))
            continue
        if any(rotated(u.target) for u in consumers):
            continue  # hadamard: the rotation spreads the outliers instead
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
