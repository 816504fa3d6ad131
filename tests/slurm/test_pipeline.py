"""slurm/pipeline.sh --dry-run: the dependent jobs of the whole recipe (no scheduler needed)."""

from __future__ import annotations

import subprocess

from tests.launch import REPO

PIPELINE = str(REPO / "slurm" / "pipeline.sh")


def test_dry_run_prints_the_chain_of_dependent_jobs(tmp_path) -> None:
    out = subprocess.run(
        ["bash", PIPELINE, "--hf", "/m/base", "--root", "/c/run", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 5 and all(line.startswith("sbatch ") for line in out), out
    convert, p1, p2, p3, export = out
    assert "hf-to-mcore --hf /m/base --out /c/run/base-mcore" in convert
    assert "afterok:<job1:convert>" in p1 and "--checkpoint.load=/c/run/base-mcore" in p1
    assert "afterok:<job2:phase1>" in p2 and "NBDIFF_AFTER=/c/run/phase1" in p2
    assert "--checkpoint.load=/c/run/phase1 --checkpoint.finetune=true" in p2
    assert "--checkpoint.save=/c/run/phase2" in p2 and "phase2_32k.sbatch" in p2
    assert "afterok:<job4:phase3>" in export and "test -f /c/run/phase3_sft/COMPLETE" in export
    assert all("--open-mode=append" in line for line in out)


def test_missing_options_are_named() -> None:
    proc = subprocess.run(["bash", PIPELINE, "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--hf and --root are required" in proc.stderr
