"""The pass contract: a frozen dataclass with a name, typed options, a numerics contract and one `call`.

The rules every pass follows, built-in or plugin:
- It reads and mutates only the module it is given. `ctx.original` is a teacher for distillation and
  nothing more (an earlier pass's change is in the given module, not there). One exception, guarded:
  `t1` reads neuraloperator layer objects there (a graph keeps their tensors, not their conventions),
  and only while the graph still holds those tensors unchanged. The layers in `ctx.leave_as_is` stay as
  they are (the model's class reads them as tensors; the pipeline says which), each in `skipped` with its why.
- It may measure to choose (a rank, a kernel form) and records the choice in its stats (they go to the
  recipe); it never measures to accept: the pipeline verifies the declared contract on calibration
  inputs after it runs and rolls it back when the contract is broken.
- Graph patterns go through `rewrite.match` (a `Pattern` of variants; `find`, `explain`,
  `replace_match`), so "why didn't it match" has one answer everywhere.
- Metadata that depends on options (`contract`, `needs_calibration`) is a property of the instance, so
  the pipeline and API never branch on a pass's name or options. `SqnrFloor` gives an approximate pass
  its `min_sqnr` option as the contract.
- It never prints: long work reports through `ctx.step(message, done, total)`.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch loads when a pass runs, not when the CLI lists or checks pass names
    from torch import nn


@dataclass(frozen=True)
class Exact:
    """Outputs equal the input model's to float tolerance: |Δ| ≤ atol·max(1, max|ref|) + rtol·|ref|."""

    rtol: float = 1e-4
    atol: float = 1e-5

    def describe(self) -> str:
        return "exact"


@dataclass(frozen=True)
class Approx:
    """Outputs within an error budget: SQNR (dB) at least `min_sqnr_db`, cosine at least `min_cosine`."""

    min_sqnr_db: float = 20.0
    min_cosine: float | None = None

    def describe(self) -> str:
        cos = f", cos≥{self.min_cosine}" if self.min_cosine is not None else ""
        return f"SQNR≥{self.min_sqnr_db:g} dB{cos}"


Contract = Exact | Approx


@dataclass
class PassContext:
    """What a pass may read: calibration batches (tuples of positional inputs), targets, the original model."""

    calibration: list[tuple] = field(default_factory=list)
    targets: list[Any] | None = None
    original: nn.Module | None = None
    seed: int = 0
    synthetic_calibration: bool = False
    # The calibration batches as the original model's layers see them, where they differ from `calibration`
    # (block by block: through the original blocks before this one, where `calibration` went through the
    # rewritten ones). Statistics that choose an exact reparametrization (dgq's smoothing peaks) come from
    # these, so block-by-block and whole-model runs choose the same. None: `calibration` itself.
    original_calibration: list[tuple] | None = None
    emit: tuple[str, ...] = ()  # artifact kinds the user asked for (e.g. "onnx" forces exportable forms)
    recover: Any = None  # a rewrite.recover.RecoverSpec when the user asked for recovery
    evaluate: Any = None  # module → task metric on the eval data (when --eval and --metric are given)
    metric: str | None = None
    masks: list | None = None  # per calibration batch: the (batch, seq) padding mask outputs are compared on
    metric_floor: float | None = None  # --floor metric=Y: approximate passes are judged by the task metric
    progress: Any = None  # progress(message, done, total): how a long pass says where it is (never print)
    time_limit: float | None = None  # seconds one pass's call may run (--pass-timeout); the pipeline enforces it
    # Layers a pass must leave as they are, with why (path → reason for the report): your class reads them as
    # bare tensors, so a rewritten one could not go back into it (`transplant.read_as_tensors`).
    leave_as_is: dict[str, str] = field(default_factory=dict)

    def step(self, message: str, done: int, total: int) -> None:
        """Report progress inside a pass (e.g. the layer being searched); a no-op without a listener."""
        if self.progress is not None:
            self.progress(message, done, total)


