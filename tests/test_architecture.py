"""The architecture as written in docs/ARCHITECTURE.md: the layer contract holds and catches an upward
import."""

from __future__ import annotations

import json
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


# Run in a fresh interpreter: what `import nbdiff_megatron` and every module of it change outside the
# package (nothing), then what `install_compat()` installs. Prints one JSON line.
_SIDE_EFFECTS = r"""
import importlib, json, logging, sys, warnings
import torch

# What a library user imports: the model, the loop, decoding, checkpoints, conversion, data.
LIBRARY_MODULES = [
    "nbdiff_megatron.model.builder",
    "nbdiff_megatron.model.parallel",
    "nbdiff_megatron.training.loop",
    "nbdiff_megatron.inference.decoder",
    "nbdiff_megatron.inference.loading",
    "nbdiff_megatron.checkpoint.api",
    "nbdiff_megatron.convert.mcore_to_hf",
    "nbdiff_megatron.data.datasets",
    "nbdiff_megatron.data.preprocess",
]
CUDA_NAMES = ("current_device", "synchronize", "Stream", "stream", "manual_seed", "get_rng_state")


def state():
    return {
        "our_finders": [
            type(f).__name__ for f in sys.meta_path if type(f).__module__.startswith("nbdiff")
        ],
        "getLogger_patched": "getLogger" in vars(logging.Logger.manager),
        "root_logging": [logging.getLogger().level, len(logging.getLogger().handlers)],
        # Filters on megatron-core's notices (third-party imports add their own filters: not ours).
        "megatron_warning_filters": sum(
            "megatron" in str(f[3]) or "Transformer Engine" in str(f[1]) for f in warnings.filters
        ),
        "torch_compile": torch.compile.__module__,
        "torch_cuda": {name: getattr(torch.cuda, name).__module__ for name in CUDA_NAMES},
    }


before = state()
import nbdiff_megatron

for name in LIBRARY_MODULES:
    importlib.import_module(name)
imported = state()
nbdiff_megatron.install_compat()
nbdiff_megatron.install_compat()  # idempotent
installed = state()
print(json.dumps({"before": before, "imported": imported, "installed": installed}))
"""


def test_importing_the_package_changes_nothing_until_install_compat_is_called() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SIDE_EFFECTS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    states = json.loads(done.stdout.strip().splitlines()[-1])
    before, imported, installed = states["before"], states["imported"], states["installed"]
    assert imported == before
    # install_compat(): the deferred-compile import hook (once), megatron's log filter on every
    # logger created from now on, its warning filters, and (CPU-only torch) the CUDA patches.
    assert before["our_finders"] == [] and installed["our_finders"] == ["_MegatronImportHook"]
    assert installed["getLogger_patched"] and not before["getLogger_patched"]
    assert installed["megatron_warning_filters"] > before["megatron_warning_filters"] == 0
    assert installed["torch_compile"] == "torch"  # swapped only while a megatron module executes
    cpu_compat = "nbdiff_megatron.model.cpu_compat"
    assert all(module == cpu_compat for module in installed["torch_cuda"].values()), installed
    assert installed["root_logging"] == before["root_logging"]
