"""Run in a subprocess by test_blockwise: rewrite (or load whole) a checkpoint under a data-memory cap.

argv: checkpoint folder, output folder, "whole" | "blocks", headroom in bytes above the warmed-up process.
Prints "ok" or "out of memory". Run with MALLOC_MMAP_THRESHOLD_ fixed, so freed tensors leave the heap."""
import resource
import sys

import torch
import transformers

import rewrite
from rewrite import checkpoint


def data_bytes() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmData")).split()[1]) * 1024


def main(folder: str, out: str, mode: str, headroom: int) -> None:
    calib = [(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    spec = "dgq{search=off,feedback=false,group=32,budget-cos=0,min-sqnr=-100}"  # memory, not fidelity, is tested
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    rewrite.optimize(small, calib[0], spec, calib=calib, measure_latency=False, blockwise=True)  # warm-up
    limit = data_bytes() + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        if mode == "whole":
            checkpoint.load_whole(folder)
        else:
            rewrite.optimize(folder, None, spec, calib=calib, out=out, measure_latency=False)
    except (MemoryError, RuntimeError, rewrite.RewriteError) as exc:
        if not isinstance(exc, MemoryError) and not any(s in str(exc) for s in ("allocate memory", "out of memory")):
            raise
        print("out of memory")
        return
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
