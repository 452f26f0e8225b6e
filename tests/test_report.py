import json

from rewrite.report import PassRecord, RunReport


def test_a_pass_row_shows_its_headline_stats_and_the_details_go_below_and_to_json():
    """A stats cell of 15 key=value pairs once wrapped onto 14 lines of the terminal table."""
    stats = {f"stat_{i}": i for i in range(15)} | {"per_layer": {"a": 1.0}}
    report = RunReport("dgq", "graph", "1 batch", records=[PassRecord("dgq", "dgq", "SQNR≥10 dB", "applied",
                                                                      stats=stats, skipped=[["a.b", "why"]])])
    cell = report.pass_rows()[1][2]
    assert cell == "stat_0=0, stat_1=1 (1 skipped)"
    markdown = report.to_markdown()
    assert "stat_14=14" in markdown and "`dgq` skipped `a.b`: why" in markdown and "per_layer" not in markdown
    assert json.loads(report.to_json())["records"][0]["stats"]["per_layer"] == {"a": 1.0}


def test_many_places_left_alone_for_one_reason_read_as_one_line():
    """dgq on BERT listed 13 norms it did not smooth, one line each, in the terminal and in report.md."""
    norms = [[f"encoder.layer.{i}.output.LayerNorm", "feeds a residual: not smoothed"] for i in range(13)]
    report = RunReport("dgq", "graph", "1 batch", records=[PassRecord(
        "dgq", "dgq", "SQNR≥10 dB", "applied", skipped=[*norms, ["lm_head", "tied to the embedding"]])])
    lines = report.skip_lines()
    grouped = "13 places (encoder.layer.0.output.LayerNorm … encoder.layer.12.output.LayerNorm; all in report.json)"
    assert lines == [("dgq", grouped, "feeds a residual: not smoothed"), ("dgq", "lm_head", "tied to the embedding")]
    assert report.to_markdown().count("\n- `dgq` skipped ") == 2
    assert len(json.loads(report.to_json())["records"][0]["skipped"]) == 14


def _pictured_report():
    from rewrite.measure import Speed
    layers = [{"layer": f"encoder.layer.{i}.output.dense", "sqnr_db": 20.0 + i, "bytes_before": 1000,
               "bytes_after": 250} for i in range(3)]
    records = [PassRecord("dgq @ model.layers.0", "dgq", "SQNR≥10 dB", "applied", layers=layers[:2]),
               PassRecord("dgq @ model.layers.1", "dgq", "SQNR≥10 dB", "applied", layers=layers[2:]),
               PassRecord("fold-bn", "fold-bn", "exact", "applied")]
    return RunReport("dgq", "graph", "1 batch", records=records, speeds=[Speed("torch", 1.4, 1.2, 1.6, 9)])


def test_the_report_has_pictures_of_its_layers_and_latency_linked_from_report_md(tmp_path):
    import pytest
    pytest.importorskip("matplotlib")
    report = _pictured_report()
    report.write(tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["report-latency.png", "report-layers-dgq.png"]  # the two blocks' dgq records in one picture
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    markdown = (tmp_path / "report.md").read_text()
    assert "](report-layers-dgq.png)" in markdown and "](report-latency.png)" in markdown
    layers = json.loads((tmp_path / "report.json").read_text())["records"][1]["layers"]
    assert layers[0]["layer"] == "encoder.layer.2.output.dense" and layers[0]["bytes_after"] == 250


def test_without_matplotlib_the_report_says_how_to_get_pictures_and_is_otherwise_the_same(tmp_path, monkeypatch):
    import sys
    with_pictures = _pictured_report()
    (tmp_path / "a").mkdir()
    with_pictures.write(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    without = _pictured_report()
    (tmp_path / "b").mkdir()
    without.write(tmp_path / "b")
    assert not list((tmp_path / "b").glob("*.png"))
    markdown = (tmp_path / "b" / "report.md").read_text()
    assert 'pip install "rewrite[plots]"' in markdown
    assert markdown.split("## Pictures")[0].split("pictures:")[0] == (tmp_path / "a" / "report.md").read_text(
    ).split("## Pictures")[0]
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "pictures"}  # noqa: E731
    assert strip((tmp_path / "a" / "report.json").read_text()) == strip((tmp_path / "b" / "report.json").read_text())


def test_per_layer_errors_name_the_replaced_layers_with_their_error_and_size():
    import torch

    import rewrite
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()
    calib = [torch.randn(16, 64) for _ in range(4)]
    record = rewrite.optimize(model, (calib[0],), "lowrank{param-ratio=0.5,whiten=false,min-sqnr=-100}",
                              calib=calib, measure_latency=False).report.records[0]
    assert record.status == "applied" and [row["layer"] for row in record.layers] == ["0", "2"]
    assert all(row["bytes_after"] < row["bytes_before"] and 0 < row["sqnr_db"] < 100 for row in record.layers)


def test_perplexity_on_eval_data_reads_as_a_ratio_too_and_an_accuracy_as_a_difference():
    """SmolLM2's report said '12.78 → 13.91 (+1.128)', which reads like 1.128x where it was 1.088x."""
    report = RunReport("dgq", "graph", "1 batch", metric_name="perplexity",
                       metric={"original": 12.78, "rewritten": 13.91})
    want = "perplexity on eval data: original 12.78 → rewritten 13.91 (+1.13, 1.088x the original)"
    assert want in report.verdicts()
    report.metric_name, report.metric = "accuracy", {"original": 0.9, "rewritten": 0.88}
    assert [line for line in report.verdicts() if "accuracy" in line] == [
        "accuracy on eval data: original 0.9 → rewritten 0.88 (-0.02)"]
