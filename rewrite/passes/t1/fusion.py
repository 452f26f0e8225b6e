"""Exact fusions of linear spectral chains in a captured graph (Transform Once, exact identities).

  - irfftₙ(rfftₙ(x)) = x for a real x at its own size and matching norms; fftshift∘ifftshift = id, and
    fftshift∘fftshift = id along even sizes: such pairs are dropped.
  - Two spectral convs with nothing between them: B(A(x)) = G_B·R_B·T·R_A·E_A·x + …, where
    T = E_B·G_A maps A's output modes to B's input modes through the grid. T is not the identity:
    rfft∘irfft is the Hermitian projection P_H (it pairs ±f on the self-conjugate bins), so T is
    computed from the two layers, exactly, and the full-grid inverse and forward transforms between
    them disappear.
  - One tensor feeding several spectral convs with the same kept modes: its forward transform runs once.

A standard trained FNO has a GELU between every inverse and the next forward transform, so none of
these apply to it; they apply to the linear chains that hand-written operators do contain.
"""
from __future__ import annotations


import torch
from torch import fx, nn

from rewrite.match import Match, Pattern, Variant, cached_pattern
from rewrite.passes.t1.gemm import SpectralGEMM



class SpectralChain(nn.Module):
    """second(first(x)) computed mode to mode: first's synthesis and second's analysis become T."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second, self.grid = first, second, first.grid
        with torch.no_grad():
            m = first.out_modes
            probe = torch.eye(2 * m).reshape(2 * m, 2, m).permute(2, 0, 1)  # (M, 2M, 2): one coefficient each
            between = second.analyze(first.synthesize(probe, bias=False))  # (M', 2M, 2)
            self.register_buffer("between", between.permute(1, 2, 0).reshape(2 * m, -1).contiguous())
            constant = second.analyze(torch.ones(1, 1, *self.grid))[:, 0, :]  # (M', 2): where a bias lands
            bias = first.bias.reshape(-1) if first.bias is not None else torch.zeros(first.out_channels)
            self.register_buffer("bias_coeffs", (constant[:, :, None] * bias).reshape(len(constant), 1, -1))

    @property
    def out_modes(self) -> int:
        return self.second.out_modes

    @property
    def out_channels(self) -> int:
        return self.second.out_channels

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.synthesize(self.mix(self.analyze(x)))

    def analyze(self, x: torch.Tensor) -> torch.Tensor:
        return self.first.analyze(x)

    def mix(self, stacked: torch.Tensor) -> torch.Tensor:
        mixed = self.first.mix(stacked)  # (M, B, 2C)
        m, b, c2 = mixed.shape
        per_channel = mixed.reshape(m, b, 2, c2 // 2).permute(1, 3, 2, 0).reshape(-1, 2 * m)
        moved = (per_channel @ self.between).reshape(b, c2 // 2, 2, -1).permute(3, 0, 2, 1).reshape(-1, b, c2)
        return self.second.mix(moved + self.bias_coeffs)

    def synthesize(self, mixed: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return self.second.synthesize(mixed, bias)


class Analysis(nn.Module):
    """The forward transform several spectral convs share."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.analyze(x)


class FromCoefficients(nn.Module):
    """A spectral conv applied to coefficients computed by a shared `Analysis`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return self.layer.synthesize(self.layer.mix(stacked))


def fuse_layers(gm: fx.GraphModule) -> dict[str, int]:
    """Fuse chains of rewritten spectral convs, then share forward transforms (after they are matched)."""
    counts = {"fused_chains": _fuse_chains(gm), "shared_transforms": _share_analysis(gm)}
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return {k: v for k, v in counts.items() if v}


def simplify_transforms(gm: fx.GraphModule) -> dict[str, int]:
    """The aten-level identities only (run before spectral convs are matched): each match is replaced
    by its input."""
    counts = {"shift_pairs": _drop(gm, shift_pairs()), "fft_round_trips": _drop(gm, round_trips())}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return {k: v for k, v in counts.items() if v}


def _drop(gm: fx.GraphModule, pattern: Pattern) -> int:
    found = pattern.find(gm)
    for match in found or []:
        match.outputs[0].replace_all_uses_with(match.inputs[0])
    return len(found) if found else 0


class _Twice(nn.Module):
    """outer(inner(x)) over the last two dims: the shape of both identities."""

    def __init__(self, outer, inner, **kw):
        super().__init__()
        self.outer, self.inner, self.kw = outer, inner, kw

    def forward(self, x):
        return self.outer(self.inner(x, dim=(-2, -1)), dim=(-2, -1), **self.kw)


_X = (torch.randn(2, 3, 8, 8),)


@cached_pattern
def shift_pairs() -> Pattern:
    """fftshift∘ifftshift = ifftshift∘fftshift = id; fftshift∘fftshift = id along even sizes."""
    fft = torch.fft
    pairs = [(fft.fftshift, fft.ifftshift), (fft.ifftshift, fft.fftshift), (fft.fftshift, fft.fftshift)]
    return Pattern("fftshift-pair", *[Variant(_Twice(a, b), _X, ignore_literals=True, name=f"{a.__name__}∘{b.__name__}")
                                      for a, b in pairs], check=_shift_check)


def _shift_check(match: Match, gm: fx.GraphModule) -> str | None:
    outer, x = match.outputs[0], match.inputs[0]
    inner = outer.args[0]
    if _dims(outer) != _dims(inner):
        return "the two shifts act on different dims"
    if outer.target == inner.target and not _even_along(x, _dims(outer)):
        return "fftshift twice is the identity only along even sizes"
    return None


@cached_pattern
def round_trips() -> Pattern:
    """irfft(rfft(x)) = x at x's own size over the same dims with matching norms (1-D, 2-D, n-D)."""
    fft = torch.fft
    variants = [Variant(_Twice(inverse, forward, s=(8, 8)), _X, ignore_literals=True, name=inverse.__name__)
                for inverse, forward in ((fft.irfftn, fft.rfftn), (fft.irfft2, fft.rfft2))]
    variants.append(Variant(_Last(), _X, ignore_literals=True, name="irfft"))
    return Pattern("fft-round-trip", *variants, check=_round_trip_check)


