"""Mixed precision: the fewest layers U with wider codes such that the model's outputs on calibration batches
held out of the weight fit reach mean cosine ≥ budget-cos, with the average bits per weight ≤ max-bits:
layers ranked by Δcosine / Δbits when each alone gets its wider weights, then bisection over that ranking.

Not in the DGQ paper (which is pure A8W4): sensitivity-ranked bit allocation in the manner of HAWQ (Dong et
al., arXiv:1905.03696), with wider codes in the same format and int8 GEMM (S·(q − z) ≤ 127 holds for 5–7-bit
codes) or W8A8 rows.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite import verify
from rewrite.calibration import Suffixes
from rewrite.pass_base import PassContext
from rewrite.patterns import set_submodule
from rewrite.passes.dgq.format import DGQLinear
from rewrite.recover import split

PROBE_TOKENS = 512  # tokens the mixed-precision sensitivity probes run on


def mixed_precision(module, ctx, judge, reference, w4: dict, wide: dict, budget_cos: float, max_bits: float,
                    upgrade_bits: int) -> tuple[dict[str, DGQLinear], float]:
    """The layers whose wider weights (upgrade-bits, the same int8 GEMM) buy most output cosine per extra
    bit are upgraded: as few as give model outputs with a mean cosine ≥ budget-cos on the calibration
    data held out from the weight fit (bisection over that ranking), never more than keep the average at
    max-bits."""
    ranked = ranking(module, ctx, judge, reference, w4, wide)
    affordable = affordable_count(ranked, w4, wide, max_bits)

    def chosen(k: int) -> dict[str, DGQLinear]:
        return {path: (wide if i < k else w4)[path] for i, path in enumerate(ranked)}

    last = {}

    def holds(k: int) -> bool:
        ctx.step(f"mixed precision: trying {k} of {len(ranked)} layers at {upgrade_bits}-bit weights", k,
                 len(ranked))
        for path, layer in chosen(k).items():
            set_submodule(module, path, layer)
        last["cosine"] = cosine(reference, output_vectors(module, *judge))
        return last["cosine"] >= budget_cos

    low, high = 0, affordable  # invariant: low fails (or is 0), high holds (or is the most affordable)
    if holds(0):
        return chosen(0), last["cosine"]
    if affordable and holds(high):
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if holds(middle) else (middle, high)
    holds(high)  # leave the module in the chosen state
    return chosen(high), last["cosine"]


def ranking(module, ctx, judge, reference, w4: dict, wide: dict) -> list[str]:
    """Layers by cosine gained per extra weight bit when that layer alone gets its wider weights
    (the others at 4 bits), measured on the first judged batch(es): per layer, the model from that
    layer on (`Suffixes`; a whole forward where the module is not a graph)."""
    probe = probe_batches(judge[0])
    want = reference[:len(probe)]
    masks = judge[1][:len(probe)] if judge[1] else None
    base = cosine(want, output_vectors(module, probe, masks))
    suffixes = Suffixes(module, list(w4), probe) if Suffixes.usable(module, probe) else None
    gain = {}
    for i, path in enumerate(w4):
        ctx.step(f"mixed precision: sensitivity of {path}", i, len(w4))
        set_submodule(module, path, wide[path])
        outputs = suffixes.outputs(path) if suffixes else [module(*batch) for batch in probe]
        extra = (wide[path].format_bits() - w4[path].format_bits()) * w4[path].weight_count()
        gain[path] = (cosine(want, vectors_of(outputs, masks)) - base) / extra
        set_submodule(module, path, w4[path])
    return sorted(w4, key=gain.get, reverse=True)


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

def probe_batches(batches: list[tuple]) -> list[tuple]:
    """The first batches, up to PROBE_TOKENS tokens (rows of the first input), for the per-layer probes."""
    taken, rows = [], 0
    for batch in batches:
        if taken and rows >= PROBE_TOKENS:
            break
        taken.append(batch)
        first = next((t for t in batch if isinstance(t, torch.Tensor)), None)
        rows += first.shape[:2].numel() if first is not None and first.dim() >= 2 else 1
    return taken

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
