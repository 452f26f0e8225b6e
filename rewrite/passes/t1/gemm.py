"""Truncated spectral convolutions as real GEMMs: the exact layer the `t1` pass swaps in.

A spectral conv y = irfftₙ(P*(R ⊙ P(rfftₙ(x)))) + b keeps a product set of frequencies per axis.
On those frequencies the DFT is a dense matrix, so (with real/imaginary parts split) the layer is:
last axis x·[C|−S] (r2c), each other axis a complex (K×n) matmul, one batched (2Cin×2Cout) mix per
mode, the inverse matmuls, and a real c2r matrix that weights bin 0 (and Nyquist) by 1, others by 2,
dropping their imaginary parts exactly as irfft does. No complex tensors: ONNX-exportable.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rewrite.errors import InvalidValue


class SpectralGEMM(nn.Module):
    """A spectral conv for one grid size, as real matmuls.

    Args:
        weight: complex (Cin, Cout, K₁, …, K_d) per-mode weights, in the unnormalized DFT convention
            (y = irfftn(R ⊙ rfftn(x)) with torch's default norm).
        in_freqs / out_freqs: per axis, the signed frequencies read and written (last axis non-negative).
        grid: spatial sizes (n₁, …, n_d) this layer is built for.
        bias: (Cout,) or None.
    """

    fresh_output = True  # returns a new tensor, never its input: `inplace` may write into it

    def __init__(self, weight: torch.Tensor, in_freqs: list[list[int]], out_freqs: list[list[int]],
                 grid: tuple[int, ...], bias: torch.Tensor | None, factorized: Factorized | None = None):
        super().__init__()
        cin, cout, *modes = weight.shape
        self.grid, self.modes, self.cout, self.in_freqs = tuple(grid), modes, cout, in_freqs
        for a, (fin, fout, n) in enumerate(zip(in_freqs, out_freqs, grid)):
            last = a == len(grid) - 1
            fwd, inv = (_r2c(fin, n), _c2r(fout, n)) if last else (_dft(fin, n, -1), _dft(fout, n, +1, inverse=True))
            self.register_buffer(f"fwd{a}", fwd.float())
            self.register_buffer(f"inv{a}", inv.float())
        self.factorized = factorized  # factorized weights stay factorized (fewer parameters than dense modes)
        if factorized is None:
            w = weight.to(torch.complex128).reshape(cin, cout, -1).permute(2, 0, 1)  # (M, Cin, Cout)
            self.weight_re = nn.Parameter(w.real.float().contiguous())
            self.weight_im = nn.Parameter(w.imag.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().reshape(1, cout, *[1] * len(grid)))
        # A constant is the zero frequency alone (its coefficient is b·N in this DFT convention), so the bias
        # goes onto the kept coefficients instead of being a second pass over the full-grid output.
        self.dc = _dc_position(out_freqs, modes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.grid:
            raise InvalidValue(f"this t1 layer was built for grid {self.grid}, got {tuple(x.shape[2:])}; "
                             "re-run `rewrite optimize` with inputs of this size")
        return self.synthesize(self.mix(self.analyze(x)))

    def analyze(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) → the kept coefficients as (M, B, 2C): [re | im] channels per mode."""
        k = self.fwd_last.shape[1] // 2
        z = x @ self.fwd_last  # (B, C, n₁…, 2K_d): [re | im] on the last axis
        re, im = z[..., :k], z[..., k:]
        for a in range(len(self.grid) - 1):
            re, im = _complex_along(re, im, getattr(self, f"fwd{a}"), 2 + a)
        return torch.cat([re, im], 1).flatten(2).permute(2, 0, 1)

    def mix(self, stacked: torch.Tensor) -> torch.Tensor:
        """Per-mode complex channel mixing (M, B, 2Cin) → (M, B, 2Cout)."""
        if self.factorized is not None:
            return self.factorized.mix(stacked)
        return _mix_dense(stacked, self.weight_re, self.weight_im)

    def synthesize(self, mixed: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """(M, B, 2C) coefficients → (B, C, *grid), plus the layer's bias."""
        c = mixed.shape[-1] // 2
        folded = bias and self.bias is not None and self.dc is not None
        if folded:
            at_dc = torch.zeros(mixed.shape[0], 1, 2 * c, dtype=mixed.dtype, device=mixed.device)
            at_dc[self.dc, 0, :c] = self.bias.reshape(-1) * math.prod(self.grid)
            mixed = mixed + at_dc
        mixed = mixed.permute(1, 2, 0).reshape(mixed.shape[1], 2 * c, *self.modes)
        re, im = mixed[:, :c], mixed[:, c:]
        for a in range(len(self.grid) - 1):
            re, im = _complex_along(re, im, getattr(self, f"inv{a}"), 2 + a)
        y = torch.cat([re, im], -1) @ self.inv_last
        return y if self.bias is None or not bias or folded else y + self.bias

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary per-mode weights, (M, Cin, Cout) each."""
        if self.factorized is None:
            return self.weight_re, self.weight_im
        return tuple(w.flatten(2).permute(2, 0, 1) for w in self.factorized.dense())

    @property
    def out_modes(self) -> int:
        return math.prod(self.modes)

    @property
    def out_channels(self) -> int:
        return self.cout

    @property
    def fwd_last(self) -> torch.Tensor:
        return getattr(self, f"fwd{len(self.grid) - 1}")

    @property
    def inv_last(self) -> torch.Tensor:
        return getattr(self, f"inv{len(self.grid) - 1}")


class Factorized(nn.Module):
    """A complex factorized weight (Cin, Cout, *modes), as tltorch holds TFNO's, kept factorized: each
    complex factor stored as real and imaginary parameters and contracted at run time in real arithmetic
    (ONNX has no complex types). Each subclass (Tucker, CP, TT) has `dense()`: the (real, imaginary) parts
    of the full tensor (Cin, Cout, *modes), from its factors."""

    def __init__(self, *factors: torch.Tensor):
        super().__init__()
        self.factors = nn.ParameterList(nn.Parameter(p.detach().float().contiguous())
                                        for u in factors for p in (u.real, u.imag))

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored factors as (real, imaginary) pairs, in the order given."""
        return [(self.factors[2 * i], self.factors[2 * i + 1]) for i in range(len(self.factors) // 2)]

    def mix(self, stacked: torch.Tensor) -> torch.Tensor:
        """SpectralGEMM.mix with this weight; by default through the dense modes, made at each call."""
        return _mix_dense(stacked, *(w.flatten(2).permute(2, 0, 1) for w in self.dense()))


class Tucker(Factorized):
    """G ×₁ U₁ ×₂ U₂ …: a core and one factor per axis (tltorch's TuckerTensor)."""

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        (re, im), *factors = self.parts()
        for axis, (ur, ui) in enumerate(factors):
            re, im = _mode(re, ur, axis) - _mode(im, ui, axis), _mode(re, ui, axis) + _mode(im, ur, axis)
        return re, im


class CP(Factorized):
    """Σ_r λ_r · A[:, r] ⊗ B[:, r] ⊗ U₁[:, r] ⊗ …: weights λ and one (n × R) factor per axis (tltorch's
    CPTensor). Its rank is often near the dense size, so the modes are mixed through the factors, as
    neuraloperator's factorized implementation does: y_m = ((x_m A) ⊙ s_m) Bᵀ with s_m = λ ⊙ U₁[m₁] ⊙ U₂[m₂] …;
    the dense tensor would cost Cin·Cout·M·R at every call."""

    def mix(self, stacked: torch.Tensor) -> torch.Tensor:
        (ar, ai), (br, bi) = self.parts()[1:3]
        sr, si = self.mode_scales()
        z = stacked @ torch.cat([torch.cat([ar, ai], 1), torch.cat([-ai, ar], 1)], 0)  # (M, B, 2R): x·A
        zr, zi = z.chunk(2, -1)
        z = torch.cat([zr * sr - zi * si, zr * si + zi * sr], -1)
        return z @ torch.cat([torch.cat([br.T, bi.T], 1), torch.cat([-bi.T, br.T], 1)], 0)

    def mode_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """s (M, 1, R) as real and imaginary parts: λ times each kept mode's row of the mode factors."""
        (sr, si), _, _, *modes = self.parts()
        sr, si = sr[None], si[None]
        for ur, ui in modes:  # (M_so_far, R) ⊗ (n, R) → (M_so_far·n, R), row-major like the modes
            sr, si = ((sr[:, None] * ur - si[:, None] * ui).flatten(0, 1),
                      (sr[:, None] * ui + si[:, None] * ur).flatten(0, 1))
        return sr[:, None], si[:, None]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        (ar, ai), (br, bi) = self.parts()[1:3]
        sr, si = self.mode_scales()
        scale = torch.complex(sr[:, 0], si[:, 0])  # (M, R)
        w = torch.einsum("mr,ir,or->iom", scale, torch.complex(ar, ai), torch.complex(br, bi))
        modes = [u.shape[0] for u, _ in self.parts()[3:]]
        return w.real.reshape(*w.shape[:2], *modes), w.imag.reshape(*w.shape[:2], *modes)


class TT(Factorized):
    """A tensor train G₁ G₂ …: cores (r_{k−1} × n_k × r_k) with r₀ = r_d = 1 (tltorch's TTTensor)."""

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        (re, im), *cores = self.parts()  # (1, n₁, r₁): grow (1, n₁, …, n_k, r_k) core by core
        for gr, gi in cores:
            re, im = (_chain(re, gr) - _chain(im, gi), _chain(re, gi) + _chain(im, gr))
        return re[0, ..., 0], im[0, ..., 0]


def read_factorized(weight: nn.Module) -> Factorized | None:
    """A tltorch Tucker, CP or TT tensor (already sliced to the kept modes) kept factorized, else None."""
    kind = type(weight).__name__
    if kind == "TuckerTensor" and weight.core.is_complex():
        return Tucker(weight.core, *weight.factors)
    if kind == "CPTensor" and weight.factors[0].is_complex():
        return CP(weight.weights.to(weight.factors[0].dtype), *weight.factors)
    if kind == "TTTensor" and weight.factors[0].is_complex():
        return TT(*weight.factors)
    return None


def _mix_dense(stacked: torch.Tensor, wr: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
    """(M, B, 2Cin) @ one real (2Cin × 2Cout) block per mode, [[wr, wi], [−wi, wr]]: the complex product."""
    block = torch.cat([torch.cat([wr, wi], 2), torch.cat([-wi, wr], 2)], 1)
    return torch.bmm(stacked, block)


def _chain(x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """(…, r) @ (r × n × r′) → (…, n, r′): the train's next core."""
    return torch.tensordot(x, core, dims=([x.dim() - 1], [0]))


def _mode(x: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
    """x ×_axis u: the factor u (n × r) applied along `axis` (size r) of x."""
    return torch.movedim(torch.tensordot(x, u, dims=([axis], [1])), -1, axis)


def _dc_position(freqs: list[list[int]], modes: list[int]) -> int | None:
    """Flat index of the all-zero frequency among the kept modes, or None when it is not kept."""
    if any(0 not in f for f in freqs):
        return None
    return sum(f.index(0) * math.prod(modes[a + 1:]) for a, f in enumerate(freqs))


def _complex_along(re: torch.Tensor, im: torch.Tensor, matrix: torch.Tensor, axis: int):
    """(re + i·im) ×_axis (Mr + i·Mi), with `matrix` = [Mr; Mi] stacked on dim 0, each (out, in)."""
    out = matrix.shape[0] // 2
    both = torch.movedim(torch.stack([re, im]), axis + 1, -1) @ matrix.T  # (2, …, 2·out)
    r = both[0, ..., :out] - both[1, ..., out:]
    i = both[1, ..., :out] + both[0, ..., out:]
    return torch.movedim(r, -1, axis), torch.movedim(i, -1, axis)


def _angles(freqs: list[int], n: int) -> torch.Tensor:
    return 2 * math.pi * torch.outer(torch.tensor(freqs, dtype=torch.float64), torch.arange(n, dtype=torch.float64)) / n


def _dft(freqs: list[int], n: int, sign: int, inverse: bool = False) -> torch.Tensor:
    """[Re; Im] of exp(sign·2πi f j / n) as a (2K, n) forward or (2n, K) inverse matrix (inverse scaled 1/n)."""
    ang = _angles(freqs, n)
    if inverse:
        ang = ang.T
    scale = 1.0 / n if inverse else 1.0
    return torch.cat([torch.cos(ang), sign * torch.sin(ang)], 0) * scale


def _r2c(freqs: list[int], n: int) -> torch.Tensor:
    """(n, 2K): real input → [Re | Im] of its DFT at the non-negative `freqs`."""
    ang = _angles(freqs, n).T
    return torch.cat([torch.cos(ang), -torch.sin(ang)], 1)


def _c2r(freqs: list[int], n: int) -> torch.Tensor:
    """(2K, n): [Re | Im] of half-spectrum bins → real signal, as irfft (1/n, bins doubled but DC/Nyquist)."""
    ang = _angles(freqs, n)
    weight = torch.tensor([1.0 if f == 0 or 2 * f == n else 2.0 for f in freqs], dtype=torch.float64)[:, None]
    return torch.cat([weight * torch.cos(ang), -weight * torch.sin(ang)], 0) / n


# --- reading a spectral conv's operator ----------------------------------------------------------

def from_probe(module: nn.Module, channels: int, grid: tuple[int, ...], tol: float = 1e-6) -> SpectralGEMM | str:
    """Read R from the module's response to impulses (x = δ ⇒ rfftn(x) = 1). Returns a reason on failure.

    Exact when the module is a truncated Fourier multiplier plus a constant bias; the caller verifies.
    """
    d = len(grid)
    dims = tuple(range(2, 2 + d))
    with torch.no_grad():
        zero = module(torch.zeros(1, channels, *grid, dtype=torch.float32)).double()
        bias = zero.mean(dim=dims).reshape(-1)
        if (zero - zero.mean(dim=dims, keepdim=True)).abs().max() > tol * (1 + zero.abs().max()):
            return "its output for a zero input is not spatially constant"
        impulses = torch.zeros(channels, channels, *grid)
        impulses[(torch.arange(channels), torch.arange(channels)) + (0,) * d] = 1.0
        response = torch.fft.rfftn(module(impulses).double() - zero, dim=dims)  # (Cin, Cout, …)
    magnitude = response.abs()
    support = [_nonzero(magnitude, 2 + a, tol) for a in range(d)]
    if any(not s for s in support):
        return "its response is zero"
    freqs = [[i if a == d - 1 or i <= n // 2 else i - n for i in s] for a, (s, n) in enumerate(zip(support, grid))]
    weight = response[(slice(None), slice(None)) + tuple(torch.tensor(s)[_reshape(a, d)] for a, s in enumerate(support))]
    return SpectralGEMM(weight, freqs, freqs, grid, bias if bias.abs().max() > 0 else None)


def _nonzero(magnitude: torch.Tensor, axis: int, tol: float) -> list[int]:
    other = [a for a in range(magnitude.dim()) if a != axis]
    peak = magnitude.amax(dim=other)
    return [i for i, v in enumerate(peak.tolist()) if v > tol * float(magnitude.max())]


def _reshape(axis: int, d: int) -> tuple:
    """Index shape that broadcasts one axis's index list against the others (outer-product selection)."""
    return tuple(slice(None) if a == axis else None for a in range(d))


def unsupported(conv: nn.Module) -> str | None:
    """Why a neuraloperator SpectralConv cannot be read as a truncated Fourier multiplier (None: it can)."""
    if getattr(conv, "complex_data", False) or getattr(conv, "separable", False):
        return "complex-data or separable spectral weights are not supported"
    factor = getattr(conv, "resolution_scaling_factor", None)
    if factor is not None and any(float(f) != 1.0 for f in _flat(factor)):  # UNO writes 1.0 for "same grid"
        return f"it resamples its output (resolution_scaling_factor={factor})"
    if getattr(conv, "fno_block_precision", "full") != "full":
        return "half/mixed precision spectral blocks are not supported"
    return None


def _flat(value) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def from_neuralop(conv: nn.Module, grid: tuple[int, ...]) -> SpectralGEMM | str:
    """neuraloperator's SpectralConv read from its attributes, reproducing its conventions exactly.

    It keeps centred modes (fftshift, slice) and shifts back with a second fftshift, not an ifftshift:
    at an odd size along a non-last axis that synthesizes each coefficient one bin lower. We reproduce it.
    """
    reason = unsupported(conv)
    if reason:
        return reason
    weight = conv.weight.to_tensor() if hasattr(conv.weight, "to_tensor") else conv.weight
    weight = weight.detach()
    d = len(grid)
    sizes = list(grid[:-1]) + [grid[-1] // 2 + 1]
    index, in_freqs, out_freqs = [slice(None), slice(None)], [], []
    for a, (size, n_mode, max_mode) in enumerate(zip(sizes, conv.n_modes, conv.max_n_modes)):
        start = max_mode - min(size, n_mode)
        last = a == d - 1
        index.append(slice(None, -start) if last and start else slice(start // 2, -start // 2) if start else slice(None))
        kept = len(range(max_mode)[index[-1]])
        if last:
            in_freqs.append(list(range(kept)))
            out_freqs.append(list(range(kept)))
            continue
        freqs = list(range(-(kept // 2), kept // 2 + kept % 2))
        in_freqs.append(freqs)
        out_freqs.append([f - 1 for f in freqs] if grid[a] % 2 else freqs)
    bias = conv.bias.detach().reshape(-1) if getattr(conv, "bias", None) is not None else None
    factorized = read_factorized(conv.weight[tuple(index)])
    return SpectralGEMM(weight[tuple(index)], in_freqs, out_freqs, grid, bias, factorized)
