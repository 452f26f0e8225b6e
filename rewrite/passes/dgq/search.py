"""The two-phase scale search (DGQ §3.2), on the output error ‖(W − Ŵ)·xᵀ‖² = d·G·dᵀ, G = xᵀx.

Phase one, per (row, group): 20 clip ratios r (1.01 → 0.80) of an asymmetric grid s = r·(max − min)/15,
z = round(−r·min/s), keeping each group's lowest partial output error (G's diagonal group blocks).
Phase two, per row: 80 ratios (1.01 → 0.20) of the row's peak for s1 = r·peak/127, with S = round(s/s1),
keeping the row's lowest output error. search=off is round to nearest in the same format. Then (feedback)
the codes are rounded again on that grid with GPTQ's error feedback (`feedback`).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from rewrite.passes.dgq.feedback import gram, with_feedback_all
from rewrite.passes.dgq.format import DGQWeights

GROUP_RATIOS = [1.02 - 0.22 * (i + 1) / 20 for i in range(20)]
CHANNEL_RATIOS = [1.02 - 0.82 * (i + 1) / 80 for i in range(80)]
ROW_ELEMENTS = 2 ** 22  # weights quantized at once (a row chunk): each temporary stays ≤ 32 MB
# Phase two: a row's search stops after this many ratios without a better one. On SmolLM2's gate, down and
# q projections (4 and 5 bits) the best ratio was never past the 32nd of 80, and patience 24 found the same
# total error to 4e-5 in ~30 ratios a row; MiniLM's 1536-wide output layer, fit on 376 tokens, needed 40
# (24: +0.17%, 40: +4e-5).
PATIENCE = 40
# With error feedback after the search, the grid need only be near the best: feedback re-rounds every code.
# Patience 8 there ended with the same or lower output error than 24 on those layers (gate 6903 vs 6913,
# down 5832 vs 5835, q 11,260 vs 11,320), in half the time.
FEEDBACK_PATIENCE = 8
# The search's arithmetic: weights, candidate codes and the errors d·G·dᵀ (G itself is summed in float64).
# float32 halves the time of float64; the tests check that the choices are float64's.
ERROR_DTYPE = torch.float32


def quantize_weight(w: torch.Tensor, x: torch.Tensor | LayerInputs | None, group: int, search: bool,
                    feedback: bool = False, bits: int = 4, patience: int | None = PATIENCE) -> DGQWeights:
    """Both phases for one Linear weight (O, K), with calibration inputs x (T, K) (None: weight error; a
    `LayerInputs` to share what is derived from them with the other layers that read them);
    feedback: the codes are then rounded again on that grid with GPTQ's error feedback, and the grid is
    searched on G's diagonal (`DiagonalError`). bits: the code width (4 in A8W4; wider codes, as mixed
    precision uses, fit the same int8 GEMM: S·(q − z) ≤ 127). patience: phase two's early stop per row
    (`PATIENCE`; None searches every ratio, the reference)."""
    return quantize_layers([w], x, group, search, feedback, (bits,), patience)[0][0]


def quantize_layers(weights: list[torch.Tensor], x: torch.Tensor | LayerInputs | None, group: int, search: bool,
                    feedback: bool, widths: tuple[int, ...], patience: int | None = PATIENCE
                    ) -> list[list[DGQWeights]]:
    """`quantize_weight` for several weights that read the same inputs (q/k/v, gate/up), each at several code
    widths (mixed precision's 4-bit layer and its wider candidate): per weight, one result per width. The
    error feedback of all of them runs as one column loop."""
    k = weights[0].shape[1]
    pad = -k % group  # K not a multiple of the group: zero columns (their inputs are zero: no output error)
    inputs = x if isinstance(x, LayerInputs) or x is None else LayerInputs(x)
    fed = feedback and inputs is not None
    error = inputs.error(k + pad, diagonal=fed) if inputs else OutputError(None, k + pad)
    grids = [[_searched(w, error, group, search, bits, patience) for bits in widths] for w in weights]
    if not fed:
        return grids
    flat = with_feedback_all([w for w in weights for _ in widths], inputs.x, [g for per in grids for g in per],
                             hessian=inputs.gram(k + pad))
    return [flat[i:i + len(widths)] for i in range(0, len(flat), len(widths))]


def _searched(w: torch.Tensor, error: Criterion, group: int, search: bool, bits: int, patience: int | None
              ) -> DGQWeights:
    """Both phases for one weight, in chunks of rows (rows are independent: chunks bound the temporaries)."""
    o, k = w.shape
    pad = -k % group
    rows = max(1, ROW_ELEMENTS // (k + pad))
    parts = [_quantize_rows(nn.functional.pad(w[i:i + rows].to(ERROR_DTYPE), (0, pad)), error, group, search, k, bits,
                            patience) for i in range(0, o, rows)]
    return DGQWeights(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "z", "S", "s1")), group, k, bits)


class LayerInputs:
    """A layer's calibration inputs x (T, K) and what the search derives from them (G = xᵀx for the errors and
    feedback's Hessian), each computed once: the layers that read the same activations
    (q/k/v, gate/up) and the wider candidates of mixed precision share them."""

    def __init__(self, x: torch.Tensor):
        self.x, self._errors, self._grams = x, {}, {}

    def same(self, x: torch.Tensor) -> bool:
        return x.shape == self.x.shape and torch.equal(x, self.x)

    def error(self, width: int, diagonal: bool = False) -> Criterion:
        if (width, diagonal) not in self._errors:
            self._errors[width, diagonal] = (DiagonalError(self.gram(width).diagonal()) if diagonal else
                                             OutputError(self.x, width))
        return self._errors[width, diagonal]

    def gram(self, width: int) -> torch.Tensor:
        """xᵀx in float32 (feedback's Hessian; its diagonal weighs the grid search before feedback)."""
        if width not in self._grams:
            self._grams[width] = gram(self.x, width)
        return self._grams[width]


def _quantize_rows(w: torch.Tensor, error: Criterion, group: int, search: bool, k: int, bits: int,
                   patience: int | None) -> DGQWeights:
    s_fine, z = _phase_one(w.reshape(w.shape[0], -1, group), error, group, search, 2 ** bits - 1)
    return _phase_two(w, error, s_fine, z, group, search, k, bits, patience)

class Criterion(Protocol):
    """What the grid search minimizes for weight changes d (`OutputError`, `DiagonalError`). `groups` and
    `grouped_rows` get the search's scratch and may overwrite d."""

    def groups(self, d: torch.Tensor) -> torch.Tensor: ...  # d (o, groups, group) → each (row, group)'s error

    def rows(self, d: torch.Tensor) -> torch.Tensor: ...  # d (o, K) → each row's error, float64

    def grouped_rows(self, d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...  # rows of d·diag(scale)


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
        """G's diagonal (group × group) blocks (phase one's per-group errors); computed once."""
        if getattr(self, "_blocks", None) is None:
            width = self.x.shape[1] if self.x is not None else self.gram.shape[0]
            if self.x is None:
                self._blocks = torch.eye(group, dtype=ERROR_DTYPE).expand(width // group, group, group)
            elif not self.by_inputs:  # G's own diagonal blocks
                self._blocks = torch.stack([self.gram[i:i + group, i:i + group] for i in range(0, width, group)])
            else:
                xg = self.x.reshape(self.x.shape[0], width // group, group).transpose(0, 1)
                self._blocks = (xg.transpose(1, 2) @ xg).to(ERROR_DTYPE)
        return self._blocks

    def groups(self, d: torch.Tensor) -> torch.Tensor:
        """Each (row, group)'s error within its group, d (o, groups, group) → (o, groups)."""
        return torch.einsum("ogi,gij,ogj->og", d, self.blocks(d.shape[-1]), d)

    def grouped_rows(self, d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Each row's error of d·diag(scale per group) (scale (o, groups), one factor per group's columns)."""
        return self.rows(d * scale.sqrt().repeat_interleave(d.shape[1] // scale.shape[1], 1))

    def rows(self, d: torch.Tensor) -> torch.Tensor:
        """Each row's error d_o·G·d_oᵀ, as float64."""
        d = d.to(ERROR_DTYPE)
        if self.by_inputs:
            return (d @ self.xt).square().sum(1).double()
        return ((d @ self.gram) * d).sum(1).double()

class DiagonalError:
    """The output error through G's diagonal only, Σ_k G_kk·d_k²: the grid search's criterion when error
    feedback follows. Feedback rounds every code again and pushes each rounding error through the full
    inverse Hessian, so the grid need only weigh each weight by how much its input carries. The full d·G·dᵀ
    judges codes that feedback then replaces. On SmolLM2 layers (blocks 3 and 15: q, o, gate, down; 4 and 5
    bits) this grid gave, after feedback, a lower output error than the full search in 13 of 16 cases, on
    the fit tokens and on other text alike (the worst: +2.2% on the fit tokens, +0.3% on other text),
    with O·K work per candidate instead of O·K²."""

    def __init__(self, weights: torch.Tensor):
        """weights: G's diagonal, Σ_t x_tk² per input channel (zero-padded to the search's width)."""
        self.weights = weights.to(ERROR_DTYPE).contiguous()

    def groups(self, d: torch.Tensor) -> torch.Tensor:
        return d.square_().mul_(self.weights.reshape(d.shape[1], d.shape[2])).sum(-1)  # in d: no 45 MB temporaries

    def rows(self, d: torch.Tensor) -> torch.Tensor:
        return torch.mv(d.to(ERROR_DTYPE).square(), self.weights).double()

    def grouped_rows(self, d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (self.groups(d.reshape(*scale.shape, -1)) * scale).sum(1).double()


def _phase_one(wg: torch.Tensor, error: Criterion, group: int, search: bool, top: int):
    """Per (row, group): asymmetric scale and zero point (codes 0..top) minimizing the group's output error."""
    o, n_groups, _ = wg.shape
    lo, hi = wg.amin(-1), wg.amax(-1)
    best = torch.full((o, n_groups), float("inf"), dtype=torch.float64)
    best_s, best_z = torch.ones_like(lo), torch.zeros_like(lo)
    u, rounded = torch.empty_like(wg), torch.empty_like(wg)  # scratch
    for r in (GROUP_RATIOS if search else [1.0]):
        s = ((hi - lo) * r / top).clamp_min(1e-12)
        z = torch.round(-lo * r / s).clamp(0, top)
        torch.div(wg, s[..., None], out=u)  # w − s·(q − z) = s·(u − clamp(round(u), −z, top − z)): fewer passes
        residual = u.sub_(_clamped(torch.round(u, out=rounded), -z[..., None], (top - z)[..., None]))
        err = error.groups(residual) * s.square()
        better = err < best
        best, best_s = torch.where(better, err, best), torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z

def _phase_two(w: torch.Tensor, error: Criterion, s_fine: torch.Tensor, z: torch.Tensor, group: int, search: bool,
               k: int, bits: int, patience: int | None = PATIENCE):
    """Per row: the fp scale s1 (and integer group scales S = round(s'/s1)) minimizing the row's output error.
    `k`: the layer's true in_features (w may carry zero columns up to a whole group). A row stops being
    searched once `patience` ratios in a row found nothing better (None: all ratios, the reference)."""
    o = w.shape[0]
    peak = w.abs().amax(1).clamp_min(1e-12)
    best = torch.full((o,), float("inf"), dtype=torch.float64)
    since_best = torch.zeros(o, dtype=torch.long)
    best_bound = peak.clone()
    rows = torch.arange(o)  # the rows still searched
    grouped = (o, w.shape[1] // group, group)
    scratch = (w.new_empty(grouped), w.new_empty(grouped))
    for r in (CHANNEL_RATIOS if search else [1.0]):
        every = len(rows) == o
        part = (w, s_fine, z, peak) if every else (w[rows], s_fine[rows], z[rows], peak[rows])
        err = _row_candidates(part[0], error, part[1], part[2], part[3] * r, group, bits, scratch)[3]
        better = err < best[rows]
        won = rows[better]
        best[won], best_bound[won] = err[better], part[3][better] * r
        since_best[rows] = torch.where(better, 0, since_best[rows] + 1)
        if patience is not None:
            rows = rows[since_best[rows] < patience]
            if not len(rows):
                break
    q, S, s1, _ = _row_candidates(w, None, s_fine, z, best_bound, group, bits, scratch)  # the codes at each row's best
    return DGQWeights(q.to(torch.uint8), z.to(torch.uint8), S.to(torch.uint8), s1.float(), group, k, bits)


def _row_candidates(w: torch.Tensor, error: Criterion, s_fine: torch.Tensor, z: torch.Tensor, bound: torch.Tensor,
                    group: int, bits: int, scratch: tuple[torch.Tensor, torch.Tensor]):
    """Codes, group scales, row scales and row errors of rows w (n, K) clipped at ±bound (n,). `scratch`: two
    buffers of at least n rows of w's groups, reused by every ratio: a fresh 45 MB tensor (a 7B FFN's rows) is
    page-faulted in each time, which took more of the search than its arithmetic (2.8x faster reused)."""
    n = w.shape[0]
    wg, zg = w.reshape(n, -1, group), z[..., None]  # per-group values broadcast over the group's columns
    s1 = bound / 127
    S = torch.clamp(torch.round(s_fine / s1[:, None]), 1, 127)
    limit = torch.floor(127 / S)
    lo, hi = (z - limit).clamp_min(0)[..., None], (z + limit).clamp_max(2 ** bits - 1)[..., None]
    step = (S * s1[:, None])[..., None]
    # Clipping w at ±bound needs no pass of its own: bound/step = 127/S, and the code range already keeps
    # |q − z| ≤ ⌊127/S⌋.
    u = torch.div(wg, step, out=scratch[0][:n])
    codes = _clamped(torch.round(u, out=scratch[1][:n]), lo - zg, hi - zg)  # q − z
    if error is None:
        return codes.add_(zg).reshape(n, -1).clone(), S, s1, None
    # w − step·(q − z) = step·(u − (q − z)): the row error from per-group sums scaled by step²
    err = error.grouped_rows(u.sub_(codes).reshape(n, -1), step[..., 0].square())
    return None, S, s1, err


def _clamped(t: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """t clamped in place to broadcast bounds (maximum/minimum: several times faster than clamp_ with tensor
    bounds on CPU)."""
    return torch.minimum(torch.maximum(t, low, out=t), high, out=t)
