"""The transform-once student: neuraloperator FNO blocks rewritten to run on the kept modes.

One forward transform where the blocks begin, every block computed on the kept coefficients Z, one
inverse transform where they end (Transform Once, §3). The transform is the truncated rFFT the FNO
itself uses (`transform="dft"`, periodic data) or, as in the paper, an orthonormal-type DCT-II
(`transform="dct"`: real coefficients, an even extension instead of wrap-around, for non-periodic data).

What carries over from the teacher exactly (for the DFT): the per-mode weights R, the 1×1 skip W and
channel-MLP weights (channel mixing commutes with any spatial transform), biases (a constant lives only
in the DC coefficient), soft-gating. For the DCT, R is not diagonal in the new basis: DCT mode k is
frequency k/2, so R is resampled there (real part, averaged over ±f) as a starting point, or
variance-preserving initialized (`init="vp"`: std = gain·√(N/(fan_in·m)), gain 1 for DCT, ½ for DFT,
N grid points, m kept modes; Poli et al. §4). What changes: the nonlinearity now acts on a band-limited
signal, either
  - "coeff" (T1 style): σ on the coefficients, then a learned mode mixer per axis and channel
    (identity at start; Kaiming with init="vp", as the paper), or
  - "pseudo" (pseudo-spectral): inverse to a small grid of ~3/2 the modes, the block's pointwise part
    there as the teacher computes it (σ, channel MLP, soft-gating), forward back: one truncation per block
    (the 2/3-rule dealiasing); its cost does not depend on the input resolution,
and the skip paths no longer carry the frequencies above the kept modes. So the student is approximate
and is distilled toward the teacher (rewrite.recover). The lifting's last and the projection's first
1×1 layers are linear too, so they move into the modes as well (exactly): the full grid then only sees
the layers on the far side of the lifting's and projection's nonlinearities.

Coefficients are held as one real tensor (P, m₁…m_d, B, C), P = 2 (real, imaginary) for the DFT and 1
for the DCT, in an amplitude convention (a constant field c has DC coefficient c on any grid), so the
same coefficients mean the same function on the input grid and on the small pseudo-spectral grid.
Mode-major with channels last, every step is one GEMM (or a batched GEMM sharing its matrix) on a
contiguous tensor: transforms along a mode axis, per-mode mixing, 1×1 channel mixing, with no permute
copies between them. Full-grid samples are held channels last too, (n₁…n_d, B, C).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from rewrite.errors import InvalidValue
from rewrite.passes.t1.gemm import _c2r, _dft, _r2c, from_neuralop, unsupported


SLAB_FLOATS = 2 ** 18  # 1 MB: a full-grid slab made, used and dropped while it is in the core's cache


class Basis(nn.Module):
    """Truncated DFT (kept signed frequencies per axis) or DCT-II (kept indices) on one grid, as matmuls."""

    def __init__(self, kind: str, index: list[list[int]], grid: tuple[int, ...]):
        super().__init__()
        self.kind, self.index, self.grid = kind, [list(i) for i in index], tuple(grid)
        self.parts = 2 if kind == "dft" else 1
        self.modes = [len(i) for i in index]
        self.mixed_axes = len(grid) - 1 if kind == "dft" else len(grid)  # axes done as (P·out × P·in) matmuls
        for a in range(self.mixed_axes):
            fwd, inv = _axis_matrices(kind, index[a], grid[a])
            self.register_buffer(f"fwd{a}", fwd.float())
            self.register_buffer(f"inv{a}", inv.float())
        if kind == "dft":  # the last axis turns real samples into [re | im] of non-negative bins and back
            n = grid[-1]  # amplitude convention: rfft(norm="forward") and its inverse
            self.register_buffer("r2c", (_r2c(index[-1], n) / n).float())
            self.register_buffer("c2r", (_c2r(index[-1], n) * n).unflatten(0, (2, -1)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) → (B, C, P, *modes)."""
        return channel_major(self.from_grid(grid_major(x)))

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, P, *modes) → (B, C, *grid)."""
        return channel_major(self.to_grid(mode_major(z)))

    def to_grid(self, z: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Mode-major coefficients (P, *modes, …) → samples (*grid, …), or only the slab `rows` of the first
        axis. The trailing axes (batch, channels) ride along as GEMM columns: every step is one GEMM, or a
        batched one sharing its matrix, on a contiguous tensor."""
        for a in range(self.mixed_axes):
            z = _along_pairs(self._sliced(f"inv{a}", rows if a == 0 else None, columns=False), z, a)
        if self.kind == "dft":
            last = len(self.grid) - 1
            return _along_axis(self.c2r[0].T, z[0], last) + _along_axis(self.c2r[1].T, z[1], last)
        return z[0]

    def from_grid(self, y: torch.Tensor, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """Samples (*grid, …) → mode-major coefficients (P, *modes, …). With `rows`, y is that slab of the
        first axis only and the result its share of the coefficients (the slabs' shares add up: `into`, the
        sum of the earlier slabs' shares, takes this one in place, inside the last GEMM)."""
        if self.kind == "dft":
            last = len(self.grid) - 1
            z = _along_axis(self.r2c.T, y, last).unflatten(last, (2, -1)).movedim(last, 0)
        else:
            z = y[None]
        for a in reversed(range(self.mixed_axes)):  # the first axis last: it is the one slabs split
            matrix = self._sliced(f"fwd{a}", rows if a == 0 else None, columns=True)
            if a == 0 and into is not None:  # the first axis's GEMM writes (P·m₁, rest): `into`'s own layout
                into.view(matrix.shape[0], -1).addmm_(matrix, z.reshape(matrix.shape[1], -1))
                return into
            z = _along_pairs(matrix, z, a)
        return z

    def slabs(self) -> bool:
        """Whether the first grid axis can be split into slabs (it is transformed by a matrix of its own)."""
        return self.mixed_axes > 0

    def _sliced(self, name: str, rows: slice | None, columns: bool) -> torch.Tensor:
        matrix = getattr(self, name)
        if rows is None:
            return matrix
        # Made once per slab and kept (the transform matrices are constants): indexing them at every call
        # was a few small ops per slab, and at 64² the ends run in 8 slabs.
        key = (name, rows.start, rows.stop, matrix.device, matrix.dtype)
        cache = self.__dict__.setdefault("_slab_matrices", {})
        if key not in cache:
            n = self.grid[0]  # the matrix acts on [part 0 samples | part 1 samples] of the first axis
            index = torch.cat([torch.arange(n)[rows] + part * n for part in range(self.parts)]).to(matrix.device)
            cache[key] = (matrix[:, index] if columns else matrix[index]).contiguous()
        return cache[key]

    def constant(self) -> torch.Tensor:
        """The coefficients (P, *modes) of the constant field 1: where biases go."""
        with torch.no_grad():
            return self(torch.ones(1, 1, *self.grid))[0, 0]


def _axis_matrices(kind: str, index: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (P·m × P·n) and inverse (P·n × P·m) real matrices along one axis."""
    if kind == "dct":  # a_k = (1/n) Σ x_j cos(πk(2j+1)/2n);  x_j = a₀ + 2 Σ_{k≥1} a_k cos(…)
        k = torch.tensor(index, dtype=torch.float64)[:, None]
        j = torch.arange(n, dtype=torch.float64)[None, :]
        cos = torch.cos(math.pi * k * (2 * j + 1) / (2 * n))
        return cos / n, (cos * torch.where(k == 0, 1.0, 2.0)).T
    fwd, inv = _dft(index, n, -1) / n, _dft(index, n, +1, inverse=True) * n  # [Re; Im] stacked
    return _complex_block(*fwd.chunk(2)), _complex_block(*inv.chunk(2))


def _complex_block(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """The real matrix of z ↦ (re + i·im)·z acting on [Re z; Im z]."""
    return torch.cat([torch.cat([re, -im], 1), torch.cat([im, re], 1)], 0)


def _along_axis(matrix: torch.Tensor, z: torch.Tensor, axis: int) -> torch.Tensor:
    """matrix (out × in) applied along `axis` of z: the axes before it are a batch, those after it columns
    (one GEMM when `axis` is the first; a batched GEMM sharing the matrix otherwise)."""
    lead = z.shape[:axis]
    batch = math.prod(lead)
    if batch == 1:
        out = matrix @ z.reshape(z.shape[axis], -1)
    else:
        out = torch.bmm(matrix.expand(batch, -1, -1), z.reshape(batch, z.shape[axis], -1))
    return out.view(*lead, matrix.shape[0], *z.shape[axis + 1:])


def _along_pairs(matrix: torch.Tensor, z: torch.Tensor, axis: int) -> torch.Tensor:
    """A (P·out × P·in) matrix applied to the (part, axis) pair of mode-major z (P, *modes, …)."""
    parts = z.shape[0]
    if parts == 1:  # real coefficients (the DCT): nothing to pair
        return _along_axis(matrix, z[0], axis)[None]
    paired = z.movedim(0, axis).flatten(axis, axis + 1)  # a view for the first axis
    return _along_axis(matrix, paired, axis).unflatten(axis, (parts, -1)).movedim(axis, 0)


def mode_major(z: torch.Tensor) -> torch.Tensor:
    """(B, C, P, *modes) → (P, *modes, B, C): the layout the blocks run in (channels last, as GEMM columns)."""
    return grid_major(z).contiguous()


def grid_major(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) → (*grid, B, C), a view: the layout the transforms take samples in."""
    return x.permute(*range(2, x.dim()), 0, 1)


def channel_major(z: torch.Tensor) -> torch.Tensor:
    """(P, *modes, B, C) → (B, C, P, *modes), or (*grid, B, C) → (B, C, *grid); a view."""
    return z.permute(-2, -1, *range(z.dim() - 2))


class T1Blocks(nn.Module):
    """Replaces neuraloperator's FNOBlocks (all layers): space → kept modes → blocks → space."""

    def __init__(self, blocks: nn.Module, basis: Basis, small: Basis, weights: list[torch.Tensor],
                 biases: list[torch.Tensor | None], nonlinearity: str, mixer_init: str = "identity",
                 generator: torch.Generator | None = None, absorb: tuple[nn.Module, nn.Module] | None = None,
                 ends: tuple[nn.Module, nn.Module] | None = None):
        super().__init__()
        # What stays in space of the lifting and projection (ChannelMLPParts), run here a slab of grid rows
        # at a time with the transforms, so each full-grid tensor is made and used while it is in cache.
        self.head, self.tail = ends or (nn.Identity(), nn.Identity())
        # The lifting's last and the projection's first 1×1 layers are linear: they commute with the
        # transform, so they run on the kept modes instead of on every grid point (absorb).
        self.absorbed = nn.ParameterList(nn.Parameter(p.detach()[..., 0].clone() if p.dim() == 3 else p.detach().clone())
                                         for fc in (absorb or ()) for p in (fc.weight, fc.bias))
        self.basis, self.small, self.nonlinearity = basis, small, nonlinearity
        self.n_layers, self.grid, self.modes = blocks.n_layers, basis.grid, basis.modes
        self.register_buffer("dc", basis.constant().reshape(-1))
        self.dc_at, self.dc_value = _one_coefficient(basis.constant())
        self.spectral = nn.ParameterList(nn.Parameter(w.float().contiguous()) for w in weights)  # (P, M, Cin, Cout)
        self.spectral_b = nn.ParameterList(nn.Parameter(b.clone() if b is not None else torch.zeros(w.shape[-1]))
                                           for w, b in zip(weights, biases))
        self.skip = nn.ParameterList(nn.Parameter(s.conv.weight.detach()[..., 0].clone()) for s in blocks.fno_skips)
        self.mlp_w = nn.ParameterList(nn.Parameter(fc.weight.detach()[..., 0].clone())
                                      for mlp in blocks.channel_mlp for fc in mlp.fcs)
        self.mlp_b = nn.ParameterList(nn.Parameter(fc.bias.detach().clone()) for mlp in blocks.channel_mlp for fc in mlp.fcs)
        self.gate = nn.ParameterList(nn.Parameter(g.weight.detach().reshape(-1).clone()) for g in blocks.channel_mlp_skips)
        width = self.skip[0].shape[0]
        mixers = [_mode_mixer(width, m, mixer_init, generator) for _ in range(2 * self.n_layers) for m in self.modes]
        self.mixers = nn.ParameterList(mixers if nonlinearity == "coeff" else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.grid:
            raise InvalidValue(f"this t1 model was built for grid {self.grid}, got {tuple(x.shape[2:])}")
        slabs = self._slabs(x.shape[0])
        sliced = len(slabs) > 1
        # (*grid, B, C): the ends and the transforms take channels last. Copied once (the lifting's input is
        # a few channels): a slab of the permuted view made each slab's first layer copy its input first.
        samples = grid_major(x).contiguous()
        z = None
        for rows in slabs:
            z = self.basis.from_grid(self.head(samples[rows]), rows if sliced else None, into=z)
        if len(self.absorbed):
            z = self._plus_bias(_channels(self.absorbed[0], z), self.absorbed[1])
        for i in range(self.n_layers):
            z = self._block(i, z)
        if len(self.absorbed):
            z = self._plus_bias(_channels(self.absorbed[2], z), self.absorbed[3])
        out = [self.tail(self.basis.to_grid(z, rows if sliced else None)) for rows in slabs]
        return channel_major(torch.cat(out) if sliced else out[0]).contiguous()

    def _slabs(self, batch: int) -> list[slice]:
        """Slabs of the first grid axis whose widest full-grid tensor is about SLAB_FLOATS (one slab, the
        whole grid, in export: an unrolled loop of index ops helps no runtime there)."""
        n = self.grid[0]
        if isinstance(self.head, nn.Identity) or not self.basis.slabs() or torch.compiler.is_exporting():
            return [slice(0, n)]
        per_row = batch * self.end_width * math.prod(self.grid[1:])
        rows = max(1, SLAB_FLOATS // per_row)
        return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]

    @property
    def end_width(self) -> int:
        """Channels of the widest full-grid tensor at the ends (the lifting's or projection's hidden)."""
        return max(self.absorbed[0].shape[1], self.absorbed[2].shape[0]) if len(self.absorbed) else self.skip[0].shape[0]

    def spectral_conv(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """The teacher's SpectralConv i on mode-major coefficients (P, *modes, B, C): per-mode (complex)
        channel mixing, one batched GEMM per part over the modes, plus bias."""
        w = self.spectral[i]  # (P, M, Cin, Cout)
        flat = z.reshape(z.shape[0], -1, *z.shape[-2:])  # (P, M, B, C), a view
        if z.shape[0] == 1:
            out = torch.bmm(flat[0], w[0])[None]
        else:  # (re + i·im)(w₀ + i·w₁)
            re, im = flat[0], flat[1]
            out = torch.stack([torch.baddbmm(torch.bmm(re, w[0]), im, w[1], alpha=-1),
                               torch.baddbmm(torch.bmm(re, w[1]), im, w[0])])
        return self._plus_bias(out.reshape(*z.shape[:-1], w.shape[-1]), self.spectral_b[i])

    def _block(self, i: int, z: torch.Tensor) -> torch.Tensor:
        last = i == self.n_layers - 1
        y = self.spectral_conv(i, z) + _channels(self.skip[i], z)
        if self.nonlinearity == "pseudo" and not last:
            return self._pointwise_on_small_grid(i, y, z)
        if not last:
            y = self._sigma(2 * i, y)
        h = self._sigma(2 * i, self._plus_bias(_channels(self.mlp_w[2 * i], y), self.mlp_b[2 * i]), mix=False)
        h = self._plus_bias(_channels(self.mlp_w[2 * i + 1], h), self.mlp_b[2 * i + 1])
        y = h + self.gate[i] * z
        return y if last else self._sigma(2 * i + 1, y)

    def _pointwise_on_small_grid(self, i: int, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The rest of block i as the teacher computes it, pointwise (σ, channel MLP, soft-gating, σ), on the
        small grid, then forward back: one truncation per block. (Three round trips, one per σ, cost 60%
        more transforms, and truncated the MLP's hidden layer, which the teacher never does.)"""
        h = F.gelu(F.linear(F.gelu(self.small.to_grid(y)), self.mlp_w[2 * i], self.mlp_b[2 * i]))
        h = F.linear(h, self.mlp_w[2 * i + 1], self.mlp_b[2 * i + 1])
        return self.small.from_grid(F.gelu(torch.addcmul(h, self.gate[i], self.small.to_grid(z))))

    def _plus_bias(self, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """z plus a per-channel bias, as coefficients: a constant lives in the constant field's coefficients
        (the DC). When that is one coefficient, only its (B, C) slice changes, in place: z is a fresh
        product here, and adding a tensor of zeros everywhere else was a pass over all the modes."""
        if self.dc_at is None:
            return z + self.dc.reshape(self.basis.parts, *self.modes, 1, 1) * b
        z[self.dc_at].add_(b, alpha=self.dc_value)  # through the view, not `+=` (that also writes back)
        return z

    def _sigma(self, k: int, z: torch.Tensor, mix: bool = True) -> torch.Tensor:
        if self.nonlinearity == "pseudo":
            return self.small.from_grid(F.gelu(self.small.to_grid(z)))
        z = F.gelu(z)
        if mix:
            for a in range(len(self.modes)):
                z = _mix_modes(z, self.mixers[k * len(self.modes) + a], a)
        return z


def _one_coefficient(coefficients: torch.Tensor) -> tuple[tuple[int, ...] | None, float]:
    """(position, value) of the only nonzero coefficient (the constant field's DC), or (None, 0)."""
    nonzero = (coefficients.abs() > 1e-6 * float(coefficients.abs().max())).nonzero()
    if len(nonzero) != 1:
        return None, 0.0
    at = tuple(int(i) for i in nonzero[0])
    return at, float(coefficients[at])


def _channels(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """1×1 channel mixing commutes with the transform: the same W on every coefficient (channels last)."""
    return z @ w.T


def _mode_mixer(channels: int, modes: int, init: str, generator: torch.Generator | None) -> nn.Parameter:
    if init == "kaiming":  # the paper's mode mixers: N(0, 1/m) per channel
        return nn.Parameter(torch.randn(channels, modes, modes, generator=generator) / math.sqrt(modes))
    return nn.Parameter(torch.eye(modes).repeat(channels, 1, 1))


def _mix_modes(z: torch.Tensor, mixer: torch.Tensor, axis: int) -> torch.Tensor:
    """Dense mixing along one mode axis of mode-major z, one (m × m) matrix per channel (T1Layer's spatial
    mixing): out[…, i, …, c] = Σⱼ mixer[c, i, j] · z[…, j, …, c]."""
    letters = "".join(chr(ord("k") + a) for a in range(z.dim() - 3))  # the mode axes; p, b, c and i, j are free
    before, after = "p" + letters + "bc", "p" + letters.replace(letters[axis], "i") + "bc"
    return torch.einsum(f"ci{letters[axis]},{before}->{after}", mixer, z)


def why_not(blocks: nn.Module) -> str | None:
    """The FNOBlocks configurations the student reproduces (the neuraloperator defaults)."""
    checks = [
        (type(blocks).__name__ == "FNOBlocks", "not a neuraloperator FNOBlocks"),
        (not blocks.preactivation and blocks.norm is None and blocks.stabilizer is None, "norm/preactivation/stabilizer"),
        (blocks.use_channel_mlp and blocks.channel_mlp_skip == "soft-gating" and blocks.fno_skip == "linear",
         "needs linear FNO skips, channel MLPs and soft-gating (the defaults)"),
        (blocks.non_linearity is F.gelu, "needs GELU"),
        (all(len(m.fcs) == 2 for m in blocks.channel_mlp), "needs 2-layer channel MLPs"),
        (all(getattr(g, "bias", None) is None for g in blocks.channel_mlp_skips), "soft-gating with bias"),
        (not any(unsupported(conv) for conv in blocks.convs),
         next((unsupported(conv) for conv in blocks.convs if unsupported(conv)), "")),
    ]
    return next((why for ok, why in checks if not ok), None)


class ChannelMLPPart(nn.Module):
    """What stays in space of a neuraloperator ChannelMLP once its linear end layer moved into the modes:
    the other 1×1 layers, each followed by the nonlinearity (lifting) or preceded by it (projection), on
    channels-last samples (…, C), so each layer is one GEMM (oneDNN's 1×1 conv and a (C_out × 3) @ (3 × L)
    batched matmul were 5x slower at these shapes)."""

    def __init__(self, fcs: list[nn.Module], act_before: bool):
        super().__init__()
        self.fcs, self.act_before = nn.ModuleList(copy.deepcopy(fc) for fc in fcs), act_before

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for fc in self.fcs:
            h = _pointwise(fc, F.gelu(h)) if self.act_before else F.gelu(_pointwise(fc, h))
        return h


def _pointwise(fc: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution on channels-last samples."""
    return F.linear(h, fc.weight.flatten(1), fc.bias)


def absorbable(owner: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(lifting, projection) of a neuraloperator FNO whose end layers can move into the modes."""
    lifting, projection = getattr(owner, "lifting", None), getattr(owner, "projection", None)
    mlps = (lifting, projection)
    if getattr(owner, "domain_padding", None) is not None or not all(type(m).__name__ == "ChannelMLP" for m in mlps):
        return None
    if any(m.dropout is not None or m.non_linearity is not F.gelu for m in mlps):
        return None
    return lifting, projection


def build(blocks: nn.Module, x: torch.Tensor, nonlinearity: str = "pseudo", transform: str = "dft",
          init: str = "teacher", modes_ratio: float = 1.0, select: str = "lowest", seed: int = 0,
          absorb: tuple[nn.Module, nn.Module] | None = None, ends: tuple[nn.Module, nn.Module] | None = None
          ) -> T1Blocks:
    """The student for `blocks`, whose input on calibration data is `x` (B, C, *grid); `absorb` =
    (lifting's last layer, projection's first layer) to run on the modes too; `ends` = (what stays in space
    of the lifting, of the projection) to run with the transforms (then the student takes the lifting's
    input and gives the projection's output)."""
    grid = tuple(x.shape[2:])
    weights, biases, freqs = teacher_weights(blocks, grid)
    index = freqs if transform == "dft" else [list(range(len(f) if a < len(freqs) - 1 else 2 * len(f) - 1))
                                              for a, f in enumerate(freqs)]
    if transform == "dct":
        weights = [_dft_to_dct(w, freqs, index) for w in weights]
    if modes_ratio < 1:
        keep = select_modes(Basis(transform, index, grid), x, modes_ratio, select)
        index = [[f[i] for i in idx] for f, idx in zip(index, keep)]
        weights = [w[(slice(None), slice(None)) + _outer(keep)] for w in weights]
    generator = torch.Generator().manual_seed(seed)
    if init == "vp" and transform == "dct":  # the DCT weights have no exact teacher: the paper's VP init
        m, n_points = math.prod(len(i) for i in index), math.prod(grid)
        weights = [torch.randn(w.shape, generator=generator, dtype=w.dtype) * math.sqrt(n_points / (w.shape[0] * m))
                   for w in weights]
    small_grid = tuple(max(3, math.ceil(1.5 * (2 * len(f) - 1 if transform == "dft" and a == len(index) - 1 else len(f))))
                       for a, f in enumerate(index))
    parts = [_parts(w) for w in weights]
    return T1Blocks(blocks, Basis(transform, index, grid), Basis(transform, index, small_grid), parts, biases,
                    nonlinearity, "kaiming" if init == "vp" else "identity", generator, absorb, ends)


def _parts(w: torch.Tensor) -> torch.Tensor:
    """(Cin, Cout, *modes) complex or real → (P, M, Cin, Cout) real."""
    flat = w.reshape(*w.shape[:2], -1).permute(2, 0, 1)
    return torch.stack([flat.real, flat.imag]) if flat.is_complex() else flat[None]


def _outer(keep: list[list[int]]) -> tuple:
    """Index tensors selecting the outer product of per-axis index lists."""
    d = len(keep)
    return tuple(torch.tensor(idx)[tuple(slice(None) if b == a else None for b in range(d))] for a, idx in enumerate(keep))


def _dft_to_dct(w: torch.Tensor, freqs: list[list[int]], index: list[list[int]]) -> torch.Tensor:
    """Resample per-mode DFT weights onto DCT indices: DCT mode k sits at frequency k/2 (real part,
    averaged over ±f and linearly between neighbouring frequencies). A starting point, not exact."""
    out = w.to(torch.complex128)
    for a, (f, ks) in enumerate(zip(freqs, index)):
        resample = torch.zeros(len(ks), len(f), dtype=torch.complex128)
        for row, k in enumerate(ks):
            for g, share in ((k // 2, 0.5), ((k + 1) // 2, 0.5)):  # even k: both halves on k/2
                present = [f.index(s) for s in {g, -g} if s in f]
                for col in present:
                    resample[row, col] += share / len(present)
        resample /= resample.real.sum(1, keepdim=True).clamp_min(1e-12)
        out = torch.movedim(torch.tensordot(out, resample, dims=([2 + a], [1])), -1, 2 + a)
    return out.real.float()


def teacher_weights(blocks: nn.Module, grid: tuple[int, ...]):
    """(per-layer complex weights (Cin, Cout, modes…), per-layer spectral biases, kept frequencies)."""
    weights, biases, freqs = [], [], []
    for conv in blocks.convs:
        layer = from_neuralop(conv, grid)
        if isinstance(layer, str):
            raise ValueError(layer)
        w = torch.complex(*(part.detach() for part in layer.weights())).permute(1, 2, 0)
        weights.append(w.reshape(*w.shape[:2], *layer.modes))
        biases.append(None if layer.bias is None else layer.bias.reshape(-1))
        freqs = layer.in_freqs
    return weights, biases, freqs


def select_modes(basis: Basis, x: torch.Tensor, ratio: float, how: str) -> list[list[int]]:
    """Per axis, positions of the `ratio` share of the basis's modes to keep: the lowest frequencies, or
    those carrying the most energy of the blocks' input `x` (B, C, *grid) on calibration data. DC stays."""
    with torch.no_grad():
        energy = basis(x.float()).double().square().sum(dim=(0, 1, 2))  # (*modes)
    chosen = []
    for a, idx in enumerate(basis.index):
        count = max(1, round(ratio * len(idx)))
        marginal = energy.sum(dim=tuple(b for b in range(energy.dim()) if b != a))
        if how == "energy":
            order = sorted(range(len(idx)), key=lambda i: (idx[i] != 0, -float(marginal[i])))
        else:
            order = sorted(range(len(idx)), key=lambda i: (abs(idx[i]), idx[i]))
        chosen.append(sorted(order[:count]))
    return chosen
