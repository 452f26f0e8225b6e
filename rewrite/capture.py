"""Capture: an nn.Module and example inputs become one torch.fx.GraphModule (torch.export first).

Exported graphs are aten-level, so spelling variants collapse into one op and the same graph feeds
`.pt2`, ONNX and AOTInductor. Every dimension is offered to export as `Dim.AUTO`: export keeps the
ones the model allows dynamic (batch, sequence, spatial) and specializes the rest. Parametrized
aten ops (linear, convNd, batch_norm) are lifted back into `call_module` nodes holding real
`nn.Linear` / `nn.ConvNd` / `nn.BatchNormNd`, so module-level passes see the same layers in a
graph as in an eager model that could not be captured.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.utils._pytree import tree_flatten

from rewrite.errors import InvalidValue, first_line


@dataclass
class Captured:
    """A captured model: a GraphModule (or the eager module when capture failed) and its example inputs."""

    module: nn.Module
    example_inputs: tuple
    graph: bool
    dynamic_dims: dict[int, list[int]] = field(default_factory=dict)
    note: str = ""
    original: nn.Module | None = None  # the eager copy it was captured from (for re-capture at other shapes)

    @property
    def dynamic_shapes(self) -> tuple:
        """The `dynamic_shapes` to re-export with: the captured dynamic dims as Dim.AUTO."""
        return tuple(
            {d: Dim.AUTO for d in self.dynamic_dims.get(i, [])} if isinstance(x, torch.Tensor) else None
            for i, x in enumerate(self.example_inputs)
        )

    @property
    def export_inputs(self) -> tuple:
        """The inputs to export the rewritten graph with (`dynamic_shapes` beside them): the example, or its one
        row twice where the batch is free, since export fixes a dim it traces at size 1 (as `_export_two_rows`)."""
        batch_free = self.graph and _batch_free(self.example_inputs, self.dynamic_dims)
        two = _two_rows(self.example_inputs) if batch_free else None
        return two if two is not None else self.example_inputs

    def shape_problem(self, batch: tuple) -> str | None:
        """Why a captured graph cannot run `batch` (a dim export specialized differs), else None."""
        if not self.graph:
            return None
        for i, (x, ref) in enumerate(zip(batch, self.example_inputs)):
            if not (isinstance(x, torch.Tensor) and isinstance(ref, torch.Tensor)):
                continue
            free = set(self.dynamic_dims.get(i, []))
            fixed = [d for d in range(ref.dim()) if d not in free]
            if x.dim() != ref.dim() or any(x.shape[d] != ref.shape[d] for d in fixed):
                return (f"has input {i} of shape {tuple(x.shape)}, but the graph was captured for "
                        f"{tuple(ref.shape)} with dims {fixed} fixed by export")
        return None

    def describe(self) -> str:
        if not self.graph:
            return f"eager (not captured): {self.note}"
        if not any(self.dynamic_dims.values()):
            return "graph; every shape specialized by export: Result.model_for(*inputs) rewrites for other shapes"
        dims = "; ".join(f"input {i}: dims {v}" for i, v in self.dynamic_dims.items() if v)
        return f"graph; dynamic {dims}"


def without_kv_cache(model: nn.Module, inputs: tuple) -> str | None:
    """Hugging Face decoders return a KV-cache object by default, which export cannot return: turn it off
    on our private copy (the rewrite computes the full-sequence forward) and say so when it returned one.
    Every config is turned off, not only the model's: T5 gives its decoder stack a copy of its own."""
    flags = cache_flags(model)
    if not any(flags.values()):
        return None
    outputs = run(model, inputs)
    values = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, tuple) else [outputs]
    set_cache_flags(model, dict.fromkeys(flags, False))  # harmless where no cache was returned (encoders)
    if any("Cache" in type(v).__name__ for v in values):
        return ("use_cache turned off for the rewrite: the rewritten model computes the full-sequence forward "
                "and returns no KV cache (past_key_values)")
    return None


