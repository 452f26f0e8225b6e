"""W x + b → s_x·s1[o]·Σ_k x_q[k]·S[o,G(k)]·(q[o,k] − z[o,G(k)]) + b: Dual-Grained Quantization, A8W4.

uint4 codes q with a zero point z per (row, group of 64 along K; the paper's 128 with group=128), an integer
group scale S ∈ 1..127, and one fp scale s1 per output channel, so that W_s8 = S·(q − z) ∈ [−127, 127] (the
clamp of q to z ± ⌊127/S⌋ makes overflow impossible) and the matmul is one int8 GEMM over all of K with an fp
epilogue. Activations: int8 symmetric, static per-tensor (calibrated) or dynamic per-token (the default), or
act=tensor: uint8 codes q_x on each input tensor's range with a zero point z_x, made at run time (onnxruntime's
quantize_dynamic scheme, x ≈ s_x·(q_x − z_x): one DynamicQuantizeMatMul node a layer in ONNX); first
(smooth=true, the default) each Linear input's channels are divided by s where the input is made (a norm's
weight, `up`'s rows) and s multiplied into the consuming columns, x·W = (x/s)·(s·W), exact in float; s is DGQ
§3.3's percentile clipping, AWQ's mean|x|^α or none, whichever leaves the lowest estimated output error on the
first 1,024 calibration tokens (`smoothing`). hadamard=PATTERN instead rotates the inputs of the Linears it
names online, x·Wᵀ = (x·Q)·(W·Q)ᵀ with Q a randomized Hadamard transform (QuaRot, arXiv:2404.00456, for
down_proj's input, which `rotate` cannot reach): the codes are made from x·Q, whose outliers are spread.
Two-phase search: per group, 20 clip ratios (1.01 → 0.80) minimizing that group's partial output error
on calibration activations; then per row, up to 80 ratios (1.01 → 0.20) for s1 minimizing the row's output
error, a row's search stopping once 8 ratios (40 without feedback) in a row found nothing better.
search=off is the round-to-nearest baseline in the same format. feedback (default) then rounds the codes again
on that grid, column by column, costliest first (act-order: xᵀx's diagonal by the squared grid step), each
column's error pushed onto the columns not yet rounded through the inverse of H = xᵀx (GPTQ, Frantar et al.,
arXiv:2210.17323; DGQ's code offers it as a weight function); with feedback the search weighs each weight's
error by H's diagonal alone (feedback then handles the rest: lower output error than the full d·H·dᵀ on
SmolLM2's layers). Layers are quantized one at a time, each calibrated on activations produced by the
already-quantized layers before it; layers that read the same value (q/k/v, gate/up) are quantized together.
A 1×1 convolution (stride 1, no padding, one group) is the Linear over each grid point's channels and is
quantized as one (`compress.OverChannels`), its output left channels-last for the convolutions after it, its
activation codes one scale per tensor (conv-act=tensor: per-token scales cost most where many grid points have
few channels). Weights outside Linears and 1×1 convolutions stay in float, and the report names them with their
share of the model: a CNN's spatial convolutions, a mixture-of-experts block's 3-D expert weights (transformers 5's
Mixtral, Qwen3-MoE: most of such a model).
Speed depends on the CPU's int8 dot products, and the report measures it on yours. With AVX-512 VNNI
(oneDNN's int8 GEMM) SmolLM2 ran 1.62x fp32's prefill speed and 1.16x its decode in eager torch, and
MiniLM 1.9x in onnxruntime. On x86 with AVX2 only, the exact int8 sums need float32 GEMMs of the converted
weights: 0.90x prefill and 0.68–0.78x decode, and 0.99x in onnxruntime (benchmarks/RESULTS.md).

Paper: Zhang et al., "Dual Grained Quantization: Efficient Fine-Grained Quantization for LLM",
arXiv:2310.04836 (2023); code ilur98/DGQ. Contract: approximate, SQNR ≥ min-sqnr dB.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from rewrite import compress, rotation, verify
from rewrite.calibration import first_tokens, sequential_inputs
from rewrite.errors import InvalidValue
from rewrite.pass_base import Pass, PassContext, PassResult, SqnrFloor
from rewrite.passes.dgq import kernels, mixed
from rewrite.passes.dgq.format import DGQLinear, DGQWeights  # noqa: F401  (the format, from the pass's package)
from rewrite.passes.dgq.search import (  # noqa: F401
    FEEDBACK_PATIENCE,
    PATIENCE,
    LayerInputs,
    OutputError,
    quantize_layers,
    quantize_weight,
)
from rewrite.passes.dgq.smoothing import smooth_inputs
from rewrite.patterns import layers, same_input, set_submodule, shared_weight

MAX_TOKENS = 4096  # calibration tokens run through the model for the search (and kept per layer)
PEAK_TOKENS = 1024  # tokens whose channel statistics choose the smoothing (outlier channels recur in every batch)
ERROR_TOKENS = 512  # tokens each layer's reported error is measured on
HADAMARD_SEED = 0  # one Q per input width, the same in every run
FFN_DOWN = "ffn-down"  # hadamard's name for the down Linear of every feed-forward block


@dataclass(frozen=True)
class DualGrainedQuant(SqnrFloor, Pass):
    name = "dgq"
    paper = "Zhang et al., Dual Grained Quantization (A8W4), arXiv:2310.04836"
    summary = "Linears and 1×1 convolutions → int4 groups with int8 group scales and int8 activations (int8 GEMM)"
    applies_to = ("Linear layers, and 1×1 convolutions as Linears over channels (form=w4: in_features a multiple of "
                  "the group size)")
    needs_calibration = True
    level = "module"

    # The paper's is 128; 64 lost less on unseen text on SmolLM2 at 4.23 bits. After `rotate` (and `hadamard`),
    # whose spread channels share a scale well, 128 lost less at 5 and at 4.25 bits (RESULTS.md).
    group: int = 64
    act: Literal["static", "per-token", "tensor"] = "per-token"
    # The activation codes of 1×1 convolutions (read as Linears over channels): one scale per tensor. Many grid
    # points of few channels make per-token scales costly: MobileNetV3-Large after fold-bn ran 1.37x with them
    # per tensor against 1.15x per token in eager torch, and 0.69x against 0.59x in onnxruntime (RESULTS.md).
    conv_act: Literal["static", "per-token", "tensor"] = "tensor"
    search: bool = True
    feedback: bool = True
    form: Literal["int8", "w4"] = "int8"
    smooth: bool = True
    bits: int = 4
    # Judged on held-out batches of the calibration text, which flatter the model: on SmolLM2 0.99 was met with
    # 4.33 bits and lost 1.31x fp32 perplexity on another text; 0.995 took 5.00 bits and 1.08–1.15x (RESULTS.md).
    budget_cos: float = 0.995
    max_bits: float = 5.0
    upgrade_bits: int = 5
    min_sqnr: float = 10.0
    # Linears left in float, by path pattern (fnmatch, several joined by "|"): `keep=lm_head`, as llm-compressor's
    # recipes ignore the output head. After `rotate` SmolLM2's untied head lost the most on unseen prose (RESULTS.md).
    keep: str = ""
    # Linears whose inputs are rotated online by a randomized Hadamard transform before their int8 codes (QuaRot's
    # online rotation, the same fnmatch patterns): `hadamard=*down_proj`, or `hadamard=ffn-down` for the down Linear
    # of every feed-forward block, whatever the family calls it. On SmolLM2 after `rotate`, the int8
    # activations then cost 0.2% of perplexity instead of 1.9% (RESULTS.md). compressed-tensors has no form
    # for it that transformers loads: such a model is written as rewrite's layers folder.
    hadamard: str = ""

    def __post_init__(self):
        if self.bits != 4:
            raise InvalidValue(f"bits={self.bits} is not supported: DGQ stores 4-bit weights (bits=4)")
        if not 5 <= self.upgrade_bits <= 8:
            raise InvalidValue(f"upgrade-bits={self.upgrade_bits}: mixed precision widens codes to 5–7 bits (same "
                               "format) or 8 (W8A8, int8 weights); give 5, 6, 7 or 8")
        if self.group <= 0 or self.group % 2:
            raise InvalidValue("group must be a positive even number (64 by default, 128 in the paper)")

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        skipped, smoothed = compress.unread_weights(module, "dgq quantizes Linears and 1×1 convolutions"), {}
        compress.linearize_pointwise(module)  # 1×1 convolutions are Linears over channels
        candidates = dict(layers(module, (nn.Linear,)))
        rotated = self._rotated(module, candidates)
        if self.smooth:
            peak_batches = first_tokens(ctx.original_calibration or ctx.calibration, PEAK_TOKENS)
            smoothed, why_not = smooth_inputs(module, peak_batches, self.group,
                                              self.act if self.form == "int8" else None,  # w4: fp activations
                                              lambda path: path in rotated)
            skipped += why_not
        fit, judge = mixed.fit_and_judge(ctx) if self.budget_cos else (ctx.calibration, None)
        fit = first_tokens(fit, MAX_TOKENS)  # more text than the search keeps would only cost forwards
        reference = mixed.output_vectors(module, *judge) if judge else None
        skipped += [(option, f"{option}={value} names no Linear (a pattern matches the whole path, e.g. *down_proj)")
                    for option, value, named in (("keep", self.keep, [p for p in candidates if self._kept(module, p)]),
                                                 ("hadamard", self.hadamard, rotated))
                    if value and not named]
        held = ctx.leave_as_is
        reasons = {path: held.get(path) or self._why_not(module, path, linear) for path, linear in candidates.items()}
        skipped += [(path, reason) for path, reason in reasons.items() if reason]
        todo = [path for path, reason in reasons.items() if not reason]
        w4, wide, errors, originals = self._quantize_all(module, ctx, candidates, todo, fit, skipped, rotated)
        chosen, reached = {path: w4[path] for path in w4}, None
        if reference is not None and w4:
            chosen, reached = mixed.mixed_precision(module, ctx, judge, reference, w4, wide, originals, self.budget_cos,
                                                           self.max_bits, self.upgrade_bits)
        stats = self._stats(chosen, errors, smoothed, reached)
        convs = sum(compress.of_convolution(module, path) for path in chosen)
        if convs:
            stats |= {"convolutions": convs, "conv_act": self.conv_act}
        if judge:
            stats["budget_judged_on"] = ("held-out calibration batches" if len(judge[0]) < len(ctx.calibration) else
                                         "the calibration data the weights were fit on (one batch: none held out)")
        return PassResult(module, bool(w4), stats, compress.restore_pointwise(module, skipped))

    def _quantize_all(self, module: nn.Module, ctx: PassContext, candidates: dict[str, nn.Linear], todo: list[str],
                      fit: list[tuple], skipped: list, rotated: set[str]) -> tuple[dict, dict, dict, dict]:
        """Every layer in `todo`, in execution order, each on inputs through the layers already quantized; the
        layers that read the same value (q/k/v, gate/up) together, at their first."""
        w4, wide, errors, originals, shared, silent = {}, {}, {}, {}, None, set()
        readers = same_input(module, todo)
        for i, (path, inputs) in enumerate(sequential_inputs(module, todo, fit)):
            ctx.step(f"searching scales of {path}", i, len(todo))
            if path in w4 or path in silent:
                continue  # done with the first layer that reads its inputs
            x, group = _rows(inputs), [p for p in readers[path] if p not in w4]
            if x.abs().max() == 0:
                silent.update(group)
                skipped += [(p, "its calibration activations are all zero: no scale can be set") for p in group]
                continue
            turn = self._rotation(group, candidates[path].in_features, rotated)
            fit_x = x if turn is None else turn.apply(x)
            shared = shared if shared is not None and shared.same(fit_x) else LayerInputs(fit_x)
            act = self.conv_act if compress.of_convolution(module, path) else self.act
            s_x = kernels.static_scale(fit_x) if act == "static" else torch.empty(0)
            for p, found in zip(group, self._quantized([candidates[p] for p in group], shared, s_x, act, turn)):
                w4[p] = found[0]
                if self.budget_cos:  # the alternative mixed precision may choose
                    wide[p], originals[p] = found[1], candidates[p].weight.detach()
                sample = x[::max(1, len(x) // ERROR_TOKENS)]
                with torch.no_grad():
                    errors[p] = verify.relative_error(candidates[p](sample), w4[p](sample))
                set_submodule(module, p, w4[p])
        return w4, wide, errors, originals

    def _rotated(self, module: nn.Module, candidates: dict[str, nn.Linear]) -> set[str]:
        """The Linears `hadamard` names: by fnmatch pattern, or `ffn-down`, the down Linear of every feed-forward
        block as the shared matcher finds it (down_proj, fc2, c_proj, output.dense: one spec for every family)."""
        rotated = {path for path in candidates if _named(path, self.hadamard)}
        if FFN_DOWN in self.hadamard.split("|") and isinstance(module, fx.GraphModule):
            rotated |= compress.ffn_down_paths(module) & set(candidates)
        return rotated

    def _rotation(self, paths: list[str], width: int, rotated: set[str]) -> rotation.Factors | None:
        """Q for inputs that `hadamard` names (64 | width: a Hadamard block; elsewhere no rotation)."""
        if any(p in rotated for p in paths) and width % rotation.BLOCK == 0:
            return rotation.factors(width, HADAMARD_SEED)
        return None

    def _quantized(self, linears: list[nn.Linear], x: LayerInputs, s_x: torch.Tensor, act: str,
                   turn: rotation.Factors | None = None) -> list[list[DGQLinear]]:
        """Per layer (all reading x), the layer at 4 bits and, when mixed precision may choose it, with wider
        weights: upgrade-bits codes in the same format and int8 GEMM (found by the same search and feedback,
        side by side), or W8A8 (upgrade-bits=8). MiniLM, every layer wide: 5-bit codes reach embedding
        cosine 0.9929 at 5.16 bits, int8 weights 0.9920 at 8.1. (Without the scale search, SmolLM2's first 4
        blocks needed 20 layers wide for budget-cos=0.9995 instead of 16.)"""
        weights = [linear.weight.detach() for linear in linears]
        if turn is not None:  # the weights as the rotated inputs meet them: x·Wᵀ = (x·Q)·(W·Q)ᵀ
            weights = [turn.apply(w.double()).float() for w in weights]
        widths = (self.bits, self.upgrade_bits) if self.budget_cos and self.upgrade_bits < 8 else (self.bits,)
        found = quantize_layers(weights, x, self.group, self.search, self.feedback, widths, self._patience())
        act = act if self.form == "int8" else None  # form=w4: MatMulNBits quantizes per block itself
        layers_found = [[DGQLinear(q, linear.bias, s_x, self.form if q.bits == self.bits else "int8", act)
                         for q in per] for linear, per in zip(linears, found)]
        if self.budget_cos and self.upgrade_bits == 8:
            for linear, weight, per in zip(linears, weights, layers_found):
                per.append(DGQLinear.int8_weights(weight, linear.bias, s_x, act))
        if turn is not None:
            for per in layers_found:
                for layer in per:
                    layer.rotate_inputs(turn)
        return layers_found

    def _patience(self) -> int:
        return FEEDBACK_PATIENCE if self.feedback else PATIENCE

    def _stats(self, chosen: dict[str, DGQLinear], errors: dict[str, float], smoothed: dict[str, int],
               reached: float | None) -> dict:
        sizes = {path: layer.weight_count() for path, layer in chosen.items()}
        total = sum(sizes.values()) or 1
        wide = [path for path, layer in chosen.items() if layer.weight_bits > self.bits]
        return {"quantized": len(chosen), "form": self.form, "act": self.act, "search": self.search,
                "smoothed_inputs": sum(n for kind, n in smoothed.items() if kind != "none"),
                "smoothing": ", ".join(f"{kind} {n}" for kind, n in smoothed.items()),  # inputs per kind of scale
                "rotated_inputs": sum(layer.rotated for layer in chosen.values()),
                "upgraded_layers": len(wide), "upgrade_bits": self.upgrade_bits, "budget_cos": self.budget_cos,
                "calibration_cosine": round(reached, 5) if reached is not None else None,
                "budget": _budget_note(self, reached),
                "bits_per_weight": round(sum(chosen[p].format_bits() * n for p, n in sizes.items()) / total, 3),
                "stored_bits_per_weight": round(sum(chosen[p].stored_bits_per_weight() * n
                                                    for p, n in sizes.items()) / total, 3),
                "worst_layer_rel_err": round(max(errors.values()), 4) if errors else 0, "layer_rel_err": errors,
                "upgraded": wide}

    def _kept(self, module: nn.Module, path: str) -> bool:
        return _named(path, self.keep) or _named(compress.user_path(module, path), self.keep)

    def _why_not(self, module: nn.Module, path: str, linear: nn.Linear) -> str | None:
        if self._kept(module, path):
            return f"kept in float (keep={self.keep})"
        if shared_weight(module, path):
            return f"{compress.SHARED}: quantizing it would untie them"
        if self.form == "w4" and linear.in_features % self.group:
            return (f"in_features {linear.in_features} is not a multiple of group={self.group} (form=w4 packs whole "
                    "groups; the default form=int8 pads the last group)")
        if not torch.isfinite(linear.weight).all():
            return "weights contain NaN or inf"
        if self.form == "w4" and self.group & (self.group - 1):
            return "form=w4 (MatMulNBits) needs a power-of-two group"
        return None


def _named(path: str, patterns: str) -> bool:
    """Whether fnmatch patterns joined by "|" (keep, hadamard) name the layer at `path`."""
    return bool(patterns) and any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns.split("|"))


def _rows(inputs: list[torch.Tensor]) -> torch.Tensor:
    """A layer's calibration inputs as (tokens, features), at most MAX_TOKENS of them (a seeded sample)."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    if x.shape[0] > MAX_TOKENS:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_TOKENS]]
    return x.float()

def _budget_note(p: DualGrainedQuant, reached: float | None) -> str:
    if reached is None:
        return "off (budget-cos=0): every layer at 4 bits"
    if reached >= p.budget_cos:
        return f"met: output cosine {reached:.4f} ≥ {p.budget_cos} on the calibration data"
    return (f"max-bits={p.max_bits:g} came first: output cosine {reached:.4f} < budget-cos={p.budget_cos}; raise "
            "max-bits for more layers with wider weights, or lower budget-cos for fewer bits")

