"""Files a hostile-but-fair user hands us: payload pickles, damaged archives, odd data, awkward folders.

`make_workspace(folder)` writes them all; `snapshot(folder)` hashes every file so a test can prove that
nothing the user gave was modified.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import torch

from rewrite.testing import ConvBN

FACTORIES = '''
import torch
from torch import nn
from rewrite.testing import ConvBN


def build():
    model = ConvBN().eval()
    return model, model.example_inputs()


def raises():
    raise RuntimeError("checkpoint shard 3 is missing")


def wrong_tuple():
    model = ConvBN()
    return model, model.example_inputs(), [model.example_inputs()], "extra"


def needs_args(width, depth=2):
    return ConvBN()


def returns_none():
    return None


class Cached(nn.Module):
    """Caches a grid per batch size in Python, as neuraloperator's FNO does: export specializes the batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self._grid = None

    def forward(self, x):
        if self._grid is None or self._grid.shape[0] != x.shape[0]:
            self._grid = torch.linspace(0, 1, x.shape[0]).unsqueeze(1)
        return self.lin(x) + self._grid


def specialized():
    return Cached().eval(), (torch.randn(8, 4),)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = ConvBN().eval()

    def forward(self, x):
        y = self.model(x)
        return y, y


def two_outputs():
    return TwoOutputs().eval(), ConvBN().example_inputs()
'''


class Payload:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_workspace(d: Path) -> Path:
    model = ConvBN().eval()
    x = model.example_inputs()[0]
    torch.save(model, d / "model.pt")
    torch.export.save(torch.export.export(model, (x,)), d / "m.pt2")
    torch.save(x, d / "x.pt")
    torch.save(x.clone().fill_(float("nan")), d / "x_nan.pt")
    torch.save(torch.where(x > 0, torch.tensor(float("inf")), x), d / "x_inf.pt")
    torch.save({"weight": torch.randn(3)}, d / "state.pt")
    torch.save([x, x, x.clone().fill_(float("nan"))], d / "nan.pt")
    torch.save(["a", "b"], d / "strings.pt")
    torch.save([], d / "empty_list.pt")
    torch.save({"inputs": [x, x], "targets": [torch.randint(0, 4, (2,))]}, d / "eval_batches.pt")
    torch.save({"inputs": [x], "targets": [torch.randint(0, 4, (5,))]}, d / "eval_samples.pt")
    torch.save({"inputs": [x], "targets": [torch.randint(0, 4, (2,))]}, d / "eval.pt")
    (d / "corrupt.pt").write_bytes(b"\x00garbage")
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "truncated.pt2").write_bytes((d / "m.pt2").read_bytes()[:5000])
    torch.save(Payload(d / "PWNED"), d / "evil.pt")
    _evil_pt2(d / "m.pt2", d / "evil.pt2", Payload(d / "PWNED"))
    (d / "factories.py").write_text(FACTORIES)
    (d / "bad_syntax.py").write_text("def build(:\n")
    (d / "a_folder").mkdir()
    (d / "afile").write_text("not a folder")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("user data")
    (d / "theirs").mkdir()
    (d / "theirs" / "model.pt2").write_bytes((d / "m.pt2").read_bytes())
    (d / "theirs" / "notes.txt").write_text("user data")
    return d


def _evil_pt2(good: Path, evil: Path, payload: Payload) -> None:
    """A real .pt2 whose bundled example inputs are replaced by a code-running pickle."""
    buf = io.BytesIO()
    torch.save((payload,), buf)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = buf.getvalue() if item.filename.endswith("sample_inputs/model.pt") else src.read(item)
            dst.writestr(item, data)


def said(output: str) -> list[str]:
    """The lines of a command's output other than notices and a pipe's progress lines."""
    return [line for line in output.splitlines() if line.strip() and not line.startswith(("notice:", "progress: "))]


def assert_refused(argv: list[str], text: str, workspace: Path) -> None:
    """The corpus's promise for one command line: exit 2, one `error:` line containing `text`, no
    traceback, no code from the user's files run, every file byte-identical, nothing left behind."""
    from typer.testing import CliRunner

    from rewrite.cli import app
    before = snapshot(workspace)
    result = CliRunner().invoke(app, argv)
    lines = said(result.output)
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert text in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (workspace / "PWNED").exists(), "code from an untrusted file ran"
    assert snapshot(workspace) == before, "a file the user gave was changed, or output was left behind"
    assert not list(workspace.glob(".*rewrite-*"))


def snapshot(d: Path) -> dict[str, str]:
    """Every file's hash and every folder under `d` (so an empty output folder left behind shows too)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(d.rglob("*"))}


# --- checkpoint folders from strangers ------------------------------------------------------------------

CUSTOM_CONFIG = '''
import pathlib
pathlib.Path({marker!r}).touch()  # proof that the folder's code ran (transformers runs a copy elsewhere)
from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny"
'''

CUSTOM_MODEL = '''
from transformers import LlamaForCausalLM
from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


