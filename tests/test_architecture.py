"""The architecture as written in docs/ARCHITECTURE.md: the layer contract holds and catches an upward
import."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nbdiff_megatron.cli import COMMANDS
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
        timeout=300,
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
print(json.dumps({"before": before, "imported": imported, "installed": installed,
                  "cuda": torch.cuda.is_available()}))
"""


def test_importing_the_package_changes_nothing_until_install_compat_is_called() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SIDE_EFFECTS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=600,  # seconds of CPU on an idle machine; a loaded shared one needs the margin
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
    compat = "nbdiff_megatron.megatron_compat"
    if states["cuda"]:  # the CPU patches apply only without CUDA
        assert installed["torch_cuda"] == before["torch_cuda"]
    else:
        assert all(module == compat for module in installed["torch_cuda"].values()), installed
    assert installed["root_logging"] == before["root_logging"]


# What the project is made of: its package, tests, scripts, configs and docs.
SCANNED = ("nbdiff_megatron", "tests", "benchmarks", "tools", "examples", "slurm", "docs", ".ci")
SCANNED_FILES = ("README.md", "BENCHMARKS.md", "Makefile", "pyproject.toml", "setup.py")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".sbatch", ".sh", ".toml", ".txt", ".cpp", ""}
CITED_DOC = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)\b")


def _project_text_files() -> list[Path]:
    files = [REPO / name for name in SCANNED_FILES if (REPO / name).is_file()]
    for folder in SCANNED:
        files += [
            p
            for p in sorted((REPO / folder).rglob("*"))
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
        ]
    return files


def test_every_document_the_project_cites_is_in_the_repository() -> None:
    here = Path(__file__).resolve()
    files = _project_text_files()
    names_in_repo = {p.name for p in files if p.suffix == ".md"}
    missing, outside = [], []
    for path in files:
        if path.resolve() == here:
            continue  # this test names the outside locations it looks for
        text = path.read_text(encoding="utf-8", errors="replace")
        if "/work/shared" in text or "shared/docs" in text:
            outside.append(str(path.relative_to(REPO)))
        for cited in set(CITED_DOC.findall(text)):
            found = (
                (REPO / cited).is_file()
                or (path.parent / cited).is_file()
                or ("/" not in cited and cited in names_in_repo)
            )
            if not found:
                missing.append(f"{path.relative_to(REPO)} cites {cited}")
    assert not missing, "\n".join(missing)
    assert not outside, f"references to files outside the repository: {outside}"


def test_the_method_document_has_every_section_the_code_cites() -> None:
    method = (REPO / "docs" / "METHOD.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^## (§\d+)", method, flags=re.M))
    cited = set()
    for path in _project_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for citation in re.findall(r"METHOD\.md ((?:§\d+(?:[-–]§?\d+)?[,;]? ?)+)", text):
            for first, last in re.findall(r"§(\d+)(?:[-–]§?(\d+))?", citation):
                cited.update(f"§{n}" for n in range(int(first), int(last or first) + 1))
    assert cited and cited <= headings, sorted(cited - headings)


def test_every_module_of_the_package_has_its_home_in_the_architecture_document() -> None:
    architecture = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    package = REPO / "nbdiff_megatron"
    modules = [
        p.relative_to(package).as_posix()
        for p in sorted(package.rglob("*.py"))
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    ]
    unnamed = [m for m in modules if f"`{m}`" not in architecture]
    assert not unnamed, f"docs/ARCHITECTURE.md does not say what these hold: {unnamed}"


# ------------------------------------------------------------------------------- imports
def _lazy_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, says why) of each import inside a function of `path`.

    The reason is a comment on the import's line or directly above its group of imports."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if not isinstance(inner, ast.Import | ast.ImportFrom):
                continue
            module = inner.module if isinstance(inner, ast.ImportFrom) else inner.names[0].name
            row = inner.lineno - 1
            while row > 0 and lines[row - 1].strip().startswith(("from ", "import ")):
                row -= 1  # the first import of the group
            said = "#" in lines[inner.lineno - 1] or lines[row - 1].strip().startswith("#")
            found.append((inner.lineno, module or "", said))
    return found


def test_imports_inside_functions_are_third_party_and_say_why() -> None:
    unexplained, stdlib = [], []
    for path in sorted((REPO / "nbdiff_megatron").rglob("*.py")):
        for line, module, said in _lazy_imports(path):
            where = f"{path.relative_to(REPO)}:{line} {module}"
            if module.split(".")[0] in sys.stdlib_module_names:
                stdlib.append(where)
            elif not said:
                unexplained.append(where)
    assert not stdlib, "the standard library imports at module top:\n" + "\n".join(stdlib)
    assert not unexplained, "a lazy import says why (docs/ARCHITECTURE.md):\n" + "\n".join(
        unexplained
    )


# Commands that answer without megatron-core, transformers, lm-eval or matplotlib (each costs seconds
# at start-up): every command's --help, `plan`, and a config's validation errors.
_LIGHT_COMMAND = r"""
import json, sys
from nbdiff_megatron.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("megatron", "transformers", "lm_eval", "matplotlib")
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy})))
"""


@pytest.mark.parametrize(
    "argv",
    [[command, "--help"] for command in COMMANDS]
    + [
        ["plan", "--config", "examples/phase1_8k.yaml"],
        ["train", "--config", "examples/tiny_cpu.yaml", "--train.steps=-1"],
    ],
    ids=lambda argv: " ".join(a for a in argv if not a.startswith("examples")),
)
def test_help_plan_and_config_errors_do_not_import_heavy_packages(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LIGHT_COMMAND, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=300,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stderr[-2000:]
