"""dgq and prune on timm CNNs whose weights are mostly 1×1 convolutions, read as Linears over channels, and dgq on
torchvision's ViT-B/16, whose attention is nn.MultiheadAttention (its packed in_proj lifted into a Linear).

Run: python benchmarks/dgq_cnn.py [--models efficientnet_b0,poolformer_s12,vit_b_16] [--size 224] [--batch 8]
Each model is built by timm with random weights (no weights can be downloaded here), so the SQNR column says
how the codes behave on these activations, not what a trained model's accuracy does. Calibration: 4 batches
of random images, verified on them as `rewrite.optimize` does. Speed is the report's paired timing in eager
torch and in onnxruntime (original and rewritten alternating, 2 threads); size is the weights' bytes. Threads wait
as a user's do (torch's default OpenMP policy): under OMP_WAIT_POLICY=PASSIVE, which the other benchmarks set,
dgq's ConvNeXt-atto ran 0.81–0.87x instead of 1.08x.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _table import table  # noqa: E402  (not _common: its passive thread policy slows dgq's small ops)

import torch  # noqa: E402

import rewrite  # noqa: E402
from rewrite.patterns import is_pointwise_conv  # noqa: E402
from tests.conftest import timm as import_timm  # noqa: E402  (timm beside the CPU torch, as CI installs it)

PASSES = {"efficientnet_b0": ["fold-bn", "fold-bn,dgq"], "mobilenetv3_large_100": ["fold-bn", "fold-bn,dgq"],
          "resnet50": ["fold-bn", "fold-bn,dgq"], "convnext_atto": ["dgq", "prune"], "poolformer_s12": ["dgq", "prune"],
          "vit_b_16": ["dgq"]}


def build(name: str) -> torch.nn.Module:
    timm = import_timm()  # torchvision too, beside the CPU torch
    torch.manual_seed(0)
    if name != "vit_b_16":
        return timm.create_model(name, num_classes=1000).eval()
    from torchvision.models import vit_b_16
    model = vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: outputs all equal
    return model


def run(name: str, spec: str, size: int, batch: int) -> list[str]:
    model = build(name)
    calib = [(torch.randn(batch, 3, size, size),) for _ in range(4)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = rewrite.optimize(model, calib[0], spec, calib=calib, emit="onnx", out=out).report
    seconds = time.perf_counter() - start
    last = report.records[-1]
    speed = {s.backend: f"{s.ratio:.2f}x ({s.low:.2f}–{s.high:.2f})" for s in report.speeds}
    before, after = report.records[0].bytes_before, last.bytes_after
    pointwise = sum(1 for m in model.modules() if is_pointwise_conv(m))
    rewrote = ", ".join(f"{k}={v}" for k, v in list(last.stats.items())[:1])
    return [name, str(pointwise), spec, " / ".join(r.status for r in report.records), rewrote,
            f"{before / after:.2f}x", speed.get("torch", "-"), speed.get("onnxruntime", "-"),
            f"{report.error_vs_original['sqnr_db']:.1f}", f"{seconds:.0f}"]


def main(models: list[str], size: int, batch: int) -> None:
    torch.set_num_threads(2)
    rows = [["model", "1×1 convs", "passes", "status", "rewrote (last pass)", "weights smaller", "torch speed",
             "onnxruntime speed", "SQNR dB", "s (ONNX too)"]]
    for name in models:
        for spec in PASSES[name]:
            rows.append(run(name, spec, size, batch))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"{size}² images, batch {batch}, 2 threads\n\n{table(rows)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(PASSES))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    main(args.models.split(","), args.size, args.batch)
