"""Recovery: distill a rewritten model toward its teacher's outputs (or ground truth) on calibration data.

Used by approximate passes that declare `recoverable = True` (t1 mode=t1, lowrank, fwsvd, snnk, tconv,
rpe-fft): the pipeline runs it right after such a pass, then verifies the pass's contract on the recovered
model. Seeded, bounded, early-stopping, with progress through the same callback as the rest.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from rewrite import calibration, distributed, verify
from rewrite.pass_base import Pass
from rewrite.spec import RecoverSpec  # noqa: F401  (the options recovery runs with, parsed in spec.py)


def _loss(out: Any, target: Any, kind: str = "mse", mask: torch.Tensor | None = None) -> torch.Tensor:
    """By output kind: logits against integer labels → cross-entropy; logits against the teacher's logits
    with kind="kl" → KL(teacher ‖ student) over the last axis; otherwise relative squared error over the
    float leaves (scale-free, so one lr fits many models). With a (batch, seq) padding mask, only the
    positions it keeps count, as in verification: a padded position's output is read by nothing."""
    pairs = [(verify.kept_positions(o, mask), verify.kept_positions(t.detach(), mask))
             for o, t in zip(tree_leaves(out), tree_leaves(target)) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return sum(_pair_loss(o, t, kind) for o, t in pairs)


def _pair_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if not target.is_floating_point():
        return F.cross_entropy(out.flatten(0, -2), target.flatten().long())
    if kind == "kl":
        return F.kl_div(F.log_softmax(out, -1).flatten(0, -2), F.log_softmax(target, -1).flatten(0, -2),
                        log_target=True, reduction="batchmean")
    # Data-parallel: the whole batch's denominator, so the ranks' mean loss is the one-process loss.
    return distributed.world() * ((out - target) ** 2).sum() / distributed.total((target ** 2).sum()).clamp_min(1e-12)


def split(count: int) -> tuple[list[int], list[int]]:
    """(training, held-out) calibration batch indices: the last quarter (at least one) is held out."""
    if count < 2:
        return list(range(count)), []
    held = max(1, count // 4)
    return list(range(count - held)), list(range(count - held, count))


def distill(student: nn.Module, teacher: nn.Module, batches: list[tuple], spec: RecoverSpec, *,
            targets: list[Any] | None = None, held_out: list[tuple] | None = None,
            held_targets: list[Any] | None = None, seed: int = 0, kind: str = "mse",
            progress: Callable[..., None] | None = None, trainable: list[nn.Module] | None = None,
            masks: list | None = None, held_masks: list | None = None) -> dict[str, Any]:
    """Train `student` in place toward `teacher` (or `targets`); returns the loss before and after.

    With `held_out` batches, early stopping and the kept state follow the loss on them, not on the
    training batches. kind="kl" distills logits by KL divergence (classifiers), "mse" by relative
    squared error. `trainable`: the layers to train (default: every floating-point parameter). `masks`,
    `held_masks`: each batch's (batch, seq) padding mask or None (the positions the losses count)."""
    torch.manual_seed(seed)
    batches, held_out = [distributed.shard(b) for b in batches], [distributed.shard(b) for b in held_out or []]
    targets = [distributed.shard(t, "target batch") for t in targets] if targets is not None else None
    held_targets = [distributed.shard(t, "target batch") for t in held_targets] if held_targets is not None else None
    masks = [distributed.shard(m) for m in masks] if masks else [None] * len(batches)
    held_masks = [distributed.shard(m) for m in held_masks] if held_masks else [None] * len(held_out)
    with torch.no_grad():
        goals = targets if targets is not None else [teacher(*b) for b in batches]
        watch, watch_masks = (held_out, held_masks) if held_out else (batches, masks)
        watch_goals = (held_targets if held_targets is not None else [teacher(*b) for b in held_out]) \
            if held_out else goals
    sources = trainable or [student]
    params = list({id(p): p for m in sources for p in m.parameters() if p.is_floating_point()}.values())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=spec.lr if spec.lr is not None else Pass.recovery_lr)
    runner = distributed.wrap(student)  # DistributedDataParallel under torchrun: gradients of the whole batch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    before = _mean_loss(student, watch, watch_goals, kind, watch_masks)
    # No train()/eval() switching: captured graphs have eval semantics baked in (and refuse the call).
    guided = [m for m in student.modules() if hasattr(m, "recovery_progress")]  # self-guided layers (lowrank)
    best, best_state, since_best, step = before, _state(student), 0, 0
    curve = [before]
    for step in range(spec.steps):
        for m in guided:
            m.recovery_progress(step / spec.steps)
        if guided and guided[0].dense is not None:
            best = math.inf  # the model is not the final structure yet: nothing to keep
        i = step % len(batches)
        optimizer.zero_grad()
        loss = _loss(runner(*batches[i]), goals[i], kind, masks[i])
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, len(batches)) == 0:
            current = _mean_loss(student, watch, watch_goals, kind, watch_masks)
            curve.append(current)
            if progress:
                progress(f"recovering: loss {current:.3g} (start {before:.3g})", step + 1, spec.steps)
            best, best_state, since_best = (current, _state(student), 0) if current < best else (best, best_state, since_best + len(batches))
            if since_best >= spec.patience:
                break
    for m in guided:
        m.recovery_progress(1.0)
    student.load_state_dict(best_state, strict=not guided)
    for p in params:
        p.requires_grad_(False)
    return {"loss_before": before, "loss_after": best, "steps": step + 1, "loss": _loss_name(goals[0], kind),
            "too_little_data": _too_little(params, goals), "curve": curve, "processes": distributed.world()}


