import pytest
import torch
import transformers

import rewrite
from rewrite import capture
from rewrite.passes.rotate import Rotate, orthogonal, residual_stream
from rewrite.patterns import set_submodule
from rewrite.testing import TinyDecoder, check_pass
from tests import fresh


def _llama(tied=True, width=128):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 2.0)  # norms that are not ones: folding them is part of what is checked
    return model


def _ids(seed, shape=(2, 12)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _same_logits_and_reloads(model, rotated, tmp_path):
    """The rotated model's logits are the original's, and so are those of its folder loaded by from_pretrained."""
    with torch.no_grad():
        want = model(_ids(9)).logits
    assert (rotated(_ids(9)).logits - want).abs().max() < 1e-4 * want.abs().max()
    rotated.save_pretrained(tmp_path / "folder")
    reloaded = fresh.run(fresh.RELOAD_LOGITS, tmp_path / "folder", _ids(9), tmp_path)
    assert (reloaded - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("width", [128, 576, 50])
def test_q_is_orthogonal_hadamard_blocks_where_64_divides_the_width(width):
    q = orthogonal(width, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal(width, seed=3)) and not torch.equal(q, orthogonal(width, seed=4))
    if width % 64 == 0:  # every entry of R ⊗ H₆₄ has H's magnitude 1/8 times one of R's
        assert torch.allclose((q[:, :64].abs() * 8).std(1), torch.zeros(width, dtype=torch.float64), atol=1e-12)


def test_the_stream_of_a_llama_has_its_norms_readers_and_writers():
    model, ids = _llama(), _ids(0)
    capture.without_kv_cache(model, (ids,))
    stream = residual_stream(capture.capture(model, (ids,)).module)
    assert len(stream.norms) == 5 and len(stream.writers) == 4  # 2 blocks × 2 norms + the final one; o, down
    assert sorted(p for paths in stream.readers.values() for p in paths) == sorted(
        [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
        + ["lm_head"])


def test_rotation_is_exact_keeps_the_class_and_unties_the_head(tmp_path):
    model, ids = _llama(), _ids(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = check_pass(Rotate(), model, (ids,), calib=[(_ids(s),) for s in range(3)])
    record, rotated = result.report.records[0], result.model
    assert record.status == "applied" and record.stats["untied"] == "lm_head"
    assert isinstance(rotated, transformers.LlamaForCausalLM) and rotated.config.tie_word_embeddings is False
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(norm.weight, torch.ones_like(norm.weight))
               for name, norm in rotated.named_modules() if name.endswith("norm"))
    with torch.no_grad():
        want, got = model(_ids(9)).logits, rotated(_ids(9)).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the user's model untouched
    assert torch.equal(rotated.generate(ids[:1], max_new_tokens=4, do_sample=False),
                       model.generate(ids[:1], max_new_tokens=4, do_sample=False))
    rotated.save_pretrained(tmp_path / "folder")
    reloaded = fresh.run(fresh.RELOAD_LOGITS, tmp_path / "folder", _ids(9), tmp_path)
    assert (reloaded - want).abs().max() < 1e-4 * want.abs().max()


def test_a_gemma_rotates_exactly_through_its_scaled_embeddings_and_one_plus_weight_norms(tmp_path):
    """Gemma scales its embeddings by √d (a constant scalar: it commutes with Q), its RMSNorms multiply by 1 + w
    and cast back with type_as: rotate applies, folds 1 + w into the readers (w ← 0), keeps the class, and the
    folder loads with from_pretrained to the same logits."""
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                   max_position_embeddings=64)
    model = transformers.GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 1.0)  # scales 1 + w from 0.5 to 2
    result = check_pass(Rotate(), model, (_ids(0),), calib=[(_ids(s),) for s in range(2)])
    record, rotated = result.report.records[0], result.model
    assert record.status == "applied" and record.stats["norms_folded"] == 5, record.reason
    assert isinstance(rotated, transformers.GemmaForCausalLM)
    assert all(torch.equal(norm.weight, torch.zeros_like(norm.weight))
               for name, norm in rotated.named_modules() if name.endswith("norm"))
    _same_logits_and_reloads(model, rotated, tmp_path)


def test_a_granite_rotates_exactly_through_its_residual_and_embedding_multipliers(tmp_path):
    """Granite writes o_proj's and down_proj's outputs into the stream times a constant (residual_multiplier) and
    scales its embeddings: both commute with Q, so rotate applies, the class is kept and the folder loads."""
    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     residual_multiplier=0.22, embedding_multiplier=12.0, logits_scaling=8.0)
    model = transformers.GraniteForCausalLM(cfg).eval()
    result = check_pass(Rotate(), model, (_ids(0),), calib=[(_ids(s),) for s in range(2)])
    record, rotated = result.report.records[0], result.model
    assert record.status == "applied" and record.stats["norms_folded"] == 5, record.reason
    assert isinstance(rotated, transformers.GraniteForCausalLM)
    _same_logits_and_reloads(model, rotated, tmp_path)


