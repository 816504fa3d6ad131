"""benchmarks/gpu_suite.py --dry-run: every step of the GPU suite is valid on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.launch import REPO, clean_env


def test_gpu_suite_dry_run_validates_every_step(tmp_path):
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
    assert names == ["pytest-gpu", "train-300m", "plan-300m", "attention", "loss", "train-step"]
    plan = next(s for s in results["steps"] if s["step"] == "plan-300m")
    assert "verdict:" in plan["output_tail"]
