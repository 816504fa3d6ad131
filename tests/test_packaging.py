"""What an installed wheel must hold: `nbdiff demo` and `nbdiff ablate` read examples/tiny_cpu.yaml, which
setup.py ships inside the package (nbdiff_megatron/assets/examples/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nbdiff_megatron import ablation, demo
from nbdiff_megatron.data import bundled
from nbdiff_megatron.errors import ConfigError
from tests.launch import REPO, clean_env


def test_example_config_is_the_packaged_copy_else_the_checkouts(tmp_path, monkeypatch) -> None:
    assert demo.EXAMPLE == ablation.EXAMPLE == REPO / "examples" / "tiny_cpu.yaml"  # a checkout
    packaged = tmp_path / "site" / "nbdiff_megatron" / "assets"
    (packaged / "examples").mkdir(parents=True)
    (packaged / "examples" / "tiny_cpu.yaml").write_text("model: {}\n")
    monkeypatch.setattr(bundled, "ASSETS", packaged)
    assert bundled.example_config("tiny_cpu.yaml") == packaged / "examples" / "tiny_cpu.yaml"
    with pytest.raises(ConfigError, match="reinstall the package"):
        bundled.example_config("phase9.yaml")


def test_a_built_wheel_runs_the_demo_config_from_anywhere(tmp_path) -> None:
    # Built from a copy (pip builds in the source tree), without the optional C++ extension (the
    # packaging is the same; compiling it would take a minute).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("nbdiff_megatron", "examples"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    env = clean_env({"NBDIFF_BUILD_EXT": "0", "PIP_NO_INDEX": "1"})
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for config in (REPO / "examples").glob("*.yaml"):
            assert f"nbdiff_megatron/assets/examples/{config.name}" in names
        archive.extractall(tmp_path / "site")  # what `pip install` puts in site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "from nbdiff_megatron import ablation, demo; "
        "from nbdiff_megatron.training.config import load_config; "
        "assert demo.EXAMPLE == ablation.EXAMPLE; load_config(demo.EXAMPLE); print(demo.EXAMPLE)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env={**clean_env(), "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    installed = Path(run.stdout.strip())
    assert (
        installed == tmp_path / "site" / "nbdiff_megatron" / "assets" / "examples" / "tiny_cpu.yaml"
    )
    assert os.path.commonpath([installed, REPO]) != str(REPO)
