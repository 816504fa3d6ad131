"""benchmarks/gpu_suite.py: its dry run validates every step on a CPU; its real run fits its budget,
runs exactly the GPU tests of the tree, and says why Triton is unusable when it is."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, clean_env

_spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
gpu_suite = importlib.util.module_from_spec(_spec)
sys.modules["gpu_suite"] = gpu_suite  # its dataclasses look their module up
_spec.loader.exec_module(gpu_suite)


def _marks_gpu(node: ast.AST) -> bool:
    """`<anything>.mark.gpu` (pytest.mark.gpu as a decorator, in pytestmark or in pytest.param)."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "gpu"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
    )


def _files_with_gpu_tests() -> set[str]:
    found = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(_marks_gpu(node) for node in ast.walk(tree)):
            found.add(str(path.relative_to(REPO)))
    return found


def test_gpu_tests_list_is_every_file_with_gpu_marked_tests() -> None:
    assert set(gpu_suite.GPU_TESTS) == _files_with_gpu_tests()
    assert len(gpu_suite.GPU_TESTS) == len(set(gpu_suite.GPU_TESTS))


def test_real_run_fits_its_budget_and_runs_exactly_the_listed_gpu_tests(tmp_path: Path) -> None:
    steps = gpu_suite.steps(False, tmp_path, ["--data.data_path=[x]"])
    assert sum(s.limit_s for s in steps) + gpu_suite.SETUP_S <= gpu_suite.BUDGET_S == 480
    assert steps[0].name == "triton-preflight" and not steps[0].needs_triton
    (pytest_step,) = [s for s in steps if s.name == "pytest-gpu"]
    (command,) = pytest_step.commands
    assert command[command.index("-m", 3) + 1] == "gpu"
    assert [arg for arg in command if arg.startswith("tests/")] == gpu_suite.GPU_TESTS
    (loss_step,) = [s for s in steps if s.name == "loss-widths"]
    # Both projections of the same padded shard: over its real rows, and over all of it.
    assert len(loss_step.commands) == len(gpu_suite.LOSS_WIDTHS) == 2
    assert ["--project-padded" in command for command in loss_step.commands] == [False, True]
    assert all("--padded-vocab" in command for command in loss_step.commands)


@pytest.mark.parametrize(
    ("output", "cause"),
    [
        ("ModuleNotFoundError: No module named 'triton'", "not installed"),
        (
            "/tmp/x/main.c:5:10: fatal error: Python.h: No such file or directory\n"
            "compilation terminated.\nsubprocess.CalledProcessError: ... gcc ...",
            "Python.h is missing",
        ),
        (
            "RuntimeError: Failed to find C compiler. Please specify via CC environment variable.",
            "install gcc",
        ),
        ("RuntimeError: something else entirely\n", "something else entirely"),
    ],
)
def test_triton_preflight_diagnosis(output: str, cause: str) -> None:
    assert cause in gpu_suite.triton_problem(output)


def test_gpu_suite_dry_run_validates_every_step(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), proc.stderr[-3000:]
    results = json.loads(out.read_text())
    failed = {s["step"]: s["output_tail"][-1500:] for s in results["steps"] if not s["ok"]}
    assert not failed, failed
    assert results["dry_run"] and proc.returncode == 0
    names = [s["step"] for s in results["steps"]]
    assert names == [
        "triton-preflight",
        "pytest-gpu",
        "train-check",
        "config-1b",
        "plan-1b",
        "train-step",
        "attention",
        "loss-widths",
    ]
    steps = {s["step"]: s for s in results["steps"]}
    # Triton is not installed with torch's CPU wheel: the pre-flight says so (where it is, its
    # kernel ran in the interpreter).
    preflight = steps["triton-preflight"]
    assert (
        preflight.get("triton_problem") or "compiled and ran a kernel" in preflight["output_tail"]
    )
    assert results["inductor_cache"]
    # The training check ran on the tiny model: two agreeing runs and a resume.
    (check,) = steps["train-check"]["figures"]
    assert [r["backend"] for r in check["runs"]] == ["sdpa", "sdpa"]
    assert check["agreement"]["ok"] and check["resume"]["ok"] and check["resume"]["steps"] == [2]
    assert all(r["plan_bytes"] > 0 and r["peak_bytes"] is None for r in check["runs"])
    plan = steps["plan-1b"]["output_tail"]
    assert "16 layers, hidden 2048, vocab 151,936" in plan and "verdict: FITS" in plan, plan


