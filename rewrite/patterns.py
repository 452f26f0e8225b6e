"""Shared patterns (built on rewrite.match) and small helpers over lifted graphs and eager trees."""
from __future__ import annotations


import torch
from torch import fx, nn

from rewrite.capture import set_submodule  # noqa: F401  (passes take it from here, with the patterns)
from rewrite.match import Pattern, Variant, cached_pattern



class _Function(nn.Module):
    """An activation written as a torch function (torch.sin(h)), as Fourier-feature and SIREN-style MLPs do."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _named(fn):
    return type(fn.__name__, (_Function,), {"__init__": lambda self: _Function.__init__(self, fn)})


class TanhGELU(nn.Module):
    """GELU's tanh approximation written out, as GPT-2 ("gelu_new") and many hand-written models do."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


class FactoredTanhGELU(nn.Module):
    """The same approximation with x factored out of the cubic, as BLOOM writes it."""

    same_as = "TanhGELU"  # matches name the function, not its spelling (snnk's features follow the function)

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class QuickGELU(nn.Module):
    """x·σ(1.702·x), GELU's sigmoid approximation (CLIP's and OpenAI's models)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    """relu(x)² (Primer, So et al. arXiv:2109.08668; Nemotron's "relu2")."""

    def forward(self, x):
        return torch.square(torch.relu(x))


ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, TanhGELU, FactoredTanhGELU, QuickGELU, SquaredReLU,
               nn.Hardswish, _named(torch.exp), _named(torch.sin), _named(torch.cos))  # Hardswish: LeViT's MLPs


class _FeedForward(nn.Module):
    def __init__(self, act: type):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(4, 8), act(), nn.Linear(8, 4)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@cached_pattern
def feed_forward() -> Pattern:
    """Linear `up` → activation → Linear `down`, the FFN of transformers and MLPs, also across submodules (Hugging
    Face's `intermediate` / `output`). Literals are ignored, so GELU's tanh approximation matches; an eval-mode
    dropout between them is gone from captured graphs (`capture.drop_inference_dropout`)."""
    return Pattern("feed-forward", *[
        Variant(_FeedForward(act).eval(), (torch.randn(2, 4),), ignore_literals=True,
                name=getattr(act, "same_as", act.__name__))
        for act in ACTIVATIONS])


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def not_pointwise(conv: nn.Module) -> str | None:
    """Why a convolution is not the Linear over its channels, or None where it is (1×1, stride 1, no padding,
    one group)."""
    if any(k != 1 for k in conv.kernel_size):
        return f"kernel {tuple(conv.kernel_size)} is not 1×1"
    if any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation):
        return "strided or dilated"
    if conv.padding != "valid" and any(p != 0 for p in (conv.padding if isinstance(conv.padding, tuple) else [1])):
        return "padded (its border outputs are the bias alone)"
    if conv.groups != 1:
        return f"groups={conv.groups} (a grouped 1×1 conv is a block-diagonal GEMM: not rewritten)"
    return None


def is_pointwise_conv(layer: nn.Module) -> bool:
    return type(layer) in CONVS and not_pointwise(layer) is None


