import pytest
import torch
from torch import nn

from rewrite import api
from rewrite.emit import onnx as onnx_emit
from rewrite.errors import RewriteError
from rewrite.passes.dgq import DGQLinear, feedback, kernels, quantize_weight
from rewrite.passes.dgq.feedback import FEEDBACK_DAMP, ordered_factor, with_feedback
from tests.passes.test_lowrank import FFN


def _layer_with_outliers(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[3, 17], w[40, 200] = 2.0, -1.5  # outliers stress the S·(q − z) range
    x = torch.randn(512, 256, generator=g)
    x[:, 5] *= 20  # an outlier activation channel
    return w, x


@pytest.mark.parametrize("search", [True, False])
def test_format_invariants(search):
    w, x = _layer_with_outliers()
    q = quantize_weight(w, x, 128, search)
    assert q.q.dtype == torch.uint8 and int(q.q.max()) <= 15
    assert int(q.z.max()) <= 15 and int(q.S.min()) >= 1 and int(q.S.max()) <= 127
    w_s8 = (q.S.repeat_interleave(128, 1).int() * (q.q.int() - q.z.repeat_interleave(128, 1).int()))
    assert int(w_s8.abs().max()) <= 127  # no int8 overflow, ever
    assert torch.equal(q.w_s8().int(), w_s8)


def test_search_is_never_worse_than_round_to_nearest():
    for seed in range(3):
        w, x = _layer_with_outliers(seed)
        ref = x @ w.T
        errs = {s: float((x @ quantize_weight(w, x, 128, s).dequantized().T - ref).norm()) for s in (True, False)}
        assert errs[True] <= errs[False]


def test_feedback_rounds_the_costliest_columns_first():
    """The order is H's diagonal times the mean squared grid step, decreasing (on a uniform grid GPTQ's
    act-order), and the factor is that of the damped Hessian in that order (Uᵀ·U = H⁻¹); codes land back in
    their own columns (a weight on its grid is kept exactly)."""
    x = torch.randn(400, 128) * torch.linspace(0.1, 3, 128)[torch.randperm(128)]
    hessian, step = x.T @ x, torch.rand(128, 16) + 0.5
    order, upper = ordered_factor(hessian, torch.ones(128))
    assert torch.equal(order, torch.argsort(hessian.diagonal(), descending=True))
    assert torch.equal(ordered_factor(hessian, step.square().mean(1))[0],
                       torch.argsort(hessian.diagonal() * step.square().mean(1), descending=True))
    damped = hessian[order][:, order] + FEEDBACK_DAMP * hessian.diagonal().mean() * torch.eye(128)
    assert torch.allclose((upper.T @ upper).double() @ damped.double(), torch.eye(128).double(), atol=1e-3)
    w = 0.05 * torch.randn(16, 128)
    on_grid = quantize_weight(w, x, 64, True)
    again = with_feedback(on_grid.dequantized(), x, on_grid)
    assert torch.equal(again.q, on_grid.q)


def test_feedback_puts_a_coarse_group_first(monkeypatch):
    """A group whose scale a few large weights set (a coarse grid) is rounded before the fine one, whose columns
    then take up its errors: lower output error than act-order by xᵀx's diagonal alone, which ignores the grid
    (measured 2.3x lower on `_deep_mlp`'s outlier layer)."""
    model = _deep_mlp()  # its layer 4 has the large columns
    with torch.no_grad():
        x = model[:4](torch.randn(256, 256, generator=torch.Generator().manual_seed(0)))
    w = model[4].weight.detach()
    grid, error = quantize_weight(w, x, 128, True), {}
    error["cost"] = float((x @ (with_feedback(w, x, grid).dequantized() - w).T).norm())
    by_cost = feedback.ordered_factor
    monkeypatch.setattr(feedback, "ordered_factor", lambda hessian, scale: by_cost(hessian, torch.ones_like(scale)))
    error["diagonal"] = float((x @ (with_feedback(w, x, grid).dequantized() - w).T).norm())
    assert error["cost"] < 0.8 * error["diagonal"], error


def test_error_feedback_keeps_the_searched_grid_and_lowers_the_output_error():
    """GPTQ-style rounding on DGQ's grid: z, S, s1 unchanged, codes in range, no int8 overflow; on correlated
    inputs (where feedback has something to use) the output error drops well below the search alone."""
    g = torch.Generator().manual_seed(3)
    w, mix = torch.randn(96, 200, generator=g) * 0.05, torch.randn(200, 200, generator=g) / 15 + torch.eye(200)
    x = torch.randn(600, 200, generator=g) @ mix  # 200: a padded last group too
    ref = x @ w.T
    searched, fed = quantize_weight(w, x, 128, True), quantize_weight(w, x, 128, True, feedback=True)
    again = with_feedback(w, x, searched)
    assert all(torch.equal(getattr(searched, f), getattr(again, f)) for f in ("z", "S", "s1"))
    assert not torch.equal(searched.q, again.q)
    assert int(fed.q.max()) <= 15 and int(fed.w_s8().int().abs().max()) <= 127
    error = {name: float((x @ dq.dequantized().T - ref).norm() / ref.norm()) for name, dq in
             (("search", searched), ("feedback", fed))}
    assert error["feedback"] < 0.8 * error["search"], error



def test_the_inverse_factor_is_upper_triangular_and_squares_to_the_damped_inverse_hessian():
    """Uᵀ·U = (H + λ·mean(diag H)·I)⁻¹ with U upper triangular and a positive diagonal (feedback's row
    updates read U so); a dead column (Σ x² = 0) gets a unit diagonal before the damping."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 40, generator=g) @ (torch.randn(40, 40, generator=g) / 6 + torch.eye(40))
    x[:, 7] = 0.0
    hessian = (x.T @ x).double()
    upper = feedback.inverse_factor(hessian)
    damped = hessian.clone()
    damped[7, 7] = 1.0
    damped += FEEDBACK_DAMP * damped.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)

def test_the_triangular_inverse_by_halves_is_the_solve_against_the_identity():
    """lower_inverse splits above INVERSE_BLOCK columns (an odd width: unequal halves, two levels deep)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(600, 301, generator=g, dtype=torch.float64)
    low = torch.linalg.cholesky(x.T @ x)
    inverse = feedback.lower_inverse(low)
    assert torch.equal(inverse, inverse.tril())
    assert torch.allclose(inverse, torch.linalg.solve_triangular(low, torch.eye(301, dtype=torch.float64),
                                                                 upper=False), rtol=1e-10, atol=1e-12)


def _ints(x_q, w_s8):
    return (x_q.double() @ w_s8.double().T)  # exact: |sums| < 2^53


def _s_x(act, x):
    """The calibrated scale a static layer takes; none for the dynamic ones."""
    return (x.abs().max() / 127).reshape(1) if act == "static" else torch.empty(0)


@pytest.mark.parametrize("act", ["static", "per-token", "tensor"])
def test_torch_kernel_onnx_graph_and_float_reference_agree_exactly(act, tmp_path):
    w, x = _layer_with_outliers()
    linear = nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight.copy_(w)
    weights = quantize_weight(w, x, 128, True)
    layer = DGQLinear(weights, linear.bias, _s_x(act, x), "int8", act)
    probe = x[:100]
    got = layer(probe)
    if act == "tensor":  # uint8 codes on the tensor's range, less their zero point
        codes, scale, zero = kernels.tensor_codes(probe)
        reference = _ints(codes - zero, weights.w_s8()).float() * (scale * weights.s1)
    else:
        x_q, scale = kernels.quantize_activation(probe, _s_x(act, x))
        sums = _ints(x_q, weights.w_s8())
        reference = (sums.float() * (scale * weights.s1) if act == "static" else sums.float() * weights.s1 * scale)
    assert torch.equal(got, reference + linear.bias)  # the int32 sums are exact
    result = api.optimize(nn.Sequential(linear), (probe,), f"dgq{{act={act},min-sqnr=0}}", calib=[x],
                          emit="onnx", out=tmp_path, measure_latency=False)
    ort_out = onnx_emit.run(onnx_emit.session(tmp_path / "model.onnx"), (probe,))[0]
    torch.testing.assert_close(ort_out, result.model(probe), rtol=0, atol=0)


class _FullRange(nn.Module):
    """The a8w8 kernel over int8 weights that use the whole ±127 range, as every real layer's do."""

    def __init__(self, k, o, act, x):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.act = act
        self.register_buffer("w_s8", torch.randint(-127, 128, (o, k), generator=g, dtype=torch.int8))
        self.register_buffer("s1", torch.rand(o, generator=g) / 100)
        self.register_buffer("bias", torch.randn(o, generator=g))
        self.register_buffer("s_x", _s_x(act, x))

    def forward(self, x):
        if self.act == "tensor":
            return kernels.a8w8_dynamic(x, self.w_s8, self.s1, self.bias)
        return kernels.a8w8(x, self.w_s8, self.s1, self.bias, self.s_x)


OP = {"static": "a8w8_linear", "per-token": "a8w8_linear", "tensor": "a8w8_dynamic_linear"}


@pytest.mark.parametrize("act", ["static", "per-token", "tensor"])
def test_eager_calls_skip_the_op_dispatch_and_tracers_still_see_the_op(act):
    """In plain eager torch `a8w8` runs the op's body directly (decode speed), with the same bits; export
    and fx still record rewrite::a8w8_linear, which the ONNX translation needs."""
    x = torch.randn(3, 5, 64)
    module = _FullRange(64, 32, act, x)
    direct = module(x)
    op = getattr(torch.ops.rewrite, OP[act])
    args = (module.w_s8, module.s1, module.bias) + ((module.s_x,) if act != "tensor" else ())
    assert torch.equal(direct, op(x, *args))
    exported = torch.export.export(module, (x,))
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert op.default in targets
    assert torch.equal(exported.module()(x), direct)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("act", ["static", "per-token", "tensor"])
def test_onnx_graph_is_exact_on_full_range_weights_and_saturating_activations(act, signed, monkeypatch, tmp_path):
    """onnxruntime's U8S8 kernel on x86 without VNNI sums u8·s8 pairs in saturating int16: activations near
    their peak times weights near ±127 came out 0.15 rel L2 off. The graph feeds int8 weights (U8S8) only
    where this machine's onnxruntime sums them exactly, else uint8 (U8U8); both forms are exact here."""
    import onnx

    from rewrite.capture import Captured
    if signed and not kernels.onnx_weights_signed():
        pytest.skip("this CPU's onnxruntime saturates u8·s8 sums (x86 without VNNI): only the U8U8 form is exact")
    monkeypatch.setattr(kernels, "onnx_weights_signed", lambda: signed)
    x = torch.randn(2, 16, 256) * 3
    x[..., ::2] = x[..., ::2].abs() + 2  # long runs of large positive codes: pairs that saturate int16
    module = _FullRange(256, 96, act, x)
    path = tmp_path / "layer.onnx"
    onnx_emit.export_onnx(module, Captured(module, (x,), True), path)
    got = onnx_emit.run(onnx_emit.session(path), (x,))[0]
    assert torch.equal(got, module(x))
    graph = onnx.load(path).graph
    node, zero_at = ("DynamicQuantizeMatMul", 3) if act == "tensor" else ("MatMulIntegerToFloat", 5)
    [matmul] = [n for n in graph.node if n.op_type == node]
    [weight_zero] = [t for t in graph.initializer if t.name == matmul.input[zero_at]]  # typed as the weights are
    assert weight_zero.data_type == (onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8)


def test_the_signed_weight_probe_matches_a_saturation_free_reference():
    """The probe's worst case: u8·s8 pairs of 255·127 that overflow int16 where the kernel saturates."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import platform
    from pathlib import Path
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the expected answer is known for x86 Linux CPUs (their flags say whether VNNI is there)")
    flags = Path("/proc/cpuinfo").read_text()
    assert kernels.onnx_weights_signed() == ("vnni" in flags), onnxruntime.__version__


@pytest.mark.parametrize("k", [7, 576, kernels.EXACT_K + 1, 2300])
def test_the_eager_integer_matmul_is_exact_beyond_what_one_float32_sum_holds(k):
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(-127, 128, (33, k), generator=g).float()
    codes[0] = 127  # the worst case: every product 127·127 with the weights' first row
    w_s8 = torch.randint(-127, 128, (17, k), generator=g, dtype=torch.int8)
    w_s8[0] = 127
    want = (codes.double() @ w_s8.double().T)
    assert torch.equal(kernels.integer_matmul(codes, w_s8).double(), want.float().double())


@pytest.mark.parametrize("path", ["onednn", "one float GEMM", "K-slices", "int_mm"])
def test_the_zero_point_shift_is_summed_exactly_on_every_path(path, monkeypatch):
    """act=tensor's codes q − 128 ∈ [−128, 127] with (128 − z)·Σ_k W added in the integers: the same sums
    as (q − z)·Wᵀ in float64, whichever GEMM runs, rounded to float32 once."""
    if path == "onednn" and not kernels.onednn_int8.usable():
        pytest.skip("oneDNN's int8 GEMM does not sum exactly on this CPU (x86 without VNNI)")
    if path != "onednn":
        monkeypatch.setattr(kernels.onednn_int8, "exact", False)
    if path == "int_mm":
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    k = 2300 if path == "K-slices" else 300
    g = torch.Generator().manual_seed(k)
    q = torch.randint(0, 256, (21, k), generator=g).float()
    q[0] = 255  # the largest sums: 255 − z times +127 weights
    w_s8 = torch.randint(-127, 128, (13, k), generator=g, dtype=torch.int8)
    w_s8[0] = 127
    for zero in (0, 3, 128, 255):
        want = ((q.double() - zero) @ w_s8.double().T).float()
        assert torch.equal(kernels.integer_matmul(q - 128, w_s8, shift=128 - zero), want), zero


@pytest.mark.parametrize("x", [torch.zeros(4, 8), torch.rand(4, 8) + 1, -torch.rand(4, 8) - 1,
                               torch.linspace(-3, 5, 64).reshape(8, 8), torch.randn(16, 32) * 7])
def test_tensor_codes_are_onnxruntime_dynamic_quantize_linear(x):
    """Codes, scale and zero point as onnxruntime's DynamicQuantizeLinear makes them (all-zero, one-signed
    and evenly spaced inputs: the edges of the range and ties of the rounding)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, list(x.shape)),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    q, s, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})
    codes, scale, zero = kernels.tensor_codes(x)
    assert torch.equal(codes, torch.from_numpy(q).float()) and float(scale) == float(s) and zero == int(z)


