"""The report's pictures: which layers each approximate pass hurt, what it kept of each, and latency before
and after with its interval. PNG files beside report.md, drawn with matplotlib when it is installed
(`pip install "rewrite[plots]"`); without it the report says how to get them and nothing else changes.

matplotlib's object API (Figure + the Agg canvas) is used, never pyplot: a user's interactive backend and
global figure state are left alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

HOW_TO_GET = 'pictures: pip install "rewrite[plots]" (matplotlib) to get per-layer and latency charts here'
MAX_LABELS = 40  # more layers than this: tick labels only for the worst ones


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(records: list[Any], speeds: list[Any], folder: Path, search: dict | None = None) -> list[tuple[str, str]]:
    """Write the pictures into `folder`; returns (file name, caption) for each."""
    pictures = []
    if search:
        _front_figure(search).savefig(folder / "report-front.png", dpi=110)
        pictures.append(("report-front.png", "rewrite tune: every pipeline tried, the Pareto front and the choice"))
    for name, layers in _layers_by_pass(records).items():
        file = f"report-layers-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        _layer_figure(name, layers).savefig(folder / file, dpi=110)
        pictures.append((file, f"{name}: output error (SQNR) and share of weight bytes kept, per layer"))
    if speeds:
        _speed_figure(speeds).savefig(folder / "report-latency.png", dpi=110)
        pictures.append(("report-latency.png", "speed-up per backend (original time / rewritten), 95% interval"))
    return pictures


def _layers_by_pass(records: list[Any]) -> dict[str, list[dict]]:
    """One picture per pass: block-by-block records (`dgq @ model.layers.3`) are joined, paths prefixed."""
    joined: dict[str, list[dict]] = {}
    for record in records:
        if record.status != "applied" or not record.layers:
            continue
        name, _, block = record.name.partition(" @ ")
        rows = [dict(row, layer=f"{block}.{row['layer']}" if block else row["layer"]) for row in record.layers]
        joined.setdefault(name, []).extend(rows)
    return joined


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _layer_figure(name: str, layers: list[dict]) -> Any:
    figure = _figure(max(6.0, min(16.0, 0.25 * len(layers))), 5.5)
    error, kept = figure.subplots(2, 1, sharex=True)
    x = range(len(layers))
    sqnr = [min(row["sqnr_db"], 120.0) for row in layers]  # an exact layer (inf dB) is drawn at 120
    share = [row["bytes_after"] / row["bytes_before"] if row["bytes_before"] else 1.0 for row in layers]
    worst = sorted(x, key=lambda i: sqnr[i])[:5]
    error.bar(x, sqnr, color=["#c0392b" if i in worst else "#2e86c1" for i in x])
    error.set_ylabel("layer SQNR dB")
    error.set_title(f"{name}: per-layer error (red: the 5 worst) and weights kept")
    kept.bar(x, share, color="#7f8c8d")
    kept.axhline(1.0, color="black", linewidth=0.8)
    kept.set_ylabel("weight bytes kept")
    labels = [_short(row["layer"]) if len(layers) <= MAX_LABELS or i in worst else "" for i, row in enumerate(layers)]
    kept.set_xticks(list(x), labels, rotation=90, fontsize=7)
    return figure


def _speed_figure(speeds: list[Any]) -> Any:
    figure = _figure(1.8 + 1.4 * len(speeds), 3.6)
    axes = figure.subplots()
    x = range(len(speeds))
    ratios = [s.ratio for s in speeds]
    below = [s.ratio - s.low for s in speeds]
    above = [s.high - s.ratio for s in speeds]
    axes.bar(x, ratios, yerr=[below, above], capsize=6, color=["#27ae60" if s.word == "faster" else "#c0392b"
                                                                if s.word == "SLOWER" else "#7f8c8d" for s in speeds])
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(x), [s.backend for s in speeds])
    axes.set_ylabel("original time / rewritten time")
    axes.set_title("speed-up (1 = none)")
    return figure


def _front_figure(search: dict) -> Any:
    figure = _figure(6.5, 4.5)
    axes = figure.subplots()
    for p in search["points"]:
        x = 1 / p["speed"] if p["speed"] else p["proxy"]
        chosen = p["spec"] == search["chosen"]
        axes.scatter([x], [p["quality"]], s=90 if chosen else 40, marker="*" if chosen else "o",
                     color="#c0392b" if chosen else "#2e86c1" if p["front"] else "#aab7b8", zorder=3)
        axes.annotate(_label(p["applied"].replace("fold-bn,", "").replace("reparam,", "")), (x, p["quality"]),
                      fontsize=6, xytext=(4, 2), textcoords="offset points")
    qualities = [p["quality"] for p in search["points"] if p["quality"] == p["quality"]]
    if qualities and min(qualities) > 0 and max(qualities) > 10 * min(qualities):
        axes.set_yscale("log")  # one broken candidate (perplexity 436 beside 14) would flatten the front
    axes.axvline(1.0, color="black", linewidth=0.8)
    goal = search.get("goal")  # tune's parsed latency target
    if goal is not None:
        axes.axvline(goal, color="#c0392b", linewidth=0.8, linestyle="--")  # left of it meets the target
    axes.set_xlabel("time vs the original (paired on the front, proxy elsewhere; dashed: the target)")
    axes.set_ylabel(search["quality"])
    axes.set_title(f"rewrite tune ({search['target']}): blue = Pareto front, star = chosen")
    return figure


def _short(path: str) -> str:
    """`encoder.layer.3.attention.self.query` → `3.attention.self.query`: the part that tells layers apart."""
    parts = path.split(".")
    first_index = next((i for i, p in enumerate(parts) if p.isdigit()), 0)
    return ".".join(parts[first_index:])[-40:]


def _label(label: str, most: int = 48) -> str:
    """A point's label, cut with an ellipsis (a cut label must not pass for another pipeline)."""
    return label if len(label) <= most else label[:most - 1] + "…"
