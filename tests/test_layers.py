"""The layer rule (pyproject.toml's [tool.importlinter]) and no import circle, function-level imports included."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_imports_only_from_its_layer_or_below():
    lint = Path(sys.executable).parent / "lint-imports"  # import-linter: a test dependency (.[test])
    assert lint.exists(), "import-linter is missing: pip install -e '.[test]'"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_no_module_of_rewrite_imports_itself_through_others():
    grimp = pytest.importorskip("grimp")
    import networkx as nx
    graph = grimp.build_graph("rewrite", cache_dir=None)
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            # A package's __init__ importing its own children is how a package is made, not a circle.
            if not imported.startswith(module + "."):
                edges.add_edge(module, imported)
    circles = list(nx.simple_cycles(edges))
    assert not circles, circles[:5]
