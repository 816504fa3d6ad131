"""benchmarks/train_step.py --objective both: NBDiff and AR steps of the same tiny model in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO, clean_env

from .runs import TINY, tiny_overrides


def test_train_step_benchmark_times_nbdiff_and_ar_in_one_run(
    corpus_prefix: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.jsonl"
    overrides = tiny_overrides(corpus_prefix)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_step.py"),
            "--objective",
            "both",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--json",
            str(out),
            *overrides,
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    nbdiff, ar = record["results"]["nbdiff"], record["results"]["ar"]
    assert nbdiff["timed_steps"] == ar["timed_steps"] == 2
    assert record["ratio_nbdiff_over_ar"] == pytest.approx(
        nbdiff["step_time_s"] / ar["step_time_s"]
    )
    # Same x_0 tokens per step for both objectives: tokens/s differ only by the step time.
    assert nbdiff["tokens_per_s"] * nbdiff["step_time_s"] == pytest.approx(8 * 32)
    assert ar["tokens_per_s"] * ar["step_time_s"] == pytest.approx(8 * 32)
    assert record["peak_tflops"] is None and nbdiff["mfu"] is None  # CPU: no MFU

    # The FLOPs are `nbdiff plan`'s for the model that ran (vocabulary from the tokenizer).
    import dataclasses

    from nbdiff_megatron.data.tokenizer import load_tokenizer
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.plan import step_flops

    cfg = load_config(TINY, overrides)
    vocab = load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    assert (nbdiff["model_flops_per_step"], ar["model_flops_per_step"]) == step_flops(cfg)
    # Both objectives trained (from the same initial weights, on the same x_0 batches).
    assert ar["first_loss"] > 0 and nbdiff["first_loss"] > 0
    assert "NBDiff / AR step time:" in proc.stdout
    assert "AR objective: causal forward on L" in proc.stdout