@pytest.mark.parametrize("largest, one_gemm", [(86, True), (87, False)])
def test_one_float32_gemm_over_all_of_k_is_taken_where_no_partial_sum_can_reach_2_24(largest, one_gemm,
                                                                                      monkeypatch):
    """K = 1,536 (SmolLM2's down projections): 127 · 86 · 1,536 < 2^24 ≤ 127 · 87 · 1,536."""
    monkeypatch.setattr(kernels.onednn_int8, "exact", False)  # the float path, on VNNI CPUs too
    codes = torch.randint(-127, 128, (9, 1536)).float()
    codes[0] = 127
    w_s8 = torch.randint(-20, 21, (12, 1536), dtype=torch.int8)
    w_s8[0] = largest
    assert kernels.sums_below_2_24(w_s8) == one_gemm
    assert torch.equal(kernels.integer_matmul(codes, w_s8), (codes.double() @ w_s8.double().T).float())
    w_s8[0] = 127  # changed in place (a load_state_dict): judged again
    assert torch.equal(kernels.integer_matmul(codes, w_s8), (codes.double() @ w_s8.double().T).float())
    assert kernels.per_tensor(kernels._one_gemm, w_s8, kernels._largest_l1) == 127 * 1536  # the cache saw it
    assert not kernels.sums_below_2_24(w_s8)


