"""A folder `from_pretrained` loads: a Hugging Face model's config.json and model.safetensors, the rewritten
layers in the compressed-tensors format with a `quantization_config` (loading needs `pip install
compressed-tensors`, as for any llm-compressor checkpoint; vLLM reads the same folder).

A layer ships when it has `compressed_tensors() -> (tensors, {"bits", "group", "act"})` (dgq's DGQLinear) and
every tensor has the shape the class built from its config expects. A model holding another rewritten layer (a
factorized fwsvd/lowrank layer), or whose shapes changed (prune's narrower FFNs, GPT-2's Conv1D quantized as a
Linear) has no form from_pretrained knows: it is written as `write_layers` does (config.json,
rewritten.safetensors, rewrite-layers.json), which `rewrite.load(DIR)` reads back into the model's own class.
There is no model.safetensors in such a folder, so from_pretrained stops with "no file named
model.safetensors" instead of loading random weights.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rewrite import measure
from rewrite.errors import NoCompressedForm, RewriteError, first_line

COMPRESSED = "compressed-tensors"  # from_pretrained (and vLLM) load it
LAYERS = "rewrite-layers"  # rewrite.load loads it (rewrite.checkpoint.load_layers)
LAYERS_FILE = "rewrite-layers.json"
LAYERS_FORMAT = "rewrite-layers/1"
LAYER_WEIGHTS = "rewritten.safetensors"  # not model.safetensors: from_pretrained must not load it half-random




def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config") and hasattr(model.config, "to_dict")


@dataclass
class Saved:
    form: str  # COMPRESSED or LAYERS
    why_not_compressed: str = ""  # where the compressed-tensors form was written, and from_pretrained refused it


def save(model: nn.Module, folder: str | Path) -> Saved:
    """The model's folder: compressed-tensors where every rewritten layer has that form and from_pretrained
    loads it back (checked where compressed-tensors is installed and the model fits twice in memory), else
    rewrite's layers folder."""
    folder = Path(folder)
    if all(hasattr(layer, "compressed_tensors") for layer in rewritten_layers(model).values()):
        try:
            _save_compressed(model, folder)
            refused = _from_pretrained_refuses(model, folder)
            if not refused:
                return Saved(COMPRESSED)
            for name in ("config.json", "generation_config.json", "model.safetensors"):
                (folder / name).unlink(missing_ok=True)
            write_layers(model, folder)
            return Saved(LAYERS, refused)
        except (_NotInConfig, NoCompressedForm):  # prune's narrower FFN quantized after, an input rotated online
            pass
    write_layers(model, folder)
    return Saved(LAYERS)


def _from_pretrained_refuses(model: nn.Module, folder: Path) -> str:
    """Why your class's from_pretrained cannot load the compressed-tensors folder, or "". transformers renames
    some checkpoints' weights as it loads them, and a rename that splits one tensor in two (DINOv2's fused
    SwiGLU weights_in, under `conversion_mapping`) refuses the quantized tensors beside it, for any model of
    the class. A weight it would leave unset would be random. Not checked ("") without compressed-tensors or
    where a second copy of the model would not fit in memory."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free = measure.free_memory()
    if importlib.util.find_spec("compressed_tensors") is None or free is None or 4 * size > free:
        return ""
    try:
        with contextlib.redirect_stderr(io.StringIO()), _quiet_transformers():
            _, info = type(model).from_pretrained(folder, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 (transformers and compressed-tensors raise what they like)
        return f"{type(model).__name__}.from_pretrained refused its compressed-tensors form ({first_line(exc, 160)})"
    unset = [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]  # extra tensors are only not read
    if unset:
        return (f"{type(model).__name__}.from_pretrained would leave {len(unset)} weights unset from its "
                f"compressed-tensors form ({', '.join(map(str, unset[:3]))})")
    return ""


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _save_compressed(model: nn.Module, folder: Path) -> None:
    """config.json (+ quantization_config), generation_config.json and model.safetensors into `folder`."""
    from safetensors.torch import save_file
    part = _state(model, _expected_shapes(model))
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(model.config.to_dict() | {"architectures": [type(model).__name__]}, part.schemes, part.linears)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file(part.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


class Sharded:
    """The same folder written a piece at a time (a checkpoint rewritten block by block): each piece is one
    safetensors shard of `model.safetensors.index.json`, the config comes last. A piece that has no such form
    stops the folder (`problem` says why); the block-by-block output stays loadable by rewrite.load."""

    def __init__(self, model: nn.Module, folder: Path):
        self.expected, self.folder = _expected_shapes(model), folder
        self.weight_map: dict[str, str] = {}
        self.schemes: dict[tuple[int, int, str], list[str]] = {}
        self.linears: list[str] = []
        self.problem: str | None = None

    def add(self, module: nn.Module, file: str, prefix: tuple[str, str] = ("", "")) -> None:
        """Write `module`'s tensors to `file`, its names' prefix prefix[0] replaced by prefix[1]."""
        from safetensors.torch import save_file
        if self.problem:
            return
        try:
            part = _state(module, self.expected, lambda name: prefix[1] + name[len(prefix[0]):])
        except (RewriteError, NoCompressedForm) as exc:
            self.problem = str(exc)
            return
        save_file(part.tensors, str(self.folder / file), metadata={"format": "pt"})
        self.weight_map.update({name: file for name in part.tensors})
        for scheme, paths in part.schemes.items():
            self.schemes.setdefault(scheme, []).extend(paths)
        self.linears += part.linears

    def finish(self, config: dict) -> None:
        """The index and config.json (`config`: the source checkpoint's, as a dict)."""
        missing = sorted(self.expected.keys() - set(self.weight_map) - _tied(config, self.expected))
        if self.problem is None and missing:
            self.problem = f"the weights {', '.join(missing[:3])} were not written"
        if self.problem:
            for file in set(self.weight_map.values()):
                (self.folder / file).unlink(missing_ok=True)
            return
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.folder / "config.json").write_text(json.dumps(_config(config, self.schemes, self.linears), indent=2))


