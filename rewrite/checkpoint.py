"""Hugging Face checkpoint folders read lazily, and the block-by-block output folder.

In: a folder with `config.json` and safetensors weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`). The model is built with its parameters on the meta device (buffers such
as rotary frequencies are computed as usual); everything outside the stack of blocks is read at once, each
block only when `rewrite.blockwise` reaches it, and dropped once its rewritten form is written.

Out: `rewrite-blocks.json` (the manifest), `config.json`, `rest.safetensors` (the weights outside the
stack) and one `block-NNNNN.pt2` per rewritten block. `rewrite.load(folder)` builds the model from these.
"""
from __future__ import annotations

import contextlib
import gc
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import treespec_dumps, treespec_loads

from rewrite import measure
from rewrite.errors import RewriteError, first_line
from rewrite.text import inside
from rewrite.emit import hf
from rewrite.emit.hf import guard_save_pretrained
from rewrite.loading import Loaded, Trust, load, load_pt2

MANIFEST = "rewrite-blocks.json"
REMOTE_CODE = 'add --trust-remote-code if you trust its authors (Python: trusted="remote-code")'
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FORMAT = "rewrite-blockwise/1"


def load_model(spec: str, trusted: Any = False) -> Loaded:
    """What `rewrite.load` reads: a folder (block-by-block output, layers folder, checkpoint) here, a file or
    `module:factory` through `rewrite.loading`. `trusted`: see `loading.Trust`."""
    trust, path = Trust.of(trusted), Path(spec)
    if is_rewritten(path):
        return Loaded(load_rewritten(path, trust))
    if is_layered(path):
        return Loaded(load_layers(path, trust.remote_code))
    if is_checkpoint(path):
        return Loaded(load_whole(path, trust.remote_code))
    return load(spec, trust.pickle)


