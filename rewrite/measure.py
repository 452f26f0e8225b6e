"""Measurements: paired latency (alternating rounds, a ratio with its interval, one backend at a time), size,
parameters, task metrics."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from rewrite import capture, timing
from rewrite.errors import RewriteError


def latency(fn: Callable[[], Any], *, warmup: int = 3, min_runs: int = 10, budget_s: float = 1.0,
            max_runs: int = 200) -> tuple[float, float, int]:
    """(p50 ms, p90 ms, runs) of one callable alone: for passes choosing a form, not for before/after claims."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        times.append(timing.once(fn))
    return (*timing.percentiles(times), len(times))


def torch_latency(module: nn.Module, inputs: tuple, **kw: Any) -> tuple[float, float, int]:
    return latency(lambda: _inference(module, inputs), **kw)


def best_times(candidates: dict[str, nn.Module], inputs: tuple, *, min_rounds: int = 5, budget_s: float = 0.3,
               max_rounds: int = 50) -> dict[str, float]:
    """Each candidate's fastest call (ms) over rounds that call every candidate in turn: for a pass choosing
    between forms of one layer. Taking turns puts each under the same machine load, and the minimum drops
    the rounds that load slowed (noise on a shared machine only adds time). Timing one candidate after the
    other instead made choices flip with the load: `pointwise` saw 0.6 ms and 32 ms for one layer shape."""
    calls = {name: (lambda m=m: _inference(m, inputs)) for name, m in candidates.items()}
    for call in calls.values():
        call()  # warm-up: first-call allocations and kernel selection
    best = dict.fromkeys(calls, math.inf)
    deadline, rounds = time.perf_counter() + budget_s, 0
    while rounds < min_rounds or (time.perf_counter() < deadline and rounds < max_rounds):
        for name, call in calls.items():
            best[name] = min(best[name], timing.once(call))
        rounds += 1
    return best


@dataclass(frozen=True)
class Speed:
    """Original time / rewritten time on one backend (> 1: the rewrite is faster), with a 95% interval."""

    backend: str
    ratio: float
    low: float
    high: float
    rounds: int

    @property
    def word(self) -> str:
        if self.low > 1 and self.ratio >= 1 + NEGLIGIBLE:
            return "faster"
        if self.high < 1 and self.ratio <= 1 - NEGLIGIBLE:
            return "SLOWER"
        return "no measurable difference"


NEGLIGIBLE = 0.03  # a confident 1% change is noise in practice: report it as no difference


@dataclass(frozen=True)
class Timed:
    """Both models timed on one backend: p50/p90 of single calls and the paired speed ratio."""

    original: tuple[float, float, int]  # p50 ms, p90 ms, calls
    rewritten: tuple[float, float, int]
    speed: Speed


def compare_torch(original: nn.Module, rewritten: nn.Module, inputs: tuple, budget_s: float = 2.0,
                  min_rounds: int = 10) -> Timed:
    """Both modules called in alternating rounds in this process (eager torch)."""
    def caller(module: nn.Module) -> Callable[[], Any]:
        return lambda: _inference(module, inputs)
    return _timed("torch", *timing.paired_rounds(caller(original), caller(rewritten), budget_s=budget_s,
                                                 min_rounds=min_rounds))


PROMPT_TOKENS, NEW_TOKENS, DECODE_PROMPT = 512, 64, 8


def generates(model: nn.Module) -> bool:
    """A causal LM with generate() and a KV cache (a Hugging Face decoder in its own class, GPT-2's included)."""
    return callable(getattr(model, "generate", None)) and causal_lm(model)


def causal_lm(model: nn.Module) -> bool:
    """A decoder language model: a class named …ForCausalLM, or one that generates and is not an encoder-decoder
    (GPT-2's …LMHeadModel)."""
    can_generate = getattr(model, "can_generate", None)
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return type(model).__name__.endswith("ForCausalLM") or (callable(can_generate) and can_generate()
                                                            and not encoder_decoder)