def test_figure_lines_of_the_gpu_only_steps() -> None:
    """The lines printed from train_step.py's and loss.py's JSON records (their real key names)."""
    step_record = {
        "results": {
            "nbdiff": {"step_time_s": 0.2, "tokens_per_s": 20480.0, "mfu": 0.41},
            "ar": {"step_time_s": 0.11, "tokens_per_s": 37236.0, "mfu": None},
        },
        "ratio_nbdiff_over_ar": 0.2 / 0.11,
    }
    lines = gpu_suite.figure_lines("train-step", [step_record])
    assert lines == [
        "nbdiff: 200.0 ms/step, 20,480 x_0 tokens/s, MFU 41.0%",
        "ar: 110.0 ms/step, 37,236 x_0 tokens/s, MFU -",
        "NBDiff / AR step time: 1.82x (ideal 2.0x)",
    ]
    loss_records = [
        {"fused_s": 0.0123, "reference_s": 0.02},
        {"fused_s": 0.011, "reference_s": 0.02},
    ]
    assert gpu_suite.figure_lines("loss-widths", loss_records) == [
        "real-rows-38177: fused 0.0123 s, reference 0.0200 s fwd+bwd",
        "padded-shard-38400: fused 0.0110 s, reference 0.0200 s fwd+bwd",
        "fused, whole padded shard / real rows only: 0.89x",
    ]


def test_train_check_compares_losses_and_gradient_norms() -> None:
    spec = importlib.util.spec_from_file_location(
        "gpu_train_check", REPO / "benchmarks" / "gpu_train_check.py"
    )
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    flex = [
        {"step": 1, "loss": 11.90, "grad_norm": 4.00},
        {"step": 2, "loss": 11.50, "grad_norm": 3.00},
    ]
    assert check._disagreements(flex, [dict(r) for r in flex], "bf16") == []
    # bf16: step 1's loss within 1e-2, later losses within 3e-2, gradient norms within 5e-2.
    close = [
        {"step": 1, "loss": 11.95, "grad_norm": 4.15},
        {"step": 2, "loss": 11.80, "grad_norm": 3.1},
    ]
    assert check._disagreements(flex, close, "bf16") == []
    # Same losses, but the gradient norm of step 1 is off by 10%: a wrong attention backward.
    wrong_grad = [{"step": 1, "loss": 11.90, "grad_norm": 4.40}, flex[1]]
    (problem,) = check._disagreements(flex, wrong_grad, "bf16")
    assert problem.startswith("step 1 grad_norm")
    assert check._disagreements(flex, flex[:1], "bf16") == ["step 2: missing from the second run"]
    assert len(check._disagreements(flex, close, "fp32")) == 4


def test_a_step_past_its_limit_is_killed_with_its_children() -> None:
    """A step that runs out of time ends as 124, and nothing it started keeps running (a compile
    worker left behind would hold the GPU and the CPUs the next step needs)."""
    import psutil

    sleeper = "import time; time.sleep(60)"
    parent = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    step = gpu_suite.Step("slow", [[sys.executable, "-c", parent]], limit_s=3)
    result = gpu_suite._run(step, step.limit_s, clean_env())
    assert result["returncode"] == 124 and not result["ok"]
    assert result["seconds"] < 30 and "timed out after 3 s" in result["output_tail"]
    child = int(result["output_tail"].split()[0])
    # SIGKILL takes effect when the process is next scheduled: on a busy machine, a moment later.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {child} still runs")
