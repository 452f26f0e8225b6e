import re
from pathlib import Path

from rewrite import registry
from rewrite.cli.passes import markdown_table

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_pass_table_matches_pass_metadata():
    builtin = [n for n, e in registry.registered().items() if e.distribution.startswith("rewrite ")]
    assert markdown_table(builtin) in README


def test_ci_runs_the_readme_test_command():
    assert "bash .ci/run" in README
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert re.search(r"python -m pytest -q", ci)
