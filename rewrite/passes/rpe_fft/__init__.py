"""softmax(s·QKᵀ + B)V with B[i,j] = b_{j−i} → φ(Q)·T_c(φ(K) ⊗ V) / φ(Q)·T_c(φ(K)), c_t = exp(b_t), by FFT.

Attention with a relative-position bias (T5's buckets, ALiBi, learned tables) costs O(n²) time and, with
a float bias, O(n²) memory. Kernelized with positive random features φ (E[φ(x)·φ(y)] = exp(x·y)), every
sum over keys is a Toeplitz product along the sequence, run in O(n log n) on the circulant embedding
(`kernel.py` has the equations and stabilizers). The bias is found and proven Toeplitz by `detect.py`,
read off once as a table b_t (evaluated at the longest length the model's code allows, up to
`max-length`), shared between layers that share it (T5), and extended past the table when its tail is
flat or linear; padding masks become per-key factors, causal masks a causal Toeplitz product.

Paper: Luo et al., "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding",
NeurIPS 2021 (arXiv:2106.12566). Contract: approximate. Converting a trained softmax model without training
leaves errors of the order of the outputs (pretrained q/k norms are large and the feature estimator's
variance grows like exp(‖q‖‖k‖)); the report gives the error, and recovery (`--recover`) trains the
model around the new attention. `normalize=true` is the paper's stable variant (unit q and k).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from rewrite.errors import InvalidValue
from rewrite.match import replace_match
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor, is_graph
from rewrite.passes.rpe_fft import detect
from rewrite.passes.rpe_fft.kernel import RPEFFTAttention, ToeplitzBias

__all__ = ["KernelizedRPE", "RPEFFTAttention", "ToeplitzBias"]


class MaskedRPEFFTAttention(RPEFFTAttention):
    """The kernelized attention with a (batch, n) padding mask input: keys where it is 0 are dropped."""

    def forward(self, q, k, v, keep):  # type: ignore[override]
        additive = torch.where(keep != 0, 0.0, -torch.inf).to(q.dtype)[:, None, None, :]
        return super().forward(q, k, v, additive)


@dataclass(frozen=True)
class KernelizedRPE(SqnrFloor, Pass):
    name = "rpe-fft"
    paper = "Luo et al., Kernelized Attention with Relative Positional Encoding, NeurIPS 2021 (arXiv:2106.12566)"
    summary = "attention with a Toeplitz relative-position bias → kernelized attention by FFT, O(n log n), no n×n"
    applies_to = "softmax(q·kᵀ·s + B)·v or sdpa(attn_mask=B) with B[i,j] = b(j − i) (+ padding/causal masks)"
    recoverable = True
    needs_recovery = True

    # 32: faster than exact attention with its bias from 16k tokens on (1.56x) and 3.7x at 64k on this
    # machine, where 64 was 0.56x and 1.95x; on the look-back task both recover to accuracy 1.000.
    features: int = 32
    normalize: bool = False
    max_length: int = 1024
    chunk: int = 16
    seed: int = 0
    min_sqnr: float = 10.0

    def __post_init__(self):
        if self.features <= 0:
            raise InvalidValue(f"features={self.features}: give a positive number of random features (16–256)")
        if self.max_length < 2 or self.chunk <= 0:
            raise InvalidValue("max-length must be ≥ 2 and chunk > 0")

    @classmethod
    def patterns(cls) -> list:
        return [detect.attention()]

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        if not is_graph(module):
            return PassResult(module, False, skipped=[("model", "rpe-fft needs a captured graph")])
        found = detect.attention().find(module)
        if not found:
            return PassResult(module, False, skipped=[("model", found.or_else(self.applies_to))])
        done, skipped, shared = [], [], []
        lengths = tuple(L for L in (4096, 2048, 1024, 512, 256, 128, 64, 32) if L <= self.max_length)
        for i, match in enumerate(found):
            ctx.step(f"proving attention {i + 1} Toeplitz", i, len(found))
            where = match.outputs[0].name
            reason = self._rewrite(module, match, ctx, lengths, shared, i)
            (skipped.append((where, reason)) if reason else done.append(where))
        module.delete_all_unused_submodules()
        stats = {"attentions": len(done), "features": self.features, "bias_tables": len(shared),
                 "longest_table": max((b.limit for b in shared), default=0),
                 "tails": ",".join(sorted({b.tail for b in shared})) or "-", "normalize": self.normalize}
        return PassResult(module, bool(done), stats, skipped)

    def _rewrite(self, gm: fx.GraphModule, match, ctx: PassContext, lengths, shared: list, index: int) -> str | None:
        found = detect.read(match)
        if isinstance(found, str):
            return found
        head_dim = detect._last_dim(found.q)
        if head_dim is None:
            return "the head dimension is not known"
        bias = detect.prove(gm, found, ctx.calibration[0], lengths)
        if isinstance(bias, str):
            return bias
        table = _shared(shared, bias)
        cls = MaskedRPEFFTAttention if bias.mask is not None else RPEFFTAttention
        attention = cls(table, head_dim, found.scale, self.features, self.seed, causal=bias.causal,
                        normalize=self.normalize, chunk=self.chunk)
        inputs = [found.q, found.k, found.v] + ([bias.mask] if bias.mask is not None else [])
        replace_match(gm, match, attention, inputs, match.outputs, name=f"rpe_fft_{index}")
        return None


def _shared(tables: list[ToeplitzBias], bias: detect.Bias) -> ToeplitzBias:
    """One ToeplitzBias per distinct table (T5 shares its bias across layers; so do the rewritten layers)."""
    for existing in tables:
        if existing.table.shape == bias.table.shape and torch.equal(existing.table, bias.table):
            return existing
    table = ToeplitzBias(bias.table, bias.tail)
    tables.append(table)
    return table
