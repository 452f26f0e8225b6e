"""`rewrite tune`: search pipelines of the registered passes under the user's latency target, and choose.

Successive halving in two rungs, every candidate through the same verified pipeline as `optimize`:
1. each candidate (the exact passes, then each approximate family with its main options) is rewritten and
   verified once, without the report's latency rounds: its output SQNR against the original (or the task
   metric on the eval data), its weight bytes, and a short paired timing against the original (the
   proxy: a few alternating rounds, so a noisy moment hits both). A family
   that rewrites nothing in its first candidate is not tried again with other options.
2. the Pareto front of (proxy time, error) is timed again, paired against the original in alternating
   rounds, as the report times (`measure.compare_torch`).
The chosen point is the most accurate front point whose paired time meets the target (else the fastest,
and the report says the target was not met). It is rewritten once more into the output folder, whose
report carries the front (a table, and a picture with the chosen point marked) and whose recipe.json
`rewrite optimize MODEL --recipe recipe.json` reproduces.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from rewrite import api, inputs as steps, measure, spec
from rewrite.errors import InvalidValue, RewriteError

# Exact passes: those that apply do, the others leave "nothing to rewrite". The approximate family goes between
# them: pointwise turns 1×1 projections into plain GEMMs, which the factorizing and quantizing passes would
# then no longer see as Linears.
BEFORE, AFTER = "fold-bn,reparam,t1", "pointwise,inplace"
EXACT = f"{BEFORE},{AFTER}"
FAMILIES = {  # each approximate family's main options, its defaults first (what a user would try alone)
    "fwsvd": ["fwsvd", "fwsvd{param-ratio=0.9}", "fwsvd{param-ratio=0.5}"],
    "lowrank": ["lowrank", "lowrank{param-ratio=0.5}"],
    "dgq": ["dgq", "dgq{budget-cos=0}"],
    "fwsvd+dgq": ["fwsvd,dgq"],
}
PROXY_BUDGET_S, PAIRED_BUDGET_S = 0.4, 2.0


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


def tune(model: nn.Module | str, example_inputs: Any, *, target: str = "latency=0.5", time_limit: Any = "10m",
         calib: Any = None, eval: Any = None, metric: str | None = None, floor: str | None = None,
         out: str | Path | None = None, force: bool = False, seed: int = 0, trusted: Any = False,
         progress: Callable[..., None] | None = None) -> api.Result:
    """Search, choose, and rewrite the chosen point into `out`; the Result's report holds the front."""
    say = progress or (lambda message, done=None, total=None: None)
    goal, budget, start = parse_target(target), parse_time(time_limit), time.perf_counter()
    loaded = steps.resolve(model, trusted)
    module, example = loaded.module, loaded.inputs if example_inputs is None else example_inputs
    calib = loaded.calibration if calib is None else calib
    run = dict(calib=calib, eval=eval, metric=metric, floor=floor, seed=seed)
    args = steps.check_model_and_inputs(steps.private_copy(module), example)
    points: list[Point] = []
    models: dict[str, nn.Module] = {}
    for family, options in [("exact", [EXACT])] + [(f, [f"{BEFORE},{o},{AFTER}" for o in opts])
                                                    for f, opts in FAMILIES.items()]:
        for option in options:
            if points and time.perf_counter() - start > budget:
                break
            say(f"trying {option} ({len(points)} distinct so far)")
            result = api.optimize(module, example, option, measure_latency=False, **run)
            point = _point(option, result, module, args, metric)
            if family != "exact" and point.applied == points[0].applied:
                break  # this family rewrites nothing here (or is rolled back): its other options would not either
            if not any(_same_model(p, point) for p in points):
                points.append(point)
                models[point.spec] = result.model
    front = _pareto(points, metric)
    for i, point in enumerate(front):
        say(f"timing the front, paired with the original: {point.applied}", i, len(front))
        speed = measure.compare_torch(module, models[point.spec], args, budget_s=PAIRED_BUDGET_S).speed
        point.speed, point.low, point.high, point.front = speed.ratio, speed.low, speed.high, True
    chosen, met = _choose(front, goal, metric)
    search = {"target": target, "chosen": chosen.spec, "met": met, "quality": _quality_name(metric),
              "against_defaults": _against_defaults(points, chosen, metric), "seconds": round(time.perf_counter() - start, 1),
              "points": [asdict(p) for p in points]}
    say(f"rewriting the chosen point: {chosen.spec}")
    return api.optimize(module, example, chosen.spec, out=out, force=force, search=search, **run)


def _same_model(a: Point, b: Point) -> bool:
    """The same passes kept, or options that made the same model (fwsvd's budget past its free cuts)."""
    return a.applied == b.applied or (a.quality == b.quality and a.weight_bytes == b.weight_bytes)


def _point(candidate: str, result: api.Result, original: nn.Module, args: tuple, metric: str | None) -> Point:
    report = result.report
    applied = ",".join(r.spec for r in report.records if r.status == "applied") or "(none)"
    quality = (report.metric.get("rewritten", float("nan")) if metric else
               (report.error_vs_original or {}).get("sqnr_db", float("nan")))
    proxy = 1 / measure.compare_torch(original, result.model, args, budget_s=PROXY_BUDGET_S).speed.ratio
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
    meets = [p for p in front if p.speed and 1 / p.speed <= goal]
    if not meets:
        return max(front, key=lambda p: p.speed or 0), False
    best = meets[0]
    for p in meets[1:]:
        if _better(p.quality, best.quality, metric) and p.quality != best.quality:
            best = p
    return best, True


def _against_defaults(points: list[Point], chosen: Point, metric: str | None) -> list[str]:
    """Each single pass with its default options, as a user would run it alone: does the choice beat it on
    both time and quality? (time: paired where both were paired, else the proxy)."""
    lines = []
    for family in FAMILIES:
        default = next((p for p in points if p.spec == f"{BEFORE},{family},{AFTER}"), None)
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
