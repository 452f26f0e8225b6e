"""Output folders: complete or absent, one run at a time, --force replaces only what rewrite wrote."""
import fcntl
import json

import pytest
import torch

import rewrite
from rewrite import output
from rewrite.emit import onnx as onnx_emit
from rewrite.testing import ConvBN


def _run(out, **kw):
    model = ConvBN().eval()
    return rewrite.optimize(model, model.example_inputs(), "fold-bn", out=out, measure_latency=False, **kw)


def test_a_run_writes_a_manifest_of_its_files(tmp_path):
    _run(tmp_path / "out", emit="onnx")
    manifest = json.loads((tmp_path / "out" / output.MANIFEST).read_text())
    assert manifest["complete"] and set(manifest["files"]) == {p.name for p in (tmp_path / "out").iterdir()} - {
        output.MANIFEST}
    assert "model.onnx" in manifest["files"]


def test_an_interrupted_run_leaves_nothing_that_looks_like_a_result(tmp_path, monkeypatch):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which the CLI turns into an exit) while writing ONNX
    monkeypatch.setattr(onnx_emit, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "deep" / "out", emit="onnx")
    assert list(tmp_path.iterdir()) == []  # no out/, no model.pt2, no temp folder, not even the parents made


def test_a_failed_run_does_not_touch_the_previous_result(tmp_path, monkeypatch):
    _run(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(onnx_emit, "export_onnx", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "out", emit="onnx", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.slow
def test_force_replaces_the_previous_run_as_a_whole_and_keeps_user_files(tmp_path):
    out = tmp_path / "out"
    _run(out, emit="onnx")
    (out / "notes.txt").write_text("mine")
    _run(out, force=True)  # no ONNX this time: the stale model.onnx must go
    names = {p.name for p in out.iterdir()}
    assert "model.onnx" not in names and "model.onnx.data" not in names
    assert {"model.pt2", "report.md", "notes.txt"} <= names and (out / "notes.txt").read_text() == "mine"


def test_force_never_replaces_a_file_rewrite_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    with pytest.raises(rewrite.RewriteError, match="not written by rewrite"):
        _run(out, force=True)
    assert (out / "report.md").read_text() == "my own report"


def test_force_never_replaces_the_model_file_given(tmp_path):
    out = tmp_path / "out"
    _run(out)  # out/model.pt2 is rewrite's own, listed in the manifest
    before = (out / "model.pt2").read_bytes()
    with pytest.raises(rewrite.RewriteError, match="inside the output folder"):
        rewrite.optimize(str(out / "model.pt2"), None, "fold-bn", out=out, force=True, measure_latency=False)
    assert (out / "model.pt2").read_bytes() == before


def test_one_run_per_folder(tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / ".out.rewrite-lock", "a+") as handle:  # another run holds the folder
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(rewrite.RewriteError, match="another rewrite run is writing"):
            _run(out)
    assert not out.exists()
    _run(out)  # the lock dies with its holder
    assert (out / "model.pt2").is_file()


def test_artifact_paths_in_the_report_are_final(tmp_path):
    result = _run(tmp_path / "out")
    path = result.report.artifacts[0].path
    assert path == str(tmp_path / "out" / "model.pt2")
    assert torch.export.load(path) is not None
    assert str(tmp_path / "out" / "model.pt2") in (tmp_path / "out" / "report.json").read_text()
