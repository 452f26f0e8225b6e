"""t1 on neuraloperator FNOs: speed (per spectral layer, whole model, ONNX) and Darcy-flow accuracy.

Run: python benchmarks/t1_fno.py [--quick] [--speed-only | --darcy-only] [--threads N]
Every number is a ratio measured in this process, original vs rewritten, one backend at a time.
Darcy data comes from the neuraloperator 0.3.0 wheel (pip download, read from the zip; no network at
run time beyond the package index).
"""
import argparse
import glob
import io
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, time_ort, time_round_robin, time_torch  # noqa: E402

import torch  # noqa: E402
from neuralop.layers.spectral_convolution import SpectralConv  # noqa: E402
from neuralop.models import FNO  # noqa: E402

import rewrite  # noqa: E402
from rewrite.passes.t1.gemm import from_neuralop  # noqa: E402


def speed(sizes, batch=8, hidden=32, modes=16):
    rows = [["grid", "what", "original ms", "exact ms", "exact ×", "exact+pointwise ×", "exact+pointwise+inplace ×",
             "T1 rFFT ×", "T1 DCT ms", "T1 DCT ×", "pointwise+T1 DCT ×"]]
    for n in sizes:
        torch.manual_seed(0)
        model = FNO(n_modes=(modes, modes), hidden_channels=hidden, in_channels=1, out_channels=1).eval()
        x = torch.randn(batch, 1, n, n)
        conv = model.fno_blocks.convs[0]
        h = torch.randn(batch, hidden, n, n)
        layer_fft, layer_gemm = time_torch(conv, (h,)), time_torch(from_neuralop(conv, (n, n)), (h,))
        rows.append([f"{n}²", "one spectral layer", f"{layer_fft:.2f}", f"{layer_gemm:.2f}",
                     f"{layer_fft / layer_gemm:.2f}", "-", "-", "-", "-", "-", "-"])
        # Timing only: a random-init FNO on noise is no accuracy test (see the Darcy table), so no floor here.
        specs = {"exact": "t1{form=gemm}", "exact_pw": "pointwise,t1{form=gemm}",
                 "exact_pwi": "pointwise,t1{form=gemm},inplace",
                 "dft": "t1{mode=t1,transform=dft,min-sqnr=-100}", "dct": "t1{mode=t1,transform=dct,min-sqnr=-100}",
                 "dct_pw": "pointwise,t1{mode=t1,transform=dct,min-sqnr=-100}"}
        models = {k: rewrite.optimize(model, (x,), spec, calib=[x], measure_latency=False).model
                  for k, spec in specs.items()}
        ms = time_round_robin({"base": model, **models}, (x,))
        base = ms["base"]
        rows.append([f"{n}²", "whole FNO", f"{base:.1f}", f"{ms['exact']:.1f}", f"{base / ms['exact']:.2f}",
                     f"{base / ms['exact_pw']:.2f}", f"{base / ms['exact_pwi']:.2f}", f"{base / ms['dft']:.2f}", f"{ms['dct']:.1f}",
                     f"{base / ms['dct']:.2f}", f"{base / ms['dct_pw']:.2f}"])
    return table(rows)


class _Chain(torch.nn.Module):
    """Two spectral convs with nothing between them: what t1's exact chain fusion applies to."""

    def __init__(self, hidden, modes):
        super().__init__()
        self.a = SpectralConv(hidden, hidden, (modes, modes))
        self.b = SpectralConv(hidden, hidden, (modes, modes))

    def forward(self, x):
        return self.b(self.a(x))


def fusion(sizes, batch=8, hidden=32, modes=16):
    rows = [["grid", "original (2 FFT convs) ms", "GEMM, unfused ms", "GEMM, fused ms", "fused vs original ×",
             "fused vs unfused ×", "fused max|Δ|"]]
    for n in sizes:
        torch.manual_seed(0)
        model, h = _Chain(hidden, modes).eval(), torch.randn(batch, hidden, n, n)
        unfused = torch.nn.Sequential(from_neuralop(model.a, (n, n)), from_neuralop(model.b, (n, n)))
        result = rewrite.optimize(model, (h,), "t1{form=gemm}", measure_latency=False, strict=True)
        assert result.report.records[0].stats.get("fused_chains") == 1
        base, u, f = time_torch(model, (h,)), time_torch(unfused, (h,)), time_torch(result.model, (h,))
        rows.append([f"{n}²", f"{base:.1f}", f"{u:.1f}", f"{f:.1f}", f"{base / f:.2f}", f"{u / f:.2f}",
                     f"{result.report.records[0].error['max_abs']:.1e}"])
    return table(rows)


def onnx_speed(n=64, batch=8, hidden=32, modes=16):
    torch.manual_seed(0)
    model = FNO(n_modes=(modes, modes), hidden_channels=hidden, in_channels=1, out_channels=1).eval()
    x = torch.randn(batch, 1, n, n)
    with tempfile.TemporaryDirectory() as tmp:
        result = rewrite.optimize(model, (x,), "t1", emit="onnx", out=tmp, measure_latency=False)
        [art] = [a for a in result.report.artifacts if a.kind == "onnx"]
        base, ort = time_torch(model, (x,)), time_ort(art.path, (x,))
    return table([["grid", "eager torch original ms", "onnxruntime exact-rewrite ms", "×", "ORT parity max|Δ|"],
                  [f"{n}²", f"{base:.1f}", f"{ort:.1f}", f"{base / ort:.2f}", f"{art.parity['max_abs']:.1e}"]])


