"""Paired latency: the interval and the verdict word, on synthetic timings and on models that really differ."""
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import rewrite
from rewrite import measure, timing
from rewrite.measure import Speed
from rewrite.pass_base import Exact, Pass, PassContext, PassResult


def test_median_interval_is_distribution_free_and_contains_the_median():
    values = [1.0 + 0.01 * i for i in range(20)]
    median, low, high = timing.median_ci(values)
    assert low < median < high
    assert (low, high) == (values[5], values[14])  # sign test, n = 20: 6th and 15th order statistics


@pytest.mark.parametrize("ratio, low, high, word", [
    (1.30, 1.25, 1.35, "faster"),
    (0.70, 0.65, 0.75, "SLOWER"),
    (1.05, 0.95, 1.15, "no measurable difference"),  # the interval holds 1
    (1.01, 1.005, 1.015, "no measurable difference"),  # confident but negligible
])
def test_speed_words(ratio, low, high, word):
    assert Speed("torch", ratio, low, high, 20).word == word


def test_noise_on_one_side_does_not_flip_the_verdict():
    """Load that hits only some rounds slows both models in those rounds: the paired ratio stays put."""
    original = [10.0] * 20
    rewritten = [10.0] * 20
    for i in (3, 4, 5, 11):  # a background job
        original[i] *= 5
        rewritten[i] *= 5
    ratio, low, high = timing.median_ci([a / b for a, b in zip(original, rewritten)])
    assert Speed("torch", ratio, low, high, 20).word == "no measurable difference"


@dataclass(frozen=True)
class AddWork(Pass):
    """A test pass that keeps the function and adds work: the rewritten model must be reported slower."""

    name = "add-work"
    contract = Exact()
    level = "module"

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        return PassResult(_Repeated(module), True)


class _Repeated(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        for _ in range(7):
            self.inner(x)
        return self.inner(x)


@pytest.mark.slow
def test_a_deliberately_slower_rewrite_is_reported_slower_with_confidence():
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).eval()
    report = rewrite.optimize(model, (torch.randn(32, 256),), [AddWork()]).report
    (speed,) = report.speeds
    assert speed.word == "SLOWER" and speed.high < 1, speed
    assert any("SLOWER" in line and "95% interval" in line for line in report.verdicts())


def test_the_onnxruntime_worker_runs_without_torch(tmp_path):
    probe = f"import runpy, sys; runpy.run_path({timing.__file__!r}); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_a_pair_of_slow_calls_is_warmed_up_once_and_its_sizing_calls_are_the_first_round():
    import time
    calls = [0, 0]

    def call(which):
        def run():
            calls[which] += 1
            time.sleep(timing.ROUND_MS / 1e3)  # one call fills a round: one call a round
        return run
    first, second, _ = timing.paired_rounds(call(0), call(1), budget_s=0, min_rounds=3)
    assert len(first) == len(second) == 3 and calls == [1 + 3, 1 + 3]  # a decode's call is seconds: none wasted

    def quick(which):
        def run():
            calls[which] += 1
        return run
    calls[:] = [0, 0]
    first, second, every = timing.paired_rounds(quick(0), quick(1), budget_s=0, min_rounds=3)
    assert len(first) == 3 and len(every[0]) == 150 and calls == [2 + 150, 2 + 150]  # rounds of 50; sizing apart


def test_onnx_pair_is_timed_in_a_worker(tmp_path):
    small, big = nn.Linear(64, 64).eval(), nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)]).eval()
    x = torch.randn(16, 64)
    for name, m in (("a", small), ("b", big)):
        torch.onnx.export(m, (x,), str(tmp_path / f"{name}.onnx"), dynamo=False)
    timed = measure.compare_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", (x,), budget_s=0.5)
    assert timed.speed.backend == "onnxruntime" and timed.speed.rounds >= 10
    assert measure.compare_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", (x,), 0, min_rounds=3).speed.rounds == 3
    assert timed.original[2] > 0 and timed.rewritten[0] > 0


def test_perplexity_is_the_exponentiated_next_token_loss():
    from rewrite.measure import perplexity
    uniform = torch.zeros(2, 5, 10)  # every token equally likely: perplexity = vocabulary size
    ids = torch.randint(0, 10, (2, 5))
    assert perplexity([uniform], [ids]) == pytest.approx(10.0)
    sure = torch.full((1, 3, 4), -30.0)
    sure[0, 0, 2], sure[0, 1, 3] = 30.0, 30.0  # position i predicts token i+1 with certainty
    assert perplexity([sure], [torch.tensor([[0, 2, 3]])]) == pytest.approx(1.0)
    padded = torch.tensor([[0, 2, -100]])  # ignored positions do not count
    assert perplexity([sure], [padded]) == pytest.approx(1.0)


def test_perplexity_eval_needs_no_targets_and_is_lower_is_better():
    from rewrite import measure
    assert measure.meets("perplexity", 20.0, 25.0) and not measure.meets("perplexity", 30.0, 25.0)


