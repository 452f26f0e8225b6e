"""User data → bounded, seeded lists of input batches (each a tuple of positional inputs).

Accepted structures, from a `torch.save` file or from Python:
a tensor (one batch, one input); a tuple (one batch of positional inputs); a dict (one batch of named
inputs, bound to the model's forward signature); a list of any of those (several batches); any other
iterable such as a DataLoader (several batches); or {"inputs": <any of those>, "targets": [...]}.
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from rewrite.capture import bind_positional
from rewrite.errors import RewriteError, first_line
from rewrite.patterns import mutates, single_calls

MAX_BATCHES = 8


@dataclass
class Data:
    batches: list[tuple]
    targets: list[Any] | None = None
    synthetic: bool = False


def load_file(path: str | Path, what: str) -> Any:
    """torch.load with weights_only=True (no code runs), with one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise RewriteError(f"{what} file {str(path)!r} is a folder: give the path of a file saved with torch.save")
    if not path.is_file():
        raise RewriteError(f"{what} file {str(path)!r} not found: give the path of a file saved with torch.save")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise RewriteError(f"{what} file {str(path)!r} is not readable tensor data ({first_line(exc, 120)}); "
                           "save tensors, tuples, dicts or lists of them with torch.save") from exc


def from_user(data: Any, model: nn.Module, what: str, max_batches: int = MAX_BATCHES) -> Data:
    """Normalize any accepted structure into batches of positional inputs, checked for NaN/inf."""
    check_count(max_batches, f"the number of {what} batches")
    targets = None
    if isinstance(data, Mapping) and set(data) == {"inputs", "targets"}:
        data, targets = data["inputs"], _as_list(data["targets"])
    batches = [as_args(b, model, what) for b in itertools.islice(_batches(data, what), max_batches)]
    if not batches:
        raise RewriteError(f"{what} data is empty: give at least one batch")
    for i, batch in enumerate(batches):
        check_finite(batch, f"{what} batch {i}")
        check_token_ids(batch, model, f"{what} batch {i}")
    if targets is not None:
        _check_targets(batches, targets, data, what)
    return Data(batches, targets[:len(batches)] if targets is not None else None)


def check_count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RewriteError(f"{what} is {value!r}: give a whole number ≥ 1")


def _check_targets(batches: list[tuple], targets: list[Any], data: Any, what: str) -> None:
    """One target per batch, with as many samples as its batch (a tired user's off-by-one is caught here)."""
    count = len(data) if isinstance(data, list) else len(batches)
    if len(targets) != count:
        raise RewriteError(f"{what} data has {count} input batch(es) but {len(targets)} target batch(es): "
                           "give one target per input batch")
    for i, (batch, target) in enumerate(zip(batches, targets)):
        x, t = _first_tensor(batch), _first_tensor(target)
        if x is not None and t is not None and x.dim() and t.dim() and x.shape[0] != t.shape[0]:
            raise RewriteError(f"{what} batch {i} has {x.shape[0]} samples but its targets have {t.shape[0]}: "
                               "inputs and targets must line up")


def _first_tensor(x: Any) -> torch.Tensor | None:
    return next((t for t in tree_leaves(x) if isinstance(t, torch.Tensor)), None)


def synthetic(example_inputs: tuple, seed: int, count: int = 4) -> Data:
    """The example inputs plus seeded noise-perturbed copies of their float tensors."""
    gen = torch.Generator().manual_seed(seed)
    batches = [tuple(example_inputs)]
    for _ in range(count - 1):
        batches.append(tuple(_jitter(x, gen) for x in example_inputs))
    return Data(batches, synthetic=True)


def _jitter(x: Any, gen: torch.Generator) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        scale = x.std() if x.numel() > 1 else torch.tensor(1.0)
        return x + 0.1 * scale * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


