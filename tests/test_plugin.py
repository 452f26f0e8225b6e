"""The example plugin in plugins/ installs like any third-party package and runs through the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).parents[1] / "plugins" / "rewrite-example"
EXAMPLE = str(Path(__file__).parents[1] / "examples" / "cnn.py") + ":build"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """pip-install the plugin into a private folder (no deps: rewrite itself is already importable)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN)], check=True, capture_output=True)
    return target


def _rewrite(site, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(Path(__file__).parents[1])]))
    return subprocess.run([sys.executable, "-c", "from rewrite.cli import main; main()", *args],
                          capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_installed_plugin_is_listed(plugin_site):
    out = _rewrite(plugin_site, "passes", "list")
    assert out.returncode == 0 and "drop-noops" in out.stdout and "rewrite-example 0.1.0" in out.stdout


NOOPS = """
import torch
from torch import nn


class WithNoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.2)

    def forward(self, x):
        return self.drop(self.fc(x)) * 1 + 0


def build():
    return WithNoOps().eval(), (torch.randn(2, 4),)
"""


@pytest.mark.slow
def test_installed_plugin_runs_in_a_pipeline(plugin_site, tmp_path):
    (tmp_path / "noops.py").write_text(NOOPS)
    out = _rewrite(plugin_site, "optimize", f"{tmp_path / 'noops.py'}:build", "-p", "fold-bn,drop-noops",
                   "-o", str(tmp_path / "o"), "--no-latency")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "drop-noops" in line and "│" in line)
    # ·1 and +0: the eval-mode dropout is already gone (capture removes it; the plugin still would elsewhere)
    assert "applied" in row and "removed=2" in row, out.stdout