def _too_little(params: list[torch.Tensor], goals: list[Any]) -> str:
    """A warning when the trained parameters far outnumber the target values they are fitted to."""
    trained = sum(p.numel() for p in params)
    values = sum(t.numel() for g in goals for t in tree_leaves(g) if isinstance(t, torch.Tensor))
    if trained > 10 * values:
        return (f"{trained:,} parameters trained on {values:,} target values: it may overfit; "
                "give more calibration data (--calib, --calib-batches)")
    return ""


def _loss_name(target: Any, kind: str) -> str:
    leaves = [t for t in tree_leaves(target) if isinstance(t, torch.Tensor)]
    return "CE" if leaves and not leaves[0].is_floating_point() else kind


def _mean_loss(model: nn.Module, batches: list[tuple], goals: list[Any], kind: str, masks: list) -> float:
    """Over all ranks' shards when data-parallel (each rank's loss is its share of the whole batch's)."""
    with torch.no_grad():
        mine = sum(_loss(model(*b), g, kind, m).double() for b, g, m in zip(batches, goals, masks)) / len(batches)
        return float(distributed.total(torch.as_tensor(mine)) / distributed.world())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model: nn.Module, batches: list[tuple], targets: list[Any], *, steps: int = 1000, lr: float = 2e-3,
          held_out: list[tuple] | None = None, held_targets: list[Any] | None = None, seed: int = 0,
          progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train every parameter of `model` in place on (inputs, target) pairs: relative squared error for float
    targets, cross-entropy for integer labels; Adam with a cosine schedule, the best state on `held_out`
    (or the training batches) kept. For architectures rewritten before training (`tconv{init=random}`)."""
    spec = RecoverSpec(steps=steps, lr=lr, patience=max(steps, 1))
    return distill(model, None, batches, spec, targets=targets, held_out=held_out, held_targets=held_targets,
                   seed=seed, progress=progress)


# --- layer-local recovery -----------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook once it holds what it came for: the rest of the forward is not needed."""


def swapped_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Paths where `student` holds a new layer with trainable weights in place of one the teacher has
    (fwsvd, lowrank, tconv swap layers in place), in the order a forward calls them. A layer with fewer
    outputs than its original (prune's narrowed up Linears) has no outputs to fit alone: the layer that
    reads them (the refit down Linear) is fitted instead."""
    theirs = dict(teacher.named_modules())
    paths = [p for p, m in student.named_modules() if p and p in theirs and m is not theirs[p]
             and type(m) is not type(theirs[p]) and any(q.is_floating_point() for q in m.parameters())
             and _same_width(m, theirs[p])]
    outer = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    return outer


def _same_width(mine: nn.Module, theirs: nn.Module) -> bool:
    """False only where both layers say how many outputs they have and the counts differ."""
    a, b = getattr(mine, "out_features", None), getattr(theirs, "out_features", None)
    return a is None or b is None or a == b


def fit_layers(student: nn.Module, teacher: nn.Module, paths: list[str], batches: list[tuple], spec: RecoverSpec, *,
               held_out: list[tuple] | None = None, masks: list | None = None, held_masks: list | None = None,
               seed: int = 0, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Layer-local recovery: fit each swapped layer, in forward order, to the original layer's outputs.

    Layer k sees the inputs the already-fitted layers before it produce (as GPTQ and SVD-LLM's update do),
    and is trained toward what the original layer made of the original inputs, so it also makes up for
    the error that reaches it. Only that layer runs forward and backward, on cached inputs; `held_out`
    batches pick its best state and stop it early. Returns the summed relative errors before and after."""
    paths = calibration.forward_order(student, paths, batches[0])
    total_before = total_after = 0.0
    for k, path in enumerate(paths):
        if progress:
            progress(f"fitting layer {k + 1}/{len(paths)}: {path}", k, len(paths))
        xs, ys = _layer_io(student, teacher, path, batches)
        hx, hy = _layer_io(student, teacher, path, held_out) if held_out else (None, None)
        stats = distill(student.get_submodule(path), None, xs, spec, targets=ys, held_out=hx, held_targets=hy,
                        seed=seed, masks=masks, held_masks=held_masks)
        total_before, total_after = total_before + stats["loss_before"], total_after + stats["loss_after"]
    return {"layers": len(paths), "loss_before": total_before, "loss_after": total_after}


def _layer_io(student: nn.Module, teacher: nn.Module, path: str, batches: list[tuple]) -> tuple[list, list]:
    """Per batch: the student layer's inputs (after the fitted prefix) and the teacher layer's outputs."""
    return [_first_call(student, path, b, "input") for b in batches], \
        [_first_call(teacher, path, b, "output") for b in batches]


def _first_call(model: nn.Module, path: str, batch: tuple, what: str) -> Any:
    """What the layer at `path` takes (its positional args) or gives at its first call on `batch`; the
    forward stops right there."""
    held: list = []

    def grab(module, args, output=None):
        held.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) if what == "input"
                    else tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output))
        raise _Stop

    layer = model.get_submodule(path)
    hook = layer.register_forward_pre_hook(grab) if what == "input" else layer.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(*batch)
    except _Stop:
        pass
    finally:
        hook.remove()
    if not held:
        raise RuntimeError(f"layer {path} was not called by the forward")
    return held[0]
