"""Every registered pass (built-in or installed plugin) against every toy model, under its own contract."""
import pytest

import torch

from rewrite import api, measure, registry
from rewrite.pass_base import Exact
from rewrite.testing import TOY_MODELS, check_pass

BUILTIN = sorted(n for n, e in registry.registered().items() if e.distribution.startswith("rewrite "))
_statuses: dict[str, set[str]] = {}


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
    pointwise keeps a 1×1 conv that is timed faster here, which on a toy's small grid depends on the CPU
    (CI's picked the conv everywhere): it gets a clock on which the convolution is the slow one, so this
    asks whether it can apply, not which kernel this machine prefers (test_pointwise checks the choice)."""
    if name == "pointwise":
        monkeypatch.setattr(measure, "torch_latency", _convolutions_slower)
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


def _convolutions_slower(module, inputs, **kw):
    ms = 2.0 if isinstance(module, torch.nn.modules.conv._ConvNd) else 1.0
    return ms, ms, 1
