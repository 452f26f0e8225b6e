"""Shared by the benchmarks: quiet threads, side-by-side timing, a ratio table."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch
from _table import table  # noqa: F401  (re-exported: the benchmarks import it from here)

from rewrite.measure import latency, torch_latency

torch.set_num_threads(2)


def time_torch(module, inputs, budget_s: float = 2.0) -> float:
    return torch_latency(module, inputs, warmup=2, min_runs=3, budget_s=budget_s, max_runs=100)[0]


def time_round_robin(models: dict, inputs, rounds: int = 3, budget_s: float = 1.0) -> dict:
    """p50 latency per model, measured in turns (A, B, C, A, B, C, …) and the best round kept, so that a
    noisy moment on this shared machine does not land on one model only."""
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, module in models.items():
            best[name] = min(best[name], time_torch(module, inputs, budget_s))
    return best


def time_ort(path, inputs, budget_s: float = 2.0) -> float:
    from rewrite.emit import onnx as onnx_emit
    sess = onnx_emit.session(path)
    feed = onnx_emit.feed(sess, inputs)
    return latency(lambda: sess.run(None, feed), warmup=2, min_runs=3, budget_s=budget_s, max_runs=100)[0]
