"""A DGQ layer in the compressed-tensors format that `from_pretrained` (with the compressed-tensors package)
and vLLM load: W = scale[o, g]·(q[o, k] − zp[o, g]), asymmetric int weights per group, int8 per-token dynamic
activations (the W4A8 scheme), with `act=static` int8 activations on each layer's calibrated scale
(compressed-tensors' "tensor" strategy and `input_scale`), or with `act=tensor` dynamic asymmetric ones per
tensor (the same codes: compressed-tensors' zero point is onnxruntime's less 128).

DGQ's W = s1[o]·W_s8[o, k] with W_s8 = S·(q − z) ∈ ±127 is such a grid: per group, S′ = gcd|W_s8| and
d = W_s8/S′ span at most 15 (2^bits − 1 for mixed precision's wider codes), so q′ = d − min d, zp = −min d,
scale = s1·S′ give the same codes and weights (to the float32 rounding of s1·S′, a few 1e-8 relative). A group whose d spans more than 15 (an int8_weights()
layer, a 5–8-bit code) goes to the 8-bit group of the same scheme. Codes are stored one per int8 (the
"int-quantized" format, what compressed-tensors infers and llm-compressor writes for int8 activations), not
packed: transformers cannot load asymmetric "pack-quantized" checkpoints (it expects the zero points
unpacked; vllm-project/llm-compressor#1618), so the 4-bit codes take a byte each on disk.

compressed-tensors quantizes activations with scale max|x|/127.5 where DGQ uses max|x|/127: the reloaded
model has these weights exactly and activations on a 0.4% finer grid, so its logits differ from the
in-memory model's at the activation-rounding level, not more.
"""
from __future__ import annotations

import math

import torch

GROUP = 128  # the group of an int8_weights() layer, which has none of its own


def encode(w_s8: torch.Tensor, s1: torch.Tensor, group: int | None) -> tuple[dict[str, torch.Tensor], int, int]:
    """(tensors under their compressed-tensors names, bits 4 or 8, group size) for W = s1·W_s8."""
    out, k = w_s8.shape
    # compressed-tensors needs whole groups: a padded last group (SmolLM2's 576 = 4.5 × 128) is written as
    # groups of gcd(K, group) (64), each half of a DGQ group, whose parameters it repeats: the same weights.
    group = math.gcd(k, group or GROUP)
    grouped = w_s8.to(torch.int32).reshape(out, k // group, group)
    step = torch.zeros(out, k // group, dtype=torch.int32)
    for i in range(group):
        step = torch.gcd(step, grouped[..., i].abs())
    step = step.clamp_min(1)
    steps = grouped // step[..., None]
    low, high = steps.amin(-1), steps.amax(-1)
    bits = 4 if int((high - low).max()) <= 15 else 8
    offset = 1 << (bits - 1)  # compressed-tensors keeps signed codes: q − 2^(bits−1)
    codes = (steps - low[..., None]).reshape(out, k)
    return {"weight": (codes - offset).to(torch.int8),
            "weight_scale": (s1[:, None].double() * step.double()).float(),
            "weight_zero_point": (-low - offset).to(torch.int8)}, bits, group

