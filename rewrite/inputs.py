"""Step 1 of a run: the user's model, example inputs and data, all checked before any work starts.

The model becomes a private eval-mode copy (yours is never modified); example inputs, calibration and
evaluation data are checked against it; text (lists of strings) is tokenized into windows (`rewrite.text`).
`api.optimize`, `api.diff` and `api.explain` start here.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewrite import calibration, capture, checkpoint, measure, text, verify
from rewrite.errors import RewriteError, first_line
from rewrite.loading import Loaded, Trust
from rewrite.pass_base import Approx, Pass


@dataclass
class Job:
    """What a run works on, checked."""

    model: nn.Module  # the private copy, KV cache off
    inputs: tuple  # example inputs
    data: calibration.Data  # calibration batches (synthetic where none were given)
    eval_data: tuple | None  # (batches, targets, padding masks or None) for the metric
    metric: str | None
    masks: list | None  # per batch: which output positions count (padding excluded)
    warnings: list[str]
    use_cache: dict[str, bool]  # config.use_cache by module path ("": the model's), given back to the result
    cache_note: str | None  # what a graph result loses of the KV cache
    outputs: list | None = None  # the private copy's outputs on data.batches (its check ran them), or None


def prepare(model: Any, example_inputs: Any, passes: list[Pass], *, calib: Any, eval: Any, metric: str | None,
            tokenizer: Any, seq_len: int, calib_batches: int, seed: int, trusted: Any, mask_input: str | None,
            needs_eval: bool) -> Job:
    loaded = resolve(model, trusted)
    calib_is_text, eval_is_text = text.is_texts(calib), text.is_texts(eval)
    calib, eval, metric = tokenized(loaded.module, calib, eval, metric, tokenizer, seq_len, calib_batches,
                                    Trust.of(trusted).remote_code)
    if example_inputs is None and loaded.inputs is None and calib_is_text:
        example_inputs = calib[0]  # text in: the first calibration window is the example
    elif example_inputs is None and loaded.inputs is None and calib is not None and checkpoint.is_checkpoint(model):
        example_inputs = calibration.from_user(calib, loaded.module, "calibration", 1).batches[0]  # a folder has none
    model = private_copy(loaded.module)
    inputs = check_model_and_inputs(model, loaded.inputs if example_inputs is None else example_inputs)
    calib = like_example(calib, inputs, model) if calib_is_text else calib
    eval = like_example(eval, inputs, model) if eval_is_text else eval
    calib = loaded.calibration if calib is None else calib
    torch.manual_seed(seed)
    use_cache = capture.cache_flags(model)
    cache_note = capture.without_kv_cache(model, inputs)
    data, outputs, warns = calibration_data(calib, model, inputs, seed, passes, calib_batches)
    eval_data = evaluation_data(eval, metric, model, mask_input) if eval is not None else None
    if needs_eval and eval_data is None:
        raise RewriteError("--floor metric=... needs eval data and a metric: add --eval FILE --metric NAME")
    masks = calibration.masks(data.batches, calibration.mask_index(model, mask_input))
    return Job(model, inputs, data, eval_data, metric, masks, warns, use_cache, cache_note, outputs)


def model_file(model: Any) -> tuple[Path, ...]:
    """The file the model came from, which no output may overwrite."""
    return (Path(model),) if isinstance(model, (str, Path)) and Path(model).exists() else ()


def resolve(model: Any, trusted: Any) -> Loaded:
    """What `rewrite.load` gives, from a module or a load spec."""
    if isinstance(model, (str, Path)):
        return checkpoint.load_model(str(model), trusted)
    if not isinstance(model, nn.Module):
        raise RewriteError(f"expected a torch.nn.Module or a model path, got {type(model).__name__}")
    return Loaded(model)


def private_copy(model: nn.Module) -> nn.Module:
    try:
        return capture.copied(model).eval()
    except Exception as exc:
        raise RewriteError(f"cannot copy the model ({type(model).__name__}: {first_line(exc)}); rewrite works "
                           "on a private copy so yours is never modified: make the module deep-copyable") from exc


def check_model_and_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise RewriteError("no example inputs: give them (CLI: --inputs FILE or --input-shape 8,3,32,32)")
    inputs = calibration.as_args(example_inputs, model, "example input")
    calibration.check_finite(inputs, "the example inputs")
    calibration.check_token_ids(inputs, model, "the example inputs")
    try:
        capture.run(model, inputs)
    except Exception as exc:
        shapes = calibration.describe([inputs])
        raise RewriteError(f"the model rejects the example inputs {shapes}: {first_line(exc)}; "
                           "give inputs of the shape the model expects (--inputs or --input-shape)") from exc
    return inputs


# inputs a text window can fill when the example passes them (an encoder's tokenizer output)
_FILLED = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}


def like_example(windows: list[tuple], inputs: tuple, model: nn.Module) -> list[tuple]:
    """Text windows (token ids alone) in the example's structure: an attention mask of ones and token type
    ids of zeros where the example passes them (the graph is captured with the example's inputs)."""
    names = list(inspect.signature(model.forward).parameters)[1:len(inputs)]
    fills = []
    for name, value in zip(names, inputs[1:]):
        if value is not None and name not in _FILLED:
            raise RewriteError(f"text gives token ids only, but the example inputs also pass {name}: give "
                               "calibration data as tensors in the example's structure (--calib FILE)")
        fills.append(_FILLED[name] if value is not None else None)
    return [(ids, *[fill(ids) if fill else None for fill in fills]) for ids, *_ in windows]


def _same_structure(batch: tuple, inputs: tuple, what: str) -> None:
    """The captured graph takes the example's inputs: a batch must pass the same ones."""
    def passed(args: tuple) -> list[int]:
        return [i for i, x in enumerate(args) if x is not None]
    if passed(batch) != passed(inputs):
        raise RewriteError(f"{what} passes the inputs at positions {passed(batch)}, the example inputs "
                           f"{passed(inputs)}: give every batch the example's structure (the same named inputs)")


def calibration_data(calib: Any, model: nn.Module, inputs: tuple, seed: int, passes: list[Pass],
                     max_batches: int) -> tuple[calibration.Data, list | None, list[str]]:
    """The batches, the model's outputs on them where the check that the model takes them ran it (the
    before/after diff reuses them: on SmolLM2 a forward over 16 × 256 tokens is seconds), and warnings."""
    if calib is None:
        data = calibration.synthetic(inputs, seed)
        return data, None, data_warnings(data, passes)
    data = calibration.from_user(calib, model, "calibration", max_batches)
    outputs = []
    for i, batch in enumerate(data.batches):
        _same_structure(batch, inputs, f"calibration batch {i}")
        try:
            outputs.append(capture.run(model, batch))
        except Exception as exc:
            raise RewriteError(f"calibration batch {i} {calibration.describe([batch])} is rejected by the model: "
                               f"{first_line(exc)}") from exc
        if i == 0:
            check_output_memory(outputs[0], len(data.batches), 2 + (len(passes) > 1))
    return data, outputs, []


OUTPUT_MEMORY_SHARE = 0.8  # of the memory free once the model and its first outputs are in it


def check_output_memory(first: Any, batches: int, sets: int) -> None:
    """Refuse calibration data whose outputs would not fit in memory, before the forwards that fill it: a run
    holds the model's outputs on every batch, the original's and the rewritten model's (and the last pass's
    beside them where several passes run). A language model's are its logits: 512 tokens of SmolLM2 are
    100 MB, so 100k calibration tokens would want 20 GB a set."""
    free = measure.free_memory()
    each = sum(t.numel() * t.element_size() for t in verify.float_leaves(first, flatten=False))
    need = sets * each * batches
    if free is None or not each or need <= OUTPUT_MEMORY_SHARE * free:
        return
    fits = int(OUTPUT_MEMORY_SHARE * free // (sets * each))
    raise RewriteError(f"the model's outputs on {batches} calibration batches would take {need / 2**30:.1f} GiB "
                       f"({each / 2**20:.0f} MiB a batch, {sets} sets held at once), more than the "
                       f"{free / 2**30:.1f} GiB free: give at most {fits} batches (--calib-batches {max(fits, 1)}), or "
                       "save the model with save_pretrained and rewrite that folder, which runs block by block and "
                       "keeps no whole-model outputs")


def data_warnings(data: calibration.Data, passes: list[Pass]) -> list[str]:
    """What the report should say of the data these passes are verified on."""
    approximate = [p.name for p in passes if isinstance(p.contract, Approx) or p.needs_calibration]
    if not (data.synthetic and approximate):
        return []
    return [f"no calibration data: {', '.join(approximate)} verified on synthetic inputs only; pass --calib for a "
            "trustworthy error"]


def tokenized(model: Any, calib: Any, eval: Any, metric: str | None, tokenizer: Any, seq_len: int,
              calib_batches: int, remote_code: bool = False) -> tuple[Any, Any, str | None]:
    """Calibration and evaluation text (lists of strings) as token windows; other data as it came. Eval
    windows of the calibration text itself start after the calibration windows."""
    if not (text.is_texts(calib) or text.is_texts(eval)):
        return calib, eval, metric
    tok = text.tokenizer_for(model, tokenizer, remote_code)
    calib_text = "\n\n".join(calib) if text.is_texts(calib) else None
    if calib_text is not None:
        calib = text.windows(tok, calib_text, seq_len, calib_batches)
    if text.is_texts(eval):
        eval_text = "\n\n".join(eval)
        skip = len(calib) if eval_text == calib_text else 0
        eval = text.windows(tok, eval_text, seq_len, 10_000, skip=skip, what="eval")
        metric = metric or "perplexity"
    return calib, eval, metric


def evaluation_data(eval: Any, metric: str | None, model: nn.Module, mask_input: str | None = None
                    ) -> tuple[list[tuple], list[Any], list | None]:
    if metric is None:
        raise RewriteError(f"eval data given without a metric: add --metric {'|'.join(measure.METRICS)}")
    measure.metric_fn(metric)  # unknown names fail here
    data = calibration.from_user(eval, model, "eval", max_batches=10_000)
    if data.targets is None and metric == "perplexity":  # a language model's targets are its own token ids
        targets = [batch[0] for batch in data.batches]
        with torch.no_grad():  # one batch now: a model without logits fails here, not after the whole run
            measure.perplexity([capture.run(model, data.batches[0])], targets[:1])
        return data.batches, targets, None
    if data.targets is None:
        raise RewriteError('eval data has no targets: save {"inputs": [...], "targets": [...]} with torch.save')
    return data.batches, data.targets, calibration.masks(data.batches, calibration.mask_index(model, mask_input))


def check_shapes(captured: capture.Captured, batches: list[tuple], what: str) -> None:
    for i, batch in enumerate(batches):
        problem = captured.shape_problem(batch)
        if problem:
            raise RewriteError(f"{what} batch {i} {problem}: give {what} batches of the example inputs' shape "
                               "(or example inputs of theirs)")
