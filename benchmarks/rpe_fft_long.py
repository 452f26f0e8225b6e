"""rpe-fft at long sequences: time and peak memory against exact attention with a relative-position bias.

8 heads, head dim 64, batch 1, a T5-style bias (one value per head and offset). Methods:
- exact: softmax(q·kᵀ/8 + B)·v with the n×n bias materialized (what a model with a float bias runs),
- sdpa+bias: torch's scaled_dot_product_attention with the bias as a float attn_mask (also n×n),
- sdpa (no bias): the cost floor of exact attention (flash-style, O(n) memory, but it drops the bias),
- rpe-fft m=32 / m=64: the rewrite's kernelized attention (`RPEFFTAttention`), no n×n tensor.
Time: each rpe-fft row against each exact method in alternating rounds in this process (ratio = exact
time / rpe-fft time, > 1: the rewrite is faster; the spread of the per-round ratios beside it). Peak
memory: one call in a fresh process each, inputs and any materialized bias included (VmHWM, minus the
process's resident size with torch loaded).
Configurations whose estimated memory exceeds --budget-gib are not run and say so.

Run: python benchmarks/rpe_fft_long.py [--lengths 1024,4096,16384,65536] [--budget-gib 16]
"""
import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

import torch  # noqa: E402

from rewrite.passes.rpe_fft.kernel import RPEFFTAttention, ToeplitzBias, toeplitz_dense  # noqa: E402

H, D = 8, 64


def t5_bias(n: int) -> torch.Tensor:
    """b_t per head: log-spaced buckets of |t| up to 128, then flat (T5's shape), learned-scale values."""
    t = torch.arange(-(n - 1), n).abs().float()
    bucket = torch.where(t < 8, t, 8 + torch.log(t.clamp_min(1) / 8) / math.log(128 / 8) * 8).clamp(max=15)
    return -0.3 * bucket[None, :] * torch.linspace(0.5, 1.5, H)[:, None]


def make(method: str, n: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(1, H, n, D, generator=gen) for _ in range(3))
    if method.startswith("rpe-fft"):
        attention = RPEFFTAttention(ToeplitzBias(t5_bias(n), "flat"), D, 1 / 8, features=int(method.split("m=")[1]))
        return lambda: attention(q, k, v)
    if method == "sdpa (no bias)":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    bias = toeplitz_dense(t5_bias(n), n)[None]  # (1, H, n, n): materialized once, as a model holds it
    if method == "sdpa+bias":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return lambda: ((q @ k.transpose(-1, -2)) / 8 + bias).softmax(-1) @ v


def estimated_gib(method: str, n: int) -> float:
    if method.startswith("rpe-fft") or method == "sdpa (no bias)":
        return 2 * 4 * H * n * D * 8 / 2 ** 30 + 0.5  # inputs, features and one FFT batch (bounded by chunking)
    return (3 if method == "exact" else 2) * 4 * H * n * n / 2 ** 30  # bias + scores (+ softmax)


def _status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmHWM: this process's peak RSS; unlike ru_maxrss it does not carry
    the parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(method: str, n: int) -> str:
    """Peak resident memory of one call, in a fresh process: VmHWM minus the RSS with torch loaded."""
    code = (f"import sys, json, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "torch.set_num_threads(2); import rpe_fft_long as b; "
            "before = b._status_kib('VmRSS'); "
            f"call = b.make({method!r}, {n}); torch.set_grad_enabled(False); call(); "
            "print(json.dumps((b._status_kib('VmHWM') - before) / 2**20))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        return f"failed ({proc.stderr.strip().splitlines()[-1][:60]})"
    return f"{float(proc.stdout.strip().splitlines()[-1]):.2f} GiB"


def paired(first, second, rounds: int) -> tuple[float, float, float, float]:
    """(median ms of first, of second, median ratio first/second, spread of ratios) in alternating rounds."""
    with torch.inference_mode():
        times: tuple[list[float], list[float]] = ([], [])
        for r in range(rounds):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                (first, second)[which]()
                times[which].append((time.perf_counter() - start) * 1e3)
    ratios = [a / b for a, b in zip(*times)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios), max(ratios) - min(ratios)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,4096,16384,65536")
    parser.add_argument("--budget-gib", type=float, default=16.0)
    parser.add_argument("--memory-only", action="store_true", help="the peak-memory table alone")
    args = parser.parse_args()
    torch.set_num_threads(2)
    exact_methods = ["exact", "sdpa+bias", "sdpa (no bias)"]
    ours = ["rpe-fft m=32", "rpe-fft m=64"]
    timing = [["n", "rpe-fft", "vs", "exact ms", "rpe-fft ms", "speed-up (rounds, ratio spread)"]]
    memory = [["n", "method", "peak memory (fresh process)"]]
    for n in (int(x) for x in args.lengths.split(",")):
        rounds = 3 if n <= 4096 else 1
        for method in exact_methods + ours:
            fits = estimated_gib(method, n) <= args.budget_gib
            memory.append([str(n), method, peak_memory(method, n) if fits else
                           f"not run: needs ≈{estimated_gib(method, n):.0f} GiB (> {args.budget_gib:g} GiB budget)"])
            print(table([memory[0], memory[-1]]).splitlines()[-1], flush=True)
        for mine in ([] if args.memory_only else ours):
            candidate = make(mine, n)
            candidate()  # warm-up (plans, caches)
            for exact in exact_methods:
                if estimated_gib(exact, n) > args.budget_gib:
                    timing.append([str(n), mine, exact, "does not fit", "-", "runs only as rpe-fft"])
                    continue
                a, b, ratio, spread = paired(make(exact, n), candidate, rounds)
                timing.append([str(n), mine, exact, f"{a:,.0f}", f"{b:,.0f}", f"{ratio:.2f}x ({rounds}, ±{spread / 2:.2f})"])
                print(table([timing[0], timing[-1]]).splitlines()[-1], flush=True)
    print(f"\n## rpe-fft vs exact attention with a bias (8 heads, d 64, batch 1, 2 threads)\n\n{table(timing)}")
    print(f"\n## peak memory of one call\n\n{table(memory)}")


if __name__ == "__main__":
    main()