def cache_flags(model: nn.Module) -> dict[str, bool]:
    """config.use_cache of the model ("") and of each submodule with a config of its own, by module path."""
    return {path: m.config.use_cache for path, m in model.named_modules()
            if isinstance(getattr(getattr(m, "config", None), "use_cache", None), bool)}


def set_cache_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """config.use_cache set per module path (`cache_flags`' form); paths the model no longer has are left."""
    for path, value in flags.items():
        config = getattr(_submodule_or_none(model, path), "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = value


CLASS_FEATURES = ("generate", "save_pretrained", "config")


def class_features(model: nn.Module | None) -> list[str]:
    """What a user keeps when their model comes back as its own class rather than a graph (a Hugging Face
    model's generate, save_pretrained, config); [] where there is nothing to keep."""
    return [name for name in CLASS_FEATURES if model is not None and hasattr(model, name)]


def _submodule_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def copied(module: Any) -> Any:
    """copy.deepcopy, without the FutureWarning torch 2.13 raises when a graph's pytree specs are copied (its
    own deprecated LeafSpec class warns on being copied): nothing there for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
        return copy.deepcopy(module)


def capture(model: nn.Module, example_inputs: tuple) -> Captured:
    """Capture a copy of `model` (the user's module is never modified). Falls back to eager on failure."""
    model = copied(model).eval()
    try:
        gm, dynamic = _export(model, example_inputs)
    except Exception as exc:  # export raises many types; all mean "not capturable"
        return Captured(model, example_inputs, graph=False, note=explain_failure(exc, model), original=model)
    lift_layers(gm)
    drop_inference_dropout(gm)
    return Captured(gm, example_inputs, graph=True, dynamic_dims=dynamic, original=model)


def drop_inference_dropout(gm: fx.GraphModule) -> int:
    """Remove the dropout nodes an eval-mode export keeps (aten.dropout with train=False: the identity), so that
    patterns see what they read through (Phi-3's residual dropouts once hid its stream from `rotate`). Returns
    how many were removed."""
    dropped = 0
    for node in list(gm.graph.nodes):
        train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True)
        if node.op == "call_function" and node.target == torch.ops.aten.dropout.default and train is False:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped


@contextlib.contextmanager
def quiet_torch():
    """Export logs each specialized Dim.AUTO and dumps graphs on failure; the report states outcomes instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export(model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, dict[int, list[int]]]:
    with quiet_torch():
        found = _export_two_rows(model, inputs)
        gm, dynamic = found if found is not None else _export_loud(model, inputs)
    if any(dynamic.values()) and not _dynamic_dims_hold(gm, model, inputs, dynamic):
        # Export believed a dim was free, but the model bakes shape-specific constants (e.g. cached grids).
        with quiet_torch():
            gm = torch.export.export(model, inputs, strict=False).module()
        dynamic = {i: [] for i in dynamic}
    return gm, dynamic


def _export_two_rows(model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, dict[int, list[int]]] | None:
    """Export traced on two rows where the example has one, or None. Export fixes every dim of size 1 that it is
    traced at, so an example of batch 1 (an LLM's prompt, a text window) gave a graph that took no other batch:
    calibration batches of 2 were refused, and the .pt2 ran one row at a time. Traced on the example's row twice,
    the batch stays free; the graph is kept only where it computes what the model does on one row."""
    wide = _two_rows(inputs)
    if wide is None:
        return None
    try:
        gm, dynamic = _export_loud(model, wide)
    except Exception:  # noqa: BLE001 (export raises many types): trace the example as it is
        return None
    if not _batch_free(inputs, dynamic):
        return None
    short = _cut_short(inputs, dynamic)  # the example's row, at most SHORT positions: a forward costs little
    agrees = (short is not inputs and _agrees(gm, model, short)) or _agrees(gm, model, inputs)
    return (gm, dynamic) if agrees else None


def _agrees(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> bool:
    """Whether the graph computes what the model does on `inputs` (False where either raises: a ViT's patch
    grid cut too short for its guards)."""
    try:
        with torch.no_grad():
            return _same(model(*inputs), gm(*inputs))
    except Exception:  # noqa: BLE001 (a guard, a shape error: the model's code raises what it likes)
        return False


def _batch_free(inputs: tuple, dynamic: dict[int, list[int]]) -> bool:
    """Whether every tensor input's first dim is free in the graph."""
    return all(0 in dynamic.get(i, []) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor))


def _two_rows(inputs: tuple) -> tuple | None:
    """`inputs` with each tensor's one row repeated, where every tensor input has a first dim of size 1 (one
    batch, as the models' own batch); None otherwise."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(x.dim() == 0 or x.shape[0] != 1 for x in tensors):
        return None
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)


SHORT = 16  # free dims are checked cut to this many positions (then + 1), whatever the example's sizes


def _dynamic_dims_hold(gm: fx.GraphModule, model: nn.Module, inputs: tuple, dynamic: dict[int, list[int]]) -> bool:
    """Run both at a grown shape (each dynamic dim + 1, by repeating a slice) and compare: first on the inputs
    cut short (one row, SHORT positions), and at the example's own sizes only where that fails (a model too
    small a grid does not fit). At the example's sizes these two forwards were the capture's largest cost: 30 s
    of 46 for SmolLM2 from an 8 × 512 example, 6.5 s of 19 from one 512-token window."""
    short = _cut_short(inputs, dynamic)
    return (short is not inputs and _hold_grown(gm, model, short, dynamic)) or _hold_grown(gm, model, inputs, dynamic)


def _hold_grown(gm: fx.GraphModule, model: nn.Module, inputs: tuple, dynamic: dict[int, list[int]]) -> bool:
    grown = []
    for i, x in enumerate(inputs):
        for d in dynamic.get(i, []):
            x = torch.cat([x, x.narrow(d, x.shape[d] - 1, 1)], dim=d)
        grown.append(x)
    return _agrees(gm, model, tuple(grown))


def _cut_short(inputs: tuple, dynamic: dict[int, list[int]]) -> tuple:
    """`inputs` with every free dim but the batch cut to its first SHORT positions, and to the first row where
    all tensors share a free batch dim; `inputs` itself where nothing is cut."""
    tensors = [(i, x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    one_row = bool(tensors) and all(x.dim() > 0 and 0 in dynamic.get(i, []) and x.shape[0] == tensors[0][1].shape[0]
                                    for i, x in tensors)
    cut = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            for d in dynamic.get(i, []):
                if d > 0 or one_row:
                    x = x.narrow(d, 0, min(x.shape[d], SHORT) if d else 1)
        cut.append(x)
    same = all(not isinstance(x, torch.Tensor) or x.shape == y.shape for x, y in zip(inputs, cut))
    return inputs if same else tuple(cut)


def _same(want: Any, got: Any, tolerance: float = 1e-4) -> bool:
    """The export computes what the model does (float noise aside): every leaf equal in structure, and
    within `tolerance` relative L2. Verification proper (verify.compare) judges rewrites, not captures."""
    (a, spec_a), (b, spec_b) = tree_flatten(want), tree_flatten(got)
    if spec_a != spec_b:
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return False
            x, y = x.detach().double(), y.detach().double()
            if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
                return False
            x, y = x.nan_to_num(), y.nan_to_num()
            if float((x - y).norm()) > tolerance * max(float(x.norm()), 1e-12):
                return False
    return True


def _export_loud(model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, dict[int, list[int]]]:
    auto = tuple({d: Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None for x in inputs)
    if _takes_varargs(model):  # forward(*tensors) (blockwise.FlatCall): export binds them to one argument
        auto = (auto,)
    try:
        ep = torch.export.export(model, inputs, dynamic_shapes=auto, strict=False)
    except Exception:
        # Some models trace only with static shapes; capture per shape then.
        ep = torch.export.export(model, inputs, strict=False)
    gm = ep.module()
    return gm, _dynamic_dims(gm)


def _takes_varargs(model: nn.Module) -> bool:
    params = list(inspect.signature(model.forward).parameters.values())
    return bool(params) and params[0].kind is inspect.Parameter.VAR_POSITIONAL


def _dynamic_dims(gm: fx.GraphModule) -> dict[int, list[int]]:
    dims: dict[int, list[int]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims[i] = [d for d, s in enumerate(val.shape) if free_symbols(s)]
    return dims


def explain_failure(exc: BaseException, model: nn.Module) -> str:
    """One line: which module, which source line, what export said."""
    names = {id(m): n for n, m in model.named_modules()}
    where, module = "", f"the model ({type(model).__name__})"
    torch_dir = os.path.dirname(torch.__file__)
    for frame, line in _user_frames(exc, torch_dir):
        where = f" at {os.path.basename(frame.f_code.co_filename)}:{line}"
        code = frame.f_code
        owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None  # `self`, however named
        if isinstance(owner, nn.Module):
            module = _module_name(owner, model, names)
    return (f"cannot capture {module}{where}: {first_line(exc, 200)}; "
            "graph passes are skipped, module passes run on the eager model")


def _module_name(owner: nn.Module, model: nn.Module, names: dict[int, str]) -> str:
    """Export may run a copy of the model: fall back to the only submodule of the same class."""
    name = names.get(id(owner))
    if name is None:
        same = [n for n, m in model.named_modules() if type(m) is type(owner)]
        name = same[0] if len(same) == 1 else None
    label = (name or "<root>") if name is not None else "?"
    return f"module '{label}' ({type(owner).__name__})"


def _user_frames(exc: BaseException, torch_dir: str) -> list:
    """Frames outside torch, outermost first, from the exception chain that reaches deepest into user code."""
    best: list = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = [(f, n) for f, n in traceback.walk_tb(exc.__traceback__)
                  if not f.f_code.co_filename.startswith(torch_dir)]
        best = frames if len(frames) >= len(best) else best
        exc = exc.__cause__ or exc.__context__
    return best


# --- lifting parametrized aten ops back into modules -------------------------------------------

# The `.padding` overloads are convolutions given padding="valid" or "same" (SigLIP's and ViTs' patch embeddings);
# nn.ConvNd takes the same string.
_CONV = {torch.ops.aten.conv1d.default: nn.Conv1d, torch.ops.aten.conv2d.default: nn.Conv2d,
         torch.ops.aten.conv3d.default: nn.Conv3d, torch.ops.aten.conv1d.padding: nn.Conv1d,
         torch.ops.aten.conv2d.padding: nn.Conv2d, torch.ops.aten.conv3d.padding: nn.Conv3d}


def lift_layers(gm: fx.GraphModule) -> int:
    """Turn aten linear/conv/batch_norm calls on parameters into call_module nodes. Returns how many."""
    computed = _computed_by_module(gm)
    lifted, moved = 0, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        found = _matmul_linear(gm, node, computed) or _packed_linear(gm, node, moved)
        if found is not None:
            owner, data, result, layer = found
        else:
            owner = _param_owner(gm, node)
            if owner is None or (node.target == torch.ops.aten.linear.default and
                                 _does_more_than(computed, owner, {node})):
                continue
            layer = _build_layer(gm, node, owner)
            if layer is None:
                continue
            data, result = node.args[0], node
            if node.target == torch.ops.aten.addmm.default:  # addmm(bias, x, W), inside Conv1D's flatten/unflatten
                data, result = _unflattened(node)
        set_submodule(gm, owner, layer)
        with gm.graph.inserting_before(result):
            new = gm.graph.call_module(owner, (data,))
        new.meta.update(result.meta)
        result.replace_all_uses_with(new)
        lifted += 1
    gm.graph.eliminate_dead_code()
    for holder, names in moved:  # their get_attr nodes are gone with the product now in the Linear
        for name in names:
            delattr(holder, name)
    gm.recompile()
    return lifted


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
_aten = torch.ops.aten


def _computed_by_module(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """The tensor-valued calls each module made itself (the innermost module of their trace), by module path."""
    computed: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op == "call_function" and stack and isinstance(node.meta.get("val"), torch.Tensor):
            computed.setdefault(list(stack.values())[-1][0], []).append(node)
    return computed


def _does_more_than(computed: dict[str, list[fx.Node]], owner: str, nodes: set[fx.Node]) -> bool:
    """Whether the module at `owner` computed tensors besides `nodes` (an MoE router takes the softmax and top-k of
    its product and returns them too): the module is then more than the layer, which is not lifted (it could not
    stand in for the module in your model, and routers are best left in float anyway). Other calls of the same
    layer (ALBERT runs one layer in every block) read its tensors themselves and are not more."""
    def own_tensors(node: fx.Node) -> bool:
        return any(a.op == "get_attr" and a.target.startswith(owner + ".") for a in node.all_input_nodes)

    return any(node not in nodes and not own_tensors(node) for node in computed.get(owner, []))


def _matmul_linear(gm: fx.GraphModule, transpose: fx.Node, computed: dict[str, list[fx.Node]]
                   ) -> tuple[str, fx.Node, fx.Node, nn.Linear] | None:
    """(owner path, x, the node giving x @ Wᵀ (+ b), its Linear) where `transpose` is Wᵀ of a 2-D weight that only
    that matmul reads, on a holder of nothing but that weight (and the bias added right after)."""
    weight = transpose.args[0] if transpose.op == "call_function" and transpose.args else None
    flipped = transpose.target in (_aten.t.default, _aten.numpy_T.default) or (
        transpose.target == _aten.transpose.int and sorted(transpose.args[1:3]) in ([-2, -1], [0, 1])) or (
        transpose.target == _aten.permute.default and list(transpose.args[1]) == [1, 0])
    if not (flipped and isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")
            and len(transpose.users) == 1):
        return None
    [matmul] = transpose.users
    if matmul.target != _aten.matmul.default or matmul.args[1] is not transpose or matmul.kwargs:
        return None
    owner = weight.target.rsplit(".", 1)[0]
    holder = gm.get_submodule(owner)
    params = dict(holder.named_parameters(recurse=False)) | dict(holder.named_buffers(recurse=False))
    if type(holder) is not nn.Module or any(True for _ in holder.children()) or params["weight"].dim() != 2:
        return None
    result, add = matmul, next(iter(matmul.users)) if len(matmul.users) == 1 else None
    bias = add.args[1] if add is not None and add.target == _aten.add.Tensor and add.args[0] is matmul else None
    if isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{owner}.bias":
        result = add
    if set(params) != ({"weight", "bias"} if result is add and add is not None else {"weight"}):
        return None
    if _does_more_than(computed, owner, {transpose, matmul, result}):
        return None
    w = params["weight"]
    return owner, matmul.args[0], result, _adopt(nn.Linear(w.shape[1], w.shape[0], bias="bias" in params,
                                                            device="meta"), params)


def packed_name(layer_path: str, kind: str) -> str:
    """Where a model keeps the tensor `kind` (weight, bias) of a Linear that capture lifted from a packed product:
    attn.in_proj, weight → attn.in_proj_weight (`_packed_linear`; the transplant puts them back there)."""
    return f"{layer_path}_{kind}"


def _packed_linear(gm: fx.GraphModule, node: fx.Node, moved: list[tuple[nn.Module, list[str]]]
                   ) -> tuple[str, fx.Node, fx.Node, nn.Linear] | None:
    """(new path, x, the node, its Linear) for linear(x, W, b) on tensors that a holder keeps under other names and
    reads nowhere else: nn.MultiheadAttention's in_proj_weight and in_proj_bias, q, k and v in one product (a fifth
    of a ViT's weights, which Linear-reading passes would not see). The tensors move into a Linear `in_proj` beside
    the holder's other children; (holder, their old names) goes into `moved`, to be deleted once the graph no
    longer reads them."""
    if node.target != _aten.linear.default or node.kwargs or len(node.args) not in (2, 3):
        return None
    weight, bias = node.args[1], node.args[2] if len(node.args) == 3 else None
    tensors = [t for t in (weight, bias) if t is not None]
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" and len(t.users) == 1 for t in tensors):
        return None
    owner, _, name = weight.target.rpartition(".")
    stem = name.removesuffix("_weight")
    path = f"{owner}.{stem}".lstrip(".")
    if stem in ("", name) or (bias is not None and bias.target != packed_name(path, "bias")):
        return None
    holder = gm.get_submodule(owner)
    w = getattr(holder, name)
    if w.dim() != 2 or hasattr(holder, stem) or not isinstance(w, nn.Parameter):
        return None
    names = [t.target.rpartition(".")[2] for t in tensors]
    params = dict(zip(("weight", "bias"), (getattr(holder, n) for n in names)))
    moved.append((holder, names))
    return path, node.args[0], node, _adopt(nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta"),
                                            params)


def _unflattened(addmm: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(input, output) of a Linear applied as view(x, [-1, in]) → addmm → view back to x's leading dims
    (GPT-2's Conv1D): (x, the outer view), so the lifted Linear runs on x itself and patterns see
    Linear → activation → Linear without views between. Otherwise (the 2-D input, the addmm)."""
    flat, users = addmm.args[1], list(addmm.users)
    if not (isinstance(flat, fx.Node) and flat.target in _VIEWS and len(users) == 1 and users[0].target in _VIEWS):
        return flat, addmm
    x, back = flat.args[0], users[0]
    x_val, back_val = x.meta.get("val"), back.meta.get("val")
    if not (isinstance(x_val, torch.Tensor) and isinstance(back_val, torch.Tensor)):
        return flat, addmm
    if x_val.dim() < 2 or back_val.dim() != x_val.dim() or back_val.shape[:-1] != x_val.shape[:-1]:
        return flat, addmm
    return x, back


