import pytest
import torch

from rewrite import calibration
from rewrite.errors import RewriteError
from rewrite.testing import TinyMLP
from tests.test_capture import _Outer


class _TwoInputs(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, scale=None):
        return input_ids.float() * (1 if attention_mask is None else attention_mask)


def test_structures_normalize_to_tuples_of_positional_inputs():
    model, x = TinyMLP(), torch.randn(4, 16)
    assert calibration.from_user(x, model, "c").batches == [(x,)]
    assert len(calibration.from_user([x, x, x], model, "c").batches) == 3
    assert calibration.from_user((x,), model, "c").batches == [(x,)]


def test_dicts_bind_to_the_forward_signature_and_drop_trailing_defaults():
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5)
    data = calibration.from_user([{"attention_mask": mask, "input_ids": ids}], _TwoInputs(), "c")
    assert data.batches == [(ids, mask)]


def test_inputs_with_targets():
    x, y = torch.randn(4, 16), torch.randn(4, 4)
    data = calibration.from_user({"inputs": [x, x], "targets": [y, y]}, TinyMLP(), "eval")
    assert len(data.batches) == 2 and data.targets == [y, y]


def test_batches_are_bounded():
    data = calibration.from_user([torch.randn(2, 16)] * 50, TinyMLP(), "c")
    assert len(data.batches) == calibration.MAX_BATCHES


@pytest.mark.parametrize("bad, message", [
    ("text", "wrong structure"),
    ([["a", "b"]], "wrong structure"),
    ([], "empty"),
    ({"wrong_key": torch.randn(2, 16)}, "do not match the model's forward"),
])
def test_wrong_structures_are_one_line_errors(bad, message):
    with pytest.raises(RewriteError, match=message):
        calibration.from_user(bad, TinyMLP(), "calibration")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_data_is_refused(value):
    x = torch.randn(4, 16)
    x[1, 3] = value
    with pytest.raises(RewriteError, match="NaN or inf"):
        calibration.from_user([torch.randn(4, 16), x], TinyMLP(), "calibration")


def test_unreadable_files(tmp_path):
    with pytest.raises(RewriteError, match="not found"):
        calibration.load_file(tmp_path / "missing.pt", "calibration")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(RewriteError, match="not readable tensor data"):
        calibration.load_file(junk, "calibration")


def test_weights_only_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(_Outer(), path)
    with pytest.raises(RewriteError, match="not readable tensor data"):
        calibration.load_file(path, "calibration")


def test_synthetic_data_is_seeded():
    x = (torch.randn(2, 3),)
    a, b = calibration.synthetic(x, seed=3), calibration.synthetic(x, seed=3)
    assert a.synthetic and all(torch.equal(p[0], q[0]) for p, q in zip(a.batches, b.batches))


class _Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.pair = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 8))

    def forward(self, x):
        return self.pair(self.b(torch.relu(self.a(x))))


def _captured_chain():
    from rewrite import capture
    model = _Chain()
    return capture.capture(model, (torch.randn(3, 8),)).module, model


def test_sequential_inputs_follow_the_layers_the_caller_changed():
    gm, _ = _captured_chain()
    batches = [(torch.randn(3, 8),), (torch.randn(5, 8),)]
    before = calibration.layer_values(gm, ["b"], batches)["b"]
    seen = {}
    for path, inputs in calibration.sequential_inputs(gm, ["a", "b"], batches):
        seen[path] = inputs
        if path == "a":
            gm.a.weight.data.zero_()  # what a pass does to a layer before the next one is calibrated
    assert [x.shape[0] for x in seen["a"]] == [3, 5]
    assert all(torch.equal(x, torch.relu(gm.a.bias).expand_as(x)) for x in seen["b"])
    assert not torch.equal(seen["b"][0], before[0])


class _PairAsOneModule(torch.fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, torch.nn.Sequential) or super().is_leaf_module(m, name)


