"""tconv on a small CNN trained here on scikit-learn's digits (1,797 real 8×8 handwritten digits).

Accuracy on 397 held-out digits of the original and of `tconv` at 2x and 4x fewer parameters in the
factored convs (param-ratio 0.5 and 0.25), for CP, Tucker-2 and spatial SVD: right after decomposition,
and after recovery (`--recover`, trained on the 1,400 training digits and their labels). The pipeline
judges by test accuracy here (`--floor metric=0.9`: accepted when top-1 accuracy stays at least 0.90).

Run: python benchmarks/tconv_digits.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402
from snnk_digits import accuracy, data, train  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rewrite  # noqa: E402


def cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def conv_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = data()
    model = train(cnn(), xtr, ytr, steps=1500, lr=2e-3)
    calib = {"inputs": [(xtr[i:i + 100],) for i in range(0, 1400, 100)],
             "targets": [ytr[i:i + 100] for i in range(0, 1400, 100)]}
    evaluation = {"inputs": [(xte,)], "targets": [yte]}
    base = accuracy(model, xte, yte)
    rows = [["format", "param ratio", "params (whole CNN)", "acc original", "acc after decomposition",
             "acc after recovery", "pipeline verdict (floor: accuracy 0.90)"]]
    for ratio in (0.5, 0.25):
        for fmt in ("cp", "tucker2", "separable"):
            spec = f"tconv{{format={fmt},param-ratio={ratio}}}"
            swap = rewrite.optimize(model, (xte[:64],), spec.replace("}", ",min-sqnr=-100}"), calib=calib,
                                    calib_batches=14, measure_latency=False)
            rec = rewrite.optimize(model, (xte[:64],), spec, calib=calib, calib_batches=14, eval=evaluation,
                                   metric="top1", floor="metric=0.9", recover="steps=1500,lr=2e-3,patience=500",
                                   measure_latency=False)
            record = rec.report.records[0]
            rows.append([fmt, f"{ratio}", f"{record.params_before:,} → {swap.report.records[0].params_after:,}",
                         f"{base:.3f}", f"{accuracy(swap.model, xte, yte):.3f}", f"{accuracy(rec.model, xte, yte):.3f}",
                         f"{record.status}{': ' + record.reason if record.reason else ''}"])
    print(f"## tconv on a digits CNN (3 convs 3×3, {conv_weights(model):,} conv weights; 1,400 train / 397 test)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
