"""The user's own model back: the layers and weights passes rewrote in the captured graph, put into a copy
of the eager module, so a Hugging Face model stays its class, with `config`, `generate()` and its KV cache.

Capture lifts each Linear / Conv into a call_module node at the eager module's path (`model.layers.0.mlp.
up_proj`). Layer passes (dgq, fwsvd, lowrank, tconv) replace the module at that path, and some change weights
in place (dgq's smoothing divides a norm's weight). So: every module the graph calls goes to the same path
of the copy, every tensor of the graph's state to the same name. It is accepted only when the copy then
computes what the verified graph computes on the calibration batches; where a pass changed the graph itself
(t1's DFT form, pointwise, inplace, fold-bn) it does not, and the graph is the result.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from rewrite import capture, compress, verify
from rewrite.errors import first_line
from rewrite.patterns import set_submodule


def onto_eager(graph: nn.Module, eager: nn.Module, batches: list[tuple], masks: list | None = None,
               want: list | None = None) -> tuple[nn.Module, list] | str:
    """(a copy of `eager` holding `graph`'s rewritten layers and weights, its outputs on `batches`), or why not
    where it would compute something else than `graph` there (positions `masks` keep). `want`: the graph's
    outputs on `batches` where the caller has them (verification computed them); where the copy gives them
    bit for bit on the probe batches, they are its outputs (`capture.outputs_on`)."""
    if not isinstance(graph, fx.GraphModule) or isinstance(eager, fx.GraphModule):
        return "the model was not captured as a graph"
    target = capture.copied(eager)
    paths, transposed, packed, replaced = dict(target.named_modules()), set(), set(), []
    for node in graph.graph.nodes:
        if node.op != "call_module":
            continue
        module = graph.get_submodule(node.target)
        if node.target not in paths:
            if _lifted_packed(module, node.target, paths):  # left a Linear: its tensors go back under your names
                packed.add(node.target)
                continue
            if capture.layer_count(module):  # a graph pass made it
                return f"the graph has a layer at {node.target}, a path your model does not have"
            continue  # export's own helpers (_guards_fn); an output check below catches anything else
        if type(module) is type(paths[node.target]):
            continue  # not replaced: its weights come over below, into your tensors (ties kept: lm_head = embed)
        if _lifted_conv1d(module, paths[node.target]):  # left a Linear: back into your Conv1D, as it stores it
            _into_conv1d(module, paths[node.target])
            transposed.add(node.target)
            continue
        set_submodule(target, node.target, module)
        replaced.append(node.target)
    _untie_held_apart(target, graph.state_dict())
    mine = target.state_dict()
    with torch.no_grad():
        for name, tensor in graph.state_dict().items():
            owner, _, kind = name.rpartition(".")
            if owner in transposed:
                continue
            if owner in packed:  # attn.in_proj.weight → attn.in_proj_weight
                name = capture.packed_name(owner, kind)
            if name in mine and mine[name].shape == tensor.shape and mine[name].data_ptr() != tensor.data_ptr():
                mine[name].copy_(tensor)
    want = want if want is not None else [capture.run(graph, batch) for batch in batches]
    running: list[str] = []  # the rewritten layers being called, innermost last
    try:
        with _tracked(target, replaced, running):
            got = capture.outputs_on(target, batches, want, masks)
        taken = all(g is w for g, w in zip(got, want))  # bit for bit on the probes: nothing left to compare
        same = taken or verify.compare(want, got, masks=masks).within_tolerance
    except Exception as exc:  # the copy cannot run what the graph runs (model code reads what a layer lacks)
        where = _inside(target, running)
        return f"your model's code raised {type(exc).__name__} with them{where}: {first_line(exc, 200)}"
    return (target, got) if same else "with them your model computed something else than the verified graph"


@contextlib.contextmanager
def _tracked(model: nn.Module, paths: list[str], running: list[str]):
    """Keep `running` as the stack of the rewritten layers being called (Mamba's head cast its input to the
    int8 dtype of a dgq layer's weight: the error alone did not say which layer)."""
    def enter(path: str):
        return lambda *_: running.append(path)

    def leave(*_) -> None:  # None: the layer's output stays as it is
        running.pop()

    handles = []
    for path in paths:
        layer = model.get_submodule(path)
        handles += [layer.register_forward_pre_hook(enter(path)), layer.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _inside(model: nn.Module, running: list[str]) -> str:
    """' in <path> (<class>; …)' for the innermost rewritten layer that was running when it raised, or ''."""
    if not running:
        return ""
    return f" in {running[-1]} ({type(model.get_submodule(running[-1])).__name__}; leave it out of the pass)"


def _lifted_packed(module: nn.Module, path: str, yours: dict[str, nn.Module]) -> bool:
    """A plain Linear in the graph where your model holds the same tensors as `<stem>_weight` (and `_bias`) and
    passes them to a function (nn.MultiheadAttention's in_proj): capture lifted it, and no pass replaced it."""
    owner, _, stem = path.rpartition(".")
    holder = yours.get(owner)
    return type(module) is nn.Linear and isinstance(getattr(holder, capture.packed_name(stem, "weight"), None),
                                                    torch.Tensor)


def _lifted_conv1d(module: nn.Module, yours: nn.Module) -> bool:
    """A plain Linear in the graph where your model has GPT-2's Conv1D (y = x·W + b, W stored (in, out)): capture
    lifted it, and no pass replaced it. Put in as a Linear, its (out, in) weight would be saved under your Conv1D's
    name, and your class would load it transposed."""
    return (type(module) is nn.Linear and compress.is_conv1d(yours)
            and tuple(yours.weight.shape) == tuple(module.weight.shape[::-1]))


@torch.no_grad()
def _into_conv1d(linear: nn.Linear, conv: nn.Module) -> None:
    """The Linear's weights (a pass may have changed them in place: dgq's smoothing) into the Conv1D."""
    conv.weight.copy_(linear.weight.t())
    if linear.bias is not None and conv.bias is not None:
        conv.bias.copy_(linear.bias)


def _untie_held_apart(target: nn.Module, held: dict[str, torch.Tensor]) -> None:
    """Tensors tied in `target` that the graph holds apart (rotate's output head, which takes the final norm's
    weight, against the embedding) each get their own, and a config that ties them says it no longer does, so
    that save_pretrained writes both and from_pretrained does not tie them again."""
    tied: dict[int, list[str]] = {}
    for name, tensor in target.state_dict(keep_vars=True).items():
        tied.setdefault(tensor.data_ptr(), []).append(name)
    for names in (names for names in tied.values() if len(names) > 1):
        if any(name not in held for name in names) or len({held[name].data_ptr() for name in names}) == 1:
            continue
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            module = target.get_submodule(owner)
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
        config = getattr(target, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def read_as_tensors(model: nn.Module) -> dict[str, str]:
    """The layers a pass must leave as they are for the rewritten layers to go back into your class, with why:
    nn.MultiheadAttention hands its out_proj's weight (and its packed in_proj, which capture lifts into a Linear)
    to the attention function as bare tensors, where no rewritten layer can stand in. Rewritten, your model
    (SigLIP's pooling head) would come back as a graph without save_pretrained and config. {} where the model
    has no class to keep (its graph is the result)."""
    if not capture.class_features(model):
        return {}
    why = (f"nn.MultiheadAttention in your {type(model).__name__} reads its weight as a tensor: rewritten, your "
           "model would come back as a graph without save_pretrained and config; kept as it is")
    return {f"{path}.{child}".lstrip("."): why for path, layer in model.named_modules()
            if isinstance(layer, nn.MultiheadAttention) for child in ("in_proj", "out_proj")}


def lost_in_the_graph(model: nn.Module, graph_passes: list[str], why: str = "") -> str | None:
    """What a user loses when the result is a GraphModule instead of their class (None: nothing to lose);
    `why`: what went wrong putting the layers back, where no graph pass applied."""
    kept = capture.class_features(model)
    if not kept:
        return None
    if graph_passes:
        return (f"the result is a graph, not your {type(model).__name__}: {', '.join(graph_passes)} changed the graph "
                f"itself, so {', '.join(kept)} and the KV cache are not on it; run the layer passes (dgq, fwsvd, "
                "lowrank, tconv) alone to keep your class")
    return (f"the result is a graph, not your {type(model).__name__}: its rewritten layers could not be put back "
            f"({why or 'no reason given'}), so {', '.join(kept)} and the KV cache are not on it")


def choose(graph: nn.Module, eager: nn.Module, graph_passes: list[str], batches: list[tuple],
           masks: list | None = None, graph_outputs: list | None = None
           ) -> tuple[nn.Module | None, list | None, str | None]:
    """(your class with the rewritten layers, or None to return the graph; its outputs on `batches`, or None;
    what the graph loses, if anything). Only a model with something to lose (a Hugging Face model's generate,
    config) is put back, and only when no graph pass applied: the graph then holds a rewrite the eager copy
    cannot."""
    if lost_in_the_graph(eager, graph_passes) is None or graph is eager:
        return None, None, None
    if graph_passes:
        return None, None, lost_in_the_graph(eager, graph_passes)
    own = onto_eager(graph, eager, batches, masks, graph_outputs)
    if isinstance(own, str):
        return None, None, lost_in_the_graph(eager, graph_passes, own)
    return own[0], own[1], None
