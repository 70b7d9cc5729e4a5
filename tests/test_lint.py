"""The code base passes ruff (bugbear, isort, pyupgrade, simplify: see pyproject.toml) and the
package passes mypy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed in this environment (./run installs it)")
    res = subprocess.run([ruff, "check", "surgery", "tests", "benchmarks", "models"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_mypy_is_clean() -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed in this environment (./run installs it)")
    res = subprocess.run([mypy, "surgery"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
