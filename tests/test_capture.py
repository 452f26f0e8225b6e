import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from rewrite import capture
from rewrite.testing import ConvBN, TinyMLP
from tests.conftest import minilm

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def _same(model, captured, inputs):
    with torch.no_grad():
        want, got = model(*inputs), captured.module(*inputs)
    want = want.last_hidden_state if hasattr(want, "last_hidden_state") else want
    got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plain_module_keeps_batch_dynamic():
    model = TinyMLP()
    c = capture.capture(model, model.example_inputs())
    assert c.graph and 0 in c.dynamic_dims[0]
    _same(model, c, (torch.randn(7, 16),))  # another batch size than captured


def test_an_example_of_one_row_still_gives_a_graph_of_any_batch():
    """Export fixes the dims it traces at size 1: an LLM prompt of batch 1 once gave a graph that refused
    calibration batches of 2. Traced on the row twice, the batch is free, and the graph is checked on the example
    as given."""
    model = TinyMLP()
    c = capture.capture(model, (torch.randn(1, 16),))
    assert c.graph and c.dynamic_dims[0] == [0] and tuple(c.example_inputs[0].shape) == (1, 16)
    _same(model, c, (torch.randn(1, 16),))
    _same(model, c, (torch.randn(3, 16),))


class _RowSpecific(nn.Module):
    """Computes something else at one row than at two: its graph traced on two rows would be wrong on one."""

    def forward(self, x):
        return x * 2 if x.shape[0] == 1 else x


def test_a_model_that_computes_otherwise_at_one_row_is_traced_on_the_example_as_given():
    model = _RowSpecific()
    c = capture.capture(model, (torch.randn(1, 4),))
    assert c.graph and 0 not in c.dynamic_dims[0]
    _same(model, c, (torch.randn(1, 4),))


def test_dynamic_dims_are_checked_on_short_inputs_not_the_whole_example():
    # The grown-shape check runs the model eagerly; at the example's sizes + 1 it cost two whole calibration
    # forwards (30 s of SmolLM2's 46 s capture from 8 × 512 tokens).
    model, seen = nn.Sequential(nn.Linear(16, 16), nn.GELU()).eval(), []
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape))
                                    if all(type(n) is int for n in args[0].shape) else None)
    c = capture.capture(model, (torch.randn(8, 64, 16),))
    assert c.graph and c.dynamic_dims[0] == [0, 1]
    assert (2, capture.SHORT + 1, 16) in seen and (9, 65, 16) not in seen


def test_cnn_with_batchnorm_lifts_layers_to_modules():
    model = ConvBN()
    c = capture.capture(model, model.example_inputs())
    kinds = {type(c.module.get_submodule(n.target)) for n in c.module.graph.nodes if n.op == "call_module"}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.BatchNorm1d} <= kinds
    _same(model, c, (torch.randn(3, 3, 10, 10),))


def test_capture_never_touches_the_users_model():
    model = ConvBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = capture.capture(model, model.example_inputs())
    for p in c.module.parameters():
        p.data.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_handwritten_fno():
    from fno import build
    model, inputs = build()
    c = capture.capture(model, inputs)
    assert c.graph
    _same(model, c, inputs)


def test_neuraloperator_fno_is_captured_per_shape():
    neuralop = pytest.importorskip("neuralop")
    model = neuralop.models.FNO(n_modes=(8, 8), hidden_channels=16, in_channels=1, out_channels=1).eval()
    inputs = (torch.randn(2, 1, 32, 32),)
    c = capture.capture(model, inputs)
    assert c.graph
    # Its grid embedding caches a 32x32 grid: a capture dynamic in space would be wrong at other sizes.
    # (Export sometimes keeps the batch dim dynamic, sometimes not; both are verified by the probe.)
    assert not {2, 3} & set(c.dynamic_dims[0])
    _same(model, c, inputs)


def test_transformer_encoder():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    c = capture.capture(model, (torch.randn(2, 10, 32),))
    assert c.graph
    _same(model, c, (torch.randn(2, 10, 32),))


@pytest.mark.slow
def test_huggingface_bert_minilm_keeps_batch_and_sequence_dynamic():
    model, inputs = minilm()
    c = capture.capture(model, inputs)
    assert c.graph and c.dynamic_dims[0] == [0, 1]
    linears = [n for n in c.module.graph.nodes
               if n.op == "call_module" and isinstance(c.module.get_submodule(n.target), nn.Linear)]
    assert len(linears) == 6 * 6 + 1  # q, k, v, out, ffn-in, ffn-out per layer, and the pooler
    ids = torch.randint(1000, 2000, (3, 17))
    _same(model, c, (ids, torch.ones_like(ids)))


