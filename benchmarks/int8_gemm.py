"""dgq's exact int8 GEMM in eager torch: oneDNN's int8 kernel against the float path, beside the fp32 GEMM.

    python benchmarks/int8_gemm.py [--tokens 1,16,512,4096] [--threads 1,2]

SmolLM2-135M's Linear shapes (576→576, 576→1536, 1536→576). Each row times, one after the other in one
process, best of 7: oneDNN's u8·s8 GEMM (as one GEMM where this CPU sums u8·s8 products exactly, i.e. with
VNNI; otherwise over 2K with each weight split in halves of |w| ≤ 64, the only exact oneDNN form there),
`integer_matmul`'s float path (float32 GEMMs of the integer codes, exact below 2^24), and the fp32 GEMM of
float activations with float weights. Ratios are to the fp32 GEMM's time. dgq takes oneDNN only where it is
exact as one GEMM; this table is why the halves form was dropped on AVX2. The last two columns time making a
layer's per-token activation codes from its float input (the step before the GEMM): `kernels.activation_codes`,
whose row peak is max(amax, −amin), and the same codes with the peak as torch's inf-norm of each row, which
reduced rows 10–20x slower here and was a third of a down_proj's time at 256 tokens until 2026-12-07.
"""
import argparse
import time

import torch

from rewrite.passes.dgq import kernels

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (out, in)


def best_ms(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def onednn(codes: torch.Tensor, w_s8: torch.Tensor, halves: bool):
    """A closure running oneDNN's int8 GEMM: dgq's own where one GEMM is exact, else the AVX2-exact form
    over 2K with the weights in halves (which dgq no longer has), called the same way."""
    if not halves:
        return lambda: kernels.onednn_int8.matmul(codes, w_s8)
    low = torch.div(w_s8, 2, rounding_mode="floor")
    x_u8 = torch.cat([codes + 128] * 2, 1).to(torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(torch.cat([low, w_s8 - low], 1).contiguous(), None)
    ones, zeros = torch.ones(w_s8.shape[0]), torch.zeros(w_s8.shape[0], dtype=torch.long)
    return lambda: torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128, packed, ones, zeros, None, 1.0, 0,
                                                      torch.float32, "none", [], "")


def float_path(codes: torch.Tensor, w_s8: torch.Tensor):
    """A closure running `integer_matmul`'s float branch, whatever this CPU has."""
    def run():
        exact, kernels.onednn_int8.exact = kernels.onednn_int8.exact, False
        try:
            return kernels.integer_matmul(codes, w_s8)
        finally:
            kernels.onednn_int8.exact = exact
    return run


def by_inf_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-token codes as dgq made them before: the row peak by torch's inf-norm."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).div_(127).clamp_min_(1e-12)
    return torch.div(x, scale).round_()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,512,4096")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    whole = kernels.onednn_int8.usable()
    form = "one GEMM (exact here)" if whole else "halves over 2K (one GEMM saturates here)"
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; oneDNN int8 form: {form}\n")
    print("| threads | tokens | out×in | oneDNN int8 ms | float path ms | fp32 GEMM ms | oneDNN / fp32 "
          "| float / fp32 | per-token codes ms | the same by inf-norm ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for tokens in map(int, args.tokens.split(",")):
            for out, inp in SHAPES:
                codes = torch.randint(-127, 128, (tokens, inp), generator=gen).float()
                w_s8 = torch.randint(-127, 128, (out, inp), generator=gen, dtype=torch.int8)
                x, w = torch.randn(tokens, inp, generator=gen), torch.randn(out, inp, generator=gen)
                int8 = onednn(codes, w_s8, halves=not whole)
                want = (codes.double() @ w_s8.double().t()).float()
                assert torch.equal(int8(), want) and torch.equal(float_path(codes, w_s8)(), want)
                assert torch.equal(kernels.activation_codes(x, torch.empty(0))[0], by_inf_norm(x))
                times = [best_ms(int8), best_ms(float_path(codes, w_s8)), best_ms(lambda x=x, w=w: x @ w.t()),
                         best_ms(lambda x=x: kernels.activation_codes(x, torch.empty(0))),
                         best_ms(lambda x=x: by_inf_norm(x))]
                print(f"| {threads} | {tokens} | {out}×{inp} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} "
                      f"| {times[0] / times[2]:.2f} | {times[1] / times[2]:.2f} | {times[3]:.3f} | {times[4]:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
