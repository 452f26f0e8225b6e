"""onnxruntime, the way every part of rewrite runs it: a CPU session that does not spin, fed torch tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def session(path: str | Path | bytes, threads: int = 0):
    """An onnxruntime CPU session that does not spin (spinning threads fight torch for 2 cores); `path` may
    be a serialized model."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def feed(sess: Any, inputs: tuple) -> dict[str, np.ndarray]:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def run(sess: Any, inputs: tuple) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed(sess, inputs))]
