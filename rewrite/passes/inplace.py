"""Dead operands reused: an elementwise op whose operand dies there writes its result into that operand.

    y = f(a, b…)  where nothing reads a afterwards   →   a ← f(a, b…) in place;  y is a
    y = x + w ⊙ v                                     →   y = addcmul(x, w, v)  (then x ← … in place)

The arithmetic is the same, so the contract is exact. What changes is memory: each rewritten op stops
making one fresh tensor the size of its output. At neural-operator sizes that is the cost. glibc maps
every tensor over its mmap threshold freshly and unmaps it at free, so every op on a large activation
page-faults its whole output in. On 8 × 32 × 256² floats (67 MB) an `add` took 55 ms, and 3 ms in
place. A multiply feeding an add (soft-gating's `x + w ⊙ skip`) becomes one `addcmul`: one pass over
memory instead of two, and one tensor fewer.

Safety is static, from the graph: the operand has no other user; it is made fresh by the node that
computes it (an aten op that returns a new tensor, or a layer known to), through views that nobody
else reads; it is never a graph input, parameter or buffer, and never an `expand`ed view. Broadcasting
and type promotion are checked at run time: the result must have the operand's shape and dtype, else
the op runs out of place. While autograd records (grad enabled and an operand requires grad), every op
runs out of place too: recovery can train the graph.

Paper: none of its own; the buffer reuse of any compiler's memory planner (e.g. inductor's, in
torch.compile), done on the captured graph so that eager torch and the saved program both get it. Run it
last: passes after it see graphs that write tensors in place.
Contract: exact (float tolerance).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from rewrite.match import Pattern, Variant, cached_pattern
from rewrite.pass_base import Exact, Pass, PassContext, PassResult
from rewrite.patterns import alias_source

aten = torch.ops.aten
_UNARY = {aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default}
_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
_COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}
_OVERLAPPING = {aten.expand.default, aten.as_strided.default, aten.unfold.default, aten.broadcast_to.default}


def write_into(name: str, *args, **kwargs):
    """aten op `name` with its result written into its first operand, which nothing reads afterwards
    (the pass proved that). Out of place when the result would not fit the operand (broadcasting, type
    promotion) or while autograd records."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    first = args[0]
    fits = (first.shape == torch.broadcast_shapes(*(t.shape for t in tensors))
            and all(t.dtype == first.dtype for t in tensors))
    if not fits or torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return getattr(aten, name)(*args, **kwargs)
    return getattr(aten, name + "_")(*args, **kwargs)


write_into.writes_into_arg = 1  # graph readers see which value it writes (after the op's name)


class _ScaledAdd(nn.Module):
    def forward(self, x, w, v):
        return x + w * v


class _AddScaled(nn.Module):
    def forward(self, x, w, v):
        return w * v + x


@cached_pattern
def scaled_add() -> Pattern:
    """x + w ⊙ v in either order of the sum (the product's value is read by nothing else)."""
    example = tuple(torch.randn(2, 3) for _ in range(3))
    return Pattern("scaled-add", Variant(_ScaledAdd(), example, name="x + w*v"),
                   Variant(_AddScaled(), example, name="w*v + x"), check=_tensors_only)


def _tensors_only(match, gm: fx.GraphModule) -> str | None:
    """addcmul takes three tensors: a constant factor (GPT-2's `x + 0.044715 * x³`) stays a mul and an add."""
    add, mul = match.outputs[0], match["mul"]
    if not all(isinstance(a, fx.Node) for a in (*add.args[:2], *mul.args[:2])) or add.kwargs or mul.kwargs:
        return "a factor or term is a constant, not a tensor (addcmul takes three tensors)"
    return None


@dataclass(frozen=True)
class Inplace(Pass):
    name = "inplace"
    paper = "none: the buffer reuse of a compiler's memory planner (as inductor's), on the captured graph"
    summary = "elementwise ops write into an operand that dies there, x + w·v → addcmul: fewer fresh tensors"
    contract = Exact()
    applies_to = "aten add/sub/mul/div, GELU, ReLU, SiLU, sigmoid, tanh (and x + w·v) on captured graphs"
    level = "graph"

    @classmethod
    def patterns(cls) -> list[Pattern]:
        return [scaled_add()]

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fused = _fuse_scaled_adds(gm)
        written = [node for node in gm.graph.nodes if _write_into_operand(node)]
        gm.graph.lint()
        gm.recompile()
        stats = {"addcmul": fused, "in_place": len(written)}
        return PassResult(gm, bool(fused or written), stats)


def _fuse_scaled_adds(gm: fx.GraphModule) -> int:
    found = scaled_add().find(gm)
    for match in found or []:
        add, mul = match.outputs[0], match["mul"]
        x = next(a for a in add.args[:2] if a is not mul)
        with gm.graph.inserting_before(add):
            fused = gm.graph.call_function(aten.addcmul.default, (x, *mul.args[:2]))
        fused.meta.update(add.meta)
        add.replace_all_uses_with(fused)
        gm.graph.erase_node(add)
        gm.graph.erase_node(mul)
    return len(found or [])


def _write_into_operand(node: fx.Node) -> bool:
    """Rewrite `node` to write into a dead operand (its first, or for + and × its second, swapped)."""
    if node.op != "call_function" or node.target not in _UNARY | _BINARY | {aten.addcmul.default}:
        return False
    if node.target in _BINARY and len(node.args) != 2:
        return False
    candidates = [0] + ([1] if node.target in _COMMUTATIVE and not node.kwargs else [])
    chosen = next((i for i in candidates if _reusable(node.args[i], node)), None)
    if chosen is None:
        return False
    args = node.args if chosen == 0 else (node.args[1], node.args[0])
    node.args = (node.target.__name__.split(".")[0], *args)
    node.target = write_into
    node.meta["rewrite.pass"] = Inplace.name  # provenance: the same node, now writing in place
    return True


def _reusable(value, reader: fx.Node) -> bool:
    """Whether `value` (a node) dies at `reader` and owns its memory alone: read by nobody else, made
    fresh by its producer, directly or through views that only lead here."""
    if not isinstance(value, fx.Node) or set(value.users) != {reader}:
        return False
    source = _aliased_source(value)
    if source is False:
        return False
    return source is None or _reusable(source, value)


def _aliased_source(node: fx.Node):
    """The node whose memory `node`'s value shares (None: fresh memory; False: unknown, not reusable)."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return None if _makes_fresh(module) else False
    if node.target in _OVERLAPPING:  # several elements share one memory location: no writing into it
        return False
    return alias_source(node)


def _makes_fresh(module: nn.Module) -> bool:
    """Layers whose output is a new tensor (a layer may return its input: Identity, eval Dropout)."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(module, "fresh_output", False)
