import pytest
import torch
from torch import nn

import rewrite
from rewrite.testing import ConvBN
from tests.conftest import minilm


def test_optimize_leaves_the_users_model_untouched():
    model = ConvBN().train()  # even its mode must not change
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = rewrite.optimize(model, model.example_inputs(), "fold-bn,reparam", measure_latency=False)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert result.model is not model


def test_result_report_renders():
    model = ConvBN()
    report = rewrite.optimize(model, model.example_inputs(), "fold-bn").report
    md = report.to_markdown()
    assert "| fold-bn | applied |" in md and "torch: rewritten model is" in md
    assert '"pipeline": "fold-bn"' in report.to_json()


def test_diff_reports_error_and_latency():
    a = ConvBN()
    b = ConvBN()  # other random weights
    report = rewrite.diff(a, b, a.example_inputs())
    assert report.error_vs_original["max_abs"] > 0
    assert [m.label for m in report.measurements] == ["original", "rewritten"]


def test_load_factory_spec(tmp_path):
    module = rewrite.load("rewrite.testing:TinyMLP")
    assert type(module).__name__ == "TinyMLP" and module(torch.randn(3, 16)).shape == (3, 4)


def test_non_module_is_refused():
    with pytest.raises(rewrite.RewriteError, match="expected a torch.nn.Module"):
        rewrite.optimize(42, (torch.randn(1),), "fold-bn")


def test_passes_as_a_list_of_names_or_instances():
    from rewrite.passes.fold_bn import FoldBatchNorm
    model = ConvBN()
    result = rewrite.optimize(model, model.example_inputs(), ["fold-bn", FoldBatchNorm, "reparam"],
                              measure_latency=False)
    assert [r.name for r in result.report.records] == ["fold-bn", "fold-bn", "reparam"]


def _specialized():
    from tests.hostile import FACTORIES
    scope = {}
    exec(FACTORIES, scope)
    return scope["specialized"]()


@pytest.mark.parametrize("call, text", [
    (lambda m, x: rewrite.optimize(m, x, [42]), "passes list holds a int"),
    (lambda m, x: rewrite.optimize(m, x, None), "passes must be a spec string"),
    (lambda m, x: rewrite.optimize(m, x, "fold-bn", calib_batches=0), "whole number"),
    (lambda m, x: rewrite.optimize(m, x, "fold-bn", calib=[x], calib_batches=-1), "whole number"),
    (lambda m, x: rewrite.optimize(m, (torch.full_like(x[0], float("nan")),), "fold-bn"), "NaN or inf"),
    (lambda m, x: rewrite.optimize(m, x, "fold-bn", emit="onnx"), "needs an output folder"),
    (lambda m, x: rewrite.optimize(m, x, "fold-bn", eval={"inputs": [x[0]] * 2, "targets": [torch.zeros(2)]},
                                   metric="top1"), "target batch"),
    (lambda m, x: rewrite.diff(m, _specialized()[0], x), "rejects the example inputs"),
], ids=range(8))
def test_api_bad_input_raises_one_line_rewrite_error(call, text):
    model = ConvBN()
    with pytest.raises(rewrite.RewriteError, match=text) as info:
        call(model, model.example_inputs())
    assert "\n" not in str(info.value)


def test_nan_option_on_an_instance_is_refused():
    from rewrite.passes.fwsvd import FisherSVD
    with pytest.raises(rewrite.RewriteError, match="must be finite"):
        rewrite.optimize(ConvBN(), ConvBN().example_inputs(), [FisherSVD(min_sqnr=float("nan"))])


def test_option_errors_are_rewrite_errors_and_value_errors():
    from rewrite.passes.dgq import DualGrainedQuant
    with pytest.raises(rewrite.InvalidValue):
        DualGrainedQuant(group=3)
    assert issubclass(rewrite.InvalidValue, ValueError)


def test_calibration_of_another_shape_on_a_shape_specialized_capture_is_one_line():
    model, (x,) = _specialized()
    with pytest.raises(rewrite.RewriteError, match=r"captured for \(8, 4\)"):
        rewrite.optimize(model, (x,), "fold-bn", calib=[torch.randn(2, 4)], measure_latency=False)


