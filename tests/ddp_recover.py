"""Run by test_recover under `torchrun --nproc-per-node=N`: lowrank + recovery on a small FFN; rank 0 prints
the recovery loss curve as JSON."""
import json

import torch

import rewrite
from rewrite import distributed
from tests.passes.test_lowrank import FFN


def main() -> None:
    torch.manual_seed(0)
    model = FFN(d=32, hidden=128).eval()
    calib = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = rewrite.optimize(model, (calib[0],), "lowrank{rank=8,whiten=false,min-sqnr=-100}", calib=calib,
                              recover="steps=30,patience=100", measure_latency=False)
    if distributed.rank() == 0:
        stats = result.report.records[0].stats
        print(json.dumps({"curve": stats["recovery_curve"], "processes": stats.get("recovery_processes", 1)}))


if __name__ == "__main__":
    main()
