"""x·Wᵀ = (x·Q)·(W·Q)ᵀ: rotate a decoder's residual stream by an orthogonal Q, so that quantization after it
meets no outlier channels. Exact in float.

RMSNorm(x·Q) = RMSNorm(x)·Q (an orthogonal Q keeps every norm), so with each RMSNorm's weight γ folded into
the Linears reading it (W ← W·diag(γ), γ ← 1), the whole stream can live rotated:

    E ← E·Q (token embeddings),  W_read ← W_read·diag(γ)·Q,  W_write ← Qᵀ·W_write, b_write ← b_write·Q

for the Linears reading a norm (q/k/v, gate/up, the output head) and those adding into the stream (o, down).
A few channels that carry most of a decoder's activation mass (and their weights' columns) are spread over
all channels, so int8 activations lose less. On SmolLM2 under dgq that helped on one calibration text (1.094x
→ 1.063x fp32 perplexity on unseen text) and not on another, where the weights lost what the activations gained
(RESULTS.md): a candidate to measure (`rewrite tune` does), not a default. QuaRot's other half, the online
rotation of inputs no offline Q reaches (down_proj's), is dgq's `hadamard` option.
Q = diag(±1)·(R ⊗ H₆₄) with H₆₄ a normalized Hadamard matrix and R a random orthogonal matrix of order
d/64 (a randomized Hadamard transform where d is not a power of two; plain random orthogonal where 64 ∤ d).
An output head tied to the embedding is untied (the head takes diag(γ) of the final norm, the embedding does
not): the model then stores the head apart, and its `config.tie_word_embeddings` says so.

Paper: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv:2404.00456 (2024) (the
rotation of the residual stream, §4.1; SpinQuant, arXiv:2405.16406, learns Q instead). Contract: exact (float
tolerance). Applies where the stream, from the embedding on, is read only by RMSNorms whose outputs only Linears
read, and written only by Linears, their sums and constant multiples (Llama, Mistral, Qwen2 and 3, SmolLM,
Phi-3, Mamba; Gemma, whose constant embedding scale commutes with Q and whose norms' γ = 1 + w folds as any γ
does; Granite, whose residual multiplier does; learned position tables added to the token embeddings, which take
E's rotation). Where LayerNorms read it (torch's: StableLM, StarCoder2, Phi, GPT-J, GPT-Neo, GPT-NeoX with a
norm for each parallel branch, OPT, StarCoder, GPT-2, whose Conv1D layers capture lifts into Linears and puts
back; Cohere's, written out without β), as SliceGPT does (Ashkboos et al., arXiv:2401.15024): LayerNorm ignores
its input's mean, so every addition is first centred (E ← E·C, W_write ← C·W_write, C = I − 11ᵀ/d) and the
stream stays zero-mean; Q is taken to keep the all-ones direction (a reflection after the Hadamard transform),
so the rotated stream stays zero-mean too and LN(x·Q) = LN(x)·Q with γ = 1; β, added after γ, becomes (β/γ)·Q.
The norms keep their class and form. Left alone: a norm on a block's output (OLMo 2, Gemma 2 and 3), a norm on
the embeddings (BLOOM), and post-norm encoders (BERT).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx, nn

from rewrite import measure, rotation
from rewrite.errors import InvalidValue
from rewrite.match import Match, Pattern, Variant, cached_pattern, is_dtype_check
from rewrite.pass_base import Exact, Pass, PassContext, PassResult
from rewrite.patterns import attribute, module_paths

_aten = torch.ops.aten
_PASS_THROUGH = {_aten.to.dtype, _aten.to.dtype_layout, _aten._to_copy.default, _aten.clone.default,
                 _aten.type_as.default, _aten.alias.default}  # alias: a no-op `.to()` (Mamba's mixer input)


class _RMSNorm(nn.Module):
    """weight · x / rms(x), as Hugging Face's LlamaRMSNorm computes it (cast) or torch's nn.RMSNorm (fused). The
    weight is an input here, so any 1-D tensor of the graph matches; the check says it is a parameter."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x, weight):
        if self.form == "fused":
            return nn.functional.rms_norm(x, (x.shape[-1],), weight, 1e-6)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.form == "offset":  # Gemma's: the scale is 1 + weight (zero-initialized weights)
            return normed * (1.0 + weight.float())
        return weight * (normed.to(torch.float32) if self.form == "cast" else normed)


