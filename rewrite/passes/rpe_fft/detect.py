"""Finding attention with an additive bias in captured graphs, and proving the bias is Toeplitz.

Spellings (each a `rewrite.match` variant): softmax(q·kᵀ ∗ s + B)·v with ∗ a multiplication, a division
or nothing, B one term or two (bias + mask, as Hugging Face's eager T5 adds them), and
scaled_dot_product_attention(q, k, v, attn_mask=B). A match is only structure: the proof is numeric and
structural together. B is evaluated (an fx interpreter over its ancestors only) and must satisfy
B[i,j] = b_{j−i} per head, equal across the batch; it may read no input but, at most, one (batch, n)
padding mask, whose zeros must be exactly the keys B sets to −∞ (then the mask becomes a per-key factor);
−∞ above the diagonal makes it causal. Anything else is skipped with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from rewrite.match import Match, Pattern, Variant, cached_pattern

_NEG = -1e4  # at or below this an additive score is a mask (exp underflows to 0 in float32 softmax)


class _Scaled(nn.Module):
    def __init__(self, op: str, terms: int):
        super().__init__()
        self.op, self.terms = op, terms

    def forward(self, q, k, v, *bias):
        scores = q @ k.transpose(-2, -1)
        scores = scores * 0.125 if self.op == "mul" else scores / 8.0 if self.op == "div" else scores
        for term in bias:
            scores = scores + term
        return scores.softmax(-1) @ v


class _SDPA(nn.Module):
    def forward(self, q, k, v, bias):
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@cached_pattern
def attention() -> Pattern:
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))  # distinct tensors: export aliases repeated ones
    biases = [torch.randn(1, 2, 4, 4) for _ in range(2)]
    variants = [Variant(_Scaled(op, terms), (q, k, v, *biases[:terms]), ignore_literals=True,
                        name=f"softmax(q·kᵀ{'·s' if op == 'mul' else '/s' if op == 'div' else ''}{' + B' * terms})·v")
                for op in ("mul", "div", "none") for terms in (1, 2)]
    variants.append(Variant(_SDPA(), (q, k, v, biases[0]), ignore_literals=True, name="sdpa(attn_mask=B)"))
    return Pattern("attention-with-bias", *variants)


@dataclass
class Found:
    """A proven attention: its q, k, v nodes, score scale, bias terms, and what the bias turned out to be."""

    match: Match
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    bias: list[fx.Node]


def read(match: Match) -> Found | str:
    """q, k, v, the scale and the bias terms of a match, or why the match is not usable."""
    q, k, v, *bias = match.inputs
    nodes = list(match.nodes.values())
    sdpa = [n for n in nodes if "scaled_dot_product_attention" in str(n.target)]
    if sdpa:
        node = sdpa[0]
        if node.kwargs.get("is_causal") or node.kwargs.get("dropout_p", 0.0):
            return "sdpa with is_causal or dropout: not a plain biased attention"
        head_dim = _last_dim(q)
        scale = node.kwargs.get("scale") or (1 / math.sqrt(head_dim) if head_dim else None)
        return Found(match, q, k, v, scale, bias) if scale else "the head dimension is not known"
    soft = next(n for n in nodes if "softmax" in str(n.target))
    if soft.args[1] not in (-1, _rank(soft) - 1):
        return f"softmax over dim {soft.args[1]}, not the keys"
    scale = 1.0
    for n in nodes:
        name = str(n.target)
        if ("mul" in name or "div" in name) and len(n.args) > 1 and isinstance(n.args[1], (int, float)):
            scale = float(n.args[1]) if "mul" in name else 1 / float(n.args[1])
    if scale <= 0:
        return f"score scale {scale} ≤ 0"
    return Found(match, q, k, v, scale, bias)


def _last_dim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[-1]) if val is not None and not isinstance(val.shape[-1], torch.SymInt) else None


def _rank(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if val is not None else 4


def data_inputs(gm: fx.GraphModule, nodes: list[fx.Node]) -> set[fx.Node]:
    """Placeholders whose values (not only shapes) reach `nodes`."""
    seen, stack, found = set(), list(nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            found.add(node)
        elif not _shape_only(node):
            stack.extend(node.all_input_nodes)
    return found


def _shape_only(node: fx.Node) -> bool:
    return node.op == "call_function" and any(s in str(node.target) for s in ("sym_size", "sym_numel", "sym_stride"))


def evaluate(gm: fx.GraphModule, nodes: list[fx.Node], inputs: tuple) -> list[torch.Tensor]:
    """The values of `nodes` on `inputs`, computing only their ancestors."""
    needed, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    env: dict[fx.Node, object] = {}
    interp = fx.Interpreter(gm)
    placeholders = iter(inputs)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node in needed and node.op != "output":
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
                env[node] = getattr(interp, node.op)(node.target, args, kwargs)
    return [env[n] for n in nodes]


@dataclass
class Bias:
    """b_t per head for t = −(L−1) … L−1, whether the attention is causal, and the padding-mask input."""

    table: torch.Tensor
    causal: bool
    mask: fx.Node | None
    tail: str


def prove(gm: fx.GraphModule, found: Found, inputs: tuple, lengths: tuple[int, ...]) -> Bias | str:
    """Evaluate the bias at the calibration length and the longest of `lengths` it allows; prove it Toeplitz."""
    readers = data_inputs(gm, found.bias)
    if len(readers) > 1:
        return f"the bias depends on several inputs ({', '.join(sorted(r.name for r in readers))})"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mask_node = next(iter(readers), None)
    mask_value = inputs[placeholders.index(mask_node)] if mask_node is not None else None
    if mask_value is not None and mask_value.dim() != 2:
        return f"the bias depends on input {mask_node.name} {tuple(mask_value.shape)}: not a (batch, n) padding mask"
    total = sum(evaluate(gm, found.bias, inputs))
    n = total.shape[-1]
    proof = _toeplitz(total, mask_value)
    if isinstance(proof, str):
        return proof
    table, causal = proof
    longer = _longest(gm, found, inputs, n, lengths, mask_value is not None)
    if longer is not None:
        proof = _toeplitz(longer, None)
        if isinstance(proof, str):
            return f"at length {longer.shape[-1]}: {proof}"
        table = proof[0]
    return Bias(table, causal, mask_node, _tail(table))


def _toeplitz(total: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, bool] | str:
    """(table (H, 2n−1), causal) from an evaluated (…, H|1, n, n) bias, or why it is not Toeplitz.

    Scores a padding mask drops carry no bias value (they are unknown, not zero); every known score must
    equal its diagonal's value b_{j−i} in every batch element.
    """
    total = total.double()
    while total.dim() < 4:
        total = total[None]
    n = total.shape[-1]
    if total.shape[-2] != n:
        return f"the scores are {total.shape[-2]}×{n}: not self-attention"
    masked = total <= _NEG
    known = torch.ones_like(masked)
    if mask is not None:
        if total.shape[0] != mask.shape[0]:
            return "the bias's batch does not follow the padding mask's"
        keys = (mask == 0)[:, None, None, :].expand_as(total)
        if not torch.equal(keys & masked, keys):
            return "keys the padding mask drops are not masked out in the bias"
        known, masked = ~keys, masked & ~keys
    causal = bool(masked.any())
    if causal and not torch.equal(masked.any(0).any(0), torch.ones(n, n, dtype=torch.bool).triu(1)):
        return "the bias masks scores, but not exactly the future (j > i): not a causal or padding mask"
    known = known & ~masked
    i = torch.arange(n)
    diagonal = ((i[None, :] - i[:, None]) + n - 1).expand_as(total)  # j − i + n − 1 for every score
    heads = total.shape[1]
    flat = lambda x: x.transpose(0, 1).reshape(heads, -1)  # noqa: E731 (per head, every batch element)
    sums = torch.zeros(heads, 2 * n - 1, dtype=torch.float64).index_add_(1, flat(diagonal)[0], flat(total * known).double())
    counts = torch.zeros(heads, 2 * n - 1, dtype=torch.float64).index_add_(1, flat(diagonal)[0], flat(known).double())
    table = sums / counts.clamp_min(1)
    spread = ((total - table[:, diagonal[0, 0]][None]).abs() * known).max().detach()
    if spread > 1e-5 * (1 + float(table.detach().abs().max())):
        return ("the bias is not a function of j − i alone (not Toeplitz, or it depends on the data): "
                f"scores on one diagonal differ by {float(spread):.2g}")
    return table.float(), causal


def _longest(gm, found: Found, inputs: tuple, n: int, lengths: tuple[int, ...], has_mask: bool) -> torch.Tensor | None:
    """The bias evaluated at the longest length in `lengths` (> n) that the model's own code allows."""
    for length in sorted((L for L in lengths if L > n), reverse=True):
        try:
            resized = tuple(_resize(x, n, length) for x in inputs)
            [value] = [sum(evaluate(gm, found.bias, resized))]
        except Exception:  # noqa: BLE001 (the model's code refuses this length: try a shorter one)
            continue
        if value.shape[-1] == length:
            return value
    return None


def _resize(x, n: int, length: int):
    """An input with every axis of size n grown to `length` (repeating its content), for evaluating biases."""
    if not isinstance(x, torch.Tensor):
        return x
    for axis in range(1, x.dim()):
        if x.shape[axis] == n:
            reps = [1] * x.dim()
            reps[axis] = math.ceil(length / n)
            x = x.repeat(*reps).narrow(axis, 0, length)
            if x.dtype in (torch.long, torch.int, torch.bool) and x.dim() == 2:
                x = torch.ones_like(x)  # a padding mask: keep every key while reading the bias
    return x


def _tail(table: torch.Tensor, run: int = 8) -> str:
    """How the bias continues past its table: flat (saturated buckets, clipped tables), linear, or unknown."""
    if table.shape[-1] < 2 * run + 1:
        return "none"
    ends = (table[:, :run], table[:, -run:])
    if all(torch.allclose(e, e[:, :1].expand_as(e), atol=1e-6) for e in ends):
        return "flat"
    slopes = [e.diff(dim=-1) for e in ends]
    if all(torch.allclose(s, s[:, :1].expand_as(s), atol=1e-5) for s in slopes):
        return "linear"
    return "none"
