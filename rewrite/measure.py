"""Measurements: latency (warm-up, repeats, p50/p90, one backend at a time), size, parameters, task metrics."""
from __future__ import annotations

import io
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from rewrite.errors import RewriteError


def latency(fn: Callable[[], Any], *, warmup: int = 3, min_runs: int = 10, budget_s: float = 1.0,
            max_runs: int = 200) -> tuple[float, float, int]:
    """(p50 ms, p90 ms, runs) of `fn()`: warm-up calls, then repeats until `budget_s` or `max_runs`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))], len(times)


def torch_latency(module: nn.Module, inputs: tuple, **kw: Any) -> tuple[float, float, int]:
    def call() -> None:
        with torch.inference_mode():
            module(*inputs)
    return latency(call, **kw)


def param_count(module: nn.Module) -> int:
    """Real numbers held in parameters (a complex parameter counts twice, as it is stored)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in module.parameters())


def state_size(module: nn.Module) -> int:
    """Bytes of the serialized state_dict (parameters and buffers, as stored)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


# --- task metrics: metric(outputs, targets) -> float ----------------------------------------------

def _first(outputs: Any) -> torch.Tensor:
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise RewriteError("the model returned no tensor to score")
    return leaves[0].detach().float()


def rel_l2(outputs: list[Any], targets: list[Any]) -> float:
    """Mean relative L2 error per sample (lower is better)."""
    errs = []
    for out, tgt in zip(outputs, targets):
        o, t = _first(out), _first(tgt)
        o, t = o.reshape(o.shape[0], -1), t.reshape(t.shape[0], -1)
        errs.append((o - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12))
    return float(torch.cat(errs).mean())


def top1(outputs: list[Any], targets: list[Any]) -> float:
    """Fraction of samples whose arg-max over the last axis equals the integer target."""
    hits = [(_first(o).argmax(-1) == _first(t).long()).float().flatten() for o, t in zip(outputs, targets)]
    return float(torch.cat(hits).mean())


def cosine(outputs: list[Any], targets: list[Any]) -> float:
    """Mean cosine similarity per sample between outputs and targets (e.g. reference embeddings)."""
    sims = []
    for out, tgt in zip(outputs, targets):
        o, t = _first(out), _first(tgt)
        sims.append(torch.nn.functional.cosine_similarity(o.reshape(o.shape[0], -1), t.reshape(t.shape[0], -1)))
    return float(torch.cat(sims).mean())


METRICS: dict[str, Callable[[list[Any], list[Any]], float]] = {"rel-l2": rel_l2, "top1": top1, "cosine": cosine}
HIGHER_IS_BETTER = {"rel-l2": False, "top1": True, "cosine": True}


def evaluator(name: str, batches: list[tuple], targets: list[Any]) -> Callable[[nn.Module], float]:
    """module → its score on the eval data."""
    score = metric_fn(name)

    def evaluate(module: nn.Module) -> float:
        with torch.no_grad():
            return score([module(*b) for b in batches], targets)
    return evaluate


def metric_fn(name: str) -> Callable[[list[Any], list[Any]], float]:
    if name not in METRICS:
        raise RewriteError(f"unknown metric {name!r}: choose one of {', '.join(METRICS)}")
    return METRICS[name]
