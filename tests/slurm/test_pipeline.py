"""slurm/pipeline.sh --dry-run: the dependent jobs of the whole recipe on the user's model, data, tokenizer
and per-phase overrides, every path checked first (no scheduler needed)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.launch import REPO

PIPELINE = str(REPO / "slurm" / "pipeline.sh")


def _tiny_paths(root: Path) -> None:
    """What the pipeline reads, as empty stand-ins: it checks that they exist, the jobs read them."""
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}")
    (root / "hf" / "tokenizer.json").write_text("{}")
    (root / "data").mkdir()
    for name in ("web_text_document", "long_text_document"):
        for suffix in (".bin", ".idx"):
            (root / "data" / (name + suffix)).write_bytes(b"")
    (root / "data" / "chat.jsonl").write_text("")


def _pipeline(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", PIPELINE, *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_dry_run_prints_the_chain_on_the_users_paths_and_overrides(tmp_path) -> None:
    _tiny_paths(tmp_path)
    proc = _pipeline(
        tmp_path,
        "--hf", "hf", "--root", "ckpt/run", "--data", "data/web_text_document",
        "--phase2-data", "0.7 data/long_text_document 0.3 data/web_text_document",
        "--sft-data", "data/chat.jsonl", "--phase1", "--train.steps=10 --parallel.dp=2",
        "--phase3", "--train.steps=3", "--all", "--logging.log_interval=1", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 5 and all(line.startswith("sbatch ") for line in out), out
    convert, p1, p2, p3, export = (shlex.split(line) for line in out)
    run, data = f"{tmp_path}/ckpt/run", f"{tmp_path}/data"
    assert f"--hf {tmp_path}/hf --out {run}/base-mcore --tp 4 " in convert[-1]  # phase 1's tp
    assert "--dependency=afterok:<job1:convert>" in p1
    launcher = p1.index(f"{REPO}/slurm/phase1_8k.sbatch")
    assert p1[launcher + 1 :] == [
        f"--checkpoint.load={run}/base-mcore",
        f"--model-config={run}/base-mcore/model.yaml",
        f"--data.data_path=[{data}/web_text_document]",
        f"--data.tokenizer_model={run}/base-mcore/tokenizer",
        "--checkpoint.finetune=true",
        f"--checkpoint.save={run}/phase1",
        f"--logging.tensorboard_dir={run}/phase1/tensorboard",
        "--logging.log_interval=1",  # --all, then the phase's own
        "--train.steps=10",
        "--parallel.dp=2",
    ]
    assert f"--data.data_path=[0.7 {data}/long_text_document 0.3 {data}/web_text_document]" in p2
    assert f"NBDIFF_AFTER={run}/phase1" in " ".join(p2) and "--train.steps=10" not in p2
    assert f"--data.sft_data_path=[{data}/chat.jsonl]" in p3 and p3[-1] == "--train.steps=3"
    assert "--dependency=afterok:<job4:phase3>" in export
    assert f"test -f {run}/phase3_sft/COMPLETE" in export[-1]
    assert all("--open-mode=append" in line for line in out)


def test_every_missing_path_is_named_before_anything_is_submitted(tmp_path) -> None:
    _tiny_paths(tmp_path)
    proc = _pipeline(
        tmp_path,
        "--hf", "/nonexistent", "--root", "ckpt", "--data", "0.5 data/none 0.5 data/web_text_document",
        "--sft-data", "data/chat.jsonl data/gone.jsonl", "--tokenizer", "tok", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr
    assert "nothing submitted" in err and "--hf: no HF model (config.json): /nonexistent" in err
    assert f"--data: no indexed dataset (.bin): {tmp_path}/data/none.bin" in err
    assert "web_text_document" not in err  # what exists is not listed
    assert f"--sft-data: no such file: {tmp_path}/data/gone.jsonl" in err
    assert f"--tokenizer: no such file or folder: {tmp_path}/tok" in err


def test_missing_options_are_named() -> None:
    proc = subprocess.run(["bash", PIPELINE, "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--hf --root --data --sft-data required" in proc.stderr
    proc = subprocess.run(["bash", PIPELINE, "--data"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--data needs a value" in proc.stderr
