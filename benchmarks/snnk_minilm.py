"""snnk at all-MiniLM-L6-v2's feed-forward shape: per-token cost, measured block latency and FFN size.

The block 384 → 1536 → GELU → 384 costs 2·d·l = 1,179,648 multiply-adds per token; the bundled SNNK block
costs m·(d + 1) + m·l' (the fixed projection and the m → 384 Linear). Both blocks are timed side by side
in alternating rounds (eager torch in this process, onnxruntime in a worker), 128 tokens × 32 sequences.

Run: python benchmarks/snnk_minilm.py
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

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
    torch.set_num_threads(2)
    main()