def compare_generation(original: nn.Module, rewritten: nn.Module, budget_s: float = 2.0) -> dict[str, Any]:
    """Prefill of a 512-token prompt, and decoding 64 new tokens after 8 with the KV cache (greedy; fewer where
    the context is shorter), both models in alternating rounds (eager torch). Returns the paired Speeds and
    each model's prefill ms and tokens/s."""
    context = context_length(original.config)
    new_tokens = max(1, min(NEW_TOKENS, context - DECODE_PROMPT))  # learned positions (GPT-2) end at the context
    prompt_len = max(DECODE_PROMPT, min(PROMPT_TOKENS, context - new_tokens))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, original.config.vocab_size, (1, prompt_len), generator=gen)
    short = prompt[:, :DECODE_PROMPT]

    def prefill(m: nn.Module) -> Callable[[], Any]:
        return lambda: _inference_kw(m, prompt, use_cache=True)

    def decode(m: nn.Module) -> Callable[[], Any]:
        return lambda: m.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, pad_token_id=0)
    result: dict[str, Any] = {"prompt_tokens": prompt_len, "new_tokens": new_tokens}
    for kind, make in (("prefill", prefill), ("decode", decode)):
        first, second, calls = timing.paired_rounds(make(original), make(rewritten), budget_s=budget_s,
                                                    min_rounds=5)
        timed = _timed(f"torch {kind}", first, second, calls)
        result[kind] = timed
    result["prefill_ms"] = [result["prefill"].original[0], result["prefill"].rewritten[0]]
    result["decode_tokens_per_s"] = [1e3 * new_tokens / result["decode"].original[0],
                                     1e3 * new_tokens / result["decode"].rewritten[0]]
    return result


CONTEXT_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config: Any) -> int:
    """The longest sequence a config allows, under the names model families give it (MPT: max_seq_len;
    GPT-2: n_positions), or the prompt and new tokens where it names none."""
    for name in CONTEXT_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return PROMPT_TOKENS + NEW_TOKENS


def _inference_kw(module: nn.Module, ids: torch.Tensor, **kwargs: Any) -> None:
    with torch.inference_mode():
        module(ids, **kwargs)


def _inference(module: nn.Module, inputs: tuple) -> None:
    with torch.inference_mode():
        module(*inputs)


