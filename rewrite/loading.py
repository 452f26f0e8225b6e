"""Models from disk or code: a `.pt2` ExportedProgram, a pickled module, or `package.module:factory`.

Nothing here runs code from a file the user did not say to trust: a pickled module (and a `.pt2`
whose contents need more than weights-only unpickling) loads only with `trusted=True`
(`--trust-pickle`). A factory spec is code the user named on purpose, so it is imported and called.
A factory returns a module, (module, example_inputs) so the CLI needs no input file, or
(module, example_inputs, calibration_batches) so it needs no calibration file either.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from rewrite.errors import InvalidValue, RewriteError, first_line

PICKLE_NOTICE = "notice: loading a pickled module runs code stored in the file (trusted with --trust-pickle)"
REMOTE_CODE_NOTICE = ("notice: a checkpoint's or tokenizer's own Python files (auto_map) will run if its config names "
                      "them (trusted with --trust-remote-code)")
SAFE_FORMS = "save it with torch.export.save as a .pt2, or give file.py:factory that builds it"
MAX_INPUT_SHARE = 0.25  # random example inputs may take at most this share of the machine's memory


@dataclass(frozen=True)
class Trust:
    """Which code stored in the user's files may run: pickled objects (`--trust-pickle`) and the Python files
    a checkpoint's or tokenizer's config names (`auto_map`, `--trust-remote-code`). Nothing by default."""

    pickle: bool = False
    remote_code: bool = False

    @classmethod
    def of(cls, trusted: Any) -> "Trust":
        """The API's `trusted=`: True (all), False, "pickle", "remote-code", or a list of those."""
        if isinstance(trusted, Trust):
            return trusted
        if isinstance(trusted, bool):
            return cls(trusted, trusted)
        kinds = {trusted} if isinstance(trusted, str) else set(trusted) if isinstance(
            trusted, (list, tuple, set, frozenset)) else None
        if kinds is None or not kinds <= {"pickle", "remote-code"}:
            raise InvalidValue(f"trusted={trusted!r}: give True, False, \"pickle\", \"remote-code\" or a list of "
                               "those (the kinds of code in your files you trust to run)")
        return cls("pickle" in kinds, "remote-code" in kinds)


@dataclass
class Loaded:
    module: nn.Module
    inputs: tuple | None = None  # example inputs a .pt2 or factory bundles
    calibration: Any = None  # calibration batches a factory bundles


def load(spec: str, trusted: bool = False) -> Loaded:
    """The module, and the example inputs / calibration it comes with, from a path or `module:factory`."""
    path = Path(spec)
    if path.suffix == ".pt2":
        _must_exist(path)
        return Loaded(*load_pt2(path, trusted))
    if ":" in spec and not path.exists():
        return _from_factory(spec)
    _must_exist(path)
    if path.suffix == ".py":
        raise RewriteError(f"{spec!r} is Python source: name the function that builds the model, "
                           f"e.g. {spec}:build")
    return Loaded(_from_pickle(path, trusted))


def _must_exist(path: Path) -> None:
    if path.is_dir():
        raise RewriteError(f"model path {str(path)!r} is a folder without config.json: give a Hugging Face "
                           "checkpoint folder, a .pt2, a torch.save'd module, or package.module:factory")
    if not path.is_file():
        hub = "; names on the Hugging Face hub are not downloaded" if _looks_like_hub_name(str(path)) else ""
        raise RewriteError(f"model file {str(path)!r} not found: give a Hugging Face checkpoint folder, a .pt2, a "
                           f"torch.save'd module, or file.py:factory / package.module:factory{hub}")


def _looks_like_hub_name(name: str) -> bool:
    """`bert-base-uncased`, `HuggingFaceTB/SmolLM2-135M`: no suffix, at most one slash, not an absolute path."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "." not in Path(name).name


@contextlib.contextmanager
def weights_only() -> Iterator[None]:
    """Every torch.load inside (torch.export.load calls several, some with weights_only=False) is weights-only."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def _unsafe(exc: BaseException) -> bool:
    """Did a weights-only load refuse because the file needs code to run (not because it is damaged)?"""
    text = str(exc).lower()  # torch names the class or function it refused to import: a GLOBAL
    return isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in text and "global" in text


def refuse_untrusted(path: Path, what: str) -> RewriteError:
    return RewriteError(f"{str(path)!r} {what}, which runs code stored in the file; if you trust it add "
                        f"--trust-pickle (Python: trusted=True), or {SAFE_FORMS}")


