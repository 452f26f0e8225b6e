"""y = D φ(U x) → y = D′ φ(U_S x) + c: feed-forward hidden units removed, the down Linear refit to what they did.

For an FFN block (U: its up Linears, one, or gate and up of a gated block, or both as one Linear chunked in two
as Phi-3's gate_up_proj, where unit j is rows j and H + j; D: its down Linear; φ elementwise with φ(0) = 0),
removing hidden units keeps the rows S of every U and refits D on the kept units. With
H = Σ h̃ h̃ᵀ over the calibration tokens, h̃ = [h; 1] (h: D's input, the 1 carries a removed unit's mean into
the bias), and G = Σ g gᵀ over D's output gradients (the model's own Fisher, as fwsvd takes it), removing
unit i from the current set costs, by Optimal Brain Surgeon,

    δ_i = d_iᵀ G d_i / [H⁻¹]_ii,    and the others absorb it: D ← D − d_i [H⁻¹]_{i,:} / [H⁻¹]_ii,

where d_i is column i of the current D. Units are removed greedily in that order (ZipLM); a block's δ's add
up to the error of the least-squares refit of its kept set, D′ = D H_{:,S} H_SS⁻¹, in the loss's units, so
one budget is spent across all blocks: cheapest units first until `param-ratio` of the FFN weights is left.
Unlike a low-rank pair, the result is a narrower dense FFN, so its time falls with its weights in any
runtime. An MLP of 1×1 convolutions (PoolFormer, ConvNeXt-atto) is the same block over each grid point's
channels, and is pruned as its Linears (`compress.OverChannels`). On pretrained MiniLM, a quarter of the FFN
weights removed keeps a held-out embedding cosine of 0.965 (fwsvd's whitened factors: 0.951); on SmolLM2 the
licence text's perplexity suffers more than under fwsvd (RESULTS.md).

Papers: Kurtic, Frantar, Alistarh, "ZipLM: Inference-Aware Structured Pruning of Language Models",
NeurIPS 2023 (arXiv:2302.04089); Hassibi & Stork, "Second order derivatives for network pruning: Optimal
Brain Surgeon", NeurIPS 1992; Kwon et al., "A Fast Post-Training Pruning Framework for Transformers",
NeurIPS 2022 (arXiv:2204.09656).
Contract: approximate, SQNR ≥ min-sqnr dB on calibration data.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn

from rewrite import calibration, compress, measure, weighting
from rewrite.errors import InvalidValue, RewriteError
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor
from rewrite.patterns import (
    feed_forward,
    fused_gated_feed_forward,
    gated_feed_forward,
    is_pointwise_conv,
    pointwise_feed_forward,
    set_submodule,
)

KEEP_AT_LEAST = 8  # a block keeps at least 1/8 of its hidden units: the order is searched no further
# ... nor past 3x the average share to remove: a greedy step costs O(k·n), so the order's length sets the time.
# The most any block lost was 1.65x the average (SmolLM2, 20% of its Linear weights; MiniLM at 0.75: 1.5x).
SEARCH_DEPTH = 3


class PrunedLinear(nn.Linear):
    """A Linear with fewer inputs or outputs than the one it replaced (rebuilt from its tensors on load)."""

    plain_form = nn.Linear  # it computes what nn.Linear does: the matcher lets later passes' patterns take it

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> PrunedLinear:
        return compress.linear_from(tensors, kind=cls)


@dataclass
class Block:
    ups: list[str]  # the Linears that make the hidden units (gate and up, or one up)
    down: str  # the Linear that reads them


def removal_order(weight: torch.Tensor, gram: torch.Tensor, metric: torch.Tensor | None, steps: int,
                  fixed: tuple[int, ...] = ()) -> tuple[list[int], list[float]]:
    """Greedy OBS: which columns of `weight` (out × n) to remove, in order, and what each removal costs,
    under the input gram (n × n) and output `metric` (out × out, its diagonal, or None for I). Columns in
    `fixed` (the constant) stay. The inverse gram's downdates are kept as rows, so a step costs O(k·n)."""
    n = weight.shape[1]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(_damped(gram, n - len(fixed))))
    w = weight.double().clone()
    weighted = w if metric is None else (metric.double()[:, None] * w if metric.dim() == 1 else metric.double() @ w)
    norms, diagonal = (weighted * w).sum(0), inverse.diagonal().clone()
    alive = torch.ones(n, dtype=torch.bool)
    alive[list(fixed)] = False
    downdates = torch.zeros(steps, n, dtype=torch.float64)
    order, costs = [], []
    for k in range(steps):
        score = torch.where(alive, norms / diagonal, torch.full_like(norms, float("inf")))
        i = int(score.argmin())
        order.append(i)
        costs.append(float(score[i]))
        row = inverse[i] - downdates[:k, i] @ downdates[:k]
        u = row / row[i].sqrt()
        column, weighted_column = w[:, i] / row[i].sqrt(), weighted[:, i] / row[i].sqrt()
        # w ← w − column uᵀ, so each ‖w_c‖²_G moves by −2 u_c ⟨column, w_c⟩_G + u_c² ‖column‖²_G
        norms = norms - 2 * u * (weighted_column @ w) + u.square() * float(weighted_column @ column)
        w -= torch.outer(column, u)
        if metric is not None:
            weighted -= torch.outer(weighted_column, u)
        diagonal -= u.square()
        downdates[k] = u
        alive[i] = False
    return order, costs


