"""DGQ (A8W4) on all-MiniLM-L6-v2: fidelity vs fp32 against RTN and onnxruntime's own int4 and int8 quantizers,
latency per runtime (each against its own fp32), and stored weight size.

Run: python benchmarks/dgq_minilm.py [--quick]
Timing: one backend at a time, OMP_WAIT_POLICY=PASSIVE, onnxruntime without spinning.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from _common import table, time_ort, time_torch  # noqa: E402
from compress_minilm import embed, encode, load  # noqa: E402
from sentences import CALIBRATION, EVALUATION  # noqa: E402

import torch  # noqa: E402

import rewrite  # noqa: E402
from rewrite import capture  # noqa: E402
from rewrite.emit import onnx as onnx_emit  # noqa: E402

# Defaults wherever they apply (dgq's default floor accepts it on MiniLM: 12.6 dB on unpadded positions).
# The RTN baseline and the static variant switch the floor off on purpose: a baseline is measured even
# when it is worse than the floor, and the table says how much worse.
VARIANTS = {
    "DGQ defaults (4/5-bit mixed to cosine 0.995, ≤ 5 bits)": "dgq",
    "DGQ mixed with int8 weights (upgrade-bits=8)": "dgq{upgrade-bits=8}",
    "DGQ A8W4 only (budget-cos=0)": "dgq{budget-cos=0}",
    "DGQ A8W4, search only (feedback=false)": "dgq{budget-cos=0,feedback=false}",
    "DGQ static (int8 GEMM)": "dgq{act=static,budget-cos=0,min-sqnr=-100}",
    "RTN per-token (search=off, feedback=false)": "dgq{search=off,feedback=false,budget-cos=0,min-sqnr=-100}",
    "DGQ 4-bit storage (MatMulNBits)": "dgq{form=w4,budget-cos=0}",
}


def ort_embed(path, ids, mask):
    out = onnx_emit.session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    hidden = torch.from_numpy(out)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def ort_int4(fp32_path, out_path):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    quant = MatMulNBitsQuantizer(onnx.load(fp32_path), block_size=128, is_symmetric=False, accuracy_level=4)
    quant.process()
    quant.model.save_model_to_file(str(out_path), use_external_data_format=False)


def ort_int8(fp32_path, out_path):
    """onnxruntime's own dynamic quantizer: int8 weights per channel, uint8 activations per tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)


def main(quick):
    torch.set_num_threads(2)
    model, tokenizer = load()
    ids, mask = encode(tokenizer, EVALUATION)
    cal_ids, cal_mask = encode(tokenizer, CALIBRATION)
    calib = [(cal_ids[i:i + 8], cal_mask[i:i + 8]) for i in range(0, len(CALIBRATION), 8)]
    reference = embed(model, ids, mask)
    big = encode(tokenizer, (EVALUATION * 4)[:32], length=128)
    one = encode(tokenizer, EVALUATION[:1], length=128)
    fid = [["variant", "mean cosine vs fp32", "min cosine", "bits/weight", "upgraded layers", "worst layer rel err"]]
    lat = [["variant", "backend", "tokens", "fp32 ms", "quantized ms", "ratio (≤1 is faster)"]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_onnx = tmp / "fp32.onnx"
        onnx_emit.export_onnx(model, capture.capture(model, (ids, mask)), fp32_onnx)
        for name, spec in VARIANTS.items():
            out = tmp / name.split()[0] / spec.replace("{", "_").replace("}", "").replace(",", "_").replace("=", "")
            result = rewrite.optimize(model, (ids, mask), spec, calib=calib, emit="onnx", out=out,
                                      measure_latency=False)
            stats = result.report.records[0].stats
            emb = embed(result.model, ids, mask)
            cos = (emb * reference).sum(-1)
            fid.append([name, f"{float(cos.mean()):.4f}", f"{float(cos.min()):.4f}", f"{stats['bits_per_weight']}",
                        f"{stats['upgraded_layers']}", f"{stats['worst_layer_rel_err']}"])
            for label, (t_ids, t_mask) in ([("32×128", big)] if quick else [("32×128", big), ("1×128", one)]):
                lat.append([name, "onnxruntime", label, f"{time_ort(fp32_onnx, (t_ids, t_mask)):.1f}",
                            f"{time_ort(out / 'model.onnx', (t_ids, t_mask)):.1f}", ""])
                if "4-bit" not in name:
                    lat.append([name, "torch", label, f"{time_torch(model, (t_ids, t_mask)):.1f}",
                                f"{time_torch(result.model, (t_ids, t_mask)):.1f}", ""])
        peers = {"onnxruntime MatMulNBitsQuantizer int4 (block 128, acc 4)": (ort_int4, "4 + fp32 scale/128"),
                 "onnxruntime quantize_dynamic int8 (per-channel weights)": (ort_int8, "8 + fp32 scale/row")}
        for name, (quantize, bits) in peers.items():
            path = tmp / f"{quantize.__name__}.onnx"
            quantize(fp32_onnx, path)
            cos = (ort_embed(path, ids, mask) * reference).sum(-1)
            fid.append([name, f"{float(cos.mean()):.4f}", f"{float(cos.min()):.4f}", bits, "-", "-"])
            lat.append([name, "onnxruntime", "32×128", f"{time_ort(fp32_onnx, big):.1f}", f"{time_ort(path, big):.1f}",
                        ""])
    for row in lat[1:]:
        row[5] = f"{float(row[4]) / float(row[3]):.2f}x"
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    w4 = rewrite.optimize(model, (ids, mask), "dgq{form=w4,budget-cos=0}", calib=calib, measure_latency=False).model
    w4_bytes = sum(b.numel() * b.element_size() for m in w4.modules() if hasattr(m, "packed")
                   for n, b in m.named_buffers() if n in ("packed", "scales", "zeros"))
    print("## fidelity (40 sentences; calibration on 24 others)\n")
    print(table(fid))
    print("\n## latency (each runtime against its own fp32)\n")
    print(table(lat))
    print(f"\n## size\n\nLinear weights fp32 {linear_bytes / 1e6:.2f} MB → DGQ 4-bit storage (codes + S·s1 scales + "
          f"zero points) {w4_bytes / 1e6:.2f} MB = {w4_bytes / linear_bytes:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