def _param_owner(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The module path holding this op's weight, if the op is a plain parametrized layer."""
    weight = node.args[2 if node.target == torch.ops.aten.addmm.default else 1] if len(node.args) > 2 or (
        len(node.args) > 1 and node.target != torch.ops.aten.addmm.default) else None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
        return None
    return weight.target.rsplit(".", 1)[0]


def _build_layer(gm: fx.GraphModule, node: fx.Node, owner: str) -> nn.Module | None:
    holder = gm.get_submodule(owner)
    if type(holder) is not nn.Module or any(True for _ in holder.children()):
        return None  # already lifted, or a container the layer would hide
    params = dict(holder.named_parameters(recurse=False)) | dict(holder.named_buffers(recurse=False))
    if node.target == torch.ops.aten.linear.default:
        return _linear(node, params)
    if node.target == torch.ops.aten.addmm.default:
        return _transposed_linear(node, params)
    if node.target in _CONV:
        return _conv(node, params)
    if node.target == torch.ops.aten.batch_norm.default:
        return _batch_norm(node, params, owner)
    return None


def _args_are(node: fx.Node, params: dict, names: list[str]) -> bool:
    """The op's parameter arguments are exactly get_attr nodes of this holder's tensors, and no others."""
    if set(params) - set(names) - {"num_batches_tracked"}:
        return False
    args = list(node.args[1:1 + len(names)]) + [None] * len(names)
    for arg, name in zip(args, names):
        used = isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target.endswith("." + name)
        if used != (name in params) or (arg is not None and not used):
            return False
    return True


def _linear(node: fx.Node, params: dict) -> nn.Module | None:
    if node.kwargs or not _args_are(node, params, ["weight", "bias"]):
        return None
    w = params["weight"]
    layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params, device="meta")
    return _adopt(layer, params)