def test_the_reused_float_buffer_leaves_no_result_shared_and_works_in_and_out_of_inference_mode():
    codes = torch.randint(-127, 128, (3, 64)).float()
    first, second = (torch.randint(-127, 128, (8, 64), dtype=torch.int8) for _ in range(2))
    kernels._scratch.__init__()
    with torch.inference_mode():  # the buffer and its view are made here, and written outside it below
        kept = kernels.integer_matmul(codes, first)
    got = kernels.integer_matmul(codes, second)
    assert torch.equal(kernels.integer_matmul(codes, first[:4]), codes @ first[:4].float().T)  # another shape
    assert torch.equal(kept, codes @ first.float().T) and torch.equal(got, codes @ second.float().T)
    trained = codes.clone().requires_grad_()  # autograd keeps its own copy of the weights, not the buffer
    y = kernels.integer_matmul(trained, first)
    kernels.integer_matmul(codes, second)
    y.sum().backward()
    assert torch.equal(trained.grad, first.float().sum(0).expand(3, 64))


def test_linears_reading_one_tensor_share_its_codes_until_it_changes(monkeypatch):
    calls = []
    real = kernels.activation_codes
    monkeypatch.setattr(kernels, "activation_codes", lambda x, s_x: calls.append(x.shape) or real(x, s_x))
    g = torch.Generator().manual_seed(0)
    q, k, v = (DGQLinear.int8_weights(torch.randn(16, 64, generator=g), None, torch.empty(0)) for _ in range(3))
    x = torch.randn(1, 1, 64, generator=g)
    alone = [layer(x.clone()) for layer in (q, k, v)]
    calls.clear()
    with torch.no_grad():
        shared = [layer(x) for layer in (q, k, v)]
        assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(alone, shared))
        x.mul_(2)  # changed in place: its codes are made again
        assert torch.equal(q(x), q(x.clone())) and len(calls) == 3
        q(x[0]), q(x.detach())  # a view, another tensor: not shared
        assert len(calls) == 5
        prefill = torch.randn(32, 64, generator=g)  # many rows: shared too
        assert torch.equal(k(prefill), k(prefill.clone())) and torch.equal(q(prefill), q(prefill.clone()))
        assert len(calls) == 8
        with torch.inference_mode():  # inference tensors do not count their in-place changes
            y = torch.randn(1, 64)
            q(y), k(y)
        assert len(calls) == 10
    x.requires_grad_()
    q(x), k(x)  # autograd keeps its own codes
    assert len(calls) == 12


