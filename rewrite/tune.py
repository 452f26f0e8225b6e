"""`rewrite tune`: search pipelines of the registered passes under the user's latency target, and choose.

Successive halving in two rungs, every candidate through the same verified pipeline as `optimize`:
1. each candidate (the exact passes, for a Hugging Face model those that keep its class; then every
   approximate family's defaults, then the other options of the families whose defaults are on the front,
   then the rest: a time limit cuts options of dominated families first, and families only where it cannot
   hold every family's defaults) is
   rewritten and verified once, without the report's latency rounds: its output SQNR against the original
   (or the task metric on the eval data), its weight bytes, and a short paired timing against the original
   (the proxy: a few alternating rounds, so a noisy moment hits both). A family that rewrites nothing in
   its first candidate is not tried again with other options. The candidates share one capture, one check
   of the data and one score of the original (`modes.Reuse`).
2. the Pareto front of (proxy time, error) is timed again, paired against the original in alternating
   rounds, as the report times (`measure.compare_torch`).
The chosen point is the most accurate front point whose paired time meets the target (else the most
accurate of those within 5% of the fastest's speed-up or its timing interval, and the report says the
target was not met). Its run is written into the output folder, not made again (with --backend onnxruntime
every candidate is made as ONNX takes them, since that output can change t1's form); the folder's report
carries the front (a table, and a picture with the chosen point marked) and its recipe.json
`rewrite optimize MODEL --recipe recipe.json` reproduces.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from rewrite import api, inputs as steps, measure, modes, registry, spec, transplant
from rewrite.errors import InvalidValue, RewriteError

# Exact passes: those that apply do, the others leave "nothing to rewrite". The approximate family goes between
# them: pointwise turns 1×1 projections into plain GEMMs, which the factorizing and quantizing passes would
# then no longer see as Linears.
BEFORE, AFTER = "fold-bn,reparam,t1", "pointwise,inplace"
EXACT = f"{BEFORE},{AFTER}"
FAMILIES = {  # each approximate family's main options, its defaults first (what a user would try alone)
    "fwsvd": ["fwsvd", "fwsvd{param-ratio=0.9}", "fwsvd{param-ratio=0.5}"],
    "lowrank": ["lowrank", "lowrank{param-ratio=0.5}"],
    # w4: float activations, slower in eager torch; act=static: one scale per activation tensor, no per-token
    # codes to make (MiniLM in onnxruntime on an AVX-512 VNNI CPU: 0.48x the time at cosine 0.969, against
    # per-token's 0.53x at 0.991); act=tensor: one dynamic scale and zero point per tensor, one onnxruntime node
    # a layer (MiniLM: 0.50x at 0.984; per-token codes keep BERT's outlier tokens off the others' grid); with
    # int8 weights where mixed precision wants them, onnxruntime's quantize_dynamic in dgq's format (MiniLM: 0.48x
    # at held-out embedding cosine 0.993, 8 bits a weight)
    # rotate first (pre-norm decoders), the untied head left in float, each FFN's down input rotated online, groups
    # of 128 (the rotation lets a group share one scale): SmolLM2 at ≤ 5 bits, fp32 perplexity on unseen text
    # 1.034x/1.033x calibrated on docstrings and 1.043x/1.031x on README prose, against dgq's 1.094x/1.036x and
    # 1.067x/1.036x (RESULTS.md); its folder loads with rewrite.load, not from_pretrained (an online rotation has no
    # compressed-tensors form that transformers applies). The same at ≤ 4.25 bits, mixed precision capped there:
    # 1.07x on the unseen text of another kind than the licence, 1.11–1.18x on it, against A8W4's 1.085x and 1.24x
    "dgq": ["dgq", "rotate,dgq{keep=lm_head,hadamard=ffn-down,group=128}",
            "rotate,dgq{keep=lm_head,hadamard=ffn-down,group=128,max-bits=4.25}", "dgq{budget-cos=0}", "dgq{form=w4}",
            "dgq{act=static}", "dgq{act=tensor}", "dgq{act=tensor,upgrade-bits=8,max-bits=8}"],
    "prune": ["prune", "prune{param-ratio=0.6}"],  # narrower dense FFNs: faster in every runtime
    "fwsvd+dgq": ["fwsvd,dgq"],
    "tconv": ["tconv", "tconv{param-ratio=0.5}"],  # factored convs (CNNs); left out where no conv has a k > 1 kernel
}
PROXY_BUDGET_S, PAIRED_BUDGET_S = 0.4, 2.0
# What a candidate kept when no pass applied: the original model, whose proxy time is 1 without timing it against
# itself (half a minute on SmolLM2 here). The front still times it, so that its interval says how noisy the
# host is beside the others'.
NOTHING = "(none)"
# The proxy's rounds: a few are enough to rank candidates, and on SmolLM2 (a 512-token forward takes 3 s on a
# 2-core AVX2 CPU) the report's ten took a minute of every candidate.
PROXY_ROUNDS = 3


@dataclass
class Point:
    spec: str  # what was asked for
    applied: str  # what the verified pipeline kept
    quality: float  # output SQNR dB, or the task metric
    proxy: float  # time vs the original's, from the short paired timing
    weight_bytes: int
    speed: float | None = None  # paired: original time / rewritten time
    low: float | None = None
    high: float | None = None
    front: bool = False


def parse_target(target: str) -> float:
    """`latency=0.5`: the rewritten model's time as a fraction of the original's."""
    key, value = spec.key_value(target, "--target", ("latency",))
    if not 0 < value:
        raise InvalidValue(f"--target latency={value:g}: give the time to aim for as a fraction of the "
                           "original's, e.g. latency=0.5")
    return value


def check_backend(backend: str) -> str:
    if backend not in Timer.BACKENDS:
        raise InvalidValue(f"--backend {backend!r}: choose torch or onnxruntime")
    return backend


def parse_time(text: str | float) -> float:
    """`10m`, `90s`, `1h` or seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = str(text).strip()
    try:
        seconds = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise InvalidValue(f"--time {text!r}: give a duration such as 10m, 90s or 1h")
    return seconds


