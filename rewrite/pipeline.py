"""Run passes in the user's order, verifying each against its contract (the spec text is parsed in spec.py).

A pass that crashes, returns something else than a module, runs past the time limit, or breaks its
contract is rolled back (the model before it is restored) and the report says why, naming the plugin's
distribution; with `strict=True` that is an error naming the pass and the passes before it. A plugin's
pass reads its own copies of the original model and the calibration data, so nothing it does to them
can reach the verification that judges it (a change is itself a reason to roll it back).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from rewrite import capture, distributed, measure, registry, verify
from rewrite.errors import PassError, RewriteError, first_line
from rewrite.pass_base import Approx, Pass, PassContext, PassResult, is_graph
from rewrite.report import PassRecord

Progress = Callable[..., None]  # (message, done=None, total=None)


# --- running -----------------------------------------------------------------------------------

class PassTimeout(BaseException):
    """Raised inside a pass at its time limit; a BaseException, so a pass's `except Exception` cannot eat it."""


def run_passes(captured: capture.Captured, passes: list[Pass], ctx: PassContext, *, strict: bool = False,
               progress: Progress | None = None, outputs: list | None = None) -> tuple[nn.Module, list[PassRecord], list]:
    """Apply `passes` in order to `captured.module`; returns the final module, one record per pass, and the
    final module's outputs on `ctx.calibration` (verification computed them: later steps need not again).
    `outputs`: the captured module's own outputs there, where the caller has them. A pass whose `call`
    runs past `ctx.time_limit` seconds is stopped and rolled back."""
    module = captured.module
    outputs = outputs if outputs is not None else [capture.run(module, batch) for batch in ctx.calibration]
    records = []
    for i, pass_ in enumerate(passes):
        if progress:
            progress(f"pass {i + 1}/{len(passes)}: {pass_.spec()}")
            ctx.progress = lambda message, done, total, i=i, name=pass_.name: progress(
                f"pass {i + 1}/{len(passes)}: {name}: {message}", done, total)
        earlier = ",".join(p.spec() for p in passes[:i]) or "none"
        module, outputs, record = _run_one(pass_, module, outputs, ctx, captured, earlier, strict, progress)
        records.append(record)
    return module, records, outputs


def _run_one(pass_: Pass, module: nn.Module, outputs: list, ctx: PassContext, captured: capture.Captured,
             earlier: str, strict: bool, progress: Progress | None) -> tuple[nn.Module, list, PassRecord]:
    record = PassRecord(name=pass_.name, spec=pass_.spec(), contract=pass_.contract.describe(),
                        params_before=_params(module), layers_before=capture.layer_count(module),
                        bytes_before=measure.weight_bytes(module))
    if pass_.level == "graph" and not is_graph(module):
        record.status, record.reason = "skipped", f"needs a graph: {captured.note}"
        return module, outputs, record
    snapshot, start = capture.copied(module), time.perf_counter()
    plugin = registry.plugin_of(type(pass_))
    try:
        result = _call(pass_, module, ctx, plugin)
        held = _recover(result, snapshot, outputs, ctx, progress, pass_) if (
            result.modified and pass_.recoverable and ctx.recover is not None) else None
        new_outputs = [capture.run(result.module, batch) for batch in ctx.calibration] if result.modified else outputs
        err, broken, flag = (verify.judge(pass_, snapshot, result.module, outputs, new_outputs, ctx, held)
                             if result.modified else (None, None, None))
    except RewriteError:
        raise
    except PassTimeout:
        result, err, broken, flag = None, None, f"ran past the time limit of {ctx.time_limit:g} s (--pass-timeout)", None
    except Exception as exc:  # a pass bug must not take the user's run down with it
        if distributed.lost_peer(exc):
            raise  # another rank died: the run is over, not this pass
        result, err, broken, flag = None, None, f"raised {type(exc).__name__}: {first_line(exc)}", None
    if broken and plugin:
        broken += f" [plugin {plugin}]"
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
    if result.modified and isinstance(pass_.contract, Approx) and ctx.calibration:
        record.layers = result.layers or _layers(snapshot, result.module, ctx.calibration[0])
    record.status = "applied" if result.modified else "nothing to rewrite"
    record.reason = flag or ""
    if not result.modified:
        record.reason = "; ".join(f"{w}: {why}" for w, why in record.skipped) or f"no layer matched ({pass_.applies_to})"
        record.reason += _swapped_before(result.module, pass_)
    record.params_after, record.layers_after = _params(result.module), capture.layer_count(result.module)
    record.bytes_after = measure.weight_bytes(result.module)
    return result.module, new_outputs, record


