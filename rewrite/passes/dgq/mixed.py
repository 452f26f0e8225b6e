"""Mixed precision: the fewest layers U with wider codes such that the model's outputs on calibration batches
held out of the weight fit reach mean cosine ≥ budget-cos, with the average bits per weight ≤ max-bits:
layers ranked by output error removed per extra bit when each alone gets its wider weights, then bisection
over that ranking. The ranking comes from one backward pass: ‖J·(Ŵ − W)·x‖² for every layer at once, J the
Jacobian of the model's unit-scaled outputs at the layer's output, sketched with a seeded random direction
(SmolLM2-135M's first 4 blocks, budget-cos=0.9995: 16 layers wide reached the budget where the ranking by
measured probes, one partial forward a layer, needed 22).

Not in the DGQ paper (which is pure A8W4): sensitivity-ranked bit allocation in the manner of HAWQ (Dong et
al., arXiv:1905.03696), with wider codes in the same format and int8 GEMM (S·(q − z) ≤ 127 holds for 5–7-bit
codes) or W8A8 rows.
"""
from __future__ import annotations

import bisect
import itertools

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from rewrite import verify
from rewrite.calibration import Suffixes, first_tokens
from rewrite.pass_base import PassContext
from rewrite.passes.dgq.format import DGQLinear
from rewrite.patterns import set_submodule
from rewrite.recover import split

PROBE_TOKENS = 512  # tokens the mixed-precision sensitivity probes run on


def mixed_precision(module, ctx, judge, reference, w4: dict, wide: dict, originals: dict, budget_cos: float,
                    max_bits: float, upgrade_bits: int) -> tuple[dict[str, DGQLinear], float]:
    """The layers whose wider weights (upgrade-bits, the same int8 GEMM) buy most output cosine per extra
    bit are upgraded: as few as give model outputs with a mean cosine ≥ budget-cos on the calibration
    data held out from the weight fit (a search over that ranking, `fewest`), never more than keep the
    average at max-bits."""
    ranked, gains, total = ranking(module, ctx, judge, reference, w4, wide, originals)
    affordable = affordable_count(ranked, w4, wide, max_bits)

    def chosen(k: int) -> dict[str, DGQLinear]:
        return {path: (wide if i < k else w4)[path] for i, path in enumerate(ranked)}

    def cosine_with(k: int) -> float:
        ctx.step(f"mixed precision: trying {k} of {len(ranked)} layers at {upgrade_bits}-bit weights", k,
                 len(ranked))
        for path, layer in chosen(k).items():
            set_submodule(module, path, layer)
        return cosine(reference, output_vectors(module, *judge))

    k, reached = fewest(cosine_with, affordable, budget_cos, [gains[path] for path in ranked], total)
    for path, layer in chosen(k).items():  # the module as chosen (the last probe may have been another k)
        set_submodule(module, path, layer)
    return chosen(k), reached


def fewest(cosine_with, most: int, budget: float, gains: list[float], total: float | None = None
           ) -> tuple[int, float]:
    """The smallest k ≤ most whose cosine_with(k) reaches `budget` (else `most`), to within
    `close_enough(most)` layers, and that cosine. Each probe is a forward of the judged batches, so the next
    k is predicted from the probes so far: the cosine taken as linear in the output error the first k layers
    remove (the running sum of `gains`), between the bracket's ends; a bisection step where that keeps
    moving the same end. total: the error of all layers at 4 bits in the gains' units, which with the
    cosine at k = 0 predicts the first k to try (else the first is `most`). SmolLM2: 6 forwards where
    bisection over 210 layers took 10 (its cosine is concave and noisy at 2e-4 near the budget: 103 layers
    wide gave 0.98996, 104 gave 0.98986, 105 gave 0.99032)."""
    removed = [0.0, *itertools.accumulate(max(g, 0.0) for g in gains)]
    seen = {}

    def probe(k: int) -> bool:
        seen[k] = cosine_with(k)
        return seen[k] >= budget

    if probe(0) or not most:
        return 0, seen[0]
    low, high = 0, most
    first = _first_guess(seen[0], budget, total, removed, most)
    if first is not None:
        low, high = (0, first) if probe(first) else (first, most)
    if high not in seen and not probe(high):
        return high, seen[high]  # even the most affordable count misses the budget
    moved, slack = [], close_enough(most)  # invariant from here: low fails, high holds
    while high - low > slack:
        stuck = len(moved) >= 2 and moved[-1] == moved[-2]  # the line keeps missing on one side
        k = _middle(low, high) if stuck else _predicted(low, high, seen, removed, budget)
        low, high = (low, k) if probe(k) else (k, high)
        moved.append(high == k)
    return high, seen[high]


