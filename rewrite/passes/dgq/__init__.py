"""W x + b → s_x·s1[o]·Σ_k x_q[k]·S[o,G(k)]·(q[o,k] − z[o,G(k)]) + b: Dual-Grained Quantization, A8W4.

uint4 codes q with a zero point z per (row, group of 128 along K), an integer group scale S ∈ 1..127,
and one fp scale s1 per output channel, so that W_s8 = S·(q − z) ∈ [−127, 127] (the clamp of q to
z ± ⌊127/S⌋ makes overflow impossible) and the matmul is one int8 GEMM over all of K with an fp
epilogue. Activations: int8 symmetric, static per-tensor (calibrated) or dynamic per-token; first
(smooth=true, the default) input channels above the top 0.5% of a Linear's input peaks are divided out
where the input is made (a norm's weight, `up`'s rows) and multiplied into the consuming columns, x·W =
(x/s)·(s·W), exact in float (DGQ §3.3).
Two-phase search: per group, 20 clip ratios (1.01 → 0.80) minimizing that group's partial output error
on calibration activations; then per row, 80 ratios (1.01 → 0.20) for s1 minimizing the row's output
error. search=off is the round-to-nearest baseline in the same format. feedback (default) then rounds
the codes again on that grid, column by column, each column's error pushed onto the columns not yet
rounded through the inverse of H = xᵀx (GPTQ, Frantar et al., arXiv:2210.17323; DGQ's code offers it as
a weight function). Layers are quantized one at a time, each calibrated on activations produced by the
already-quantized layers before it.

Paper: Zhang et al., "Dual Grained Quantization: Efficient Fine-Grained Quantization for LLM",
arXiv:2310.04836 (2023); code ilur98/DGQ. Contract: approximate, SQNR ≥ min-sqnr dB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from rewrite import verify
from rewrite.calibration import Suffixes, channel_peaks, sequential_inputs
from rewrite.errors import InvalidValue
from rewrite.recover import split
from rewrite.passes.dgq import kernels, ship
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor
from rewrite.patterns import attribute, layers, set_submodule, shared_weight

GROUP_RATIOS = [1.02 - 0.22 * (i + 1) / 20 for i in range(20)]
CHANNEL_RATIOS = [1.02 - 0.82 * (i + 1) / 80 for i in range(80)]
MAX_TOKENS = 4096  # calibration rows kept per layer for the search
PROBE_TOKENS = 512  # tokens the mixed-precision sensitivity probes run on
ROW_ELEMENTS = 2 ** 22  # weights quantized at once (a row chunk): each float64 temporary stays ≤ 32 MB
# Feedback's damping, as a fraction of the Hessian's mean diagonal. GPTQ's 0.01 assumes thousands of tokens;
# MiniLM calibrated on 340 tokens (K up to 1536: a rank-deficient xᵀx) overfits with it: held-out embedding
# cosine 0.9758 at 0.01, 0.9801 at 0.03, 0.9811 at 0.1, 0.9810 at 0.3, 0.9795 at 1.0.
FEEDBACK_DAMP = 0.1
ERROR_DTYPE = torch.float32  # phase two's row errors d·G·dᵀ (choices checked against float64 in the tests)


@dataclass
class DGQWeights:
    """The canonical artefact: codes q (O, K) in 0..2^bits − 1 (0..15 in A8W4), zeros z and integer scales S
    (O, K/G), s1 (O)."""

    q: torch.Tensor
    z: torch.Tensor
    S: torch.Tensor
    s1: torch.Tensor
    group: int
    k: int  # the layer's in_features; q is zero-padded to a multiple of the group when K is not one
    bits: int = 4

    def w_s8(self) -> torch.Tensor:
        return (_expand(self.S, self.group) * (self.q - _expand(self.z, self.group)))[:, :self.k].to(torch.int8)

    def dequantized(self) -> torch.Tensor:
        return self.s1[:, None] * self.w_s8().float()


def _expand(per_group: torch.Tensor, group: int) -> torch.Tensor:
    return per_group.repeat_interleave(group, dim=1)


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
    return _with_feedback(w, x, found) if feedback and x is not None else found


def _with_feedback(w: torch.Tensor, x: torch.Tensor, grid: DGQWeights, block: int = 128) -> DGQWeights:
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
    scale = _expand(grid.S.float(), grid.group) * grid.s1[:, None]
    zero = _expand(grid.z.float(), grid.group)
    limit = torch.floor(127 / _expand(grid.S.float(), grid.group))
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


class DGQLinear(nn.Module):
    """A8W4 Linear. form="int8": bit-exact DGQ (int8 GEMM); form="w4": 4-bit storage (MatMulNBits in ONNX)."""

    weight_bits = 4  # wider codes (mixed precision's upgrade): 5–7; int8_weights() layers: 8

    def __init__(self, weights: DGQWeights, bias: torch.Tensor | None, s_x: torch.Tensor, form: str):
        super().__init__()
        out = weights.q.shape[0]
        if form == "w4" and weights.bits != 4:
            raise ValueError("form w4 stores 4-bit codes only")
        self.form, self.group, self.in_features, self.weight_bits = form, weights.group, weights.k, weights.bits
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None else torch.zeros(out))
        if form == "int8":
            self._int8_buffers(weights.w_s8(), weights.s1, s_x)
        else:
            self.register_buffer("packed", kernels.pack_nibbles(weights.q.reshape(out, -1, weights.group)))
            self.register_buffer("scales", (weights.S.float() * weights.s1[:, None]).contiguous())
            self.register_buffer("zeros", kernels.pack_nibbles(weights.z))

    @classmethod
    def int8_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None, s_x: torch.Tensor) -> "DGQLinear":
        """W8A8 for the layers mixed precision keeps at 8 bits: per-row symmetric int8 weights (round to
        nearest), the same int8 GEMM and ONNX form."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.form, layer.group, layer.in_features, layer.weight_bits = "int8", None, weight.shape[1], 8
        s1 = (weight.abs().amax(1) / 127).clamp_min(1e-12).float()
        layer.register_buffer("bias", bias.detach().float().clone() if bias is not None else torch.zeros(len(s1)))
        layer._int8_buffers(torch.round(weight / s1[:, None]).clamp(-127, 127).to(torch.int8), s1, s_x)
        return layer

    def _int8_buffers(self, w_s8: torch.Tensor, s1: torch.Tensor, s_x: torch.Tensor) -> None:
        self.register_buffer("w_s8", w_s8)
        self.register_buffer("s1", s1)
        self.register_buffer("s_x", s_x.float().reshape(-1))

    def weight_count(self) -> int:
        return len(self.bias) * self.in_features

    def compressed_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, scheme arguments) of this layer in the compressed-tensors format (`dgq.ship`)."""
        if self.form != "int8":
            raise ValueError("form=w4 layers have no compressed-tensors form here yet: use form=int8")
        tensors, bits, group = ship.encode(self.w_s8, self.s1, self.group)
        return tensors | {"bias": self.bias}, {"bits": bits, "group": group}

    def format_bits(self) -> float:
        """Bits per weight of the format, whatever the storage: 4-bit codes with an int8 scale and a 4-bit zero
        point per group, or int8; plus a float32 scale per row."""
        per_group = (8 + self.weight_bits) / self.group if self.group else 0  # S (int8) and z per group
        return self.weight_bits + per_group + 32 / self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "int8":
            return kernels.a8w8_linear(x, self.w_s8, self.s1, self.bias, self.s_x)
        return kernels.w4_linear(x, self.packed, self.scales, self.zeros, self.bias)

    def stored_bits_per_weight(self) -> float:
        weights = (self.w_s8 if self.form == "int8" else self.packed)
        extra = [t for n, t in self.named_buffers() if n not in ("w_s8", "packed", "bias")]
        count = self.w_s8.numel() if self.form == "int8" else self.packed.numel() * 2
        return 8 * (weights.numel() * weights.element_size() + sum(t.numel() * t.element_size() for t in extra)) / count


@dataclass(frozen=True)
class DualGrainedQuant(SqnrFloor, Pass):
    name = "dgq"
    paper = "Zhang et al., Dual Grained Quantization (A8W4), arXiv:2310.04836"
    summary = "Linears → int4 groups with int8 group scales and int8 activations (int8 GEMM)"
    applies_to = "Linear layers (form=w4: in_features a multiple of the group size)"
    needs_calibration = True
    level = "module"

    group: int = 128
    act: Literal["static", "per-token"] = "per-token"
    search: bool = True
    feedback: bool = True
    form: Literal["int8", "w4"] = "int8"
    smooth: bool = True
    bits: int = 4
    budget_cos: float = 0.99
    max_bits: float = 5.0
    upgrade_bits: int = 5
    min_sqnr: float = 10.0

    def __post_init__(self):
        if self.bits != 4:
            raise InvalidValue(f"bits={self.bits} is not supported: DGQ stores 4-bit weights (bits=4)")
        if not 5 <= self.upgrade_bits <= 8:
            raise InvalidValue(f"upgrade-bits={self.upgrade_bits}: mixed precision widens codes to 5–7 bits (same "
                               "format) or 8 (W8A8, int8 weights); give 5, 6, 7 or 8")
        if self.group <= 0 or self.group % 2:
            raise InvalidValue("group must be a positive even number (128 in the paper)")

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        skipped, smoothed = [], 0
        if self.smooth:
            smoothed, why_not = smooth_outliers(module, ctx.original_calibration or ctx.calibration)
            skipped += why_not
        fit, judge = _fit_and_judge(ctx) if self.budget_cos else (ctx.calibration, None)
        reference = _outputs(module, *judge) if judge else None
        candidates = dict(layers(module, (nn.Linear,)))
        reasons = {path: self._why_not(module, path, linear) for path, linear in candidates.items()}
        skipped += [(path, reason) for path, reason in reasons.items() if reason]
        todo = [path for path, reason in reasons.items() if not reason]
        w4, wide, errors = {}, {}, {}
        for i, (path, inputs) in enumerate(sequential_inputs(module, todo, fit)):
            ctx.step(f"searching scales of {path}", i, len(todo))
            linear, x = candidates.pop(path), _rows(inputs)  # x: through the layers already quantized
            if x.abs().max() == 0:
                skipped.append((path, "its calibration activations are all zero: no scale can be set"))
                continue
            s_x = _static_scale(x) if self.act == "static" else torch.empty(0)
            w4[path] = DGQLinear(quantize_weight(linear.weight.detach(), x, self.group, self.search,
                                                 self.feedback), linear.bias, s_x,
                                 self.form)
            if self.budget_cos:  # the alternative mixed precision may choose
                wide[path] = self._upgraded(linear, x, s_x)
            with torch.no_grad():
                errors[path] = verify.relative_error(linear(x), w4[path](x))
            set_submodule(module, path, w4[path])
        chosen, reached = {path: w4[path] for path in w4}, None
        if reference is not None and w4:
            chosen, reached = self._mixed_precision(module, ctx, judge, reference, w4, wide)
        stats = self._stats(chosen, errors, smoothed, reached)
        if judge:
            stats["budget_judged_on"] = ("held-out calibration batches" if len(judge[0]) < len(ctx.calibration) else
                                         "the calibration data the weights were fit on (one batch: none held out)")
        return PassResult(module, bool(w4), stats, skipped)

    def _upgraded(self, linear: nn.Linear, x: torch.Tensor, s_x: torch.Tensor) -> DGQLinear:
        """The layer with wider weights, for mixed precision: upgrade-bits codes in the same format and int8
        GEMM (found by the same search and feedback), or W8A8 (upgrade-bits=8). MiniLM, every layer wide:
        5-bit codes reach embedding cosine 0.9929 at 5.16 bits, int8 weights 0.9920 at 8.1."""
        weight = linear.weight.detach()
        if self.upgrade_bits == 8:
            return DGQLinear.int8_weights(weight, linear.bias, s_x)
        return DGQLinear(quantize_weight(weight, x, self.group, self.search, self.feedback, self.upgrade_bits),
                         linear.bias, s_x, "int8")

    def _mixed_precision(self, module, ctx, judge, reference, w4, wide) -> tuple[dict[str, DGQLinear], float]:
        """The layers whose wider weights (upgrade-bits, the same int8 GEMM) buy most output cosine per extra
        bit are upgraded: as few as give model outputs with a mean cosine ≥ budget-cos on the calibration
        data held out from the weight fit (bisection over that ranking), never more than keep the average at
        max-bits."""
        ranked = self._ranking(module, ctx, judge, reference, w4, wide)
        affordable = _affordable(ranked, w4, wide, self.max_bits)

        def chosen(k: int) -> dict[str, DGQLinear]:
            return {path: (wide if i < k else w4)[path] for i, path in enumerate(ranked)}

        last = {}

        def holds(k: int) -> bool:
            ctx.step(f"mixed precision: trying {k} of {len(ranked)} layers at {self.upgrade_bits}-bit weights", k,
                     len(ranked))
            for path, layer in chosen(k).items():
                set_submodule(module, path, layer)
            last["cosine"] = _cosine(reference, _outputs(module, *judge))
            return last["cosine"] >= self.budget_cos

        low, high = 0, affordable  # invariant: low fails (or is 0), high holds (or is the most affordable)
        if holds(0):
            return chosen(0), last["cosine"]
        if affordable and holds(high):
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if holds(middle) else (middle, high)
        holds(high)  # leave the module in the chosen state
        return chosen(high), last["cosine"]

    def _ranking(self, module, ctx, judge, reference, w4, wide) -> list[str]:
        """Layers by cosine gained per extra weight bit when that layer alone gets its wider weights
        (the others at 4 bits), measured on the first judged batch(es): per layer, the model from that
        layer on (`Suffixes`; a whole forward where the module is not a graph)."""
        probe = _probe(judge[0])
        want = reference[:len(probe)]
        masks = judge[1][:len(probe)] if judge[1] else None
        base = _cosine(want, _outputs(module, probe, masks))
        suffixes = Suffixes(module, list(w4), probe) if Suffixes.usable(module, probe) else None
        gain = {}
        for i, path in enumerate(w4):
            ctx.step(f"mixed precision: sensitivity of {path}", i, len(w4))
            set_submodule(module, path, wide[path])
            outputs = suffixes.outputs(path) if suffixes else [module(*batch) for batch in probe]
            extra = (wide[path].format_bits() - w4[path].format_bits()) * w4[path].weight_count()
            gain[path] = (_cosine(want, _vectors_of(outputs, masks)) - base) / extra
            set_submodule(module, path, w4[path])
        return sorted(w4, key=gain.get, reverse=True)

    def _stats(self, chosen: dict[str, DGQLinear], errors: dict[str, float], smoothed: int,
               reached: float | None) -> dict:
        sizes = {path: layer.weight_count() for path, layer in chosen.items()}
        total = sum(sizes.values()) or 1
        wide = [path for path, layer in chosen.items() if layer.weight_bits > self.bits]
        return {"quantized": len(chosen), "form": self.form, "act": self.act, "search": self.search,
                "smoothed_norms": smoothed, "upgraded_layers": len(wide),
                "upgrade_bits": self.upgrade_bits, "budget_cos": self.budget_cos,
                "calibration_cosine": round(reached, 5) if reached is not None else None,
                "budget": _budget_note(self, reached),
                "bits_per_weight": round(sum(chosen[p].format_bits() * n for p, n in sizes.items()) / total, 3),
                "stored_bits_per_weight": round(sum(chosen[p].stored_bits_per_weight() * n
                                                    for p, n in sizes.items()) / total, 3),
                "worst_layer_rel_err": round(max(errors.values()), 4) if errors else 0, "layer_rel_err": errors,
                "upgraded": wide}

    def _why_not(self, module: nn.Module, path: str, linear: nn.Linear) -> str | None:
        if shared_weight(module, path):
            return "its weight is tied to another use (e.g. the input embedding): quantizing it would untie them"
        if self.form == "w4" and linear.in_features % self.group:
            return (f"in_features {linear.in_features} is not a multiple of group={self.group} (form=w4 packs whole "
                    "groups; the default form=int8 pads the last group)")
        if not torch.isfinite(linear.weight).all():
            return "weights contain NaN or inf"
        if self.form == "w4" and self.group & (self.group - 1):
            return "form=w4 (MatMulNBits) needs a power-of-two group"
        return None


def smooth_outliers(module: nn.Module, batches: list[tuple], top: float = 0.005) -> tuple[int, list]:
    """Percentile clipping (DGQ §3.3): input channels of Linears above the top-0.5% abs-max of their input
    are scaled down where that input is made, and up in the consuming Linears' columns (exact in float).
    Where the input is made: a LayerNorm's weight and bias, an RMSNorm's weight (Llama: `weight * x̂`), or
    the rows of `up` in a gated block `act(gate(x)) * up(x)` (before `down`). Only where that value feeds
    nothing but Linears: post-LN residuals (BERT) would see the scaling."""
    if not isinstance(module, fx.GraphModule):
        return 0, [("smooth", "needs a captured graph")]
    points, skipped = _smoothing_points(module)
    peaks = channel_peaks(module, [consumers[0].target for _, consumers, _ in points], batches)
    for node, consumers, divide in points:
        peak = peaks[consumers[0].target]
        keep = int(top * peak.numel() + 1.5)
        baseline = peak.sort().values[-keep]
        scale = torch.where(peak > baseline, peak / baseline.clamp_min(1e-12), torch.ones_like(peak))
        with torch.no_grad():
            divide(scale)
            for user in consumers:
                module.get_submodule(user.target).weight.mul_(scale)
    return len(points), skipped


def _smoothing_points(gm: fx.GraphModule) -> tuple[list, list]:
    """(node, its consuming Linear nodes, a function dividing the node's output channels by a scale) for
    every value that only Linears read and whose channels an exact rescaling can reach."""
    points, skipped = [], []
    for node in gm.graph.nodes:
        divide = _channel_divider(gm, node)
        if divide is None:
            continue
        consumers = [u for u in node.users if u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Linear)]
        if not consumers or len(consumers) != len(node.users):
            if node.target != torch.ops.aten.mul.Tensor or _norm_weight(node):  # a norm's output: say why
                skipped.append((node.name, "a norm output that also feeds non-Linear ops (e.g. a residual): not "
                                           "smoothed"))
            continue
        if any(shared_weight(gm, u.target) for u in consumers):
            skipped.append((node.name, "feeds a Linear whose weight is tied to another use: not smoothed"))
            continue
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


def _rows(inputs: list[torch.Tensor]) -> torch.Tensor:
    """A layer's calibration inputs as (tokens, features), at most MAX_TOKENS of them (a seeded sample)."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    if x.shape[0] > MAX_TOKENS:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_TOKENS]]
    return x.float()


def _fit_and_judge(ctx: PassContext) -> tuple[list[tuple], tuple[list[tuple], list | None]]:
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


def _budget_note(p: "DualGrainedQuant", reached: float | None) -> str:
    if reached is None:
        return "off (budget-cos=0): every layer at 4 bits"
    if reached >= p.budget_cos:
        return f"met: output cosine {reached:.4f} ≥ {p.budget_cos} on the calibration data"
    return (f"not met within max-bits={p.max_bits:g}: output cosine {reached:.4f} < {p.budget_cos}; raise max-bits "
            "(more layers with wider weights) or lower budget-cos")


def _affordable(ranked: list[str], w4: dict, wide: dict, max_bits: float) -> int:
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


def _probe(batches: list[tuple]) -> list[tuple]:
    """The first batches, up to PROBE_TOKENS tokens (rows of the first input), for the per-layer probes."""
    taken, rows = [], 0
    for batch in batches:
        if taken and rows >= PROBE_TOKENS:
            break
        taken.append(batch)
        first = next((t for t in batch if isinstance(t, torch.Tensor)), None)
        rows += first.shape[:2].numel() if first is not None and first.dim() >= 2 else 1
    return taken


def _outputs(module: nn.Module, batches: list[tuple], masks: list | None) -> list[list[tuple[str, torch.Tensor]]]:
    """Per calibration batch, the output vectors the budget is judged on: every float output's rows (its last
    axis) at the positions the padding masks keep, and, for outputs with a sequence axis, each sequence's
    mean over its kept positions (what a sentence embedding is made of: errors shared by a sequence's
    tokens do not average out of it, so it is the stricter of the two on encoders)."""
    with torch.no_grad():
        return _vectors_of([module(*batch) for batch in batches], masks)


def _vectors_of(outputs: list, masks: list | None) -> list[list[tuple[str, torch.Tensor]]]:
    return [_vectors(out, mask) for out, mask in zip(outputs, masks or [None] * len(outputs))]


def _vectors(outputs, mask: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    vectors = [("rows", t.reshape(-1, t.shape[-1]).float()) for t in verify.float_leaves(outputs, mask, flatten=False)
               if t.dim()]
    return vectors + [("pooled", mean) for mean in verify.sequence_means(outputs, mask)]


def _cosine(reference: list[list[tuple]], outputs: list[list[tuple]]) -> float:
    """The mean cosine between original and rewritten vectors of each kind; the lower of the two kinds."""
    by_kind: dict[str, list[torch.Tensor]] = {}
    for ref_batch, new_batch in zip(reference, outputs):
        for (kind, a), (_, b) in zip(ref_batch, new_batch):
            if a.numel():
                by_kind.setdefault(kind, []).append(nn.functional.cosine_similarity(a, b, dim=-1))
    return min((float(torch.cat(c).mean()) for c in by_kind.values()), default=1.0)


def _static_scale(x: torch.Tensor) -> torch.Tensor:
    return (x.abs().max() / 127).clamp_min(1e-12).reshape(1)
