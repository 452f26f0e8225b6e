"""Patterns on captured graphs: torch.fx's SubgraphMatcher, with layers matched by type, spelling
alternatives, a falsy `NoMatch(reason)`, a "why didn't it match" trace, and region replacement with
several inputs and outputs.

A pattern is one or more *variants*, each a small `nn.Module` captured the way models are (torch.export,
then layers lifted to `call_module` nodes), so a variant reads like the code it matches:

    class ConvBN(nn.Module):
        def __init__(self): super().__init__(); self.conv, self.bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)
        def forward(self, x): return self.bn(self.conv(x))
    CONV_BN = Pattern("conv-bn", Variant(ConvBN(), (torch.randn(1, 1, 4, 4),)))

Layers match by type (the pattern's `nn.Conv2d` matches any `nn.Conv2d`), functions by op (in-place and
out-of-place spellings alike), placeholders match anything; `ignore_literals` lets constants differ.
A pattern's `check(match, gm)` returns None or the reason a structural match is still refused.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from rewrite.capture import lift_layers, quiet_torch


def cached_pattern(build: Callable[..., Pattern]) -> Callable[..., Pattern]:
    """A pattern factory, built once per process, whose example modules and inputs draw from a random generator
    of their own: building a pattern must not move the global RNG, or a run's random draws (calibration,
    recovery) would depend on whether an earlier run in the process had built the pattern already."""
    @functools.cache
    @functools.wraps(build)
    def cached(*args, **kwargs) -> Pattern:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build(*args, **kwargs)
    return cached


@dataclass(frozen=True)
class NoMatch:
    """A failed match, falsy, with the reason (for reports: "why didn't my rule fire?")."""

    reason: str
    nothing_alike: bool = False  # no candidate at all (else `check` refused some, and `reason` says why)

    def __bool__(self) -> bool:
        return False

    def or_else(self, wanted: str) -> str:
        """The reason, or where nothing was alike, what the pass looks for (`applies_to`): "no subgraph matches
        'attention-with-bias'" told a DeBERTa user nothing about what rpe-fft rewrites."""
        return f"no part of the model has the form {wanted}" if self.nothing_alike else self.reason


@dataclass
class Match:
    """One occurrence: pattern node name → graph node, the bound inputs and the returned outputs."""

    pattern: str
    variant: str
    nodes: dict[str, fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]

    def __getitem__(self, name: str) -> fx.Node:
        return self.nodes[name]

    def layer(self, gm: fx.GraphModule, name: str) -> nn.Module:
        """The module a matched call_module node runs (pattern node names are the pattern's own)."""
        return gm.get_submodule(self.nodes[name].target)


@dataclass
class Variant:
    """One spelling: a module and example inputs to capture it with."""

    module: nn.Module
    example_inputs: tuple
    ignore_literals: bool = False
    name: str = ""
    graph: fx.GraphModule = field(init=False, repr=False)

    def __post_init__(self):
        self.name = self.name or type(self.module).__name__
        self.graph = _capture_pattern(self.module, self.example_inputs)


Check = Callable[[Match, fx.GraphModule], str | None]


class Pattern:
    def __init__(self, name: str, *variants: Variant, check: Check | None = None):
        self.name, self.variants, self.check = name, list(variants), check

    def find(self, gm: fx.GraphModule) -> list[Match] | NoMatch:
        """Every non-overlapping occurrence that passes `check`, or NoMatch with the reasons."""
        found, refused, taken = [], [], set()
        for match, why in self._candidates(gm):
            region = set(match.nodes.values())
            if region & taken:
                continue
            if why:
                refused.append(f"{match.outputs[0].name}: {why}")
                continue
            found.append(match)
            taken |= region
        if found:
            return found
        return NoMatch("; ".join(refused) if refused else f"no subgraph matches {self.name!r}", not refused)

    def refusals(self, gm: fx.GraphModule) -> list[tuple[Match, str]]:
        """Structural matches that `check` refused, with the reasons (for a pass's `skipped` list)."""
        return [(match, why) for match, why in self._candidates(gm) if why]

    def _candidates(self, gm: fx.GraphModule, overlapping: bool = False):
        for variant in self.variants:
            matcher = _LayerAwareMatcher(variant.graph, gm, variant.ignore_literals, overlapping)
            for raw in matcher.match(gm.graph):
                match = _to_match(self.name, variant, raw)
                yield match, (self.check(match, gm) if self.check else None)

    def explain(self, gm: fx.GraphModule, node_name: str) -> str:
        """Why the pattern does (not) match with its output at `node_name`: the first difference per variant."""
        node = next((n for n in gm.graph.nodes if n.name == node_name), None)
        if node is None:
            return f"the graph has no node {node_name!r}"
        reasons = []
        for variant in self.variants:
            anchor = _output_anchor(variant.graph)
            diff = _first_difference(anchor, node, _Equality(variant.graph, gm, variant.ignore_literals), {})
            if diff is None:
                found = self.find(gm)
                hit = found and any(node in m.outputs for m in found)
                reasons.append(f"{variant.name}: matches" if hit else
                               f"{variant.name}: same structure, but {self._leak_or_check(gm, node)}")
            else:
                reasons.append(f"{variant.name}: {diff}")
        return "; ".join(reasons)

    def _leak_or_check(self, gm: fx.GraphModule, node: fx.Node) -> str:
        for match, why in self._candidates(gm, overlapping=True):
            if node in match.outputs:
                taken = [m for m in self.find(gm) or [] if set(m.nodes.values()) & set(match.nodes.values())]
                if why:
                    return why
                if taken:
                    return f"it overlaps the match ending at {taken[0].outputs[0].name} (matches do not share nodes)"
        return "an inner node's result is also used outside the pattern (it would have to be computed anyway)"


