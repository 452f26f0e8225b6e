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


def snapshot(d: Path) -> dict[str, str]:
    """Every file's hash and every folder under `d` (so an empty output folder left behind shows too)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(d.rglob("*"))}
