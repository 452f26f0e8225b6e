"""irfftₙ(P*(R ⊙ P(rfftₙ(x)))) → G·(R ⊙ (E·x)): spectral convolutions as truncated-DFT GEMMs (exact mode).

Paper: Poli, Massaroli, Berto, Park, Dao, Ré, Ermon, "Transform Once: Efficient Operator Learning in
Frequency Domain", NeurIPS 2022 (arXiv:2211.14453).

Contract (mode=exact): outputs equal to float tolerance. A truncated DFT is a dense (modes × n) matrix,
so each spectral conv becomes real matmuls (see `gemm.py`), which run without complex tensors,
export to ONNX, and beat the FFT at high resolution (crossover near modes/n ≤ 1/4 on this CPU). Per
layer, `form=auto` keeps whichever form measures faster here, except that ONNX output always takes the
GEMM form, the only exportable one. Layers are read from neuraloperator's `SpectralConv` attributes
(its odd-size fftshift quirk reproduced) or, for hand-written spectral convs, from their impulse
response; each rewritten layer is checked against the original before it is kept.

Linear chains fuse exactly in captured graphs (`fusion.py`): adjacent spectral convs become one
mode-to-mode map (through P_H, the Hermitian projection rfft∘irfft), a tensor feeding several spectral
convs is transformed once, fftshift pairs and irfft(rfft(x)) round trips are dropped. But no FFT/iFFT
pair of a trained FNO can be removed exactly: every block has a GELU between its iFFT and the next FFT,
and the report's fusion counts say so by being absent. mode=t1 therefore converts neuraloperator FNO
blocks into the paper's transform-once form (one transform in, all blocks on the kept modes, one
transform out; rFFT or DCT-II; see `student.py`), an approximation that needs calibration data and
is distilled with --recover. Contract (mode=t1): SQNR ≥ `min-sqnr` dB against the FNO after recovery.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from rewrite import measure, verify
from rewrite.calibration import layer_values
from rewrite.errors import InvalidValue, RewriteError
from rewrite.pass_base import Approx, Exact, Pass, PassContext, PassResult, is_graph, pinned_choices
from rewrite.passes.t1 import fusion, gemm, student
from rewrite.patterns import attribute, module_paths, region, region_io, replace_region, set_submodule

_FFT_OPS = {"fft_rfft", "fft_rfft2", "fft_rfftn", "_fft_r2c"}
_IFFT_OPS = {"fft_irfft", "fft_irfft2", "fft_irfftn", "_fft_c2r"}


@dataclass(frozen=True)
class TransformOnce(Pass):
    name = "t1"
    paper = "Poli et al., Transform Once, NeurIPS 2022 (arXiv:2211.14453)"
    summary = "spectral convs (FNO/TFNO) as exact truncated-DFT GEMMs: faster at high resolution, ONNX-exportable"
    contract_note = "exact (mode=exact); SQNR ≥ min-sqnr dB after recovery (mode=t1)"
    calibration_note = "optional (mode=exact); needed (mode=t1: recovery trains on it)"
    applies_to = "spectral convolutions (rfft → keep modes → per-mode weights → irfft); mode=t1: FNO blocks"
    level = "module"
    recoverable = True

    mode: Literal["exact", "t1"] = "exact"
    form: Literal["auto", "gemm", "fft"] = "auto"
    nonlinearity: Literal["pseudo", "coeff"] = "pseudo"
    transform: Literal["dft", "dct"] = "dft"
    init: Literal["teacher", "vp"] = "teacher"
    modes_ratio: float = 1.0
    select: Literal["lowest", "energy"] = "lowest"
    min_sqnr: float = 20.0
    layers: str = ""  # `path:gemm;path:fft`: form=auto's timed choices pinned (a recipe writes it)

    def __post_init__(self):
        pinned_choices(self.layers, ("gemm", "fft"))  # a malformed one is refused when the pipeline is read
        if not 0 < self.modes_ratio <= 1:
            raise InvalidValue("modes-ratio must be in (0, 1]: the share of the FNO's kept modes that t1 keeps")

    @property
    def contract(self):  # type: ignore[override]
        return Exact() if self.mode == "exact" else Approx(min_sqnr_db=self.min_sqnr)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.mode == "t1"

    @classmethod
    def finds_nothing_in(cls, module: nn.Module) -> bool:
        # the root too: a model may be one spectral layer; each class read once (an LLM has 200 Linears)
        return not any(_forward_calls_fft(cls) for cls in {type(m) for m in module.modules()})

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        if self.mode == "t1":
            return self._transform_once(module, ctx)
        original = ctx.original if ctx.original is not None else module
        simplified = fusion.simplify_transforms(module) if is_graph(module) else {}
        paths = _graph_candidates(module) if is_graph(module) else _eager_candidates(module)
        shapes = {p: x.shape for p, x in _first_inputs(original, paths, ctx.calibration[0]).items()}
        done, skipped = [], []
        for path in paths:
            layer, reason = None, _changed_since_capture(module, original, path)
            if reason is None:
                layer, reason = self._convert(original.get_submodule(path), shapes.get(path), ctx, path)
            if layer is not None:
                reason = replace_region(module, path, layer) if is_graph(module) else set_submodule(module, path, layer)
            (skipped.append((path, reason)) if reason else done.append(path))
        fused = fusion.fuse_layers(module) if is_graph(module) and done else {}
        grids = sorted({"x".join(map(str, shapes[p][2:])) for p in done})
        forms = {p: "gemm" for p in done} | {p: "fft" for p, why in skipped if why.startswith("kept the FFT")}
        stats = {"spectral_layers": len(done), "grid": ",".join(grids), **simplified, **fused,
                 "forms": forms}  # form=auto's timed choice per layer, for the recipe
        return PassResult(module, bool(done or simplified), stats, skipped)

    def _transform_once(self, module: nn.Module, ctx: PassContext) -> PassResult:
        if ctx.synthetic_calibration:
            raise RewriteError("t1{mode=t1} needs calibration data (--calib): the transform-once model is an "
                               "approximation distilled toward the FNO on that data")
        if not is_graph(module):
            return PassResult(module, False, skipped=[("model", "mode=t1 needs a captured graph")])
        paths = list(dict.fromkeys(path for n in module.graph.nodes for path, kind in
                                   (n.meta.get("nn_module_stack") or {}).values() if kind.endswith("FNOBlocks")))
        inputs = _first_inputs(ctx.original, paths, ctx.calibration[0])
        done, skipped, modes, absorbed = [], [], "", []
        for path in paths:
            blocks = ctx.original.get_submodule(path)
            reason = _changed_since_capture(module, ctx.original, path) or student.why_not(blocks) or (None if path in inputs else "not run on the calibration inputs")
            if reason is None:
                ends = _absorbable_ends(module, ctx.original, path)
                model = student.build(blocks, inputs[path], self.nonlinearity, self.transform, self.init,
                                      self.modes_ratio, self.select, ctx.seed,
                                      (ends[0][1].fcs[-1], ends[1][1].fcs[0]) if ends else None,
                                      _in_space(ends) if ends else None)
                modes = "x".join(map(str, model.modes))
                reason = replace_region(module, path, model)
                if reason is None and ends:
                    absorbed += _move_ends_into_modes(module, path, ends)
            (skipped.append((path, reason)) if reason else done.append(path))
        stats = {"fno_blocks": len(done), "transform": self.transform, "nonlinearity": self.nonlinearity,
                 "init": self.init, "modes": modes, "select": self.select, "absorbed": ",".join(absorbed) or "-"}
        return PassResult(module, bool(done), stats, skipped)

    def _convert(self, conv: nn.Module, shape: torch.Size | None, ctx: PassContext, path: str = ""):
        if shape is None:
            return None, "not run on the calibration inputs"
        grid = tuple(shape[2:])
        built = gemm.from_neuralop(conv, grid) if _is_neuralop(conv) else gemm.from_probe(conv, shape[1], grid)
        if isinstance(built, str):
            return None, built
        probe = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(ctx.seed))
        with torch.no_grad():
            error = verify.relative_error(conv(probe), built(probe), kind="max")
        if not error <= 1e-5:
            return None, f"not a truncated Fourier multiplier (GEMM form differs by {error:.1e})"
        return self._faster(conv, built, torch.randn(*shape), ctx, path)

    def pinned(self, stats: dict) -> TransformOnce:
        if self.mode != "exact" or self.form != "auto" or not stats.get("forms"):
            return self
        return dataclasses.replace(self, layers=";".join(f"{p}:{f}" for p, f in stats["forms"].items()))

    def _faster(self, conv: nn.Module, layer: nn.Module, x: torch.Tensor, ctx: PassContext, path: str = ""):
        fixed = pinned_choices(self.layers, ("gemm", "fft")).get(path)
        if self.form == "gemm" or "onnx" in ctx.emit or fixed == "gemm":
            return layer, None
        if self.form == "fft" or fixed == "fft":
            return None, "kept the FFT (pinned by layers=)" if fixed else "form=fft keeps the FFT"
        fft_ms, gemm_ms = measure.best_times({"fft": conv, "gemm": layer}, (x,)).values()
        if gemm_ms < fft_ms:
            return layer, None
        return None, f"kept the FFT: faster here ({fft_ms:.3g} ms vs GEMM {gemm_ms:.3g} ms; form=gemm forces it)"


def _changed_since_capture(gm: nn.Module, original: nn.Module, path: str) -> str | None:
    """Why the layer at `path` cannot be read from the user's module, or None.

    The one exception to "a pass reads only the module it is given": a captured graph keeps a layer's
    tensors but not its object, and neuraloperator's conventions (n_modes, the fftshift quirk, weight
    factorizations) live in the object. Reading it is sound only while the graph still computes that
    layer with the same tensors; if an earlier pass replaced or changed it, t1 says so instead of
    undoing the change.
    """
    if not is_graph(gm) or original is gm:
        return None
    if not region(gm, path):
        return "an earlier pass replaced this layer"
    theirs = original.get_submodule(path).state_dict(keep_vars=True)
    for node in gm.graph.nodes:
        name = node.target[len(path) + 1:] if node.op == "get_attr" and node.target.startswith(path + ".") else None
        if name in theirs and not torch.equal(attribute(gm, node.target), theirs[name]):
            return f"an earlier pass changed its {name}; t1 reads this layer as captured"
    return None


def _absorbable_ends(gm: fx.GraphModule, original: nn.Module, path: str):
    """((lifting path, lifting), (projection path, projection)) around FNOBlocks at `path`, when their
    linear end layers can join the student and both regions are one-input, one-output in the graph."""
    parent = path.rpartition(".")[0]
    ends = student.absorbable(original.get_submodule(parent))
    if ends is None:
        return None
    paths = [f"{parent}.{name}" if parent else name for name in ("lifting", "projection")]
    if not all(len(io) == 1 for p in paths for io in region_io(region(gm, p))):
        return None
    return tuple(zip(paths, ends))


def _in_space(ends) -> tuple[nn.Module, nn.Module]:
    """What stays in space of the lifting and the projection once their linear end layers moved."""
    (_, lifting), (_, projection) = ends
    return (student.ChannelMLPPart(list(lifting.fcs[:-1]), act_before=False),
            student.ChannelMLPPart(list(projection.fcs[1:]), act_before=True))


def _move_ends_into_modes(gm: fx.GraphModule, path: str, ends) -> list[str]:
    """Lifting and projection become identities: the student holds their end layers (on the modes) and
    the rest of them (in space, run a slab of grid rows at a time with its transforms)."""
    (lift_path, lifting), (proj_path, projection) = ends
    replace_region(gm, lift_path, nn.Identity())
    replace_region(gm, proj_path, nn.Identity())
    for node in gm.graph.nodes:  # their channel counts changed: drop the now-stale shapes
        if node.op == "call_module" and node.target.split("_rewritten")[0] in (lift_path, path):
            node.meta.pop("val", None)
            node.meta.pop("tensor_meta", None)
    return [f"{lift_path}.fcs.{len(lifting.fcs) - 1}", f"{proj_path}.fcs.0"]


def _is_neuralop(conv: nn.Module) -> bool:
    return type(conv).__module__.startswith("neuralop.") and hasattr(conv, "n_modes") and hasattr(conv, "max_n_modes")


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _graph_candidates(gm: fx.GraphModule) -> list[str]:
    """Innermost module paths holding both a forward real FFT and an inverse one."""
    paths = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and _op_name(node) in _FFT_OPS and module_paths(node):
            path = module_paths(node)[-1]
            has_inverse = any(_op_name(n) in _IFFT_OPS and path in module_paths(n) for n in gm.graph.nodes
                              if n.op == "call_function")
            if has_inverse and path and path not in paths:
                paths.append(path)
    return paths


def _eager_candidates(model: nn.Module) -> list[str]:
    """Leaf-most modules whose forward calls torch.fft (used when the model could not be captured)."""
    found = [path for path, m in model.named_modules() if path and _calls_fft(m)]
    return [p for p in found if not any(q.startswith(p + ".") for q in found)]


def _calls_fft(module: nn.Module) -> bool:
    return _forward_calls_fft(type(module))


@functools.cache
def _forward_calls_fft(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "rfft" in source and "irfft" in source


def _first_inputs(model: nn.Module, paths: list[str], batch: tuple) -> dict[str, torch.Tensor]:
    """The input each module at `paths` first receives when the model runs on `batch`."""
    return {p: seen[0] for p, seen in layer_values(model, paths, [batch]).items() if seen}


