"""dgq's compressed-tensors form: the same codes and weights, in the scheme compressed-tensors decodes."""
import torch

from rewrite.passes.dgq import ship


def test_an_encoded_layer_decodes_to_the_same_weights():
    gen = torch.Generator().manual_seed(0)
    group, out, k = 64, 12, 192
    scale = torch.randint(1, 9, (out, k // group), generator=gen).repeat_interleave(group, 1)
    w_s8 = (scale * (torch.randint(0, 16, (out, k), generator=gen) - 8)).to(torch.int8)
    s1 = torch.rand(out, generator=gen) + 0.1
    tensors, bits, size = ship.encode(w_s8, s1, group)
    assert (bits, size) == (4, group)
    codes, zero = tensors["weight"].int(), tensors["weight_zero_point"].int()
    assert codes.min() >= -8 and codes.max() <= 7  # signed 4-bit codes, as compressed-tensors keeps them
    weight = tensors["weight_scale"].double().repeat_interleave(group, 1) * (codes - zero.repeat_interleave(group, 1))
    # the float32 scale s1·S′ is one rounding away from dgq's s1 (≤ 2 ulp)
    torch.testing.assert_close(weight.float(), (s1[:, None].double() * w_s8.double()).float(), rtol=3e-7, atol=0)


def test_a_wide_layer_goes_to_the_8_bit_group():
    w_s8 = torch.arange(-100, 100, dtype=torch.int8).reshape(2, 100)  # 5–8-bit codes: spans > 15 steps
    _, bits, _ = ship.encode(w_s8, torch.ones(2), 100)
    assert bits == 8
