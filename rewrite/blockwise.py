"""Block by block: a transformer stack rewritten one repeated block at a time.

The calibration batches run through everything before the stack once (the embedding, each block stood in
for by a recorder of how the model calls it: `block_calls`); then each block is captured alone, rewritten
by the passes with the activations that the already-rewritten blocks before it produce (sequential
calibration, as in GPTQ: errors do not compound unseen), verified, and its outputs passed on. Memory holds
one block and its calibration activations, whatever the depth; with a checkpoint folder
(`rewrite.checkpoint`), the weights of the other blocks stay on disk.

A block is an element of the largest `nn.ModuleList` of two or more layers of one class with the same
parameter shapes (a Hugging Face encoder's `encoder.layer`, a decoder's `model.layers`). Blocks are called
with keyword arguments and tuples (`position_embeddings=(cos, sin)`); `FlatCall` gives the captured block
positional tensors only, and `BlockCall` puts the rewritten block back where it was, called as before.
"""
from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten

from rewrite.errors import RewriteError

Call = tuple[tuple, dict]  # a block's positional and keyword arguments, as its parent called it


def find_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, blocks) of the largest stack of identical blocks, or a RewriteError saying there is none."""
    stacks = [(path, m) for path, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) >= 2 and _identical(list(m))]
    if not stacks:
        raise RewriteError(f"{type(model).__name__} has no stack of repeated blocks (an nn.ModuleList of two or "
                           "more layers of one class and shape): --blockwise needs one; run without it")
    return max(stacks, key=lambda s: sum(p.numel() for p in s[1].parameters()))


def _identical(blocks: list[nn.Module]) -> bool:
    shapes = [[(n, tuple(p.shape)) for n, p in b.named_parameters()] for b in blocks]
    return len({type(b) for b in blocks}) == 1 and all(s == shapes[0] for s in shapes) and bool(shapes[0])


class _Reached(Exception):
    """Raised by the last block's recorder (`block_calls`): the rest of the model need not run."""


def _run_until_reached(model: nn.Module, batches: list[tuple]) -> None:
    with torch.no_grad():
        for batch in batches:
            try:
                model(*batch)
            except _Reached:
                pass


def block_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[tuple]) -> list[list[Call]]:
    """Per block, how the model calls it on each calibration batch. Blocks of one stack are not always called
    alike: Gemma 2 and 3 alternate sliding-window and full attention, each with its own mask and rotary table
    (and a full layer's mask may be None where a sliding one's is a tensor), so block 0's call, given the next
    block's hidden states, calibrated the others on inputs they never see. Each block is stood in for by a
    recorder that passes its hidden states on unchanged (block 0's output structure, its hidden states
    replaced), so one run of the embedding and the loop, with block 0 run once for that structure, records every
    call."""
    recorded: list[list[Call]] = [[] for _ in blocks]
    real, template = list(blocks), []  # block 0's first output, made by its recorder on the first call
    try:
        for index, block in enumerate(real):
            blocks[index] = _Recorder(block, recorded[index], template, last=index == len(real) - 1)
        _run_until_reached(model, batches)
    finally:
        for index, block in enumerate(real):
            blocks[index] = block
    if any(len(calls) != len(batches) for calls in recorded):
        raise RewriteError("the model did not call every block of its stack on every calibration batch: "
                           "--blockwise needs a model whose forward runs each of its blocks once")
    return recorded


class _Recorder(nn.Module):
    """A block's stand-in for `block_calls`: records the call, returns the hidden states as the block would
    return its own. Attributes the model's loop reads on a block (Gemma 3's `attention_type`) are the block's."""

    def __init__(self, block: nn.Module, calls: list[Call], template: list, last: bool):
        super().__init__()
        self.block, self.calls, self.template, self.last = block, calls, template, last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((tuple(args), dict(kwargs)))
        if self.last:
            raise _Reached
        if not self.template:  # block 0's first call: the only block run for real
            self.template.append(self.block(*args, **kwargs))
        leaves, spec = tree_flatten(self.template[0])
        first = next(i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor))
        return tree_unflatten([hidden_of((args, kwargs)) if i == first else v for i, v in enumerate(leaves)], spec)


