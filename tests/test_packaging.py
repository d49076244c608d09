"""What `pip install .` installs: the built wheel must carry every module and data file under llmprune/.

The rest of the suite imports the checkout (pytest runs from the repository root), which would hide a module the
wheel leaves out; this test builds the wheel from the tracked files alone and reads its file list."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [name for name in done.stdout.split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The files of a wheel built from a copy of the tracked files (so nothing untracked can slip in)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (built,) = out.glob("llmprune-*.whl")
    return zipfile.ZipFile(built)


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    return set(wheel.namelist())


def test_the_wheel_carries_every_module_and_data_file(wheel_names):
    shipped = [name for name in tracked_files() if name.startswith("llmprune/")
               and not name.endswith((".md", ".pyc"))]
    assert any(name.endswith(".yaml") for name in shipped) and any(name.endswith(".py") for name in shipped)
    missing = sorted(set(shipped) - wheel_names)
    assert not missing, f"the wheel leaves out {missing}: users who pip install get ModuleNotFoundError"


def test_the_wheel_carries_nothing_outside_the_package(wheel_names):
    stray = sorted(name for name in wheel_names if not name.startswith(("llmprune/", "llmprune-")))
    assert not stray, f"the wheel installs files outside llmprune/: {stray}"


def test_console_script_points_at_the_cli(wheel, wheel_names):
    (entry_points,) = [name for name in wheel_names if name.endswith(".dist-info/entry_points.txt")]
    assert "llmprune = llmprune.cli:main" in wheel.read(entry_points).decode()