def replace_match(gm: fx.GraphModule, match: Match, module: nn.Module, inputs: list[fx.Node],
                  outputs: list[fx.Node], name: str) -> fx.Node:
    """Run `module(*inputs)` instead of the matched region; its result (or result[i]) replaces outputs[i].

    Node metadata of the replaced outputs (`val`, stack traces) is kept on the new nodes; the region's
    nodes that nothing reads any more are erased, in-place ops included.
    """
    path = _free_name(gm, name)
    gm.add_submodule(path, module)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if any(order[i] > order[o] for i in inputs if isinstance(i, fx.Node) for o in outputs):
        raise ValueError("an input of the replacement is computed after one of its outputs")
    with gm.graph.inserting_after(max((i for i in inputs if isinstance(i, fx.Node)), key=order.get)):
        new = gm.graph.call_module(path, tuple(inputs))
    new.meta.update({k: v for k, v in outputs[0].meta.items() if len(outputs) == 1})
    results = [new] if len(outputs) == 1 else []
    if len(outputs) > 1:
        with gm.graph.inserting_after(new):
            results = [gm.graph.call_function(_getitem, (new, i)) for i in range(len(outputs))]
        for node, old in zip(results, outputs):
            node.meta.update(old.meta)
    for old, node in zip(outputs, results):
        old.replace_all_uses_with(node)
    erase_dead(gm, list(match.nodes.values()))
    gm.graph.lint()
    gm.recompile()
    return new


def _getitem(x: Any, i: int) -> Any:
    return x[i]


# --- internals ---------------------------------------------------------------------------------

def _canonical(target: Any) -> Any:
    """An aten in-place op as its out-of-place op, so `x += y` matches `x + y`."""
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return target
    name = packet.__name__
    if name.endswith("_") and not name.startswith("_"):
        base = getattr(torch.ops.aten, name[:-1], None)
        if base is not None:
            return getattr(base, target._overloadname, base)
    return target


class _Equality:
    def __init__(self, pattern: fx.GraphModule, gm: fx.GraphModule, ignore_literals: bool):
        self.pattern, self.gm, self.ignore_literals = pattern, gm, ignore_literals

    def __call__(self, pn: fx.Node, gn: fx.Node) -> bool:
        if pn.op == "placeholder":
            return True
        if pn.op != gn.op:
            return False
        if pn.op == "call_module":
            found, wanted = type(self.gm.get_submodule(gn.target)), type(self.pattern.get_submodule(pn.target))
            # Exact types: a subclass may compute something else (a quantized Linear), unless it says it is
            # the plain layer with other shapes (prune's narrowed Linears set `plain_form = nn.Linear`).
            return found is wanted or getattr(found, "plain_form", None) is wanted
        if pn.op == "call_function":
            return _canonical(pn.target) == _canonical(gn.target)
        if pn.op == "get_attr":
            return True
        return pn.target == gn.target