def test_profiles_name_the_ops_that_take_the_time_in_both_runtimes(tmp_path):
    from rewrite import api
    from rewrite.testing import TinyMLP
    model, x = TinyMLP().eval(), torch.randn(32, 16)
    result = api.optimize(model, (x,), "fold-bn", emit="onnx", out=tmp_path, measure_latency=False, profile=True)
    profiles = result.report.profiles
    assert set(profiles) == {"torch, original", "torch, rewritten", "onnxruntime, rewritten"}
    torch_ops = [op for op, _, _ in profiles["torch, rewritten"]]
    assert any("addmm" in op or "linear" in op or "mm" in op for op in torch_ops)
    assert any(op in ("Gemm", "MatMul") for op, _, _ in profiles["onnxruntime, rewritten"])
    shares = [share for _, _, share in profiles["torch, original"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.01  # shares are rounded
    assert "Where the time goes" in (tmp_path / "report.md").read_text()


def test_quantized_weights_held_in_buffers_count_as_parameters_and_bytes():
    """dgq keeps int8 codes and scales in buffers: a report once said `params 198,272 → 512`."""
    from tests.passes.test_lowrank import FFN
    model = FFN(d=128, hidden=256).eval()
    calib = [torch.randn(32, 128) for _ in range(2)]
    result = rewrite.optimize(model, (calib[0],), "dgq{min-sqnr=0}", calib=calib, measure_latency=False)
    [record] = result.report.records
    assert record.params_after >= 0.9 * record.params_before  # the same weights, now int8 codes + scales
    assert record.bytes_after < 0.35 * record.bytes_before  # int8 (and fp scales) instead of fp32
    assert measure.weight_bytes(model) == 4 * measure.param_count(model)


def test_position_ids_and_counters_are_not_weights():
    bn = nn.BatchNorm1d(4)  # running stats are weights a layer holds; num_batches_tracked is a counter
    assert measure.param_count(bn) == 16
    holder = nn.Module()
    holder.register_buffer("position_ids", torch.arange(512)[None])
    assert measure.param_count(holder) == 0


class _Encoder(nn.Module):
    """Per-position outputs (an encoder's hidden states): what comes out at padded positions is noise."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x, attention_mask):
        return self.proj(x) + (1 - attention_mask[..., None]) * torch.randn(*x.shape[:2], 6) * 100


def test_held_out_cosine_and_rel_l2_leave_padded_positions_out_as_verification_does():
    """MiniLM's held-out cosine once counted the hidden states at padding, which no user reads: a per-tensor
    activation scale looked 0.985 where the unpadded positions gave 0.989 (embeddings 0.993)."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    x = torch.randn(3, 5, 4)
    targets = [model.proj(x).detach()]
    data = {"inputs": [(x, mask)], "targets": targets}
    scores = {m: rewrite.optimize(model, (x, mask), "fold-bn", eval=data, metric=m, measure_latency=False)
              .report.metric["rewritten"] for m in ("cosine", "rel-l2")}
    assert scores == {"cosine": pytest.approx(1.0), "rel-l2": pytest.approx(0.0, abs=1e-6)}
    unmasked = measure.cosine([model(x, mask)], targets)  # no masks: the padded row's noise counts
    assert unmasked < 0.9
    with torch.no_grad():  # pooled outputs (batch, values) are not per position: nothing to leave out
        assert measure.cosine([targets[0][:, 0]], [targets[0][:, 0]], [mask]) == pytest.approx(1.0)


def test_embedding_cosine_compares_each_sentences_mean_over_its_unpadded_positions():
    """A sentence encoder's user reads the mean of its hidden states (mean pooling): token errors that cancel
    in the mean leave the embedding as it was, while `cosine` on the hidden states counts them."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 6)
    mask = torch.ones(2, 4)
    mask[1, 2:] = 0
    noise = torch.randn(2, 1, 6).expand(2, 2, 6)
    cancels = hidden + torch.cat([noise, -noise], 1)  # ± the same error on two positions of each sentence
    cancels[1, 2:] = 1e3  # sentence 1's second pair is padding: what the model made there is not read
    cancels[1, 1] = hidden[1, 1] + (hidden[1, 0] - cancels[1, 0])  # its kept pair cancels on its own
    assert measure.embedding_cosine([cancels], [hidden], [mask]) == pytest.approx(1.0)
    assert measure.cosine([cancels], [hidden], [mask]) < 0.95
    pooled = hidden.mean(1)
    assert measure.embedding_cosine([pooled], [pooled]) == pytest.approx(1.0)  # (batch, values): as it is
    assert measure.embedding_cosine([-hidden], [hidden], [mask]) == pytest.approx(-1.0)
    assert measure.HIGHER_IS_BETTER["embedding-cosine"] and "embedding-cosine" in measure.METRICS


def test_the_context_length_is_read_under_each_family_s_name_for_it():
    from types import SimpleNamespace
    assert measure.context_length(SimpleNamespace(max_seq_len=128)) == 128  # MPT: a 512-token prompt would not fit
    assert measure.context_length(SimpleNamespace(n_positions=64, vocab_size=10)) == 64  # GPT-2
    assert measure.context_length(SimpleNamespace(vocab_size=10)) == measure.PROMPT_TOKENS + measure.NEW_TOKENS


class _BrokenForCausalLM(nn.Module):
    """A causal LM by its name whose generation raises: what timing must survive."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 16, "max_seq_len": 32})()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **_):
        return self.fc(x)

    def generate(self, *args, **kwargs):
        raise RuntimeError("the cache is gone")


def test_a_generation_that_cannot_be_timed_is_a_warning_in_the_report_not_a_failed_run():
    from rewrite import judge
    from rewrite.report import RunReport
    model, inputs = _BrokenForCausalLM().eval(), (torch.randn(2, 4),)
    report = RunReport(pipeline="-", capture="-", inputs="-")
    judge.before_after(report, model, model, inputs, [inputs], None, None, None, latency=True, profile=False,
                       own_class=True, say=lambda *a, **k: None)
    assert [w for w in report.warnings if w.startswith("generation was not timed: generate() raised")]
    assert not report.generation
    assert {s.backend for s in report.speeds} == {"torch"}  # the forward's own timing stands
