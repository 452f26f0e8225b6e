"""Step 2 of a run, by mode: the whole model (capture → passes → your class back), block by block in memory
(`rewrite.blockwise`), a checkpoint folder block by block (one block in memory, each written as soon as it is
rewritten), and the same passes again at another input shape (`Result.model_for`)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rewrite import blockwise, calibration, capture, checkpoint, inputs, measure, pipeline, spec, transplant
from rewrite.emit import hf, pt2, write
from rewrite.emit.hf import guard_save_pretrained
from rewrite.emit.pt2 import export_program
from rewrite.errors import RewriteError
from rewrite.output import OutputFolder
from rewrite.pass_base import Pass, PassContext
from rewrite.report import Artifact, RunReport

Progress = Callable[..., None]  # (message, done=None, total=None)


@dataclass
class Result:
    """The rewritten model, its report, and the capture it came from.

    `model` is built for the shapes of the example inputs when export specialized them (the report's
    capture line says so) or a pass did (t1 builds DFT matrices for one grid); `model_for(*inputs)`
    captures and rewrites again for other shapes with the same passes, verified strictly on those
    inputs, and caches the result by shape.
    """

    model: nn.Module
    report: RunReport
    captured: capture.Captured
    passes: list[Pass] = field(default_factory=list)
    seed: int = 0
    _by_shape: dict = field(default_factory=dict, repr=False)

    def model_for(self, *inputs: Any) -> nn.Module:
        key = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in inputs)
        if key == _shape_key(self.captured):
            return self.model
        # Even a dynamic capture may have been made shape-specific by a pass (t1's DFT matrices): rewrite again.
        if key not in self._by_shape:
            self._by_shape[key] = self._rewrite_for(tuple(inputs))
        return self._by_shape[key]

    def _rewrite_for(self, inputs: tuple) -> nn.Module:
        needy = [p.name for p in self.passes if p.needs_calibration]
        if needy:
            raise RewriteError(f"{', '.join(needy)} need calibration data at this shape: run rewrite.optimize "
                               "again with inputs and --calib of this shape")
        original = self.captured.original
        captured = capture.capture(original, inputs)
        data = calibration.synthetic(inputs, self.seed)
        ctx = PassContext(calibration=data.batches, original=original, seed=self.seed, synthetic_calibration=True)
        module, _records, _outputs = pipeline.run_passes(captured, self.passes, ctx, strict=True)
        return module


def _shape_key(captured: capture.Captured) -> tuple:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in captured.example_inputs)


@dataclass
class Reuse:
    """What runs on the same model, example inputs and data share (`rewrite.tune`'s candidates differ only in
    their passes): the checked job, a pristine copy of the capture (passes change the one they are given),
    the captured graph's outputs on the calibration batches (the original's, where the graph gives those bit
    for bit), and the original's score on the eval data.
    On SmolLM2 with 8 × 512 calibration tokens that is about half a minute a candidate."""

    job: inputs.Job | None = None
    captured: capture.Captured | None = None
    outputs: list | None = None
    score: float | None = None
    runs: dict = field(default_factory=dict)  # a pipeline and its settings (`run_key`) → its Run
    setup_s: float = 0.0  # time the first run spent making the job and the capture the others reuse
    # Emitters every run is made for besides its own (t1 picks its form by them): tune in onnxruntime makes its
    # candidates as ONNX takes them, so that it times those forms and its final rewrite, which emits ONNX, is
    # one of its runs (made again, it took MiniLM's final step from 70 to 118 s).
    emit: tuple[str, ...] = ()

    def keep_runs(self, pipelines: list[str]) -> None:
        """Forget the runs of other pipelines: each holds a rewritten model (tune keeps those it may choose)."""
        wanted = {spec.format_spec(spec.parse_spec(pipeline)) for pipeline in pipelines}
        self.runs = {key: run for key, run in self.runs.items() if key[0] in wanted}

    @contextlib.contextmanager
    def shared_setup(self) -> Iterator[None]:
        """Times work that every run after the first reuses (tune leaves it out of a candidate's time)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.setup_s += time.perf_counter() - start

    def capture(self, job: inputs.Job) -> capture.Captured:
        if self.captured is None:
            with self.shared_setup():
                self.captured = capture.capture(job.model, job.inputs)
                self.outputs = capture.outputs_on(self.captured.module, job.data.batches, job.outputs, job.masks)
        return dataclasses.replace(self.captured, module=capture.copied(self.captured.module))


@dataclass
class Run:
    """What a mode made: the result (your class where it could come back), the verified graph, the passes'
    records, the capture, and what the user should know."""

    rewritten: nn.Module
    graph: nn.Module
    records: list
    captured: capture.Captured
    warnings: list[str]
    outputs: list | None = None  # `rewritten`'s outputs on the calibration batches, where a step computed them

    @property
    def own_class(self) -> bool:
        return self.rewritten is not self.graph


def run_key(passes: list[Pass], emitters: list[str], recovery: Any, seed: int, strict: bool, floor: float | None,
            time_limit: float | None) -> tuple:
    """What a whole-model run's result depends on besides the shared model and data (t1 reads the emitters)."""
    return (spec.format_spec(passes), tuple(emitters), repr(recovery), seed, strict, floor, time_limit)


def whole_model(job: inputs.Job, passes: list[Pass], emitters: list[str], recovery: Any, seed: int, strict: bool,
                floor: float | None, say: Progress, time_limit: float | None = None, reuse: Reuse | None = None) -> Run:
    """The passes over the captured model, verified, and your class back where it can be. With `reuse`, a
    pipeline already run with the same settings is not run again (tune's final rewrite of its chosen point)."""
    emitters = list(dict.fromkeys([*emitters, *reuse.emit])) if reuse is not None else emitters
    key = run_key(passes, emitters, recovery, seed, strict, floor, time_limit)
    if reuse is not None and key in reuse.runs:
        say("reusing the run of this pipeline")
        return reuse.runs[key]
    run = _whole_model(job, passes, emitters, recovery, seed, strict, floor, say, time_limit, reuse)
    if reuse is not None:
        reuse.runs[key] = run
    return run


def _whole_model(job: inputs.Job, passes: list[Pass], emitters: list[str], recovery: Any, seed: int, strict: bool,
                 floor: float | None, say: Progress, time_limit: float | None, reuse: Reuse | None) -> Run:
    say("capturing")
    captured = reuse.capture(job) if reuse is not None else capture.capture(job.model, job.inputs)
    inputs.check_shapes(captured, job.data.batches, "calibration")
    if job.eval_data is not None:
        inputs.check_shapes(captured, job.eval_data[0], "eval")
    warns = [] if captured.graph else [captured.note]
    evaluate = measure.evaluator(job.metric, *job.eval_data) if job.eval_data else None
    ctx = PassContext(calibration=job.data.batches, targets=job.data.targets, original=job.model, seed=seed,
                      synthetic_calibration=job.data.synthetic, emit=tuple(emitters), recover=recovery,
                      evaluate=evaluate, metric=job.metric, masks=job.masks, metric_floor=floor,
                      time_limit=time_limit, leave_as_is=transplant.read_as_tensors(job.model))
    before = reuse.outputs if reuse is not None else capture.outputs_on(captured.module, job.data.batches,
                                                                          job.outputs, job.masks)
    graph, records, outputs = pipeline.run_passes(captured, passes, ctx, strict=strict, progress=say, outputs=before)
    say("putting the rewritten layers into your model")
    graph_passes = [p.name for p, r in zip(passes, records) if p.level == "graph" and r.status == "applied"]
    own, own_outputs, lost = transplant.choose(graph, job.model, graph_passes, job.data.batches, job.masks, outputs)
    rewritten = own if own is not None else capture.accept_original_calls(graph, job.model, job.inputs)
    warns += [w for w in (job.cache_note if own is None else None, lost) if w]
    return Run(rewritten, graph, records, captured, warns, own_outputs if own is not None else outputs)


def block_by_block(job: inputs.Job, passes: list[Pass], recovery: Any, seed: int, strict: bool, say: Progress,
                   time_limit: float | None = None) -> Run:
    outcome = blockwise.run(capture.copied(job.model), job.data.batches, passes, seed=seed, strict=strict,
                            recover=recovery, say=say, time_limit=time_limit)
    captured = capture.Captured(job.model, job.inputs, graph=False, note=outcome.summary, original=job.model)
    return Run(outcome.model, outcome.model, outcome.records, captured, [job.cache_note] if job.cache_note else [])


def refuse_artifacts_in_memory_blockwise(blockwise_: bool, out: Any) -> None:
    if blockwise_ and out is not None:
        # Its blocks are captured one by one, with the calls calibration made (attention_mask=None); a second
        # export of the whole model traces other calls (a materialized causal mask), so it cannot be emitted.
        raise RewriteError("--blockwise on a model in memory does not write artifacts yet: save the model with "
                           "save_pretrained and give that checkpoint folder, which is written block by block "
                           "(Python: leave out=None to get the rewritten model back)")


def refuse_for_checkpoints(out: Any, emitters: list[str], eval: Any) -> None:
    why = ("no output folder (-o): it is written block by block" if out is None else
           "--emit " + ",".join(e for e in emitters if e != "pt2")
           if any(e != "pt2" for e in emitters) else "--eval" if eval is not None else None)
    if why:
        raise RewriteError(f"a checkpoint folder is rewritten block by block, which does not take {why} yet: "
                           "rewrite.load the output and run that step on it")


def checkpoint_folder(folder: Path, example_inputs: Any, passes: list[Pass], calib: Any, out: OutputFolder,
                      seed: int, strict: bool, calib_batches: int, say: Progress, recovery: Any = None,
                      remote_code: bool = False, time_limit: float | None = None) -> Result:
    """A Hugging Face checkpoint folder, block by block: one block in memory at a time, each written as
    soon as it is rewritten (`rewrite.checkpoint`), as .pt2 programs and as shards from_pretrained loads."""
    say("reading the checkpoint (weights outside the stack of blocks)")
    lazy = checkpoint.Lazy(folder, remote_code)
    lazy.check_disk(out.path.parent if out.path.parent.exists() else Path.cwd())
    if calib is None and example_inputs is None:
        raise RewriteError("a checkpoint folder comes without inputs: give calibration token ids with --calib")
    data = calibration.from_user(calib if calib is not None else example_inputs, lazy.model, "calibration",
                                 calib_batches)
    with out.staging() as stage:
        shards = hf.Sharded(lazy.model, stage)  # the same blocks again, as a folder from_pretrained loads

        def keep(index: int, rewritten: nn.Module, captured: capture.Captured, _flat: Any) -> nn.Module:
            pt2.save_program(export_program(rewritten, captured), stage / checkpoint.block_file(index))
            shards.add(rewritten, f"model-{index + 1:05d}.safetensors", ("block.", f"{lazy.stack}.{index}."))
            return checkpoint.OnDisk(out.final(stage / checkpoint.block_file(index)))

        outcome = blockwise.run(lazy.model, data.batches, passes, seed=seed, strict=strict, recover=recovery, say=say,
                                load=lazy.load, keep=keep, time_limit=time_limit)
        aliases = checkpoint.write_rest(lazy.model, lazy.stack, stage)
        checkpoint.write_manifest(stage, folder, lazy.stack, outcome.layouts, aliases)
        shards.add(lazy.model, "model-00000.safetensors")
        shards.finish(json.loads((folder / "config.json").read_text()))
        write.copy_tokenizer(folder, stage)
        report = RunReport(pipeline=spec.format_spec(passes), capture=outcome.summary,
                           inputs=calibration.describe(data.batches), records=outcome.records,
                           warnings=["the whole model was never in memory, so its outputs were not compared with the "
                                     "original: each block was verified on its own calibration activations"])
        report.artifacts.append(Artifact("blocks", out.final(stage / checkpoint.MANIFEST), None,
                                         "rewrite.load(folder) builds the rewritten model"))
        if shards.problem:
            report.warnings.append(f"no from_pretrained form: {shards.problem.splitlines()[0][:300]}")
        else:
            report.artifacts.append(write.hf_artifact(stage / "config.json", hf.COMPRESSED))
            report.artifacts[-1].path = out.final(report.artifacts[-1].path)
        report.write(stage)
    captured = capture.Captured(lazy.model, data.batches[0], graph=False, note=outcome.summary)
    return Result(guard_save_pretrained(lazy.model, None), report, captured, passes, seed)