class _LayerAwareMatcher(SubgraphMatcher):
    """SubgraphMatcher whose node equality knows layers (by type) and in-place spellings."""

    def __init__(self, pattern: fx.GraphModule, gm: fx.GraphModule, ignore_literals: bool, overlapping: bool = False):
        # fx's own ignore_literals also lets a pattern node stand for a literal (a placeholder never bound, a
        # subtree never compared); here only the pattern's literals are wildcards (see _match_literals).
        super().__init__(pattern.graph, ignore_literals=False, remove_overlapping_matches=not overlapping)
        self._equal = _Equality(pattern, gm, ignore_literals)
        self._any_literal = ignore_literals

    def _nodes_are_equal(self, pn: fx.Node, gn: fx.Node, node_name_match: str = "") -> bool:
        return self._equal(pn, gn)

    def _match_literals(self, pn: Any, gn: Any, match: Any) -> bool:
        """A literal of the pattern, ignored, stands for anything (a graph's symbolic size too); a node of the
        pattern never stands for a literal of the graph."""
        return super()._match_literals(pn, gn, match) or (self._any_literal and not isinstance(pn, fx.Node))

    def _is_contained(self, nodes_map: dict[fx.Node, fx.Node]) -> bool:
        """fx's leak check, blind to export's dtype assertions: they read a value only to check it."""
        inner = {gn for pn, gn in nodes_map.items() if pn.op != "placeholder"}
        return all(is_dtype_check(user) or user in inner for pn, gn in nodes_map.items()
                   if pn.op != "placeholder" and pn not in self.pattern_returning_nodes for user in gn.users)


def is_dtype_check(node: fx.Node) -> bool:
    """Export's `_assert_tensor_metadata` (one per `.to()`): it reads a value only to check its dtype."""
    return node.target is torch.ops.aten._assert_tensor_metadata.default


def _capture_pattern(module: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    with quiet_torch():
        gm = torch.export.export(copy.deepcopy(module).eval(), example_inputs, strict=False).module()
    lift_layers(gm)
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)  # export's guard check: not part of what the pattern computes
    for node in [n for n in gm.graph.nodes if is_dtype_check(n)]:
        gm.graph.erase_node(node)  # export's dtype assertions (a `.to()` adds one): nothing the pattern computes
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _to_match(pattern: str, variant: Variant, raw: InternalMatch) -> Match:
    nodes = {pn.name: gn for pn, gn in raw.nodes_map.items() if pn.op not in ("placeholder", "output")}
    placeholders = [n for n in variant.graph.graph.nodes if n.op == "placeholder"]
    inputs = [raw.nodes_map[p] for p in placeholders if p in raw.nodes_map]
    return Match(pattern, variant.name, nodes, inputs, list(raw.returning_nodes))


def _claimed(found: list[Match]) -> set[fx.Node]:
    return {n for m in found for n in m.nodes.values()}


def _output_anchor(pattern: fx.GraphModule) -> fx.Node:
    output = next(n for n in reversed(pattern.graph.nodes) if n.op == "output")
    return output.all_input_nodes[0]


def _first_difference(pn: fx.Node, gn: Any, equal: _Equality, seen: dict) -> str | None:
    """The first place the graph differs from the pattern, walking inputs from the output backwards."""
    if pn in seen:
        return None if seen[pn] is gn else f"{_describe(gn)} should be the same value as {seen[pn].name}"
    if pn.op == "placeholder":
        seen[pn] = gn
        return None
    if not isinstance(gn, fx.Node) or not equal(pn, gn):
        return f"{_describe(gn)} where the pattern has {_describe_pattern(pn, equal.pattern)}"
    seen[pn] = gn
    pargs = [a for a in pn.args if isinstance(a, fx.Node)]
    gargs = [a for a in gn.args if isinstance(a, fx.Node)]
    if len(pargs) != len(gargs):
        return f"{gn.name} has {len(gargs)} tensor inputs, the pattern's {pn.name} has {len(pargs)}"
    for pa, ga in zip(pargs, gargs):
        diff = _first_difference(pa, ga, equal, seen)
        if diff:
            return diff
    return None


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    target = node.target if node.op != "call_function" else getattr(node.target, "__name__", node.target)
    return f"{node.name} ({node.op} {target})"


def _describe_pattern(node: fx.Node, pattern: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"a {type(pattern.get_submodule(node.target)).__name__}"
    return getattr(node.target, "__name__", str(node.target))


def erase_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the given nodes nothing reads any more, last first (in-place ops too: DCE keeps those), with
    export's dtype assertions on them (a match may hold a node that only such a check reads besides)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted((n for n in nodes if n in order), key=order.get, reverse=True):
        if node.users and all(map(is_dtype_check, node.users)):
            for check in list(node.users):
                gm.graph.erase_node(check)
        if not node.users and node.op != "placeholder":
            gm.graph.erase_node(node)


def _free_name(gm: fx.GraphModule, name: str) -> str:
    path, i = name, 1
    while _has_submodule(gm, path):
        path, i = f"{name}_{i}", i + 1
    return path


def _has_submodule(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False