class _Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return x * 2
        return x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.gate = _Inner()

    def forward(self, x):
        return self.gate(self.body(x))


def test_uncapturable_model_falls_back_to_eager_with_module_and_line():
    model = _Outer()
    c = capture.capture(model, (torch.randn(2, 3),))
    assert not c.graph and not isinstance(c.module, fx.GraphModule)
    assert "module 'gate' (_Inner)" in c.note and "test_capture.py:" in c.note
    assert "\n" not in c.note


class _ProjNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return torch.relu(self.norm(self.proj(x)))


def test_layer_counts_of_an_eager_model_and_its_graph_agree():
    """A report once said 16 → 9 layers in one table and 9 → 9 in the other: graphs counted lifted
    modules only, eager models every module with weights."""
    model = nn.Sequential(_ProjNorm(), _ProjNorm())
    captured = capture.capture(model, (torch.randn(2, 8),))
    assert capture.layer_count(model) == capture.layer_count(captured.module) == 4


def test_graph_nodes_are_named_by_the_module_path_a_user_can_find():
    model = nn.Sequential(_ProjNorm(), _ProjNorm())
    gm = capture.capture(model, (torch.randn(2, 8),)).module
    relu = next(n.name for n in gm.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    assert capture.module_path(gm, relu) == f"0 ({relu})"
    norm = next(n.name for n in gm.graph.nodes if "layer_norm" in str(n.target))
    assert capture.module_path(gm, norm) == f"0.norm ({norm})"
    assert capture.module_path(gm, "1.proj") == "1.proj"  # already a path: kept


def test_a_run_shows_the_user_no_warning_from_copying_torchs_graphs():
    """torch 2.13 warns (FutureWarning, `isinstance(treespec, LeafSpec)` is deprecated) when an exported graph's
    pytree specs are deep-copied: every rollback snapshot did, and API users saw it."""
    import warnings

    from rewrite import api
    from rewrite.testing import ConvBN
    model = ConvBN().eval()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        api.optimize(model, model.example_inputs(), "fold-bn", measure_latency=False)
    assert not [w for w in seen if "LeafSpec" in str(w.message)]


class _Counted(nn.Module):
    """x·scale, counting its calls; `off_at`: the batch sizes on which it adds a rounding-sized error."""

    def __init__(self, off_at: tuple[int, ...] = ()):
        super().__init__()
        self.calls, self.off_at = 0, off_at

    def forward(self, x):
        self.calls += 1
        return {"y": x * 3.0 + (1e-6 if x.shape[0] in self.off_at else 0.0)}


def _batches_and_known(sizes=(2, 3, 4, 5)):
    batches = [(torch.randn(n, 4),) for n in sizes]
    return batches, [{"y": b[0] * 3.0} for b in batches]


def test_outputs_known_bit_for_bit_on_the_probes_are_taken_whole():
    batches, known = _batches_and_known()
    module = _Counted()
    got = capture.outputs_on(module, batches, known)
    assert module.calls == 1 and got == known  # the first batch probed, the other three not run


def test_outputs_that_differ_on_a_probe_are_all_computed():
    batches, known = _batches_and_known()
    module = _Counted(off_at=(2,))
    got = capture.outputs_on(module, batches, known)
    assert module.calls == 4 and not torch.equal(got[0]["y"], known[0]["y"])
    assert torch.equal(got[1]["y"], known[1]["y"])  # its own outputs, equal where it computes the same


def test_the_most_padded_batch_is_probed_too():
    """A model equal on the first batch but not where padding is heaviest is run on every batch."""
    batches, known = _batches_and_known()
    masks = [torch.ones(2, 1), torch.ones(3, 1), torch.tensor([[1.0], [0.0], [0.0], [0.0]]), torch.ones(5, 1)]
    module = _Counted(off_at=(4,))
    capture.outputs_on(module, batches, known, masks)
    assert module.calls == 4
    quiet = _Counted()
    capture.outputs_on(quiet, batches, known, masks)
    assert quiet.calls == 2


def test_bit_equal_needs_the_same_structure_dtype_and_bits():
    x = torch.randn(3)
    assert capture.bit_equal({"a": x, "n": None}, {"a": x.clone(), "n": None})
    assert not capture.bit_equal({"a": x}, {"b": x})
    assert not capture.bit_equal(x, x.double())
    assert not capture.bit_equal(x, torch.nextafter(x, x + 1))  # one unit in the last place


class _ResidualDropout(nn.Module):
    """A block whose residual branch goes through nn.Dropout, as Phi-3's attention and MLP outputs do."""

    def __init__(self):
        super().__init__()
        self.proj, self.drop = nn.Linear(8, 8), nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.proj(x))


