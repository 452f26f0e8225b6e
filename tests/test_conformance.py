"""Every registered pass (built-in or installed plugin) against every toy model, under its own contract."""
import pytest

from rewrite import registry
from rewrite.testing import TOY_MODELS, check_pass


@pytest.mark.parametrize("toy", TOY_MODELS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", sorted(registry.registered()))
def test_pass_keeps_its_contract_on_toy_models(name, toy):
    cls = registry.load_pass(name)
    model = toy()
    result = check_pass(cls(), model, model.example_inputs())
    [record] = result.report.records
    assert record.status in ("applied", "nothing to rewrite"), record.reason
    if record.status == "applied":
        assert record.error is not None  # the pipeline verified it
