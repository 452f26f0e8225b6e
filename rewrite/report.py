"""Reports are pure data: per-pass records and before/after measurements, rendered as text, Markdown or JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GROUPED_SKIPS = 3  # more places left alone for one reason than this read as one line


@dataclass
class PassRecord:
    """What one pass did: status, what it rewrote and skipped, its error against its input, and its cost."""

    name: str
    spec: str
    contract: str
    status: str = "pending"  # applied | nothing to rewrite | rolled back | skipped
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[list[str]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    layers_before: int = 0
    layers_after: int = 0
    bytes_before: int = 0  # weights in memory (parameters and weight buffers)
    bytes_after: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)  # approximate passes: per-layer error and size


@dataclass
class Measurement:
    """One model measured on one backend."""

    label: str  # original | rewritten
    backend: str  # torch | onnxruntime | ...
    p50_ms: float | None = None
    p90_ms: float | None = None
    runs: int = 0
    params: int | None = None
    size_bytes: int = 0
    layers: int | None = None


@dataclass
class Artifact:
    """A file a run wrote, with its outputs compared to the verified model's (`parity`, from emit.parity)."""

    kind: str
    path: str
    parity: dict[str, Any] | None = None
    note: str = ""

    PARITY_REL_L2 = 1e-3  # float reordering in another runtime is ~1e-6; more means other numerics
    # Where a rewrite rounds activations (dgq), 1e-7 float differences flip codes and compound over layers
    # (MiniLM: 1e-6 noise moves its output by rel L2 0.04): such an artifact is sound when it is as close to
    # the original model as the verified model is, within this factor.
    ACCURACY_SLACK = 1.25

    @property
    def problem(self) -> str | None:
        """Why this artifact cannot be trusted as the verified model (None when it can)."""
        if not self.path:
            return f"{self.kind} was not written: {self.note}"
        p = self.parity
        if not p or p.get("rel_l2", 0) <= self.PARITY_REL_L2:
            return None
        verified, mine = p.get("rewrite_rel_l2"), p.get("vs_original_rel_l2")
        if verified is not None and mine is not None and mine <= self.ACCURACY_SLACK * verified + self.PARITY_REL_L2:
            return None
        closeness = "" if mine is None else f"; vs the original: rel L2 {mine:.1e}, the verified model's {verified:.1e}"
        return (f"{self.kind} differs from the verified model (rel L2 {p['rel_l2']:.1e} > {self.PARITY_REL_L2:g}, "
                f"max|Δ| {p['max_abs']:.1e}{closeness})")

    @property
    def status(self) -> str:
        return "failed" if self.problem else "ok"

    def parity_words(self) -> str:
        """The parity in a few words, saying so where it holds through accuracy rather than equality."""
        p = self.parity
        if not p:
            return ""
        words = f" parity max|Δ| {p['max_abs']:.1e}"
        if p.get("rel_l2", 0) > self.PARITY_REL_L2 and not self.problem:
            words += (f" (rounded activations flip on float differences; vs the original: rel L2 "
                      f"{p['vs_original_rel_l2']:.2e}, the verified model's {p['rewrite_rel_l2']:.2e})")
        return words


