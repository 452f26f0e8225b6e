"""Code from a file runs only when the user said to trust it: all three doors (optimize, diff, load), CLI and API."""
import pytest
import torch
from typer.testing import CliRunner

import rewrite
from rewrite.cli import app
from tests.hostile import make_workspace, snapshot


@pytest.fixture
def ws(tmp_path):
    return make_workspace(tmp_path)


@pytest.mark.parametrize("door", [
    lambda d: rewrite.load(str(d / "evil.pt")),
    lambda d: rewrite.load(str(d / "evil.pt2")),
    lambda d: rewrite.optimize(str(d / "evil.pt"), torch.randn(2, 3, 8, 8), "fold-bn", measure_latency=False),
    lambda d: rewrite.optimize(str(d / "evil.pt2"), None, "fold-bn", measure_latency=False),
    lambda d: rewrite.diff(str(d / "m.pt2"), str(d / "evil.pt"), None),
    lambda d: rewrite.diff(str(d / "evil.pt2"), str(d / "m.pt2"), None),
], ids=["load-pt", "load-pt2", "optimize-pt", "optimize-pt2", "diff-pt", "diff-pt2"])
def test_api_refuses_untrusted_pickles_before_any_code_runs(ws, door):
    with pytest.raises(rewrite.RewriteError, match="trusted=True"):
        door(ws)
    assert not (ws / "PWNED").exists()


def test_trusted_true_is_the_only_way_in(ws):
    with pytest.raises(rewrite.RewriteError, match="not a torch.nn.Module"):
        rewrite.load(str(ws / "evil.pt"), trusted=True)  # the payload returns an int
    assert (ws / "PWNED").exists()  # the flag really unpickles: the refusal above was the default's doing


def test_trusted_pickled_module_loads_and_rewrites(ws):
    model = rewrite.load(str(ws / "model.pt"), trusted=True)
    result = rewrite.optimize(model, torch.randn(2, 3, 8, 8), "fold-bn", measure_latency=False)
    assert result.report.records[0].status == "applied"


def test_safe_pt2_needs_no_trust(ws):
    model = rewrite.load(str(ws / "m.pt2"))
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("command", [
    ["optimize", "{d}/evil.pt", "-p", "fold-bn", "--inputs", "{d}/x.pt", "-o", "{d}/o"],
    ["optimize", "{d}/evil.pt2", "-p", "fold-bn", "-o", "{d}/o"],
    ["diff", "{d}/evil.pt", "{d}/m.pt2"],
])
def test_cli_flag_opts_in_and_says_so_before_loading(ws, command):
    argv = [a.replace("{d}", str(ws)) for a in command]
    refused = CliRunner().invoke(app, argv)
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output and not (ws / "PWNED").exists()
    trusted = CliRunner().invoke(app, argv + ["--trust-pickle"])
    assert trusted.output.index("notice:") < trusted.output.index("error:")  # notice first, then the file ran
    assert (ws / "PWNED").exists()


def test_data_files_never_run_code(ws):
    before = snapshot(ws)
    for flag in ("--inputs", "--calib", "--eval"):
        result = CliRunner().invoke(app, ["optimize", str(ws / "m.pt2"), "-p", "fold-bn", flag, str(ws / "evil.pt"),
                                          "--metric", "top1", "--trust-pickle", "-o", str(ws / "o")])
        assert result.exit_code == 2, result.output
    assert not (ws / "PWNED").exists() and snapshot(ws) == before