@cached_pattern
def rms_norm() -> Pattern:
    """x → γ · x/rms(x), γ = weight: written out with or without the cast back to the input's dtype in between, or
    torch's fused op; or γ = c + weight (Gemma's c = 1, `offset`); at any epsilon."""
    example = (torch.randn(2, 3, 8), torch.randn(8))
    return Pattern("rms-norm", *[Variant(_RMSNorm(form), example, ignore_literals=True, name=form)
                                 for form in ("cast", "plain", "fused", "offset")], check=_norm_check)


class _LayerNorm(nn.Module):
    """torch's LayerNorm with an elementwise weight and bias (both inputs here; the check says they are parameters)."""

    def forward(self, x, weight, bias):
        return nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)


class _WrittenLayerNorm(nn.Module):
    """A LayerNorm without β written out, as Hugging Face's CohereLayerNorm computes it (in float32: the cast of its
    input to float32 is a node before the pattern, which the residual reads too)."""

    def forward(self, x, weight):
        mean = x.mean(-1, keepdim=True)
        variance = (x - mean).pow(2).mean(-1, keepdim=True)
        normed = (x - mean) * torch.rsqrt(variance + 1e-5)
        return (weight.to(torch.float32) * normed).to(torch.float32)


@cached_pattern
def layer_norm() -> Pattern:
    """x → γ · (x − mean)/std + β (torch's LayerNorm op), or γ · (x − mean)/std written out (Cohere's), at any
    epsilon."""
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    return Pattern("layer-norm", Variant(_LayerNorm(), (x, w, torch.randn(8)), ignore_literals=True, name="layer"),
                   Variant(_WrittenLayerNorm(), (x, w), ignore_literals=True, name="written"),
                   check=_norm_check)


def _norm_check(match: Match, gm: fx.GraphModule) -> str | None:
    """The norm's weight (and a LayerNorm's bias) are parameters of this norm alone: folding them changes no other."""
    for tensor in match.inputs[1:]:
        if tensor.op != "get_attr" or len([u for u in tensor.users if not is_dtype_check(u)]) != 1:
            return "its weight or bias is not a parameter of this norm alone"
    return None


def _offset(match: Match) -> float:
    """c of γ = c + weight (the `offset` form's literal); 0 where γ is the weight itself."""
    if match.variant != "offset":
        return 0.0
    weight = match.inputs[1]
    for node in match.nodes.values():
        if node.target == _aten.add.Tensor and any(_is_weight(a, weight) for a in node.args):
            return float(next(a for a in node.args if isinstance(a, (int, float))))
    raise ValueError("an offset RMSNorm without its c + weight")


def _is_weight(arg, weight: fx.Node) -> bool:
    """`arg` is the norm's weight, or the weight cast (`.float()`)."""
    return arg is weight or (isinstance(arg, fx.Node) and arg.target in _PASS_THROUGH and arg.args[0] is weight)


@dataclass
class _Stream:
    embedding: fx.Node  # the token lookup the stream starts at
    norms: list[Match]
    readers: dict[str, list[str]]  # norm output name → the Linears reading it
    writers: list[str]  # Linears adding into the stream
    tables: list[fx.Node] = dataclasses.field(default_factory=list)  # other lookups added in (learned positions)
    centred: bool = False  # LayerNorms read it: every addition is centred, and Q keeps the all-ones direction


