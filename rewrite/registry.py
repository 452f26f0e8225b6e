"""Name → pass class through the `rewrite.passes` entry-point group (built-ins and plugins alike).

Listing reads entry-point metadata only; a pass module is imported when its pass is used.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from rewrite.errors import RewriteError
from rewrite.pass_base import Pass

PASS_GROUP = "rewrite.passes"
EMITTER_GROUP = "rewrite.emitters"


@dataclass(frozen=True)
class Registered:
    """One registered name: where it points and which distribution declared it."""

    name: str
    value: str
    distribution: str
    entry_point: EntryPoint

    def load(self) -> object:
        return self.entry_point.load()


def registered(group: str = PASS_GROUP) -> dict[str, Registered]:
    """Every name in `group`, without importing anything. A name declared twice is an error."""
    found: dict[str, Registered] = {}
    for ep in entry_points(group=group):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "<unknown distribution>"
        if ep.name in found and found[ep.name].value != ep.value:
            raise RewriteError(
                f"{group} name {ep.name!r} is registered twice: by {found[ep.name].distribution} "
                f"({found[ep.name].value}) and by {dist} ({ep.value}); uninstall one of them")
        found[ep.name] = Registered(ep.name, ep.value, dist, ep)
    return dict(sorted(found.items()))


def load_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`, checked to be a Pass whose `name` matches."""
    entry = lookup(name, registered(PASS_GROUP), "pass")
    try:
        cls = entry.load()
    except Exception as exc:
        raise RewriteError(f"pass {name!r} from {entry.distribution} failed to import: {exc}; "
                           "reinstall that package") from exc
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise RewriteError(f"{entry.value} (from {entry.distribution}) is not a rewrite.Pass subclass")
    if cls.name != name:
        raise RewriteError(f"entry point {name!r} from {entry.distribution} loads a pass named {cls.name!r}; "
                           "the entry-point name must equal the class's `name`")
    return cls


def plugin_of(cls: type) -> str | None:
    """The distribution ("name version") that registered this pass class, when it is not rewrite itself."""
    entry = registered(PASS_GROUP).get(getattr(cls, "name", None))
    if entry is None or entry.distribution.startswith("rewrite ") or not entry.value.startswith(cls.__module__):
        return None
    return entry.distribution


def load_emitter(name: str):
    return lookup(name, registered(EMITTER_GROUP), "emitter").load()


def lookup(name: str, table: dict[str, Registered], kind: str) -> Registered:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    raise RewriteError(f"unknown {kind} {name!r}: {suggestion}known: {', '.join(table) or 'none installed'}")