def is_checkpoint(path: Any) -> bool:
    return isinstance(path, (str, Path)) and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def is_rewritten(path: Any) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / MANIFEST).is_file()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get meta parameters (no memory); buffers stay real (e.g. rotary inv_freq)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Shards:
    """Tensor name → safetensors file, read one prefix at a time. Every shard's header is read up front, so a
    missing, truncated or foreign shard is refused before any work."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            inside(folder, index, "the shard index")
            try:
                self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise RewriteError(f"{str(index)!r} is not a safetensors index ({first_line(exc)}): re-save the "
                                   "checkpoint with save_pretrained") from None
        elif (folder / "model.safetensors").is_file():
            self.files = {name: folder / "model.safetensors" for name in _names(folder / "model.safetensors")}
        else:
            raise RewriteError(f"checkpoint folder {str(folder)!r} has no model.safetensors or "
                               "model.safetensors.index.json: save it with save_pretrained(safe_serialization=True)")
        for file in sorted(set(self.files.values())):
            inside(folder, file, "the shard")
        missing = sorted({str(f.name) for f in self.files.values() if not f.is_file()})
        if missing:
            raise RewriteError(f"checkpoint folder {str(folder)!r} lacks the shard(s) {', '.join(missing)} that its "
                               "index lists: copy the whole checkpoint")
        self.headers = {file: _header(file) for file in sorted(set(self.files.values()))}
        for name, file in self.files.items():
            if name not in self.headers[file]:
                raise RewriteError(f"the index of {str(folder)!r} places {name!r} in {file.name}, which does not "
                                   "hold it: the shards and their index do not belong together; copy the whole "
                                   "checkpoint again")

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        """A tensor's shape and safetensors dtype, from its shard's header."""
        return self.headers[self.files[name]][name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    out.update({name: handle.get_tensor(name) for name in wanted})
            except Exception as exc:  # safetensors' own error type is not importable by name
                raise _damaged(file, exc) from None
        for name, tensor in out.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise RewriteError(f"checkpoint tensor {name!r} in {self.files[name].name} holds NaN or inf: the "
                                   "shard is damaged or the model diverged; copy the checkpoint again")
        return out


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                    for name in handle.keys()}
    except Exception as exc:
        raise _damaged(file, exc) from None


def _memory_failure(exc: BaseException) -> bool:
    """safetensors reports a failed mmap (the address space or the data limit is full) like a bad file."""
    return any(words in str(exc) for words in ("unable to mmap", "allocate memory"))


def _out_of_memory(file: Path, exc: BaseException) -> RewriteError:
    return RewriteError(f"out of memory reading the shard {str(file)!r} ({first_line(exc, 100)}): the file is "
                        "fine, this process has no room for it; free memory, or give rewrite the folder with --out "
                        "so that it works one block at a time")


def _damaged(file: Path, exc: BaseException) -> RewriteError:
    """Why a shard could not be read: out of memory where the mapping failed for that, else a bad file."""
    if _memory_failure(exc):
        return _out_of_memory(file, exc)
    return RewriteError(f"the shard {str(file)!r} is damaged or not safetensors ({first_line(exc, 100)}): copy or "
                        "download the checkpoint again")


def _names(file: Path) -> list[str]:
    return list(_header(file))


def build_empty(folder: Path, use_cache: bool | None = False, remote_code: bool = False) -> nn.Module:
    """The checkpoint's architecture from its config.json, parameters on meta, in eval mode, no KV cache
    (use_cache=None: as the config says). Python files the config names run only with `remote_code`."""
    try:
        import transformers
    except ImportError:
        raise RewriteError("reading a checkpoint folder needs transformers: pip install transformers") from None
    config, raw = read_config(folder, remote_code)
    cls = _model_class(config, raw, folder, remote_code)
    if use_cache is not None:
        config.use_cache = use_cache
    try:
        with parameters_on_meta():
            model = cls(config)
    except Exception as exc:
        raise RewriteError(f"{str(folder / 'config.json')!r} does not describe a model {cls.__name__} can build "
                           f"({first_line(exc, 100)}): re-save the checkpoint with save_pretrained") from None
    return model.eval()


def read_config(folder: Path, remote_code: bool = False) -> tuple[Any, dict]:
    """transformers' config and the raw JSON. Custom configuration code is refused unless trusted."""
    import transformers
    file = folder / "config.json"
    inside(folder, file, "config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        assert isinstance(raw, dict), "not a JSON object"
    except (OSError, ValueError, AssertionError) as exc:
        raise RewriteError(f"{str(file)!r} is not a readable JSON config ({first_line(exc, 100)}): re-save the "
                           "checkpoint with save_pretrained") from None
    try:
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=remote_code), raw
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise RewriteError(f"{str(file)!r} names Python code (auto_map: {_custom_code(raw)}) that loading it "
                               f"would run: {REMOTE_CODE}") from None
        raise RewriteError(f"cannot read {str(file)!r}: {first_line(exc)}") from None


def _custom_code(raw: dict) -> str:
    auto_map = raw.get("auto_map")
    return ", ".join(str(v) for v in auto_map.values()) if isinstance(auto_map, dict) else repr(auto_map)


def _model_class(config: Any, raw: dict, folder: Path, remote_code: bool) -> type:
    """transformers' class that `architectures` names; the checkpoint's own code for it only when trusted."""
    import transformers
    arch = (getattr(config, "architectures", None) or [None])[0]
    auto_map = raw.get("auto_map") if isinstance(raw.get("auto_map"), dict) else {}
    ref = next((v for v in auto_map.values() if isinstance(v, str) and arch and v.rsplit(".", 1)[-1] == arch), None)
    if ref and remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        try:
            return get_class_from_dynamic_module(ref, str(folder))
        except Exception as exc:
            raise RewriteError(f"cannot import {ref} from {str(folder)!r}: {first_line(exc)}") from None
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None and ref:
        raise RewriteError(f"{str(folder / 'config.json')!r} names its own model code ({ref}) that loading it would "
                           f"run: {REMOTE_CODE}")
    if cls is None:
        raise RewriteError(f"{str(folder / 'config.json')!r} names no transformers architecture (architectures: "
                           f"{arch!r}): save the checkpoint with save_pretrained")
    return cls