def _recover(result: PassResult, teacher: nn.Module, outputs: list, ctx: PassContext,
             progress: Progress | None, pass_: Pass) -> list[int] | None:
    """Distill the rewritten model toward the model before this pass on part of the calibration data.

    Returns the held-out batch indices the contract is then checked on (None: too little data to hold
    any out, which the stats say), so recovery never grades its own homework."""
    from rewrite.recover import distill, split, swapped_layers
    train, held = split(len(ctx.calibration))
    before = verify.compare(outputs, [capture.run(result.module, b) for b in ctx.calibration], masks=ctx.masks)
    # Logits (a classifier's, a language model's) distill by KL: measured on SmolLM2 with fwsvd, MSE on the
    # logits raised the held-out SQNR from 0 to 3 dB while perplexity went from 17,153 to 5.3 million.
    logits = verify.reads_as_logits(outputs[0], ctx.calibration[0])
    kind = "kl" if ctx.metric in ("top1", "perplexity") or logits else "mse"
    spec = ctx.recover if ctx.recover.lr is not None else dataclasses.replace(ctx.recover, lr=pass_.recovery_lr)
    layers = swapped_layers(result.module, teacher) if spec.local else []
    result.stats["sqnr_db_before_recovery"] = round(before.sqnr_db, 2)
    if layers:
        _recover_locally(result, teacher, ctx, progress, layers, spec, train, held)
        if not spec.then:
            return _recovered_errors(result, outputs, ctx, train, held)
        spec = dataclasses.replace(spec, steps=spec.then)  # whole-model distillation after the local fits
    elif spec.local:
        result.stats["recovery_warning"] = "no layer swapped in place to fit alone: the whole model was distilled"
    stats = distill(result.module, teacher, _pick(ctx.calibration, train), spec,
                    targets=_pick(ctx.targets, train), held_out=_pick(ctx.calibration, held) if held else None,
                    held_targets=_pick(ctx.targets, held) if held else None, seed=ctx.seed, kind=kind,
                    progress=progress, trainable=_made_by(result.module, pass_.name),
                    masks=_pick(ctx.masks, train), held_masks=_pick(ctx.masks, held) if held else None)
    result.stats["recovery_steps"], result.stats["recovery_lr"] = stats["steps"], spec.lr
    result.stats["recovery_loss"] = f"{stats['loss']} {stats['loss_before']:.3g}→{stats['loss_after']:.3g}"
    result.stats["recovery_curve"] = [round(x, 6) for x in stats["curve"]]  # held-out loss at each check
    if stats["processes"] > 1:
        result.stats["recovery_processes"] = stats["processes"]
    if stats.get("too_little_data"):
        result.stats["recovery_warning"] = stats["too_little_data"]
    return _recovered_errors(result, outputs, ctx, train, held)


def _recover_locally(result: PassResult, teacher: nn.Module, ctx: PassContext, progress: Progress | None,
                     layers: list[str], spec: Any, train: list[int], held: list[int]) -> None:
    """`--recover local`: each swapped layer fitted alone to its original (`recover.fit_layers`)."""
    from rewrite.recover import fit_layers
    stats = fit_layers(result.module, teacher, layers, _pick(ctx.calibration, train), spec,
                       held_out=_pick(ctx.calibration, held) if held else None, masks=_pick(ctx.masks, train),
                       held_masks=_pick(ctx.masks, held) if held else None, seed=ctx.seed, progress=progress)
    result.stats["recovery_layers"], result.stats["recovery_lr"] = stats["layers"], spec.lr
    result.stats["recovery_local_loss"] = f"mse {stats['loss_before']:.3g}→{stats['loss_after']:.3g} (summed over layers)"


def _recovered_errors(result: PassResult, outputs: list, ctx: PassContext, train: list[int],
                      held: list[int]) -> list[int] | None:
    """The recovered model's SQNR on the batches it trained on and on those it did not."""
    new = [capture.run(result.module, b) for b in ctx.calibration]
    for name, idx in (("train", train), ("held_out", held)):
        if idx:
            result.stats[f"sqnr_db_{name}"] = round(verify.compare(
                _pick(outputs, idx), _pick(new, idx), masks=_pick(ctx.masks, idx)).sqnr_db, 2)
    if not held:
        result.stats["recovery_warning"] = "one calibration batch: checked on the data it trained on; give more"
    return held or None


def _swapped_before(module: nn.Module, pass_: Pass) -> str:
    """Where a pass found nothing: the layers of the kinds it reads (`Pass.reads`) that earlier passes already
    swapped (fwsvd after dgq finds no nn.Linear left), and the order that lets both apply."""
    if not is_graph(module):
        return ""
    counts: dict[str, int] = {}
    for node in module.graph.nodes:
        made_by, replaced = node.meta.get("rewrite.pass"), node.meta.get("rewrite.replaced", ())
        if (node.op == "call_module" and made_by and made_by != pass_.name and set(replaced) & set(pass_.reads)
                and not _kind_of(module.get_submodule(node.target)) & set(pass_.reads)):  # fold-bn's Linear stays one
            counts[made_by] = counts.get(made_by, 0) + 1
    if not counts:
        return ""
    done = ", ".join(f"{p} swapped {n}" for p, n in counts.items())
    return f" ({done} layer(s) before it: to rewrite them too, put {pass_.name} earlier in the pipeline)"