def test_act_tensor_linears_reading_one_tensor_share_its_codes_until_it_changes(monkeypatch):
    calls = []
    real = kernels.tensor_codes
    monkeypatch.setattr(kernels, "tensor_codes", lambda x: calls.append(x.shape) or real(x))
    g = torch.Generator().manual_seed(0)
    q, k = (DGQLinear.int8_weights(torch.randn(16, 64, generator=g), None, torch.empty(0), "tensor") for _ in range(2))
    x = torch.randn(2, 5, 64, generator=g)
    alone = [layer(x.clone()) for layer in (q, k)]
    calls.clear()
    with torch.no_grad():
        shared = [layer(x) for layer in (q, k)]
        assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(alone, shared))
        x.add_(1)  # changed in place (a new range, a new zero point): its codes are made again
        assert torch.equal(q(x), q(x.clone())) and len(calls) == 3
    assert torch.equal(k(x), k(x.clone())) and len(calls) == 4  # q's GEMM left the shared codes as they were
    x.requires_grad_()
    q(x), k(x)  # autograd keeps its own codes
    assert len(calls) == 6


def test_a_layer_made_in_inference_mode_runs_and_sees_its_weights_change():
    """Inference-mode tensors keep no version counter: nothing is cached for them (it crashed at K > 1,040)."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        layer = DGQLinear.int8_weights(torch.randn(8, 1536, generator=g) * 0.01, None, torch.empty(0))
        x = torch.randn(2, 1536, generator=g)
        want = kernels.a8w8(x.clone(), layer.w_s8.clone(), layer.s1, layer.bias, layer.s_x)
        assert torch.equal(layer(x), want)
        layer.w_s8.copy_(-layer.w_s8)  # as a load_state_dict under inference mode would, uncounted
        assert torch.equal(layer(x), -want)


def test_per_token_codes_need_no_clamp_to_stay_within_127():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(4096, 64, generator=g) * 10.0 ** torch.randint(-44, 38, (4096, 1), generator=g),
            torch.tensor([[3.0e38, -3.0e38, 1.0], [1e-45, -1e-45, 0.0], [0.0, 0.0, 0.0], [1e-12, 127e-12, -5e-11]])]
    for x in rows:
        codes, scale = kernels.activation_codes(x, torch.empty(0))
        assert codes.abs().max() <= 127 and torch.equal(codes, codes.clamp(-127, 127))
    full = kernels.activation_codes(rows[0], torch.empty(0))[0].abs().amax(-1) == 127
    assert full.float().mean() > 0.5  # a row's largest entry takes the full range, bar rows below the clamped scale
    special = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0]])
    codes = kernels.activation_codes(special, torch.empty(0))[0]
    torch.testing.assert_close(codes, codes.clamp(-127, 127), rtol=0, atol=0, equal_nan=True)  # NaN stays NaN


def test_a_gemv_converts_its_weights_on_one_thread_and_gives_the_threads_back(monkeypatch):
    monkeypatch.setattr(kernels.onednn_int8, "exact", False)  # the float path, as on x86 without VNNI
    seen = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src: seen.append(torch.get_num_threads())
                        or real_copy(self, src))
    w_s8 = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (1, kernels.FEW_ROWS, kernels.FEW_ROWS + 1):
            codes = torch.randint(-127, 128, (rows, 64)).float()
            assert torch.equal(kernels.integer_matmul(codes, w_s8), codes @ w_s8.float().T)
            assert torch.get_num_threads() == 2
        torch.set_num_threads(3)  # measured on 2 cores only: wider machines keep their threads
        kernels.integer_matmul(torch.ones(1, 64), w_s8)
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1, 2, 3]  # a GEMV's conversion on one thread, a GEMM's on all


def test_w4_form_stores_four_bits_and_exports_matmulnbits(tmp_path):
    import onnx
    model = FFN(d=128, hidden=256).eval()
    calib = [torch.randn(32, 128) for _ in range(2)]
    result = api.optimize(model, (calib[0],), "dgq{form=w4,min-sqnr=0}", calib=calib, emit="onnx", out=tmp_path,
                          measure_latency=False)
    assert result.report.records[0].stats["bits_per_weight"] < 4.5
    ops = {n.op_type for n in onnx.load(tmp_path / "model.onnx").graph.node}
    assert "MatMulNBits" in ops
    [art] = [a for a in result.report.artifacts if a.kind == "onnx"]
    assert art.parity["max_abs"] < 5e-2  # MatMulNBits quantizes activations per block: close, not exact


def test_widths_that_are_not_a_multiple_of_the_group_get_a_padded_last_group():
    model = nn.Sequential(nn.Linear(576, 256), nn.ReLU(), nn.Linear(256, 64)).eval()  # 576 = 4.5 groups of 128
    calib = [torch.randn(32, 576) for _ in range(2)]
    result = api.optimize(model, (calib[0],), "dgq{group=128}", calib=calib, measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["quantized"] == 2
    assert record.stats["layer_rel_err"]["0"] < 0.1  # the padded layer is as good as a whole-group one
    assert result.model.get_submodule("0").w_s8.shape == (256, 576)
    w4 = api.optimize(model, (calib[0],), "dgq{group=128,form=w4,min-sqnr=0}", calib=calib, measure_latency=False)
    skipped = dict(w4.report.records[0].skipped)
    assert "not a multiple of group=128 (form=w4 packs whole groups" in skipped["0"]


def test_nan_weights_and_silent_inputs_are_skipped():
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)).eval()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    result = api.optimize(model, (torch.zeros(4, 128),), "dgq{min-sqnr=-1000}", calib=[torch.zeros(4, 128)],
                          measure_latency=False)
    reasons = " ".join(why for _, why in result.report.records[0].skipped)
    assert "all zero" in reasons and "NaN" in reasons


def test_keep_leaves_the_linears_it_names_in_float():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(16, 64)
    result = api.optimize(model, (x,), "dgq{keep=4|0,budget-cos=0}", calib=[(x,)], measure_latency=False)
    record = result.report.records[0]
    kinds = {path: type(result.model.get_submodule(path)).__name__ for path in ("0", "2", "4")}
    assert kinds == {"0": "Linear", "2": "DGQLinear", "4": "Linear"}
    assert {path for path, why in record.skipped if "keep=4|0" in why} == {"0", "4"}
    missed = api.optimize(model, (x,), "dgq{hadamard=down_proj,budget-cos=0}", calib=[(x,)], measure_latency=False)
    assert any(what == "hadamard" and "names no Linear" in why for what, why in missed.report.records[0].skipped)


def test_1x1_convolutions_are_quantized_as_linears_over_channels_and_export_at_parity(tmp_path):
    """MobileNet's, EfficientNet's and PoolFormer's pointwise convolutions hold most of their weights; dgq once
    quantized only a CNN's head. Each is now an int8 Linear over every grid point's channels; a 3×3 convolution
    stays, a kept one goes back as the model's own convolution (named by its own path), and ONNX matches."""
    from tests.passes.test_prune import ConvMLP
    torch.manual_seed(0)
    model = ConvMLP().eval()
    calib = [(torch.randn(4, 3, 8, 8),) for _ in range(4)]
    result = api.optimize(model, calib[0], "dgq{keep=head}", calib=calib, emit="onnx", out=tmp_path,
                          measure_latency=False)
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["quantized"] == 2
    assert {type(result.model.get_submodule(f"mlp.{i}.linear")).__name__ for i in (0, 2)} == {"DGQLinear"}
    assert type(result.model.stem) is type(result.model.head) is nn.Conv2d
    assert ["head", "kept in float (keep=head)"] in [list(s) for s in record.skipped]
    assert record.error["sqnr_db"] > 20
    [onnx] = [a for a in result.report.artifacts if a.kind == "onnx"]
    assert onnx.parity["rel_l2"] < 1e-5, onnx.parity  # the int8 codes are the same in onnxruntime
    # Their activation codes take one scale per tensor (conv-act), the Linears' act stays per token.
    assert {result.model.get_submodule(f"mlp.{i}.linear").act for i in (0, 2)} == {"tensor"}
    assert record.stats["convolutions"] == 2 and record.stats["act"] == "per-token"
    per_token = api.optimize(model, calib[0], "dgq{conv-act=per-token}", calib=calib, measure_latency=False).model
    assert {per_token.get_submodule(p).act for p in ("mlp.0.linear", "mlp.2.linear", "head.linear")} == {"per-token"}


