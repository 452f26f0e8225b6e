"""Every registered pass (built-in or installed plugin) against every toy model, under its own contract."""
import pytest

from rewrite import api, measure, registry
from rewrite.pass_base import Exact
from rewrite.testing import TOY_MODELS, check_pass

BUILTIN = sorted(n for n, e in registry.registered().items() if e.distribution.startswith("rewrite "))
_statuses: dict[str, set[str]] = {}
pytestmark = pytest.mark.usefixtures("export_once")  # each toy is exported once, not once per pass


@pytest.mark.parametrize("toy", TOY_MODELS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", sorted(registry.registered()))
def test_pass_keeps_its_contract_on_toy_models(name, toy):
    pass_ = registry.load_pass(name)()
    model = toy()
    inputs = model.example_inputs()
    if isinstance(pass_.contract, Exact):
        result = check_pass(pass_, model, inputs)  # strict: a broken exact contract fails here
    else:  # approximate at default options: it may be rolled back, but only by its contract
        result = api.optimize(model, inputs, [pass_], calib=[inputs] * 2, measure_latency=False)
    [record] = result.report.records
    _statuses.setdefault(name, set()).add(record.status)
    if record.status == "rolled back":
        assert "raised" not in record.reason and "floor" in record.reason, record.reason
    elif record.status == "applied":
        assert record.error is not None and record.layers_after > 0  # the pipeline verified it
    else:
        assert record.status == "nothing to rewrite" and record.reason, record  # says why


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_pass_applies_on_some_toy_at_default_options(name, monkeypatch):
    """A conformance run that only ever sees 'nothing to rewrite' proves nothing about a pass. Passes that
    declare they need recovery (snnk replaces a layer by a different function) get it, as users would.
    Passes that keep an original layer timed faster here (pointwise, t1) would, on a toy's small shapes,
    answer for this CPU (CI's timed the toy's 1×1 convs faster everywhere): they get a clock on which the
    rewritten layer is the fast one, so this asks whether a pass can apply, not which kernel a machine
    prefers (each pass's own tests check the choice against the times it recorded)."""
    monkeypatch.setattr(measure, "best_times", _rewritten_layers_faster)
    applied = []
    for toy in TOY_MODELS:
        pass_ = registry.load_pass(name)()
        model = toy()
        inputs = model.example_inputs()
        recover = "steps=200,lr=3e-3" if pass_.needs_recovery else None
        record = api.optimize(model, inputs, [pass_], calib=[inputs] * 2, recover=recover,
                              measure_latency=False).report.records[0]
        if record.status == "applied":
            applied.append(toy.__name__)
            break
    assert applied, f"{name} applies on none of {[t.__name__ for t in TOY_MODELS]}"


def _rewritten_layers_faster(candidates, inputs, **kw):
    return {name: 1.0 if type(m).__module__.startswith("rewrite.passes") else 2.0 for name, m in candidates.items()}
