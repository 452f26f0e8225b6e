"""Kernelized attention with a Toeplitz relative-position factor, computed by FFT (never an n×n tensor).

softmax(s·QKᵀ + B)V with B[i,j] = b_{j−i} (and an optional per-key padding mask) is
    z_i = Σ_j c_{j−i} φ(q̃_i)·φ(k̃_j) v_j / Σ_j c_{j−i} φ(q̃_i)·φ(k̃_j),   c_t = exp(b_t),   q̃ = √s·q, k̃ = √s·k,
with positive random features φ(x) = exp(Wx − ‖x‖²/2)/√m (W: m×d, orthogonal blocks with chi norms,
seeded, stored), E[φ(x)·φ(y)] = exp(x·y). Everything that depends on j is a Toeplitz mat-vec along the
sequence, y_i = Σ_j c_{j−i} u_j, done on the circulant embedding: y = irfft(rfft(ĉ)·rfft(u))[:n] with
ĉ[s mod P] = c_{−s} (P ≥ 2n − 1). Causal attention sets c_t = 0 for t > 0. A padding mask multiplies
φ(k_j) by exp(mask_j) (0 for padded keys).

Stabilizers (they cancel in the ratio): per query, the largest exponent of φ(q̃_i) is subtracted; per
head, the largest exponent of φ(k̃_j) over keys and features is subtracted; c_t is divided by its maximum.
Memory is O(n·d·chunk) with the features processed `chunk` at a time: no n×n tensor is ever formed.

Paper: Luo, Li, Cai, Ke, Zheng, Wang, He, Liu, "Stable, Fast and Accurate: Kernelized Attention with
Relative Positional Encoding", NeurIPS 2021 (arXiv:2106.12566).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def toeplitz_dense(c: torch.Tensor, n: int) -> torch.Tensor:
    """C[i,j] = c_{j−i} from c = (c_{−(n−1)}, …, c_0, …, c_{n−1}) (…, 2n−1): the reference (tests only)."""
    i = torch.arange(n)
    return c[..., (i[None, :] - i[:, None]) + n - 1]


def fft_size(n: int) -> int:
    """The smallest power of two ≥ 2n − 1 (fast FFT sizes)."""
    return 1 << max(1, (2 * n - 2).bit_length())  # at least 2: an even size, so irfft knows it


def toeplitz_spectrum(c: torch.Tensor, n, full: bool = False) -> torch.Tensor:
    """rfft of ĉ with ĉ[s mod P] = c_{−s}, for c = (c_{−(n−1)}, …, c_{n−1}) along the last axis.

    P is a power of two for a concrete n; while exporting (n symbolic) it is 2n, also exact. full=True: the
    two-sided complex spectrum (for ONNX, whose runtime has no one-sided inverse DFT)."""
    p = fft_size(n) if isinstance(n, int) else 2 * n
    gap = torch.zeros(*c.shape[:-1], p - (2 * n - 1), dtype=c.dtype)
    # s = 0 … n−1 holds c_0, c_{−1}, …, c_{−(n−1)}; s = −(n−1) … −1 (the end) holds c_{n−1}, …, c_1.
    kernel = torch.cat([c[..., :n].flip(-1), gap, c[..., n:].flip(-1)], -1)
    return torch.fft.fft(kernel) if full else torch.fft.rfft(kernel)


def toeplitz_apply(spectrum: torch.Tensor, u: torch.Tensor, full: bool = False) -> torch.Tensor:
    """y_i = Σ_j c_{j−i} u_j along the last axis of u (…, n), the spectrum broadcasting over the rest.

    full=True takes a two-sided spectrum and runs complex fft/ifft (what onnxruntime's DFT supports)."""
    n = u.shape[-1]
    p = spectrum.shape[-1] if full else 2 * (spectrum.shape[-1] - 1)
    if full:  # zero-padding spelled out: onnxruntime's DFT mis-sizes implicitly padded inputs
        padded = torch.cat([u, torch.zeros(*u.shape[:-1], p - n, dtype=u.dtype)], -1)
        return torch.fft.ifft(torch.fft.fft(padded) * spectrum).real[..., :n]
    return torch.fft.irfft(torch.fft.rfft(u, n=p) * spectrum, n=p)[..., :n]


def gaussian_features(m: int, d: int, seed: int) -> torch.Tensor:
    """W ∈ R^{m×d}: orthogonal blocks of rows rescaled by chi(d) norms (same marginals as N(0, I))."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    return torch.cat(blocks)[:m] * torch.randn(m, d, generator=gen).norm(dim=1, keepdim=True)


class ToeplitzBias(nn.Module):
    """b_t per head for |t| < L (a table read off the model at rewrite time), and its extension past L.

    `tail` says how to extend beyond the table: "flat" (the edge value: exact for clipped tables and T5's
    saturating buckets), "linear" (ALiBi-like slopes) or "none" (longer inputs are refused).
    """

    def __init__(self, table: torch.Tensor, tail: str):
        super().__init__()
        self.register_buffer("table", table.contiguous())  # (heads, 2L − 1), t = −(L−1) … L−1
        self.tail = tail
        self.limit = (table.shape[-1] + 1) // 2
        self._spectra: dict[tuple[int, bool, bool], torch.Tensor] = {}

    def values(self, n: int) -> torch.Tensor:
        """(heads, 2n − 1): b_t for t = −(n−1) … n−1."""
        L = self.limit
        if n <= L:
            return self.table[:, L - n:L + n - 1]
        if self.tail == "none":
            raise ValueError(f"sequence length {n} is longer than the {L} the bias was read at; rewrite with a "
                             f"larger max-length")
        extra = n - L
        steps = torch.arange(1, extra + 1, dtype=self.table.dtype)
        left, right = self.table[:, :1], self.table[:, -1:]
        if self.tail == "linear":
            left = left + (self.table[:, :1] - self.table[:, 1:2]) * steps.flip(0)
            right = right + (self.table[:, -1:] - self.table[:, -2:-1]) * steps
        else:
            left, right = left.expand(-1, extra), right.expand(-1, extra)
        return torch.cat([left, self.table, right], -1)

    def spectrum(self, n: int, causal: bool, full: bool = False) -> torch.Tensor:
        """rfft (full: fft) of the stabilized exp(b) on the circulant embedding, cached per length."""
        concrete = isinstance(n, int) and not torch.compiler.is_compiling()  # symbolic while exporting
        if concrete and (n, causal, full) in self._spectra:
            return self._spectra[(n, causal, full)]
        b = self.values(n)
        if causal:
            b = torch.cat([b[:, :n], torch.full_like(b[:, n:], -math.inf)], -1)  # c_t = 0 for t > 0
        # (heads, 1, 1, …): axes for the feature and value columns are added before the FFT (the ONNX
        # exporter cannot reshape complex tensors).
        spectrum = toeplitz_spectrum(torch.exp(b - b.amax(-1, keepdim=True))[:, None, None, :], n, full)
        if concrete:
            self._spectra[(n, causal, full)] = spectrum
        return spectrum


class RPEFFTAttention(nn.Module):
    """softmax(s·QKᵀ + B + mask)V, kernelized: (q, k, v[, mask]) → (batch, heads, n, d_v)."""

    def __init__(self, bias: ToeplitzBias, head_dim: int, scale: float, features: int = 64, seed: int = 0,
                 causal: bool = False, normalize: bool = False, chunk: int = 16):
        super().__init__()
        self.bias, self.scale, self.causal, self.normalize, self.chunk = bias, scale, causal, normalize, chunk
        self.register_buffer("w", gaussian_features(features, head_dim, seed))  # drawn once, stored

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        n = q.shape[-2]
        if self.normalize:  # the paper's stable variant: unit q/k (the scale then acts as a temperature)
            q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        root = math.sqrt(self.scale)
        phi_q = self._features(q * root, per_row=True).transpose(-1, -2)  # (B, H, m, n): sequence last
        phi_k = self._features(k * root, per_row=False).transpose(-1, -2)  # (B, H, m, n)
        if mask is not None:  # additive per-key mask (B, 1|H, 1, n) → multiplicative factor on φ(k_j)
            phi_k = phi_k * torch.exp(mask.clamp_min(-80.0))
        onnx = torch.onnx.is_in_onnx_export()  # onnxruntime runs two-sided complex DFTs only
        spectrum = self.bias.spectrum(n, self.causal, full=onnx)  # (H, 1, 1, P/2 + 1 or P)
        # A ones column under v makes the denominator the last column of the same Toeplitz product.
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1).transpose(-1, -2)  # (B, H, d_v + 1, n)
        chunk = self._chunk(v1, n)
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if onnx or training or not isinstance(n, int):  # out= has no autograd; exports trace plainly
            out = torch.zeros_like(v1)
            for start in range(0, phi_k.shape[-2], chunk):
                pk = phi_k[:, :, start:start + chunk, None, :]  # (B, H, c, 1, n)
                mixed = toeplitz_apply(spectrum, pk * v1[:, :, None], full=onnx)  # (B, H, c, d_v + 1, n)
                out = out + (phi_q[:, :, start:start + chunk, None, :] * mixed).sum(2)
        else:
            out = _mix_in_place(phi_q, phi_k, v1, spectrum, chunk)
        return (out[:, :, :-1] / out[:, :, -1:].clamp_min(1e-30)).transpose(-1, -2)

    def _chunk(self, v1: torch.Tensor, n) -> int:
        """Features per FFT batch: `chunk`, fewer at long lengths (each holds B·H·c·(d_v+1)·2n values),
        and a divisor of the feature count, so that every batch fills the reused buffers."""
        if not isinstance(n, int):
            return self.chunk
        per_feature = v1.shape[0] * v1.shape[1] * v1.shape[2] * fft_size(n)
        most = max(1, min(self.chunk, (1 << 26) // per_feature))
        return max(c for c in range(1, most + 1) if self.w.shape[0] % c == 0)

    def _features(self, x: torch.Tensor, per_row: bool) -> torch.Tensor:
        logits = x @ self.w.T - (x * x).sum(-1, keepdim=True) / 2          # (B, H, n, m)
        # Stabilizers: a constant per query row (q) or per head (k) cancels between numerator and denominator.
        shift = logits.amax(-1, keepdim=True) if per_row else logits.amax(dim=(-2, -1), keepdim=True)
        return torch.exp(logits - shift.detach()) / math.sqrt(self.w.shape[0])


def _mix_in_place(phi_q, phi_k, v1, spectrum, chunk: int) -> torch.Tensor:
    """Σ_f φ_f(q) ⊙ T(φ_f(k) ⊙ v1), eager, with every large temporary allocated once and reused.

    At 16k tokens each chunk's temporaries are hundreds of MB; allocated afresh per chunk, the kernel
    spent more time faulting in new pages than in the FFTs (a complex multiply: 87 ms out of place,
    18 ms in place; the φ(q) contraction: 65 ms as mul + sum, 7 ms as addcmul_).
    """
    n, p = v1.shape[-1], fft_size(v1.shape[-1])
    assert phi_k.shape[-2] % chunk == 0, "every chunk fills the buffers (out= on whole tensors only)"
    block = v1.new_zeros(*v1.shape[:2], chunk, v1.shape[2], p)  # zero tail: the circulant padding
    spectra = torch.empty(*block.shape[:-1], p // 2 + 1, dtype=spectrum.dtype)
    mixed = torch.empty_like(block)
    out = torch.zeros_like(v1)
    for start in range(0, phi_k.shape[-2], chunk):
        torch.mul(phi_k[:, :, start:start + chunk, None, :], v1[:, :, None], out=block[..., :n])
        torch.fft.rfft(block, out=spectra)
        spectra.mul_(spectrum)
        torch.fft.irfft(spectra, n=p, out=mixed)
        for f in range(chunk):
            out.addcmul_(phi_q[:, :, start + f, None, :], mixed[:, :, f, :, :n])
    return out
