"""Conv_{1×1}(x) → W·x: 1×1 convolutions as one matmul over every grid point.

    y[n, o, s] = Σ_c W[o, c] · x[n, c, s] + b[o]      (s runs over the flattened grid)

computed as `W @ x.flatten(2)` (form matmul: channels stay first, one batched GEMM) or
`linear(x.movedim(1, -1), W, b)` (form linear: a channels-last view, bias fused in the GEMM, the result
made contiguous again so that its cost is in the timing, not hidden in the ops after it). oneDNN's
1×1 convolution is slow at the shapes of neural-operator lifting and projection layers (3 → 64 and
64 → 1 channels over 64k grid points); the same arithmetic as a GEMM is not. `form=auto` times the
convolution and both forms on the layer's captured input shape and keeps the fastest (the choice is in
the recipe); a layer whose convolution is fastest here is left with the times as its reason.

Paper: none of its own; the pointwise half of Transform Once's speed (Poli et al., NeurIPS 2022,
arXiv:2211.14453), where the lifting and projection MLPs dominate once the spectral layers are fast.
Contract: exact (float tolerance).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rewrite import measure
from rewrite.pass_base import Exact, Pass, PassContext, PassResult, pinned_choices
from rewrite.calibration import layer_values
from rewrite.patterns import CONVS, layers, not_pointwise, set_submodule

TIE = 0.05  # timings closer than this are a tie (noise on a shared machine)


class PointwiseMatmul(nn.Module):
    """A 1×1 convolution's weight (O, C) and bias, applied as a GEMM over the grid points."""

    fresh_output = True  # returns a new tensor, never its input: `inplace` may write into it

    def __init__(self, conv: nn.Module, form: str):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False) if conv.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "linear":
            # Back to a contiguous channels-first tensor: the strided view would slow every op after it
            # (measured on a neuraloperator FNO: 0.89x with the view, where per-layer times promised a gain).
            return nn.functional.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1).contiguous()
        flat = x.flatten(2)
        weight = self.weight.expand(flat.shape[0], -1, -1)
        if self.bias is None:
            y = torch.bmm(weight, flat)
        else:  # the bias as the GEMM's accumulator: `bmm(…) + b` is a second pass over a fresh full-grid
            # tensor (130 ms vs 83 ms for 32 → 64 channels on 8 × 256² points, glibc malloc)
            y = torch.baddbmm(self.bias[None, :, None].expand(flat.shape[0], -1, flat.shape[2]), weight, flat)
        return y.reshape(x.shape[0], -1, *x.shape[2:])


@dataclass(frozen=True)
class Pointwise(Pass):
    name = "pointwise"
    paper = "1×1 convolutions as GEMMs (the lifting/projection half of Transform Once, arXiv:2211.14453)"
    summary = "1×1 convolutions → one GEMM over the grid points, the form timed fastest here per layer"
    contract = Exact()
    applies_to = "Conv1d/2d/3d with a 1×1 kernel, stride 1, no padding, groups=1"
    level = "graph"

    form: Literal["auto", "matmul", "linear"] = "auto"
    layers: str = ""  # `path:form;…` (form matmul, linear or conv): form=auto's choices pinned (a recipe writes it)

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        convs = layers(module, CONVS)
        seen = layer_values(module, [p for p, _ in convs], ctx.calibration[:1])
        shapes = {path: inputs[0].shape for path, inputs in seen.items() if inputs}
        forms, times, skipped = {}, {}, []
        for path, conv in convs:
            reason = not_pointwise(conv) or (None if path in shapes else "not run on the calibration inputs")
            if reason:
                skipped.append((path, reason))
                continue
            choice, timed = self._choose(conv, shapes[path], path)
            times[path] = timed
            if choice is None:
                skipped.append((path, "the convolution is fastest here (" + (_ms(timed) or "pinned") + ")"))
                continue
            set_submodule(module, path, PointwiseMatmul(conv, choice))
            forms[path] = choice
        return PassResult(module, bool(forms), {"rewritten": len(forms), "forms": forms, "ms": times}, skipped)

    @classmethod
    def finds_nothing_in(cls, module: nn.Module) -> bool:
        return all(not_pointwise(conv) for _, conv in layers(module, CONVS))

    def __post_init__(self):
        pinned_choices(self.layers, ("matmul", "linear", "conv"))  # a malformed one is refused when parsed

    def pinned(self, stats: dict) -> Pointwise:
        if self.form != "auto" or not stats.get("ms"):
            return self
        chosen = {path: stats.get("forms", {}).get(path, "conv") for path in stats["ms"]}
        return dataclasses.replace(self, layers=";".join(f"{p}:{f}" for p, f in chosen.items()))

    def _choose(self, conv: nn.Module, shape: torch.Size, path: str = "") -> tuple[str | None, dict[str, float]]:
        if self.form != "auto":
            return self.form, {}
        fixed = pinned_choices(self.layers, ("matmul", "linear", "conv")).get(path)
        if fixed:
            return (None if fixed == "conv" else fixed), {}
        x = torch.randn(*shape)
        candidates = {"conv": conv, "matmul": PointwiseMatmul(conv, "matmul"), "linear": PointwiseMatmul(conv, "linear")}
        timed = {name: round(ms, 4) for name, ms in measure.best_times(candidates, (x,)).items()}
        gemm = min(("matmul", "linear"), key=timed.get)
        # The convolution stays only when measurably faster: a tie goes to the GEMM (ONNX: a plain MatMul).
        return (None if timed["conv"] < (1 - TIE) * timed[gemm] else gemm), timed


def _ms(timed: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.3g} ms" for name, ms in timed.items())