def return_freed_memory() -> None:
    """Ask glibc to serve every allocation above 128 KiB by mmap, so a freed block's tensors go back to the
    system. Its default threshold rises after the first large frees (up to 32 MiB), after which freed
    tensors stay in the heap: the resident size then grows by a block's worth per block."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _refuse_quantized(folder: Path) -> None:
    """A quantized checkpoint (e.g. the compressed-tensors folder dgq writes) is read by transformers, not here."""
    try:
        quantized = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return  # build_empty says what is wrong with the config
    if quantized:
        method = quantized.get("quant_method", "quantized") if isinstance(quantized, dict) else "quantized"
        raise RewriteError(f"{str(folder)!r} is a {method} checkpoint: load it with transformers' "
                           "AutoModelForCausalLM.from_pretrained(DIR) (pip install compressed-tensors for rewrite's "
                           "dgq folders); rewrite reads float checkpoints and its own layers folders")


class Lazy:
    """A checkpoint's model whose stack of blocks is read from disk one block at a time."""

    def __init__(self, folder: str | Path, remote_code: bool = False):
        return_freed_memory()
        self.folder = Path(folder)
        _refuse_quantized(self.folder)
        self.model = build_empty(self.folder, remote_code=remote_code)
        self.shards = Shards(self.folder)
        self._check_layouts()
        self.stack, self.blocks = _stack_of(self.model)  # (None, []): read whole (load_whole)
        self._load_rest()

    def _check_layouts(self) -> None:
        """Every tensor the checkpoint holds for the model has the shape and kind config.json implies."""
        for name, expected in self.model.state_dict(keep_vars=True).items():
            if name not in self.shards.files:
                continue
            shape, dtype = self.shards.layout(name)
            if shape != tuple(expected.shape) or (expected.is_floating_point() and dtype not in FLOAT_DTYPES):
                raise RewriteError(
                    f"checkpoint tensor {name!r} ({self.shards.files[name].name}) is {dtype} {list(shape)}, but the "
                    f"model config.json describes needs {str(expected.dtype).removeprefix('torch.')} "
                    f"{list(expected.shape)}: the weights and config.json do not belong together")

    def _load_rest(self) -> None:
        def outside(name: str) -> bool:
            return self.stack is None or not name.startswith(self.stack + ".")

        names = [n for n in self.model.state_dict() if outside(n) and n in self.shards.files]
        self.model.load_state_dict(self.shards.read(names), strict=False, assign=True)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        empty = [n for n, p in self.model.named_parameters() if p.is_meta and outside(n)]
        if empty:
            raise RewriteError(f"checkpoint {str(self.folder)!r} lacks the weight(s) {', '.join(empty[:3])}: "
                               "copy the whole checkpoint")

    def load(self, index: int) -> None:
        block = self.blocks[index]
        if not any(p.is_meta for p in block.parameters()):
            return
        prefix = f"{self.stack}.{index}."
        names = [n for n in self.shards.files if n.startswith(prefix)]
        state = {n[len(prefix):]: t for n, t in self.shards.read(names).items()}
        missing = [n for n, _ in block.named_parameters() if n not in state]
        if missing:
            raise RewriteError(f"checkpoint {str(self.folder)!r} lacks {prefix}{missing[0]}: copy the whole checkpoint")
        block.load_state_dict(state, strict=False, assign=True)

    def check_disk(self, out_parent: Path) -> None:
        """The rewritten model is never larger than the checkpoint: that much free space is needed."""
        need, free = self.shards.nbytes(), shutil.disk_usage(out_parent).free
        if free < need:
            raise RewriteError(f"{out_parent} has {free / 2**30:.1f} GiB free but the output may need "
                               f"{need / 2**30:.1f} GiB (the checkpoint's size): free space or choose another -o")


def write_rest(model: nn.Module, stack: str, folder: Path) -> dict[str, str]:
    """The weights outside the stack as safetensors; tied tensors once, with aliases for the manifest."""
    from safetensors.torch import save_file
    seen: dict[int, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if name.startswith(stack + "."):
            continue
        key = tensor.data_ptr()
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(folder / "rest.safetensors"))
    return aliases