def _from_pickle(path: Path, trusted: bool) -> nn.Module:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")  # plain data never needs trust
    except Exception as exc:
        if not _unsafe(exc):
            raise RewriteError(f"cannot read model file {str(path)!r} ({first_line(exc, 120)}); "
                               f"{SAFE_FORMS}") from exc
        if not trusted:
            raise refuse_untrusted(path, "is a pickled module") from None
        obj = _unpickle(path)
    if isinstance(obj, dict):
        raise RewriteError(f"{str(path)!r} holds a state_dict, not a model: give package.module:factory that "
                           "builds the model and loads it, or save the whole module with torch.save(model)")
    if not isinstance(obj, nn.Module):
        raise RewriteError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _unpickle(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except (ModuleNotFoundError, AttributeError) as exc:
        # Pickles name classes by import path: a module saved from a script needs that script importable.
        raise RewriteError(f"cannot rebuild the module in {str(path)!r}: {first_line(exc, 100)}; its class must be "
                           f"importable here (run from the script's folder or install its package), or "
                           f"{SAFE_FORMS}") from exc
    except Exception as exc:
        raise RewriteError(f"cannot read model file {str(path)!r} ({first_line(exc, 120)}); {SAFE_FORMS}") from exc


def load_pt2(path: str | Path, trusted: bool = False) -> tuple[nn.Module, tuple]:
    """The program's module and its bundled example inputs; weights-only unless `trusted`."""
    from rewrite import kernels
    from rewrite.capture import quiet_torch  # torch.export.load logs fallbacks and tracebacks: one line is enough
    kernels.register_all()  # our own custom ops must exist before a program that calls them is read
    path = Path(path)
    _import_output_types(path, trusted)
    try:
        with quiet_torch(), (contextlib.nullcontext() if trusted else weights_only()):
            program = torch.export.load(path)
    except Exception as exc:
        if not trusted and _unsafe(_root(exc)):
            raise refuse_untrusted(path, "holds pickled objects beyond tensors") from None
        raise RewriteError(f"{str(path)!r} is not a readable .pt2 ExportedProgram ({first_line(exc, 100)}); "
                           "re-save it with torch.export.save") from None
    args, kwargs = program.example_inputs or ((), {})
    module = program.module()
    if not kwargs:  # a program exported from positional inputs: let it take them by name too
        from rewrite.capture import accept_original_calls
        accept_original_calls(module, module, tuple(args))
    return module, tuple(args) + tuple(kwargs.values())


# Model libraries whose output classes (pytree nodes) a saved program may name; importing an installed
# library is not running code from the file, but an arbitrary module name from the file could be.
KNOWN_LIBRARIES = ("transformers", "diffusers", "timm", "neuralop", "torchvision")


def _import_output_types(path: Path, trusted: bool) -> None:
    """Import the modules that define the program's input/output container types (e.g. a Hugging Face
    ModelOutput), which register them with pytree; without them torch.export.load cannot rebuild the
    output structure."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".json") and "/models/" in n]
            text = "".join(archive.read(n).decode(errors="ignore") for n in names)
    except (OSError, zipfile.BadZipFile):
        return  # torch.export.load reports the damage
    for type_name in set(re.findall(r'\\"type\\": \\"([\w.]+)\\"', text)):
        module = type_name.rpartition(".")[0]
        if module and (trusted or module.split(".")[0] in KNOWN_LIBRARIES):
            with contextlib.suppress(Exception):
                importlib.import_module(module)


def _root(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        if _unsafe(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return exc


def _from_factory(spec: str) -> Loaded:
    target, _, attr = spec.rpartition(":")
    module = _import(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise RewriteError(f"{target!r} has no callable {attr!r}: give package.module:factory")
    made = _call_factory(spec, factory)
    parts = list(made) if isinstance(made, tuple) and len(made) in (2, 3) else [made]
    model, inputs, calibration = parts + [None] * (3 - len(parts))
    if not isinstance(model, nn.Module):
        raise RewriteError(f"{spec} returned {_describe(made)}; a factory returns a torch.nn.Module, "
                           "(module, example_inputs) or (module, example_inputs, calibration)")
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    return Loaded(model, inputs if isinstance(inputs, (tuple, dict)) or inputs is None else (inputs,), calibration)


def _call_factory(spec: str, factory: Any) -> Any:
    required = [p.name for p in _parameters(factory) if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise RewriteError(f"{spec} needs arguments ({', '.join(required)}): give a factory that takes none, "
                           "e.g. def build(): return model, example_inputs")
    try:
        return factory()
    except RewriteError:
        raise  # the factory's own one-line explanation
    except Exception as exc:
        raise RewriteError(f"{spec} raised {type(exc).__name__}: {first_line(exc, 120)}; "
                           "fix the factory (it must build the model without arguments)") from exc


def _parameters(factory: Any) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return []


def _describe(made: Any) -> str:
    if isinstance(made, tuple):
        return f"a tuple of {len(made)} ({', '.join(type(x).__name__ for x in made[:4])})"
    return f"a {type(made).__name__}"


def _import(target: str) -> Any:
    try:
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if spec is None or not Path(target).is_file():
                raise FileNotFoundError(f"no file {target}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # so pickling/export can find classes defined there
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(target)
    except Exception as exc:
        raise RewriteError(f"cannot import {target!r} ({type(exc).__name__}: {first_line(exc, 120)}); "
                           "check the module path and that its package is installed") from exc


def input_shapes(text: str) -> tuple:
    """`8,3,32,32` or `8,3,32,32;8,10` → seeded random float inputs of those shapes."""
    try:
        shapes = [tuple(int(d) for d in part.split(",")) for part in text.split(";")]
    except ValueError as exc:
        raise RewriteError(f"--input-shape {text!r} is malformed: write sizes like 8,3,32,32 "
                           "(';' between several inputs)") from exc
    if any(not s or min(s) <= 0 for s in shapes):
        raise RewriteError(f"--input-shape {text!r} has an empty or non-positive size")
    _check_memory(text, sum(4 * _numel(s) for s in shapes))
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen) for s in shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_memory(text: str, nbytes: int) -> None:
    """Refuse before allocating: calibration copies and activations take several times the inputs."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > MAX_INPUT_SHARE * total:
        raise RewriteError(f"--input-shape {text} needs {nbytes / 2**30:.1f} GiB for the inputs alone "
                           f"(this machine has {total / 2**30:.0f} GiB): use a smaller batch or size")
