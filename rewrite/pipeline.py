"""Run passes in the user's order, verifying each against its contract (the spec text is parsed in spec.py).

A pass that crashes or breaks its contract is rolled back (the model before it is restored) and the
report says why; with `strict=True` that is an error naming the pass and the passes before it.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

from torch import nn

from rewrite import capture, measure, verify
from rewrite.errors import PassError, RewriteError, first_line
from rewrite.pass_base import Pass, PassContext, PassResult, is_graph
from rewrite.report import PassRecord

Progress = Callable[..., None]  # (message, done=None, total=None)


# --- running -----------------------------------------------------------------------------------

def run_passes(captured: capture.Captured, passes: list[Pass], ctx: PassContext, *,
               strict: bool = False, progress: Progress | None = None) -> tuple[nn.Module, list[PassRecord]]:
    """Apply `passes` in order to `captured.module`; returns the final module and one record per pass."""
    module = captured.module
    outputs = [capture.run(module, batch) for batch in ctx.calibration]
    records = []
    for i, pass_ in enumerate(passes):
        if progress:
            progress(f"pass {i + 1}/{len(passes)}: {pass_.spec()}")
            ctx.progress = lambda message, done, total, i=i, name=pass_.name: progress(
                f"pass {i + 1}/{len(passes)}: {name}: {message}", done, total)
        earlier = ",".join(p.spec() for p in passes[:i]) or "none"
        module, outputs, record = _run_one(pass_, module, outputs, ctx, captured, earlier, strict, progress)
        records.append(record)
    return module, records


def _run_one(pass_: Pass, module: nn.Module, outputs: list, ctx: PassContext, captured: capture.Captured,
             earlier: str, strict: bool, progress: Progress | None) -> tuple[nn.Module, list, PassRecord]:
    record = PassRecord(name=pass_.name, spec=pass_.spec(), contract=pass_.contract.describe(),
                        params_before=_params(module), layers_before=capture.layer_count(module),
                        bytes_before=measure.weight_bytes(module))
    if pass_.level == "graph" and not is_graph(module):
        record.status, record.reason = "skipped", f"needs a graph: {captured.note}"
        return module, outputs, record
    snapshot, start = copy.deepcopy(module), time.perf_counter()
    try:
        result = _call(pass_, module, ctx)
        held = _recover(result, snapshot, outputs, ctx, progress, pass_.name) if (
            result.modified and pass_.recoverable and ctx.recover is not None) else None
        new_outputs = [capture.run(result.module, batch) for batch in ctx.calibration] if result.modified else outputs
        err, broken, flag = (verify.judge(pass_, snapshot, result.module, outputs, new_outputs, ctx, held)
                             if result.modified else (None, None, None))
    except RewriteError:
        raise
    except Exception as exc:  # a pass bug must not take the user's run down with it
        result, err, broken, flag = None, None, f"raised {type(exc).__name__}: {first_line(exc)}", None
    record.seconds = time.perf_counter() - start
    if result is not None:
        record.stats = result.stats
        record.skipped = [[capture.module_path(snapshot, where), why] for where, why in result.skipped]
    record.error = err.to_dict() if err else None
    if broken:
        if strict:
            raise PassError(f"pass {pass_.name!r} {broken} (passes before it: {earlier}); "
                            "fix the options or run without --strict to roll it back")
        record.status, record.reason = "rolled back", broken
        record.params_after, record.layers_after = record.params_before, record.layers_before
        record.bytes_after = record.bytes_before
        return snapshot, outputs, record
    record.status = "applied" if result.modified else "nothing to rewrite"
    record.reason = flag or ""
    if not result.modified:
        record.reason = "; ".join(f"{w}: {why}" for w, why in record.skipped) or f"no layer matched ({pass_.applies_to})"
    record.params_after, record.layers_after = _params(result.module), capture.layer_count(result.module)
    record.bytes_after = measure.weight_bytes(result.module)
    return result.module, new_outputs, record


def _recover(result: PassResult, teacher: nn.Module, outputs: list, ctx: PassContext,
             progress: Progress | None, pass_name: str) -> list[int] | None:
    """Distill the rewritten model toward the model before this pass on part of the calibration data.

    Returns the held-out batch indices the contract is then checked on (None: too little data to hold
    any out, which the stats say), so recovery never grades its own homework."""
    from rewrite.recover import distill, split
    train, held = split(len(ctx.calibration))
    pick = (lambda xs, idx: [xs[i] for i in idx] if xs is not None else None)
    before = verify.compare(outputs, [capture.run(result.module, b) for b in ctx.calibration], masks=ctx.masks)
    # Logits (a classifier's, a language model's) distill by KL: measured on SmolLM2 with fwsvd, MSE on the
    # logits raised the held-out SQNR from 0 to 3 dB while perplexity went from 17,153 to 5.3 million.
    logits = verify.reads_as_logits(outputs[0], ctx.calibration[0])
    kind = "kl" if ctx.metric in ("top1", "perplexity") or logits else "mse"
    stats = distill(result.module, teacher, pick(ctx.calibration, train), ctx.recover,
                    targets=pick(ctx.targets, train), held_out=pick(ctx.calibration, held) if held else None,
                    held_targets=pick(ctx.targets, held) if held else None, seed=ctx.seed, kind=kind,
                    progress=progress, trainable=_made_by(result.module, pass_name))
    result.stats["sqnr_db_before_recovery"] = round(before.sqnr_db, 2)
    result.stats["recovery_steps"] = stats["steps"]
    result.stats["recovery_loss"] = f"{stats['loss']} {stats['loss_before']:.3g}→{stats['loss_after']:.3g}"
    result.stats["recovery_curve"] = [round(x, 6) for x in stats["curve"]]  # held-out loss at each check
    if stats["processes"] > 1:
        result.stats["recovery_processes"] = stats["processes"]
    new = [capture.run(result.module, b) for b in ctx.calibration]
    for name, idx in (("train", train), ("held_out", held)):
        if idx:
            result.stats[f"sqnr_db_{name}"] = round(verify.compare(
                pick(outputs, idx), pick(new, idx), masks=pick(ctx.masks, idx)).sqnr_db, 2)
    if not held:
        result.stats["recovery_warning"] = "one calibration batch: checked on the data it trained on; give more"
    elif stats.get("too_little_data"):
        result.stats["recovery_warning"] = stats["too_little_data"]
    return held or None


def _made_by(module: nn.Module, name: str) -> list[nn.Module] | None:
    """The layers a pass put into a graph (stamped with its name): recovery trains those, not the whole
    model, so a handful of calibration batches cannot overfit millions of untouched weights."""
    if not is_graph(module):
        return None
    layers = [module.get_submodule(n.target) for n in module.graph.nodes
              if n.op == "call_module" and n.meta.get("rewrite.pass") == name]
    return [m for m in layers if any(p.is_floating_point() for p in m.parameters())] or None


def _call(pass_: Pass, module: nn.Module, ctx: PassContext) -> PassResult:
    before = _layer_identities(module)
    result = pass_.call(module, ctx)
    if not isinstance(result, PassResult):
        raise TypeError(f"call() returned {type(result).__name__}, not PassResult")
    if is_graph(result.module) and result.modified:
        # Provenance: nodes the pass created, and call_module nodes whose layer it swapped.
        for node, layer in _layer_identities(result.module).items():
            if before.get(node, layer) is not layer or node not in before:
                node.meta["rewrite.pass"] = pass_.name  # the last pass that made or swapped it
        result.module.graph.lint()
        result.module.recompile()
    return result


def _layer_identities(module: nn.Module) -> dict:
    """node → the layer object it calls (None for non-module nodes)."""
    if not is_graph(module):
        return {}
    return {n: module.get_submodule(n.target) if n.op == "call_module" else None for n in module.graph.nodes}


def _params(module: nn.Module) -> int:
    return measure.param_count(module)