def write_manifest(folder: Path, source: Path, stack: str, layouts: list[tuple], aliases: dict[str, str]) -> None:
    """`layouts`: per block, (pytree spec, constants, leaf count) of how the model calls it (Gemma 3's sliding
    and full attention layers take other arguments)."""
    shutil.copyfile(source / "config.json", folder / "config.json")
    calls = [{"spec": treespec_dumps(flat_spec), "constants": {str(i): v for i, v in constants.items()},
              "leaves": leaves} for flat_spec, constants, leaves in layouts]
    (folder / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "stack": stack, "blocks": [block_file(i) for i in range(len(layouts))],
        "calls": calls, "aliases": aliases}, indent=2))


def block_file(index: int) -> str:
    return f"block-{index:05d}.pt2"


def load_rewritten(folder: str | Path, trusted: Any = False) -> nn.Module:
    """The model a block-by-block run wrote: config → module, rest.safetensors, each block's program."""
    from safetensors.torch import load_file

    from rewrite import blockwise  # torch.export machinery: only when a block-by-block folder is read
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["format"] == FORMAT
    except (OSError, ValueError, KeyError, AssertionError):
        raise RewriteError(f"{str(folder / MANIFEST)!r} is not a {FORMAT} manifest: write the folder with "
                           "rewrite optimize --blockwise") from None
    trust = Trust.of(trusted)
    model = build_empty(folder, remote_code=trust.remote_code)
    model.load_state_dict(load_file(str(folder / "rest.safetensors")), strict=False, assign=True)
    _restore_aliases(model, manifest["aliases"])
    stack = model.get_submodule(manifest["stack"])
    calls = manifest.get("calls") or [manifest["call"]] * len(manifest["blocks"])  # older folders: one "call" for all
    for index, (file, call) in enumerate(zip(manifest["blocks"], calls)):
        module, _ = load_pt2(folder / file, trust.pickle)
        spec, constants = treespec_loads(call["spec"]), {int(i): v for i, v in call["constants"].items()}
        stack[index] = blockwise.BlockCall(module, spec, constants, call["leaves"])
    _check_complete(model, folder)
    gc.collect()
    return guard_save_pretrained(model, None)


def _restore_aliases(model: nn.Module, aliases: dict[str, str]) -> None:
    """Tied tensors (written once) shared again: name → the name it was written under."""
    for name, source in aliases.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source) if _is_parameter(model, source)
                else model.get_buffer(source))


def _check_complete(model: nn.Module, folder: Path) -> None:
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise RewriteError(f"{str(folder)!r} lacks the weight(s) {', '.join(empty[:3])}: the folder is incomplete")


def _is_parameter(model: nn.Module, name: str) -> bool:
    return name in dict(model.named_parameters())


class OnDisk(nn.Module):
    """Stands in for a rewritten block once it is written; the model runs again after `rewrite.load`."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RewriteError(f"this block was written to {self.file} and is not in memory: load the output folder "
                           "with rewrite.load(OUT)")


def by_blocks(folder: str | Path, remote_code: bool = False) -> bool:
    """Whether the checkpoint's model has a stack of identical blocks to rewrite one at a time; a model without one
    (ModernBERT, whose first layer has no attention norm; a CNN) is read whole, where it fits in memory."""
    try:
        model = build_empty(Path(folder), remote_code=remote_code)
    except RewriteError:
        return True  # a folder that builds no model: the block route's checks say why, in their order
    if _stack_of(model)[0] is not None:
        return True
    size, free = Shards(Path(folder)).nbytes(), measure.free_memory()
    if free is not None and 2 * size > free:
        raise RewriteError(f"{type(model).__name__} has no stack of identical blocks (an nn.ModuleList of layers of "
                           f"one class and shape) to rewrite one at a time, and its {size / 2**30:.1f} GiB would not "
                           f"fit in memory twice ({free / 2**30:.1f} GiB free)")
    return False


def _stack_of(model: nn.Module) -> tuple[str | None, Any]:
    """(path, blocks) of the model's stack of identical blocks, or (None, []) where it has none (ModernBERT, whose
    first layer has no attention norm; a CNN)."""
    from rewrite import blockwise
    try:
        return blockwise.find_stack(model)
    except RewriteError:
        return None, []


def load_whole(folder: str | Path, remote_code: bool = False) -> nn.Module:
    """A checkpoint folder's model with every block read (for commands that need it whole, e.g. diff)."""
    lazy = Lazy(folder, remote_code)
    for index in range(len(lazy.blocks)):
        lazy.load(index)
    return lazy.model