def test_q_for_a_layernorm_stream_is_orthogonal_and_keeps_the_all_ones_direction():
    from rewrite.passes.rotate import keeping_ones
    q = keeping_ones(orthogonal(128, 3))
    ones = torch.ones(128, dtype=torch.float64)
    assert torch.allclose(q.T @ q, torch.eye(128, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ones @ q, ones, atol=1e-12) and torch.allclose(q @ ones, ones, atol=1e-12)


@pytest.mark.parametrize("family", ["StableLm", "GPTJ", "GPTNeoX", "OPT", "GPT2", "Cohere"])
def test_a_layernorm_decoder_rotates_exactly_keeping_its_norms_and_class(family, tmp_path):
    """StableLM (sequential blocks), GPT-J (parallel attention and MLP), GPT-NeoX (Pythia: parallel, with a norm for
    each branch, both reading one stream value), OPT (learned positions) and GPT-2 (learned
    positions, Conv1D layers: capture lifts them into Linears, and they go back as Conv1D) read their
    streams through torch's LayerNorm, with weights and biases, and Cohere through its own, written out without β
    (parallel blocks, the head's logit scale): every addition is centred (the position table
    too), Q keeps the all-ones direction, γ folds into the readers and β becomes (β/γ)·Q; the class, its LayerNorm
    modules and from_pretrained's folder stay."""
    torch.manual_seed(0)
    if family == "GPT2":
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64)
    elif family == "Cohere":
        cfg = transformers.CohereConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    elif family == "GPTJ":
        cfg = transformers.GPTJConfig(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64, rotary_dim=16)
    elif family == "GPTNeoX":
        cfg = transformers.GPTNeoXConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64)
    elif family == "OPT":  # learned positions added into the stream (a table of their own, cast), reshaped FFN inputs
        cfg = transformers.OPTConfig(vocab_size=256, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=128)
    else:
        cfg = transformers.StableLmConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = getattr(transformers, "GPT2LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                p.add_(0.5 * torch.rand_like(p) + (0.25 if name.endswith("weight") else -0.25))
    assert not Rotate.finds_nothing_in(model)  # `rewrite tune` tries it (GPT-2's class is an …LMHeadModel)
    result = check_pass(Rotate(), model, (_ids(0),), calib=[(_ids(s),) for s in range(2)])
    record, rotated = result.report.records[0], result.model
    folded = 3 if family in ("GPTJ", "Cohere") else 5  # one norm a block before both branches, or one before each
    assert record.status == "applied" and record.stats["norms_folded"] == folded, record.reason
    assert type(rotated) is type(model)
    norms = [m for m in rotated.modules() if type(m).__name__.endswith("LayerNorm")]
    assert len(norms) == folded and all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    if family == "GPT2":
        assert type(rotated.transformer.h[0].mlp.c_fc) is type(model.transformer.h[0].mlp.c_fc)  # Conv1D
    _same_logits_and_reloads(model, rotated, tmp_path)


def test_a_mamba_rotates_exactly_through_the_no_op_cast_before_its_mixer(tmp_path):
    """Mamba's mixer reads the normed stream through a no-op that export writes as aten.alias (with one sequence a
    batch), which rotate once took for a reader that does not commute ("feeds alias")."""
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, state_size=8, expand=2)
    model = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.rand_like(p))
    one = (1, 12)  # one sequence a batch: the cast is written as an alias only then
    result = check_pass(Rotate(), model, (_ids(0, one),), calib=[(_ids(s, one),) for s in range(2)])
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["norms_folded"] == 3, record.reason  # one a block, the last
    assert type(result.model) is type(model)
    _same_logits_and_reloads(model, result.model, tmp_path)


def test_an_untied_head_stays_untied_and_nothing_grows():
    model, ids = _llama(tied=False), _ids(0)
    record = check_pass(Rotate(), model, (ids,), calib=[(ids,)]).report.records[0]
    assert record.status == "applied" and "untied" not in record.stats
    assert record.params_after == record.params_before