class _PointwiseFeedForward(nn.Module):
    def __init__(self, act: type):
        super().__init__()
        self.up, self.act, self.down = nn.Conv2d(4, 8, 1), act(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _both_pointwise(match, gm: fx.GraphModule) -> str | None:
    kernels = [match.layer(gm, role).kernel_size for role in ("up", "down")
               if not is_pointwise_conv(match.layer(gm, role))]
    return f"its convolutions are not all 1×1 with stride 1 and no padding ({kernels})" if kernels else None


@cached_pattern
def pointwise_feed_forward() -> Pattern:
    """up → activation → down where both are 1×1 convolutions: the MLPs of PoolFormer and ConvNeXt-atto, a
    feed-forward block over the channels of every grid point (`compress.OverChannels` reads them as Linears)."""
    return Pattern("pointwise-feed-forward", *[
        Variant(_PointwiseFeedForward(act).eval(), (torch.randn(2, 4, 3, 3),), ignore_literals=True, name=act.__name__)
        for act in (nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish)], check=_both_pointwise)


class _Gated(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False), nn.Linear(8, 4)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


# The gate's activation per variant, named as `ACTIVATIONS` are: SwiGLU (Llama, Qwen, Mistral), GeGLU with exact or
# tanh GELU (Gemma's gelu_pytorch_tanh is the op's own tanh form; T5 v1.1's "gelu_new" is written out), ReGLU.
GATES = {"SiLU": nn.SiLU, "GELU": nn.GELU, "TanhGELU": lambda: nn.GELU(approximate="tanh"),
         "TanhGELU-written": TanhGELU, "ReLU": nn.ReLU}


@cached_pattern
def gated_feed_forward() -> Pattern:
    """down(act(gate(x)) · up(x)): the gated FFN of decoders (SwiGLU in Llama-style ones, GeGLU in Gemma's and
    T5 v1.1's). A match's variant names the gate's activation (`GATES`)."""
    return Pattern("gated-feed-forward", *[
        Variant(_Gated(act()).eval(), (torch.randn(2, 4),), ignore_literals=True, name=name.split("-")[0])
        for name, act in GATES.items()])


class _FusedGated(nn.Module):
    """gate and up as one Linear whose output is chunked in two (Phi-3's gate_up_proj), either product order."""

    def __init__(self, act: nn.Module, gate_first: bool):
        super().__init__()
        self.gate_up, self.down = nn.Linear(4, 16, bias=False), nn.Linear(8, 4)
        self.act, self.gate_first = act, gate_first

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up if self.gate_first else up * self.act(gate))


@cached_pattern
def fused_gated_feed_forward() -> Pattern:
    """down(act(gate) · up) with [gate; up] = gate_up(x), one Linear chunked in two along its outputs (Phi-3).
    A hidden unit j is row j (gate) and row H + j (up) of `gate_up`, and column j of `down`."""
    return Pattern("fused-gated-feed-forward", *[
        Variant(_FusedGated(act(), first).eval(), (torch.randn(2, 4),), ignore_literals=True, name=name.split("-")[0])
        for name, act in GATES.items() for first in (True, False)])


def layer_of(gm: fx.GraphModule, node: object, kinds: tuple[type, ...]) -> nn.Module | None:
    """The module a call_module node runs, if it is one of `kinds`."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, kinds):
            return module
    return None


def layers(module: nn.Module, kinds: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every layer of `kinds` the model runs: call_module targets in a graph (and the layers
    inside them, e.g. the two Linears of a factorized layer an earlier pass made), else the tree."""
    if isinstance(module, fx.GraphModule):
        seen = dict.fromkeys(n.target for n in module.graph.nodes if n.op == "call_module")
        return [(f"{path}.{sub}" if sub else path, layer) for path in seen
                for sub, layer in module.get_submodule(path).named_modules() if isinstance(layer, kinds)]
    return [(path, m) for path, m in module.named_modules() if isinstance(m, kinds)]


def same_input(module: nn.Module, paths: list[str]) -> dict[str, list[str]]:
    """Per layer path, the layers among `paths` that the graph calls on the very same value (q/k/v of an
    attention, gate/up of a gated block), in graph order; each layer alone outside a graph (or where one
    module is called more than once)."""
    alone = {path: [path] for path in paths}
    calls = single_calls(module, paths)
    if calls is None:
        return alone
    by_value: dict[object, list[str]] = {}
    for node in calls:
        if len(node.args) == 1 and not node.kwargs:
            by_value.setdefault(node.args[0], []).append(node.target)
    return alone | {path: group for group in by_value.values() for path in group}


def single_calls(module: nn.Module, paths: list[str]) -> list[fx.Node] | None:
    """The call_module nodes that run the layers at `paths`, in graph order, when the graph calls none of
    them twice; None where one is (a shared module) or outside a graph."""
    if not isinstance(module, fx.GraphModule):
        return None
    wanted = set(paths)
    calls = [n for n in module.graph.nodes if n.op == "call_module" and n.target in wanted]
    return calls if len({n.target for n in calls}) == len(calls) else None


