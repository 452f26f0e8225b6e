"""snnk on a Llama-style decoder end to end: every SwiGLU gate kernelized, ONNX exported, parity checked.

A LlamaForCausalLM with SmolLM2-135M's layer shape (hidden 576, intermediate 1536, 9 heads, 3 KV heads)
but 4 layers and a 2048-token vocabulary, random weights (structure, export and cost; fidelity on real
weights is the decoder-LLM issue's). Per gate: silu(W_g x) (576·1536 weights) → Ψ·Φ(x) (1536·m trainable
plus a fixed m·577 projection). Latency: whole decoder, batch 4 × 128 tokens, eager torch, paired rounds.

Run: python benchmarks/snnk_llama.py
"""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

import torch  # noqa: E402

import rewrite  # noqa: E402
from rewrite import measure  # noqa: E402


def decoder():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def main():
    model = decoder()
    ids = torch.randint(0, 2048, (4, 128), generator=torch.Generator().manual_seed(1))
    calib = [(ids[i:i + 1],) for i in range(4)]
    rows = [["m", "status", "forms", "gate params", "logits SQNR dB (no recovery)", "ONNX parity max|Δ|",
             "torch speed-up (95% interval)"]]
    for m in (16, 64):
        with tempfile.TemporaryDirectory() as tmp:
            result = rewrite.optimize(model, (ids,), f"snnk{{features={m},min-sqnr=-100}}", calib=calib, emit="onnx",
                                      out=Path(tmp) / "o", measure_latency=False)
            record = result.report.records[0]
            onnx = next(a for a in result.report.artifacts if a.kind == "onnx")
            speed = measure.compare_torch(model, result.model, (ids,)).speed
            rows.append([str(m), record.status, record.stats.get("forms", "-"), record.stats.get("rewritten_params", "-"),
                         f"{record.error['sqnr_db']:.1f}", f"{onnx.parity['max_abs']:.1e}" if onnx.parity else onnx.note,
                         f"{speed.ratio:.2f}x ({speed.low:.2f}–{speed.high:.2f})"])
    print("## snnk on a 4-layer Llama decoder (SmolLM2 layer shape, random weights), 4 × 128 tokens\n")
    print(table(rows))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    main()