def test_unsupported_bits_is_a_clear_error():
    with pytest.raises(RewriteError, match="bits=8 is not supported"):
        api.optimize(FFN(), (torch.randn(2, 32),), "dgq{bits=8}", measure_latency=False)


def test_group_must_be_even():
    with pytest.raises(RewriteError, match="group must be"):
        api.optimize(FFN(), (torch.randn(2, 32),), "dgq{group=3}", measure_latency=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_int8_kernel_runs_on_cuda_and_matches_cpu():
    w, x = _layer_with_outliers()
    weights = quantize_weight(w, x, 128, True)
    layer = DGQLinear(weights, None, torch.empty(0), "int8")
    want = layer(x[:64])
    got = layer.cuda()(x[:64].cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class _PreNorm(nn.Module):
    """A pre-LN block whose norm feeds only Linears, with one outlier activation channel."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(128)
        self.q, self.k = nn.Linear(128, 128), nn.Linear(128, 128)
        with torch.no_grad():
            self.norm.weight[7] = 30.0

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) * self.k(h)


def test_smoothing_moves_outliers_into_the_weights_exactly_before_quantizing():
    from rewrite import capture
    from rewrite.passes.dgq import smooth_inputs
    model = _PreNorm().eval()
    x = torch.randn(32, 128)
    captured = capture.capture(model, (x,))
    before = captured.module(x)
    chosen, skipped = smooth_inputs(captured.module, [(x,)])
    assert chosen.get("none", 0) == 0 and sum(chosen.values()) == 1 and not skipped
    torch.testing.assert_close(captured.module(x), before, rtol=1e-4, atol=1e-4)  # float-exact transform
    assert float(captured.module.norm.weight.detach().abs().max()) < 30.0


def _real_error(weight, x, s, group=32):
    """The output error of W at 4 bits (round to nearest) and x at int8 per token, both after scaling by s."""
    scaled = (weight * s).reshape(weight.shape[0], -1, group)
    low, high = scaled.amin(-1, keepdim=True), scaled.amax(-1, keepdim=True)
    step = (high - low) / 15
    w_hat = (torch.round((scaled - low) / step) * step + low).reshape(weight.shape)
    xs = x / s
    unit = xs.abs().amax(1, keepdim=True) / 127
    return float((xs @ (weight * s).T - torch.round(xs / unit) * unit @ w_hat.T).square().sum(1).mean())


def test_smoothing_estimates_the_output_error_of_independent_channels():
    from rewrite.calibration import InputStats
    from rewrite.passes.dgq.smoothing import estimated_error
    torch.manual_seed(0)
    x, weight = torch.randn(4096, 128) * torch.rand(128) * 3, torch.randn(64, 128)
    stats = InputStats(x.abs().amax(0), x.abs().mean(0), x.square().mean(0), x[:2048])
    for s in (torch.ones(128), x.abs().mean(0).sqrt()):
        assert estimated_error(weight, stats, s, 32, "per-token") == pytest.approx(_real_error(weight, x, s), rel=0.1)


def test_smoothing_chooses_a_scale_that_lowers_the_real_error_of_an_outlier_channel():
    from rewrite.calibration import InputStats
    from rewrite.passes.dgq.smoothing import _clip_scale, best_scale
    torch.manual_seed(0)
    x, weight = torch.randn(2048, 128), torch.randn(64, 128)
    x[:, 7] *= 60  # one channel carries most of the activations' range, as in real decoders
    stats = InputStats(x.abs().amax(0), x.abs().mean(0), x.square().mean(0), x)
    kind, s = best_scale(weight, stats, 32, "per-token")
    assert kind != "none"
    real = _real_error(weight, x, s)
    assert real < 0.5 * _real_error(weight, x, torch.ones(128))
    assert real <= _real_error(weight, x, _clip_scale(stats.peak)) * 1.05
    weights_only = best_scale(torch.randn(64, 128), InputStats(*(torch.ones(128),) * 3, torch.ones(8, 128)), 32, None)
    assert weights_only == ("none", None)  # nothing to gain on flat inputs: left alone


class _NormAndLinear(nn.Module):
    """A LayerNorm and a Linear over 128 channels, combined by `combine(norm, fc, x)`."""

    def __init__(self, combine):
        super().__init__()
        self.norm, self.fc, self.combine = nn.LayerNorm(128), nn.Linear(128, 128), combine

    def forward(self, x):
        return self.combine(self.norm, self.fc, x)


def _smoothed(combine):
    """(kinds of scale chosen, what was skipped) of dgq's smoothing on `_NormAndLinear(combine)`."""
    from rewrite import capture
    from rewrite.passes.dgq import smooth_inputs
    captured = capture.capture(_NormAndLinear(combine).eval(), (torch.randn(4, 128),))
    return smooth_inputs(captured.module, [(torch.randn(4, 128),)])


def _post_norm_residual(norm, fc, x):
    h = norm(x)
    return h + fc(h)


def test_smoothing_skips_post_norm_residuals():
    chosen, skipped = _smoothed(_post_norm_residual)
    assert not chosen and "residual" in skipped[0][1]


def test_a_norm_that_no_linear_reads_is_no_smoothing_candidate_and_not_reported():
    """Qwen3's per-head q_norm feeds RoPE, not a Linear: nothing to smooth there, and nothing to say of it."""
    chosen, skipped = _smoothed(lambda norm, fc, x: fc(x) * torch.sigmoid(norm(x)))
    assert not chosen and not skipped


def test_float32_search_errors_choose_what_float64_chooses(monkeypatch):
    import rewrite.passes.dgq as dgq
    gen = torch.Generator().manual_seed(0)
    w = 0.05 * torch.randn(96, 256, generator=gen)
    x = torch.randn(512, 256, generator=gen) * (1 + 3 * torch.rand(256, generator=gen))  # uneven channel scales
    fast = dgq.quantize_weight(w, x, 128, True)
    monkeypatch.setattr(dgq.search, "ERROR_DTYPE", torch.float64)
    exact = dgq.quantize_weight(w, x, 128, True)
    assert torch.equal(fast.q, exact.q) and torch.equal(fast.S, exact.S) and torch.equal(fast.z, exact.z)
    torch.testing.assert_close(fast.s1, exact.s1, rtol=1e-6, atol=0)  # the same ratios, rounded once more


def _deep_mlp():
    torch.manual_seed(0)
    layers = [nn.Linear(256, 256) for _ in range(4)]
    with torch.no_grad():
        layers[2].weight[:, :4] *= 30  # one layer whose 4-bit groups lose most
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.GELU())]).eval()