def compare_onnx(original: Path, rewritten: Path, inputs: tuple, budget_s: float = 2.0, min_rounds: int = 10
                 ) -> Timed:
    """Both ONNX files in onnxruntime, in a worker process where torch's threads cannot spin beside it."""
    with tempfile.TemporaryDirectory() as tmp:
        feeds = Path(tmp) / "feeds.npz"
        tensors = [x.detach().cpu().numpy() for x in inputs if isinstance(x, torch.Tensor)]
        np.savez(feeds, **{f"x{i}": t for i, t in enumerate(tensors)})
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        proc = subprocess.run([sys.executable, timing.__file__, str(original), str(rewritten), str(feeds),
                               str(budget_s), str(min_rounds)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RewriteError(f"onnxruntime timing failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    data = json.loads(proc.stdout)
    return _timed("onnxruntime", *data["rounds"], data["calls"])


def _timed(backend: str, first: list[float], second: list[float], calls: list[list[float]]) -> Timed:
    ratio, low, high = timing.median_ci([a / b for a, b in zip(first, second)])
    stats = [(*timing.percentiles(c), len(c)) for c in calls]
    return Timed(stats[0], stats[1], Speed(backend, ratio, low, high, len(first)))


def param_count(module: nn.Module) -> int:
    """Numbers held as weights: parameters (a complex one counts twice, as it is stored) and weight buffers
    (a quantized layer's codes and scales; two 4-bit codes packed in a byte count as one)."""
    tensors = [*module.parameters(), *capture.weight_buffers(module)]
    return sum(t.numel() * (2 if t.is_complex() else 1) for t in tensors)


def weight_bytes(module: nn.Module) -> int:
    """Bytes those weights take in memory, each storage once (tied weights share one)."""
    tensors = [*module.parameters(), *capture.weight_buffers(module)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())


def flops(module: nn.Module, inputs: tuple) -> int:
    """FLOPs of one call as torch's flop counter sees them (matmuls and convolutions; 0 if it cannot run)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            module(*inputs)
    except Exception:
        return 0
    return counter.get_total_flops()


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


def rel_l2(outputs: list[Any], targets: list[Any], masks: list | None = None) -> float:
    """Mean relative L2 error per sample (lower is better); padded positions left out (`_unpadded`)."""
    errs = []
    for i, (out, tgt) in enumerate(zip(outputs, targets)):
        o, t = _unpadded(_first(out), _first(tgt), masks[i] if masks else None)
        errs.append((o - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12))
    return float(torch.cat(errs).mean())


def _unpadded(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as (samples, values), zero at the positions a (batch, seq) padding mask excludes, where the outputs
    are per position (an encoder's hidden states): what the model computes there is discarded by its users,
    and verification leaves it out too."""
    if mask is not None and per_position(out, mask):
        keep = (mask != 0).reshape(*mask.shape, *[1] * (out.dim() - 2))
        out, target = out * keep, target * keep
    return out.reshape(out.shape[0], -1), target.reshape(target.shape[0], -1)


def top1(outputs: list[Any], targets: list[Any], masks: list | None = None) -> float:
    """Fraction of samples whose arg-max over the last axis equals the integer target."""
    hits = [(_first(o).argmax(-1) == _first(t).long()).float().flatten() for o, t in zip(outputs, targets)]
    return float(torch.cat(hits).mean())


def cosine(outputs: list[Any], targets: list[Any], masks: list | None = None) -> float:
    """Mean cosine similarity per sample between outputs and targets (e.g. reference embeddings), each sample's
    values taken as one vector (an encoder's: all its hidden states at once); padded positions left out
    (`_unpadded`). `embedding_cosine` compares each sequence's mean instead."""
    sims = []
    for i, (out, tgt) in enumerate(zip(outputs, targets)):
        sims.append(torch.nn.functional.cosine_similarity(*_unpadded(_first(out), _first(tgt),
                                                                     masks[i] if masks else None)))
    return float(torch.cat(sims).mean())


def embedding_cosine(outputs: list[Any], targets: list[Any], masks: list | None = None) -> float:
    """Mean cosine similarity per sample between sentence embeddings: an output per position (batch, seq,
    features) is averaged over the positions its padding mask keeps first (mean pooling, as
    sentence-transformers embeds a sentence with all-MiniLM-L6-v2); other outputs are compared as they are.
    Errors that differ from token to token partly cancel in the mean, so this reads higher than `cosine`
    on the same hidden states; it is the number a user of the embeddings sees."""
    sims = []
    for i, (out, tgt) in enumerate(zip(outputs, targets)):
        mask = masks[i] if masks else None
        o, t = (mean_pooled(_first(x), mask) for x in (out, tgt))
        sims.append(torch.nn.functional.cosine_similarity(o.reshape(len(o), -1), t.reshape(len(t), -1)))
    return float(torch.cat(sims).mean())


def mean_pooled(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A (batch, seq, features) output's mean over the positions the mask keeps (all positions without one):
    one vector per sequence, what a sentence embedding is made of; other outputs as they are."""
    if x.dim() != 3:
        return x
    keep = mask != 0 if mask is not None and per_position(x, mask) else torch.ones(x.shape[:2])
    weights = keep.float()[..., None]
    return (x.float() * weights).sum(1) / weights.sum(1).clamp_min(1)


def per_position(t: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether `t`'s leading dims are the (batch, seq) padding mask's: the one masking rule, which
    verification, recovery and the metrics share."""
    return t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape)


def perplexity(outputs: list[Any], targets: list[Any], masks: list | None = None) -> float:
    """exp(mean next-token negative log-likelihood): logits (batch, n, vocab) at position i score token i+1
    of the target ids (batch, n); targets of -100 (padding) are left out (lower is better)."""
    total, count = 0.0, 0
    for out, tgt in zip(outputs, targets):
        logits, ids = _first(out), _first(tgt).long()
        if logits.dim() != 3 or ids.dim() != 2:
            raise RewriteError(f"perplexity needs logits (batch, n, vocab) and token ids (batch, n); got "
                               f"{tuple(logits.shape)} and {tuple(ids.shape)}")
        if int(ids.max()) >= logits.shape[-1]:
            raise RewriteError(f"perplexity needs logits over the vocabulary, but the model's output has "
                               f"{logits.shape[-1]} values per position for token ids up to {int(ids.max())} (a "
                               "model without a language-model head, e.g. an encoder): score it with --eval FILE "
                               "--metric cosine against its original outputs")
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                ignore_index=-100, reduction="sum")
        total, count = total + float(nll), count + int((ids[:, 1:] != -100).sum())
    return math.exp(total / max(count, 1))


# metric(outputs, targets, padding masks or None) → score; perplexity's padding is its -100 targets, top1's none
METRICS: dict[str, Callable[..., float]] = {"rel-l2": rel_l2, "top1": top1, "cosine": cosine,
                                            "embedding-cosine": embedding_cosine, "perplexity": perplexity}
HIGHER_IS_BETTER = {"rel-l2": False, "top1": True, "cosine": True, "embedding-cosine": True, "perplexity": False}


def meets(metric: str | None, score: float, floor: float) -> bool:
    """Whether a task-metric score is on the right side of a floor (rel-l2 is lower-is-better)."""
    return score >= floor if HIGHER_IS_BETTER.get(metric or "", True) else score <= floor


def evaluator(name: str, batches: list[tuple], targets: list[Any], masks: list | None = None
              ) -> Callable[[nn.Module], float]:
    """module → its score on the eval data (masks: each batch's padding mask, or None)."""
    score = metric_fn(name)

    def evaluate(module: nn.Module) -> float:
        with torch.no_grad():
            return score([module(*b) for b in batches], targets, masks)
    return evaluate


def metric_fn(name: str) -> Callable[[list[Any], list[Any]], float]:
    if name not in METRICS:
        raise RewriteError(f"unknown metric {name!r}: choose one of {', '.join(METRICS)}")
    return METRICS[name]


PROFILE_TOP = 8  # ops listed per profile


def profile_torch(module: nn.Module, inputs: tuple, runs: int = 5) -> list[tuple[str, float, float]]:
    """Where eager torch spends the time: (op, self ms per call, share of the total), top ops first."""
    from torch.profiler import ProfilerActivity, profile
    _inference(module, inputs)  # warm-up outside the profile
    with _silent_fds(), profile(activities=[ProfilerActivity.CPU]) as prof:  # kineto logs start/stop on the fds
        for _ in range(runs):
            _inference(module, inputs)
    events = [(e.key, e.self_cpu_time_total / 1000 / runs) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return _top(events)


@contextlib.contextmanager
def _silent_fds():
    """stdout and stderr to /dev/null at the file-descriptor level (C++ logging bypasses sys.stderr)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def profile_onnx(path: str | Path, inputs: tuple, runs: int = 5) -> list[tuple[str, float, float]]:
    """Where onnxruntime spends the time: (op type, ms per run, share), from its own node profile."""
    import onnxruntime as ort

    from rewrite import ort as ort_helpers
    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = ort_helpers.feed(sess, inputs)
        sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for event in trace:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and "op_name" in args:
            by_op[args["op_name"]] = by_op.get(args["op_name"], 0.0) + event.get("dur", 0) / 1000 / (runs + 1)
    return _top(list(by_op.items()))


def _top(events: list[tuple[str, float]]) -> list[tuple[str, float, float]]:
    total = sum(ms for _, ms in events) or 1.0
    ranked = sorted(events, key=lambda e: e[1], reverse=True)[:PROFILE_TOP]
    return [(name, round(ms, 3), round(ms / total, 3)) for name, ms in ranked]


def free_memory() -> int | None:
    """Bytes the kernel can give without swapping (MemAvailable), or None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