def test_eval_mode_dropout_leaves_the_captured_graph_and_the_outputs_stay():
    model, inputs = _ResidualDropout().eval(), (torch.randn(3, 8),)
    captured = capture.capture(model, inputs)
    assert captured.graph
    assert not [n for n in captured.module.graph.nodes if n.target == torch.ops.aten.dropout.default]
    _same(model, captured, inputs)


def test_training_mode_dropout_nodes_are_kept():
    """Only train=False dropout is the identity; a graph with a real dropout keeps it."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.dropout.default, (x, 0.5, True)))
    gm = fx.GraphModule(nn.Module(), graph)
    assert capture.drop_inference_dropout(gm) == 0
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.aten.dropout.default]


class _MatmulLinear(nn.Linear):
    """Falcon's FalconLinear: an nn.Linear whose forward is written as x @ Wᵀ (+ b)."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class _TwoMatmulLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = _MatmulLinear(8, 16), _MatmulLinear(16, 8, bias=False)
        self.tied = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + x @ self.tied.T @ self.tied  # the tied weight is read twice


def test_linears_written_as_a_matmul_with_the_transposed_weight_are_lifted():
    model, inputs = _TwoMatmulLinears().eval(), (torch.randn(2, 5, 8),)
    captured = capture.capture(model, inputs)
    lifted = {n.target: type(captured.module.get_submodule(n.target)) for n in captured.module.graph.nodes
              if n.op == "call_module" and n.target != "_guards_fn"}
    assert lifted == {"up": nn.Linear, "down": nn.Linear}  # `tied` is read twice: no layer of its own
    assert captured.module.get_submodule("up").bias is not None and captured.module.get_submodule("down").bias is None
    _same(model, captured, inputs)


class _Router(nn.Module):
    """An MoE router: a product with its own weight, then softmax and top-k, all returned."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        logits = nn.functional.linear(x, self.weight)
        scores, index = logits.softmax(-1).topk(2, dim=-1)
        return logits, scores, index


class _Projection(nn.Module):
    """A hand-written projection: nothing but F.linear with its own weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


class _RoutedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.router = _Projection(), _Router()

    def forward(self, x):
        logits, scores, index = self.router(self.proj(x))
        return logits + scores.sum(-1, keepdim=True) + index.sum(-1, keepdim=True)


def test_a_module_that_does_more_than_its_product_is_not_lifted_into_a_linear():
    """The router's module also takes softmax and top-k of its product: as a Linear it could not stand in for the
    module in the user's model (and routers stay in float). The projection, nothing but F.linear, is lifted."""
    model, inputs = _RoutedBlock().eval(), (torch.randn(3, 8),)
    captured = capture.capture(model, inputs)
    layers = {n.target for n in captured.module.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"}
    assert layers == {"proj"}
    _same(model, captured, inputs)


class _SelfAttention(nn.Module):
    """torchvision's ViT block in small: nn.MultiheadAttention keeps q, k and v in one in_proj_weight."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.scale = nn.Parameter(torch.randn(16, 16))  # a `_weight`-less tensor read twice: nothing to lift
        self.other_weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        x = self.attn(x, x, x, need_weights=False)[0]
        y = nn.functional.linear(x, self.other_weight) + nn.functional.linear(x, self.other_weight.T)
        return y @ self.scale


def test_multihead_attention_s_packed_in_proj_is_lifted_into_a_linear_of_its_own():
    model, inputs = _SelfAttention().eval(), (torch.randn(2, 5, 16),)
    captured = capture.capture(model, inputs)
    layers = {n.target for n in captured.module.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"}
    assert layers == {"attn.in_proj", "attn.out_proj"}  # other_weight is read twice: left as it is
    attn = captured.module.get_submodule("attn")
    assert attn.in_proj.weight.shape == (48, 16) and attn.in_proj.bias.shape == (48,)
    assert not hasattr(attn, "in_proj_weight") and not hasattr(attn, "in_proj_bias")  # moved, not copied
    assert hasattr(captured.module, "other_weight")
    _same(model, captured, inputs)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_convolutions_given_padding_by_name_are_lifted(padding):
    """SigLIP's patch embedding is nn.Conv2d(padding="valid"): aten's conv2d.padding overload, once left unlifted."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=padding), nn.ReLU()).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    captured = capture.capture(model, inputs)
    assert type(captured.module.get_submodule("0")) is nn.Conv2d
    _same(model, captured, inputs)
