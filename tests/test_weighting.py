import pytest
import torch
from torch import nn

from rewrite import weighting
from tests.passes.test_lowrank import FFN


def _inputs(n=256, k=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=gen) * torch.logspace(0, -2, k)  # correlated, uneven inputs
    return torch.randn(n, k, generator=gen) @ mixing


def test_a_truncation_at_full_rank_gives_the_weight_back():
    layer, x = nn.Linear(24, 16), _inputs()
    gram = (x.T @ x).double()
    spectrum = weighting.WeightedSpectrum(layer.weight, gram, gram[:16, :16] + torch.eye(16, dtype=torch.float64))
    first, second = spectrum.factors(16)
    torch.testing.assert_close(second @ first, layer.weight.detach(), rtol=1e-4, atol=1e-5)


def test_the_output_error_is_the_dropped_singular_values_energy():
    layer, x = nn.Linear(24, 16, bias=False), _inputs()
    spectrum = weighting.WeightedSpectrum(layer.weight, (x.T @ x).double(), damping=0.0)
    for rank in (2, 6, 11):
        first, second = spectrum.factors(rank)
        error = float((x.double() @ (layer.weight.detach() - second @ first).T.double()).square().sum())
        assert error == pytest.approx(spectrum.dropped(rank), rel=1e-3)


def test_whitening_fits_the_outputs_better_than_the_weights_do():
    layer, x = nn.Linear(24, 16, bias=False), _inputs()
    whitened = weighting.WeightedSpectrum(layer.weight, (x.T @ x).double()).factors(4)
    plain = weighting.WeightedSpectrum(layer.weight, None).factors(4)

    def error(pair):
        return float((x @ (layer.weight.detach() - pair[1] @ pair[0]).T).square().sum())
    assert error(whitened) < 0.5 * error(plain)


def test_the_global_budget_cuts_the_layer_where_it_hurts_least():
    torch.manual_seed(0)
    cheap, dear = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
    eye = torch.eye(32, dtype=torch.float64)
    spectra = {"cheap": weighting.WeightedSpectrum(cheap.weight, eye * 1e-4),
               "dear": weighting.WeightedSpectrum(dear.weight, eye * 1e4)}
    ranks = weighting.allocate(spectra, keep=0.75)
    kept = sum(32 * 32 if r is None else r * 64 for r in ranks.values())
    assert kept <= 0.75 * 2 * 32 * 32
    assert ranks["dear"] is None and ranks["cheap"] is not None and ranks["cheap"] < 16


def test_a_budget_that_keeps_everything_cuts_nothing():
    spectrum = weighting.WeightedSpectrum(nn.Linear(8, 8).weight, None)
    assert weighting.allocate({"a": spectrum}, keep=1.0) == {"a": None}
    assert weighting.allocate({"a": spectrum}, keep=0.9)["a"] in (1, 2, 3)  # below break-even 4


def test_moments_leave_out_padding_and_leave_no_gradients():
    model = FFN().eval()
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    found = weighting.moments(model, ["proj"], [(x,)], [mask], loss=lambda out, i: out.square().sum())
    real = x[mask.bool()]
    torch.testing.assert_close(found.inputs["proj"], (real.T @ real).double(), rtol=1e-5, atol=1e-5)
    assert found.tokens == 8 and found.outputs["proj"].shape == (32, 32) and bool(found.outputs["proj"].any())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_nearly_free_cuts_are_taken_past_the_budget():
    torch.manual_seed(0)
    low = torch.randn(48, 3) @ torch.randn(3, 48)  # rank 3: everything past it is free
    spectrum = weighting.WeightedSpectrum(low, None)
    assert weighting.allocate({"a": spectrum}, keep=0.9)["a"] == 3
