"""Models from disk or code: a `.pt2` ExportedProgram, a pickled module, or `package.module:factory`.

A factory returns a module, or a (module, example_inputs) pair so the CLI needs no input file.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewrite.errors import RewriteError, first_line

PICKLE_NOTICE = "notice: loading a pickled module runs code stored in the file; load only files you trust"


def load(spec: str) -> tuple[nn.Module, tuple | None]:
    """(module, example inputs or None) from a path or `module:factory` spec."""
    path = Path(spec)
    if path.suffix == ".pt2":
        _must_exist(path)
        from rewrite.emit.pt2 import load_pt2
        return load_pt2(path)
    if ":" in spec and not path.exists():
        return _from_factory(spec)
    _must_exist(path)
    return _from_pickle(path), None


def _must_exist(path: Path) -> None:
    if not path.is_file():
        raise RewriteError(f"model file {str(path)!r} not found: give a .pt2, a torch.save'd module, "
                           "or package.module:factory")


def _from_pickle(path: Path) -> nn.Module:
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:
        raise RewriteError(f"cannot read model file {str(path)!r} ({first_line(exc, 120)}); "
                           "save the whole module with torch.save(model, path) or use a .pt2") from exc
    if isinstance(obj, dict):
        raise RewriteError(f"{str(path)!r} holds a state_dict, not a model: give package.module:factory that "
                           "builds the model and loads it, or save the whole module with torch.save(model)")
    if not isinstance(obj, nn.Module):
        raise RewriteError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _from_factory(spec: str) -> tuple[nn.Module, tuple | None]:
    target, _, attr = spec.rpartition(":")
    module = _import(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise RewriteError(f"{target!r} has no callable {attr!r}: give package.module:factory")
    made = factory()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise RewriteError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model, (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,) if inputs is not None else None)


def _import(target: str) -> Any:
    try:
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if spec is None or not Path(target).is_file():
                raise FileNotFoundError(target)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # so pickling/export can find classes defined there
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(target)
    except Exception as exc:
        raise RewriteError(f"cannot import {target!r} ({type(exc).__name__}: {exc}); "
                           "check the module path and that its package is installed") from exc


def input_shapes(text: str) -> tuple:
    """`8,3,32,32` or `8,3,32,32;8,10` → seeded random float inputs of those shapes."""
    gen = torch.Generator().manual_seed(0)
    try:
        shapes = [tuple(int(d) for d in part.split(",")) for part in text.split(";")]
    except ValueError as exc:
        raise RewriteError(f"--input-shape {text!r} is malformed: write sizes like 8,3,32,32 "
                           "(';' between several inputs)") from exc
    if any(not s or min(s) <= 0 for s in shapes):
        raise RewriteError(f"--input-shape {text!r} has an empty or non-positive size")
    return tuple(torch.randn(s, generator=gen) for s in shapes)
