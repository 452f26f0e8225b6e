"""rpe-fft on a small RPE transformer trained here on a long-sequence task: accuracy after conversion and
after recovery.

Task (generated): sequences of 512 random tokens (vocabulary 16); at every position predict the token
7 places earlier (a relative-position lookup: the learned bias must find offset −7; content alone cannot).
Model: embedding → one self-attention block with a learned relative-position bias per head (the toy
`rewrite.testing.RPEAttention`, table covering |j − i| < 512) with a residual → LayerNorm → logits.
Rows: the original; `rpe-fft` right after conversion; after the shared recovery step (trained on the
labels, 32 sequences); all measured on 64 unseen sequences. The verdict row is `rpe-fft` with its
defaults (SQNR floor 10 dB).

Run: python benchmarks/rpe_fft_task.py [--features 16,32,64]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rewrite  # noqa: E402
from rewrite.testing import RPEAttention  # noqa: E402

VOCAB, LENGTH, LAG = 16, 512, 7


class Lookback(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.attention = RPEAttention(width, heads, max_len=LENGTH)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(self.norm(x + self.attention(x)))


def data(count: int, seed: int, length: int = LENGTH):
    tokens = torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))
    labels = torch.roll(tokens, LAG, dims=1)
    labels[:, :LAG] = -100  # no token that far back: ignored by the loss and the accuracy
    return tokens, labels


def accuracy(model, tokens, labels) -> float:
    with torch.no_grad():  # in batches of 4, the shape the rewrite was captured at
        pred = torch.cat([model(tokens[i:i + 4]).argmax(-1) for i in range(0, len(tokens), 4)])
    keep = labels != -100
    return float((pred[keep] == labels[keep]).float().mean())


def train(model, steps: int = 600):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        tokens, labels = data(16, 1000 + step)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(features: list[int]):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = train(Lookback())
    test = data(64, 1)
    tokens, labels = data(32, 3)
    # Recovery learns from labels: mask the ignored positions as the loss expects (valid class ids only).
    calib = {"inputs": [(tokens[i:i + 4],) for i in range(0, 32, 4)],
             "targets": [labels[i:i + 4].clamp_min(0) for i in range(0, 32, 4)]}
    rows = [["model", "accuracy (n=512, unseen)", "output SQNR dB", "status"]]
    rows.append(["original (softmax, learned bias table)", f"{accuracy(model, *test):.3f}", "-", "-"])
    runs = [(f"rpe-fft m={m}, {how}", f"rpe-fft{{features={m},min-sqnr=-100}}", recover)
            for m in features for how, recover in (("converted", None), ("recovered", "steps=300,lr=3e-3"))]
    for name, spec, recover in runs + [("rpe-fft with defaults, recovered", "rpe-fft", "steps=300,lr=3e-3")]:
        result = rewrite.optimize(model, (test[0][:4],), spec, calib=calib, recover=recover, measure_latency=False)
        record = result.report.records[0]
        sqnr = record.stats.get("sqnr_db_held_out", (record.error or {}).get("sqnr_db"))
        rows.append([name, f"{accuracy(result.model, *test):.3f}", "-" if sqnr is None else f"{sqnr:.1f}",
                     record.status + (f": {record.reason}" if record.reason else "")])
    print(f"## rpe-fft on a 512-token look-back task (predict the token {LAG} back; 1 attention block, 4 heads)\n")
    print(table(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", default="64", help="random-feature counts m to convert with, comma-separated")
    main([int(m) for m in parser.parse_args().features.split(",")])