def attribute(module: nn.Module, target: str):
    """The tensor (or module) a `get_attr` target names, e.g. "layer.0.weight"."""
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def shared_weight(module: nn.Module, path: str) -> bool:
    """Whether the graph also reads the weight of the layer at `path` elsewhere (tied embeddings):
    replacing the layer would leave that reader without its tensor."""
    return isinstance(module, fx.GraphModule) and any(
        n.op == "get_attr" and n.target == f"{path}.weight" for n in module.graph.nodes)


def module_paths(node: fx.Node) -> list[str]:
    """The module paths a captured node was traced inside, outermost first (from export's nn_module_stack)."""
    return [path for path, _type in (node.meta.get("nn_module_stack") or {}).values()]


def region(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    """The compute nodes traced inside module `path`.

    Shape queries on the region's input (sym_size) are left out: export shares them with later code.
    """
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module") and path in module_paths(n)]
    inside = set(nodes)
    shared: set[fx.Node] = set()
    for n in nodes:  # topological order: a size computed from shared sizes is shared too
        if not _is_tensor(n) and all(a not in inside or a in shared for a in n.all_input_nodes):
            shared.add(n)
    return [n for n in nodes if n not in shared]


def region_io(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(tensor inputs from outside, nodes used outside) of a region; parameters and sizes do not count."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                                if a not in inside and a.op != "get_attr" and _is_tensor(a)))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return inputs, outputs


def mutates(node: fx.Node) -> bool:
    """Whether a call writes a tensor in place: an aten op whose schema says so, a function named like one
    (`add_`), or a function that declares the argument it writes (`writes_into_arg`)."""
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return node.target.__name__.endswith("_") or getattr(node.target, "writes_into_arg", None) is not None


def alias_source(node: fx.Node) -> fx.Node | None | bool:
    """The node whose memory `node`'s value shares, from the op's alias annotations (views, in-place ops,
    and functions that declare `writes_into_arg`): None when the op returns fresh memory; False when it
    cannot be known from the graph (graph inputs, parameters, layers, functions without a schema)."""
    if node.op != "call_function":
        return False
    written = getattr(node.target, "writes_into_arg", None)
    if written is not None:
        return node.args[written]
    schema = getattr(node.target, "_schema", None)
    if schema is None or len(schema.returns) != 1:
        return False
    alias = schema.returns[0].alias_info
    if alias is None:
        return None
    source = next((a for a, arg in zip(node.args, schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.before_set == alias.before_set), None)
    return source if isinstance(source, fx.Node) else False


def _is_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return node.op in ("placeholder", "call_module") or isinstance(val, torch.Tensor)


def replace_region(gm: fx.GraphModule, path: str, module: nn.Module) -> str | None:
    """Replace everything traced inside `path` by one call of `module` (registered at `path`).

    Returns None on success or why the region cannot be replaced as a one-input, one-output layer.
    """
    nodes = region(gm, path)
    inputs, outputs = region_io(nodes)
    if len(inputs) != 1 or len(outputs) != 1:
        return f"it has {len(inputs)} inputs and {len(outputs)} outputs in the graph (need 1 and 1)"
    with gm.graph.inserting_before(outputs[0]):
        call = gm.graph.call_module(path, (inputs[0],))
    call.meta.update({k: v for k, v in outputs[0].meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
    outputs[0].replace_all_uses_with(call)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    # The old parameter holder at `path` can go unless something outside the region still reads it.
    if any(_under(n, path) for n in gm.graph.nodes if n is not call):
        call.target = path + "_rewritten"
    set_submodule(gm, call.target, module)
    return None


def _under(node: fx.Node, path: str) -> bool:
    return node.op in ("get_attr", "call_module") and (node.target == path or node.target.startswith(path + "."))
