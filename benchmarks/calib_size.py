"""What more calibration text costs: one `rewrite.optimize` of SmolLM2-135M with 4 short sentences, then with
16 windows of 256 tokens of the same prose (issue 30: at most 1.5x), the pass's time and the whole run's.

Run: python benchmarks/calib_size.py [--spec "dgq{budget-cos=0}"] [--threads 2]
Calibration prose: standard-library docstring sentences (`corpora.py`), nothing from this repository. The
whole run is what a user waits for: capture, the check of the data, the pass and its verification, and
putting the layers back into the user's class. Nothing is written (no -o) and no latency rounds are run.
Threads wait as a user's do (torch's default OpenMP policy: spin, then sleep). The other benchmarks set
OMP_WAIT_POLICY=PASSIVE for their latency rounds; under it this pass's thousands of small ops each wake a
thread, and it took 42 s instead of 30 s (16 × 256 tokens) and 21 s instead of 12.5 s (4 sentences).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from _table import table  # noqa: E402
from corpora import calibration_sentences  # noqa: E402

import torch  # noqa: E402

import rewrite  # noqa: E402
from rewrite import text  # noqa: E402


def run(spec: str, calib: list[tuple]) -> tuple[str, float, float]:
    import smollm2
    model, _ = smollm2.load()
    start = time.perf_counter()
    result = rewrite.optimize(model, calib[0], spec, calib=calib, measure_latency=False, calib_batches=len(calib))
    record = result.report.records[0]
    return record.status, record.seconds, time.perf_counter() - start


def main(spec: str, threads: int) -> None:
    import smollm2
    torch.set_num_threads(threads)
    _, tokenizer = smollm2.load()
    sentences = calibration_sentences(3000)
    small = [(tokenizer(s, return_tensors="pt")["input_ids"],) for s in sentences[:4]]
    large = text.windows(tokenizer, " ".join(sentences), 256, 16)
    rows = [["calibration", "tokens", "status", "pass s", "whole run s"]]
    for name, calib in (("4 sentences", small), ("16 × 256 tokens", large)):
        status, seconds, whole = run(spec, calib)
        rows.append([name, str(sum(b[0].numel() for b in calib)), status, f"{seconds:.1f}", f"{whole:.1f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    rows.append(["ratio", "", "", f"{float(rows[2][3]) / float(rows[1][3]):.2f}x",
                 f"{float(rows[2][4]) / float(rows[1][4]):.2f}x"])
    print(f"{spec}, {threads} thread(s)\n\n{table(rows)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="dgq{budget-cos=0}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    main(args.spec, args.threads)
