import subprocess
import sys
import time
from pathlib import Path

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


def test_padded_positions_do_not_count_in_the_loss():
    out, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = target.clone()
    garbage[0, 3:] = 1e3
    torch.testing.assert_close(_loss(out, garbage, "mse", mask), _loss(out[mask.bool()], target[mask.bool()], "mse"))
    assert float(_loss(out, garbage, "mse")) != pytest.approx(float(_loss(out, target, "mse")))


def test_recovery_with_masks_fits_the_kept_positions_only():
    # What padded positions "should" output is noise: with the masks, the student learns the real map.
    torch.manual_seed(0)
    true = nn.Linear(8, 8)
    batches, targets, masks = [], [], []
    for _ in range(4):
        x, mask = torch.randn(4, 6, 8), torch.ones(4, 6, dtype=torch.long)
        mask[:, 4:] = 0
        y = true(x).detach()
        y[:, 4:] = 50 * torch.randn(4, 2, 8)
        batches, targets, masks = batches + [(x,)], targets + [y], masks + [mask]
    errors = {}
    for masked in (True, False):
        student = nn.Linear(8, 8)
        distill(student, None, batches, RecoverSpec(steps=300, lr=3e-2, patience=300), targets=targets,
                masks=masks if masked else None)
        errors[masked] = float(((student.weight - true.weight).norm() / true.weight.norm()).detach())
    assert errors[True] < 0.05 < errors[False]


def _torchrun(processes: int) -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                           "-m", "tests.ddp_recover"], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_under_torchrun_follow_the_one_process_loss_curve():
    one, two = _torchrun(1), _torchrun(2)
    assert two["processes"] == 2 and one["processes"] == 1
    assert len(one["curve"]) == len(two["curve"]) > 5 and one["curve"][-1] < one["curve"][0]
    assert one["curve"] == pytest.approx(two["curve"], rel=1e-4)


def test_each_rank_takes_an_equal_share_of_every_batch(monkeypatch):
    from rewrite import distributed
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    x, mask = torch.arange(8.0).reshape(4, 2), torch.ones(4, 3)
    part = distributed.shard((x, mask, None))
    assert torch.equal(part[0], x[2:]) and part[1].shape == (2, 3) and part[2] is None
    with pytest.raises(RewriteError, match="cannot share equally"):
        distributed.shard((torch.randn(3, 2),))