@dataclass
class RunReport:
    pipeline: str
    capture: str
    inputs: str
    compared: str = ""  # what verification compared (padding excluded, which floor decided)
    records: list[PassRecord] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    error_vs_original: dict[str, Any] | None = None
    metric_name: str | None = None
    metric: dict[str, float] = field(default_factory=dict)  # label → score on the eval data
    artifacts: list[Artifact] = field(default_factory=list)
    speeds: list[Any] = field(default_factory=list)  # rewrite.measure.Speed per backend (paired timing)
    warnings: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, list] = field(default_factory=dict)  # "torch, rewritten" → [(op, ms, share)], top first
    generation: dict[str, Any] = field(default_factory=dict)  # causal LMs: prefill ms and decode tokens/s, both
    pictures: list[tuple[str, str]] | None = field(default_factory=list)  # (PNG file, caption); None: no matplotlib
    search: dict[str, Any] = field(default_factory=dict)  # rewrite tune: the candidates, the front, the choice

    # --- views --------------------------------------------------------------------------------

    def to_json(self) -> str:
        data = asdict(self)
        data["speeds"] = [asdict(s) | {"verdict": s.word} for s in self.speeds]
        data["artifacts"] = [asdict(a) | {"status": a.status, "reason": a.problem or ""} for a in self.artifacts]
        data["status"] = "failed" if self.problems() else "ok"
        return json.dumps(data, indent=2, default=str)

    def skip_lines(self, quote: str = "") -> list[tuple[str, str, str]]:
        """(pass, where, why) per thing a pass left alone; one line for a reason shared by more than
        GROUPED_SKIPS places (BERT: 13 norms dgq does not smooth), naming the first and last (all in
        report.json)."""
        lines = []
        for r in self.records:
            by_reason: dict[str, list[str]] = {}
            for where, why in r.skipped:
                by_reason.setdefault(why, []).append(where)
            for why, places in by_reason.items():
                if len(places) > GROUPED_SKIPS:
                    where = (f"{len(places)} places ({quote}{places[0]}{quote} … {quote}{places[-1]}{quote}; "
                             "all in report.json)")
                    lines.append((r.name, where, why))
                else:
                    lines += [(r.name, f"{quote}{place}{quote}", why) for place in places]
        return lines

    def pass_rows(self) -> list[list[str]]:
        header = ["pass", "status", "rewrote", "max|Δ|", "SQNR dB", "contract", "params", "weights", "layers",
                  "time"]
        rows = [header]
        for r in self.records:
            rows.append([r.spec, r.status + (f": {r.reason}" if r.reason else ""), _headline(r),
                         _num(r.error, "max_abs", "{:.1e}"), _num(r.error, "sqnr_db", "{:.1f}"), r.contract,
                         f"{r.params_before:,} → {r.params_after:,}",
                         f"{_size(r.bytes_before)} → {_size(r.bytes_after)}",
                         f"{r.layers_before} → {r.layers_after}", f"{r.seconds:.2f} s"])
        return rows

    def measurement_rows(self) -> list[list[str]]:
        rows = [["model", "backend", "p50 ms", "p90 ms", "runs", "params", "size", "layers"]]
        for m in self.measurements:
            row = [m.label, m.backend, _ms(m.p50_ms), _ms(m.p90_ms), str(m.runs),
                   "-" if m.params is None else f"{m.params:,}", _size(m.size_bytes),
                   "-" if m.layers is None else str(m.layers)]
            rows.append(row)
        return rows

    def verdicts(self) -> list[str]:
        """Plain sentences: speed-up or slow-down per backend, error vs the original, parity of artifacts."""
        lines = [_speed_line(s) for s in self.speeds]
        if self.metric_name and len(self.metric) == 2:
            a, b = self.metric["original"], self.metric["rewritten"]
            ratio = f", {b / a:.3f}x the original" if self.metric_name == "perplexity" and a > 0 else ""
            lines.append(f"{self.metric_name} on eval data: original {a:.4g} → rewritten {b:.4g} "
                         f"({b - a:+.4g}{ratio})")
        if self.generation:
            g = self.generation
            lines.append(f"generation (eager torch, KV cache): prefill of {g['prompt_tokens']} tokens "
                         f"{g['prefill_ms'][0]:.3g} → {g['prefill_ms'][1]:.3g} ms, decoding {g['new_tokens']} "
                         f"tokens {g['decode_tokens_per_s'][0]:.3g} → {g['decode_tokens_per_s'][1]:.3g} tokens/s")
        if self.error_vs_original:
            e = self.error_vs_original
            lines.append(f"output vs original: max|Δ| {e['max_abs']:.2e}, rel L2 {e['rel_l2']:.2e}, "
                         f"SQNR {e['sqnr_db']:.1f} dB, cosine {e['cosine']:.6f}")
        for art in self.artifacts:
            flag = "FAILED: " if art.problem else ""
            lines.append(f"artifact {art.kind}: {flag}{art.path or '-'}{art.parity_words()}"
                         f"{(' ' + art.note) if art.note else ''}")
        return lines

    def write(self, folder: Path) -> None:
        """report.md, report.json, recipe.json and the pictures (rewrite.plots) into `folder`."""
        from rewrite import plots
        self.pictures = plots.draw(self.records, self.speeds, folder, self.search) if plots.available() else None
        (folder / "report.md").write_text(self.to_markdown())
        (folder / "report.json").write_text(self.to_json())
        (folder / "recipe.json").write_text(json.dumps(self.recipe, indent=2, default=str))

    def problems(self) -> list[str]:
        """What makes this run's output untrustworthy (artifacts not written or not at parity)."""
        return [a.problem for a in self.artifacts if a.problem]

    def to_markdown(self) -> str:
        parts = [f"# rewrite report\n\npipeline `{self.pipeline}`  \ncapture: {self.capture}  \ninputs: {self.inputs}  \n"
                 f"compared: {self.compared or 'all output positions'}\n"]
        parts += [f"> warning: {w}\n" for w in self.warnings]
        parts.append("## Passes\n\n" + _md_table(self.pass_rows()))
        details = [f"- `{r.name}`: {_details(r)}" for r in self.records if _details(r)]
        if details:
            parts.append("\nMore of what each pass chose (all of it in report.json):\n\n" + "\n".join(details))
        skips = [f"- `{name}` skipped {where}: {why}" for name, where, why in self.skip_lines("`")]
        if skips:
            parts.append("\nLeft alone:\n\n" + "\n".join(skips))
        if self.measurements:
            parts.append("\n## Before / after\n\n" + _md_table(self.measurement_rows()))
        if self.profiles:
            parts.append("\n## Where the time goes (top ops by self time)\n")
            for label, ops in self.profiles.items():
                parts.append(f"- {label}: " + ", ".join(f"{op} {ms:.3g} ms ({share:.0%})" for op, ms, share in ops))
        parts.append("\n## Verdict\n\n" + "\n".join(f"- {line}" for line in self.verdicts()))
        if self.search:
            parts.append(_search_section(self.search))
        if self.pictures:
            parts.append("\n## Pictures\n\n" + "\n\n".join(f"![{caption}]({file})" for file, caption in self.pictures))
        elif self.pictures is None:
            from rewrite.plots import HOW_TO_GET
            parts.append(f"\n{HOW_TO_GET}")
        return "\n".join(parts) + "\n"