# --- the layers folder (emit.hf writes it): the user's class with rewritten layers ---------------------

def is_layered(path: Any) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / hf.LAYERS_FILE).is_file()


def load_layers(folder: str | Path, remote_code: bool = False) -> nn.Module:
    """The model `write_layers` wrote: its class from config.json, each rewritten layer rebuilt from its
    tensors by the class the manifest names (rewrite's own classes only: nothing else is imported)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    manifest = _layers_manifest(folder)
    try:
        tensors = load_file(str(folder / hf.LAYER_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise RewriteError(f"cannot read {str(folder / hf.LAYER_WEIGHTS)!r}: {first_line(exc)}: the folder is "
                           "incomplete; write it again with rewrite optimize -o") from None
    model = build_empty(folder, use_cache=None, remote_code=remote_code)
    for path, layer in _rebuilt_layers(manifest, tensors, folder).items():
        owner, _, attr = path.rpartition(".")
        setattr(model.get_submodule(owner), attr, layer)
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(p + ".") for p in manifest["layers"])}
    model.load_state_dict(rest, strict=False, assign=True)
    _restore_aliases(model, manifest["aliases"])
    _check_complete(model, folder)
    return guard_save_pretrained(model.eval(), None)


def _rebuilt_layers(manifest: dict, tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, nn.Module]:
    """The outermost rewritten layers, each rebuilt by its class from its tensors and saved config; a layer
    inside another (a quantized factor) is rebuilt first and handed to its holder's from_state."""
    layers, configs, built = manifest["layers"], manifest.get("configs", {}), {}
    for path in sorted(layers, key=lambda p: -p.count(".")):  # the innermost first
        children = {inner[len(path) + 1:]: built.pop(inner) for inner in list(built) if inner.startswith(path + ".")}
        own = {name[len(path) + 1:]: t for name, t in tensors.items()
               if name.startswith(path + ".") and not any(name.startswith(f"{path}.{c}.") for c in children)}
        try:
            kwargs = dict(configs.get(path, {})) | ({"children": children} if children else {})
            built[path] = _layer_class(layers[path], folder).from_state(own, **kwargs)
        except (TypeError, KeyError, ValueError, RuntimeError) as exc:
            raise RewriteError(f"cannot rebuild the layer {path} from {str(folder)!r} ({type(exc).__name__}: "
                               f"{first_line(exc)}): the folder is damaged; write it again with rewrite optimize -o"
                               ) from None
    return built


def _layers_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / hf.LAYERS_FILE).read_text())
        assert manifest["format"] == hf.LAYERS_FORMAT
        assert isinstance(manifest["layers"], dict) and isinstance(manifest["aliases"], dict)
        assert isinstance(manifest.get("configs", {}), dict)
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        raise RewriteError(f"{str(folder / hf.LAYERS_FILE)!r} is not a {hf.LAYERS_FORMAT} manifest: write the folder with "
                           "rewrite optimize -o DIR") from None
    return manifest


def _layer_class(where: Any, folder: Path) -> type:
    import importlib
    module_name, _, name = str(where).partition(":")
    cls = None
    if module_name == "rewrite" or module_name.startswith("rewrite."):
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and hasattr(cls, "from_state")):
        raise RewriteError(f"{str(folder / hf.LAYERS_FILE)!r} names the layer class {where!r}, which this version of "
                           "rewrite does not have: upgrade rewrite, or write the folder again")
    return cls