def _batches(data: Any, what: str):
    if isinstance(data, (torch.Tensor, tuple, Mapping)):
        return [data]
    if isinstance(data, list):
        return data
    if hasattr(data, "__iter__") and not isinstance(data, (str, bytes)):
        return data
    raise RewriteError(f"{what} data has the wrong structure ({type(data).__name__}): "
                       "give a tensor, a tuple or dict of tensors, or a list of those")


def as_args(batch: Any, model: nn.Module, what: str = "input") -> tuple:
    """One batch → a tuple of positional inputs for `model`."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(_is_input(x) for x in batch):
        return tuple(batch)
    if isinstance(batch, Mapping) and all(isinstance(k, str) for k in batch):  # dicts, tokenizers' BatchEncoding
        return _bind(batch, model, what)
    raise RewriteError(f"{what} batch has the wrong structure ({_shape_of(batch)}): "
                       "each batch must be a tensor, a tuple of tensors or a dict of named tensors")


def _is_input(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, int, float, bool)) or x is None


def _bind(batch: Mapping, model: nn.Module, what: str) -> tuple:
    try:
        return bind_positional(inspect.signature(model.forward), (), dict(batch))
    except TypeError as exc:
        raise RewriteError(f"{what} batch keys {sorted(batch)} do not match the model's forward(): {exc}") from exc


def check_token_ids(batch: tuple, model: nn.Module, where: str) -> None:
    """A Hugging Face model's first input indexes its embedding table: every id must be one of its rows (a
    foreign tokenizer's ids are not), or the first forward dies with a bare IndexError."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        table = get() if callable(get) else None
    except Exception:  # a model without embeddings says so by raising NotImplementedError
        return
    ids = batch[0] if batch else None
    if not (isinstance(table, nn.Embedding) and isinstance(ids, torch.Tensor) and ids.numel()
            and not ids.is_floating_point() and ids.dtype != torch.bool):
        return
    low, high, rows = int(ids.min()), int(ids.max()), table.num_embeddings
    if low < 0 or high >= rows:
        raise RewriteError(f"{where} holds token id {low if low < 0 else high}, outside the model's vocabulary "
                           f"(ids 0–{rows - 1}): tokenize with the model's own tokenizer")


def check_finite(batch: tuple, where: str) -> None:
    for x in tree_leaves(batch):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise RewriteError(f"{where} contains NaN or inf: clean or drop those samples before calibrating")


def _as_list(targets: Any) -> list[Any]:
    return list(targets) if isinstance(targets, (list, tuple)) else [targets]


def _shape_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of {', '.join(_shape_of(v) for v in x[:4])}"
    return type(x).__name__


MASK_NAMES = ("attention_mask", "padding_mask", "mask")


def mask_index(model: nn.Module, name: str | None = None) -> int | None:
    """The position of the padding-mask input in the forward signature: `name`, or a usual name."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    if name is not None:
        if name not in params:
            raise RewriteError(f"the model's forward() has no input {name!r} to use as the mask; its inputs: "
                               f"{', '.join(params)}")
        return params.index(name)
    return next((params.index(n) for n in MASK_NAMES if n in params), None)


def masks(batches: list[tuple], index: int | None) -> list[torch.Tensor | None] | None:
    """Each batch's (batch, seq) 0/1 mask at `index`, or None when there is none to apply."""
    if index is None:
        return None
    found = [b[index] if index < len(b) and isinstance(b[index], torch.Tensor) and b[index].dim() == 2 else None
             for b in batches]
    return found if any(m is not None for m in found) else None


def describe(batches: list[tuple]) -> str:
    first = batches[0]
    shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else repr(x) for x in first)
    return f"{len(batches)} batch(es) of ({shapes})"


def forward_order(model: nn.Module, paths: list[str], batch: tuple) -> list[str]:
    """`paths` in the order one forward first calls them (those never called are left out)."""
    seen: list[str] = []
    run_hooked(model, [batch], [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, _a, p=p: seen.append(p) if p not in seen else None) for p in paths])
    return seen