def _transposed_linear(node: fx.Node, params: dict) -> nn.Module | None:
    """addmm(bias, x, W) with W (in × out): GPT-2's Conv1D, a Linear whose weight is stored transposed."""
    bias, _x, weight = node.args[:3]
    if node.kwargs or set(params) != {"weight", "bias"} or params["weight"].dim() != 2:
        return None
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (bias, weight)) or \
            not (weight.target.endswith(".weight") and bias.target.endswith(".bias")):
        return None
    w = params["weight"]
    layer = nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        layer.weight.copy_(w.detach().T)
        layer.bias.copy_(params["bias"].detach())
    return layer


def _conv(node: fx.Node, params: dict) -> nn.Module | None:
    if node.kwargs or not _args_are(node, params, ["weight", "bias"]):
        return None
    w = params["weight"]
    defaults = [1, 0, 1, 1]
    options = list(node.args[3:7])
    stride, padding, dilation, groups = options + defaults[len(options):]
    layer = _CONV[node.target](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                               padding=padding, dilation=dilation, groups=groups,
                               bias="bias" in params, device="meta")
    return _adopt(layer, params)


def _batch_norm(node: fx.Node, params: dict, owner: str) -> nn.Module | None:
    names = ["weight", "bias", "running_mean", "running_var"]
    if node.kwargs or not _args_are(node, params, names) or node.args[5]:  # args[5]: training
        return None
    x = node.args[0].meta.get("val")
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3, 4, 5):
        return None
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
    layer = kind(params["running_mean"].shape[0], eps=node.args[7], momentum=node.args[6],
                 affine="weight" in params, device="meta").eval()
    return _adopt(layer, params)


