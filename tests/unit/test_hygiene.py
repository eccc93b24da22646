"""The code checks `make test` enforces: ruff, mypy on provider/, and the import-linter layering.

The built wheel's contents are checked in test_dist.py."""

from __future__ import annotations

import subprocess
import sys
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