def call_layout(call: Call) -> tuple[TreeSpec, dict[int, Any], int]:
    """(pytree spec, non-tensor leaves by position, leaf count) of a block's call: what `FlatCall` fixes, and what
    `BlockCall` and the output manifest need to call the rewritten block as the original was called."""
    leaves, spec = tree_flatten(call)
    return spec, {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}, len(leaves)


class FlatCall(nn.Module):
    """`block(*args, **kwargs)` as a module of positional tensors, for capture; non-tensor arguments (flags,
    None) are fixed to the values of the first call."""

    HELD = "block"  # the attribute that holds the user's block, the first name of every path captured below it

    def __init__(self, block: nn.Module, call: Call):
        super().__init__()
        self.block = block
        self.spec, self.constants, self.count = call_layout(call)

    def tensors(self, call: Call) -> tuple[torch.Tensor, ...]:
        leaves, spec = tree_flatten(call)
        if spec != self.spec:
            raise RewriteError("a block was called with arguments of another structure than in calibration "
                               f"({spec} vs {self.spec}): call the model as it was calibrated")
        return tuple(v for v in leaves if isinstance(v, torch.Tensor))

    def forward(self, *tensors: torch.Tensor) -> Any:
        given = iter(tensors)
        leaves = [self.constants[i] if i in self.constants else next(given) for i in range(self.count)]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.block(*args, **kwargs)


def _in_block(path: str) -> str:
    return path.removeprefix(f"{FlatCall.HELD}.")


class BlockCall(nn.Module):
    """A rewritten block (a module of positional tensors) in its old place, called as the original block."""

    def __init__(self, rewritten: nn.Module, spec: TreeSpec, constants: dict[int, Any], count: int):
        super().__init__()
        self.rewritten, self.spec, self.constants, self.count = rewritten, spec, constants, count

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        if spec != self.spec:
            raise RewriteError("the rewritten block is called with arguments of another structure than in "
                               "calibration: call the model as it was calibrated (e.g. use_cache=False)")
        return self.rewritten(*[v for v in leaves if isinstance(v, torch.Tensor)])


def hidden_of(output: Any) -> torch.Tensor:
    """A block's hidden states: its output's first tensor, or the first argument of a call (args, kwargs)."""
    return output if isinstance(output, torch.Tensor) else tree_leaves(output)[0]


def with_hidden(call: Call, hidden: torch.Tensor) -> Call:
    """`call` with its hidden states (the first argument, positional or by keyword) replaced by `hidden`."""
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    name = next(iter(kwargs))  # hidden_states passed by keyword
    return (), {**kwargs, name: hidden}


@dataclass
class BlockReport:
    index: int
    seconds: float
    records: list
    peak_rss_mib: float


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rewrite_blocks(blocks: nn.ModuleList, calls: list[list[Call]], rewrite_one: Callable, keep: Callable,
                   load: Callable[[int], None]) -> Iterator[BlockReport]:
    """For each block: load it, rewrite it on its own calls (`block_calls`) with the hidden states the rewritten
    blocks before it made, pass its outputs on, and put back what `keep(index, rewritten, captured, flat)` returns
    (a BlockCall, or a stand-in once the block is on disk). `rewrite_one(index, flat, batches, original_batches)
    → (module, records, captured)`, where original_batches are the block's inputs as the original blocks before
    it make them."""
    hidden = originals = [hidden_of(call) for call in calls[0]]
    for index in range(len(blocks)):
        start = time.perf_counter()
        load(index)
        flat = FlatCall(blocks[index], calls[index][0])
        batches = [flat.tensors(with_hidden(call, h)) for call, h in zip(calls[index], hidden)]
        original_batches = [flat.tensors(with_hidden(call, h)) for call, h in zip(calls[index], originals)]
        with torch.no_grad():  # the original block, once, before the passes change it
            originals = [hidden_of(flat(*batch)) for batch in original_batches]
        blocks[index] = nn.Identity()  # the block lives in `flat` alone, so capture's copy can replace it
        rewritten, records, captured = rewrite_one(index, flat, batches, original_batches)
        with torch.no_grad():
            hidden = [hidden_of(rewritten(*batch)) for batch in batches]
        blocks[index] = keep(index, rewritten, captured, flat)
        del flat, rewritten, captured, batches, original_batches
        gc.collect()
        yield BlockReport(index, time.perf_counter() - start, records, peak_rss_mib())


