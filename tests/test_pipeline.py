from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import fx

from rewrite import api
from rewrite import spec as spec_language
from rewrite.errors import PassError, RewriteError
from rewrite.pass_base import Approx, Exact, Pass, PassContext, PassResult
from rewrite.passes.fold_bn import FoldBatchNorm
from rewrite.testing import ConvBN, TinyMLP


@dataclass(frozen=True)
class _Options(Pass):
    name = "options"
    rank: int = 4
    ratio: float = 0.5
    on: bool = False
    mode: Literal["exact", "t1"] = "exact"
    limit: int | None = None


def test_parse_maps_kebab_case_options_onto_typed_fields(monkeypatch):
    monkeypatch.setattr(spec_language.registry, "load_pass", lambda name: {"options": _Options}.get(name) or FoldBatchNorm)
    [fold, opts] = spec_language.parse_spec("fold-bn, options{rank=8,ratio=0.25,on=true,mode=t1,limit=none}")
    assert isinstance(fold, FoldBatchNorm)
    assert opts == _Options(rank=8, ratio=0.25, on=True, mode="t1", limit=None)
    assert spec_language.format_spec([fold, opts]) == "fold-bn,options{rank=8,ratio=0.25,on=true,mode=t1}"


@pytest.mark.parametrize("ratio, written", [(0.0, "0"), (2.0, "2"), (0.1234567891, "0.1234567891"), (1e-07, "1e-07")])
def test_a_spec_is_written_as_users_write_it_and_reads_back_exactly(monkeypatch, ratio, written):
    """`rewrite tune` once listed `dgq{budget-cos=0.0}` for what the user writes as budget-cos=0."""
    monkeypatch.setattr(spec_language.registry, "load_pass", lambda name: _Options)
    opts = _Options(ratio=ratio, on=True)
    assert opts.spec() == f"options{{ratio={written},on=true}}"
    assert spec_language.parse_spec(opts.spec()) == [opts]


@pytest.mark.parametrize("spec, message", [
    ("options{rank=abc}", "must be int"),
    ("options{mode=fast}", "one of exact|t1"),
    ("options{nope=1}", "has no option 'nope'"),
    ("options{rank}", "write key=value"),
    ("options{rank=1", "missing '}'"),
    ("options{rank=1}}", "unbalanced"),
    ("", "no passes given"),
])
def test_malformed_specs_are_one_line_errors(monkeypatch, spec, message):
    monkeypatch.setattr(spec_language.registry, "load_pass", lambda name: _Options)
    with pytest.raises(RewriteError, match=message) as info:
        spec_language.parse_spec(spec)
    assert "\n" not in str(info.value)


@dataclass(frozen=True)
class _Breaks(Pass):
    """Claims exactness but scales the first Linear's weight."""
    name = "breaks"
    contract = Exact()

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        gm.fc1.weight.data.mul_(1.5)
        return PassResult(gm, True, {"scaled": 1})


@dataclass(frozen=True)
class _Crashes(Pass):
    name = "crashes"

    def call(self, gm, ctx):
        raise IndexError("boom")


@dataclass(frozen=True)
class _Noisy(Pass):
    """Approximate with a 20 dB floor; adds noise at a chosen SQNR."""
    name = "noisy"
    contract = Approx(min_sqnr_db=20.0)
    level = "module"
    scale: float = 0.01

    def call(self, module, ctx):
        with torch.no_grad():
            list(module.parameters())[-1].add_(self.scale)  # the output layer's bias
        return PassResult(module, True)


def test_a_pass_that_breaks_its_contract_is_rolled_back():
    model, x = TinyMLP(), torch.randn(4, 16)
    result = api.optimize(model, (x,), [_Breaks(), FoldBatchNorm()], measure_latency=False)
    broken, fold = result.report.records
    assert broken.status == "rolled back" and "exceeds exact tolerance" in broken.reason
    assert fold.status == "nothing to rewrite"
    torch.testing.assert_close(result.model(x), model(x))


def test_strict_turns_a_broken_contract_into_an_error_naming_earlier_passes():
    model = TinyMLP()
    with pytest.raises(PassError, match=r"'breaks'.*passes before it: fold-bn"):
        api.optimize(model, model.example_inputs(), [FoldBatchNorm(), _Breaks()], strict=True, measure_latency=False)


def test_a_crashing_pass_is_rolled_back_with_its_exception():
    model = TinyMLP()
    result = api.optimize(model, model.example_inputs(), [_Crashes()], measure_latency=False)
    assert result.report.records[0].status == "rolled back"
    assert "IndexError: boom" in result.report.records[0].reason


GLOO_SAYS = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"


