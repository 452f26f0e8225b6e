"""Error feedback: the codes rounded again on the searched grid, column by column, each column's rounding
error e_c pushed onto the columns not yet rounded through the inverse Hessian of the layer's output error:
W[:, c+1:] −= e_c·U[c, c+1:] / U[c, c], with Uᵀ·U = H⁻¹ and H = xᵀx + λ·mean(diag H)·I.

GPTQ (Frantar et al., arXiv:2210.17323, Alg. 1 with lazy batch updates), which DGQ's own code (ilur98/DGQ)
offers as a weight function.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.passes.dgq.format import DGQWeights, expand

# Feedback's damping, as a fraction of the Hessian's mean diagonal. GPTQ's 0.01 assumes thousands of tokens;
# MiniLM calibrated on 340 tokens (K up to 1536: a rank-deficient xᵀx) overfits with it: held-out embedding
# cosine 0.9758 at 0.01, 0.9801 at 0.03, 0.9811 at 0.1, 0.9810 at 0.3, 0.9795 at 1.0.
FEEDBACK_DAMP = 0.1


def with_feedback(w: torch.Tensor, x: torch.Tensor, grid: DGQWeights, block: int = 128,
                  upper: torch.Tensor | None = None) -> DGQWeights:
    """The codes rounded column by column on the searched grid (z, S, s1 fixed), each column's rounding
    error pushed onto the columns not yet rounded through the inverse Hessian of the layer's output error
    (H = xᵀx): GPTQ (Frantar et al., arXiv:2210.17323), which DGQ's own code offers as a weight function.
    Lazy batch updates: columns in blocks, the rest of the matrix updated once per block. Columns are
    rows here (the weight transposed), so each step reads contiguous memory. upper: `inverse_factor(x)`
    when the caller has it (layers that share their inputs share it)."""
    k_padded = grid.q.shape[1]
    weight = nn.functional.pad(w.float(), (0, k_padded - w.shape[1])).t().contiguous()  # (K, O)
    upper = inverse_factor(x, k_padded) if upper is None else upper
    weight[_dead_columns(x, k_padded)] = 0.0  # padding or channels that are always zero: nothing to fit
    scale = (expand(grid.S.float(), grid.group) * grid.s1[:, None]).t().contiguous()
    zero = expand(grid.z.float(), grid.group).t().contiguous()
    limit = torch.floor(127 / expand(grid.S.float(), grid.group)).t()
    lo, hi = (zero - limit).clamp_min(0), (zero + limit).clamp_max(2 ** grid.bits - 1)
    codes = torch.empty_like(weight)
    for start in range(0, k_padded, block):
        end = min(start + block, k_padded)
        part, errors = weight[start:end].clone(), torch.empty(end - start, weight.shape[1])
        for j in range(end - start):
            c = start + j
            q = torch.round(part[j] / scale[c]).add_(zero[c]).clamp_(min=lo[c], max=hi[c])
            codes[c] = q
            errors[j] = (part[j] - (q - zero[c]) * scale[c]) / upper[c, c]
            part[j:].addr_(upper[c, c:end], errors[j], alpha=-1)
        weight[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1)
    return DGQWeights(codes.t().to(torch.uint8), grid.z, grid.S, grid.s1, grid.group, grid.k, grid.bits)


def inverse_factor(x: torch.Tensor, width: int) -> torch.Tensor:
    """U with Uᵀ·U = H⁻¹, H = xᵀx + λ·mean(diag H)·I (x zero-padded to `width` columns; dead columns get a
    unit diagonal)."""
    inputs = nn.functional.pad(x.float(), (0, width - x.shape[1]))
    hessian = inputs.T @ inputs
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    hessian += FEEDBACK_DAMP * hessian.diagonal().mean() * torch.eye(width)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)


def _dead_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    return nn.functional.pad(x.float().square().sum(0), (0, width - x.shape[1])) == 0