def _stablelm():
    torch.manual_seed(0)
    return transformers.StableLmForCausalLM(transformers.StableLmConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("build", [lambda: _llama(tied=False), _stablelm], ids=["rmsnorm", "layernorm"])
def test_an_outlier_channel_costs_int8_activations_less_after_rotation(build):
    """The point of the pass: one channel of the stream 200x the others (a decoder's massive activations) makes
    every token's int8 grid coarse for the rest; rotated, its mass is spread over all channels, and dgq's A8W4
    keeps more of the output."""
    model, ids = build(), _ids(0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] *= 200
    calib = [(_ids(s, (4, 16)),) for s in range(4)]
    plain = rewrite.optimize(model, (ids,), "dgq{budget-cos=0,smooth=false}", calib=calib, measure_latency=False)
    rotated = rewrite.optimize(model, (ids,), "rotate,dgq{budget-cos=0,smooth=false}", calib=calib,
                               measure_latency=False)
    assert [r.status for r in rotated.report.records] == ["applied", "applied"]
    assert rotated.report.records[1].error["sqnr_db"] > plain.report.records[0].error["sqnr_db"] + 3, (
        rotated.report.records[1].error["sqnr_db"], plain.report.records[0].error["sqnr_db"])


def test_layernorm_models_are_left_alone_and_say_why():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    bert = transformers.BertModel(cfg).eval()
    assert Rotate.finds_nothing_in(bert) and not Rotate.finds_nothing_in(_llama())
    record = check_pass(Rotate(), bert, (_ids(0),), calib=[(_ids(1),)]).report.records[0]
    assert record.status == "nothing to rewrite"
    assert record.reason.startswith("residual stream:")


@pytest.mark.parametrize("fused", [False, True])
def test_a_plain_torch_decoder_rotates_with_either_rmsnorm(fused):
    model = TinyDecoder()
    with torch.no_grad():
        for name in ("norms.0", "norms.1", "norm"):
            norm = torch.nn.RMSNorm(64, eps=1e-5) if fused else model.get_submodule(name)
            norm.weight.uniform_(0.5, 2.0)
            set_submodule(model, name, norm)
    (ids,) = model.example_inputs()
    result = check_pass(Rotate(), model, (ids,), calib=[(ids,)])
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["norms_folded"] == 3 and record.stats["writers"] == 2
    with torch.no_grad():
        assert torch.allclose(result.model(ids), model(ids), atol=1e-4)


class _ParallelDecoder(TinyDecoder):
    """Each block writes 0.5·(a(h) + b(h)) into the stream, h its norm's output: a parallel block (Phi, GPT-J)
    whose sum is scaled by a constant (Granite's residual multiplier)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for norm, block, a in zip(self.norms, self.blocks, self.a):
            h = norm(x)
            x = x + 0.5 * (a(h) + block(h))
        return self.head(self.norm(x))


def test_a_parallel_block_s_scaled_sum_of_linear_outputs_is_written_into_the_stream_exactly():
    model = _ParallelDecoder().eval()
    (ids,) = model.example_inputs()
    result = check_pass(Rotate(), model, (ids,), calib=[(ids,)])
    record = result.report.records[0]
    assert record.status == "applied" and record.stats["writers"] == 4, record.reason
    with torch.no_grad():
        assert torch.allclose(result.model(ids), model(ids), atol=1e-4)


def test_a_value_that_is_not_made_of_linear_outputs_is_refused_with_what_rotate_passes():
    class Gelu(_ParallelDecoder):
        def forward(self, ids):
            x = self.embed(ids)
            for norm, block, a in zip(self.norms, self.blocks, self.a):
                h = norm(x)
                x = x + torch.nn.functional.gelu(a(h) + block(h))
            return self.head(self.norm(x))

    model = Gelu().eval()
    (ids,) = model.example_inputs()
    record = check_pass(Rotate(), model, (ids,), calib=[(ids,)]).report.records[0]
    assert record.status == "nothing to rewrite" and "their sums and constant multiples" in record.reason


def test_after_quantization_it_says_to_go_first():
    model, ids = _llama(tied=False), _ids(0)
    calib = [(_ids(s),) for s in range(2)]
    result = rewrite.optimize(model, (ids,), "dgq{budget-cos=0,min-sqnr=-100},rotate", calib=calib,
                              measure_latency=False)
    record = result.report.records[1]
    assert record.status == "nothing to rewrite"
    assert "DGQLinear" in record.reason and "rotate goes first" in record.reason


@pytest.mark.parametrize("seed", [-1, 2 ** 70])
def test_a_seed_out_of_range_is_a_clear_error(seed):
    with pytest.raises(rewrite.RewriteError, match="seed="):
        rewrite.optimize(_llama(), (_ids(0),), f"rotate{{seed={seed}}}", measure_latency=False)
