"""A folder `from_pretrained` loads: a Hugging Face model's config.json and model.safetensors, the rewritten
layers in the compressed-tensors format with a `quantization_config` (loading needs `pip install
compressed-tensors`, as for any llm-compressor checkpoint; vLLM reads the same folder).

A layer ships when it has `compressed_tensors() -> (tensors, {"bits", "group"})` (dgq's DGQLinear). A model
holding another rewritten layer (a factorized fwsvd/lowrank layer) has no form from_pretrained knows: it is
written as `rewrite.checkpoint.write_layers` does (config.json, rewritten.safetensors, rewrite-layers.json),
which `rewrite.load(DIR)` reads back into the model's own class. There is no model.safetensors in such a
folder, so from_pretrained stops with "no file named model.safetensors" instead of loading random weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rewrite import checkpoint
from rewrite.errors import RewriteError

COMPRESSED = "compressed-tensors"  # from_pretrained (and vLLM) load it
LAYERS = "rewrite-layers"  # rewrite.load loads it


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config") and hasattr(model.config, "to_dict")


def save(model: nn.Module, folder: str | Path) -> str:
    """The model's folder: compressed-tensors where every rewritten layer has that form, else rewrite's
    layers folder. Returns which (COMPRESSED or LAYERS)."""
    folder = Path(folder)
    if all(hasattr(layer, "compressed_tensors") for layer in checkpoint.rewritten_layers(model).values()):
        _save_compressed(model, folder)
        return COMPRESSED
    checkpoint.write_layers(model, folder)
    return LAYERS


def _save_compressed(model: nn.Module, folder: Path) -> None:
    """config.json (+ quantization_config), generation_config.json and model.safetensors into `folder`."""
    from safetensors.torch import save_file
    state, groups = _state(model)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}  # as save_pretrained writes
    if groups:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized",
                                         "quantization_status": "compressed", "config_groups": groups,
                                         "ignore": linears}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors under the names from_pretrained expects, and the compressed-tensors config groups."""
    expected = _expected_names(model)
    state, by_scheme, shipped = {}, {}, []
    for path, module in model.named_modules():
        if not hasattr(module, "compressed_tensors") or any(path.startswith(p + ".") for p in shipped):
            continue
        try:
            tensors, args = module.compressed_tensors()
        except ValueError as exc:
            raise RewriteError(f"save_pretrained cannot write {path}: {exc}") from None
        for name, tensor in tensors.items():
            if name != "bias" or f"{path}.bias" in expected:
                state[f"{path}.{name}"] = tensor
        by_scheme.setdefault((args["bits"], args["group"]), []).append(path)
        shipped.append(path)
    seen: set = set()
    for name, tensor in model.state_dict().items():
        if any(name.startswith(p + ".") for p in shipped):
            continue
        if name not in expected:
            raise RewriteError(f"save_pretrained cannot write this rewritten model: {name} has no form "
                               "from_pretrained loads (it would load that layer as random weights); write it with "
                               "rewrite optimize -o DIR and read it back with rewrite.load(DIR)")
        if tensor.untyped_storage().data_ptr() in seen:
            continue  # a tied weight (lm_head = embed_tokens): from_pretrained ties it again
        seen.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor
    groups = {f"group_{i}": _scheme(paths, bits, group) for i, ((bits, group), paths) in enumerate(by_scheme.items())}
    return {k: v.detach().contiguous() for k, v in state.items()}, groups


def _expected_names(model: nn.Module) -> set[str]:
    """The state-dict names of the model's class built from its config (on the meta device: no memory)."""
    with torch.device("meta"):
        empty = type(model)(model.config)
    return set(empty.state_dict())


def _scheme(targets: list[str], bits: int, group: int) -> dict:
    """One config group: asymmetric int weights per group, int8 per-token dynamic activations (W4A8)."""
    return {"targets": targets, "format": "int-quantized",
            "weights": {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
                        "group_size": group, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True}}