def _adopt(layer: nn.Module, params: dict) -> nn.Module:
    """Give a meta-device layer the holder's own tensors (shared, not copied)."""
    for name, tensor in params.items():
        if isinstance(tensor, nn.Parameter):
            setattr(layer, name, tensor)
        else:
            layer.register_buffer(name, tensor)
    return layer


# --- calling a captured graph as the original was called ----------------------------------------

class CallLikeOriginal:
    """A forward pre-hook: keyword (and default) arguments → the positional inputs the graph was captured with.

    `model(input_ids=..., attention_mask=...)` then works on a rewritten Hugging Face model captured from
    positional example inputs; torch.export's own input check (which runs after this) still guards shapes.
    """

    def __init__(self, signature: inspect.Signature, count: int):
        self.signature = signature  # the original forward's (a GraphModule's own names its inputs the same)
        self.count = count  # how many positional inputs the graph takes

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not kwargs and len(args) == self.count:
            return args, kwargs
        try:
            bound = bind_positional(self.signature, args, kwargs)
        except TypeError as exc:
            raise InvalidValue(f"cannot call the rewritten model this way: {exc}") from None
        if len(bound) > self.count:
            extra = list(self.signature.parameters)[self.count:len(bound)]
            raise InvalidValue(f"the rewrite was captured without {', '.join(extra)}: rewrite again with example "
                               "inputs that include them") from None
        rest = list(self.signature.parameters.values())[len(bound):self.count]
        missing = [p.name for p in rest if p.default is None or p.default is p.empty]
        if missing:
            raise InvalidValue(f"the rewrite was captured with {', '.join(missing)} as input(s): pass them too")
        return bound + tuple(p.default for p in rest), {}