class _Last(nn.Module):
    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(x, dim=-1), n=x.shape[-1], dim=-1)


def _round_trip_check(match: Match, gm: fx.GraphModule) -> str | None:
    inverse, x = match.outputs[0], match.inputs[0]
    forward = inverse.args[0]
    if len(forward.args) > 1 and forward.args[1] is not None:
        return "the forward transform pads or crops (s= given)"
    if _arg(forward, 2) != _arg(inverse, 2) or _arg(forward, 3) != _arg(inverse, 3):
        return "the transforms differ in dims or norm"
    if str(inverse.meta.get("val", torch.empty(0)).shape) != str(x.meta.get("val", torch.empty(1)).shape):
        return "the inverse does not restore the input's size"
    return None


def _dims(node: fx.Node):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return tuple(dims) if isinstance(dims, (list, tuple)) else dims


def _even_along(node: object, dims) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None or dims is None:
        return False
    sizes = [val.shape[d] for d in (dims if isinstance(dims, tuple) else (dims,))]
    return all(isinstance(s, int) and s % 2 == 0 for s in sizes)


def _arg(node: fx.Node, i: int):
    """dim (i=2) or norm (i=3) of an aten fft op, normalized so omitted and default compare equal."""
    value = node.args[i] if len(node.args) > i else node.kwargs.get("dim" if i == 2 else "norm")
    if i == 3:
        return value or "backward"
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _spectral(gm: fx.GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        layer = gm.get_submodule(node.target)
        if isinstance(layer, (SpectralGEMM, SpectralChain)):
            return layer
    return None


def _fuse_chains(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        second = _spectral(gm, node)
        source = node.args[0] if second is not None else None
        first = _spectral(gm, source)
        if first is None or len(source.users) != 1 or first.grid != second.grid:
            continue
        gm.add_submodule(node.target, SpectralChain(first, second))
        node.args = (source.args[0],)
        gm.graph.erase_node(source)
        count += 1
    return count


def _share_analysis(gm: fx.GraphModule) -> int:
    count = 0
    for value in list(gm.graph.nodes):
        groups: dict[tuple, list[fx.Node]] = {}
        for user in value.users:
            layer = _spectral(gm, user)
            if layer is not None and user.args[0] is value:
                groups.setdefault(_analysis_key(layer), []).append(user)
        for users in groups.values():
            if len(users) > 1:
                _split(gm, value, users)
                count += 1
    return count


def _analysis_key(layer: nn.Module) -> tuple:
    while isinstance(layer, SpectralChain):  # a chain analyzes with its first layer
        layer = layer.first
    return (layer.grid, str(layer.in_freqs))


def _split(gm: fx.GraphModule, value: fx.Node, users: list[fx.Node]) -> None:
    """value → [conv_i] becomes value → analysis → [conv_i from coefficients]."""
    first_user = next(n for n in gm.graph.nodes if n in users)
    name = f"{users[0].target}_analysis".replace(".", "_")
    gm.add_submodule(name, Analysis(gm.get_submodule(users[0].target)))
    with gm.graph.inserting_before(first_user):
        coeffs = gm.graph.call_module(name, (value,))
    for user in users:
        gm.add_submodule(user.target, FromCoefficients(gm.get_submodule(user.target)))
        user.args = (coeffs,)