def refit(weight: torch.Tensor, gram: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """W H_{:,S} H_SS⁻¹: the least-squares columns S that make W's outputs on the calibration inputs."""
    damped = _damped(gram, gram.shape[0] - 1)
    return torch.linalg.solve(damped[kept][:, kept], (weight.double() @ damped[:, kept]).T).T.float()


def _damped(gram: torch.Tensor, features: int) -> torch.Tensor:
    """gram + DAMPING·(mean of the first `features` diagonal entries)·I: invertible where calibration is thin."""
    scale = float(gram.diagonal()[:features].mean()) or 1.0
    return gram.double() + weighting.DAMPING * scale * torch.eye(gram.shape[0], dtype=torch.float64)


def candidate_groups(module: nn.Module) -> list[list[str]]:
    """The Linears of each feed-forward block (or its 1×1 convolutions): the shared matcher's matches in a graph;
    in an eager model,
    the FFN Linears (`compress.target_linears`) grouped by their block (the path above their parent)."""
    if isinstance(module, fx.GraphModule):
        matches = [*(feed_forward().find(module) or []), *(gated_feed_forward().find(module) or []),
                   *(fused_gated_feed_forward().find(module) or []), *(pointwise_feed_forward().find(module) or [])]
        return [[m[k].target for k in ("gate", "up", "gate_up", "down") if k in m.nodes] for m in matches]
    groups: dict[str, list[str]] = defaultdict(list)
    for path, layer in compress.target_linears(module, "ffn"):
        if isinstance(layer, nn.Linear):
            groups[path.rsplit(".", 2)[0]].append(path)
    return list(groups.values())


def over_channels(module: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """`groups` with each 1×1 convolution wrapped as `compress.OverChannels` and named by its Linear."""
    convs = {path for group in groups for path in group if is_pointwise_conv(module.get_submodule(path))}
    compress.linearize_pointwise(module, convs)
    return [[f"{path}.linear" if path in convs else path for path in group] for group in groups]


def confirmed_blocks(module: nn.Module, groups: list[list[str]], batch: tuple) -> tuple[list[Block], list]:
    """Blocks whose hidden unit k reaches the down Linear from unit k of the ups alone: the last Linear a
    forward calls is the down, and zeroing some of the ups' outputs must zero exactly those of its input."""
    order = calibration.forward_order(module, [p for g in groups for p in g], batch)
    blocks, skipped = [], []
    for group in groups:
        called = sorted((p for p in group if p in order), key=order.index)
        down, ups = (called[-1], called[:-1]) if len(called) >= 2 else (None, [])
        width = module.get_submodule(down).in_features if down else None
        if not ups or any(_chunks(module.get_submodule(u), width) is None for u in ups):
            skipped.append((group[-1], "could not tell its FFN's up and down Linears apart"))
            continue
        blocks.append(Block(ups, down))
    local = _elementwise(module, blocks, batch)
    skipped += [(b.down, "a layer between the up and down Linears mixes hidden units (or φ(0) ≠ 0)")
                for b in blocks if not local[b.down]]
    return [b for b in blocks if local[b.down]], skipped


def _chunks(up: nn.Linear, width: int | None) -> int | None:
    """How many blocks of `width` hidden units an up Linear's outputs hold: 1, or 2 where gate and up are one
    Linear (Phi-3's gate_up_proj: unit j is rows j and width + j); None where it is no whole number."""
    if not width or up.out_features % width:
        return None
    return up.out_features // width


def _unit_rows(up: nn.Linear, width: int, units: list[int]) -> list[int]:
    """The rows of an up Linear that make hidden units `units` (in every chunk of its outputs)."""
    return [c * width + j for c in range(_chunks(up, width)) for j in units]


def _elementwise(module: nn.Module, blocks: list[Block], batch: tuple) -> dict[str, bool]:
    """Per block: with every other hidden unit zeroed at the ups, are exactly those zero at the down?"""
    masks = {b.down: torch.arange(module.get_submodule(b.down).in_features) % 2 == 0 for b in blocks}
    local = {b.down: True for b in blocks}

    def zero(mask):
        return lambda _m, _a, out: out * (~mask)

    def check(path):
        def hook(_m, args):
            x = args[0]
            local[path] &= bool((x[..., masks[path]] == 0).all()) and bool((x[..., ~masks[path]] != 0).any())
        return hook
    hooks = [module.get_submodule(u).register_forward_hook(
        zero(masks[b.down].repeat(_chunks(module.get_submodule(u), len(masks[b.down])))))
        for b in blocks for u in b.ups]
    hooks += [module.get_submodule(b.down).register_forward_pre_hook(check(b.down)) for b in blocks]
    calibration.run_hooked(module, [batch], hooks)
    return local


def allocate_units(orders: dict[str, list[float]], unit_weights: dict[str, int], remove: float) -> dict[str, int]:
    """How many units each block loses: the cheapest per weight first, across blocks, until `remove`
    weights are gone. A block's costs are made non-decreasing, so each takes a prefix of its order."""
    steps = []
    for down, costs in orders.items():
        running = torch.tensor(costs, dtype=torch.float64).cummax(0).values.tolist() if costs else []
        steps += [(cost / unit_weights[down], down) for cost in running]
    counts, removed = dict.fromkeys(orders, 0), 0
    for _, down in sorted(steps, key=lambda s: s[0]):
        if removed >= remove:
            break
        counts[down] += 1
        removed += unit_weights[down]
    return counts


@dataclass(frozen=True)
class PruneFFN(SqnrFloor, Pass):
    name = "prune"
    paper = "Kurtic et al., ZipLM: Inference-Aware Structured Pruning of Language Models, NeurIPS 2023 " \
            "(arXiv:2302.04089)"
    summary = "FFN hidden units removed where the model's Fisher says they matter least, the down Linear refit (OBS)"
    applies_to = ("feed-forward blocks: Linear → activation → Linear, and gated ones (gate, up → down; SwiGLU, GeGLU; "
                  "gate and up fused as in Phi-3), and MLPs of 1×1 convolutions (PoolFormer, ConvNeXt-atto)")
    needs_calibration = True
    level = "module"
    recoverable = True  # the narrower Linears train as any Linear
    recovery_lr = 1e-4  # pretrained weights refit in closed form, as fwsvd's factors

    param_ratio: float = 0.8
    min_sqnr: float = 10.0

    @classmethod
    def patterns(cls) -> list:
        return [feed_forward(), gated_feed_forward(), fused_gated_feed_forward(), pointwise_feed_forward()]

    def __post_init__(self):
        if not 0 < self.param_ratio < 1:
            raise InvalidValue("param-ratio must be in (0, 1): the share of the FFN weights to keep")

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        groups = candidate_groups(module)
        if not groups:
            why = ("no feed-forward blocks (Linear → activation → Linear, or SwiGLU; a mixture of experts' weights are "
                   "not Linears, and prune leaves them)" + compress.unread_convs(module))
            return PassResult(module, False, skipped=[("model", why)])
        blocks, skipped = confirmed_blocks(module, over_channels(module, groups), ctx.calibration[0])
        if not blocks:
            return PassResult(module, False, skipped=compress.restore_pointwise(module, skipped))
        found = self._moments(module, blocks, ctx)
        orders = {}
        for k, block in enumerate(blocks):
            ctx.step(f"ordering the hidden units of {block.down}", k, len(blocks))
            orders[block.down] = self._order(module, block, found, self.param_ratio)
        before = sum(self._weights(module, b) for b in blocks)
        counts = allocate_units({d: costs for d, (_, costs) in orders.items()},
                                {b.down: self._unit_weights(module, b) for b in blocks}, (1 - self.param_ratio) * before)
        kept_units: list[tuple[int, int]] = []
        rows = []
        for block in blocks:
            width = module.get_submodule(block.down).in_features
            removed = set(orders[block.down][0][:counts[block.down]])
            kept = [j for j in range(width) if j not in removed]
            kept_units.append((len(kept), width))
            if removed:
                row = {"layer": compress.user_path(module, block.down), "bytes_before": self._bytes(module, block)}
                row["sqnr_db"] = self._narrow(module, block, kept, found.with_constant(block.down))
                rows.append(row | {"bytes_after": self._bytes(module, block)})
        after = sum(self._weights(module, b) for b in blocks)
        stats = {"blocks": len(blocks), "units_kept": _spread(kept_units),
                 "target_weights_kept": round(after / before, 4)}
        skipped = compress.restore_pointwise(module, skipped)
        return PassResult(module, any(counts.values()), stats, skipped, layers=rows)

    @staticmethod
    def _moments(module: nn.Module, blocks: list[Block], ctx: PassContext) -> weighting.Moments:
        """The downs' input grams and output Fishers; without a Fisher (integer outputs carry no gradient),
        each block's own output error ranks its units (G = I)."""
        gen = torch.Generator().manual_seed(ctx.seed)
        downs = [b.down for b in blocks]
        try:
            found = weighting.moments(module, downs, ctx.calibration, ctx.masks, lambda out, i: weighting.fisher_loss(
                out, ctx.targets[i] if ctx.targets is not None else None, gen))
        except RewriteError:  # no floating-point output to take gradients of
            return weighting.moments(module, downs, ctx.calibration, ctx.masks)
        if not any(bool(g.any()) for g in found.outputs.values()):
            found.outputs = {}
        return found

    @staticmethod
    def _order(module: nn.Module, block: Block, found: weighting.Moments, ratio: float) -> tuple[list[int], list[float]]:
        down = module.get_submodule(block.down)
        width = down.in_features
        steps = min(width - max(1, width // KEEP_AT_LEAST), math.ceil(SEARCH_DEPTH * (1 - ratio) * width))
        return removal_order(_with_bias(down), found.with_constant(block.down), found.outputs.get(block.down),
                             steps=steps, fixed=(width,))

    @staticmethod
    def _narrow(module: nn.Module, block: Block, kept: list[int], gram: torch.Tensor) -> float:
        """Swaps in the narrowed block; returns its output SQNR (dB) on the calibration inputs."""
        down = module.get_submodule(block.down)
        columns = kept + [down.in_features]
        weight = refit(_with_bias(down), gram, columns)
        for path in block.ups:
            up = module.get_submodule(path)
            rows = _unit_rows(up, down.in_features, kept)
            set_submodule(module, path, PrunedLinear.from_state(
                {"weight": up.weight.detach()[rows]} | ({} if up.bias is None else {"bias": up.bias.detach()[rows]})))
        sqnr = _output_sqnr(_with_bias(down), weight, columns, gram)
        set_submodule(module, block.down, PrunedLinear.from_state({"weight": weight[:, :-1], "bias": weight[:, -1]}))
        return sqnr

    @staticmethod
    def _bytes(module: nn.Module, block: Block) -> int:
        return sum(measure.weight_bytes(module.get_submodule(p)) for p in block.ups + [block.down])

    @staticmethod
    def _unit_weights(module: nn.Module, block: Block) -> int:
        """Weights one hidden unit holds: a row of each up Linear (of each chunk of a fused one) and a column of
        the down."""
        down = module.get_submodule(block.down)
        return sum(up.in_features * _chunks(up, down.in_features) for up in map(module.get_submodule, block.ups)) \
            + down.out_features

    @staticmethod
    def _weights(module: nn.Module, block: Block) -> int:
        return sum(module.get_submodule(p).weight.numel() for p in block.ups + [block.down])


def _output_sqnr(weight: torch.Tensor, refit_columns: torch.Tensor, columns: list[int], gram: torch.Tensor) -> float:
    """10·log10(‖W x̃‖² / ‖(W − W′) x̃‖²) summed over the calibration tokens, from their gram: the down's
    output error on the inputs the original saw (W′: the refit columns, zero where units were removed)."""
    error = weight.double().clone()
    error[:, columns] -= refit_columns.double()
    signal = float(torch.einsum("oi,ij,oj->", weight.double(), gram.double(), weight.double()))
    noise = float(torch.einsum("oi,ij,oj->", error, gram.double(), error))
    return round(10 * math.log10(signal / noise), 2) if noise > 0 else math.inf


def _spread(kept: list[tuple[int, int]]) -> str:
    """Hidden units kept per block, in a few words: '949–1383 of 1536' (the widest block's width)."""
    counts = [k for k, _ in kept]
    return f"{min(counts)}–{max(counts)} of {max(w for _, w in kept)}"


def _with_bias(linear: nn.Linear) -> torch.Tensor:
    """[W, b] (out × in+1); b = 0 where the layer has none."""
    bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
    return torch.cat([linear.weight.detach(), bias[:, None]], 1)
