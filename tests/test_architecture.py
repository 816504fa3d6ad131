"""The architecture as written in docs/ARCHITECTURE.md: the layer contract holds and catches an upward
import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.launch import REPO, clean_env

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contract over the package found under `package_root`."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=package_root,
        env=clean_env({"PYTHONPATH": str(package_root)}),
        timeout=120,
    )


def test_imports_run_down_the_layers() -> None:
    done = _lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path: Path) -> None:
    package = tmp_path / "nbdiff_megatron"
    shutil.copytree(
        REPO / "nbdiff_megatron", package, ignore=shutil.ignore_patterns("__pycache__", "assets")
    )
    (package / "data" / "upward.py").write_text(
        "def steps():\n    from nbdiff_megatron.training import loop\n\n    return loop\n"
    )
    done = _lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "nbdiff_megatron.data.upward -> nbdiff_megatron.training.loop" in done.stdout, (
        done.stdout[-3000:]
    )
