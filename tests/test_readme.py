import re
from pathlib import Path

from rewrite import registry
from rewrite.cli.passes import builtin_passes, markdown_page, markdown_table

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_pass_table_matches_pass_metadata():
    builtin = [n for n, e in registry.registered().items() if e.distribution.startswith("rewrite ")]
    assert markdown_table(builtin, links="docs/passes") in README


def test_each_pass_page_is_generated_from_its_pass():
    """docs/passes/NAME.md: `rewrite passes docs docs/passes` writes them; a changed option or docstring
    fails here until they are written again."""
    pages = Path(__file__).parents[1] / "docs" / "passes"
    assert sorted(p.stem for p in pages.glob("*.md")) == sorted(builtin_passes())
    for name in builtin_passes():
        assert (pages / f"{name}.md").read_text() == markdown_page(name), f"docs/passes/{name}.md is stale"


def test_the_readme_stays_short_and_its_links_resolve():
    assert len(README.encode()) <= 10_500
    root = Path(__file__).parents[1]
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (root / link).exists(), link


def test_ci_runs_the_readme_test_command():
    assert "bash .ci/run" in README
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert re.search(r"python -m pytest -q", ci)


def test_ci_runs_the_readme_main_job_exactly_as_written():
    """.ci/run takes the line after `# 1. ` from the README and runs it: that line must be the main job."""
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "grep -A1 '^# 1\\. ' README.md" in ci and 'bash -c "$main_job"' in ci
    line = README.split("\n# 1. ", 1)[1].split("\n")[1]
    assert line.startswith("python3 -m venv .venv && ") and "&& rewrite optimize examples/" in line


def test_dependencies_are_floors_so_a_users_torch_is_kept():
    import tomllib
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pinned = [d for d in project["dependencies"] if "==" in d or "<" in d]
    assert not pinned, f"exact pins replace what users have installed: {pinned}"
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "torch==2.13.0" in README  # the exact version lives where CI tests it