class Timer:
    """Paired timings of a candidate against the original on one backend: eager torch in this process, or
    onnxruntime on exported ONNX files in a worker process (`measure.compare_onnx`)."""

    BACKENDS = ("torch", "onnxruntime")

    def __init__(self, backend: str, original: nn.Module, args: tuple, folder: Path):
        self.backend, self.original, self.args, self.folder = check_backend(backend), original, args, folder
        self.files: dict[int, Path] = {}
        self.front_point_s = 0.0  # a front point's paired timing, as the proxy timings so far let expect it
        if backend == "onnxruntime":
            self.original_onnx = self._export(original, "original")

    def speed(self, result: api.Result, budget_s: float, rounds: int = 10) -> measure.Speed:
        if self.backend == "onnxruntime" and id(result) not in self.files:
            self.files[id(result)] = self._export(result.model, f"candidate-{len(self.files)}", result.captured)
        start = time.perf_counter()
        timed = (measure.compare_torch(self.original, result.model, self.args, budget_s, rounds)
                 if self.backend == "torch" else
                 measure.compare_onnx(self.original_onnx, self.files[id(result)], self.args, budget_s, rounds))
        self._expect(time.perf_counter() - start, timed, rounds)
        return timed.speed

    def _expect(self, seconds: float, timed: measure.Timed, rounds: int) -> None:
        """What a front point's paired timing (PAIRED_BUDGET_S, 10 rounds) is expected to take, from this one: its
        fixed cost (warm-up, onnxruntime's worker and sessions) and its timed calls, scaled to the longer rounds."""
        calls = sum(p50 * n for p50, _, n in (timed.original, timed.rewritten)) / 1e3
        rounds_s = max(PAIRED_BUDGET_S, calls * 10 / rounds)  # short calls fill the budget; long ones, 10 rounds
        self.front_point_s = max(self.front_point_s, seconds - calls + rounds_s)

    def final_timing_s(self) -> float:
        """What the final report's timing adds to a candidate's time: nothing in eager torch (a candidate's pass
        outweighs it: SmolLM2 on an AVX2 CPU, 4-5 minutes against 5-6.5), and with onnxruntime two paired
        timings as long as a front point's, one per runtime (MiniLM on an AVX2 CPU: a candidate 55 s, a front point
        15 s, the final step 62 s)."""
        return 2 * self.front_point_s if self.backend == "onnxruntime" else 0.0

    def _export(self, module: nn.Module, name: str, captured: Any = None) -> Path:
        from rewrite import capture
        from rewrite.emit import onnx as onnx_emit
        path = self.folder / f"{name}.onnx"
        dims = captured.dynamic_dims if captured is not None else {}
        try:
            onnx_emit.export_onnx(module, capture.Captured(module, self.args, True, dims), path)
        except Exception as exc:
            raise RewriteError(f"{name} does not export to ONNX ({onnx_emit.why_not_exported(exc)}): tune with "
                               "--backend torch") from None
        return path


