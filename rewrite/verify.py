"""Numeric checks of a rewritten model against a reference, judged by a pass's declared contract."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from rewrite.pass_base import Approx, Contract, Exact


@dataclass(frozen=True)
class OutputError:
    """How far outputs are from the reference, over every floating-point output leaf of every batch."""

    max_abs: float
    rel_l2: float
    sqnr_db: float
    cosine: float
    within_tolerance: bool  # elementwise, at the tolerance given to compare()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def float_leaves(outputs: Any) -> list[torch.Tensor]:
    return [t.detach().double().flatten() for t in tree_leaves(outputs)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compare(reference: list[Any], candidate: list[Any], tolerance: Exact = Exact()) -> OutputError:
    """Compare per-batch outputs (pytrees). Raises ValueError when their structure differs."""
    ref = [t for out in reference for t in float_leaves(out)]
    new = [t for out in candidate for t in float_leaves(out)]
    if len(ref) != len(new) or any(a.shape != b.shape for a, b in zip(ref, new)):
        raise ValueError("rewritten model's outputs differ in number or shape from the reference")
    if not ref:
        return OutputError(0.0, 0.0, math.inf, 1.0, True)
    r, n = torch.cat(ref), torch.cat(new)
    diff = (n - r)
    signal, noise = float(r.square().sum()), float(diff.square().sum())
    scale = max(1.0, float(r.abs().max()))
    close = bool((diff.abs() <= tolerance.atol * scale + tolerance.rtol * r.abs()).all())
    return OutputError(
        max_abs=float(diff.abs().max()),
        rel_l2=math.sqrt(noise / signal) if signal > 0 else math.sqrt(noise),
        sqnr_db=10 * math.log10(signal / noise) if noise > 0 else math.inf,
        cosine=float(torch.nn.functional.cosine_similarity(r, n, dim=0)) if signal > 0 else 1.0,
        within_tolerance=close and bool(torch.isfinite(n).all()),
    )


def check(contract: Contract, err: OutputError) -> str | None:
    """None when `err` meets the contract, else the reason it does not."""
    if not math.isfinite(err.max_abs):
        return "outputs contain NaN or inf"
    if isinstance(contract, Exact):
        # `err` must come from compare(..., tolerance=contract): within_tolerance used its rtol/atol.
        return None if err.within_tolerance else f"max|Δ| {err.max_abs:.2e} exceeds exact tolerance"
    if isinstance(contract, Approx):
        if err.sqnr_db < contract.min_sqnr_db:
            return f"SQNR {err.sqnr_db:.1f} dB below the {contract.min_sqnr_db:g} dB floor"
        if contract.min_cosine is not None and err.cosine < contract.min_cosine:
            return f"cosine {err.cosine:.4f} below the {contract.min_cosine} floor"
        return None
    raise TypeError(f"unknown contract {contract!r}")
