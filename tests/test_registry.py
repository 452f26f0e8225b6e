from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest

from rewrite import registry
from rewrite.errors import RewriteError
from rewrite.pass_base import Pass


class _Dist:
    def __init__(self, name):
        self.name, self.version = name, "1.0"


def _ep(name, value, dist):
    ep = EntryPoint(name, value, registry.PASS_GROUP)
    return ep._for(_Dist(dist)) if hasattr(ep, "_for") else ep


def _fake(monkeypatch, *eps):
    monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])


def test_builtins_are_registered_through_the_entry_point_group():
    names = registry.registered()
    assert {"fold-bn", "reparam"} <= set(names)
    assert names["fold-bn"].distribution.startswith("rewrite ")


def test_listing_does_not_import_pass_modules(monkeypatch):
    import sys
    for mod in [m for m in sys.modules if m.startswith("rewrite.passes.")]:
        monkeypatch.delitem(sys.modules, mod)
    registry.registered()
    assert not [m for m in sys.modules if m.startswith("rewrite.passes.")]


@pytest.mark.parametrize("name", sorted(registry.registered()))
def test_every_entry_point_name_equals_its_class_name(name):
    assert registry.load_pass(name).name == name


def test_duplicate_name_is_an_error_naming_both_distributions(monkeypatch):
    _fake(monkeypatch, _ep("fold-bn", "a.mod:X", "dist-a"), _ep("fold-bn", "b.mod:Y", "dist-b"))
    with pytest.raises(RewriteError, match="registered twice.*dist-a.*dist-b"):
        registry.registered()


def test_unknown_name_suggests_the_closest(monkeypatch):
    with pytest.raises(RewriteError, match="did you mean 'fold-bn'"):
        registry.load_pass("fold-bm")


@dataclass(frozen=True)
class _Misnamed(Pass):
    name = "other-name"


class _NotAPass:
    name = "not-a-pass"


def test_class_name_must_match_entry_point(monkeypatch):
    _fake(monkeypatch, _ep("mine", f"{__name__}:_Misnamed", "dist-a"))
    with pytest.raises(RewriteError, match="must equal"):
        registry.load_pass("mine")


def test_non_pass_class_is_rejected(monkeypatch):
    _fake(monkeypatch, _ep("not-a-pass", f"{__name__}:_NotAPass", "dist-a"))
    with pytest.raises(RewriteError, match="not a rewrite.Pass"):
        registry.load_pass("not-a-pass")


def test_broken_import_names_the_distribution(monkeypatch):
    _fake(monkeypatch, _ep("broken", "no_such_module_xyz:Thing", "dist-z"))
    with pytest.raises(RewriteError, match="dist-z.*failed to import"):
        registry.load_pass("broken")