def _cosine(a, b):
    return float(nn.functional.cosine_similarity(a, b, dim=-1).mean())


@pytest.mark.parametrize("upgrade", [5, 8])
def test_mixed_precision_widens_the_worst_layers_until_the_cosine_budget_holds(upgrade):
    model, x = _deep_mlp(), torch.randn(256, 256)
    plain = api.optimize(model, (x[:8],), "dgq{group=128,budget-cos=0,min-sqnr=0}", calib=[x],
                         measure_latency=False)
    budget = 0.998
    spec = f"dgq{{group=128,budget-cos={budget},max-bits=8.5,min-sqnr=0,upgrade-bits={upgrade}}}"
    mixed = api.optimize(model, (x[:8],), spec, calib=[x], measure_latency=False)
    with torch.no_grad():
        want, got_plain, got_mixed = model(x), plain.model(x), mixed.model(x)
    assert _cosine(want, got_plain) < budget <= _cosine(want, got_mixed)
    stats, plain_stats = mixed.report.records[0].stats, plain.report.records[0].stats
    assert plain_stats["upgraded_layers"] == 0 and plain_stats["bits_per_weight"] < 4.3
    assert 1 <= stats["upgraded_layers"] <= 3 and plain_stats["bits_per_weight"] < stats["bits_per_weight"] < upgrade + 0.5
    assert "4" in stats["upgraded"]  # the layer with the outlier columns was widened first
    assert {mixed.model.get_submodule(p).weight_bits for p in stats["upgraded"]} == {upgrade}


