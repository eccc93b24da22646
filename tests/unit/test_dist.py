"""The package as a user gets it: `make dist`'s sdist and wheel, and the wheel installed into a fresh venv.

The package is not on PyPI; the wheel `make dist` builds is what a release would upload. `make dist` runs
in a copy of the working tree's files that git doesn't ignore (what a clone of it would hold), so nothing is
written into the repository. Installing
into the fresh venv pins the versions of this venv (`pip freeze`), so pip takes them from its cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/ of `make dist` run in a copy of the repository's files (tracked, or new and not ignored)."""
    clone = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    for relative in filter(None, listed.stdout.split("\0")):
        if (REPO / relative).is_file():
            (clone / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, clone / relative)
    result = subprocess.run(["make", "--no-print-directory", "dist", f"VENV={sys.prefix}"], cwd=clone,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASSED" in result.stdout, f"twine check didn't pass:\n{result.stdout[-2000:]}"
    return clone / "dist"


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    [found] = dist.glob("airflow_provider_workqueue-*.whl")
    return found


def test_make_dist_builds_an_sdist_and_a_wheel(dist):
    assert sorted(path.suffix for path in dist.iterdir()) == [".gz", ".whl"], list(dist.iterdir())


def test_the_wheel_holds_the_package_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "workqueue_provider/__init__.py" in names, names
    assert "workqueue_provider/py.typed" in names, f"{wheel.name} has no py.typed (PEP 561)"
    top_levels = {name.split("/")[0] for name in names}
    assert {top for top in top_levels if not top.endswith(".dist-info")} == {"workqueue_provider"}, top_levels
    stray = [name for name in names if "__pycache__" in name or name.endswith(".pyc") or "_cache/" in name]
    assert not stray, f"caches in {wheel.name}: {stray}"


def test_the_wheel_registers_the_provider_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        [entry_points] = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    sections = {section.split("]")[0]: section for section in text.split("[")[1:]}
    assert "provider_info = workqueue_provider:get_provider_info" in sections["apache_airflow_provider"], text
    assert "workqueue-consume = workqueue_provider.worker.cli:main" in sections["console_scripts"], text


def test_the_wheel_installs_into_a_fresh_venv_and_airflow_lists_the_provider(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    frozen = subprocess.run([str(BIN / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(line for line in frozen.splitlines() if not line.startswith("#")) + "\n")
    installed = subprocess.run([str(venv / "bin/pip"), "install", "-q", "-c", str(constraints), str(wheel)],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()), "AIRFLOW_HOME": str(tmp_path / "home"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "LANG": os.environ.get("LANG", "C.UTF-8")}
    providers = subprocess.run([str(venv / "bin/airflow"), "providers", "list"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert providers.returncode == 0, providers.stdout[-3000:] + providers.stderr[-3000:]
    assert "airflow-provider-workqueue" in providers.stdout, providers.stdout
    consume = subprocess.run([str(venv / "bin/workqueue-consume"), "--help"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert consume.returncode == 0 and "BROKER_URL" in consume.stdout, consume.stdout + consume.stderr
