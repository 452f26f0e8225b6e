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