def _tied(config: dict, expected: dict) -> set[str]:
    return {"lm_head.weight"} & expected.keys() if config.get("tie_word_embeddings") else set()


def _config(config: dict, schemes: dict, linears: list[str]) -> dict:
    if not schemes:
        return config
    groups = {f"group_{i}": _scheme(paths, *scheme) for i, (scheme, paths) in enumerate(schemes.items())}
    return config | {"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized",
                                             "quantization_status": "compressed", "config_groups": groups,
                                             "ignore": linears}}


@dataclass
class _Part:
    tensors: dict[str, torch.Tensor]
    schemes: dict[tuple[int, int, str], list[str]]  # (bits, group, activation strategy) → its layers
    linears: list[str]  # the Linears left in float: compressed-tensors' ignore list


class _NotInConfig(RewriteError):
    """A tensor has no name or shape in the model's class as its config builds it."""


def _state(model: nn.Module, expected: dict[str, tuple], rename=lambda name: name) -> _Part:
    """The tensors under the names (and with the shapes) from_pretrained expects, and the compressed-tensors
    schemes. `expected`: name → shape in the model's class built from its config."""
    state, by_scheme, shipped = {}, {}, []
    for path, module in model.named_modules():
        if not hasattr(module, "compressed_tensors") or any(path.startswith(p + ".") for p in shipped):
            continue
        try:
            tensors, args = module.compressed_tensors()
        except ValueError as exc:
            raise RewriteError(f"save_pretrained cannot write {rename(path)}: {exc}") from None
        _check_shape(rename(f"{path}.weight"), tensors["weight"], expected)
        for name, tensor in tensors.items():
            if name != "bias" or rename(f"{path}.bias") in expected:
                state[rename(f"{path}.{name}")] = tensor
        by_scheme.setdefault((args["bits"], args["group"], args["act"]), []).append(rename(path))
        shipped.append(path)
    seen: set = set()
    for name, tensor in model.state_dict().items():
        if any(name.startswith(p + ".") for p in shipped):
            continue
        if rename(name) in expected:
            _check_shape(rename(name), tensor, expected)
        else:
            raise _NotInConfig(f"save_pretrained cannot write this rewritten model: {rename(name)} has no form "
                               "from_pretrained loads (it would load that layer as random weights); write it with "
                               "rewrite optimize -o DIR and read it back with rewrite.load(DIR)")
        if tensor.untyped_storage().data_ptr() in seen:
            continue  # a tied weight (lm_head = embed_tokens): from_pretrained ties it again
        seen.add(tensor.untyped_storage().data_ptr())
        state[rename(name)] = tensor
    linears = [rename(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return _Part({k: v.detach().contiguous() for k, v in state.items()}, by_scheme, linears)


def _check_shape(name: str, tensor: torch.Tensor, expected: dict[str, tuple]) -> None:
    if name in expected and tuple(tensor.shape) != expected[name]:
        raise _NotInConfig(f"save_pretrained cannot write {name} in a form from_pretrained loads: it is "
                           f"{tuple(tensor.shape)} where the config builds {expected[name]} (a narrower or "
                           "transposed layer); write it with rewrite optimize -o DIR and read it with rewrite.load")


def _expected_shapes(model: nn.Module) -> dict[str, tuple]:
    """Name → shape of the state of the model's class built from its config (on the meta device: no memory)."""
    with torch.device("meta"):
        empty = type(model)(model.config)
    return {name: tuple(t.shape) for name, t in empty.state_dict().items()}


def _scheme(targets: list[str], bits: int, group: int, act: str) -> dict:
    """One config group: asymmetric int weights per group, int8 activations (W4A8): dgq's act per-token
    (dynamic, symmetric per token), static (one calibrated symmetric scale a tensor, each layer's `input_scale`)
    or tensor (dynamic, asymmetric per tensor: a scale and zero point made from each input)."""
    return {"targets": targets, "format": "int-quantized",
            "weights": {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
                        "group_size": group, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": act != "tensor",
                                  "strategy": "token" if act == "per-token" else "tensor",
                                  "dynamic": act != "static"}}


def rewritten_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost modules of rewrite's own classes (the layers passes put in), by path."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if type(module).__module__.startswith("rewrite.") and not any(path.startswith(p + ".") for p in found):
            found[path] = module
    return found


def saved_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a layers folder rebuilds, by path: the outermost of rewrite's classes, and the ones inside a
    layer whose from_state takes them rebuilt (`takes_children`: a factorized pair quantized by dgq after)."""
    found: dict[str, nn.Module] = {}

    def visit(path: str, layer: nn.Module) -> None:
        inner = {".".join(filter(None, (name, sub))): m for name, child in layer.named_children()
                 for sub, m in rewritten_layers(child).items()}
        if not hasattr(type(layer), "from_state") or (inner and not getattr(type(layer), "takes_children", False)):
            what = type(layer).__name__ + (f" holding {type(next(iter(inner.values()))).__name__}" if inner else "")
            raise RewriteError(f"save_pretrained cannot write {path} ({what}): that layer has no saved form yet; "
                               "write the model with rewrite optimize -o DIR and read it back with rewrite.load(DIR)")
        found[path] = layer
        for name, child in inner.items():
            visit(f"{path}.{name}", child)

    for path, layer in rewritten_layers(model).items():
        visit(path, layer)
    return found


def write_layers(model: nn.Module, folder: Path) -> None:
    """A Hugging Face model whose rewritten layers have no standard form (factorized Linears): its config,
    every weight by its state-dict name (tied ones once) and, per rewritten layer, the class that rebuilds it
    from its tensors (`from_state`, with the layer's `saved_config()` where it has one). `rewrite.load(folder)`
    gives the model's own class back."""
    from safetensors.torch import save_file
    layers = saved_layers(model)
    seen: dict[int, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen and tensor.numel():  # empty tensors (dgq's per-token s_x) all point at 0: none is tied
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}  # as save_pretrained writes
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file(tensors, str(folder / LAYER_WEIGHTS), metadata={"format": "pt"})
    classes = {path: f"{type(layer).__module__}:{type(layer).__qualname__}" for path, layer in layers.items()}
    configs = {path: layer.saved_config() for path, layer in layers.items() if hasattr(layer, "saved_config")}
    (folder / LAYERS_FILE).write_text(json.dumps({"format": LAYERS_FORMAT, "layers": classes, "aliases": aliases,
                                                  "configs": configs},
                                            indent=2))


def _save_pretrained(self: nn.Module, save_directory: str | Path, **_ignored) -> None:
    """save_pretrained for a rewritten Hugging Face model: its layers in a form from_pretrained loads
    (`emit.hf`), or a one-line RewriteError naming the layer that has none (never random weights on reload)."""
    save(self, save_directory)


def guard_save_pretrained(model: nn.Module, reference: nn.Module | None) -> nn.Module:
    """Unless `model`'s weights have the names and shapes of `reference`'s (the model it was rewritten from;
    None: never), its save_pretrained writes through `emit.hf` or refuses: the class's own would write names
    from_pretrained does not know, which it loads as random weights and says so only in a log."""
    if not hasattr(model, "save_pretrained"):
        return model
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {} if reference is None else {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if mine != theirs:
        model.save_pretrained = types.MethodType(_save_pretrained, model)  # shadows the class's method
    return model