def _kind_of(layer: nn.Module) -> set[str]:
    return {c.__name__ for c in type(layer).__mro__}


def _pick(items: list | None, idx: list[int]) -> list | None:
    """The items at `idx` (None stays None): calibration batches, targets or masks of a split."""
    return [items[i] for i in idx] if items is not None else None


def _layers(before: nn.Module, after: nn.Module, batch: tuple) -> list[dict]:
    """Per-layer errors for the report's pictures; a model whose layers cannot be run alone has none."""
    try:
        return verify.layer_errors(before, after, batch)
    except Exception:  # e.g. a layer called with arguments only its parent's forward builds
        return []


def _made_by(module: nn.Module, name: str) -> list[nn.Module] | None:
    """The layers a pass put into a graph (stamped with its name): recovery trains those, not the whole
    model, so a handful of calibration batches cannot overfit millions of untouched weights."""
    if not is_graph(module):
        return None
    layers = [module.get_submodule(n.target) for n in module.graph.nodes
              if n.op == "call_module" and n.meta.get("rewrite.pass") == name]
    return [m for m in layers if any(p.is_floating_point() for p in m.parameters())] or None


def _call(pass_: Pass, module: nn.Module, ctx: PassContext, plugin: str | None = None) -> PassResult:
    before = _layer_identities(module)
    own_ctx = _private_context(ctx) if plugin else ctx
    versions = _versions(ctx.original, ctx.calibration, ctx.targets)
    with _deadline(ctx.time_limit):
        result = pass_.call(module, own_ctx)
    if not isinstance(result, PassResult):
        raise TypeError(f"call() returned {type(result).__name__}, not PassResult")
    if not isinstance(result.module, nn.Module):
        raise TypeError(f"call() returned a PassResult whose module is a {type(result.module).__name__}")
    if _versions(ctx.original, ctx.calibration, ctx.targets) != versions or (plugin and not _same(own_ctx, ctx)):
        raise RuntimeError("it changed ctx.original or the calibration data, which passes only read")
    if is_graph(result.module) and result.modified:
        # Provenance: nodes the pass created, and call_module nodes whose layer it swapped.
        for node, layer in _layer_identities(result.module).items():
            if before.get(node, layer) is not layer or node not in before:
                node.meta["rewrite.pass"] = pass_.name  # the last pass that made or swapped it
                if before.get(node) is not None and "rewrite.replaced" not in node.meta:  # the user's layer's kind
                    node.meta["rewrite.replaced"] = tuple(_kind_of(before[node]))
        result.module.graph.lint()
        result.module.recompile()
    return result


def _private_context(ctx: PassContext) -> PassContext:
    """A plugin's own copies of what it reads: the model it is judged against, and the data."""
    return dataclasses.replace(ctx, original=capture.copied(ctx.original), calibration=copy.deepcopy(ctx.calibration),
                               targets=copy.deepcopy(ctx.targets),
                               original_calibration=copy.deepcopy(ctx.original_calibration))


def _versions(*things: Any) -> list:
    """Which modules and tensors there are, where their data lives and how often it was written in place
    (torch counts every in-place write in a tensor's version; writes through `.data` it does not)."""
    return [(id(t), t.data_ptr(), t._version) for t in _tensors(*things)] + [
        (name, id(m)) for thing in things if isinstance(thing, nn.Module) for name, m in thing.named_modules()]


def _same(copied: PassContext, real: PassContext) -> bool:
    """A plugin's copies still equal the real ones, value for value."""
    mine, theirs = _tensors(copied.original, copied.calibration), _tensors(real.original, real.calibration)
    return len(mine) == len(theirs) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs))


def _tensors(*things: Any) -> list[torch.Tensor]:
    found: list = []
    for thing in things:
        if isinstance(thing, nn.Module):
            thing = list(thing.state_dict(keep_vars=True).values())
        found += [t for t in tree_leaves(thing) if isinstance(t, torch.Tensor) and not t.is_meta]
    return found


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise PassTimeout in the block after `seconds` (SIGALRM: on the main thread of a Unix process only)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise PassTimeout()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _layer_identities(module: nn.Module) -> dict:
    """node → the layer object it calls (None for non-module nodes)."""
    if not is_graph(module):
        return {}
    return {n: module.get_submodule(n.target) if n.op == "call_module" else None for n in module.graph.nodes}


def _params(module: nn.Module) -> int:
    return measure.param_count(module)

