"""The two-phase scale search (DGQ §3.2), on the output error ‖(W − Ŵ)·xᵀ‖² = d·G·dᵀ, G = xᵀx.

Phase one, per (row, group): 20 clip ratios r (1.01 → 0.80) of an asymmetric grid s = r·(max − min)/15,
z = round(−r·min/s), keeping each group's lowest partial output error (G's diagonal group blocks).
Phase two, per row: 80 ratios (1.01 → 0.20) of the row's peak for s1 = r·peak/127, with S = round(s/s1),
keeping the row's lowest output error. search=off is round to nearest in the same format. Then (feedback)
the codes are rounded again on that grid with GPTQ's error feedback (`feedback`).
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.passes.dgq.feedback import with_feedback
from rewrite.passes.dgq.format import DGQWeights

GROUP_RATIOS = [1.02 - 0.22 * (i + 1) / 20 for i in range(20)]
CHANNEL_RATIOS = [1.02 - 0.82 * (i + 1) / 80 for i in range(80)]
ROW_ELEMENTS = 2 ** 22  # weights quantized at once (a row chunk): each float64 temporary stays ≤ 32 MB
ERROR_DTYPE = torch.float32  # phase two's row errors d·G·dᵀ (choices checked against float64 in the tests)


def quantize_weight(w: torch.Tensor, x: torch.Tensor | None, group: int, search: bool,
                    feedback: bool = False, bits: int = 4) -> DGQWeights:
    """Both phases for one Linear weight (O, K), with calibration inputs x (T, K) (None: weight error);
    feedback: the codes are then rounded again on that grid with GPTQ's error feedback. bits: the code
    width (4 in A8W4; wider codes, as mixed precision uses, fit the same int8 GEMM: S·(q − z) ≤ 127)."""
    o, k = w.shape
    pad = -k % group  # K not a multiple of the group: zero columns (their inputs are zero: no output error)
    error = OutputError(x, k + pad)
    rows = max(1, ROW_ELEMENTS // (k + pad))  # rows are independent: chunks bound the float64 temporaries
    parts = [_quantize_rows(nn.functional.pad(w[i:i + rows].double(), (0, pad)), error, group, search, k, bits)
             for i in range(0, o, rows)]
    found = DGQWeights(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "z", "S", "s1")), group, k, bits)
    return with_feedback(w, x, found) if feedback and x is not None else found

def _quantize_rows(w: torch.Tensor, error: "OutputError", group: int, search: bool, k: int, bits: int) -> DGQWeights:
    s_fine, z = _phase_one(w.reshape(w.shape[0], -1, group), error, group, search, 2 ** bits - 1)
    return _phase_two(w, error, s_fine, z, group, search, k, bits)

class OutputError:
    """The output error d·G·dᵀ of weight-row changes d, G = xᵀx from calibration inputs x (T, K) (identity
    without them): through G when K ≤ T, else as ‖d·xᵀ‖² (cheaper when T < K, and no K×K matrix: a
    7B model's 11008-wide layers)."""

    def __init__(self, x: torch.Tensor | None, width: int):
        if x is not None and x.shape[1] < width:
            x = nn.functional.pad(x, (0, width - x.shape[1]))
        self.x = x.double() if x is not None else None
        self.by_inputs = x is not None and x.shape[0] < width
        if not self.by_inputs:
            gram = self.x.T @ self.x if x is not None else torch.eye(width, dtype=torch.float64)
            self.gram = gram.to(ERROR_DTYPE)  # the K×K products dominate the search: float32 halves their cost
        else:
            self.xt = self.x.T.to(ERROR_DTYPE).contiguous()

    def blocks(self, group: int) -> torch.Tensor:
        """G's diagonal (group × group) blocks, in float64 (phase one's per-group errors); computed once."""
        if getattr(self, "_blocks", None) is None:
            width = self.x.shape[1] if self.x is not None else self.gram.shape[0]
            if self.x is None:
                self._blocks = torch.eye(group, dtype=torch.float64).expand(width // group, group, group)
            else:
                xg = self.x.reshape(self.x.shape[0], width // group, group).transpose(0, 1)
                self._blocks = xg.transpose(1, 2) @ xg
        return self._blocks

    def rows(self, d: torch.Tensor) -> torch.Tensor:
        """Each row's error d_o·G·d_oᵀ, as float64."""
        d = d.to(ERROR_DTYPE)
        if self.by_inputs:
            return (d @ self.xt).square().sum(1).double()
        return ((d @ self.gram) * d).sum(1).double()

def _phase_one(wg: torch.Tensor, error: OutputError, group: int, search: bool, top: int):
    """Per (row, group): asymmetric scale and zero point (codes 0..top) minimizing the group's output error."""
    o, n_groups, _ = wg.shape
    blocks = error.blocks(group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    best = torch.full((o, n_groups), float("inf"), dtype=torch.float64)
    best_s, best_z = torch.ones_like(best), torch.zeros_like(best)
    for r in (GROUP_RATIOS if search else [1.0]):
        s = ((hi - lo) * r / top).clamp_min(1e-12)
        z = torch.round(-lo * r / s).clamp(0, top)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, top)
        d = wg - (q - z[..., None]) * s[..., None]
        err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        better = err < best
        best, best_s, best_z = torch.where(better, err, best), torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z

def _phase_two(w: torch.Tensor, error: OutputError, s_fine: torch.Tensor, z: torch.Tensor, group: int, search: bool,
               k: int, bits: int):
    """Per row: the fp scale s1 (and integer group scales S = round(s'/s1)) minimizing the row's output error.
    `k`: the layer's true in_features (w may carry zero columns up to a whole group)."""
    o = w.shape[0]
    wg = w.reshape(o, -1, group)  # per-group values broadcast over the group's columns (no expanded copies)
    zg = z[..., None]
    peak = w.abs().amax(1).clamp_min(1e-12)
    best = torch.full((o,), float("inf"), dtype=torch.float64)
    result = None
    for r in (CHANNEL_RATIOS if search else [1.0]):
        bound = (r * peak)[:, None, None]
        s1 = r * peak / 127
        S = torch.clamp(torch.round(s_fine / s1[:, None]), 1, 127)
        limit = torch.floor(127 / S)
        lo, hi = (z - limit).clamp_min(0)[..., None], (z + limit).clamp_max(2 ** bits - 1)[..., None]
        q = torch.round(torch.maximum(torch.minimum(wg, bound), -bound) / (S * s1[:, None])[..., None]) + zg
        q = torch.minimum(torch.maximum(q, lo), hi)
        err = error.rows((wg - (s1[:, None] * S)[..., None] * (q - zg)).reshape(o, -1))
        better = err < best
        best = torch.where(better, err, best)
        if result is None:
            result = [q.clone(), S.clone(), s1.clone()]
        result[0][better], result[1][better], result[2][better] = q[better], S[better], s1[better]
    q, S, s1 = result
    q = q.reshape(o, -1)
    return DGQWeights(q.to(torch.uint8), z.to(torch.uint8), S.to(torch.uint8), s1.float(), group, k, bits)
