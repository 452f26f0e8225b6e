"""dropout_eval(x), clone(x), x·1, x+0 → x: remove nodes that compute nothing.

An example third-party plugin for `rewrite`. Contract: exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from rewrite import Exact, Pass, PassContext, PassResult

_aten = torch.ops.aten
_IDENTITY_IF = {
    _aten.dropout.default: lambda n: len(n.args) > 2 and n.args[2] is False,
    _aten.clone.default: lambda n: not n.kwargs,
    _aten.alias.default: lambda n: True,
    _aten.mul.Tensor: lambda n: n.args[1] == 1 and not isinstance(n.args[1], bool),
    _aten.add.Tensor: lambda n: n.args[1] == 0 and not isinstance(n.args[1], bool) and not n.kwargs,
}


@dataclass(frozen=True)
class DropNoOps(Pass):
    name = "drop-noops"
    paper = "(none: graph clean-up)"
    summary = "remove eval-mode dropout, clone, x*1 and x+0 nodes"
    contract = Exact()
    applies_to = "dropout(train=False), clone, alias, mul by 1, add of 0"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        removed = 0
        for node in list(gm.graph.nodes):
            is_noop = _IDENTITY_IF.get(node.target) if node.op == "call_function" else None
            if is_noop and isinstance(node.args[0], fx.Node) and is_noop(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        return PassResult(gm, removed > 0, {"removed": removed})
