"""snnk on a small MLP trained here on scikit-learn's digits (1,797 real 8×8 handwritten digits, shipped
with the package): test accuracy of the original, right after the swap, and after recovery, at several
feature counts, with the FFN's trained parameters before and after.

Run: python benchmarks/snnk_digits.py
The pass runs through `rewrite.optimize` as a user would: calibration data with labels (recovery trains
on them by cross-entropy), eval data with labels, and `--floor metric=0.5` so that acceptance is decided by
test accuracy instead of output SQNR (snnk replaces a layer by a different function by design); the
floor is low on purpose, so the table shows every recovered accuracy rather than a rollback.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rewrite  # noqa: E402


def data():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(model, x, y, steps=400, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = data()
    model = train(mlp(), xtr, ytr)
    calib = {"inputs": [(xtr[i:i + 100],) for i in range(0, 1400, 100)], "targets": [ytr[i:i + 100] for i in range(0, 1400, 100)]}
    evaluation = {"inputs": [(xte,)], "targets": [yte]}
    rows = [["features m", "FFN trained params", "ratio", "acc original", "init", "acc after swap",
             "acc after recovery", "pipeline verdict (floor: accuracy 0.5)"]]
    for m in (16, 32, 48):
        for init in ("weights", "fit"):
            spec = f"snnk{{features={m},init={init}}}"
            swap = rewrite.optimize(model, (xte[:64],), spec.replace("}", ",min-sqnr=-100}"), calib=calib,
                                    calib_batches=14, measure_latency=False)
            rec = rewrite.optimize(model, (xte[:64],), spec, calib=calib, calib_batches=14, eval=evaluation,
                                   metric="top1", floor="metric=0.5", recover="steps=3000,lr=1e-2,patience=600",
                                   measure_latency=False)
            record = rec.report.records[0]
            before, after = swap.report.records[0].stats["rewritten_params"].split(" → ")
            ratio = int(before.replace(",", "")) / int(after.replace(",", ""))
            rows.append([str(m), f"{before} → {after}", f"{ratio:.1f}x fewer", f"{accuracy(model, xte, yte):.3f}",
                         init, f"{accuracy(swap.model, xte, yte):.3f}", f"{accuracy(rec.model, xte, yte):.3f}",
                         f"{record.status}{': ' + record.reason if record.reason else ''}"])
    print("## snnk on a digits MLP (64 → 256 → 256 → 10, ReLU; the first FFN block is rewritten)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
