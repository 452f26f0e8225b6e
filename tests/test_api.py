import pytest
import torch

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
    assert isinstance(module, torch.nn.Module)


def test_non_module_is_refused():
    with pytest.raises(rewrite.RewriteError, match="expected a torch.nn.Module"):
        rewrite.optimize("model.pt", (torch.randn(1),), "fold-bn")


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
