"""Step 3 of a run: the before/after diff. Outputs against the original on the calibration batches, latency
in eager torch (alternating rounds), generation speed for causal LMs (prefill, decode with the KV cache), the
metric on held-out data, and profiles. `api.optimize` and `api.diff` report with these."""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from rewrite import calibration, capture, measure, verify
from rewrite.errors import first_line
from rewrite.report import Measurement, RunReport


def compared(model: nn.Module, mask_input: str | None, masks: list | None, floor: float | None,
             metric: str | None) -> str:
    """What verification compared, in words, for the report."""
    where = "all output positions"
    if masks is not None:
        name = mask_input or next(n for n in calibration.MASK_NAMES if n in inspect.signature(model.forward).parameters)
        where = f"outputs at positions where {name} is 1 (padding excluded)"
    sign = "≥" if measure.HIGHER_IS_BETTER.get(metric or "", True) else "≤"
    decided = f"; approximate passes accepted by {metric} {sign} {floor:g} on the eval data" if floor is not None else ""
    return where + decided


def before_after(report: RunReport, original: nn.Module, rewritten: nn.Module, inputs: tuple, batches: list[tuple],
                 masks: list | None, eval_data: tuple | None, metric: str | None, *, latency: bool, profile: bool,
                 own_class: bool, say: Callable[..., None], before: list | None = None,
                 after: list | None = None, original_score: float | None = None) -> None:
    """Fill `report` with the diff of `original` and `rewritten`: outputs on `batches` (`before`, `after`:
    theirs where earlier steps computed them), timing and profiles on `inputs` (`own_class`: the user's class
    came back, so a causal LM can generate), the metric (`original_score`: the original's, if known)."""
    before = before if before is not None else [capture.run(original, b) for b in batches]
    after = after if after is not None else [capture.run(rewritten, b) for b in batches]
    report.error_vs_original = verify.compare(before, after, masks=masks).to_dict()
    if latency:
        say("measuring latency (eager torch, original and rewritten in alternating rounds)")
        add_timing(report, measure.compare_torch(original, rewritten, inputs), original, rewritten)
    if latency and own_class and measure.generates(rewritten):
        say("measuring generation (prefill, then up to 64 new tokens with the KV cache; alternating rounds)")
        try:
            generation = measure.compare_generation(original, rewritten)
        except Exception as exc:  # a measurement: the rewrite stands, and the report says what was not measured
            report.warnings.append(f"generation was not timed: generate() raised {type(exc).__name__}: "
                                   f"{first_line(exc)}")
        else:
            report.speeds += [generation["prefill"].speed, generation["decode"].speed]
            report.generation = {k: generation[k] for k in ("prompt_tokens", "new_tokens", "prefill_ms",
                                                            "decode_tokens_per_s")}
    if eval_data is not None:
        score(report, original, rewritten, eval_data, metric, original_score)
    if profile:
        say("profiling (eager torch)")
        report.profiles = {f"torch, {label}": measure.profile_torch(m, inputs)
                           for label, m in (("original", original), ("rewritten", rewritten))}


def add_timing(report: RunReport, timed: measure.Timed, original: nn.Module, rewritten: nn.Module) -> None:
    for label, module, (p50, p90, runs) in (("original", original, timed.original),
                                            ("rewritten", rewritten, timed.rewritten)):
        report.measurements.append(Measurement(label, timed.speed.backend, p50, p90, runs,
                                               measure.param_count(module), measure.state_size(module),
                                               capture.layer_count(module)))
    report.speeds.append(timed.speed)


def score(report: RunReport, original: nn.Module, rewritten: nn.Module, eval_data: tuple, metric: str,
          original_score: float | None = None) -> None:
    report.metric_name = metric
    evaluate = measure.evaluator(metric, *eval_data)
    report.metric["original"] = original_score if original_score is not None else evaluate(original)
    report.metric["rewritten"] = evaluate(rewritten)
