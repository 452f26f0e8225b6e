"""DGQ A8W4 kernels as torch.library custom ops (with fake kernels), and their ONNX translations.

rewrite::a8w8_linear(x, w_s8, s1, bias, s_x) — the bit-exact DGQ matmul:
    y = s_x · s1[o] · Σ_k clamp(round(x/s_x), ±127)[k] · W_s8[o, k] + bias[o]
  s_x is a 1-element tensor (static per-tensor) or empty (dynamic per-token: s_x[t] = max|x_t|/127).
  PyTorch: oneDNN's x86 int8 GEMM where it sums u8·s8 products exactly (`onednn_int8`: VNNI, AVX-512);
  elsewhere float32 GEMMs (over slices of K where needed) in which every partial sum is an integer below 2^24
  (torch._int_mm gives the same integers, but its CPU kernel measured 57x slower than the fp32 GEMM at
  512×576·576×1536). ONNX (static): QuantizeLinear to uint8 with zero
  point 128 + com.microsoft.MatMulIntegerToFloat; ONNX (per-token): x/s_x[t] through QuantizeLinear
  (scale 1, zero point 128: the same round-half-even and clamp), MatMulIntegerToFloat with the column
  scale, then the row scale and bias. The weights go in as int8 (U8S8) where the exporting machine's
  onnxruntime sums u8·s8 products exactly (x86 with VNNI, ARM; `onnx_weights_signed` measures it), else as
  uint8 with zero point 128 (U8U8): the U8S8 kernel of x86 without VNNI sums pairs of products in
  saturating int16 (vpmaddubsw), measured 0.15 rel L2 off on a 256→128 layer, where U8U8 is exact and
  within 15% of U8S8's time. On AVX-512 VNNI U8S8 is 2.6x faster than U8U8 (MiniLM's FFN shape), so a
  model exported there is exact on VNNI and ARM CPUs, and saturates on x86 without VNNI: export it on
  such a machine to get U8U8. Signed-int8 activations measured 3x slower than fp32 on x86, so they are
  never emitted.
rewrite::a8w8_dynamic_linear(x, w_s8, s1, bias) — the same GEMM on onnxruntime's dynamic activations
  (`quantize_dynamic`'s, act=tensor): uint8 codes q over [min(x, 0), max(x, 0)] of the whole tensor in 255
  steps, with a zero point z (DynamicQuantizeLinear), y = s_x · s1[o] · Σ_k (q − z)[k] · W_s8[o, k] + bias[o].
  ONNX: com.microsoft.DynamicQuantizeMatMul, one node a layer, where per-token codes take eleven (the
  scale's six, Div, QuantizeLinear, MatMulIntegerToFloat, then Mul and Add).
rewrite::w4_linear(x, packed, scales, zeros, bias) — the 4-bit storage form: uint4 codes packed two per
  byte, per-(row, group) scale S·s1 and zero point z. PyTorch: dequantize and matmul (a reference
  path). ONNX: com.microsoft.MatMulNBits(bits=4, block_size=group, accuracy_level=4), which quantizes
  activations per block on the fly: not bit-exact DGQ.
"""
from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

_lib = "rewrite"


def quantize_activation(x: Tensor, s_x: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes, scale per row or per tensor) for x of shape (..., K)."""
    codes, scale = activation_codes(x, s_x)
    return codes.to(torch.int8), scale


def static_scale(x: Tensor) -> Tensor:
    """act=static's one calibrated step: max|x|/127 over the whole tensor."""
    return (x.abs().max() / 127).clamp_min(1e-12).reshape(1)


def activation_codes(x: Tensor, s_x: Tensor) -> tuple[Tensor, Tensor]:
    """The int8 codes of x held in float32 (the GEMM below takes them so), and their scale."""
    # In place where the value is new, and max|x| as one op: at one token a call (decode) these small ops,
    # not the GEMM, are what a dgq Linear adds to an fp32 one.
    if s_x.numel():
        return torch.div(x, s_x).round_().clamp_(-127, 127), s_x
    # |x|/(max|x|/127) ≤ 127·(1 + 2^-24) rounds to 127 at most, and a clamped scale only makes it smaller: the
    # clamp to ±127 that a static scale needs would change nothing here (NaN and inf stay what they were).
    scale = row_abs_max(x).div_(127).clamp_min_(1e-12)
    return torch.div(x, scale).round_(), scale


