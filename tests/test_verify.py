import math

import pytest
import torch

from rewrite import verify
from rewrite.pass_base import Approx, Exact
from rewrite.verify import check, compare


def test_identical_outputs_are_exact():
    x = [torch.randn(3, 4)]
    err = compare(x, [x[0].clone()])
    assert err.max_abs == 0 and err.sqnr_db == math.inf and check(Exact(), err) is None


def test_sqnr_of_known_noise():
    ref = torch.ones(10_000)
    err = compare([ref], [ref + 0.1])  # signal 1, noise 0.01 → 20 dB
    assert err.sqnr_db == pytest.approx(20.0, abs=1e-4)  # float32 0.1
    assert check(Approx(min_sqnr_db=19), err) is None
    assert "below the 21 dB floor" in check(Approx(min_sqnr_db=21), err)
    assert "exceeds exact tolerance" in check(Exact(), err)


def test_pytree_outputs_compare_leaf_by_leaf():
    a = {"x": torch.randn(2), "y": (torch.randn(3), torch.tensor([1, 2]))}
    b = {"x": a["x"], "y": (a["y"][0] + 1e-9, a["y"][1])}
    assert compare([a], [b]).within_tolerance


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        compare([torch.randn(2)], [torch.randn(3)])


def test_nan_output_breaks_any_contract():
    err = compare([torch.ones(3)], [torch.tensor([1.0, float("nan"), 1.0])])
    assert check(Approx(min_sqnr_db=0), err) is not None


def test_infinite_or_unmatched_outputs_are_reported_not_raised():
    inf = compare([torch.ones(3)], [torch.tensor([1.0, float("inf"), 1.0])])
    assert inf.sqnr_db == -math.inf and math.isnan(inf.max_abs) and not inf.within_tolerance
    assert check(Approx(min_sqnr_db=0), inf) is not None
    silent = compare([torch.zeros(3)], [torch.ones(3)])  # no signal to measure noise against
    assert silent.sqnr_db == -math.inf and silent.max_abs == 1.0


def test_masked_positions_are_not_compared():
    ref = torch.ones(2, 4, 3)
    new = ref.clone()
    new[1, 3] = 100.0  # garbage at a padded position
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert compare([ref], [new]).max_abs == 99.0
    masked = compare([ref], [new], masks=[mask])
    assert masked.max_abs == 0 and masked.sqnr_db == math.inf


def test_outputs_without_a_sequence_axis_are_compared_whole():
    pooled = torch.ones(2, 3)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    assert compare([pooled], [pooled + 1], masks=[mask]).max_abs == 1.0


def test_needs_recovery_passes_with_labels_are_judged_by_held_out_accuracy():
    from dataclasses import dataclass

    from rewrite.pass_base import Pass, PassContext, SqnrFloor

    @dataclass(frozen=True)
    class Different(SqnrFloor, Pass):  # a different function by design, like snnk or rpe-fft
        name = "different"
        needs_recovery = True
        min_sqnr: float = 10.0

    class Scaled(torch.nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return self.factor * x  # the "logits" are the inputs: argmax kept by any positive factor
    batches = [(torch.randn(8, 5),) for _ in range(4)]
    ctx = PassContext(calibration=batches, targets=[b[0].argmax(-1) for b in batches])
    before, outputs = Scaled(1.0), [b[0] for b in batches]
    for factor, applied in ((3.0, True), (-1.0, False)):  # SQNR −6 dB either way; only the labels differ
        after = Scaled(factor)
        err, broken, note = verify.judge(Different(), before, after, outputs, [factor * o for o in outputs], ctx,
                                         held=[3])
        assert err.sqnr_db < 0
        assert (broken is None) == applied, broken
        assert (note or broken).startswith("judged by held-out label accuracy 1.000" if applied else
                                           "held-out label accuracy 0.000 below 1.000")
    without_labels = PassContext(calibration=batches)
    _, broken, _ = verify.judge(Different(), before, Scaled(3.0), outputs, [3 * o for o in outputs], without_labels,
                                held=[3])
    assert broken.startswith("SQNR")  # no labels: the SQNR floor stays the contract


def _language_model_outputs(scale):
    """Token batches and logits sure of each next token (4 nats over 7 others), shrunk by `scale`."""
    ids = [(torch.randint(0, 8, (2, 6), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    sure = [torch.nn.functional.one_hot(torch.roll(b[0], -1, 1), 8).float() * 4 for b in ids]
    return ids, sure, [logits * scale for logits in sure]


@pytest.mark.parametrize("scale, rolled_back", [(0.8, True), (0.95, False)])
def test_a_language_model_whose_logits_meet_the_sqnr_floor_is_also_judged_by_perplexity(scale, rolled_back):
    """Logits at 0.8x keep 14 dB SQNR (over the 10 dB floor) and raise perplexity 1.14x: rolled back."""
    from types import SimpleNamespace

    from rewrite.passes.dgq import DualGrainedQuant
    ids, before, after = _language_model_outputs(scale)
    ctx = SimpleNamespace(calibration=ids, masks=None, targets=None, metric_floor=None, recover=None)
    err, broken, note = verify.judge(DualGrainedQuant(), torch.nn.Identity(), torch.nn.Identity(), before, after, ctx)
    assert err.sqnr_db > 10
    if rolled_back:
        assert broken.startswith("calibration perplexity") and "milder option" in broken and note is None
    else:
        assert broken is None and note.startswith("calibration perplexity")


def test_a_min_sqnr_the_user_set_is_the_only_bar_and_other_models_are_not_judged_by_perplexity():
    from types import SimpleNamespace

    from rewrite.passes.dgq import DualGrainedQuant
    ids, before, after = _language_model_outputs(0.8)
    ctx = SimpleNamespace(calibration=ids, masks=None, targets=None, metric_floor=None, recover=None)
    _, broken, note = verify.judge(DualGrainedQuant(min_sqnr=5.0), torch.nn.Identity(), torch.nn.Identity(), before,
                                   after, ctx)
    assert broken is None and note is None
    images = SimpleNamespace(**{**vars(ctx), "calibration": [(torch.randn(2, 3, 8, 8),) for _ in ids]})
    _, broken, note = verify.judge(DualGrainedQuant(), torch.nn.Identity(), torch.nn.Identity(), before, after, images)
    assert broken is None and note is None  # float inputs: no token ids to predict, so no perplexity