@dataclass(frozen=True)
class _LosesPeer(Pass):
    """What a collective in recovery raises on rank 0 when rank 1 has died."""
    name = "loses-peer"

    def call(self, gm, ctx):
        raise RuntimeError(GLOO_SAYS)


def test_a_dead_peer_under_torchrun_ends_the_run_instead_of_rolling_the_pass_back(monkeypatch):
    model = TinyMLP()
    result = api.optimize(model, model.example_inputs(), [_LosesPeer()], measure_latency=False)
    assert result.report.records[0].status == "rolled back"  # one process: an ordinary pass failure
    from rewrite import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the process group itself is not needed here
    monkeypatch.setattr(distributed, "init_from_env", lambda: None)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        api.optimize(model, model.example_inputs(), [_LosesPeer()], measure_latency=False)


def test_approximate_contract_uses_the_sqnr_floor():
    model = TinyMLP()
    ok = api.optimize(model, model.example_inputs(), [_Noisy(scale=1e-3)], measure_latency=False)
    bad = api.optimize(model, model.example_inputs(), [_Noisy(scale=10.0)], measure_latency=False)
    assert ok.report.records[0].status == "applied"
    assert bad.report.records[0].status == "rolled back" and "below the 20 dB floor" in bad.report.records[0].reason
    assert any("synthetic inputs" in w for w in ok.report.warnings)


def test_created_and_swapped_nodes_record_the_pass():
    model = ConvBN()
    result = api.optimize(model, model.example_inputs(), "fold-bn", measure_latency=False)
    stamped = {n.target for n in result.model.graph.nodes if n.meta.get("rewrite.pass") == "fold-bn"}
    assert stamped == {"conv1", "conv2", "fc"}


def test_graph_pass_on_an_uncapturable_model_is_skipped_with_the_reason():
    from tests.test_capture import _Outer
    model = _Outer()
    result = api.optimize(model, (torch.randn(2, 3),), [FoldBatchNorm(), _Noisy(scale=1e-4)], measure_latency=False)
    fold, noisy = result.report.records
    assert fold.status == "skipped" and "module 'gate'" in fold.reason
    assert noisy.status == "applied"  # a module-level pass still runs on the eager model
    assert not isinstance(result.model, fx.GraphModule)


