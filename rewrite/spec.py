"""The spec language, one parser: pipelines `a,b{k=v}`, `--budget sqnr=DB|metric=Y`, `--floor metric=Y`.

Option text is coerced to each pass field's declared type (int, float, bool, str, Literal, unions);
non-finite floats are refused (a NaN floor would silently switch verification off).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, get_args, get_origin

from rewrite import registry
from rewrite.errors import RewriteError, first_line
from rewrite.pass_base import Pass


def parse_spec(spec: str | list) -> list[Pass]:
    """`"fold-bn,t1{mode=exact},dgq{group=128}"` → pass instances; a list may mix spec strings and instances."""
    if isinstance(spec, (list, tuple)):
        return [p for item in spec for p in _parse_item(item)] or parse_spec("")
    if not isinstance(spec, str):
        raise RewriteError(f"passes must be a spec string like 'fold-bn,dgq' or a list, got {type(spec).__name__}")
    parts = _split_top_level(spec)
    if not parts:
        raise RewriteError("no passes given: name at least one, e.g. --passes fold-bn (see `rewrite passes list`)")
    return [_parse_one(part) for part in parts]


def _parse_item(item: Any) -> list[Pass]:
    if isinstance(item, Pass):
        for f in dataclasses.fields(item):
            value = getattr(item, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RewriteError(f"option {f.name.replace('_', '-')}={value} of pass {item.name!r} must be finite")
        return [item]
    if isinstance(item, type) and issubclass(item, Pass):
        return [item()]
    if isinstance(item, str):
        return parse_spec(item)
    raise RewriteError(f"passes list holds a {type(item).__name__}: give pass names or rewrite.Pass instances")


def with_budget(passes: list[Pass], budget: str | None) -> list[Pass]:
    """`--budget sqnr=DB | metric=Y | params=F`: passes that search per-layer settings (fwsvd, lowrank) search
    within it.

    sqnr: the whole model's output SQNR on calibration data stays ≥ DB. metric: the --metric score on the
    --eval data stays ≥ Y (≤ Y for rel-l2). params: keep the fraction F of the target Linears' weights
    (fwsvd spends it across layers where it hurts least; it is their `param-ratio`)."""
    if not budget:
        return passes
    key, value = key_value(budget, "--budget", ("sqnr", "metric", "params"))
    if key == "params" and not 0 < value < 1:
        raise RewriteError(f"--budget params={value:g}: give the fraction of weights to keep, in (0, 1), e.g. 0.8")
    field = "param_ratio" if key == "params" else f"budget_{key}"
    if not any(hasattr(p, field) for p in passes):
        raise RewriteError("--budget given but no pass in the pipeline searches per-layer settings (fwsvd, lowrank, prune)")
    unset = (lambda p: True) if key == "params" else (lambda p: not getattr(p, field))
    return [dataclasses.replace(p, **{field: value}) if hasattr(p, field) and unset(p) else p for p in passes]


def finite_number(raw: str) -> float | None:
    value = _try_coerce(raw, float)
    return None if value is _FAIL else value


def format_spec(passes: list[Pass]) -> str:
    return ",".join(p.spec() for p in passes)


def _split_top_level(spec: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise RewriteError(f"malformed pipeline {spec!r}: unbalanced braces; write name{{key=value,...}}")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise RewriteError(f"malformed pipeline {spec!r}: missing '}}'; write name{{key=value,...}}")
    parts.append(current.strip())
    return [p for p in parts if p]


def _parse_one(text: str) -> Pass:
    name, _, rest = text.partition("{")
    name = name.strip()
    if rest and not rest.endswith("}"):
        raise RewriteError(f"malformed pass {text!r}: text after '}}'; write name{{key=value,...}}")
    cls = registry.load_pass(name)
    options = _parse_options(name, rest[:-1]) if rest else {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in options.items():
        field = key.replace("-", "_")
        if field not in fields:
            known = ", ".join(f.replace("_", "-") for f in fields) or "none"
            raise RewriteError(f"pass {name!r} has no option {key!r}; its options: {known}")
        kwargs[field] = _coerce(name, key, raw, hints[field])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RewriteError(f"pass {name!r}: {first_line(exc)}") from None


def _parse_options(name: str, body: str) -> dict[str, str]:
    options = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RewriteError(f"malformed option {item!r} for pass {name!r}: write key=value")
        options[key.strip()] = value.strip()
    return options


def _coerce(name: str, key: str, raw: str, annotation: Any) -> Any:
    """Turn option text into the field's declared type (int, float, bool, str, Literal, or a union)."""
    choices = [annotation] if get_origin(annotation) not in (typing.Union, type(int | str)) else list(get_args(annotation))
    for kind in choices:
        value = _try_coerce(raw, kind)
        if value is not _FAIL:
            return value
    wanted = " or ".join(_describe(k) for k in choices)
    raise RewriteError(f"option {key}={raw!r} of pass {name!r} must be {wanted}")


