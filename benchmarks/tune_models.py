"""`rewrite tune` on models nobody here wrote, as a user runs it: the front it finds and the point it chooses.

    python benchmarks/tune_models.py minilm [--time 10m]   # calibration: stdlib docstrings; judged on
                                                           # installed packages' README sentences (held out),
                                                           # by their embeddings (--metric cosine: hidden states)
    python benchmarks/tune_models.py fno                   # the bundled FNO (examples/fno_mlp.py)
    python benchmarks/tune_models.py smollm2 --calib-text A.txt --eval-text B.txt --time 15m
                                                           # SmolLM2-135M: 8 × 512 tokens of A; perplexity
                                                           # on B's 512-token windows (another source)
    ... --backend onnxruntime                              # latency timed in onnxruntime instead of torch

Prints the search table of the chosen run's report; the pictures are in the output folder.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

import rewrite  # noqa: E402


def minilm(limit: str, out: Path, backend: str, metric: str):
    from compress_minilm import encode, load
    from corpora import calibration_sentences, evaluation_sentences
    model, tokenizer = load()
    calibration, evaluation = calibration_sentences(256), evaluation_sentences(256)
    calib = [encode(tokenizer, calibration[i:i + 32]) for i in range(0, len(calibration), 32)]
    held = [encode(tokenizer, evaluation[i:i + 32]) for i in range(0, len(evaluation), 32)]
    with torch.no_grad():
        targets = [model(*batch).last_hidden_state for batch in held]
    result = rewrite.tune(model, calib[0], calib=calib, eval={"inputs": held, "targets": targets}, metric=metric,
                          target="latency=0.5", time_limit=limit, out=out, force=True, backend=backend, progress=_say)
    from rewrite import measure
    with torch.no_grad():
        outputs = [result.model(*batch) for batch in held]
    masks = [mask for _, mask in held]
    print("chosen model, held out: " + ", ".join(f"{name} {measure.METRICS[name](outputs, targets, masks):.4f}"
                                                 for name in ("embedding-cosine", "cosine")))
    return result


def fno(limit: str, out: Path, backend: str):
    from examples.fno_mlp import build
    model, inputs, *calib = build()
    return rewrite.tune(model, inputs, calib=calib[0] if calib else None, target="latency=0.5", time_limit=limit,
                        out=out, force=True, backend=backend, progress=_say)


def smollm2(limit: str, out: Path, backend: str, calib_text: Path, eval_text: Path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import smollm2 as example
    from peers_smollm2 import CALIB_WINDOWS, SEQ

    from rewrite import text
    torch.set_num_threads(2)
    model, tokenizer = example.load()
    calib = text.windows(tokenizer, calib_text.read_text(), SEQ, CALIB_WINDOWS)
    held = text.windows(tokenizer, eval_text.read_text(), SEQ, 10_000, what="eval")
    return rewrite.tune(model, calib[0], calib=calib, eval=held, metric="perplexity", target="latency=0.5",
                        time_limit=limit, out=out, force=True, backend=backend, progress=_say)


def _say(message, done=None, total=None):
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["minilm", "fno", "smollm2"])
    parser.add_argument("--calib-text", type=Path, help="smollm2: the calibration text")
    parser.add_argument("--eval-text", type=Path, help="smollm2: the held-out text perplexity is judged on")
    parser.add_argument("--metric", default="embedding-cosine", choices=["embedding-cosine", "cosine"],
                        help="minilm: held-out sentence embeddings (mean-pooled, the default), or the hidden states")
    parser.add_argument("--time", default="10m")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    parser.add_argument("-o", "--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"rewrite-out/tune-{args.model}")
    start = time.perf_counter()
    texts = {"smollm2": (args.calib_text, args.eval_text), "minilm": (args.metric,)}.get(args.model, ())
    if args.model == "smollm2" and None in texts:
        parser.error("smollm2 needs --calib-text and --eval-text (texts from two different sources)")
    result = {"minilm": minilm, "fno": fno, "smollm2": smollm2}[args.model](args.time, out, args.backend, *texts)
    report = result.report.to_markdown()
    print(report[report.index("## Search"):report.index("## Pictures") if "## Pictures" in report else None])
    print("\n".join(line for line in result.report.verdicts() if line.startswith(f"{args.backend}:")))
    print(f"whole run {time.perf_counter() - start:.0f} s; pictures in {out}/")


if __name__ == "__main__":
    main()
