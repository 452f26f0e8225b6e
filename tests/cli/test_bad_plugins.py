"""Plugins as hostile inputs: passes that raise, return junk, hang, or write to what they may only read.

Each is rolled back with one reason naming its distribution, the run goes on, and nothing the user gave
changes. A plugin that fails to import is named with its distribution, and the other passes still list.
"""
import json
import time

import pytest
import torch
from typer.testing import CliRunner

import rewrite
from rewrite.cli import app
from rewrite.testing import ConvBN

PLUGIN = '''
import time

from dataclasses import dataclass

from rewrite import Exact, Pass, PassResult


def plugin_pass(name, body):
    cls = dataclass(frozen=True)(type(name.title().replace("-", ""), (Pass,), {
        "name": name, "contract": Exact(), "call": body, "__module__": __name__}))
    globals()[cls.__name__] = cls


def raises(self, gm, ctx):
    raise ValueError("boom")


def junk(self, gm, ctx):
    return PassResult("not a module", True)


def nothing(self, gm, ctx):
    return None


def poisons_original(self, gm, ctx):
    for p in ctx.original.parameters():
        p.data.mul_(0)  # the model the pass is judged against, zeroed: its own output would then "match"
    for p in gm.parameters():
        p.data.mul_(0)
    return PassResult(gm, True)


def poisons_data(self, gm, ctx):
    ctx.calibration[0][0].mul_(0)
    return PassResult(gm, True)


def hangs(self, gm, ctx):
    while True:
        try:
            time.sleep(0.05)
        except Exception:  # a pass that swallows errors still stops at the time limit
            pass


def breaks_then_raises(self, gm, ctx):
    for p in gm.parameters():
        p.data.add_(1)
    raise RuntimeError("half done")


for name, body in [("raises", raises), ("junk", junk), ("nothing", nothing), ("poisons-original", poisons_original),
                   ("poisons-data", poisons_data), ("hangs", hangs), ("breaks-then-raises", breaks_then_raises)]:
    plugin_pass(name, body)
'''

PASSES = {"raises": "Raises", "junk": "Junk", "nothing": "Nothing", "poisons-original": "PoisonsOriginal",
          "poisons-data": "PoisonsData", "hangs": "Hangs", "breaks-then-raises": "BreaksThenRaises"}
REASONS = {"raises": "raised ValueError: boom", "junk": "module is a str", "nothing": "returned NoneType",
           "poisons-original": "changed ctx.original or the calibration", "poisons-data": "changed ctx.original or the calibration",
           "hangs": "ran past the time limit of 2 s", "breaks-then-raises": "raised RuntimeError: half done"}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A distribution `evil-plugins 0.1` on sys.path, its passes registered by entry points as pip would."""
    site = tmp_path / "site"
    (site / "evil_plugins").mkdir(parents=True)
    (site / "evil_plugins" / "__init__.py").write_text(PLUGIN)
    (site / "evil_plugins" / "broken.py").write_text("raise ImportError('needs libfoo.so')\n")
    info = site / "evil_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-plugins\nVersion: 0.1\n")
    lines = [f"{name} = evil_plugins:{cls}" for name, cls in PASSES.items()] + ["broken = evil_plugins.broken:Broken"]
    (info / "entry_points.txt").write_text("[rewrite.passes]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    return tmp_path


def test_each_bad_plugin_pass_is_rolled_back_naming_its_distribution_and_the_run_goes_on(plugins):
    spec = "fold-bn," + ",".join(PASSES)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["optimize", "examples/cnn.py:build", "-p", spec, "-o", str(plugins / "out"),
                                      "--no-latency", "--pass-timeout", "2"])
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 120
    records = {r["name"]: r for r in json.loads((plugins / "out" / "report.json").read_text())["records"]}
    assert records["fold-bn"]["status"] == "applied"
    for name in PASSES:
        assert records[name]["status"] == "rolled back", records[name]
        assert REASONS[name] in records[name]["reason"] and "[plugin evil-plugins 0.1]" in records[name]["reason"]


def test_a_plugin_never_reaches_the_users_model(plugins):
    model = ConvBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = rewrite.optimize(model, model.example_inputs(), "poisons-original,breaks-then-raises",
                              measure_latency=False)
    assert [r.status for r in result.report.records] == ["rolled back", "rolled back"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = model.example_inputs()[0]
    torch.testing.assert_close(result.model(x), model(x))  # the rollbacks restored the rewritten copy too


def test_a_plugin_that_fails_to_import_is_named_and_the_others_still_list(plugins):
    listed = CliRunner().invoke(app, ["passes", "list"])
    assert listed.exit_code == 0 and "broken" in listed.output and "dgq" in listed.output
    table = CliRunner().invoke(app, ["passes", "list", "--markdown"])
    assert table.exit_code == 0 and "| `dgq` |" in table.output and "needs libfoo.so" in table.output
    used = CliRunner().invoke(app, ["optimize", "examples/cnn.py:build", "-p", "broken", "-o", str(plugins / "o")])
    lines = [line for line in used.output.splitlines() if line.strip()]
    assert used.exit_code == 2 and len(lines) == 1, used.output
    assert "evil-plugins 0.1" in lines[0] and "needs libfoo.so" in lines[0]
    assert not (plugins / "o").exists()


@pytest.mark.parametrize("value", [0, -1, "10", float("nan"), True])
def test_pass_timeout_must_be_a_positive_number_of_seconds(value):
    model = ConvBN().eval()
    with pytest.raises(rewrite.InvalidValue, match="pass_timeout"):
        rewrite.optimize(model, model.example_inputs(), "fold-bn", measure_latency=False, pass_timeout=value)
