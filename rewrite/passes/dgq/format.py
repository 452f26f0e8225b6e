"""The DGQ format: W ≈ s1[o]·S[o,g]·(q[o,k] − z[o,g]), g = k // group (DGQ §3.1, "dual-grained" scales).

uint4 codes q with a zero point z per (row, group along K), an integer group scale S ∈ 1..127 and one fp
scale s1 per output channel, so that W_s8 = S·(q − z) ∈ [−127, 127]: the matmul is one int8 GEMM over all
of K with an fp epilogue, y = s_x·s1[o]·Σ_k x_q[k]·W_s8[o,k] + b. `DGQLinear` runs it (`kernels`: the
custom ops and their ONNX form) and ships it (`ship`: compressed-tensors).

Paper: Zhang et al., "Dual Grained Quantization: Efficient Fine-Grained Quantization for LLM",
arXiv:2310.04836 (2023).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewrite import rotation
from rewrite.errors import NoCompressedForm
from rewrite.passes.dgq import kernels, ship


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
        return (expand(self.S, self.group) * (self.q - expand(self.z, self.group)))[:, :self.k].to(torch.int8)

    def dequantized(self) -> torch.Tensor:
        return self.s1[:, None] * self.w_s8().float()


ROTATION = ("rot_signs", "rot_outer", "rot_block")  # an input rotated online: Q's factors (`rotation`)
ACTS = ("per-token", "static", "tensor")  # int8 activations: dynamic per token, calibrated, dynamic per tensor


def act_of(s_x: torch.Tensor, act: str | None) -> str:
    """The activation scheme: as given, else what s_x says (one calibrated scale: static; none: per-token)."""
    if act is not None and act not in ACTS:
        raise ValueError(f"act={act!r}: a DGQ layer's activations are one of {', '.join(ACTS)}")
    if act == "tensor" and s_x.numel():
        raise ValueError("act=tensor makes its scale from each input: it takes no calibrated s_x")
    return act or ("static" if s_x.numel() else "per-token")


def expand(per_group: torch.Tensor, group: int) -> torch.Tensor:
    return per_group.repeat_interleave(group, dim=1)

class DGQLinear(nn.Module):
    """A8W4 Linear. form="int8": bit-exact DGQ (int8 GEMM); form="w4": 4-bit storage (MatMulNBits in ONNX)."""

    weight_bits = 4  # wider codes (mixed precision's upgrade): 5–7; int8_weights() layers: 8
    act: str | None = None  # ACTS; None in layers pickled before act=tensor existed: what s_x says

    def __init__(self, weights: DGQWeights, bias: torch.Tensor | None, s_x: torch.Tensor, form: str,
                 act: str | None = None):
        super().__init__()
        out = weights.q.shape[0]
        if form == "w4" and weights.bits != 4:
            raise ValueError("form w4 stores 4-bit codes only")
        self.form, self.group, self.in_features, self.weight_bits = form, weights.group, weights.k, weights.bits
        self.act = act_of(s_x, act)
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None else torch.zeros(out))
        if form == "int8":
            self._int8_buffers(weights.w_s8(), weights.s1, s_x)
        else:
            self.register_buffer("packed", kernels.pack_nibbles(weights.q.reshape(out, -1, weights.group)))
            self.register_buffer("scales", (weights.S.float() * weights.s1[:, None]).contiguous())
            self.register_buffer("zeros", kernels.pack_nibbles(weights.z))

    @classmethod
    def int8_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None, s_x: torch.Tensor,
                     act: str | None = None) -> DGQLinear:
        """W8A8 for the layers mixed precision keeps at 8 bits: per-row symmetric int8 weights (round to
        nearest), the same int8 GEMM and ONNX form."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.form, layer.group, layer.in_features, layer.weight_bits = "int8", None, weight.shape[1], 8
        layer.act = act_of(s_x, act)
        s1 = (weight.abs().amax(1) / 127).clamp_min(1e-12).float()
        layer.register_buffer("bias", bias.detach().float().clone() if bias is not None else torch.zeros(len(s1)))
        layer._int8_buffers(torch.round(weight / s1[:, None]).clamp(-127, 127).to(torch.int8), s1, s_x)
        return layer

    def saved_config(self) -> dict:
        """What a saved layer needs besides its tensors (`from_state`; rewrite's layers folder)."""
        return {"form": self.form, "group": self.group, "in_features": self.in_features, "bits": self.weight_bits,
                "act": self.act}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], form: str, group: int | None, in_features: int,
                   bits: int, act: str | None = None) -> DGQLinear:
        """The layer its buffers and `saved_config()` describe (a layers folder, `rewrite.checkpoint`)."""
        names = ("bias", "w_s8", "s1", "s_x") if form == "int8" else ("bias", "packed", "scales", "zeros")
        names += ROTATION if ROTATION[0] in tensors else ()
        if set(tensors) != set(names):
            raise ValueError(f"a {form} DGQ layer holds {', '.join(names)}, not {', '.join(sorted(tensors))}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.form, layer.group, layer.in_features, layer.weight_bits = form, group, in_features, bits
        for name in names:
            layer.register_buffer(name, tensors[name])
        layer.act = act_of(tensors.get("s_x", torch.empty(0)), act)  # folders written before act=tensor: None
        return layer

    def rotate_inputs(self, factors: rotation.Factors) -> DGQLinear:
        """Multiply each input by Q before its int8 codes (`dgq{hadamard=…}`); the weights were quantized as W·Q,
        so the layer still computes x·Wᵀ = (x·Q)·(W·Q)ᵀ."""
        block = rotation.hadamard(factors.block)
        for name, tensor in zip(ROTATION, (factors.signs, factors.outer, block)):
            self.register_buffer(name, tensor.float().contiguous())
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The stored integer weights (int8 W_s8, or form=w4's packed uint8), as bitsandbytes' int8 layers expose
        theirs: model code that reads a Linear's weight for its dtype or device runs (T5's FFN casts its input
        to `wo.weight.dtype` unless that is int8). `float_weight()` gives the values."""
        return self.w_s8 if self.form == "int8" else self.packed

    @property
    def rotated(self) -> bool:
        return ROTATION[0] in self._buffers

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
        if self.rotated:
            raise NoCompressedForm("its input is rotated online (dgq's hadamard), which transformers' "
                                   "compressed-tensors loader does not apply")
        tensors, bits, group = ship.encode(self.w_s8, self.s1, self.group)
        act = act_of(self.s_x, self.act)
        if act != "static":  # scales made from each input: per token, or per tensor with a zero point
            return tensors | {"bias": self.bias}, {"bits": bits, "group": group, "act": act}
        # act=static: compressed-tensors' static per-tensor int8 activations, with its scale (and the zero point
        # it registers for every static input, 0: symmetric)
        static = {"input_scale": self.s_x.reshape(1).float().clone(),  # a copy: siblings share one s_x
                  "input_zero_point": torch.zeros(1, dtype=torch.int8)}
        return tensors | static | {"bias": self.bias}, {"bits": bits, "group": group, "act": "static"}

    def format_bits(self) -> float:
        """Bits per weight of the format, whatever the storage: 4-bit codes with an int8 scale and a 4-bit zero
        point per group, or int8; plus a float32 scale per row."""
        per_group = (8 + self.weight_bits) / self.group if self.group else 0  # S (int8) and z per group
        return self.weight_bits + per_group + 32 / self.in_features

    def float_weight(self) -> torch.Tensor:
        """The weights this layer multiplies its (unrotated) input by, dequantized (O, K) in float32."""
        if self.form == "int8":
            weight = self.s1[:, None] * self.w_s8.float()
        else:
            weight = kernels.unpack_w4(self.packed, self.zeros, self.scales, self.group)[:, :self.in_features]
        if not self.rotated:
            return weight
        q = rotation.Factors(self.rot_signs.double(), self.rot_outer.double()).dense()
        return (weight.double() @ q.T).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # model code cast it to `weight`'s dtype (Mamba's head): the values are lost
            raise TypeError(f"a dgq layer got a {x.dtype} input: the model's code casts this layer's input to its "
                            "weight's dtype, which is the stored int8; leave the layer in float (dgq{keep=PATH})")
        if self.rotated:
            x = rotation.apply(x, self.rot_signs, self.rot_outer, self.rot_block)
        if self.form == "int8" and self.act == "tensor":
            return kernels.a8w8_dynamic(x, self.w_s8, self.s1, self.bias)
        if self.form == "int8":
            return kernels.a8w8(x, self.w_s8, self.s1, self.bias, self.s_x)
        return kernels.w4_linear(x, self.packed, self.scales, self.zeros, self.bias)

    def stored_bits_per_weight(self) -> float:
        weights = (self.w_s8 if self.form == "int8" else self.packed)
        extra = [t for n, t in self.named_buffers() if n not in ("w_s8", "packed", "bias")]
        count = self.w_s8.numel() if self.form == "int8" else self.packed.numel() * 2
        return 8 * (weights.numel() * weights.element_size() + sum(t.numel() * t.element_size() for t in extra)) / count