def darcy():
    """Train a small FNO on Darcy 16² (1000 samples), then compare original / exact / T1 after recovery."""
    data = _darcy_files()
    xtr, ytr = data["darcy_train_16"]
    mean, std = ytr.mean(), ytr.std()
    torch.manual_seed(0)
    model = FNO(n_modes=(8, 8), hidden_channels=32, in_channels=1, out_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 40)
    start = time.time()
    for _epoch in range(40):
        for i in torch.randperm(len(xtr)).split(50):
            opt.zero_grad()
            loss = _rel_l2(model(xtr[i]), (ytr[i] - mean) / std)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    train_s = time.time() - start
    calib = [xtr[i:i + 50] for i in range(0, 400, 50)]
    rows = [["test grid", "original rel L2", "exact rel L2", "T1 variant", "T1 rel L2 before → after recovery",
             "T1 / original", "modes", "exact ×", "T1 ×"]]
    for key in ("darcy_test_16", "darcy_test_32"):
        xte, yte = data[key]
        n = xte.shape[-1]
        cal = [torch.nn.functional.interpolate(c, size=(n, n), mode="nearest") for c in calib]
        exact = rewrite.optimize(model, (xte[:50],), "t1{form=gemm}", measure_latency=False).model
        base = time_torch(model, (xte,))
        e_orig, e_exact = (_test_error(m, xte, yte, mean, std) for m in (model, exact))
        variants = DARCY_VARIANTS if n == 16 else DARCY_VARIANTS[:4]
        for label, options in variants:
            spec = f"t1{{mode=t1,{options}min-sqnr=-100}}"
            raw = rewrite.optimize(model, (xte[:50],), spec, calib=cal, calib_batches=8, measure_latency=False)
            t1 = rewrite.optimize(model, (xte[:50],), spec, calib=cal, calib_batches=8,
                                  recover="steps=1500,lr=1e-3,patience=300", measure_latency=False)
            e_raw, e_t1 = (_test_error(r.model, xte, yte, mean, std) for r in (raw, t1))
            rows.append([f"{n}²", f"{e_orig:.4f}", f"{e_exact:.4f}", label, f"{e_raw:.4f} → {e_t1:.4f}",
                         f"{e_t1 / e_orig:.2f}x", t1.report.records[0].stats["modes"],
                         f"{base / time_torch(exact, (xte,)):.2f}", f"{base / time_torch(t1.model, (xte,)):.2f}"])
            print(rows[-1], flush=True)
    return f"trained FNO(modes 8, hidden 32) on Darcy 16² for 40 epochs in {train_s:.0f} s\n" + table(rows)


# (label, t1 options): the first four at both test grids, the rest (init, frequency selection) at 16².
DARCY_VARIANTS = [
    ("rFFT, pseudo-spectral σ", ""),
    ("rFFT, σ on coefficients + mode mixers", "nonlinearity=coeff,"),
    ("DCT, pseudo-spectral σ", "transform=dct,"),
    ("DCT, σ on coefficients + mode mixers (the paper's layer)", "transform=dct,nonlinearity=coeff,"),
    ("DCT, σ on coefficients, VP init (paper)", "transform=dct,nonlinearity=coeff,init=vp,"),
    ("rFFT, pseudo, half the modes per axis, lowest", "modes-ratio=0.5,select=lowest,"),
    ("rFFT, pseudo, half the modes per axis, energy-ranked", "modes-ratio=0.5,select=energy,"),
]


def _test_error(model, x, y, mean, std):
    with torch.no_grad():
        return float(_rel_l2(model(x) * std + mean, y))


def _rel_l2(out, target):
    o, t = out.reshape(out.shape[0], -1), target.reshape(target.shape[0], -1)
    return ((o - t).norm(dim=1) / t.norm(dim=1)).mean()


def _darcy_files():
    cache = Path(tempfile.gettempdir()) / "rewrite-bench-neuralop-0.3.0"
    if not glob.glob(str(cache / "*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "neuraloperator==0.3.0", "--no-deps",
                        "-d", str(cache)], check=True)
    wheel = zipfile.ZipFile(glob.glob(str(cache / "*.whl"))[0])
    out = {}
    for name in ("darcy_train_16", "darcy_test_16", "darcy_test_32"):
        d = torch.load(io.BytesIO(wheel.read(f"neuralop/datasets/data/{name}.pt")), weights_only=True)
        out[name] = (d["x"].float().unsqueeze(1), d["y"].float().unsqueeze(1))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="64² only, no Darcy training")
    parser.add_argument("--speed-only", action="store_true", help="the whole-model speed table only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's cost model: 1 and 2)")
    parser.add_argument("--darcy-only", action="store_true", help="the Darcy accuracy table only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.darcy_only:
        print("## Darcy flow accuracy (test relative L2, de-normalized)\n")
        print(darcy())
        sys.exit(0)
    print(f"## speed, eager torch, batch 8, hidden 32, modes 16, {args.threads} thread(s)\n")
    print(speed([64] if args.quick else [64, 256]))
    if args.speed_only:
        sys.exit(0)
    print("\n## exact fusion of a linear chain (two spectral convs, nothing between), eager torch\n")
    print(fusion([64] if args.quick else [64, 256]))
    print("\n## ONNX\n")
    print(onnx_speed())
    if not args.quick:
        print("\n## Darcy flow accuracy (test relative L2, de-normalized)\n")
        print(darcy())
