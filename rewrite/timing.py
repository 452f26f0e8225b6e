"""Paired latency: two callables timed in alternating rounds, so background load lands on both alike.

Pure standard library, because this file is also the onnxruntime timing worker: run as a script
(`python timing.py ORIGINAL.onnx REWRITTEN.onnx FEEDS.npz BUDGET_S MIN_ROUNDS`) it times two ONNX models in a process of
its own, where no torch thread pool can spin beside onnxruntime's (one backend at a time), and
prints the per-round times as JSON.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from typing import Any, Callable

ROUND_MS = 20.0  # each model's share of a round: long enough that timer noise is small


def paired_rounds(first: Callable[[], Any], second: Callable[[], Any], *, budget_s: float = 2.0,
                  min_rounds: int = 10, max_rounds: int = 60) -> tuple[list[float], list[float], list[float]]:
    """(per-round median ms of `first`, of `second`, [every call's ms of first, of second]).

    Per-round medians feed the paired ratio; the single calls feed p50/p90.
    """
    first(), second()  # warm-up: allocator, caches, lazy init
    # a second warm-up, timed to size the rounds (a 512-token SmolLM2 forward takes 3 s on a 2-core AVX2 CPU:
    # every call not needed is seconds)
    sized = (once(first), once(second))
    repeats = max(1, min(50, math.ceil(ROUND_MS / max(*sized, 1e-3))))
    rounds: tuple[list[float], list[float]] = ([], [])
    calls: tuple[list[float], list[float]] = ([], [])
    if repeats == 1:  # calls longer than a round's share: the sizing calls are the first round (SmolLM2's
        for which in (0, 1):  # 64-token decode takes 5 s a call, and its rounds are pairs of single calls)
            rounds[which].append(sized[which])
            calls[which].append(sized[which])
    deadline = time.perf_counter() + budget_s
    while len(rounds[0]) < min_rounds or (time.perf_counter() < deadline and len(rounds[0]) < max_rounds):
        order = (0, 1) if len(rounds[0]) % 2 == 0 else (1, 0)  # alternate who goes first
        for which in order:
            times = [once((first, second)[which]) for _ in range(repeats)]
            rounds[which].append(statistics.median(times))
            calls[which].extend(times)
    return rounds[0], rounds[1], [calls[0], calls[1]]


def once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): a distribution-free confidence interval from order statistics (sign test)."""
    data = sorted(values)
    n = len(data)
    alpha = (1 - confidence) / 2
    k, tail = 0, 0.0
    while k < n // 2 and tail + math.comb(n, k) / 2 ** n <= alpha:  # P(Binomial(n, 1/2) ≤ k - 1) ≤ alpha
        tail += math.comb(n, k) / 2 ** n
        k += 1
    low, high = data[max(k - 1, 0)], data[min(n - k, n - 1)]
    return statistics.median(data), low, high


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _ort_session(path: str):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _time_onnx(original: str, rewritten: str, feeds_path: str, budget_s: float, min_rounds: int) -> dict[str, Any]:
    import numpy as np
    arrays = np.load(feeds_path)
    sessions = [_ort_session(original), _ort_session(rewritten)]
    feeds = [{i.name: arrays[f"x{k}"] for k, i in enumerate(s.get_inputs())} for s in sessions]
    first, second, calls = paired_rounds(lambda: sessions[0].run(None, feeds[0]),
                                         lambda: sessions[1].run(None, feeds[1]), budget_s=budget_s,
                                         min_rounds=min_rounds)
    return {"rounds": [first, second], "calls": calls}


if __name__ == "__main__":
    print(json.dumps(_time_onnx(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))))