@dataclass(frozen=True)
class Rotate(Pass):
    name = "rotate"
    paper = "Ashkboos et al., QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs, arXiv:2404.00456"
    summary = "rotate a decoder's residual stream (exact): quantization after it meets no outlier channels"
    contract = Exact()
    applies_to = ("pre-norm decoders with RMSNorm (Llama, Mistral, Qwen, SmolLM, Phi-3, Gemma, Granite) or LayerNorm "
                  "(OPT, GPT-2, GPT-Neo, GPT-J, Phi, StableLM, StarCoder, Cohere): the residual stream from the "
                  "embedding")
    level = "module"  # it reads the graph but changes weights only: the user's class takes them back
    graph_note = "no: it finds the residual stream in the captured graph (and changes weights only)"
    whole_model = "the residual stream from the token embedding to the output head"

    seed: int = 0  # which randomized Hadamard transform (any gives the same float model)

    def __post_init__(self):
        if not 0 <= self.seed < 2 ** 63:
            raise InvalidValue(f"seed={self.seed}: give a whole number from 0 to 2**63 - 1")

    @classmethod
    def finds_nothing_in(cls, module: nn.Module) -> bool:
        """No RMSNorm, and no LayerNorm in a causal LM (BERT's LayerNorms come after its residual adds)."""
        layer_norms = measure.causal_lm(module)
        return not any(type(m).__name__.endswith("RMSNorm") or isinstance(m, nn.RMSNorm) or
                       (layer_norms and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")))
                       for m in module.modules())

    @classmethod
    def patterns(cls) -> list[Pattern]:
        return [rms_norm()]

    def call(self, gm: nn.Module, ctx: PassContext) -> PassResult:
        if not isinstance(gm, fx.GraphModule):
            return PassResult(gm, False, {}, [("model", "not captured: the residual stream is found in the graph")])
        stream = residual_stream(gm)
        if isinstance(stream, str):
            return PassResult(gm, False, {}, [("residual stream", stream)])
        width = attribute(gm, stream.embedding.args[0].target).shape[1]
        dead = _dead_layer_norm(gm, stream)
        if dead:
            return PassResult(gm, False, {}, [("residual stream", dead)])
        untied = _untie_readers(gm, stream)
        q = orthogonal(width, self.seed)
        _rotate_weights(gm, stream, keeping_ones(q) if stream.centred else q)
        stats = {"width": width, "norms_folded": len(stream.norms), "writers": len(stream.writers),
                 "readers": sum(map(len, stream.readers.values()))}
        if untied:
            stats["untied"] = ", ".join(untied)
        return PassResult(gm, True, stats)


def _dead_layer_norm(gm: fx.GraphModule, stream: _Stream) -> str | None:
    """Why a LayerNorm's β cannot move before its γ (β/γ where γ is 0 on a channel), or None."""
    for norm in stream.norms:
        if len(norm.inputs) > 2 and bool((attribute(gm, norm.inputs[1].target) == 0).any()):
            return (f"the LayerNorm at {norm.outputs[0].name} has a zero weight on some channel: its bias cannot be "
                    "folded")
    return None


@torch.no_grad()
def _rotate_weights(gm: fx.GraphModule, stream: _Stream, q: torch.Tensor) -> None:
    """E ← E·Q, W_read ← W_read·diag(γ)·Q with γ ← 1, W_write ← Qᵀ·W_write and b_write ← b_write·Q (in float64)."""
    def set_to(tensor: torch.Tensor, value: torch.Tensor) -> None:
        tensor.copy_(value.to(tensor.dtype))

    centre = _centring(q.shape[0]) if stream.centred else torch.eye(q.shape[0], dtype=torch.float64)
    for lookup in [stream.embedding, *stream.tables]:
        table = attribute(gm, lookup.args[0].target)
        set_to(table, table.double() @ centre @ q)
    for norm in stream.norms:
        gamma, offset = attribute(gm, norm.inputs[1].target), _offset(norm)
        if len(norm.inputs) > 2:  # LayerNorm's β, added after γ: the readers see β/γ of the normed value, rotated
            beta = attribute(gm, norm.inputs[2].target)
            set_to(beta, (beta.double() / gamma.double()) @ q)
        for path in stream.readers[norm.outputs[0].name]:
            weight = gm.get_submodule(path).weight
            set_to(weight, (weight.double() * (gamma.double() + offset)) @ q)
        gamma.fill_(1.0 - offset)  # γ = offset + weight = 1
    for path in stream.writers:
        layer = gm.get_submodule(path)
        set_to(layer.weight, q.T @ centre @ layer.weight.double())
        if layer.bias is not None:
            set_to(layer.bias, layer.bias.double() @ centre @ q)


def _centring(width: int) -> torch.Tensor:
    """C = I − 11ᵀ/d: what every addition into a LayerNorm's stream is multiplied by (LayerNorm ignores the mean)."""
    return torch.eye(width, dtype=torch.float64) - 1.0 / width


def keeping_ones(q: torch.Tensor) -> torch.Tensor:
    """P·Q with P the reflection taking Q·u to u (u = 1/√d): orthogonal, and it maps the all-ones direction to itself,
    so a centred stream stays centred when rotated and LayerNorm's mean subtraction commutes with it."""
    u = torch.full((q.shape[0],), q.shape[0] ** -0.5, dtype=torch.float64)
    w = q @ u - u
    if float(w.norm()) < 1e-12:
        return q
    w = w / w.norm()
    return q - 2.0 * torch.outer(w, w @ q)


def orthogonal(width: int, seed: int) -> torch.Tensor:
    """Q (float64): diag(±1)·(R ⊗ H₆₄), R random orthogonal, or a random orthogonal Q where 64 ∤ width."""
    return rotation.factors(width, seed).dense()


def residual_stream(gm: fx.GraphModule) -> _Stream | str:
    """The stream's embeddings, norms, readers and writers, or why a rotation cannot pass somewhere."""
    embeddings = [n for n in gm.graph.nodes if n.target == _aten.embedding.default and n.args[0].op == "get_attr"]
    if not embeddings:
        return (f"{len(embeddings)} token embedding lookups in the graph: the rotation starts at the one embedding "
                "the stream starts from (a whole decoder, not one block of it)")
    layer_norms, rms_norms = layer_norm().find(gm) or [], rms_norm().find(gm) or []
    if layer_norms and {m.inputs[0] for m in rms_norms} - {m.inputs[0] for m in layer_norms}:
        return "the stream has both RMSNorms and LayerNorms: rotate folds one kind at a time"
    norms: dict[fx.Node, list[Match]] = {}  # by the value each reads: two norms on one (GPT-NeoX's parallel block)
    for match in layer_norms or rms_norms:
        norms.setdefault(match.inputs[0], []).append(match)
    stream = _Stream(embeddings[0], [], {}, [], centred=bool(layer_norms))
    todo, seen = [embeddings[0]], set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        for user in value.users:
            why = _follow(gm, value, user, norms, stream, todo, seen)
            if why:
                return why
    if not stream.norms:
        return "no RMSNorm or LayerNorm reads the residual stream"
    return stream


def _follow(gm, value, user, norms, stream, todo, seen) -> str | None:
    """Take `user` of a stream value into `stream` (or the queue), or say why the rotation cannot pass it."""
    if _reads_dtype_only(user, value):
        return None
    if user.target in _PASS_THROUGH or _scaled(user, value) or _keeps_features(value, user):
        todo.append(user)
        return None
    match = next((m for m in norms.get(value, []) if user in m.nodes.values()), None)
    if match is not None:
        if match not in stream.norms:
            readers, other = _linear_readers(gm, match.outputs[0])
            if other:
                return f"the norm at {match.outputs[0].name} feeds {other}, not only plain Linears (rotate goes " \
                       "first in a pipeline, before any quantization)"
            stream.norms.append(match)
            stream.readers[match.outputs[0].name] = readers
        return None
    if user.target == _aten.add.Tensor and all(isinstance(a, fx.Node) for a in user.args[:2]):
        other = user.args[1] if user.args[0] is value else user.args[0]
        if other in seen or other in todo:  # two stream values summed (parallel attention and MLP)
            todo.append(user)
            return None
        writers = _written_by(gm, other)
        if writers:
            stream.writers += [n.target for n in writers if n.op == "call_module"]
            stream.tables += [n for n in writers if n.op != "call_module"]
            todo.append(user)
            return None
        return (f"{user.name} adds {other.name} into the stream, which is not made of Linear outputs (rotate passes "
                "Linear outputs, their sums and constant multiples; a norm on a block's output, as OLMo 2 and Gemma 2 "
                "and 3 place one before the residual add, does not commute with a rotation)")
    if user.op == "output":
        return "the residual stream is a model output (a rotation would change it)"
    why = f"{user.name} ({user.target}) reads the residual stream and does not commute with a rotation"
    if user.target in (_aten.mean.dim, _aten.layer_norm.default):  # a LayerNorm the pattern did not take
        why += (" (a LayerNorm in a form rotate does not know, or without its own weight: rotate folds torch's "
                "LayerNorm and Cohere's written out)")
    return why


def _written_by(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The Linears (and table lookups) whose outputs `node` is made of, read nowhere else: one Linear's output, a
    constant multiple of it (Granite's residual multiplier), a sum of such (a parallel block's attention and MLP,
    as Phi's), or a lookup in a table of its own (learned positions, added to the token embeddings). Each takes
    the rotation in its output rows, and it passes through scalars and sums. [] where `node` is more."""
    if len([u for u in node.users if not _reads_dtype_only(u, node)]) != 1:
        return []
    if _is_linear(gm, node) or (node.target == _aten.embedding.default and node.args[0].op == "get_attr"
                                and len(node.args[0].users) == 1):
        return [node]
    parts = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if node.target in _PASS_THROUGH and parts:  # a cast (OPT's positions to the embeddings' dtype)
        return _written_by(gm, parts[0])
    scaled = [part for part in parts if _scaled(node, part)]  # a constant times it: _scaled checks the mul
    if scaled:
        return _written_by(gm, scaled[0])
    if node.target == _aten.add.Tensor and len(parts) == 2 and len(node.args) == 2:
        first, second = _written_by(gm, parts[0]), _written_by(gm, parts[1])
        return first + second if first and second else []
    return []


def _reads_dtype_only(user: fx.Node, value: fx.Node) -> bool:
    """`user` reads `value` for its dtype alone: export's dtype checks, and type_as(other, value) (Gemma's norms cast
    back so)."""
    return is_dtype_check(user) or (user.target == _aten.type_as.default and user.args[0] is not value)


def _scaled(user: fx.Node, value: fx.Node) -> bool:
    """`user` multiplies the stream by a constant scalar (Gemma scales its embeddings by √d): it commutes with Q."""
    if user.target != _aten.mul.Tensor or value not in user.args[:2]:
        return False
    other = user.args[1] if user.args[0] is value else user.args[0]
    return isinstance(other, (int, float)) or (isinstance(other, fx.Node) and _constant_scalar(other))


def _constant_scalar(node: fx.Node) -> bool:
    """A one-element tensor computed from the model's own tensors only (no input reaches it)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() != 1:
        return False
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        if current.op == "placeholder":
            return False
        if current not in seen:
            seen.add(current)
            todo += current.all_input_nodes
    return True


def _linear_readers(gm: fx.GraphModule, node: fx.Node) -> tuple[list[str], str | None]:
    """(the Linears reading `node`, also through casts and slices along other axes than the features, as the
    head reading the last position only; the first other reader in words, or None)."""
    readers = []
    for user in node.users:
        if _reads_dtype_only(user, node):
            continue
        if _is_linear(gm, user):
            readers.append(user.target)
            continue
        rank = node.meta["val"].dim() if isinstance(node.meta.get("val"), torch.Tensor) else None
        slices_tokens = user.target == _aten.slice.Tensor and rank and user.args[1] % rank != rank - 1
        if not (slices_tokens or user.target in _PASS_THROUGH or _keeps_features(node, user)):
            layer = type(gm.get_submodule(user.target)).__name__ if user.op == "call_module" else None
            return readers, f"{layer} {user.target}" if layer else f"{user.name} ({user.target})"
        more, other = _linear_readers(gm, user)
        readers += more
        if other:
            return readers, other
    return readers, None


def _keeps_features(node: fx.Node, user: fx.Node) -> bool:
    """`user` reshapes `node` over its leading axes only (GPT-Neo views its final norm's output before the head)."""
    if user.target not in (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default):
        return False
    before, after = node.meta.get("val"), user.meta.get("val")
    return isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape[-1] == after.shape[-1]


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear)


def _untie_readers(gm: fx.GraphModule, stream: _Stream) -> list[str]:
    """A reader whose weight the embedding also reads (a tied output head) gets its own copy: the head takes
    the final norm's γ and the embedding does not. The embedding's table moves to the eager model's name for
    it (`model.embed_tokens.weight`), so that the user's class gets both tensors back."""
    owner = stream.embedding.args[0].target.rpartition(".")[0]
    if not any(owner in paths for paths in stream.readers.values()):
        return []
    layer = gm.get_submodule(owner)
    table = layer.weight
    layer.weight = nn.Parameter(table.detach().clone(), requires_grad=False)
    _move_table(gm, stream.embedding, table)
    return [owner]


def _move_table(gm: fx.GraphModule, node: fx.Node, table: nn.Parameter) -> None:
    """Point the embedding lookup `node` at `table`, kept under the eager module's path of the lookup."""
    paths = module_paths(node)
    path = paths[-1] if paths else "rotated_embedding"
    if hasattr(_module_at(gm, path), "weight"):
        path = "rotated_embedding"
    _module_at(gm, path).register_parameter("weight", table)
    old = node.args[0]
    with gm.graph.inserting_before(node):
        node.replace_input_with(old, gm.graph.get_attr(f"{path}.weight"))
    if not old.users:
        gm.graph.erase_node(old)
    gm.recompile()


def _module_at(gm: fx.GraphModule, path: str) -> nn.Module:
    """The submodule at `path`, made (empty, with its parents) where the graph has none."""
    try:
        return gm.get_submodule(path)
    except AttributeError:
        gm.add_submodule(path, nn.Module())
        return gm.get_submodule(path)