def layer_values(module: nn.Module, paths: list[str], batches: list[tuple],
                 outputs: tuple[str, ...] = ()) -> dict[str, list[torch.Tensor]]:
    """What each layer at `paths` receives (its first positional input), or returns for the paths also
    listed in `outputs`, once per call, in one run of `module` over `batches` (hooks; no gradients)."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}

    def record(path: str):
        def hook(_module, args, *result):
            seen[path].append((result[0] if path in outputs else args[0]).detach())  # None: args unchanged
        return hook

    layers = [module.get_submodule(p) for p in paths]
    run_hooked(module, batches, [layer.register_forward_hook(record(p)) if p in outputs
                                  else layer.register_forward_pre_hook(record(p)) for p, layer in zip(paths, layers)])
    return seen


class _Enough(Exception):
    """Raised by a hook once a run has given everything asked of it: the rest of the forward is skipped."""


def run_hooked(module: nn.Module, batches: list[tuple], hooks: list) -> None:
    """Run `module` over `batches` without gradients, then remove `hooks` (also when the run fails). A hook
    may end a batch's run early by raising `_Enough`."""
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    module(*batch)
                except _Enough:
                    pass
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class InputStats:
    """What a layer's inputs look like per channel (last axis), over every token seen, and a sample of
    whole tokens (rows) for statistics across channels (a per-token scale's error)."""

    peak: torch.Tensor  # max |x|
    mean_abs: torch.Tensor  # mean |x|
    mean_square: torch.Tensor  # mean x², the diagonal of xᵀx / tokens
    rows: torch.Tensor  # (≤ sample_rows, channels): the first tokens seen