@dataclass
class PassResult:
    """What a pass returns. `skipped` lists (where, why) for everything that matched partly and was left alone."""

    module: nn.Module
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Per-layer rows for the report's picture ({"layer", "sqnr_db", "bytes_before", "bytes_after"}), where the
    # pass knows them and the framework cannot run the new layers alone (prune's narrowed FFNs in a graph).
    # Where given, they are the report's rows whether the model is a graph or eager, so that the same pass
    # names the same rows either way.
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Pass:
    """Base class of every rewrite pass, built-in or plugin.

    Subclasses set the ClassVars, declare options as dataclass fields with types and defaults,
    and implement `call`. `level="graph"` passes need a captured `torch.fx.GraphModule`;
    `level="module"` passes also run on an eager module that could not be captured.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    contract: ClassVar[Contract] = Exact()
    needs_calibration: ClassVar[bool] = False
    applies_to: ClassVar[str] = ""
    level: ClassVar[str] = "graph"
    graph_note: ClassVar[str] = ""  # "works without a graph" in the docs, where `level` alone would mislead
    # What the pass reads of the whole model, where one block alone cannot show it (a checkpoint folder is rewritten
    # block by block): "" for passes that work within a block.
    whole_model: ClassVar[str] = ""
    recoverable: ClassVar[bool] = False  # the pipeline distills right after it when recovery is asked for
    needs_recovery: ClassVar[bool] = False  # a different function by design: only useful after --recover
    # Adam's step size for --recover when no lr= is given: layers trained from a fresh start (snnk, t1, tconv) take
    # 1e-3; factors cut from pretrained weights (fwsvd, lowrank) a smaller one, which keeps the fit they start from.
    recovery_lr: ClassVar[float] = 1e-3
    shrinks: ClassVar[bool] = False  # an exact pass that promises fewer parameters/FLOPs: growth rolls it back
    # The layer classes it rewrites, by name (their subclasses too): where it finds nothing, an earlier pass's swaps
    # of these are what it may have looked for (fwsvd after dgq), and the report says to run it earlier; swaps of
    # other layers are not named. GPT-2's Conv1D is a Linear transposed.
    reads: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} does not implement call()")

    def pinned(self, stats: dict[str, Any]) -> "Pass":
        """This pass with what it chose by timing this machine (`stats` of its run) fixed as
        options, so a recipe re-runs it to the same model under any load. Default: nothing measured."""
        return self

    @classmethod
    def contract_text(cls) -> str:
        """The contract in words; passes whose contract depends on an option override `contract_note`."""
        note = getattr(cls, "contract_note", "")
        if note:
            return note
        if isinstance(inspect.getattr_static(cls, "contract"), property):  # depends on options: the defaults
            return f"{cls().contract.describe()} (default; min-sqnr sets it)"
        return cls.contract.describe()

    @classmethod
    def finds_nothing_in(cls, module: nn.Module) -> bool:
        """Whether a look at the module's layers shows that the pass has nothing to rewrite there, without a
        capture or a run (`tune` names only the passes it leaves out that could have done something). False
        when it cannot tell so cheaply."""
        return False

    @classmethod
    def patterns(cls) -> list:
        """The `rewrite.match.Pattern`s the pass rewrites (for `rewrite passes explain`); none by default."""
        return []

    @classmethod
    def calibration_text(cls) -> str:
        """Whether calibration data is needed, in words (`calibration_note` when it depends on options)."""
        note = getattr(cls, "calibration_note", "")
        if note:
            return note
        return "needed" if cls.needs_calibration is True else "optional"

    def spec(self) -> str:
        """The pipeline text that recreates this pass: `name{key=value}` with only non-default options."""
        changed = [f"{name.replace('_', '-')}={written(value)}" for name, value in self.changed_options().items()]
        return f"{self.name}{{{','.join(changed)}}}" if changed else self.name

    def changed_options(self) -> dict[str, Any]:
        """The options (field names) whose values differ from their declared defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != _default(f)}

    @classmethod
    def options(cls) -> list[tuple[str, str, Any]]:
        """(option name, type, default) for every option, as the CLI spells them."""
        return [(f.name.replace("_", "-"), _type_name(f.type), _default(f)) for f in dataclasses.fields(cls)]


class SqnrFloor:
    """Mixin for approximate passes whose SQNR floor is their `min_sqnr` option (declare that field)."""

    @property
    def contract(self) -> Approx:
        return Approx(min_sqnr_db=self.min_sqnr)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def is_graph(module: nn.Module) -> bool:
    from torch import fx
    return isinstance(module, fx.GraphModule)


def pinned_choices(text: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """`path:choice;path:choice` (a `layers=` option a recipe wrote) → {path: choice}."""
    from rewrite.errors import InvalidValue
    chosen = {}
    for item in filter(None, text.split(";")):
        path, _, choice = item.rpartition(":")
        if not path or choice not in allowed:
            raise InvalidValue(f"layers={text!r}: write path:choice;… with a choice among {', '.join(allowed)}")
        chosen[path] = choice
    return chosen


def written(value: Any) -> str:
    """An option's value as a user writes it: budget-cos=0 and on=true, not 0.0 and True (floats otherwise in
    full, so that a recipe reproduces them exactly)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)