def accept_original_calls(module: nn.Module, original: nn.Module, inputs: tuple) -> nn.Module:
    """Let a captured (or rebuilt) module take the original forward's calling conventions."""
    if (type(module) is type(original) and module is not original) or any(
            isinstance(h, CallLikeOriginal) for h in module._forward_pre_hooks.values()):
        return module
    hook = CallLikeOriginal(inspect.signature(original.forward), len(inputs))
    module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    return module


def layer_count(module: nn.Module) -> int:
    """Modules that hold weights themselves: parameters, or weight buffers (a quantized layer keeps its int8
    codes and scales there). The same count for an eager model and its captured graph, whose modules keep
    the eager paths, so a report's tables agree."""
    return sum(1 for m in module.modules() if _has_weights(m, recurse=False))


def module_path(module: nn.Module, node_name: str) -> str:
    """Where a graph node comes from in the user's model: the module path a user can find in their code
    (the node's name, e.g. layer_norm_4, in parentheses); the name itself when it is no node's."""
    node = next((n for n in module.graph.nodes if n.name == node_name), None) if isinstance(
        module, fx.GraphModule) else None
    if node is None:
        return node_name
    if node.op == "call_module":
        return str(node.target)
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return f"{stack[-1][0]} ({node_name})" if stack and stack[-1][0] else node_name