def in_place(_index: int, rewritten: nn.Module, _captured: Any, flat: FlatCall) -> BlockCall:
    return BlockCall(rewritten, flat.spec, flat.constants, flat.count)


@dataclass
class Outcome:
    model: nn.Module
    records: list
    summary: str
    layouts: list[tuple]  # per block, (pytree spec, constants, leaf count) of its call, for the output manifest


def _needs_whole_model(pass_: Any) -> Any:
    """One record for a pass that reads what no single block has, instead of one refusal per block."""
    from rewrite.report import PassRecord
    return PassRecord(name=pass_.name, spec=pass_.spec(), contract=pass_.contract.describe(), status="skipped",
                      reason=f"it reads {pass_.whole_model}, and a checkpoint folder is rewritten block by block: load "
                             "the model in Python (e.g. AutoModelForCausalLM.from_pretrained) and give it to "
                             "rewrite.optimize, or as a file.py:factory, to run it")


def run(model: nn.Module, batches: list[tuple], passes: list, *, seed: int = 0, strict: bool = False,
        recover: Any = None, say: Callable[..., None] = lambda *a, **k: None,
        load: Callable[[int], None] = lambda i: None, keep: Callable = in_place,
        time_limit: float | None = None) -> Outcome:
    """Rewrite `model`'s stack in place, block by block. With `recover` (a RecoverSpec), a recoverable pass's
    block is distilled toward the block before that pass on the block's own inputs (the rewritten blocks'
    outputs), as block-wise reconstruction does: each block learns to undo its own error given what the
    blocks before it really produce."""
    from rewrite import capture, pipeline
    from rewrite.pass_base import PassContext
    path, blocks = find_stack(model)
    kind = type(blocks[0]).__name__
    whole = [p for p in passes if p.whole_model]
    passes = [p for p in passes if not p.whole_model]
    load(0)
    calls = block_calls(model, blocks, batches)
    layouts = [call_layout(own[0]) for own in calls]

    def rewrite_one(index: int, flat: FlatCall, block_batches: list, original_batches: list
                    ) -> tuple[nn.Module, list, Any]:
        say(f"block {index + 1} of {len(blocks)} ({path}.{index}): capturing and rewriting", index, len(blocks))
        captured = capture.capture(flat, block_batches[0])
        if not captured.graph:
            raise RewriteError(f"block {path}.{index} cannot be captured alone ({captured.note}); run without "
                               "--blockwise")
        # One block in memory from here on: the captured graph (whose replaced layers are then freed) and the
        # pipeline's snapshot for rollback. Passes that read ctx.original read the graph itself.
        flat.block, captured.original = None, None
        ctx = PassContext(calibration=block_batches, original_calibration=original_batches, seed=seed,
                          recover=recover, time_limit=time_limit)
        module, records, _outputs = pipeline.run_passes(captured, passes, ctx, strict=strict)
        for record in records:
            record.name = f"{record.name} @ {path}.{index}"
            # paths inside the block as the user's model names them below it (`mlp.down_proj`), not below the
            # FlatCall that holds it for capture (`block.mlp.down_proj`)
            record.layers = [dict(row, layer=_in_block(row["layer"])) for row in record.layers]
            record.skipped = [[_in_block(where), why] for where, why in record.skipped]
        return module, records, captured

    reports = list(rewrite_blocks(blocks, calls, rewrite_one, keep, load))
    records = [_needs_whole_model(p) for p in whole] + [r for report in reports for r in report.records]
    mean = sum(r.seconds for r in reports) / len(reports)
    summary = (f"block by block: {len(blocks)} {kind} blocks of {path}, {mean:.1f} s per block, "
               f"peak resident memory {peak_rss_mib() / 1024:.2f} GiB")
    return Outcome(model, records, summary, layouts)