def close_enough(most: int) -> int:
    """How far above the fewest layers the search may stop: 1/32 of the affordable ones (a probe is a forward;
    near the budget SmolLM2's cosine is noisy at 2e-4 from one layer to the next, so the last probes only
    chase noise), at most that many layers more at the wider width."""
    return max(1, most // 32)


def _first_guess(start: float, budget: float, total: float | None, removed: list[float], most: int) -> int | None:
    """The k where the error left, total − removed[k], scaled so that all of it gives the measured deficit
    1 − start, falls to the budget's deficit 1 − budget; None without a usable total."""
    if not total or total <= 0 or start >= 1:
        return None
    target = total * (1 - (1 - budget) / (1 - start))
    k = bisect.bisect_left(removed, target, lo=1, hi=most)
    return k if k < most else None


def _middle(low: int, high: int) -> int:
    return (low + high) // 2


def _predicted(low: int, high: int, seen: dict[int, float], removed: list[float], budget: float) -> int:
    """The k between low and high (exclusive) where the line through the two measured cosines, over the
    output error removed, reaches the budget."""
    span = seen[high] - seen[low]
    if span <= 0 or removed[high] <= removed[low]:
        return _middle(low, high)
    target = removed[low] + (budget - seen[low]) / span * (removed[high] - removed[low])
    k = bisect.bisect_left(removed, target, lo=low + 1, hi=high)
    return min(max(k, low + 1), high - 1)


def ranking(module, ctx, judge, reference, w4: dict, wide: dict, originals: dict
            ) -> tuple[list[str], dict[str, float], float | None]:
    """Layers by output error removed per extra weight bit when that layer alone gets its wider weights, on
    the first judged batch(es), each layer's gain, and the sketched error of all layers at 4 bits (None
    where the gains were measured): from one backward pass (`sketched_gains`), or where the module has no
    gradients, by measuring the model from each layer on with that layer wide (`probed_gains`)."""
    probe = first_tokens(judge[0], PROBE_TOKENS)
    masks = judge[1][:len(probe)] if judge[1] else None
    ctx.step("mixed precision: ranking layers by output sensitivity", 0, len(w4))
    try:
        gain, lows = sketched_gains(module, probe, masks, w4, wide, originals)
    except (RuntimeError, NotImplementedError):  # ops without gradients (a custom op, an integer graph)
        gain, lows = probed_gains(module, ctx, probe, masks, reference[:len(probe)], w4, wide), {}
    extra = {path: (wide[path].format_bits() - w4[path].format_bits()) * w4[path].weight_count() for path in w4}
    ranked = sorted(w4, key=lambda path: gain[path] / extra[path], reverse=True)
    return ranked, gain, sum(lows.values()) if lows else None


def sketched_gains(module, probe, masks, w4: dict, wide: dict, originals: dict
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Per layer, the gain e(W4) − e(W_wide), and e(W4), with e(Ŵ) = Σ_t (g_t·(Ŵ − W)x_t)²: the first-order
    change of the model's outputs (rows scaled to unit norm, as the cosine budget sees them) that the
    layer's weight error causes, projected on a seeded random direction r: g_t = J_tᵀr is the gradient of rᵀy at the layer's output for
    token t (one backward pass for all layers), so E_r[e] = Σ_t ‖J_t (Ŵ − W) x_t‖². The layers run as
    dequantized float Linears (their int8 kernel has no gradient)."""
    probes = {path: _Sensor(w4[path], originals[path], wide[path]) for path in w4}
    generator = torch.Generator().manual_seed(0)
    try:
        for path, sensor in probes.items():
            set_submodule(module, path, sensor)
        for batch, mask in zip(probe, masks or [None] * len(probe)):
            with torch.enable_grad():
                outputs = [t for t in tree_leaves(module(*batch)) if isinstance(t, torch.Tensor)
                           and t.is_floating_point() and t.requires_grad]
                if not outputs:
                    raise RuntimeError("no floating-point output carries a gradient")
                seen = [sensor for sensor in probes.values() if sensor.output is not None]
                direction = sum((_unit_rows(t.detach(), mask, generator) * t).sum() for t in outputs)
                grads = torch.autograd.grad(direction, [sensor.output for sensor in seen], allow_unused=True)
            for sensor, grad in zip(seen, grads):
                sensor.accumulate(grad)
    finally:
        for path in w4:
            set_submodule(module, path, w4[path])
    return ({path: sensor.gain for path, sensor in probes.items()},
            {path: sensor.low for path, sensor in probes.items()})


class _Sensor(nn.Module):
    """A 4-bit layer as a float Linear that keeps its input and output of one forward, for `sketched_gains`."""

    def __init__(self, low: DGQLinear, original: torch.Tensor, wide: DGQLinear):
        super().__init__()
        self.weight, self.bias = low.float_weight(), low.bias
        self.low_error, self.wide_error = self.weight - original, wide.float_weight().sub_(original)
        self.input = self.output = None
        self.gain = self.low = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input = x.detach()
        if not x.requires_grad:  # a model without trainable weights before this layer: gradients start here
            x = x.detach().requires_grad_()
        self.output = nn.functional.linear(x, self.weight, self.bias)
        return self.output

    def accumulate(self, grad: torch.Tensor | None) -> None:
        if grad is not None:
            x = self.input.reshape(-1, self.input.shape[-1]).float()
            g = grad.reshape(-1, grad.shape[-1])
            low = ((x @ self.low_error.t()) * g).sum(1).square().sum()
            wide = ((x @ self.wide_error.t()) * g).sum(1).square().sum()
            self.gain += float(low - wide)
            self.low += float(low)
        self.input = self.output = None


def _unit_rows(t: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """A seeded Gaussian direction with each output row (last axis) scaled by 1/‖row‖, zero at positions the
    padding mask drops."""
    direction = torch.randn(t.shape, generator=generator) / t.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        direction = direction * mask.reshape(*mask.shape, *[1] * (t.dim() - 2)).to(direction.dtype)
    return direction.to(t.dtype)


def probed_gains(module, ctx, probe, masks, want, w4: dict, wide: dict) -> dict[str, float]:
    """Per layer, the output cosine gained when that layer alone gets its wider weights (the others at 4
    bits), measured: the model from that layer on (`Suffixes`; a whole forward where the module is not a
    graph). One partial forward a layer: the fallback where gradients are not available."""
    base = cosine(want, output_vectors(module, probe, masks))
    suffixes = Suffixes(module, list(w4), probe) if Suffixes.usable(module, probe) else None
    gain = {}
    for i, path in enumerate(w4):
        ctx.step(f"mixed precision: sensitivity of {path}", i, len(w4))
        set_submodule(module, path, wide[path])
        outputs = suffixes.outputs(path) if suffixes else [module(*batch) for batch in probe]
        gain[path] = cosine(want, vectors_of(outputs, masks)) - base
        set_submodule(module, path, w4[path])
    return gain


def fit_and_judge(ctx: PassContext) -> tuple[list[tuple], tuple[list[tuple], list | None]]:
    """(batches the weights are fit on, (batches and masks the budget is judged on)): the last quarter of
    the calibration batches is held out of the fit when there are two or more. Judged in-sample, error
    feedback's fit looks better than it is on new text (MiniLM, 340 calibration tokens: calibration
    cosine 0.992 where unseen sentences reach 0.981), and the budget would keep too few layers wide."""
    count = len(ctx.calibration)
    if count < 2:
        return ctx.calibration, (ctx.calibration, ctx.masks)
    train, held = split(count)
    masks = [ctx.masks[i] for i in held] if ctx.masks else None
    return [ctx.calibration[i] for i in train], ([ctx.calibration[i] for i in held], masks)

def affordable_count(ranked: list[str], w4: dict, wide: dict, max_bits: float) -> int:
    """How many of the top-ranked layers can hold their wider weights with the average staying ≤ max_bits."""
    sizes = [w4[p].weight_count() for p in ranked]
    bits = sum(w4[p].format_bits() * n for p, n in zip(ranked, sizes))
    total, k = sum(sizes), 0
    for path, n in zip(ranked, sizes):
        bits += (wide[path].format_bits() - w4[path].format_bits()) * n
        if bits / total > max_bits:
            break
        k += 1
    return k

def output_vectors(module: nn.Module, batches: list[tuple], masks: list | None) -> list[list[tuple[str, torch.Tensor]]]:
    """Per calibration batch, the output vectors the budget is judged on: every float output's rows (its last
    axis) at the positions the padding masks keep, and, for outputs with a sequence axis, each sequence's
    mean over its kept positions (what a sentence embedding is made of: errors shared by a sequence's
    tokens do not average out of it, so it is the stricter of the two on encoders)."""
    with torch.no_grad():
        return vectors_of([module(*batch) for batch in batches], masks)

def vectors_of(outputs: list, masks: list | None) -> list[list[tuple[str, torch.Tensor]]]:
    return [rows_and_means(out, mask) for out, mask in zip(outputs, masks or [None] * len(outputs))]

def rows_and_means(outputs, mask: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    vectors = [("rows", t.reshape(-1, t.shape[-1]).float()) for t in verify.float_leaves(outputs, mask, flatten=False)
               if t.dim()]
    return vectors + [("pooled", mean) for mean in verify.sequence_means(outputs, mask)]

def cosine(reference: list[list[tuple]], outputs: list[list[tuple]]) -> float:
    """The mean cosine between original and rewritten vectors of each kind; the lower of the two kinds."""
    by_kind: dict[str, list[torch.Tensor]] = {}
    for ref_batch, new_batch in zip(reference, outputs):
        for (kind, a), (_, b) in zip(ref_batch, new_batch):
            if a.numel():
                by_kind.setdefault(kind, []).append(nn.functional.cosine_similarity(a, b, dim=-1))
    return min((float(torch.cat(c).mean()) for c in by_kind.values()), default=1.0)
