import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewrite.errors import RewriteError
from rewrite.recover import RecoverSpec, _loss, distill
from rewrite.spec import recover_spec


@pytest.mark.parametrize("text", ["steps", "steps=x", "steps=0", "lr=-1", "epochs=3"])
def test_bad_recover_specs_are_one_line_errors(text):
    with pytest.raises(RewriteError) as exc:
        recover_spec(text)
    assert "\n" not in str(exc.value) and "steps" in str(exc.value)


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5))
    student = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5))
    batches = [(torch.randn(32, 8),) for _ in range(4)]
    return teacher, student, batches


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_distill_moves_the_student_toward_the_teacher(kind):
    teacher, student, batches = _pair()
    stats = distill(student, teacher, batches, RecoverSpec(steps=200, lr=1e-2), kind=kind)
    assert stats["loss_after"] < 0.5 * stats["loss_before"] and stats["loss"] == kind


def test_kl_ignores_what_a_softmax_ignores_and_mse_does_not():
    logits = torch.randn(4, 7)
    assert float(_loss(logits + 3.0, logits, "kl")) < 1e-6
    assert float(_loss(logits + 3.0, logits, "mse")) > 1.0


def test_integer_targets_train_by_cross_entropy():
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    torch.testing.assert_close(_loss(logits, labels), F.cross_entropy(logits, labels))
