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


def with_feedback(w: torch.Tensor, x: torch.Tensor, grid: DGQWeights, block: int = 128) -> DGQWeights:
    """The codes rounded column by column on the searched grid (z, S, s1 fixed), each column's rounding
    error pushed onto the columns not yet rounded through the inverse Hessian of the layer's output error
    (H = xᵀx): GPTQ (Frantar et al., arXiv:2210.17323), which DGQ's own code offers as a weight function.
    Lazy batch updates: columns in blocks, the rest of the matrix updated once per block."""
    k_padded = grid.q.shape[1]
    weight = nn.functional.pad(w.float(), (0, k_padded - w.shape[1]))
    inputs = nn.functional.pad(x.float(), (0, k_padded - x.shape[1]))
    hessian = inputs.T @ inputs
    dead = hessian.diagonal() == 0  # padding or channels that are always zero: nothing to fit there
    hessian[dead, dead], weight[:, dead] = 1.0, 0.0
    hessian += FEEDBACK_DAMP * hessian.diagonal().mean() * torch.eye(k_padded)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    scale = expand(grid.S.float(), grid.group) * grid.s1[:, None]
    zero = expand(grid.z.float(), grid.group)
    limit = torch.floor(127 / expand(grid.S.float(), grid.group))
    lo, hi = (zero - limit).clamp_min(0), (zero + limit).clamp_max(2 ** grid.bits - 1)
    codes = torch.empty_like(weight)
    for start in range(0, k_padded, block):
        end = min(start + block, k_padded)
        part, errors = weight[:, start:end].clone(), torch.empty(weight.shape[0], end - start)
        for j in range(end - start):
            c = start + j
            q = torch.minimum(torch.maximum(torch.round(part[:, j] / scale[:, c]) + zero[:, c], lo[:, c]), hi[:, c])
            codes[:, c] = q
            errors[:, j] = (part[:, j] - (q - zero[:, c]) * scale[:, c]) / upper[c, c]
            part[:, j:] -= errors[:, j:j + 1] * upper[c, start + j:end][None]
        weight[:, end:] -= errors @ upper[start:end, end:]
    return DGQWeights(codes.to(torch.uint8), grid.z, grid.S, grid.s1, grid.group, grid.k, grid.bits)