def _search_section(search: dict[str, Any]) -> str:
    """rewrite tune's candidates as a table: the front first, the chosen point marked."""
    rows = [["pipeline kept", search["quality"], "time vs original (proxy)", "paired speed-up (95%)", "weights", ""]]
    for p in sorted(search["points"], key=lambda p: (not p["front"], p["proxy"])):
        speed = f"{p['speed']:.2f}x ({p['low']:.2f}–{p['high']:.2f})" if p["speed"] else "-"
        mark = "chosen" if p["spec"] == search["chosen"] else "front" if p["front"] else ""
        rows.append([p["applied"], f"{p['quality']:.4g}", f"{p['proxy']:.2f}", speed, _size(p["weight_bytes"]),
                     mark])
    more = search.get("more_accurate")
    if search["met"]:
        verdict = "the chosen one is the most accurate that meets the target" + (
            f"; more accurate, but slower than the target: {more} (a looser --target takes it)" if more else "")
    else:
        verdict = ("none met the target, so the most accurate of the points as fast as the fastest (within 5% of its "
                   "speed-up or its 95% interval) was chosen" + (f"; more accurate, but slower: {more}" if more else "")
                   + ": loosen --target, or protect accuracy with --floor metric=Y")
    defaults = "".join(f"\n- {line}" for line in search.get("against_defaults", []))
    names = search.get("left_out", [])
    verb = "changes" if len(names) == 1 else "change"
    left_out = (f" Left out: {', '.join(names)}, which {verb} the graph itself: your "
                f"{search.get('model_class', 'model')} would come back as a graph, without its generate, config and "
                "save_pretrained (`rewrite optimize --passes` runs them)." if names else "")
    return (f"\n## Search (rewrite tune, {search['target']} in {search.get('backend', 'torch')}, "
            f"{search['seconds']} s)\n\n"
            f"{len(search['points'])} distinct pipelines tried; {verdict}.{left_out}\n\n" + _md_table(rows) +
            (f"\nAgainst each pass run alone with its defaults:{defaults}\n" if defaults else ""))


def _speed_line(s: Any) -> str:
    """A `measure.Speed` as one sentence; its `word` is faster / SLOWER / no measurable difference."""
    verdict = f"rewritten model is {s.word} than the original" if s.word != "no measurable difference" else s.word
    return (f"{s.backend}: {verdict} ({s.ratio:.2f}x, 95% interval {s.low:.2f}–{s.high:.2f}x "
            f"over {s.rounds} alternating rounds)")


HEADLINE_STATS = 2  # a pass's first stats say what it rewrote (its own order); the rest are details


def _scalars(r: PassRecord) -> list[tuple[str, Any]]:
    """Scalar stats only: per-layer tables (dicts, lists) stay in report.json."""
    return [(k, v) for k, v in r.stats.items() if not isinstance(v, (dict, list))]


def _headline(r: PassRecord) -> str:
    text = ", ".join(f"{k}={v}" for k, v in _scalars(r)[:HEADLINE_STATS])
    return text + (f" ({len(r.skipped)} skipped)" if r.skipped else "")


def _details(r: PassRecord) -> str:
    return ", ".join(f"{k}={v}" for k, v in _scalars(r)[HEADLINE_STATS:])


def _num(d: dict | None, key: str, fmt: str) -> str:
    return fmt.format(d[key]) if d and d.get(key) is not None else "-"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _size(n: int) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _md_table(rows: list[list[str]]) -> str:
    escape = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(escape[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in escape[1:]]
    return "\n".join(lines) + "\n"