def _masked_model():
    class Tagger(torch.nn.Module):
        """forward(ids, attention_mask): garbage at padded positions, as real encoders produce."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x, attention_mask):
            return self.fc(x) + (1 - attention_mask[..., None]) * 0.0

    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return Tagger().eval(), (x, mask)


@dataclass(frozen=True)
class _BreaksPadding(Pass):
    """Approximate; ruins only the positions the attention mask hides."""
    name = "breaks-padding"
    contract = Approx(min_sqnr_db=20.0)
    level = "module"

    def call(self, module, ctx):
        inner = module

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, x, attention_mask):
                return self.inner(x, attention_mask) + 50 * (1 - attention_mask[..., None])
        return PassResult(Wrapped(), True)


def test_padding_is_excluded_from_verification_and_the_report_says_so():
    model, inputs = _masked_model()
    result = api.optimize(model, inputs, [_BreaksPadding()], measure_latency=False)
    assert result.report.records[0].status == "applied"
    assert "attention_mask is 1" in result.report.compared and "padding excluded" in result.report.to_markdown()
    unmasked = api.optimize(model, inputs, [_BreaksPadding()], mask_input="x", measure_latency=False)
    assert unmasked.report.records[0].status == "rolled back"


def test_a_rollback_says_what_would_make_the_pass_apply():
    model = TinyMLP()
    result = api.optimize(model, (torch.randn(4, 16),), [_Noisy(scale=10.0)], measure_latency=False)
    reason = result.report.records[0].reason
    assert result.report.records[0].status == "rolled back" and "below the 20 dB floor" in reason


def test_rank_passes_name_the_budget_that_would_apply_them():
    model = TinyMLP()
    x = torch.randn(8, 16)
    result = api.optimize(model, (x,), "lowrank{param-ratio=0.2,min-sqnr=60}", calib=[x], measure_latency=False)
    reason = result.report.records[0].reason
    assert "lowrank{budget-sqnr=60}" in reason and "min-sqnr=" in reason and "--recover steps=300" in reason


def test_a_metric_floor_decides_instead_of_sqnr():
    model = TinyMLP()
    x = torch.randn(8, 16)
    targets = [model(x).argmax(-1)]
    loose = api.optimize(model, (x,), [_Noisy(scale=10.0)], eval={"inputs": [x], "targets": targets},
                         metric="top1", floor="metric=0.0", measure_latency=False)
    strict = api.optimize(model, (x,), [_Noisy(scale=10.0)], eval={"inputs": [x], "targets": targets},
                          metric="top1", floor="metric=1.01", measure_latency=False)
    assert loose.report.records[0].status == "applied"  # SQNR far below 20 dB, but the task metric holds
    assert strict.report.records[0].status == "rolled back" and "--floor metric" in strict.report.records[0].reason
    assert "accepted by top1 ≥ 0" in loose.report.compared


@dataclass(frozen=True)
class _GrowsExactly(Pass):
    """Exact, but leaves the old layer running beside a copy (the in-place-add bug class)."""
    name = "grows"
    contract = Exact()
    level = "module"
    promise: bool = False

    def call(self, module, ctx):
        import copy as _copy
        twin = _copy.deepcopy(module)

        class Both(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = module, twin

            def forward(self, x):
                self.b(x)  # dead work
                return self.a(x)
        return PassResult(Both(), True)

    @property
    def shrinks(self):
        return self.promise


def test_an_exact_pass_that_grows_the_model_is_flagged_or_rolled_back():
    model = TinyMLP()
    x = (torch.randn(4, 16),)
    flagged = api.optimize(model, x, [_GrowsExactly()], measure_latency=False).report.records[0]
    assert flagged.status == "applied" and "parameters grew" in flagged.reason
    rolled = api.optimize(model, x, [_GrowsExactly(promise=True)], measure_latency=False).report.records[0]
    assert rolled.status == "rolled back" and "promises a smaller model" in rolled.reason


@dataclass(frozen=True)
class _LeavesDeadInPlace(Pass):
    """Replaces `relu(a + b)` by its value but leaves an in-place add nobody reads."""
    name = "dead-in-place"
    contract = Exact()

    def call(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
        with gm.graph.inserting_before(out):
            tmp = gm.graph.call_function(torch.ops.aten.mul.Tensor, (value, 2.0))
            gm.graph.call_function(torch.ops.aten.add_.Tensor, (tmp, 1.0))
        return PassResult(gm, True)


def test_dead_in_place_ops_are_flagged():
    model = TinyMLP()
    record = api.optimize(model, (torch.randn(4, 16),), [_LeavesDeadInPlace()], measure_latency=False).report.records[0]
    assert "dead in-place op(s) left running" in record.reason


def test_a_pass_that_finds_nothing_after_an_earlier_pass_swapped_its_layers_says_which_order_works():
    """fwsvd after dgq finds no nn.Linear left: the reason names dgq's swaps and the order that applies both;
    fwsvd alone on a model without Linears gets no such hint."""
    from tests.passes.test_lowrank import FFN
    model, calib = FFN(), [(torch.randn(64, 32),) for _ in range(4)]
    dgq_first = api.optimize(model, calib[0], "dgq{budget-cos=0},fwsvd{min-sqnr=-100}", calib=calib,
                             measure_latency=False)
    quantized, factorized = dgq_first.report.records
    assert quantized.status == "applied" and factorized.status == "nothing to rewrite"
    assert "dgq swapped 5 layer(s) before it" in factorized.reason and "put fwsvd earlier" in factorized.reason
    alone = api.optimize(ConvBN(), torch.randn(2, 3, 8, 8), "fwsvd", measure_latency=False).report.records[0]
    assert alone.status == "nothing to rewrite" and "earlier in the pipeline" not in alone.reason


def test_swaps_of_layers_a_pass_does_not_read_are_not_named_where_it_finds_nothing():
    """tconv reads convolutions: after dgq quantized an MLP's Linears it finds nothing, and the reason does not
    tell the user to run it before dgq (which would change nothing)."""
    from tests.passes.test_lowrank import FFN
    model, calib = FFN(), [(torch.randn(64, 32),) for _ in range(4)]
    result = api.optimize(model, calib[0], "dgq{budget-cos=0},tconv", calib=calib, measure_latency=False)
    quantized, convs = result.report.records
    assert quantized.status == "applied" and convs.status == "nothing to rewrite"
    assert "earlier in the pipeline" not in convs.reason, convs.reason


def test_swaps_that_leave_a_layer_of_the_kind_a_pass_reads_are_not_named():
    """fold-bn's folded Linear is still a Linear: fwsvd finding nothing after it is not fold-bn's doing."""
    from tests.passes.test_fold_bn import _LeViTMlp
    model = _LeViTMlp().eval()
    calib = [(torch.randn(2, 5, 8),) for _ in range(4)]
    result = api.optimize(model, calib[0], "fold-bn,fwsvd{rank=16}", calib=calib, measure_latency=False)
    folded, factorized = result.report.records
    assert folded.status == "applied" and factorized.status == "nothing to rewrite"
    assert "earlier in the pipeline" not in factorized.reason, factorized.reason
