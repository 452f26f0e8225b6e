"""Shared by the passes that rewrite Linears (lowrank, fwsvd, prune, dgq): which Linears to touch (GPT-2's
Conv1D and 1×1 convolutions taken as Linears; weights held outside Linears named), ranks from ratios, and a
per-layer rank search against an output-error budget."""
from __future__ import annotations

import functools
import math
import re
from typing import Callable

import torch
from torch import fx, nn

from rewrite import capture, verify
from rewrite.errors import InvalidValue
from rewrite.patterns import (
    CONVS,
    feed_forward,
    fused_gated_feed_forward,
    gated_feed_forward,
    is_pointwise_conv,
    layers,
    not_pointwise,
    pointwise_feed_forward,
    set_submodule,
)


# Why a layer whose weight the graph also reads elsewhere is left alone (replacing it would leave that reader
# without its tensor).
SHARED = ("its weight is read at several places of the graph (tied to the embedding, or one layer shared by several "
          "blocks)")


class Factorizes:
    """Mixin of the factorizing passes (lowrank, fwsvd): their pattern (target=ffn) and option checks."""

    @classmethod
    def patterns(cls) -> list:
        # target=ffn; target=all takes every Linear and 1×1 convolution
        return [feed_forward(), gated_feed_forward(), pointwise_feed_forward()]

    def __post_init__(self):
        check_rank_options(self.rank, self.param_ratio)


def is_conv1d(layer: nn.Module) -> bool:
    """GPT-2's `Conv1D` (transformers.pytorch_utils): y = x W + b with W stored (in, out), a Linear transposed."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None \
        and layer.weight.dim() == 2


def conv1d_as_linear(layer: nn.Module) -> nn.Linear:
    """The nn.Linear that computes what a `Conv1D` does (its weight transposed)."""
    linear = linear_from({"weight": layer.weight.detach().T, "bias": layer.bias})
    return linear.requires_grad_(layer.weight.requires_grad)


def linear_from(tensors: dict[str, torch.Tensor], prefix: str = "", kind: type = nn.Linear) -> nn.Linear:
    """A Linear (or `kind`, a subclass) holding `{prefix}weight` and `{prefix}bias` (None or absent: no bias),
    on their device and in their dtype."""
    weight, bias = tensors[f"{prefix}weight"], tensors.get(f"{prefix}bias")
    linear = kind(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def linearize_targets(module: nn.Module, target: str) -> int:
    """Swap the target `Conv1D`s (GPT-2) for their equal nn.Linear, so one factorization serves both, and wrap
    the target 1×1 convolutions as `OverChannels` (target=all: every one; ffn: those of feed-forward blocks;
    `restore_pointwise` unwraps the ones left); the rest of the model is left as it is. Returns how many."""
    conv1d = [p for p, m in target_linears(module, target) if is_conv1d(m)]
    for path in conv1d:
        set_submodule(module, path, conv1d_as_linear(module.get_submodule(path)))
    ffn = None if target == "all" else _ffn_paths(module) if isinstance(module, fx.GraphModule) else set()
    return len(conv1d) + linearize_pointwise(module, ffn)


def target_linears(module: nn.Module, target: str) -> list[tuple[str, nn.Linear]]:
    """`all` Linears, or `ffn`: Linear → activation → Linear pairs (both linears of each pair). GPT-2's
    `Conv1D`s and the pointwise convolutions are among them once `linearize_targets` has made them Linears."""
    found = [(p, m) for p, m in layers(module, (nn.Module,)) if isinstance(m, nn.Linear) or is_conv1d(m)]
    if target == "all":
        return found
    ffn = _ffn_paths(module) if isinstance(module, fx.GraphModule) else _ffn_paths_eager(module)
    ffn |= set(linearized(module))  # `linearize_targets` wrapped only the 1×1 convolutions of feed-forward blocks
    return [(p, m) for p, m in found if p in ffn]


def no_targets(module: nn.Module, target: str) -> str:
    """Why `target_linears` found nothing: no Linear at all, or none in a feed-forward block (then target=all)."""
    hint = ": target=all takes them" if target != "all" else ""
    if target == "all" or not target_linears(module, "all"):
        return f"no Linear layers (target={target})" + unread_convs(module, hint)
    return ("no Linear in a feed-forward block (Linear → activation → Linear, or gated; mixture-of-experts weights "
            "are not Linears): target=all takes the other Linears (attention projections)" + unread_convs(module, hint))




class OverChannels(nn.Module):
    """A pointwise convolution as the Linear over its channel axis, so that Linear-reading passes rewrite it:

        conv_{1×1}(x)[n, o, s] = Σ_c W[o, c] x[n, c, s] + b[o] = linear(x with channels last)[n, s, o]

    The passes replace `.linear` (a DGQLinear, a factorized pair); this keeps the model's channels-first
    layout around it. `restore_pointwise` turns one still holding a plain Linear back into its convolution."""

    takes_children = True  # its Linear may be a rewritten layer: from_state takes it rebuilt

    def __init__(self, linear: nn.Module, dims: int):
        super().__init__()
        self.linear, self.dims = linear, dims

    @classmethod
    def from_conv(cls, conv: nn.Module) -> OverChannels:
        linear = linear_from({"weight": conv.weight.detach().flatten(1), "bias": conv.bias})
        return cls(linear.requires_grad_(conv.weight.requires_grad), conv.weight.dim() - 2)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], children: dict[str, nn.Module] | None = None,
                   dims: int = 2) -> OverChannels:
        return cls((children or {}).get("linear") or linear_from(tensors, "linear."), dims)

    def saved_config(self) -> dict:
        return {"dims": self.dims}

    def as_conv(self) -> nn.Module:
        """The convolution it came from (its Linear still a plain one)."""
        linear = self.linear
        conv = CONVS[self.dims - 1](linear.in_features, linear.out_features, 1, bias=linear.bias is not None,
                                     device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.reshape(conv.weight.shape))
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
        return conv.requires_grad_(linear.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Left channels-last, as a convolution given a channels-last input returns it: the convolutions after it
        # take it as it is. Made contiguous, dgq's EfficientNet-B0 ran 0.81x the original and ConvNeXt-atto
        # 0.76x; left so, 1.12x and 1.08x (224², batch 8, 2 threads). Code that `.view`s it fails, and the
        # pass is rolled back with that reason.
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)


def linearize_pointwise(module: nn.Module, only: set[str] | None = None) -> int:
    """Every pointwise convolution the model runs (or those at `only`) wrapped as `OverChannels`: MobileNet's
    and EfficientNet's expansions and projections, PoolFormer's and ConvNeXt-atto's MLPs. Returns how many."""
    found = [path for path, layer in layers(module, CONVS)
             if is_pointwise_conv(layer) and (only is None or path in only)]
    for path in found:
        set_submodule(module, path, OverChannels.from_conv(module.get_submodule(path)))
    return len(found)


