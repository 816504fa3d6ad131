"""Helpers of the training tests: a small slice of the bundled corpus, a tiny config, launchers.

Single-process runs go through `train()` in the test process (megatron-core is imported once); runs that
are killed or signalled, and multi-rank runs (torchrun, gloo), are subprocesses of the `nbdiff train` CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch import DIST_VARS, REPO, clean_env, torchrun_command

PYTHON = sys.executable
TINY = str(REPO / "examples" / "tiny_cpu.yaml")

# A tiny run: 2 layers, hidden 64, L = 32, global batch 8 in 2 micro-batches of 4 (1 per DP rank at dp 2).
BASE_OVERRIDES = [
    "--model.num_layers=2",
    "--model.hidden_size=64",
    "--model.ffn_hidden_size=256",
    "--model.seq_length=32",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=4",
    "--train.precision=fp32",
    "--schedule.warmup_steps=0",
    "--schedule.decay_steps=0",
    "--optimizer.lr=3e-3",
    "--logging.log_interval=1",
    "--logging.progress_bar=false",
    "--loss.validate=true",  # the loss's spec checks run in every test step
]


def tiny_overrides(prefix: str, *extra: str) -> list[str]:
    """Overrides of examples/tiny_cpu.yaml for a test run on `prefix`."""
    return [f"--data.data_path=[{prefix}]", *BASE_OVERRIDES, *extra]


def train_in_process(prefix: str, *extra: str, objective: str = "nbdiff"):
    """Run `train()` here with the tiny config; returns the TrainResult (tears the group down)."""
    from nbdiff_megatron.model.parallel import destroy_parallel
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.loop import train

    for name in DIST_VARS:
        os.environ.pop(name, None)
    cfg = load_config(TINY, tiny_overrides(prefix, *extra))
    try:
        return train(cfg, objective=objective)
    finally:
        destroy_parallel()
        for name in DIST_VARS:
            os.environ.pop(name, None)


def plain_causal_loss(prefix: str, *extra: str) -> float:
    """Next-token CE of the tiny run's initial model on its first global batch, computed directly:
    a causal forward on x_0 (`ar_forward`) and a masked mean CE (targets in the loss mask and in the
    same document as their predecessor), outside the training loop."""
    import torch
    import torch.nn.functional as F

    from nbdiff_megatron.data.datasets import build_datasets
    from nbdiff_megatron.data.tokenizer import load_tokenizer
    from nbdiff_megatron.model.builder import ar_forward, build_model
    from nbdiff_megatron.model.parallel import destroy_parallel, initialize_parallel
    from nbdiff_megatron.training.config import load_config

    cfg = load_config(TINY, tiny_overrides(prefix, *extra))
    tokenizer = load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    model_cfg = cfg.model.__class__(**{**cfg.model.to_dict(), "vocab_size": tokenizer.vocab_size})
    initialize_parallel(1, 1, 1, seed=cfg.train.seed)
    try:
        model = build_model(model_cfg, block_size=1, seed=cfg.train.seed)
        train_set = build_datasets(
            cfg.data,
            cfg.seq_length(),
            tokenizer,
            (cfg.train.steps * cfg.train.global_batch_size, None, None),
            seed=cfg.data.seed,
        )[0]
        samples = [train_set[i] for i in range(cfg.train.global_batch_size)]
        x0 = torch.stack([s["tokens"] for s in samples])
        doc_ids = torch.stack([s["doc_ids"] for s in samples])
        loss_mask = torch.stack([s["loss_mask"] for s in samples])
        with torch.no_grad():
            logits = ar_forward(model, x0, doc_ids=doc_ids)
        targets_ok = loss_mask[:, 1:] & (doc_ids[:, 1:] == doc_ids[:, :-1])
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x0[:, 1:].reshape(-1), reduction="none"
        ).view_as(targets_ok)
        return float((ce * targets_ok).sum() / targets_ok.sum())
    finally:
        destroy_parallel()


def cli_command(prefix: str, *extra: str, nproc: int = 1) -> list[str]:
    """`nbdiff train` (under torchrun when nproc > 1) with the tiny config."""
    args = ["-m", "nbdiff_megatron.cli", "train", "--config", TINY, *tiny_overrides(prefix, *extra)]
    if nproc == 1:
        return [PYTHON, *args]
    return torchrun_command(args, nproc=nproc)


class Launched:
    """A CLI run in its own session, output in a file, so that a killed run leaves nothing behind."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            env=clean_env({"PYTHONUNBUFFERED": "1", **(env or {})}),
            start_new_session=True,
        )

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of a killed run (writer forks)
        except (ProcessLookupError, PermissionError):
            pass
        self._file.close()

    def output(self) -> str:
        return self.log.read_text()


def run_cli(
    prefix: str,
    *extra: str,
    log: Path,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    expect: int | None = 0,
    timeout: float = 240,
) -> Launched:
    """Run the CLI to completion; assert its exit code (unless expect is None)."""
    launched = Launched(cli_command(prefix, *extra, nproc=nproc), log, env)
    code = launched.wait(timeout)
    if expect is not None:
        assert code == expect, f"exit code {code}, expected {expect}:\n{launched.output()[-4000:]}"
    launched.code = code  # type: ignore[attr-defined]
    return launched


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