def weight_buffers(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    """Buffers that hold weights: more than one number and not indices (position_ids, counters)."""
    return [b for b in module.buffers(recurse) if b.numel() > 1 and b.dtype not in (torch.int64, torch.int32)]


def _has_weights(module: nn.Module, recurse: bool = True) -> bool:
    return any(True for _ in module.parameters(recurse)) or bool(weight_buffers(module, recurse))


def run(module: nn.Module, inputs: tuple) -> Any:
    with torch.no_grad():
        return module(*inputs)


def outputs_on(module: nn.Module, batches: list[tuple], known: list | None = None,
               masks: list | None = None) -> list:
    """`module`'s outputs on `batches`. `known`: those of another form of the same function there (the model a
    graph was captured from, the graph a layer copy was made from). Where `module` gives them bit for bit on
    the probe batches (the first, and the one with the most padding), they are taken whole instead of a
    forward over every batch: the same kernels on the same inputs round the same way. On SmolLM2 a forward
    over 16 × 256 calibration tokens takes half a minute, and a run made four of them."""
    if not known or len(known) != len(batches):
        return [run(module, batch) for batch in batches]
    probes = {i: run(module, batches[i]) for i in sorted({0, _most_padded(masks)})}
    if all(bit_equal(out, known[i]) for i, out in probes.items()):
        return list(known)
    return [probes[i] if i in probes else run(module, batch) for i, batch in enumerate(batches)]


def bit_equal(a: Any, b: Any) -> bool:
    """Two outputs (pytrees) of the same structure whose tensors are equal to the bit, dtype and shape too."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and all(_same_leaf(x, y) for x, y in zip(leaves_a, leaves_b))


def _same_leaf(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return x is y or (type(x) is type(y) and isinstance(x, (int, float, str, bool)) and x == y)


def _most_padded(masks: list | None) -> int:
    """The batch whose padding mask keeps the smallest share of positions (0 without masks)."""
    shares = [float(m.float().mean()) if isinstance(m, torch.Tensor) else 1.0 for m in masks or []]
    return min(range(len(shares)), key=shares.__getitem__) if shares else 0


def bind_positional(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple:
    """A call's arguments as the positional tuple a capture takes: the forward's named parameters in
    order, up to the last one given (defaults in between). Raises TypeError for names the forward
    only takes through **kwargs or keyword-only (a captured graph has positional inputs only)."""
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise TypeError(f"{', '.join(map(repr, unknown))} can only be passed by keyword (** or keyword-only); "
                        f"give inputs among: {', '.join(names)}")
    if len(args) > len(positional):
        raise TypeError(f"{len(args)} positional inputs, but forward() names only {len(positional)}")
    values = list(args) + [kwargs.get(p.name, p.default) for p in positional[len(args):]]
    if any(v is inspect.Parameter.empty for v in values[:_last_given(names, args, kwargs) + 1]):
        missing = [n for n, v in zip(names, values) if v is inspect.Parameter.empty]
        raise TypeError(f"missing required input(s) {', '.join(map(repr, missing))}")
    return tuple(values[:_last_given(names, args, kwargs) + 1])


def _last_given(names: list[str], args: tuple, kwargs: dict) -> int:
    given = [i for i, n in enumerate(names) if i < len(args) or (n in kwargs and kwargs[n] is not None)]
    return max(given, default=-1)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