def row_abs_max(x: Tensor) -> Tensor:
    """max|x| over the last dim (keepdim), NaN where a row has one. torch's inf-norm and aminmax reduce a row
    10–20x slower than amax does (0.53 against 0.03 ms for 256 × 1536 here, a third of a dgq down_proj's time),
    so the peak is max(amax, −amin); at a few rows (decode) |x| first is quicker, one reduction instead of two."""
    if x.numel() <= FEW_ROWS * x.shape[-1]:
        return x.abs().amax(-1, keepdim=True)
    return torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())


def a8w8(x: Tensor, w_s8: Tensor, s1: Tensor, bias: Tensor, s_x: Tensor) -> Tensor:
    """rewrite::a8w8_linear where a tracer must see the op (export, fx, dynamo, dispatch modes); in plain eager
    torch its body directly: the op's dispatch costs about 30 µs a call, which at one token a step (decode)
    is a third of the int8 GEMM's own time and made SmolLM2's decode slower than fp32."""
    if _plain_eager(x):
        return _a8w8_linear(x, w_s8, s1, bias, s_x, _shared_codes(x) if _sharable(x, s_x) else None)
    return a8w8_linear(x, w_s8, s1, bias, s_x)


def _plain_eager(x: Tensor) -> bool:
    """No tracer to see the op: a plain tensor, not compiling, no dispatch mode."""
    return type(x) is Tensor and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def a8w8_dynamic(x: Tensor, w_s8: Tensor, s1: Tensor, bias: Tensor) -> Tensor:
    """rewrite::a8w8_dynamic_linear where a tracer must see the op, else its body (as `a8w8`)."""
    if _plain_eager(x):
        return _a8w8_dynamic_linear(x, w_s8, s1, bias, None if x.requires_grad else _shared_tensor_codes(x))
    return a8w8_dynamic_linear(x, w_s8, s1, bias)