def test_mixed_precision_never_exceeds_max_bits():
    model, x = _deep_mlp(), torch.randn(256, 256)
    capped = api.optimize(model, (x[:8],), "dgq{group=128,budget-cos=0.99999,max-bits=5.2,min-sqnr=0,upgrade-bits=8}",
                          calib=[x], measure_latency=False)
    stats = capped.report.records[0].stats
    assert stats["upgraded_layers"] == 1 and stats["bits_per_weight"] <= 5.2  # a second layer would be 6.2


def test_int8_weight_layers_match_float_closely():
    w, x = torch.randn(64, 256) * 0.05, torch.randn(512, 256)
    layer = DGQLinear.int8_weights(w, None, torch.empty(0))
    four = DGQLinear(quantize_weight(w, x, 128, True), None, torch.empty(0), "int8")
    assert layer.format_bits() == 8 + 32 / 256 and four.format_bits() == 4 + 12 / 128 + 32 / 256
    assert verify_error(x @ w.T, layer(x)) < 0.02 < verify_error(x @ w.T, four(x))


def test_wider_codes_keep_the_format_and_the_int8_range_with_less_error():
    w, x = _layer_with_outliers()
    five = quantize_weight(w, x, 128, True, feedback=True, bits=5)
    assert int(five.q.max()) <= 31 and int(five.q.max()) > 15 and int(five.w_s8().int().abs().max()) <= 127
    layers = {bits: DGQLinear(quantize_weight(w, x, 128, True, feedback=True, bits=bits), None, torch.empty(0),
                              "int8") for bits in (4, 5)}
    assert layers[5].format_bits() == 5 + 13 / 128 + 32 / 256 and layers[5].weight_bits == 5
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05  # no outlier weights: the row
    # scale s1 = max|w|/127 then leaves the group scales room for 31 steps (an outlier row caps them at S = 1)
    weight_error = {bits: verify_error(x @ w.T, x @ quantize_weight(w, x, 128, True, True, bits).dequantized().T)
                    for bits in (4, 5)}
    assert weight_error[5] < 0.6 * weight_error[4], weight_error


def test_upgrade_bits_out_of_range_is_a_clear_error():
    with pytest.raises(RewriteError, match="upgrade-bits=4"):
        api.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), "dgq{upgrade-bits=4}", measure_latency=False)


def verify_error(want, got):
    return float((want - got).norm() / want.norm())


def test_few_calibration_tokens_score_errors_through_the_inputs_with_the_same_choices():
    from rewrite.passes.dgq import OutputError
    gen = torch.Generator().manual_seed(3)
    w, x = 0.05 * torch.randn(64, 512, generator=gen), torch.randn(128, 512, generator=gen)  # T < K
    assert OutputError(x, 512).by_inputs and not OutputError(x.repeat(5, 1), 512).by_inputs
    few = quantize_weight(w, x, 128, True)
    many = quantize_weight(w, x.repeat(5, 1), 128, True)  # the same G, times 5: the same argmins
    assert (few.s1 == many.s1).float().mean() > 0.98
    errors = [float(((x @ (w - q.dequantized()).T.double().float()) ** 2).sum()) for q in (few, many)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-3)


