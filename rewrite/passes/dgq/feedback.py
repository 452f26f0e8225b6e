"""Error feedback: the codes rounded again on the searched grid, column by column, each column's rounding
error e_c pushed onto the columns not yet rounded through the inverse Hessian of the layer's output error:
W[:, c+1:] −= e_c·U[c, c+1:] / U[c, c], with Uᵀ·U = H⁻¹ and H = xᵀx + λ·mean(diag H)·I, the columns taken
in decreasing order of their expected rounding cost H_cc·mean(Δ_c²) (Δ: the grid's step; on a uniform grid
GPTQ's act-order). The grid is fixed per group beforehand, so the order changes which errors are taken up,
not the format.

GPTQ (Frantar et al., arXiv:2210.17323, Alg. 1 with lazy batch updates; act-order from its reference code),
which DGQ's own code (ilur98/DGQ) offers as a weight function. The order lowered the output error on unseen
tokens by 6% on 12 SmolLM2 layers and by 10% on 3 MiniLM layers, at 4 and 5 bits, against the natural order.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.passes.dgq.format import DGQWeights

# Feedback's damping, as a fraction of the Hessian's mean diagonal. GPTQ's 0.01 assumes thousands of tokens;
# MiniLM calibrated on 340 tokens (K up to 1536: a rank-deficient xᵀx) overfits with it: held-out embedding
# cosine 0.9758 at 0.01, 0.9801 at 0.03, 0.9811 at 0.1, 0.9810 at 0.3, 0.9795 at 1.0.
FEEDBACK_DAMP = 0.1


def with_feedback(w: torch.Tensor, x: torch.Tensor, grid: DGQWeights, hessian: torch.Tensor | None = None
                  ) -> DGQWeights:
    """The codes rounded column by column on the searched grid (z, S, s1 fixed), each column's rounding
    error pushed onto the columns not yet rounded through the inverse Hessian of the layer's output error
    (H = xᵀx): GPTQ (Frantar et al., arXiv:2210.17323), which DGQ's own code offers as a weight function.
    hessian: `gram(x)` when the caller has it (layers that share their inputs share it)."""
    return with_feedback_all([w], x, [grid], hessian)[0]


def with_feedback_all(weights: list[torch.Tensor], x: torch.Tensor, grids: list[DGQWeights],
                      hessian: torch.Tensor | None = None) -> list[DGQWeights]:
    """`with_feedback` for several weights that read the same inputs x (a layer's 4- and 5-bit candidates,
    q/k/v), side by side as one matrix: the rows are independent given H, so this is each alone, with one
    column loop for all. Columns are rows here (the weights transposed), so each step reads contiguous
    memory; lazy batch updates in two levels (GPTQ's blocks of 128, rank-1 steps only within 16)."""
    k_padded = grids[0].q.shape[1]
    grid = _Grids(grids)
    hessian = gram(x, k_padded) if hessian is None else hessian
    order, upper = ordered_factor(hessian, grid.mean_square_step())
    weight = torch.cat([nn.functional.pad(w.float(), (0, k_padded - w.shape[1])) for w in weights]).t()
    dead = hessian.diagonal() == 0
    if dead.any():
        weight[dead] = 0.0  # padding or channels that are always zero (Σ x² = 0): nothing to fit
    weight = weight[order].contiguous()
    codes = torch.empty_like(weight)
    for start in range(0, k_padded, BLOCK):
        end = min(start + BLOCK, k_padded)
        columns = grid.columns(order[start:end])
        errors = _round_block(weight, upper, columns, codes, start, end)  # not yet scaled by 1/U[c, c]
        scaled = upper[start:end, end:] / upper.diagonal()[start:end, None]
        weight[end:].addmm_(scaled.t(), errors, alpha=-1)
    codes[order] = codes.clone()
    rows = codes.t().to(torch.uint8).split([g.q.shape[0] for g in grids])
    return [DGQWeights(q.contiguous(), g.z, g.S, g.s1, g.group, g.k, g.bits) for q, g in zip(rows, grids)]


BLOCK, STEP = 128, 16  # GPTQ's lazy-update block; rank-1 updates only within a step of 16 columns


def _round_block(weight, upper, grid, codes, start: int, end: int) -> torch.Tensor:
    """Columns [start, end) rounded in order on `grid` (the block's scale, zero, lo, hi per column), each column's
    error scaled by 1/U[c, c] and pushed onto the block's later columns: rank-1 within a step of STEP columns,
    one GEMM per step. Returns the block's rounding errors."""
    part, errors = weight[start:end], torch.empty(end - start, weight.shape[1])
    scaled = upper[start:end, start:end] / upper.diagonal()[start:end, None]  # rows scaled by 1/U[c, c]
    scale, zero, lo, hi = grid
    offsets = codes[start:end]  # q − z here; z is added once per block
    # Each column's rows as views taken at once: a step is a handful of vector ops, and indexing a tensor
    # per op would cost as much as the op.
    rows, scales, lows, highs, outs, errs, uppers = (t.unbind(0) for t in (
        part, scale, lo - zero, hi - zero, offsets, errors, scaled))
    for first in range(0, end - start, STEP):
        last = min(first + STEP, end - start)
        for j in range(first, last):
            q = torch.div(rows[j], scales[j], out=outs[j]).round_()
            torch.clamp(q, lows[j], highs[j], out=q)  # one op, not maximum then minimum: 7.4 → 4.1 µs a column
            torch.addcmul(rows[j], q, scales[j], value=-1, out=errs[j])
            part[j + 1:last].addr_(uppers[j][j + 1:last], errs[j], alpha=-1)
        part[last:].addmm_(scaled[first:last, last:].t(), errors[first:last], alpha=-1)
    offsets += zero
    return errors


class _Grids:
    """The grids of the weights side by side (rows), per group: scale S·s1, zero z and the code range [lo, hi]
    that keeps S·(q − z) within int8. A block's columns are expanded when it is rounded: four (K, O) copies
    of a 7B down_proj's two candidates took 1.4 GB and 3.5 s to make and reorder."""

    def __init__(self, grids: list[DGQWeights]):
        self.group = grids[0].group
        scale = torch.cat([g.S.float() * g.s1[:, None] for g in grids])
        zero = torch.cat([g.z.float() for g in grids])
        limit = torch.floor(127 / torch.cat([g.S.float() for g in grids]))
        top = torch.cat([torch.full((g.z.shape[0], 1), 2.0 ** g.bits - 1) for g in grids])
        lo, hi = (zero - limit).clamp_min(0), torch.minimum(zero + limit, top)
        # Held per group (groups, O): a block's columns are then whole rows to gather, 35x faster than
        # gathering columns of (O, groups) and transposing them (3 of SmolLM2's 50 s search).
        self.scale, self.zero, self.lo, self.hi = (t.t().contiguous() for t in (scale, zero, lo, hi))

    def columns(self, columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scale, zero, lo, hi) of these columns, each (len(columns), O)."""
        groups = columns // self.group
        return tuple(t.index_select(0, groups) for t in (self.scale, self.zero, self.lo, self.hi))

    def mean_square_step(self) -> torch.Tensor:
        """Each column's squared step S·s1 averaged over the rows, (K,)."""
        return self.scale.square().mean(1).repeat_interleave(self.group)


def ordered_factor(hessian: torch.Tensor, mean_square_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The column order of feedback and the inverse factor of H in that order: the columns whose rounding
    is expected to cost most first (H_cc times the mean squared grid step of column c), so their errors are
    made while the most columns are left to take them up. On a uniform grid this is GPTQ's act-order
    (largest xᵀx diagonal first); where a group's grid is coarse (a few large weights set its scale), it
    also puts the finer columns, which can absorb errors, last."""
    cost = hessian.diagonal() * mean_square_step
    order = torch.argsort(cost, descending=True, stable=True)
    return order, inverse_factor(hessian[order][:, order])


def inverse_factor(hessian: torch.Tensor) -> torch.Tensor:
    """U with Uᵀ·U = H⁻¹ for H = xᵀx + λ·mean(diag H)·I (dead columns get a unit diagonal)."""
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    hessian += FEEDBACK_DAMP * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    # With J the reversal and J·H·J = L·Lᵀ: H⁻¹ = (J·L⁻¹·J)ᵀ·(J·L⁻¹·J), and J·L⁻¹·J is upper triangular with a
    # positive diagonal, so it is U. One Cholesky and one triangular inverse instead of GPTQ's Cholesky, inverse
    # and second Cholesky: 25% faster at K = 1536, the same U to 2e-7.
    return lower_inverse(torch.linalg.cholesky(hessian.flip(0, 1))).flip(0, 1)


INVERSE_BLOCK = 128  # below this, a triangular solve against I; above, two half-size inverses and two GEMMs


def lower_inverse(low: torch.Tensor) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L, by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]]. torch has no
    triangular inverse (LAPACK's trtri), and a solve against I does three times its work: at K = 1536 this
    took 15 ms where the solve took 35 (2 threads), equal to 1e-9."""
    n = low.shape[0]
    if n <= INVERSE_BLOCK:
        return torch.linalg.solve_triangular(low, torch.eye(n, dtype=low.dtype), upper=False)
    half = n // 2
    first, second = lower_inverse(low[:half, :half]), lower_inverse(low[half:, half:])
    inverse = torch.zeros_like(low)
    inverse[:half, :half], inverse[half:, half:] = first, second
    inverse[half:, :half] = -(second @ low[half:, :half]) @ first
    return inverse


GRAM_BLOCKS = 8  # xᵀx is symmetric: block rows of its upper triangle, 36 of 64 blocks' work (1.5x faster at K=1536)


def gram(x: torch.Tensor, width: int) -> torch.Tensor:
    """xᵀx in float32, x zero-padded to `width` columns. torch has no symmetric rank-k update (syrk), so the
    upper triangle is made a block row at a time and mirrored: SmolLM2's Hessians took 4.9 of the search's
    25 s as one GEMM each."""
    inputs = x.float() if width == x.shape[1] else nn.functional.pad(x.float(), (0, width - x.shape[1]))
    rows, step = inputs.t(), -(-width // GRAM_BLOCKS)
    hessian = torch.empty(width, width)
    for i in range(0, width, step):
        hessian[i:i + step, i:] = rows[i:i + step] @ inputs[:, i:]
        hessian[i + step:, i:i + step] = hessian[i:i + step, i + step:].t()
    return hessian

