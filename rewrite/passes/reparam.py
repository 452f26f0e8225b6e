"""Σᵢ BNᵢ(convᵢ(x)) → conv_K(x): merge parallel conv branches (kernel kᵢ, dilation rᵢ) into one large kernel.

Each branch's BatchNorm is folded into its conv; a dilated k×k kernel equals a dense kernel of size
r(k−1)+1 with the weights on every r-th tap; kernels are zero-padded to the largest size K around
their centre and summed, biases summed:  W = Σᵢ pad_K(dilate_rᵢ(Wᵢ·γᵢ/σᵢ)),  b = Σᵢ bᵢ'.

Paper: Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet", CVPR 2024 (dilated
re-parameterization). Contract: exact (float tolerance). Applies when every summed branch is a
Conv1d/2d/3d (optionally + BatchNorm) on the same input, with equal groups, channels and stride, and
zero centred padding dilation·(k−1)/2 (centred kernels padded to one size sample the same inputs).
An identity term x, or BN(x), in the same sum is absorbed as a centre tap (RepVGG, MobileOne; stride 1);
a sum written in place (`x += identity`, as timm writes it) is replaced as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rewrite.match import erase_dead
from rewrite.pass_base import Exact, Pass, PassContext, PassResult
from rewrite.passes.fold_bn import layer_bn
from rewrite.patterns import layer_of, set_submodule

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ADD = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)


@dataclass(frozen=True)
class ReparamLargeKernel(Pass):
    name = "reparam"
    paper = "Ding et al., UniRepLKNet, CVPR 2024 (arXiv:2311.15599)"
    summary = "merge parallel (dilated) conv+BN branches into one large-kernel conv"
    contract = Exact()
    shrinks = True
    applies_to = "sums of parallel Conv(+BatchNorm) branches on one input"

    @classmethod
    def finds_nothing_in(cls, module: nn.Module) -> bool:
        return sum(isinstance(m, _CONV) for m in module.modules()) < 2  # a merge needs two branches

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        merged, skipped = 0, []
        conv_bn = {m["bn"]: m for m in layer_bn().find(gm) or [] if isinstance(m.layer(gm, "layer"), _CONV)}
        for root in [n for n in gm.graph.nodes if _is_add(n) and not _feeds_add(n)]:
            leaves = _add_leaves(root)
            branches = [b for b in (_branch(gm, leaf, conv_bn) for leaf in leaves) if b is not None]
            if len(branches) < 2:
                continue
            reason = _why_not(branches)
            if reason:
                skipped.append((root.name, reason))
                continue
            others = [leaf for leaf in leaves if leaf not in {b.leaf for b in branches}]
            _replace(gm, root, branches, others)
            merged += 1
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        return PassResult(gm, merged > 0, {"merged_groups": merged}, skipped)


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ADD and node.kwargs.get("alpha", 1) == 1


def _feeds_add(node: fx.Node) -> bool:
    return len(node.users) == 1 and _is_add(next(iter(node.users)))


def _add_leaves(node: fx.Node) -> list[object]:
    """Terms of a sum tree: recurse into adds that feed only this sum."""
    leaves = []
    for arg in node.args[:2]:
        inner = isinstance(arg, fx.Node) and _is_add(arg) and len(arg.users) == 1
        leaves += _add_leaves(arg) if inner else [arg]
    return leaves


@dataclass
class _Branch:
    leaf: fx.Node
    conv_node: fx.Node
    conv: nn.Module
    bn: nn.Module | None


def _branch(gm: fx.GraphModule, leaf: object, conv_bn: dict) -> _Branch | None:
    """A summed term that is conv(x) or BN(conv(x)) (the shared layer-batchnorm pattern, whose matches
    already guarantee the conv feeds nothing else)."""
    if leaf in conv_bn:
        match = conv_bn[leaf]
        return _Branch(leaf, match["layer"], match.layer(gm, "layer"), match.layer(gm, "bn"))
    conv = layer_of(gm, leaf, _CONV)
    return _Branch(leaf, leaf, conv, None) if conv is not None else None


def _why_not(branches: list[_Branch]) -> str | None:
    first = branches[0].conv
    for b in branches:
        c = b.conv
        if b.conv_node.args[0] is not branches[0].conv_node.args[0]:
            return "branches read different inputs"
        if (type(c), c.in_channels, c.out_channels, c.groups) != (type(first), first.in_channels,
                                                                 first.out_channels, first.groups):
            return "branches differ in conv type, channels or groups"
        if c.stride != first.stride or c.padding_mode != "zeros" or isinstance(c.padding, str):
            return "branches differ in stride, or a branch has non-zero/string padding"
        if any(p * 2 != d * (k - 1) for p, d, k in zip(c.padding, c.dilation, c.kernel_size)):
            return "a branch is not 'same'-padded (padding ≠ dilation·(k−1)/2)"
        if b.bn is not None and b.bn.running_mean is None:
            return "a branch's BatchNorm has no running statistics"
    return None


def _replace(gm: fx.GraphModule, root: fx.Node, branches: list[_Branch], others: list[object]) -> None:
    """One conv for the branches (and an identity term on their input, if summed too); other terms stay."""
    x = branches[0].conv_node.args[0]
    convs = [fuse_conv_bn_eval(b.conv.eval(), b.bn.eval()) if b.bn is not None else b.conv for b in branches]
    size = [max(_span(c)[d] for c in convs) for d in range(len(convs[0].kernel_size))]
    weight = sum(_pad_to(_densify(c), size) for c in convs)
    bias = sum(c.bias.detach() if c.bias is not None else torch.zeros(c.out_channels) for c in convs)
    if convs[0].in_channels == convs[0].out_channels and all(s == 1 for s in convs[0].stride):
        weight, bias = _absorb_identities(gm, x, others, convs[0], size, weight, bias)
    target = branches[0].conv_node.target + "_reparam"
    set_submodule(gm, target, _conv_like(convs[0], size, weight, bias))
    with gm.graph.inserting_before(root):
        node = gm.graph.call_module(target, (x,))
        for term in others:
            node = gm.graph.call_function(torch.ops.aten.add.Tensor, (node, term))
    node.meta.update(root.meta)
    root.replace_all_uses_with(node)
    _erase_sum(gm, root)


def _erase_sum(gm: fx.GraphModule, root: fx.Node) -> None:
    """Remove the old sum tree. In-place adds (`x += y`, as timm's RepVGG and MobileOne write) mutate
    temporaries of that sum only, so they are dead too, but dead-code elimination keeps impure nodes."""
    erase_dead(gm, _sum_nodes(root))


def _sum_nodes(node: fx.Node) -> list[fx.Node]:
    """The add nodes of a sum tree (the same tree `_add_leaves` walks)."""
    inner = [a for a in node.args[:2] if isinstance(a, fx.Node) and _is_add(a) and len(a.users) == 1]
    return [node] + [n for a in inner for n in _sum_nodes(a)]


def _absorb_identities(gm: fx.GraphModule, x: fx.Node, others: list[object], conv: nn.Module, size: list[int],
                       weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and BN(x) terms of the sum become centre taps: BN(x) = x·γ/σ + (β − μγ/σ) (RepVGG's identity branch)."""
    eye = _identity_kernel(conv, size)
    for term in list(others):
        bn = layer_of(gm, term, _BN) if isinstance(term, fx.Node) and term.args[:1] == (x,) else None
        if term is x:
            weight = weight + eye
        elif bn is not None and bn.running_mean is not None and bn.num_features == conv.out_channels:
            scale = (bn.weight.detach() if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
            weight = weight + eye * scale.reshape(-1, *[1] * (eye.dim() - 1))
            bias = bias + shift
        else:
            continue
        others.remove(term)
    return weight, bias


def _conv_like(conv: nn.Module, size: list[int], weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    merged = type(conv)(conv.in_channels, conv.out_channels, tuple(size), stride=conv.stride,
                        padding=tuple(k // 2 for k in size), groups=conv.groups, bias=True)
    with torch.no_grad():
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
    return merged


def _identity_kernel(conv: nn.Module, size: list[int]) -> torch.Tensor:
    """The kernel whose 'same' convolution is the identity: a 1 at the centre tap of each channel's own input."""
    per_group = conv.in_channels // conv.groups
    kernel = torch.zeros(conv.out_channels, per_group, *size)
    centre = tuple(k // 2 for k in size)
    for o in range(conv.out_channels):
        kernel[(o, o % per_group) + centre] = 1.0
    return kernel


def _span(conv: nn.Module) -> list[int]:
    return [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]


def _densify(conv: nn.Module) -> torch.Tensor:
    """A dilated kernel as the dense kernel it equals: weights on every r-th tap."""
    w = conv.weight.detach()
    dense = w.new_zeros(*w.shape[:2], *_span(conv))
    index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in conv.dilation)
    dense[index] = w
    return dense


def _pad_to(kernel: torch.Tensor, size: list[int]) -> torch.Tensor:
    pads = []
    for k, s in zip(reversed(kernel.shape[2:]), reversed(size)):
        pads += [(s - k) // 2, (s - k) // 2]
    return F.pad(kernel, pads)