def tensor_codes(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """onnxruntime's DynamicQuantizeLinear: x's uint8 codes (held in float32), scale and zero point. The range
    [min(x, 0), max(x, 0)] in 255 steps; the zero point is −min/scale rounded (half to even, as every
    rounding here); scale 1 for an all-zero x."""
    low, high = torch.aminmax(x)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = (high - low).div_(255) if bool(high > low) else torch.ones((), dtype=x.dtype)
    zero = int(torch.div(-low, scale).clamp_(0, 255).round_())
    return torch.div(x, scale).round_().add_(zero).clamp_(0, 255), scale, zero


@torch.library.custom_op(f"{_lib}::a8w8_dynamic_linear", mutates_args=())
def a8w8_dynamic_linear(x: Tensor, w_s8: Tensor, s1: Tensor, bias: Tensor) -> Tensor:
    return _a8w8_dynamic_linear(x, w_s8, s1, bias)


def _a8w8_dynamic_linear(x: Tensor, w_s8: Tensor, s1: Tensor, bias: Tensor,
                         known: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
    codes, scale, zero = known or _centred_tensor_codes(x)
    acc = integer_matmul(codes, w_s8, shift=128 - zero)
    y = acc.mul_(scale * s1).add_(bias)  # MatMulIntegerToFloat's order: the two scales as one factor
    return y.reshape(*x.shape[:-1], w_s8.shape[0])


def _centred_tensor_codes(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """`tensor_codes` of x as (T, K), less 128: q − 128 ∈ [−128, 127] for the int8 GEMMs, which add
    (128 − z)·Σ_k W_s8 to the integer sums."""
    codes, scale, zero = tensor_codes(x.reshape(-1, x.shape[-1]))
    return codes.sub_(128), scale, zero


_tensor_codes: dict[int, tuple] = {}  # id(input) → (input, its version, its centred codes, scale and zero point)


def _shared_tensor_codes(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """x's act=tensor codes, made once for the Linears that read the same tensor (q/k/v, gate/up), as
    `_shared_codes` does for per-token codes."""
    return per_tensor(_tensor_codes, x, _centred_tensor_codes)


@a8w8_dynamic_linear.register_fake
def _(x, w_s8, s1, bias):
    return x.new_empty(*x.shape[:-1], w_s8.shape[0])


@torch.library.custom_op(f"{_lib}::a8w8_linear", mutates_args=())
def a8w8_linear(x: Tensor, w_s8: Tensor, s1: Tensor, bias: Tensor, s_x: Tensor) -> Tensor:
    return _a8w8_linear(x, w_s8, s1, bias, s_x)


def _a8w8_linear(x: Tensor, w_s8: Tensor, s1: Tensor, bias: Tensor, s_x: Tensor,
                 known: tuple[Tensor, Tensor] | None = None) -> Tensor:
    codes, scale = known or activation_codes(x.reshape(-1, x.shape[-1]), s_x)
    acc = integer_matmul(codes, w_s8)
    # The same float order as the ONNX graphs, so both agree bit for bit: static s_x·s1 as one factor
    # (MatMulIntegerToFloat), per-token column scale then row scale.
    y = acc.mul_(scale * s1) if s_x.numel() else acc.mul_(s1).mul_(scale)  # acc is the GEMM's own new tensor
    y = y.add_(bias)
    return y.reshape(*x.shape[:-1], w_s8.shape[0])


def _sharable(x: Tensor, s_x: Tensor) -> bool:
    """Per-token codes, outside autograd: at one token (decode) and at many (prefill, where making them is a
    fifth of a layer's time: 0.55 of 2.5 ms for SmolLM2's gate at 512 tokens; its prefill 6% faster shared)."""
    return not s_x.numel() and not x.requires_grad


_codes: dict[int, tuple] = {}  # id(input) → (input, its version, its per-token codes and scale)


def _shared_codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """x's per-token codes, made once for the Linears that read the same tensor one after another: q/k/v and
    gate/up, 3 of a Llama block's 7 Linears, each saved 5 small ops (about 40 µs at one token, AVX2)."""
    return per_tensor(_codes, x, lambda t: activation_codes(t.reshape(-1, t.shape[-1]), torch.empty(0)))


def exact_k(peak: int) -> int:
    """How many products of codes |c| ≤ peak and weights |w| ≤ 127 a float32 sum holds exactly."""
    return 2 ** 24 // (peak * 127)


EXACT_K = exact_k(127)  # 1040: a float32 sum of this many int8·int8 products is exact


def integer_matmul(codes: Tensor, w_s8: Tensor, shift: int = 0) -> Tensor:
    """codes (T, K) · w_s8 (O, K)ᵀ + shift·Σ_k w_s8[:, k]: the exact int32 sums, as float32 (what int32 →
    float32 gives). Codes are integers in ±127, or in [−128, 127] with a shift (a zero point's).

    On x86 CPUs with VNNI, oneDNN's int8 GEMM (`onednn_int8`); elsewhere float32 GEMMs of the weights made
    float in a reused buffer (`as_float`): one over all of K where no partial sum can reach 2^24
    (`sums_below_2_24`), else over K-slices short enough for that; every partial sum is then an integer below
    2^24, exact in any summation order."""
    if torch.get_float32_matmul_precision() != "highest" or codes.is_cuda:  # float GEMMs may round (bf16/tf32)
        if not codes.shape[0]:
            return codes.new_zeros(0, w_s8.shape[0])
        return _shifted(torch._int_mm(codes.to(torch.int8), w_s8.t().contiguous()), w_s8, shift)
    if codes.shape[0] and not codes.requires_grad and onednn_int8.usable():  # oneDNN's op has no backward
        return onednn_int8.matmul(codes, w_s8, shift)
    # autograd would keep the reused buffer for a backward pass, and the next call would change it under it
    few_rows, peak = codes.shape[0] <= FEW_ROWS, 128 if shift else 127
    k, w = codes.shape[-1], w_s8.float() if codes.requires_grad else as_float(w_s8, one_thread=few_rows)
    if k <= exact_k(peak) or sums_below_2_24(w_s8, peak):
        return _shifted(codes @ w.t(), w_s8, shift)
    step = exact_k(peak)
    slices = [(codes[:, i:i + step] @ w[:, i:i + step].t()).to(torch.int32) for i in range(0, k, step)]
    return _shifted(torch.stack(slices).sum(0, dtype=torch.int32), w_s8, shift)


def _shifted(sums: Tensor, w_s8: Tensor, shift: int) -> Tensor:
    """Exact integer sums (int32, or float32 below 2^24) plus shift·Σ_k w_s8, rounded to float32 once, as
    int32 → float32 does."""
    if shift:
        sums = (sums.double() if sums.is_floating_point() else sums) + shift * row_sums(w_s8)
    return sums.float()


def row_sums(w_s8: Tensor) -> Tensor:
    return per_tensor(_row_sums, w_s8, lambda w: w.sum(1, dtype=torch.int32))


def sums_below_2_24(w_s8: Tensor, peak: int = 127) -> bool:
    """Whether every partial sum of codes (|c| ≤ peak) times a row of w_s8 stays below 2^24, in any order, so
    that one float32 GEMM over all of K is exact: peak times the largest row's L1 norm. SmolLM2's down
    projections (K = 1,536) hold it at 127; the two K-slices and their int32 sum cost a third of a one-token
    call."""
    return peak * per_tensor(_one_gemm, w_s8, _largest_l1) < 2 ** 24


def _largest_l1(w_s8: Tensor) -> int:
    return int(w_s8.abs().sum(1, dtype=torch.int64).max()) if w_s8.numel() else 0


_row_sums: dict[int, tuple] = {}  # id(weight) → (weight, its version, Σ_k w[:, k] in int32)
_one_gemm: dict[int, tuple] = {}  # id(weight) → (weight, its version, its largest row's L1 norm)


def per_tensor(cache: dict[int, tuple], w: Tensor, make: Callable[[Tensor], Any]) -> Any:
    """make(w), kept while w lives and is not changed in place. Keyed by identity: a WeakKeyDictionary would
    compare tensors with ==. An inference-mode tensor keeps no version counter (a load_state_dict under
    inference mode would change it unseen), so its make(w) is made each call: build or load a model outside
    inference mode to keep oneDNN's packing and the one-GEMM check."""
    if w.is_inference():
        return make(w)
    key = id(w)
    cached = cache.get(key)
    if cached is None or cached[0]() is not w or cached[1] != w._version:
        alive = weakref.ref(w, lambda _: cache.pop(key, None))
        cached = cache[key] = (alive, w._version, make(w))
    return cached[2]


SCRATCH_MAX = 1 << 22  # float32 elements (16 MB a thread): SmolLM2's and MiniLM's layers, not a 7B model's


class _Scratch(threading.local):
    """A float32 buffer a thread reuses, with a view of it per weight shape: making the slice and view each
    call took half of a 192 × 576 conversion's time (52 µs against 25 µs on a 2-core AVX2 VM)."""

    def __init__(self) -> None:
        self.buffer, self.views = None, {}

    def shaped(self, shape: torch.Size) -> Tensor:
        view = self.views.get(shape)
        if view is None:
            numel = shape.numel()
            with torch.inference_mode(False):  # made under inference mode, neither could be written outside it
                if self.buffer is None or self.buffer.numel() < numel:
                    self.buffer, self.views = torch.empty(numel), {}
                view = self.views[shape] = self.buffer[:numel].view(shape)
        return view


_scratch = _Scratch()


FEW_ROWS = 16  # activation rows up to which a GEMM reads its weights more than it computes (decode)
# The thread count at which a GEMV's weights are converted on one thread: measured on 2 cores only. With more,
# the conversion's share of the time grows, and the GEMV may spread over threads itself: unmeasured there.
ONE_THREAD_AT = 2


def as_float(w_s8: Tensor, one_thread: bool = False) -> Tensor:
    """w_s8 as float32, written into a buffer this thread reuses: a new 3.5 MB tensor a call (SmolLM2's MLP
    layers) measured 1.3 ms against 0.22 ms for the conversion into a reused buffer and the GEMV, and 0.31 ms
    for the fp32 model's GEMV (one token, 2 threads, AVX2): the conversion reads a quarter of fp32's bytes,
    and the buffer it writes stays in cache. The result is valid until this thread's next call.

    one_thread: convert on this thread alone, for a GEMV, which reads the buffer on this thread. On a 2-core
    AVX2 VM (SmolLM2's decode shapes, a layer's conversion and GEMV), two threads took 0.37 ms for hours at a
    time, where one took 0.21–0.23 ms and fp32's GEMV 0.21 ms; at other times two took 0.18 ms. The host's
    placement of the two vCPUs decides, not the process. One thread keeps the time near fp32's in both: SmolLM2
    decoded at 0.62x fp32's speed against 0.56x, and at 0.70x against 0.75x."""
    if w_s8.numel() > SCRATCH_MAX:
        return w_s8.float()
    threads = torch.get_num_threads()
    one_thread = one_thread and threads == ONE_THREAD_AT
    if one_thread:
        torch.set_num_threads(1)  # 0.4 µs; a caller on another thread may see one thread meanwhile
    try:
        return _scratch.shaped(w_s8.shape).copy_(w_s8)
    finally:
        if one_thread:
            torch.set_num_threads(threads)


class onednn_int8:
    """The int8 GEMM that torch ships for x86 (oneDNN's u8·s8 → s32, `onednn::qlinear_pointwise`), with the
    activation codes shifted to uint8 (zero point 128) and the weights prepacked once per weight tensor.

    Used only where it sums the same integers as the float path, which is measured once, on the worst case.
    Without VNNI (AVX2) oneDNN sums pairs of u8·s8 products in saturating int16 (vpmaddubsw): 255·127·2
    overflows, measured 148,399 off at 512×576·576×1536. Splitting each weight in two halves of |w| ≤ 64
    along K made it exact there, but that GEMM over 2K measured 1.2–3.3x slower than the float path on an
    AVX2 EPYC at 512 and 4,096 tokens (SmolLM2's shapes), and no faster at 1–16 (SmolLM2's prefill 0.41x
    fp32 speed against the float path's 0.88x, decode 0.53x against 0.56x; benchmarks/int8_gemm.py), so
    AVX2 takes the float path."""

    _packed: dict[int, tuple[weakref.ref, int, tuple]] = {}  # id(weight) → (weight, its version, packed)
    exact: bool | None = None  # whether oneDNN's int8 GEMM sums exactly here; None: not checked yet

    @classmethod
    def usable(cls) -> bool:
        if cls.exact is None:
            cls.exact = cls._sums_exactly()
        return cls.exact

    @classmethod
    def matmul(cls, codes: Tensor, w_s8: Tensor, shift: int = 0) -> Tensor:
        """(codes + shift)·w_s8ᵀ: the codes as uint8 c + 128 on the zero point 128 − shift."""
        x_u8 = (codes + 128).to(torch.uint8)
        packed, unit_scales, zero_points = cls._packed_weight(w_s8)
        return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128 - shift, packed, unit_scales, zero_points, None,
                                                  1.0, 0, torch.float32, "none", [], "")

    @classmethod
    def _packed_weight(cls, w_s8: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(packed weight, unit weight scales, zero points), made once per weight: at one token a call, making
        the two small tensors again each time cost as much as the GEMM's memory traffic."""
        def pack(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            out = w.shape[0]
            return (torch.ops.onednn.qlinear_prepack(w.contiguous(), None), torch.ones(out),
                    torch.zeros(out, dtype=torch.long))
        return per_tensor(cls._packed, w_s8, pack)  # a weight changed in place is packed again

    @classmethod
    def _sums_exactly(cls) -> bool:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
            return False
        codes = torch.tensor([[127.0] * 64, [-127.0] * 64, [127.0, -127.0] * 32])  # saturates int16 pair sums
        weights = torch.tensor([[127] * 64, [-127] * 64, [127, -127] * 32], dtype=torch.int8)
        try:
            return torch.equal(cls.matmul(codes, weights), codes @ weights.float().t())
        except RuntimeError:  # a torch build without oneDNN's quantized kernels
            return False
        finally:
            cls._packed = {}


@a8w8_linear.register_fake
def _(x, w_s8, s1, bias, s_x):
    return x.new_empty(*x.shape[:-1], w_s8.shape[0])


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint4 values along the last axis → uint8, two per byte, low nibble first (MatMulNBits' layout)."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], -1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_nibbles(packed: Tensor, count: int) -> Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def unpack_w4(packed: Tensor, zeros: Tensor, scales: Tensor, block: int) -> Tensor:
    """(N, K/block, block/2) codes and (N, ⌈blocks/2⌉) zero points, packed → float weights (N, K)."""
    codes = unpack_nibbles(packed, block).float()
    zero = unpack_nibbles(zeros, packed.shape[1]).float()
    return ((codes - zero[..., None]) * scales[..., None]).reshape(packed.shape[0], -1)


@torch.library.custom_op(f"{_lib}::w4_linear", mutates_args=())
def w4_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor) -> Tensor:
    weight = unpack_w4(packed, zeros, scales, packed.shape[2] * 2)
    return torch.nn.functional.linear(x, weight, bias)


@w4_linear.register_fake
def _(x, packed, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def onnx_translations() -> dict:
    """custom op → onnxscript function, for torch.onnx.export(custom_translation_table=...)."""
    import onnxscript
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    _register_contrib_schemas()
    msft = Opset("com.microsoft", 1)
    matmul_integer_to_float, matmul_nbits = Op(msft, "MatMulIntegerToFloat"), Op(msft, "MatMulNBits")
    dynamic_quantize_matmul = Op(msft, "DynamicQuantizeMatMul")

    signed = onnx_weights_signed()

    def a8w8(x, w_s8, s1, bias, s_x):
        if s_x.shape is not None and len(s_x.shape) == 1 and s_x.shape[0] == 0:
            return _per_token(x, w_s8, s1, bias)
        scale = op.Squeeze(s_x)
        x_q = op.QuantizeLinear(x, scale, _u8(128))
        return matmul_integer_to_float(x_q, _weights(w_s8), scale, s1, _u8(128), _weight_zero(), bias)

    def _per_token(x, w_s8, s1, bias):
        last = op.Constant(value_ints=[-1])
        # max|x| as max(max x, −min x): two reads of x and no |x| written (5–9% of a MiniLM FFN layer's time)
        peak = op.Max(op.ReduceMax(x, last, keepdims=1), op.Neg(op.ReduceMin(x, last, keepdims=1)))
        scale = op.Div(peak, op.Constant(value_float=127.0))
        scale = op.Max(scale, op.Constant(value_float=1e-12))
        # QuantizeLinear rounds half to even and adds the zero point, as round(x/s)+128 does; |x/s| ≤ 127
        # by the scale's choice, so its saturation to [0, 255] is the clamp to ±127.
        x_u8 = op.QuantizeLinear(op.Div(x, scale), op.Constant(value_float=1.0), _u8(128))
        # Column scale inside, row scale after: onnxruntime's MatMulIntegerToFloat takes a per-column
        # b_scale, and mis-handles one combined (rows × columns) scale (measured: 0.06 off on a unit layer).
        per_column = matmul_integer_to_float(x_u8, _weights(w_s8), op.Constant(value_float=1.0), s1, _u8(128),
                                             _weight_zero())
        return op.Add(op.Mul(per_column, scale), bias)

    def a8w8_dynamic(x, w_s8, s1, bias):
        return dynamic_quantize_matmul(x, _weights(w_s8), s1, _weight_zero(), bias)

    def _u8(value):
        return op.Constant(value=onnxscript.ir.tensor(value, dtype=onnxscript.ir.DataType.UINT8))

    def _weights(w_s8):
        """int8 (O, K) → (K, O): int8 (U8S8) or uint8 shifted by the zero point 128 (U8U8); constant-folded by
        onnxruntime."""
        if signed:
            return op.Transpose(w_s8, perm=[1, 0])
        shifted = op.Add(op.Cast(w_s8, to=onnxscript.ir.DataType.INT16), op.Constant(value=onnxscript.ir.tensor(
            128, dtype=onnxscript.ir.DataType.INT16)))
        return op.Transpose(op.Cast(shifted, to=onnxscript.ir.DataType.UINT8), perm=[1, 0])

    def _weight_zero():
        if signed:
            return op.Constant(value=onnxscript.ir.tensor(0, dtype=onnxscript.ir.DataType.INT8))
        return _u8(128)

    def w4(x, packed, scales, zeros, bias):
        n, blocks, half = packed.shape
        k = blocks * half * 2
        return matmul_nbits(x, packed, scales, zeros, None, bias,
                                K=k, N=n, bits=4, block_size=half * 2, accuracy_level=4)

    return {torch.ops.rewrite.a8w8_linear.default: a8w8, torch.ops.rewrite.w4_linear.default: w4,
            torch.ops.rewrite.a8w8_dynamic_linear.default: a8w8_dynamic}


@functools.cache
def onnx_weights_signed() -> bool:
    """Whether this machine's onnxruntime computes uint8·int8 MatMulInteger exactly, on the worst case for a
    saturating int16 pair sum (255·127 twice): true on x86 with VNNI and on ARM, false on x86 with AVX2 alone
    or without onnxruntime."""
    try:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        from rewrite.ort import session
    except ImportError:
        return False
    codes = np.array([[255] * 64, [1] * 64, [255, 1] * 32], dtype=np.uint8)  # x + 128 for x = ±127
    weights = np.array([[127, -127, 127]] * 64, dtype=np.int8)
    weights[1::2, 2] = -127
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "az", "wz"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, list(codes.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [3, 3])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array(128, np.uint8), "az"),
         numpy_helper.from_array(np.array(0, np.int8), "wz")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    try:
        got = session(model.SerializeToString()).run(None, {"a": codes})[0]
    except Exception:  # noqa: BLE001  (onnxruntime's errors derive from Exception alone): the uint8 form
        return False
    return bool(np.array_equal(got, (codes.astype(np.int64) - 128) @ weights.astype(np.int64)))


_CONTRIB = {  # onnxruntime contrib ops we emit: inputs (name, optional), integer attributes, output typed as
    "MatMulIntegerToFloat": ([("A", False), ("B", False), ("a_scale", False), ("b_scale", False),
                              ("a_zero_point", True), ("b_zero_point", True), ("bias", True)], [], 2),
    "DynamicQuantizeMatMul": ([("A", False), ("B", False), ("b_scale", False), ("b_zero_point", True),
                               ("bias", True)], [], 0),
    "MatMulNBits": ([("A", False), ("B", False), ("scales", False), ("zero_points", True), ("g_idx", True),
                     ("bias", True)], ["K", "N", "bits", "block_size", "accuracy_level"], 0),
}


def _register_contrib_schemas() -> None:
    """onnx ships no schemas for onnxruntime's com.microsoft ops; onnxscript needs one to emit a node."""
    from onnx import defs

    for name, (inputs, attributes, typed_as) in _CONTRIB.items():
        if defs.has(name, 1, "com.microsoft"):
            continue
        types = ["tensor(float)", "tensor(float16)", "tensor(uint8)", "tensor(int8)", "tensor(int32)"]
        optional = defs.OpSchema.FormalParameterOption.Optional
        single = defs.OpSchema.FormalParameterOption.Single
        params = [defs.OpSchema.FormalParameter(n, f"T{i}", param_option=optional if opt else single)
                  for i, (n, opt) in enumerate(inputs)]
        defs.register_schema(defs.OpSchema(
            name, "com.microsoft", 1, inputs=params,
            outputs=[defs.OpSchema.FormalParameter("Y", f"T{typed_as}")],
            type_constraints=[(f"T{i}", types, "") for i in range(len(inputs))],
            attributes=[defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT, "") for a in attributes]))
