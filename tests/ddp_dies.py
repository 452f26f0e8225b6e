"""Run by test_recover under `torchrun --nproc-per-node=2`, through the CLI. argv: the output folder, then
`dies` (rank 1 is SIGKILLed in the middle of recovery, as the OOM killer does) or `mismatch` (each rank
is given its own --seed)."""
import os
import signal
import sys

import torch

import rewrite
from rewrite import distributed
from tests.passes.test_lowrank import FFN


def main(out: str, mode: str) -> None:
    steps = [0]

    def die_at_step_5(optimizer, args, kwargs):
        steps[0] += 1
        if distributed.rank() == 1 and steps[0] == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    if mode == "dies":
        register_optimizer_step_post_hook(die_at_step_5)
    sys.argv = ["rewrite", "optimize", "tests.ddp_dies:build", "-p", "lowrank{rank=8,whiten=false,min-sqnr=-100}",
                "--recover", "steps=200,patience=1000", "-o", out, "--no-latency"]
    if mode == "mismatch":
        sys.argv += ["--seed", os.environ["RANK"]]
    from rewrite.cli import main as cli
    cli()


def build():
    torch.manual_seed(0)
    model = FFN(d=32, hidden=128).eval()
    calib = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return model, (calib[0],), calib


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