def tune(model: nn.Module | str, example_inputs: Any, *, target: str = "latency=0.5", time_limit: Any = "10m",
         calib: Any = None, eval: Any = None, metric: str | None = None, floor: str | None = None,
         out: str | Path | None = None, force: bool = False, seed: int = 0, trusted: Any = False,
         backend: str = "torch", progress: Callable[..., None] | None = None) -> api.Result:
    """Search, choose, and rewrite the chosen point into `out`; the Result's report holds the front."""
    with tempfile.TemporaryDirectory(prefix="rewrite-tune-") as scratch:
        return _tune(model, example_inputs, target, time_limit, dict(calib=calib, eval=eval, metric=metric,
                     floor=floor, seed=seed), out, force, trusted, backend, Path(scratch), progress)


def _tune(model: Any, example_inputs: Any, target: str, time_limit: Any, run: dict, out: Any, force: bool,
          trusted: Any, backend: str, scratch: Path, progress: Callable[..., None] | None) -> api.Result:
    say = progress or (lambda message, done=None, total=None: None)
    metric = run["metric"]
    goal, budget, start = parse_target(target), parse_time(time_limit), time.perf_counter()
    check_backend(backend)
    loaded = steps.resolve(model, trusted)
    module, example = loaded.module, loaded.inputs if example_inputs is None else example_inputs
    run["calib"] = loaded.calibration if run["calib"] is None else run["calib"]
    args = steps.check_model_and_inputs(steps.private_copy(module), example)
    timer = Timer(backend, module, args, scratch)
    # one capture, one check of the data, one score of the original for every run
    shared = modes.Reuse(emit=("onnx",) if backend == "onnxruntime" else ())
    before, after, left_out = exact_passes(module)
    points, results, idle = _explore(module, example, run, timer, metric, shared, start + budget, say,
                                     candidates(before, after, families_for(module), baseline(before, after)))
    front = _pareto(points, metric)
    shared.keep_runs([point.spec for point in front])  # the final rewrite takes its point's run from these
    for i, point in enumerate(front):
        say(f"timing the front, paired with the original: {point.applied}", i, len(front))
        speed = timer.speed(results[point.spec], PAIRED_BUDGET_S)
        point.speed, point.low, point.high, point.front = speed.ratio, speed.low, speed.high, True
    chosen, met = _choose(front, goal, metric)
    search = {"target": target, "goal": goal, "backend": backend, "chosen": chosen.spec, "kept": chosen.applied,
              "met": met, "more_accurate": _more_accurate(front, chosen, metric),
              "quality": _quality_name(metric),
              "against_defaults": _against_defaults(points, chosen, metric, before, after, idle),
              "seconds": round(time.perf_counter() - start, 1), "points": [asdict(p) for p in points],
              "left_out": left_out, "model_class": type(module).__name__}
    say(f"rewriting the chosen point: {chosen.spec}")
    emit = "onnx" if backend == "onnxruntime" and out is not None else None  # the report times the chosen point there
    return api.optimize(module, example, chosen.spec, out=out, force=force, search=search, emit=emit, reuse=shared,
                        progress=progress, **run)


def _explore(module: nn.Module, example: Any, run: dict, timer: Timer, metric: str | None, shared: modes.Reuse,
             deadline: float, say: Callable[..., None], queue: list[tuple[str, str]]
             ) -> tuple[list[Point], dict[str, api.Result], set[str]]:
    """Rung one: the distinct points the candidates made (in `candidates()` order, the families on the front
    first after the defaults), each point's run, and the families whose defaults kept nothing. A candidate
    starts only while it, the front's timing and the final rewrite are expected to end by `deadline`: itself
    and the final rewrite a mean candidate's time each, less what the first spent making what they all share
    (the checked data, the capture: on SmolLM2 on a 2-core AVX2 CPU that made the first candidate 7 minutes,
    and a 15-minute search then tried no other), and the final report's own timing (`Timer.final_timing_s`);
    the front's timing, each point on the front so far as the proxy timings let expect it (`Timer._expect`;
    MiniLM in onnxruntime: 3 × a candidate left 105 s too little for 4 front points and the final export)."""
    points: list[Point] = []
    results: dict[str, api.Result] = {}
    idle, family_of, began, ran = set(), {}, time.perf_counter(), 0
    for step in range(len(queue)):
        if step == 1 + len({family for family, _ in queue[1:]}):  # every family's defaults tried
            queue[step:] = front_families_first(queue[step:], points, family_of, metric)
        family, option = queue[step]
        if family in idle:
            continue
        now = time.perf_counter()
        each = (now - began - shared.setup_s) / max(ran, 1)
        front = len(_pareto(points, metric)) * timer.front_point_s
        if ran and now + 2 * each + front + timer.final_timing_s() > deadline:
            break
        say(f"trying {option} ({len(points)} distinct so far)")
        result, ran = api.optimize(module, example, option, measure_latency=False, reuse=shared, **run), ran + 1
        point = _point(option, result, timer, metric)
        if family != "exact" and point.applied == points[0].applied:
            idle.add(family)  # it rewrites nothing here (or is rolled back): its other options would not either
        elif not any(_same_model(p, point) for p in points):
            points.append(point)
            results[point.spec], family_of[point.spec] = result, family
    return points, results, idle


