"""Small matching and replacement helpers over lifted graphs (call_module layers) and eager trees."""
from __future__ import annotations

from typing import Callable

from torch import fx, nn

# A matcher answers None (rewrite it) or the reason it is left alone.
Matcher = Callable[[nn.Module, str], str | None]
Builder = Callable[[nn.Module, str], nn.Module]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def layer_of(gm: fx.GraphModule, node: object, kinds: tuple[type, ...]) -> nn.Module | None:
    """The module a call_module node runs, if it is one of `kinds`."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, kinds):
            return module
    return None


def layers(module: nn.Module, kinds: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every layer of `kinds` the model runs: call_module targets in a graph, else the tree."""
    if isinstance(module, fx.GraphModule):
        seen = dict.fromkeys(n.target for n in module.graph.nodes if n.op == "call_module")
        return [(path, module.get_submodule(path)) for path in seen
                if isinstance(module.get_submodule(path), kinds)]
    return [(path, m) for path, m in module.named_modules() if isinstance(m, kinds)]


def swap_modules(module: nn.Module, kinds: tuple[type, ...], match: Matcher,
                 build: Builder) -> tuple[list[str], list[tuple[str, str]]]:
    """Replace every layer of `kinds` that `match` accepts with `build(layer, path)`.

    Works the same on a captured graph and on an eager model. Returns (rewritten paths, (path, reason) skipped).
    """
    done, skipped = [], []
    for path, layer in layers(module, kinds):
        reason = match(layer, path)
        if reason is not None:
            skipped.append((path, reason))
            continue
        set_submodule(module, path, build(layer, path))
        done.append(path)
    return done, skipped
