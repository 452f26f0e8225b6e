"""The CLI through typer's CliRunner: the main job, listings, and every bad input → one line, exit 2."""
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rewrite.cli import app
from rewrite.testing import ConvBN
from tests.hostile import said

EXAMPLE = str(Path(__file__).parents[2] / "examples" / "cnn.py") + ":build"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = said(result.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_optimize_the_bundled_example(tmp_path):
    result = invoke("optimize", EXAMPLE, "--passes", "fold-bn,reparam", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "fold-bn" in result.output and "reparam" in result.output and "applied" in result.output
    assert (tmp_path / "out" / "model.pt2").is_file() and (tmp_path / "out" / "report.md").is_file()


@pytest.mark.slow
def test_the_readme_main_job_applies_every_pass_without_third_party_warnings(tmp_path):
    """The README's command as a user runs it (its own process): every pass applied, ONNX written, and
    nothing on stderr (no exporter or library warnings leak to the user)."""
    import re
    import subprocess
    root = Path(__file__).parents[2]
    command = re.search(r"&& rewrite (optimize [^\n]+)", (root / "README.md").read_text()).group(1).split()
    args = [a for a in command if a != "--force"]
    args[args.index("-o") + 1] = str(tmp_path / "fno")
    proc = subprocess.run([sys.executable, "-c", "from rewrite.cli import main; main()", *args, "--no-latency"],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in args[args.index("--passes") + 1].split(","):
        assert re.search(rf"│ {name} +│ applied", proc.stdout), proc.stdout
    assert (tmp_path / "fno" / "model.onnx").is_file() and "artifact onnx: FAILED" not in proc.stdout
    assert not said(proc.stderr) and "Warning" not in proc.stdout, proc.stderr  # progress lines are ours


def test_in_a_pipe_long_work_prints_progress_lines_and_short_work_none(monkeypatch, tmp_path):
    """A pipe or log gets no live display: SmolLM2's dgq run printed nothing for minutes."""
    import io
    import re

    from rich.console import Console

    from rewrite.cli import render
    quiet = io.StringIO()
    render.heartbeat(Console(file=quiet))("searching", 1, 9)
    assert quiet.getvalue() == ""  # within HEARTBEAT_S of the start: short work prints nothing
    monkeypatch.setattr(render, "HEARTBEAT_S", 0.0)
    result = invoke("optimize", EXAMPLE, "--passes", "fold-bn,reparam", "-o", tmp_path / "out", "--no-latency")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("progress: ")]
    assert any("fold-bn" in line for line in lines) and all(re.search(r", \d+ s$", line) for line in lines), lines


def test_a_reason_quoting_brackets_is_shown_as_written_not_read_as_markup(monkeypatch):
    """gloo's errors start with "[/path/pair.cc:553]", which rich read as a closing tag and raised on."""
    import io

    from rich.console import Console

    from rewrite.cli import render
    from rewrite.report import PassRecord, RunReport
    from tests.test_pipeline import GLOO_SAYS
    record = PassRecord("lowrank", "lowrank", "approx", status="rolled back", reason=f"raised RuntimeError: {GLOO_SAYS}",
                        skipped=[["layers[0]", "[bold]not[/bold] a Linear"]])
    report = RunReport("lowrank[x]", "graph [/x]", "", records=[record], warnings=[GLOO_SAYS])
    shown = io.StringIO()
    for name in ("console", "errors"):
        monkeypatch.setattr(render, name, Console(file=shown, width=400))
    render.show_report(report)
    assert GLOO_SAYS in shown.getvalue() and "[bold]not[/bold] a Linear" in shown.getvalue(), shown.getvalue()


def test_a_rank_that_lost_its_peer_says_one_line_even_when_torchrun_then_stops_it(monkeypatch, capsys):
    """The race CI met: rank 0's collective fails, and torchrun's SIGTERM lands while it reports."""
    import typer

    from rewrite.cli import _stopped, render
    from tests.test_pipeline import GLOO_SAYS
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def recovery_collective():
        raise RuntimeError(GLOO_SAYS)
    with pytest.raises(typer.Exit):
        render.user_errors(recovery_collective)()
    with pytest.raises(SystemExit):
        _stopped()
    lines = said(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 lost contact") and lines[0].endswith(
        "nothing was written to the output folder"), lines


def test_pickled_module_with_inputs_file(tmp_path):
    torch.save(ConvBN(), tmp_path / "model.pt")
    torch.save(torch.randn(2, 3, 8, 8), tmp_path / "x.pt")
    before = (tmp_path / "model.pt").read_bytes()
    result = invoke("optimize", tmp_path / "model.pt", "-p", "fold-bn", "--inputs", tmp_path / "x.pt",
                    "-o", tmp_path / "out", "--no-latency", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "runs code stored in the file" in result.output
    assert (tmp_path / "model.pt").read_bytes() == before  # the user's file is untouched


def test_pt2_input_carries_its_example_inputs(tmp_path):
    model = ConvBN().eval()
    torch.export.save(torch.export.export(model, model.example_inputs()), tmp_path / "m.pt2")
    result = invoke("optimize", tmp_path / "m.pt2", "-p", "fold-bn", "-o", tmp_path / "out", "--no-latency")
    assert result.exit_code == 0, result.output


def test_passes_list_and_show():
    listing = invoke("passes", "list")
    assert listing.exit_code == 0 and "fold-bn" in listing.output and "reparam" in listing.output
    show = invoke("passes", "show", "reparam")
    assert show.exit_code == 0 and "UniRepLKNet" in show.output and "exact" in show.output


def test_diff_two_models(tmp_path):
    model = ConvBN().eval()
    torch.save(model, tmp_path / "a.pt")
    torch.save(model, tmp_path / "b.pt")
    torch.save(model.example_inputs(), tmp_path / "x.pt")
    result = invoke("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--inputs", tmp_path / "x.pt", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "max|Δ| 0.00e+00" in result.output


def test_eval_metric_is_reported(tmp_path):
    x = torch.randn(8, 3, 64, 64)
    torch.save({"inputs": [x], "targets": [torch.randint(0, 10, (8,))]}, tmp_path / "eval.pt")
    result = invoke("optimize", EXAMPLE, "-p", "fold-bn", "--eval", tmp_path / "eval.pt", "--metric", "top1",
                    "-o", tmp_path / "out", "--no-latency")
    assert result.exit_code == 0, result.output
    assert "top1" in result.output


@pytest.fixture
def files(tmp_path):
    torch.save(ConvBN(), tmp_path / "model.pt")
    torch.save(torch.randn(2, 3, 8, 8), tmp_path / "x.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    return tmp_path


def test_existing_output_folder_is_refused_and_left_alone(files):
    result = invoke("optimize", files / "model.pt", "-p", "fold-bn", "--inputs", files / "x.pt", "-o", files / "full",
                    "--trust-pickle")
    _one_line_error(result, "already holds files")
    assert [p.name for p in (files / "full").iterdir()] == ["keep.txt"]
    forced = invoke("optimize", files / "model.pt", "-p", "fold-bn", "--inputs", files / "x.pt", "-o",
                    files / "full", "--force", "--no-latency", "--trust-pickle")
    assert forced.exit_code == 0 and (files / "full" / "keep.txt").read_text() == "user data"


def test_nothing_to_rewrite_is_reported_not_an_error(files):
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), files / "lin.pt")
    torch.save(torch.randn(2, 4), files / "x4.pt")
    result = invoke("optimize", files / "lin.pt", "-p", "reparam", "--inputs", files / "x4.pt", "-o",
                    files / "o", "--no-latency", "--trust-pickle")
    assert result.exit_code == 0 and "nothing to rewrite" in result.output


@pytest.mark.slow
def test_console_script_exits_2_without_traceback(files):
    import subprocess
    proc = subprocess.run([sys.executable, "-c", "from rewrite.cli import main; main()", "optimize",
                           str(files / "model.pt"), "-p", "nope", "--inputs", str(files / "x.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown pass 'nope'" in proc.stderr


@pytest.mark.slow
def test_a_failed_artifact_is_in_the_verdict_and_the_exit_code(tmp_path, monkeypatch):
    from rewrite.emit import onnx as onnx_emit

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(onnx_emit, "export_onnx", broken)
    args = ["optimize", EXAMPLE, "-p", "fold-bn", "--emit", "onnx", "--no-latency"]
    failed = invoke(*args, "-o", tmp_path / "a")
    assert failed.exit_code == 3 and "artifact onnx: FAILED" in failed.output
    assert "error: onnx was not written: ONNX export failed: exporter exploded" in failed.output
    allowed = invoke(*args, "-o", tmp_path / "b", "--allow-artifact-errors")
    assert allowed.exit_code == 0 and "warning: onnx was not written" in allowed.output


def test_passes_show_says_when_calibration_depends_on_an_option():
    show = invoke("passes", "show", "t1")
    assert "calibration: optional (mode=exact); needed (mode=t1" in show.output


@pytest.mark.slow
def test_diff_counts_the_layers_of_a_loaded_program(tmp_path):
    model = ConvBN().eval()
    torch.export.save(torch.export.export(model, model.example_inputs()), tmp_path / "m.pt2")
    result = invoke("diff", tmp_path / "m.pt2", tmp_path / "m.pt2")
    assert result.exit_code == 0, result.output
    assert "layers" in result.output and "│ 6      │" in result.output  # 2 conv, 2 BN, Linear, BN1d


@pytest.mark.slow
def test_a_module_pickled_from_a_script_says_what_to_do(tmp_path):
    import subprocess
    script = tmp_path / "train_script.py"
    script.write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n"
                      "torch.save(Net(4, 4), 'net.pt')\n")
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    result = CliRunner().invoke(app, ["optimize", str(tmp_path / "net.pt"), "-p", "fold-bn", "--input-shape", "2,4",
                                      "--trust-pickle", "-o", str(other / "o")])
    _one_line_error(result, "its class must be importable here")


def test_passes_explain_says_where_and_why_not():
    found = invoke("passes", "explain", "fold-bn", "--model", EXAMPLE)
    assert found.exit_code == 0 and "layer-batchnorm: matches at stem_1" in found.output
    why = invoke("passes", "explain", "fold-bn", "--model", EXAMPLE, "--node", "head")
    assert "where the pattern has a BatchNorm1d" in why.output
    layerwise = invoke("passes", "explain", "dgq", "--model", EXAMPLE)
    assert "matches no graph pattern" in layerwise.output


@pytest.mark.parametrize("argv", [["--help"], ["passes", "list"], ["optimize", "m.pt", "--passes", "nope"],
                                  ["optimize", "m.pt", "--passes", "t1", "--seed", "abc"]])
def test_help_listing_and_argument_errors_answer_without_loading_torch(argv):
    """Start-up once took tens of seconds on a busy machine: the CLI imported torch, transformers and onnx
    before it parsed its arguments."""
    import subprocess
    code = ("import sys\nfrom rewrite.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert proc.stdout.strip().endswith("torch not loaded"), proc.stdout[-300:] + proc.stderr[-300:]