def front_families_first(rest: list[tuple[str, str]], points: list[Point], family_of: dict[str, str],
                         metric: str | None) -> list[tuple[str, str]]:
    """The candidates left, those of families with a point on the Pareto front first (in their order)."""
    on_front = {family_of[p.spec] for p in _pareto(points, metric)}
    return sorted(rest, key=lambda candidate: candidate[0] not in on_front)


def families_for(module: nn.Module) -> dict[str, list[str]]:
    """The families whose passes may rewrite something in `module` (a look at its layers, no run: tconv on a
    model without a conv to factor would cost a candidate's time, minutes on an LLM, to find nothing)."""
    def may_rewrite(pipeline: str) -> bool:
        return not any(type(p).finds_nothing_in(module) for p in spec.parse_spec(pipeline))

    return {family: [option for option in options if may_rewrite(option)] for family, options in FAMILIES.items()
            if may_rewrite(options[0])}


def candidates(before: str = BEFORE, after: str = AFTER, families: dict[str, list[str]] = FAMILIES,
               first: str | None = None) -> list[tuple[str, str]]:
    """(family, pipeline) in the order tried: the exact passes, then every family's defaults, then each
    family's next option, and so on, so that a time limit cuts options, never whole families (on SmolLM2 a
    candidate takes minutes: in family order, 15 minutes ended before dgq was tried). After the defaults,
    `_explore` moves the options of the families on the Pareto front ahead of the others."""
    order = [("exact", first or _joined(before, after))]
    for rung in range(max((len(options) for options in families.values()), default=0)):
        order += [(family, _joined(before, options[rung], after)) for family, options in families.items()
                  if rung < len(options)]
    return order


def _joined(*parts: str) -> str:
    return ",".join(part for part in parts if part)


def exact_passes(model: nn.Module) -> tuple[str, str, list[str]]:
    """(the exact passes before the approximate family, those after, the graph-level ones left out that could
    have rewritten something). Passes that a look at the layers shows have nothing here are not tried (t1 on
    MiniLM: no FFT; fold-bn: no BatchNorm), so that neither the candidates nor the recipe name them. A model
    with something to lose as a graph (a Hugging Face model's generate, config, save_pretrained) is searched
    without the passes that change the graph itself (pointwise, inplace), so that every candidate, and the
    chosen one, stays the user's class (on MiniLM inplace applied and measured 0.99x: it only cost the class)."""
    useful = {name for name in EXACT.split(",") if not registry.load_pass(name).finds_nothing_in(model)}
    keeps_class = transplant.lost_in_the_graph(model, []) is not None
    graph_level = [name for name in EXACT.split(",") if keeps_class and registry.load_pass(name).level == "graph"]
    keep = [",".join(n for n in part.split(",") if n in useful and n not in graph_level) for part in (BEFORE, AFTER)]
    return keep[0], keep[1], [name for name in graph_level if name in useful]


def baseline(before: str, after: str) -> str:
    """The first candidate, the one every other is compared with: the exact passes `exact_passes` kept, or where
    it kept none (a model with a class to keep and nothing for them: MiniLM) those that leave the class as it is,
    which then find nothing: the original model, run through the same pipeline."""
    return _joined(before, after) or ",".join(n for n in EXACT.split(",") if registry.load_pass(n).level != "graph")


def _same_model(a: Point, b: Point) -> bool:
    """The same passes kept, or options that made the same model (fwsvd's budget past its free cuts)."""
    return a.applied == b.applied or (a.quality == b.quality and a.weight_bytes == b.weight_bytes)


def _point(candidate: str, result: api.Result, timer: Timer, metric: str | None) -> Point:
    report = result.report
    applied = ",".join(r.spec for r in report.records if r.status == "applied") or NOTHING
    quality = (report.metric.get("rewritten", float("nan")) if metric else
               (report.error_vs_original or {}).get("sqnr_db", float("nan")))
    proxy = 1.0 if applied == NOTHING else 1 / timer.speed(result, PROXY_BUDGET_S, PROXY_ROUNDS).ratio
    return Point(candidate, applied, float(quality), proxy, measure.weight_bytes(result.model))