def test_sequential_inputs_reach_layers_inside_a_called_module_and_match_one_hooked_run():
    model = _Chain()
    gm = torch.fx.GraphModule(model, _PairAsOneModule().trace(model))  # "pair" is one call_module node
    assert "pair" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    paths = [p for p, m in gm.named_modules() if isinstance(m, torch.nn.Linear)]
    batches = [(torch.randn(4, 8),)]
    hooked = calibration.layer_values(gm, paths, batches)
    streamed = dict(calibration.sequential_inputs(gm, paths, batches))
    assert set(streamed) == set(paths)
    assert all(torch.allclose(streamed[p][0], hooked[p][0]) for p in paths)


def test_sequential_inputs_on_an_eager_module_run_one_pass_per_layer():
    model = _Chain()
    batches = [(torch.randn(2, 8),)]
    streamed = dict(calibration.sequential_inputs(model, ["a", "pair.1"], batches))
    assert torch.equal(streamed["pair.1"][0], calibration.layer_values(model, ["pair.1"], batches)["pair.1"][0])


def test_suffix_runs_give_the_whole_forward_of_the_model_with_a_layer_swapped():
    from rewrite import capture
    from rewrite.patterns import set_submodule
    from rewrite.testing import GatedFFN
    model = GatedFFN()
    batches = [model.example_inputs(), (torch.randn(3, 5, 128),)]
    gm = capture.capture(model, batches[0]).module
    paths = [p for p, m in gm.named_modules() if isinstance(m, torch.nn.Linear)]
    assert calibration.Suffixes.usable(gm, batches) and len(paths) == 3
    suffixes = calibration.Suffixes(gm, paths, batches)
    for path in paths:
        layer = gm.get_submodule(path)
        set_submodule(gm, path, torch.nn.Linear(layer.in_features, layer.out_features))
        with torch.no_grad():
            want = [gm(*batch) for batch in batches]
        got = suffixes.outputs(path)
        assert all(torch.equal(w, g) for w, g in zip(want, got))
        set_submodule(gm, path, layer)
        assert not torch.equal(got[0], gm(*batches[0]))  # the swap mattered


def test_suffix_runs_start_at_the_module_that_holds_a_nested_layer():
    model = _Chain()
    gm = torch.fx.GraphModule(model, _PairAsOneModule().trace(model))  # "pair" is one call_module node
    batches = [(torch.randn(4, 8),)]
    suffixes = calibration.Suffixes(gm, ["pair.1"], batches)
    gm.pair[1].weight.data.mul_(2)
    with torch.no_grad():
        assert torch.equal(suffixes.outputs("pair.1")[0], gm(*batches[0]))


def test_calibration_data_whose_outputs_do_not_fit_in_memory_is_refused_before_the_forwards(monkeypatch):
    """The outputs of every batch are held (the original's and the rewritten model's): a run that would fill
    the memory with them stops at the first batch with the sizes and how many batches fit."""
    import rewrite
    from rewrite import inputs, measure
    calls = []
    model = TinyMLP()
    model.register_forward_hook(lambda *_: calls.append(1))
    batches = [(torch.randn(4, 16),) for _ in range(10)]
    each = 4 * 4 * 4  # TinyMLP's (4, 4) float32 output
    monkeypatch.setattr(measure, "free_memory", lambda: int(2 * each * 10 / inputs.OUTPUT_MEMORY_SHARE) - 1)
    with pytest.raises(RewriteError, match=r"10 calibration batches .* at most 9 batches \(--calib-batches 9\)"):
        rewrite.optimize(model, batches[0], "fold-bn", calib=batches, calib_batches=10, measure_latency=False)
    assert len(calls) == 2  # the example's check and the first batch: none of the other nine
    monkeypatch.setattr(measure, "free_memory", lambda: int(2 * each * 10 / inputs.OUTPUT_MEMORY_SHARE) + 64)
    assert rewrite.optimize(model, batches[0], "fold-bn", calib=batches, calib_batches=10,
                            measure_latency=False).report.records
