"""Every registered pass (built-in or installed plugin) against every toy model, under its own contract."""
import pytest

from rewrite import api, registry
from rewrite.pass_base import Exact
from rewrite.testing import TOY_MODELS, check_pass


@pytest.mark.parametrize("toy", TOY_MODELS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", sorted(registry.registered()))
def test_pass_keeps_its_contract_on_toy_models(name, toy):
    pass_ = registry.load_pass(name)()
    model = toy()
    inputs = model.example_inputs()
    if isinstance(pass_.contract, Exact):
        result = check_pass(pass_, model, inputs)  # strict: a broken exact contract fails here
    else:  # approximate at default options on random toys: it may be rolled back, but only by its contract
        result = api.optimize(model, inputs, [pass_], calib=[inputs] * 2, measure_latency=False)
    [record] = result.report.records
    assert record.status in ("applied", "nothing to rewrite", "rolled back"), record.reason
    if record.status == "rolled back":
        assert "raised" not in record.reason, record.reason
    if record.status == "applied":
        assert record.error is not None  # the pipeline verified it
