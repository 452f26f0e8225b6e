"""tconv on a 2-D wave-equation surrogate (the paper's setting) and against the peers' factorizations.

Data (generated here): the acoustic wave equation u_tt = c(x)² Δu on a 32×32 periodic grid, leapfrog
finite differences, smooth random wave speed c ∈ [0.4, 1], Gaussian pulses propagated a few steps; the
input is (uᵗ, uᵗ⁻¹, c), the target u at 4 steps later. The surrogate: four 5×5 convs (24 channels,
GELU, circular 'same' padding, as the domain is periodic) trained with Adam.

Table 1 (the paper's comparison): the original; the same architecture rewritten a priori by
`tconv{init=random}` and trained from scratch with `rewrite.train` (same budget, and 3x it); and the
trained original decomposed by `tconv` (CP-ALS), before and after `--recover`. Parameters, test error
(MSE / mean target², 500 unseen samples), latency ratios (eager torch and onnxruntime, paired rounds).

Table 2 (against the peers, no recovery): CP vs Tucker-2 vs spatial SVD (AIMET's k×1·1×k) vs
tensorly-torch's CP `FactorizedConv` (if installed, `implementation='factorized'`) at equal parameter
ratios of the factored convs.

Run: python benchmarks/tconv_wave.py [--steps 600]
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import rewrite  # noqa: E402
from rewrite import measure  # noqa: E402

GRID, AHEAD = 32, 4


def laplacian(u):
    return sum(torch.roll(u, s, d) for s in (1, -1) for d in (-1, -2)) - 4 * u


def wave_data(count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    c = F.interpolate(torch.randn(count, 1, GRID // 8, GRID // 8, generator=gen), size=(GRID, GRID), mode="bicubic")
    c = 0.4 + 0.6 * torch.sigmoid(2 * c)
    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    u = torch.zeros(count, 1, GRID, GRID)
    for _ in range(3):
        cy, cx = (torch.randint(0, GRID, (count, 1, 1, 1), generator=gen) for _ in range(2))
        width = 1.5 + 2.5 * torch.rand(count, 1, 1, 1, generator=gen)
        u = u + torch.randn(count, 1, 1, 1, generator=gen) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
    previous = u.clone()
    for step in range(6 + AHEAD):  # leapfrog, Courant number 0.5·c
        if step == 6:
            inputs = torch.cat([u, previous, c], 1)
        u, previous = 2 * u - previous + (0.5 * c) ** 2 * laplacian(u), u
    return inputs, u


class Surrogate(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        conv = dict(kernel_size=5, padding="same", padding_mode="circular")
        self.convs = nn.ModuleList([nn.Conv2d(3, width, **conv), nn.Conv2d(width, width, **conv),
                                    nn.Conv2d(width, width, **conv), nn.Conv2d(width, 1, **conv)])

    def forward(self, x):
        for conv in self.convs[:-1]:
            x = F.gelu(conv(x))
        return self.convs[-1](x)


def batches(x, y, size=16):
    return [(x[i:i + size],) for i in range(0, len(x), size)], [y[i:i + size] for i in range(0, len(y), size)]


def test_error(model, x, y):
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean() / (y ** 2).mean())


def conv_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if "convs" in n)


def speed(original, rewritten, x):
    eager = measure.compare_torch(original, rewritten, (x,)).speed
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, model in (("a", original), ("b", rewritten)):
            paths.append(Path(tmp) / f"{name}.onnx")
            torch.onnx.export(model, (x,), str(paths[-1]), dynamo=True, verbose=False)  # captured graphs: dynamo only
        ort = measure.compare_onnx(paths[0], paths[1], (x,)).speed
    return f"{eager.ratio:.2f}x ({eager.low:.2f}–{eager.high:.2f})", f"{ort.ratio:.2f}x ({ort.low:.2f}–{ort.high:.2f})"


def paper_table(steps: int, rank: int) -> str:
    x, y = wave_data(2000, 0)
    tx, ty = wave_data(500, 1)
    train_b, train_t = batches(x, y)
    held = (train_b[-8:], train_t[-8:])
    torch.manual_seed(0)
    original = Surrogate().eval()
    rewrite.train(original, train_b[:-8], train_t[:-8], steps=steps, held_out=held[0], held_targets=held[1])
    probe = tx[:32]
    rows = [["model", "conv params", "test rel. MSE", "torch speed-up (95% CI)", "onnxruntime speed-up (95% CI)"],
            ["original (dense 5×5)", f"{conv_params(original):,}", f"{test_error(original, tx, ty):.4f}", "1", "1"]]
    for budget in (1, 3):
        torch.manual_seed(0)
        fresh = rewrite.optimize(Surrogate().eval(), (probe,), f"tconv{{init=random,rank={rank}}}",
                                 measure_latency=False).model
        rewrite.train(fresh, train_b[:-8], train_t[:-8], steps=budget * steps, held_out=held[0], held_targets=held[1])
        rows.append([f"tconv CP R={rank}, a priori, trained {budget}x", f"{sum(p.numel() for p in fresh.parameters()):,}",
                     f"{test_error(fresh, tx, ty):.4f}", *speed(original, fresh, probe)])
    calib = train_b[:32]
    for recover in (None, f"steps={steps}"):
        result = rewrite.optimize(original, (probe,), f"tconv{{rank={rank},min-sqnr=-100}}", calib=calib, recover=recover,
                                  measure_latency=False)
        model = result.model
        rows.append([f"tconv CP R={rank}, decomposed" + (", recovered" if recover else ", no recovery"),
                     f"{sum(p.numel() for p in model.parameters()):,}", f"{test_error(model, tx, ty):.4f}",
                     *speed(original, model, probe)])
    defaults = rewrite.optimize(original, (probe,), "tconv", calib=calib, recover=f"steps={steps}", measure_latency=False)
    record = defaults.report.records[0]
    note = (f"\n\n`tconv` with default options (CP, param-ratio 0.25) and `--recover steps={steps}`: {record.status}"
            f" (SQNR {record.error['sqnr_db']:.1f} dB; test rel. MSE {test_error(defaults.model, tx, ty):.4f};"
            f" slower here: {record.stats.get('slower_here', '-')})")
    return table(rows) + note, original, (tx, ty, calib, probe)


def peers_table(original, data) -> str:
    tx, ty, calib, probe = data
    rows = [["format", "param ratio", "conv params", "test rel. MSE (no recovery)", "torch speed-up", "onnxruntime speed-up"]]
    for ratio in (0.07, 0.25, 0.5):
        for fmt in ("cp", "tucker2", "separable"):
            result = rewrite.optimize(original, (probe,), f"tconv{{format={fmt},param-ratio={ratio},min-sqnr=-100}}",
                                      calib=calib, measure_latency=False)
            if result.report.records[0].status != "applied":
                rows.append([fmt, f"{ratio}", "-", result.report.records[0].reason, "-", "-"])
                continue
            model = result.model
            rows.append([fmt if fmt != "separable" else "spatial SVD (separable)", f"{ratio}",
                         f"{sum(p.numel() for p in model.parameters()):,}", f"{test_error(model, tx, ty):.4f}",
                         *speed(original, model, probe)])
        rows.append(_tltorch_row(original, ratio, tx, ty, probe))
    return table(rows)


def _tltorch_row(original, ratio, tx, ty, probe):
    try:
        import tltorch
    except ImportError:
        return ["tensorly-torch CP", f"{ratio}", "-", "not installed (pip install tensorly-torch)", "-", "-"]
    import copy
    model = copy.deepcopy(original)
    for i, conv in enumerate(model.convs):
        if conv.padding_mode != "zeros":  # tltorch's FactorizedConv pads with zeros only: wrap circular padding
            model.convs[i] = nn.Sequential(_CircularPad(2), tltorch.FactorizedConv.from_conv(
                _unpadded(conv), rank=ratio, factorization="cp", implementation="factorized", decompose_weights=True))
    return ["tensorly-torch CP (factorized)", f"{ratio}", f"{sum(p.numel() for p in model.parameters()):,}",
            f"{test_error(model, tx, ty):.4f}", *speed(original, model, probe)]


class _CircularPad(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x, [self.pad] * 4, mode="circular")


def _unpadded(conv):
    bare = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size)
    bare.load_state_dict(conv.state_dict())
    return bare


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    text, trained, data = paper_table(args.steps, args.rank)
    print(f"## tconv on a 2-D wave surrogate (32×32, 2000 train / 500 test, {args.steps} Adam steps)\n")
    print(text)
    print("\n## factored formats at equal parameter ratio, decomposed from the trained surrogate, no recovery\n")
    print(peers_table(trained, data))