def test_smoothing_reaches_rmsnorms_and_gated_blocks_of_a_llama_exactly():
    import transformers
    from rewrite import capture
    from rewrite.passes.dgq import smooth_inputs
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] *= 40  # an outlier channel, as real decoders have
    ids = torch.randint(0, 128, (2, 12))
    gm = capture.capture(model, (ids,)).module
    want = gm(ids).logits
    smoothed, skipped = smooth_inputs(gm, [(ids,)])
    # per block: q/k/v after the input norm, gate/up after the second norm, down after up
    assert sum(smoothed.values()) == 6
    assert not skipped  # the final norm feeds the tied lm_head through a slice: no Linear reads it, no candidate
    torch.testing.assert_close(gm(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_bundled_fno_quantized_by_dgq_exports_onnx_at_parity(tmp_path):
    """The README's main job once exited 3 here: rel L2 0.32 between onnxruntime and the verified model."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    import fno_mlp
    model, example, calib = fno_mlp.build()
    # Two calibration batches (of four): one to fit, one to judge the budget on; the parity is what is tested.
    result = api.optimize(model, example, "t1,dgq", calib=calib[:2], emit="onnx", out=tmp_path,
                          measure_latency=False)
    assert [r.status for r in result.report.records] == ["applied", "applied"]
    [onnx] = [a for a in result.report.artifacts if a.kind == "onnx"]
    assert onnx.status == "ok" and onnx.parity["rel_l2"] < 1e-3, onnx.parity


@pytest.mark.parametrize("k", [256, 200])
def test_the_compressed_tensors_form_holds_the_same_weights_bit_for_bit(k):
    """W = scale·(q − zp) per group, codes in 4 bits (8 for wider layers); K = 200 is 1.56 groups of 128."""
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(48, k, generator=g) * 0.05, torch.randn(256, k, generator=g)
    layer = DGQLinear(quantize_weight(w, x, 128, True), None, torch.empty(0), "int8")
    tensors, args = layer.compressed_tensors()
    group = args["group"]
    codes = tensors["weight"].int() + (1 << (args["bits"] - 1))
    zero = tensors["weight_zero_point"].int() + (1 << (args["bits"] - 1))
    assert args["bits"] == 4 and int(codes.min()) >= 0 and int(codes.max()) <= 15 and k % group == 0
    weight = (codes - zero.repeat_interleave(group, 1)) * tensors["weight_scale"].repeat_interleave(group, 1)
    torch.testing.assert_close(weight, layer.s1[:, None] * layer.w_s8.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("s_x, scheme", [(torch.tensor([0.05]), "static"), (torch.empty(0), "per-token")])
def test_a_layer_pickled_before_act_tensor_runs_and_ships_as_its_scale_says(s_x, scheme):
    layer = DGQLinear.int8_weights(torch.randn(8, 64), None, s_x)
    x = torch.randn(3, 64)
    want = layer(x)
    del layer.act  # what torch.load gives for a layer saved by an older rewrite
    assert layer.act is None and torch.equal(layer(x), want)
    assert layer.compressed_tensors()[1]["act"] == scheme


def _mlp_with_a_hidden_outlier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    with torch.no_grad():
        model[0].weight[5] *= 200  # one hidden channel carries most of the second Linear's input
    return model


@pytest.mark.parametrize("form", ["int8", "w4"])
def test_hadamard_rotates_the_inputs_it_names_and_loses_less_on_an_outlier_channel(form, tmp_path):
    model, x = _mlp_with_a_hidden_outlier(), torch.randn(256, 64)
    spec = f"dgq{{form={form},budget-cos=0,smooth=false,keep=0"  # the second Linear's error alone
    plain = api.optimize(model, (x,), spec + "}", calib=[(x,)], measure_latency=False)
    turned = api.optimize(model, (x,), spec + ",hadamard=2}", calib=[(x,)], measure_latency=False,
                          emit="onnx" if form == "int8" else None, out=tmp_path)
    first, second = turned.model.get_submodule("0"), turned.model.get_submodule("2")
    assert isinstance(first, nn.Linear) and second.rotated and turned.report.records[0].stats["rotated_inputs"] == 1
    held_out = torch.randn(64, 64)
    with torch.no_grad():
        want = model(held_out)
        errors = [(m(held_out) - want).norm() / want.norm() for m in (plain.model, turned.model)]
        assert errors[1] < 0.5 * errors[0]
        # float_weight is in the input's own space: the rotation is undone, not left in the weights
        rel = (second.float_weight() - model[2].weight).norm() / model[2].weight.norm()
        assert rel < 0.15
    if form == "int8":  # the rotation is float MatMuls before the int8 codes: a code may round the other way
        got = onnx_emit.run(onnx_emit.session(tmp_path / "model.onnx"), (held_out,))[0]
        with torch.no_grad():
            assert (got - turned.model(held_out)).abs().max() < 1e-3 * want.abs().max()


def test_hadamard_ffn_down_names_the_down_linear_of_each_feed_forward_block_by_its_pattern():
    """`ffn-down` finds the down Linear through the shared matcher, whatever its name (GPT-2's mlp.c_proj, Phi's
    fc2): here the MLP's second Linear, the same layer and the same model as naming it by its path."""
    model, x = _mlp_with_a_hidden_outlier(), torch.randn(256, 64)
    spec = "dgq{budget-cos=0,smooth=false,hadamard="
    by_pattern = api.optimize(model, (x,), spec + "ffn-down}", calib=[(x,)], measure_latency=False)
    by_path = api.optimize(model, (x,), spec + "2}", calib=[(x,)], measure_latency=False)
    assert by_pattern.report.records[0].stats["rotated_inputs"] == 1
    assert by_pattern.model.get_submodule("2").rotated and not by_pattern.model.get_submodule("0").rotated
    held_out = torch.randn(16, 64)
    assert torch.equal(by_pattern.model(held_out), by_path.model(held_out))
    no_ffn = nn.Sequential(nn.Linear(64, 64)).eval()
    missed = api.optimize(no_ffn, (x,), spec + "ffn-down}", calib=[(x,)], measure_latency=False)
    assert any(what == "hadamard" and "names no Linear" in why for what, why in missed.report.records[0].skipped)


def test_a_rotated_layer_rebuilds_from_its_tensors_and_has_no_compressed_tensors_form():
    from rewrite.errors import NoCompressedForm
    model, x = _mlp_with_a_hidden_outlier(), torch.randn(128, 64)
    layer = api.optimize(model, (x,), "dgq{budget-cos=0,hadamard=*}", calib=[(x,)],
                         measure_latency=False).model.get_submodule("2")
    rebuilt = DGQLinear.from_state(dict(layer.named_buffers()), **layer.saved_config())
    h = torch.randn(8, 256)
    assert rebuilt.rotated and torch.equal(rebuilt(h), layer(h))
    with pytest.raises(NoCompressedForm, match="rotated online"):
        layer.compressed_tensors()


def test_expert_weights_outside_linears_are_named_not_passed_over_in_silence():
    """A mixture-of-experts model (transformers 5 keeps each expert projection as one 3-D weight) once came back
    'applied' with only its attention quantized and no word about the experts, most of its weights."""
    from tests.test_compress import MoE
    torch.manual_seed(0)
    calib = [(torch.randint(0, 64, (8,)),) for _ in range(4)]
    result = api.optimize(MoE().eval(), calib[0], "dgq{budget-cos=0,min-sqnr=0}", calib=calib, measure_latency=False)
    record = result.report.records[0]
    assert record.stats["quantized"] == 2
    [(where, why)] = [s for s in record.skipped if "experts" in s[0]]
    assert where == "blocks.*.experts" and "89% of the model's" in why and "stay in float" in why


class _PooledEncoder(nn.Module):
    """A class worth keeping (save_pretrained, config) with SigLIP's pooling head: nn.MultiheadAttention reads its
    out_proj's weight as a tensor, so an int8 out_proj cannot go back into the class."""

    def __init__(self):
        super().__init__()
        self.config = {}
        self.proj, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def save_pretrained(self, path):
        torch.save(self.state_dict(), path)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


def test_a_layer_its_class_reads_as_a_tensor_stays_in_float_so_the_class_comes_back():
    torch.manual_seed(0)
    calib = [(torch.randn(2, 5, 16),) for _ in range(4)]
    result = api.optimize(_PooledEncoder().eval(), calib[0], "dgq{budget-cos=0,min-sqnr=0}", calib=calib,
                          measure_latency=False)
    skipped = dict(result.report.records[0].skipped)
    assert "reads its weight as a tensor" in skipped["attn.out_proj"] and "attn.in_proj" in skipped
    assert type(result.model) is _PooledEncoder and type(result.model.proj).__name__ == "DGQLinear"
