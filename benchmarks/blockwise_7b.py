"""Block by block at 7B dimensions: a Llama-shaped checkpoint (hidden 4096, FFN 11008, 32 heads; random
weights, a few blocks deep) rewritten with one block in memory, against what loading it whole would take.

Writes the checkpoint once (safetensors shards, like save_pretrained), then runs
`rewrite.optimize(CHECKPOINT, passes, calib=…, out=…)` for each pipeline in a fresh process and reports
time per block and the process's peak resident memory (ru_maxrss), and extrapolates to 32 blocks.

Run: python benchmarks/blockwise_7b.py [--blocks 2] [--passes "dgq;fwsvd{param-ratio=0.75}"]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DIMS = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=True)


def write_checkpoint(folder: Path, blocks: int) -> int:
    """A LlamaForCausalLM of `blocks` 7B-sized blocks, random weights, written shard by shard; bytes."""
    import transformers
    from rewrite.checkpoint import parameters_on_meta
    config = transformers.LlamaConfig(num_hidden_layers=blocks, architectures=["LlamaForCausalLM"], **DIMS)
    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(config)
    config.save_pretrained(folder)
    from safetensors.torch import save_file
    gen, weight_map, total = torch.Generator().manual_seed(0), {}, 0
    groups = [["model.embed_tokens.weight", "model.norm.weight"]] + [
        [n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{i}.")] for i in range(blocks)]
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    for index, names in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                       torch.randn(shapes[n], generator=gen) * 0.02) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


def run_one(checkpoint: str, passes: str, out: str) -> None:
    """In a fresh process: the block-by-block rewrite; prints one JSON line."""
    import rewrite
    torch.set_num_threads(2)
    calib = [(torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    start = time.perf_counter()
    result = rewrite.optimize(checkpoint, None, passes, calib=calib, out=out, measure_latency=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "summary": result.report.capture,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "statuses": [r.status for r in result.report.records],
                      "stats": [{k: v for k, v in r.stats.items() if isinstance(v, (int, float, str))}
                                for r in result.report.records][:1],
                      "out_bytes": sum(p.stat().st_size for p in Path(out).iterdir())}))


def main(blocks: int, pipelines: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("REWRITE_BENCH_TMP")) as tmp:
        ckpt = Path(tmp) / "ckpt"
        ckpt.mkdir()
        size = write_checkpoint(ckpt, blocks)
        per_block = (size - 32000 * 4096 * 4) / blocks
        print(f"## 7B-shaped Llama, {blocks} blocks: checkpoint {size / 2**30:.2f} GiB; one block "
              f"{per_block / 2**30:.2f} GiB; a 32-block model would be {(32 * per_block + 32000 * 4096 * 4) / 2**30:.1f} GiB "
              f"in fp32 (this machine: 24 GiB)\n")
        print("| pipeline | status per block | s per block | peak RSS GiB | output / input size | 32 blocks (extrapolated) |")
        print("|---|---|---|---|---|---|")
        for i, passes in enumerate(pipelines):
            out = Path(tmp) / f"out-{i}-{passes.split('{')[0]}"  # one folder per pipeline (two may share a pass)
            done = subprocess.run([sys.executable, __file__, "--one", str(ckpt), passes, str(out)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"| {passes} | failed: {done.stderr.strip().splitlines()[-1][:150]} | | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            each = r["seconds"] / blocks
            print(f"| {passes} | {', '.join(r['statuses'])} | {each:.0f} | {r['peak_rss_gib']:.2f} | "
                  f"{r['out_bytes'] / size:.2f} | {32 * each / 60:.0f} min |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        run_one(*sys.argv[2:5])
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--passes", default="dgq{budget-cos=0};fwsvd{param-ratio=0.75}")
    args = parser.parse_args()
    main(args.blocks, args.passes.split(";"))
