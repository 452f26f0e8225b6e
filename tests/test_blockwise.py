import pytest
import torch
import transformers
from torch import nn

import rewrite
from rewrite import blockwise, measure
from rewrite.errors import RewriteError


def _llama(layers=2, tied=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _ids(seed, shape=(2, 16)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_the_stack_of_repeated_blocks_is_found_in_encoders_and_decoders():
    path, blocks = blockwise.find_stack(_llama(layers=3))
    assert path == "model.layers" and len(blocks) == 3
    path, blocks = blockwise.find_stack(_bert())
    assert path == "encoder.layer" and len(blocks) == 3


def test_a_model_without_repeated_blocks_is_refused_with_the_reason():
    with pytest.raises(RewriteError, match="no stack of repeated blocks"):
        blockwise.find_stack(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_block_by_block_dgq_equals_the_whole_model_run():
    model, calib = _llama(), [(_ids(i),) for i in range(3)]
    spec = "dgq{group=32,budget-cos=0,min-sqnr=-100}"
    whole = rewrite.optimize(model, calib[0], spec, calib=calib, measure_latency=False)
    blocks = rewrite.optimize(model, calib[0], spec, calib=calib, measure_latency=False, blockwise=True)
    assert [r.stats["quantized"] for r in blocks.report.records] == [7, 7]
    assert whole.report.records[0].stats["quantized"] == 14  # the tied lm_head is left alone in both
    evaluation = [(_ids(10 + i),) for i in range(2)]
    with torch.no_grad():
        ppl = [measure.perplexity([m(*b) for b in evaluation], [b[0] for b in evaluation])
               for m in (whole.model, blocks.model)]
    assert abs(ppl[0] - ppl[1]) / ppl[0] < 1e-3
    assert "block by block: 2 LlamaDecoderLayer blocks of model.layers" in blocks.report.capture
    for name, module in blocks.model.named_modules():
        assert not isinstance(module, nn.Linear) or name == "lm_head"


def test_encoder_blocks_called_with_keyword_masks_are_rewritten_and_verified():
    model = _bert()
    ids, mask = _ids(1), torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    result = rewrite.optimize(model, (ids, mask), "fwsvd{param-ratio=0.9,min-sqnr=-100}",
                              calib=[(_ids(i), mask) for i in range(2)], measure_latency=False, blockwise=True)
    assert [r.status for r in result.report.records] == ["applied"] * 3
    with torch.no_grad():
        want, got = model(ids, mask).last_hidden_state, result.model(ids, mask).last_hidden_state
    assert torch.nn.functional.cosine_similarity(want, got, dim=-1).mean() > 0.9


def test_recovery_with_blockwise_is_refused_for_now():
    with pytest.raises(RewriteError, match="--recover does not run with --blockwise"):
        rewrite.optimize(_llama(), (_ids(0),), "dgq", calib=[(_ids(1),)], recover="steps=2", blockwise=True,
                         measure_latency=False)
