"""Run a reader of a saved folder in a fresh process, as a user's next session would."""
import subprocess
import sys
from pathlib import Path

import torch

RELOAD_LOGITS = ("import sys, torch, transformers\n"
                 "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
                 "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])\n")


def run(code: str, folder: Path, inputs: torch.Tensor, scratch: Path):
    """`code` reads argv[1] (the folder) and argv[2] (saved inputs) and saves its answer to argv[3]."""
    torch.save(inputs, scratch / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(scratch / "inputs.pt"),
                           str(scratch / "answer.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(scratch / "answer.pt")
