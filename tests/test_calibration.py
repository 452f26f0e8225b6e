import pytest
import torch

from rewrite import calibration
from rewrite.errors import RewriteError
from rewrite.testing import TinyMLP
from tests.test_capture import _Outer


class _TwoInputs(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, scale=None):
        return input_ids.float() * (1 if attention_mask is None else attention_mask)


def test_structures_normalize_to_tuples_of_positional_inputs():
    model, x = TinyMLP(), torch.randn(4, 16)
    assert calibration.from_user(x, model, "c").batches == [(x,)]
    assert len(calibration.from_user([x, x, x], model, "c").batches) == 3
    assert calibration.from_user((x,), model, "c").batches == [(x,)]


def test_dicts_bind_to_the_forward_signature_and_drop_trailing_defaults():
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5)
    data = calibration.from_user([{"attention_mask": mask, "input_ids": ids}], _TwoInputs(), "c")
    assert data.batches == [(ids, mask)]


def test_inputs_with_targets():
    x, y = torch.randn(4, 16), torch.randn(4, 4)
    data = calibration.from_user({"inputs": [x, x], "targets": [y, y]}, TinyMLP(), "eval")
    assert len(data.batches) == 2 and data.targets == [y, y]


def test_batches_are_bounded():
    data = calibration.from_user([torch.randn(2, 16)] * 50, TinyMLP(), "c")
    assert len(data.batches) == calibration.MAX_BATCHES


@pytest.mark.parametrize("bad, message", [
    ("text", "wrong structure"),
    ([["a", "b"]], "wrong structure"),
    ([], "empty"),
    ({"wrong_key": torch.randn(2, 16)}, "do not match the model's forward"),
])
def test_wrong_structures_are_one_line_errors(bad, message):
    with pytest.raises(RewriteError, match=message):
        calibration.from_user(bad, TinyMLP(), "calibration")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_data_is_refused(value):
    x = torch.randn(4, 16)
    x[1, 3] = value
    with pytest.raises(RewriteError, match="NaN or inf"):
        calibration.from_user([torch.randn(4, 16), x], TinyMLP(), "calibration")


def test_unreadable_files(tmp_path):
    with pytest.raises(RewriteError, match="not found"):
        calibration.load_file(tmp_path / "missing.pt", "calibration")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(RewriteError, match="not readable tensor data"):
        calibration.load_file(junk, "calibration")


def test_weights_only_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(_Outer(), path)
    with pytest.raises(RewriteError, match="not readable tensor data"):
        calibration.load_file(path, "calibration")


def test_synthetic_data_is_seeded():
    x = (torch.randn(2, 3),)
    a, b = calibration.synthetic(x, seed=3), calibration.synthetic(x, seed=3)
    assert a.synthetic and all(torch.equal(p[0], q[0]) for p, q in zip(a.batches, b.batches))