def input_stats(module: nn.Module, paths: list[str], batches: list[tuple], sample_rows: int = 512
                ) -> dict[str, InputStats]:
    """`InputStats` of each layer at `paths`, over all batches, in one run. In a graph that calls each of
    them once, a batch's run stops at the last of them (an LLM's head is never run)."""
    sums: dict[str, list] = {}
    once, seen = _each_called_once(module, paths), set()

    def record(path: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            parts = (x.abs().amax(0), x.abs().sum(0), x.square().sum(0), x.shape[0], x[:sample_rows])
            if path in sums:
                old = sums[path]
                parts = (torch.maximum(old[0], parts[0]), old[1] + parts[1], old[2] + parts[2], old[3] + parts[3],
                         torch.cat([old[4], x[:sample_rows - len(old[4])]]))
            sums[path] = list(parts)
            seen.add(path)
            if once and len(seen) == len(paths):
                seen.clear()
                raise _Enough
        return hook

    run_hooked(module, batches, [module.get_submodule(p).register_forward_pre_hook(record(p)) for p in paths])
    return {p: InputStats(peak, total_abs / n, total_square / n, rows)
            for p, (peak, total_abs, total_square, n, rows) in sums.items()}


def _each_called_once(module: nn.Module, paths: list[str]) -> bool:
    calls = single_calls(module, paths)
    return calls is not None and len(calls) == len(set(paths))


def first_tokens(batches: list[tuple], tokens: int) -> list[tuple]:
    """The first batches, whole, until they hold `tokens` tokens (rows of the first input: batch × sequence):
    what a per-layer statistic needs, so that more calibration text does not cost more forwards."""
    taken, rows = [], 0
    for batch in batches:
        if taken and rows >= tokens:
            break
        taken.append(batch)
        first = next((t for t in batch if isinstance(t, torch.Tensor)), None)
        rows += first.shape[:2].numel() if first is not None and first.dim() >= 2 else 1
    return taken


def sequential_inputs(module: nn.Module, paths: list[str], batches: list[tuple]):
    """Yield (path, inputs over `batches`) for each layer at `paths`, in execution order, where each layer's
    inputs come from the layers before it as the caller left them after their own yield (sequential
    calibration: errors of already-rewritten layers flow on, as in GPTQ).

    On a captured graph this is one interpreted pass over the graph with all batches in step, so its cost is
    one forward whatever the number of layers; on an eager module, one forward per layer."""
    if not isinstance(module, fx.GraphModule) or not _flat_inputs_fit(module, batches):
        for path in paths:
            yield path, layer_values(module, [path], batches)[path]
        return
    wanted = set(paths)
    runs = [_StepInterpreter(module, batch) for batch in batches]
    with torch.no_grad():
        for node in module.graph.nodes:
            if node.op == "call_module":
                inside = _held_by(node, paths)
                for path in inside:
                    if path == node.target:
                        yield path, [run.first_input(node) for run in runs]
                    else:  # a layer inside the node's module (e.g. one of a factorized pair): record it
                        yield path, _recorded(module, path, lambda: [run.run_node(node) for run in runs])
                    wanted.discard(path)
            if not wanted:
                return
            for run in runs:
                run.step(node)


def _held_by(node: fx.Node, paths) -> list[str]:
    """The layer paths a call_module node runs: its own, or layers inside its module (a factorized pair)."""
    return [p for p in paths if p == node.target or p.startswith(node.target + ".")]


def _flat_inputs_fit(gm: fx.GraphModule, batches: list[tuple]) -> bool:
    count = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    return all(len(gm.graph.process_inputs(*batch)) == count for batch in batches)


def _recorded(module: nn.Module, path: str, run) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hook = module.get_submodule(path).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        run()
    finally:
        hook.remove()
    return seen


class Suffixes:
    """A captured graph's outputs over `batches` when one layer at `paths` is swapped, each recomputed from
    that layer on: everything before it computes the same values whatever the layer is, so they are kept
    (the values still alive at each layer, from one interpreted pass) and a probe runs only the rest of
    the graph, half a forward on average. `outputs(path)` reads the module's layers as they are then."""

    def __init__(self, gm: fx.GraphModule, paths: list[str], batches: list[tuple]):
        self.gm, self.nodes = gm, list(gm.graph.nodes)
        self.starts: dict[str, tuple[int, list[dict]]] = {}
        runs = [_StepInterpreter(gm, batch) for batch in batches]
        wanted = set(paths)
        with torch.no_grad():
            for index, node in enumerate(self.nodes):
                inside = _held_by(node, wanted) if node.op == "call_module" else []
                if inside:  # the layer's node, or the node of a module holding it (a factorized pair)
                    envs = [dict(run.env) for run in runs]
                    self.starts.update((path, (index, envs)) for path in inside)
                    wanted.difference_update(inside)
                for run in runs:
                    run.step(node)

    @staticmethod
    def usable(module: nn.Module, batches: list[tuple]) -> bool:
        """A graph whose ops write no tensor in place (a kept value must stay as it was for every probe)."""
        return (isinstance(module, fx.GraphModule) and _flat_inputs_fit(module, batches)
                and not any(mutates(node) for node in module.graph.nodes))

    def outputs(self, path: str) -> list[Any]:
        index, envs = self.starts[path]
        results = []
        with torch.no_grad():
            for env in envs:
                run = _StepInterpreter(self.gm, ())
                run.env = dict(env)  # a copy: the run frees values after their last use
                for node in self.nodes[index:]:
                    run.step(node)
                    if node.op == "output":
                        results.append(self.gm.graph._codegen.process_outputs(run.env[node]))
        return results


class _StepInterpreter(fx.Interpreter):
    """One batch's values, computed node by node on request (values freed after their last use)."""

    def __init__(self, gm: fx.GraphModule, batch: tuple):
        super().__init__(gm)
        self.args_iter = iter(gm.graph.process_inputs(*batch))

    def first_input(self, node: fx.Node) -> torch.Tensor:
        return self.env[node.args[0]].detach()

    def step(self, node: fx.Node) -> None:
        self.env[node] = self.run_node(node)
        for used in self.user_to_last_uses.get(node, []):
            del self.env[used]