def make_checkpoints(d: Path) -> Path:
    """A small sharded Llama checkpoint `good`, damaged copies of it, token-id files and a text file."""
    import json
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    good = d / "good"
    transformers.LlamaForCausalLM(cfg).save_pretrained(good, max_shard_size="100KB")
    torch.save([torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)],
               d / "ids.pt")
    torch.save([torch.full((2, 16), 1000)], d / "ids_beyond.pt")
    torch.save([torch.full((2, 16), -3)], d / "ids_negative.pt")

    def variant(name, damage):
        shutil.copytree(good, d / name, symlinks=True)
        damage(d / name)

    def config(folder, **changes):
        raw = json.loads((folder / "config.json").read_text())
        raw.update(changes)
        (folder / "config.json").write_text(json.dumps(raw))

    def second_shard(folder):
        return sorted(folder.glob("model-0000*.safetensors"))[1]

    def index(folder, where):
        path = folder / "model.safetensors.index.json"
        raw = json.loads(path.read_text())
        first = second_shard(folder).name
        raw["weight_map"] = {n: (where if s == first else s) for n, s in raw["weight_map"].items()}
        path.write_text(json.dumps(raw))

    def retyped(folder, change):
        shard = second_shard(folder)
        save_file({k: change(t) for k, t in load_file(shard).items()}, shard, metadata={"format": "pt"})

    def linked_out(folder):
        shard = second_shard(folder)
        shutil.move(shard, d / "moved.safetensors")
        shard.symlink_to(d / "moved.safetensors")

    def custom_code(folder, model_type="tiny"):
        (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG.format(marker=str(d / "PWNED")))
        (folder / "modeling_tiny.py").write_text(CUSTOM_MODEL)
        config(folder, model_type=model_type, architectures=["TinyForCausalLM"],
               auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                         "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})

    shutil.copy(second_shard(good), d / "outside.safetensors")
    variant("remote_code", custom_code)
    variant("remote_code_llama_type", lambda f: custom_code(f, "llama"))
    variant("index_outside", lambda f: index(f, "../outside.safetensors"))
    variant("index_absolute", lambda f: index(f, "/etc/passwd"))
    variant("linked_out", linked_out)
    variant("truncated", lambda f: second_shard(f).write_bytes(second_shard(f).read_bytes()[:3000]))
    variant("garbage", lambda f: second_shard(f).write_bytes(b"\x10" + b"\x00" * 7 + b"{garbage"))
    variant("index_lies", lambda f: index(f, "model-00001-of-00005.safetensors"))
    variant("shape", lambda f: config(f, intermediate_size=96))
    variant("dtype", lambda f: retyped(f, lambda t: (t * 100).to(torch.int32)))
    variant("nan", lambda f: retyped(f, lambda t: t.fill_(float("nan"))))
    variant("bad_json", lambda f: (f / "config.json").write_text("{not json"))
    variant("list_json", lambda f: (f / "config.json").write_text("[1, 2]"))
    variant("bad_field", lambda f: config(f, hidden_size="big"))
    variant("no_arch", lambda f: config(f, architectures=["NoSuchModelForCausalLM"]))
    def pickled_weights_only(folder):
        for shard in folder.glob("model*.safetensors*"):
            shard.unlink()
        torch.save(Payload(d / "PWNED"), folder / "pytorch_model.bin")  # the format that runs code on load

    variant("pickled_bin", pickled_weights_only)
    (d / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return d