_FAIL = object()


def _try_coerce(raw: str, kind: Any) -> Any:
    if get_origin(kind) is Literal:
        return raw if raw in get_args(kind) else _FAIL
    if kind is bool:
        return {"true": True, "on": True, "1": True, "yes": True,
                "false": False, "off": False, "0": False, "no": False}.get(raw.lower(), _FAIL)
    if kind is type(None):
        return None if raw.lower() in ("none", "") else _FAIL
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        return _FAIL
    if isinstance(value, float) and not math.isfinite(value):  # nan would switch a floor off silently
        return _FAIL
    return value


def _describe(kind: Any) -> str:
    if get_origin(kind) is Literal:
        return "one of " + "|".join(map(str, get_args(kind)))
    return "a finite number" if kind is float else getattr(kind, "__name__", str(kind))


def metric_floor(floor: str | None) -> float | None:
    """`--floor metric=Y`: approximate passes are accepted by the task metric instead of SQNR."""
    return key_value(floor, "--floor", ("metric",))[1] if floor else None


@dataclasses.dataclass(frozen=True)
class RecoverSpec:
    """`[local,]steps=N[,lr=..,patience=..,then=N]` from the CLI's --recover / the API's recover=
    (`rewrite.recover` runs it). local: each rewritten layer is fitted to its original alone, in forward
    order; steps and patience then count per layer, and then=N adds N steps of whole-model distillation."""

    steps: int = 200
    lr: float | None = None  # None: the pass's own `recovery_lr` (or `local_lr` for local)
    patience: int = 50
    local: bool = False
    then: int = 0  # with local: whole-model distillation steps after the local fits


def recover_spec(text: str | None):
    """`--recover [local,]steps=N[,lr=X][,patience=N][,then=N]` → a RecoverSpec (None: no recovery)."""
    if not text:
        return None
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, eq, raw = (part.strip() for part in item.partition("="))
        if key == "local" and not eq:
            values["local"] = True
            continue
        if not eq or key not in ("steps", "lr", "patience", "then"):
            raise RewriteError(f"malformed --recover {text!r}: write [local,]steps=N[,lr=X][,patience=N][,then=N]")
        value = _try_coerce(raw, float if key == "lr" else int)
        if value is _FAIL:
            raise RewriteError(f"--recover {key}={raw!r} must be a number")
        values[key] = value
    spec = RecoverSpec(**values)
    if spec.then and not spec.local:
        raise RewriteError(f"--recover {text!r}: then=N follows local fits; write local,then=N")
    if spec.steps <= 0 or spec.patience <= 0 or spec.then < 0 or (spec.lr is not None and spec.lr <= 0):
        raise RewriteError(f"--recover {text!r}: steps, lr and patience must be positive (and finite)")
    return spec


def key_value(text: str, option: str, keys: tuple[str, ...]) -> tuple[str, float]:
    """`key=number` for options like --budget and --floor; one-line errors naming the allowed keys."""
    key, eq, raw = (part.strip() for part in text.partition("="))
    value = finite_number(raw)
    if key not in keys or not eq or value is None:
        choices = " or ".join(f"{k}=VALUE" for k in keys)
        raise RewriteError(f"{option} {text!r} is malformed: write {choices} (a finite number)")
    return key, value
