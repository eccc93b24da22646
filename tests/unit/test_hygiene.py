"""The code checks `make test` enforces: ruff, mypy on provider/, and the import-linter layering."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["ruff", "check", "provider", "tests", "dags", "scripts", "bench"], id="ruff"),
        pytest.param(["mypy"], id="mypy"),
        pytest.param(["lint-imports"], id="import-linter"),
    ],
)
def test_code_checks_pass(command):
    result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(REPO / "provider"), "HOME": str(Path.home())},
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_built_wheel_ships_its_type_marker(tmp_path):
    """PEP 561: the wheel (not just the source tree) holds workqueue_provider/py.typed. Built from a copy of
    the sources, so the build leaves nothing in the repository."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "provider", source / "provider",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    result = subprocess.run([str(BIN / "python"), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                             str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("airflow_provider_workqueue-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "workqueue_provider/__init__.py" in names, names
    assert "workqueue_provider/py.typed" in names, f"{wheel.name} has no py.typed"