def test_language_model_logits_distill_by_kl():
    import transformers
    import rewrite
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    calib = [(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    record = rewrite.optimize(model, calib[0], "lowrank{param-ratio=0.5,min-sqnr=-100}", calib=calib,
                              recover="steps=5", measure_latency=False).report.records[0]
    assert record.stats["recovery_loss"].startswith("kl "), record.stats["recovery_loss"]


def _tiny_llama():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    calib = [(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    return transformers.LlamaForCausalLM(cfg).eval(), calib


def test_a_recovered_language_model_is_judged_by_held_out_perplexity(monkeypatch):
    import rewrite
    from rewrite import verify
    model, calib = _tiny_llama()
    record = rewrite.optimize(model, calib[0], "lowrank{param-ratio=0.5}", calib=calib, recover="steps=5",
                              measure_latency=False).report.records[0]
    assert "perplexity" in record.reason and "SQNR" in record.reason, record.reason
    monkeypatch.setattr(verify, "PERPLEXITY_TOLERANCE", -1.0)  # no rise allowed at all, not even none
    record = rewrite.optimize(model, calib[0], "lowrank{param-ratio=0.5}", calib=calib, recover="steps=5",
                              measure_latency=False).report.records[0]
    assert record.status == "rolled back" and "held-out perplexity" in record.reason, record.reason


def test_a_min_sqnr_the_user_set_still_judges_a_recovered_language_model():
    import rewrite
    model, calib = _tiny_llama()
    record = rewrite.optimize(model, calib[0], "lowrank{param-ratio=0.5,min-sqnr=60}", calib=calib,
                              recover="steps=5", measure_latency=False).report.records[0]
    assert record.status == "rolled back" and "SQNR" in record.reason and "perplexity" not in record.reason


def test_a_token_classifier_is_not_judged_as_a_language_model():
    from types import SimpleNamespace
    from rewrite import verify
    ids = [(torch.randint(0, 8, (2, 6)),) for _ in range(2)]
    lagged = [torch.nn.functional.one_hot(torch.roll(b[0], 3, 1), 8).float() * 20 for b in ids]  # sure, but of an earlier token
    ctx = SimpleNamespace(recover="steps=1", targets=None, masks=None, calibration=ids)
    assert not verify._judged_by_perplexity(object(), ctx, [0, 1], lagged)
    following = [torch.nn.functional.one_hot(torch.roll(b[0], -1, 1), 8).float() * 20 for b in ids]  # the next token
    assert verify._judged_by_perplexity(object(), ctx, [0, 1], following)
    assert not verify._judged_by_perplexity(object(), SimpleNamespace(**{**vars(ctx), "targets": ids}), [0, 1], following)


def _torchrun_cli(mode: str, tmp_path) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "tests.ddp_dies",
                           str(tmp_path / "out"), mode], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    return done, [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_rank_that_dies_in_recovery_stops_the_others_with_one_line_and_no_output(tmp_path):
    start = time.perf_counter()
    done, errors = _torchrun_cli("dies", tmp_path)
    assert done.returncode != 0 and time.perf_counter() - start < 120
    # torchrun's SIGTERM, or (when the dead peer's closed socket is noticed first) the failed collective
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 ") and errors[0].endswith(
        "nothing was written to the output folder"), done.stdout[-2000:] + done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no output folder, no hidden staging folder, no lock file


@pytest.mark.slow
def test_ranks_given_different_arguments_are_refused_before_any_work(tmp_path):
    done, errors = _torchrun_cli("mismatch", tmp_path)
    assert done.returncode != 0 and len(errors) == 2, done.stderr[-3000:]
    assert all("were given different seed" in e for e in errors)
    assert list(tmp_path.iterdir()) == []


# --- layer-local recovery ----------------------------------------------------------------------

class _Swapped(nn.Linear):
    """A stand-in for a pass's replacement layer (another type at the same path)."""


def _swapped_pair(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5))
    student = nn.Sequential(_Swapped(8, 16), nn.GELU(), _Swapped(16, 5))
    with torch.no_grad():
        for t, s in ((teacher[0], student[0]), (teacher[2], student[2])):
            s.weight.copy_(t.weight + 0.3 * torch.randn_like(t.weight))
            s.bias.copy_(t.bias)
    batches = [(torch.randn(64, 8),) for _ in range(6)]
    return teacher, student, batches


def test_swapped_layers_are_found_in_forward_order():
    from rewrite.recover import swapped_layers
    teacher, student, _ = _swapped_pair()
    assert swapped_layers(student, teacher) == ["0", "2"]
    assert swapped_layers(teacher, teacher) == []


def test_local_recovery_fits_each_layer_to_its_original():
    from rewrite.recover import fit_layers
    teacher, student, batches = _swapped_pair()
    error = lambda: sum(float(((student(*b) - teacher(*b)).detach() ** 2).sum()) for b in batches[4:])
    start = error()
    stats = fit_layers(student, teacher, ["2", "0"], batches[:4], RecoverSpec(steps=300, lr=1e-2, patience=300),
                       held_out=batches[4:])
    assert stats["layers"] == 2 and stats["loss_after"] < 0.1 * stats["loss_before"]
    assert error() < 0.05 * start  # on batches it never trained on
    assert not any(p.requires_grad for p in student.parameters())


def test_a_later_layer_makes_up_for_an_earlier_one_it_cannot_fix():
    """The second layer sees the first layer's real (wrong) outputs and its original's targets."""
    from rewrite.recover import fit_layers
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    student = nn.Sequential(nn.Linear(6, 6), _Swapped(6, 6))
    with torch.no_grad():  # the first layer is off by an invertible map; the second can undo it exactly
        student[0].weight.copy_(2 * teacher[0].weight)
        student[0].bias.copy_(2 * teacher[0].bias)
    batches = [(torch.randn(64, 6),) for _ in range(6)]
    fit_layers(student, teacher, ["1"], batches[:4], RecoverSpec(steps=600, lr=1e-2, patience=600), held_out=batches[4:])
    with torch.no_grad():
        rel = sum(float(((student(*b) - teacher(*b)) ** 2).sum() / (teacher(*b) ** 2).sum()) for b in batches[4:]) / 2
    assert rel < 1e-3, rel


def test_local_recovery_through_the_pipeline_reports_its_layers():
    import rewrite
    from rewrite.passes.lowrank import StructuredFFN
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    calib = [(torch.randn(32, 16),) for _ in range(4)]
    record = rewrite.optimize(model, calib[0], "lowrank{param-ratio=0.5,min-sqnr=-100}", calib=calib,
                              recover="local,steps=20", measure_latency=False).report.records[0]
    assert record.status == "applied", record.reason
    assert record.stats["recovery_layers"] == 2 and record.stats["recovery_local_loss"].startswith("mse")
    assert "recovery_steps" not in record.stats  # no whole-model distillation unless then= asks for it
    record = rewrite.optimize(model, calib[0], "lowrank{param-ratio=0.5,min-sqnr=-100}", calib=calib,
                              recover="local,steps=20,then=8", measure_latency=False).report.records[0]
    assert record.stats["recovery_layers"] == 2 and 0 < record.stats["recovery_steps"] <= 8
    assert record.stats["recovery_lr"] == StructuredFFN.recovery_lr


def test_local_parses_as_a_recovery_mode():
    assert recover_spec("local").local and recover_spec("local").steps == 200
    assert recover_spec("local,steps=5,lr=0.01") == RecoverSpec(steps=5, lr=0.01, local=True)
    assert not recover_spec("steps=5").local
    assert recover_spec("local,then=300").then == 300
    with pytest.raises(RewriteError, match="local,then"):
        recover_spec("steps=5,then=3")