def linearized(module: nn.Module) -> list[str]:
    """The paths of the Linears in `OverChannels` a pass wrapped and has not rewritten yet."""
    return [f"{path}.linear" for path, layer in layers(module, (OverChannels,)) if type(layer.linear) is nn.Linear]


def restore_pointwise(module: nn.Module, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`linearize_pointwise` undone where no pass rewrote the Linear: the model keeps its own convolution.
    Returns `skipped` (path, reason) with each path the model's own (`user_path`)."""
    named = [(user_path(module, path), why) for path, why in skipped]
    for path, layer in layers(module, (OverChannels,)):
        if type(layer.linear) is nn.Linear:
            set_submodule(module, path, layer.as_conv())
    return named


def of_convolution(module: nn.Module, path: str) -> bool:
    """Whether the Linear at `path` is a 1×1 convolution's (inside `OverChannels`)."""
    return user_path(module, path) != path


def user_path(module: nn.Module, path: str) -> str:
    """The model's own path of a Linear a pass names: a pointwise convolution's, not its `OverChannels.linear`."""
    owner, _, name = path.rpartition(".")
    try:
        return owner if name == "linear" and isinstance(module.get_submodule(owner), OverChannels) else path
    except AttributeError:  # a skipped entry naming an option, not a layer
        return path


def unread_convs(module: nn.Module, hint: str = "") -> str:
    """Why a model's 1×1 convolutions were not read as a feed-forward block (MobileNet's sit between norms and
    depthwise convolutions); `hint` says what else reads them."""
    count = sum(1 for m in module.modules() if is_pointwise_conv(m))
    return (f"; its {count} 1×1 convolutions are in no feed-forward block (1×1 conv → activation → 1×1 conv)"
            + hint) if count else ""


# A holder of weights outside the layers a pass reads is named where its weights are at least this share of the
# model's: a router or a learned position table is not worth a line.
UNREAD_SHARE = 0.01
_READ = (nn.Linear, nn.Embedding, nn.EmbeddingBag)  # and 1×1 convolutions (as Linears over channels)


def unread_weights(module: nn.Module, reads: str, left: str = "in float") -> list[tuple[str, str]]:
    """Weights of two or more dimensions held outside Linears, 1×1 convolutions and embedding tables, which a
    pass that reads Linears leaves in float without a word otherwise: a mixture-of-experts block's 3-D expert
    weights (Mixtral, Qwen3-MoE: most of the model), a CNN's spatial convolutions, a MultiheadAttention's
    in_proj that capture could not lift (q apart from k and v). One (where, why) per kind of holder, its paths
    as one pattern (`model.layers.*.mlp.experts`)."""
    total = sum(p.numel() for p in module.parameters())
    tables = _embedding_tables(module)
    kinds: dict[tuple[str, str, str], list[tuple[str, int]]] = {}  # (pattern, what, why not read) → holders
    for path, holder in module.named_modules():
        if isinstance(holder, _READ) or is_pointwise_conv(holder):
            continue
        own = [(name, p) for name, p in holder.named_parameters(recurse=False)
               if p.dim() >= 2 and p.data_ptr() not in tables]
        if own:
            what, why = (("convolution weights", not_pointwise(holder)) if type(holder) in CONVS else
                         (f"{' and '.join(n for n, _ in own)}: {max(p.dim() for _, p in own)}-D weights",
                          "not in Linear layers"))
            kinds.setdefault((_pattern(path), what, why), []).append((path, sum(p.numel() for _, p in own)))
    found = []
    for (pattern, what, why), holders in kinds.items():
        share = sum(count for _, count in holders) / max(total, 1)
        where = holders[0][0] if len(holders) == 1 else pattern  # one holder: its own path
        if share >= UNREAD_SHARE:
            found.append((where or "<root>",
                          f"{what} ({share:.0%} of the model's), {why}; {reads}, so they stay {left}"))
    return found


def _pattern(path: str) -> str:
    """A module path with its block indices as `*`: model.layers.3.mlp.experts → model.layers.*.mlp.experts,
    torchvision's encoder.layers.encoder_layer_3 → encoder.layers.encoder_layer_*."""
    return ".".join(re.sub(r"^\d+$|(?<=_)\d+$", "*", part) for part in path.split("."))


def _embedding_tables(module: nn.Module) -> set[int]:
    """The storages of the tensors a captured graph reads by embedding lookup (an eager model's are nn.Embedding's
    own), by address: a table tied to the output head is read under the head's name (SmolLM2: lm_head.weight)
    and listed under the embedding's."""
    if not isinstance(module, fx.GraphModule):
        return set()
    lookups = (torch.ops.aten.embedding.default, torch.ops.aten.embedding_bag.default)
    return {functools.reduce(getattr, str(node.target).split("."), module).data_ptr() for node in module.graph.nodes
            if node.op == "get_attr" and any(user.target in lookups for user in node.users)}


def _ffn_paths(gm: fx.GraphModule, roles: tuple[str, ...] = ("up", "gate", "gate_up", "down")) -> set[str]:
    """The Linears in these roles of every feed-forward block: up and down of a plain one, gate, up and down of a
    gated (SwiGLU) one, gate_up and down where gate and up are one Linear."""
    return {m[role].target for pattern in (feed_forward(), gated_feed_forward(), fused_gated_feed_forward(),
                                           pointwise_feed_forward())
            for m in pattern.find(gm) or [] for role in roles if role in m.nodes}


def ffn_down_paths(gm: fx.GraphModule) -> set[str]:
    """The down Linear of every feed-forward block, whatever the family names it (down_proj, fc2, c_proj,
    output.dense)."""
    return _ffn_paths(gm, ("down",))


def _ffn_paths_eager(model: nn.Module) -> set[str]:
    """Without a graph, the usual names: HF BERT intermediate/output, *.fc1/fc2, *.mlp.*."""
    names = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    keys = ("intermediate.dense", "output.dense", "fc1", "fc2", "mlp.", "linear1", "linear2")
    return {p for p in names if any(k in p for k in keys) and "attention" not in p}


def check_rank_options(rank: int, ratio: float) -> None:
    """Option validation shared by the factorizing passes (ValueError → a one-line user error)."""
    if rank < 0 or not 0 < ratio < 1:
        raise InvalidValue("rank must be > 0 (or 0 for param-ratio) and param-ratio in (0, 1)")


def break_even_rank(linear: nn.Linear) -> float:
    """A rank-r factorization saves parameters only below in·out/(in+out)."""
    return linear.in_features * linear.out_features / (linear.in_features + linear.out_features)


def rank_for(linear: nn.Linear, rank: int, ratio: float) -> int:
    """An explicit rank, or the rank whose two factors hold `ratio` of the layer's weights."""
    return rank if rank > 0 else max(1, math.floor(ratio * break_even_rank(linear)))


def saving_rank(linear: nn.Linear, rank: int, ratio: float) -> int | str:
    """`rank_for`, or the reason a rank-r factorization (two Linears) would not save parameters."""
    r = rank_for(linear, rank, ratio)
    if r >= break_even_rank(linear):
        return f"rank {r} ≥ in·out/(in+out) = {break_even_rank(linear):.0f}: would not save parameters"
    return r


Build = Callable[[nn.Linear, str, float], nn.Module]  # (layer, path, ratio) → replacement


def search_ratios(module: nn.Module, paths: list[str], build: Build, batches: list[tuple], reference: list,
                  within: Callable[[nn.Module], bool],
                  grid: tuple[float, ...] = (0.2, 0.33, 0.5, 0.75)) -> dict[str, float]:
    """Per-layer parameter ratios: greedy from the least sensitive layer (by output SQNR), most compression
    first, keeping a choice only while `within(model)` holds for the whole model."""
    originals = {p: module.get_submodule(p) for p in paths}
    sensitivity = {p: _sqnr_with(module, p, build(originals[p], p, grid[0]), originals[p], batches, reference)
                   for p in paths}
    chosen: dict[str, float] = {}
    for path in sorted(paths, key=lambda p: -sensitivity[p]):  # least sensitive (highest SQNR) first
        for ratio in grid:
            set_submodule(module, path, build(originals[path], path, ratio))
            if within(module):
                chosen[path] = ratio
                break
            set_submodule(module, path, originals[path])
    for path, layer in originals.items():  # the caller applies the choice
        set_submodule(module, path, layer)
    return chosen


def _sqnr_with(module, path, candidate, original, batches, reference) -> float:
    set_submodule(module, path, candidate)
    value = _sqnr(module, batches, reference)
    set_submodule(module, path, original)
    return value


def _sqnr(module: nn.Module, batches: list[tuple], reference: list, masks: list | None = None) -> float:
    return verify.compare(reference, [capture.run(module, b) for b in batches], masks=masks).sqnr_db


def budget_check(sqnr_db: float, metric_floor: float, batches: list[tuple], reference: list,
                 evaluate: Callable[[nn.Module], float] | None, metric: str | None,
                 masks: list | None = None) -> Callable[[nn.Module], bool]:
    """The search's acceptance test: SQNR ≥ sqnr_db on calibration data and/or the eval metric within its floor."""
    from rewrite.errors import RewriteError
    from rewrite.measure import meets
    if metric_floor and evaluate is None:
        raise RewriteError("a metric budget needs eval data and a metric: add --eval FILE --metric NAME")

    def within(module: nn.Module) -> bool:
        if sqnr_db and _sqnr(module, batches, reference, masks) < sqnr_db:
            return False
        return not metric_floor or meets(metric, evaluate(module), metric_floor)
    return within


def reference_outputs(module: nn.Module, batches: list[tuple]) -> list:
    return [capture.run(module, b) for b in batches]


def weight_error(original: nn.Linear, replacement: nn.Module) -> float:
    """Relative Frobenius error of the replacement's effective weight (probe with the identity)."""
    with torch.no_grad():
        eye = torch.eye(original.in_features)
        bias = original.bias if original.bias is not None else 0
        effective = (replacement(eye) - bias).T
    return verify.relative_error(original.weight, effective)