def _better(a: float, b: float, metric: str | None) -> bool:
    """Is quality a at least as good as b?"""
    higher = measure.HIGHER_IS_BETTER.get(metric, True) if metric else True
    return a >= b if higher else a <= b


def _pareto(points: list[Point], metric: str | None) -> list[Point]:
    """Points no other point beats on both proxy time and quality."""
    def dominated(p: Point) -> bool:
        return any(q is not p and q.proxy <= p.proxy and _better(q.quality, p.quality, metric)
                   and (q.proxy < p.proxy or q.quality != p.quality) for q in points)
    return sorted((p for p in points if not dominated(p)), key=lambda p: p.proxy)


def _choose(front: list[Point], goal: float, metric: str | None) -> tuple[Point, bool]:
    """The most accurate point that meets the target; if none does, the most accurate of those as fast as the
    fastest: within its timing's noise (the intervals overlap) or within NEAR_FASTEST of its speed-up."""
    meets = [p for p in front if p.speed and 1 / p.speed <= goal]
    if not meets:
        fastest = max(front, key=lambda p: p.speed or 0)
        meets = [p for p in front if p.speed and _as_fast(p, fastest)] or [fastest]
    best = meets[0]
    for p in meets[1:]:
        if _better(p.quality, best.quality, metric) and p.quality != best.quality:
            best = p
    return best, any(p.speed and 1 / p.speed <= goal for p in [best])


def _more_accurate(front: list[Point], chosen: Point, metric: str | None) -> str | None:
    """The fastest front point more accurate than the chosen one, as the report names it: what the target
    cost in accuracy (MiniLM: dgq{act=tensor} met 0.5x at cosine 0.984; per-token dgq was 0.991 at 1.88x)."""
    better = [p for p in front
              if p.speed and _better(p.quality, chosen.quality, metric) and p.quality != chosen.quality]
    if not better:
        return None
    best = max(better, key=lambda p: p.speed)
    return f"{best.applied} ({best.quality:.4g}, {best.speed:.2f}x)"


# A speed-up this close to the fastest's is not worth accuracy when no point meets the target: MiniLM in
# onnxruntime, fwsvd,dgq was 1.96x (1.95–1.98) at held-out cosine 0.912 and dgq alone 1.92x (1.89–1.94) at 0.992.
NEAR_FASTEST = 0.95


def _as_fast(p: Point, fastest: Point) -> bool:
    overlaps = fastest.low is not None and p.high is not None and p.high >= fastest.low
    return overlaps or p.speed >= NEAR_FASTEST * fastest.speed


def _against_defaults(points: list[Point], chosen: Point, metric: str | None, before: str = BEFORE,
                      after: str = AFTER, idle: set[str] = frozenset()) -> list[str]:
    """Each single pass with its default options, as a user would run it alone: does the choice beat it on
    both time and quality? (time: paired where both were paired, else the proxy)."""
    lines = []
    for family in FAMILIES:
        default = next((p for p in points if p.spec == _joined(before, family, after)), None)
        if default is None and family in idle:
            lines.append(f"{family} with its defaults kept nothing here (rolled back, or nothing to rewrite; the "
                         "run's report says why): its other options were not tried")
        if default is None:
            continue
        if default is chosen:
            lines.append(f"{family} with its defaults is the chosen point")
            continue
        time_a = 1 / chosen.speed if chosen.speed and default.speed else chosen.proxy
        time_b = 1 / default.speed if chosen.speed and default.speed else default.proxy
        wins = time_a <= time_b and _better(chosen.quality, default.quality, metric)
        lines.append(f"{family} with its defaults ({default.applied}: {default.quality:.4g}, time "
                     f"{time_b:.2f}x the original's): " + ("the choice is as fast or faster and as accurate or more"
                                                           if wins else "not dominated by the choice"))
    return lines


def _quality_name(metric: str | None) -> str:
    return metric or "output SQNR dB vs the original"


def recipe_spec(path: str | Path) -> tuple[str, int]:
    """The pipeline and seed a recipe.json holds (`rewrite optimize --recipe`)."""
    import json
    try:
        recipe = json.loads(Path(path).read_text())
        return str(recipe["pipeline"]), int(recipe["seed"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RewriteError(f"{str(path)!r} is not a recipe.json a rewrite run wrote ({type(exc).__name__}): give "
                           "the recipe.json from an output folder") from None