@pytest.mark.slow
def test_bert_minilm_end_to_end_has_nothing_for_conv_passes(tmp_path):
    model, inputs = minilm()
    result = rewrite.optimize(model, inputs, "fold-bn,reparam", out=tmp_path, measure_latency=False)
    assert [r.status for r in result.report.records] == ["nothing to rewrite"] * 2
    reloaded = torch.export.load(tmp_path / "model.pt2").module()
    ids = torch.randint(1000, 2000, (3, 9))
    want = model(ids, torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(reloaded(ids, torch.ones_like(ids)).last_hidden_state, want, rtol=1e-4, atol=1e-4)


def test_model_for_rewrites_again_for_other_shapes_and_caches():
    from rewrite.testing import ToyFNO
    model = ToyFNO(2, 16).eval()
    result = rewrite.optimize(model, model.example_inputs(), "t1{form=gemm}", measure_latency=False)
    x = torch.randn(3, 1, 20, 20)
    with pytest.raises(ValueError, match="built for grid"):
        result.model(x)
    other = result.model_for(x)
    torch.testing.assert_close(other(x), model(x), rtol=1e-4, atol=1e-5)
    assert result.model_for(x) is other and result.model_for(*model.example_inputs()) is result.model


def test_model_for_refuses_passes_that_need_data_at_the_new_shape():
    from rewrite.testing import TinyMLP
    model = TinyMLP()
    x = torch.randn(4, 16)
    result = rewrite.optimize(model, (x,), "fwsvd{min-sqnr=-100}", calib=[x], measure_latency=False)
    with pytest.raises(rewrite.RewriteError, match="need calibration data at this shape"):
        result.model_for(torch.randn(5, 16))


def test_the_recipe_records_what_passes_chose_by_measuring(tmp_path):
    import json

    from rewrite.pass_base import pinned_choices
    from rewrite.testing import ToyFNO
    model = ToyFNO(2, 16).eval()
    rewrite.optimize(model, model.example_inputs(), "t1", out=tmp_path / "o", measure_latency=False)
    recipe = json.loads((tmp_path / "o" / "recipe.json").read_text())
    [t1] = recipe["passes"]
    assert set(t1["choices"]["forms"].values()) <= {"gemm", "fft"} and len(t1["choices"]["forms"]) == 2
    # The pipeline to re-run pins those choices, so a busier machine cannot choose otherwise.
    pinned = rewrite.spec.parse_spec(recipe["pipeline"])[0]
    assert recipe["asked"] == "t1" and pinned_choices(pinned.layers, ("gemm", "fft")) == t1["choices"]["forms"]


def test_pinned_forms_are_taken_without_timing(monkeypatch):
    from rewrite import measure
    from rewrite.testing import ToyFNO
    model = ToyFNO(2, 16).eval()
    first = rewrite.optimize(model, model.example_inputs(), "t1,pointwise", measure_latency=False)
    pinned = [p.pinned(r.stats) for p, r in zip(first.passes, first.report.records)]
    monkeypatch.setattr(measure, "best_times", lambda *a, **k: pytest.fail("a pinned choice was timed again"))
    again = rewrite.optimize(model, model.example_inputs(), pinned, measure_latency=False)
    x = model.example_inputs()[0]
    assert torch.equal(first.model(x), again.model(x))
    assert [r.stats.get("forms") for r in again.report.records] == [r.stats.get("forms") for r in first.report.records]


@pytest.mark.parametrize("spec", ["pointwise{layers=a:fast}", "t1{layers=gemm}"])
def test_a_malformed_pinned_choice_is_a_one_line_error(spec):
    with pytest.raises(rewrite.RewriteError, match="layers="):
        rewrite.spec.parse_spec(spec)


def test_a_failed_artifact_raises_after_the_folder_is_written_unless_allowed(tmp_path, monkeypatch):
    import json
    from rewrite.emit import onnx as onnx_emit

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(onnx_emit, "export_onnx", broken)
    model, x = nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8)
    with pytest.raises(rewrite.ArtifactError, match="onnx was not written: ONNX export failed") as failed:
        rewrite.optimize(model, (x,), "fold-bn", emit="onnx", out=tmp_path / "a", measure_latency=False)
    assert failed.value.result.report.problems()
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["status"] == "failed"
    assert {a["kind"]: a["status"] for a in report["artifacts"]} == {"pt2": "ok", "onnx": "failed"}
    allowed = rewrite.optimize(model, (x,), "fold-bn", emit="onnx", out=tmp_path / "b", measure_latency=False,
                               allow_artifact_errors=True)
    assert allowed.report.artifacts[1].status == "failed"


def test_an_artifact_off_the_verified_model_passes_only_when_as_accurate_as_it():
    from rewrite.report import Artifact
    exact = {"max_abs": 1e-6, "rel_l2": 1e-7}
    flips = {"max_abs": 0.13, "rel_l2": 0.04, "vs_original_rel_l2": 0.092, "rewrite_rel_l2": 0.096}
    broken = {"max_abs": 2.1, "rel_l2": 0.32, "vs_original_rel_l2": 0.33, "rewrite_rel_l2": 0.06}
    assert Artifact("onnx", "m.onnx", exact).status == "ok"
    assert Artifact("onnx", "m.onnx", flips).status == "ok"
    assert "verified model's 6.0e-02" in Artifact("onnx", "m.onnx", broken).problem
    assert Artifact("onnx", "m.onnx", {"max_abs": 0.1, "rel_l2": 0.1}).status == "failed"  # nothing to weigh it by


@pytest.mark.parametrize("arguments, sentence", [
    ({"seed": "abc"}, "give a whole number"), ({"seed": 1.5}, "give a whole number"), ({"seq_len": 0}, "whole number"),
    ({"seq_len": "512"}, "whole number"), ({"calib_batches": "8"}, "whole number"), ({"calib_batches": 0}, "whole"),
    ({"strict": "no"}, "True or False"), ({"blockwise": 1}, "True or False"), ({"force": None}, "True or False"),
    ({"out": 3}, "folder path"), ({"trusted": "yes"}, '"remote-code"'), ({"trusted": ["pickle", "all"]}, "kinds"),
    ({"pass_timeout": "10"}, "seconds"),
])
def test_api_arguments_of_the_wrong_type_are_one_sentence(arguments, sentence):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(rewrite.InvalidValue, match=sentence):
        rewrite.optimize(model, (torch.randn(2, 4),), "fold-bn", measure_latency=False, **arguments)
