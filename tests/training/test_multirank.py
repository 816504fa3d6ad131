"""2 ranks under torchrun (gloo): DP=2, TP=2, PP=2, CP=2 through the CLI; TP/PP/CP match 1 rank;
resharded resume.

TP=2 starts from the 1-rank weights by construction (megatron initialises full weights, then splits them),
CP=2 too (its ranks hold whole replicas, seeded alike);
PP=2 does not (each stage draws its own layers), so the PP comparison starts both runs from a 1-rank
checkpoint loaded with --checkpoint.finetune=true (weights only, resharded to the PP layout).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from nbdiff_megatron.training.logging import read_metrics

from .runs import run_cli, train_in_process

pytestmark = pytest.mark.multirank

# Fixed B = 2 (both loss terms live), λ = 0.5.
COMPARE = ["--curriculum.start_block_size=2", "--curriculum.target_block_size=2"]


@pytest.fixture(scope="module")
def start_point(corpus_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-rank checkpoint after 2 steps: the common starting weights."""
    save = tmp_path_factory.mktemp("start") / "run"
    train_in_process(corpus_prefix, *COMPARE, "--train.steps=2", f"--checkpoint.save={save}")
    return str(save)


@pytest.fixture(scope="module")
def from_scratch(corpus_prefix: str) -> list[dict]:
    """The 1-rank reference from the initial weights: 9 steps."""
    return train_in_process(corpus_prefix, *COMPARE, "--train.steps=9").history


ONE_RANK_PARAMS: list[int] = []


@pytest.fixture(scope="module")
def one_rank(corpus_prefix: str, start_point: str, tmp_path_factory: pytest.TempPathFactory):
    """The 1-rank reference: 3 steps from the start point (its parameter count in ONE_RANK_PARAMS)."""
    save = tmp_path_factory.mktemp("one") / "run"
    result = train_in_process(
        corpus_prefix,
        *COMPARE,
        "--train.steps=3",
        f"--checkpoint.save={save}",
        f"--checkpoint.load={start_point}",
        "--checkpoint.finetune=true",
    )
    ONE_RANK_PARAMS[:] = [result.num_params]
    return result.history


def _assert_match(records: list[dict], reference: list[dict], what: str) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference[: len(records)]]
    for mine, ref in zip(records, reference):
        for key in ("loss", "mdm", "ar"):
            assert mine[key] == pytest.approx(ref[key], abs=1e-5), (what, mine["step"], key)
        # The gradient norm of another layout's fp32 sums: seen within 1.2e-7 relative. (It was 1e-4,
        # and 7.4e-5 was seen: the CPU norm was fp32 torch.norm, low by an amount that depends on how
        # long each gradient shard is; megatron_compat.multi_tensor_l2_norm_float64.)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6), (what, mine["step"])


def _two_ranks(
    prefix: str,
    tmp_path: Path,
    layout: str,
    *extra: str,
    nproc: int = 2,
    env: dict[str, str] | None = None,
) -> tuple[Path, list[dict], str]:
    """`nbdiff train` on 2 ranks (or nproc; torchrun, gloo); checks the announced layout.

    Returns the save directory, the metrics records and the console output.
    """
    name = layout.replace(" ", "")
    save = tmp_path / name
    launched = run_cli(
        prefix,
        *COMPARE,
        *extra,
        f"--checkpoint.save={save}",
        log=tmp_path / f"{name}.log",
        nproc=nproc,
        env=env,
    )
    assert f"layout: {layout} = {nproc} processes" in launched.output()
    return save, read_metrics(save / "metrics.jsonl"), launched.output()


def _assert_learns(records: list[dict]) -> None:
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2


def test_tp2_trains_like_one_rank_and_resumes_on_one_rank(
    corpus_prefix: str, from_scratch: list[dict], tmp_path: Path
) -> None:
    layout = "tp 2 x pp 1 x cp 1 x dp 1"
    # fully_reshardable: the distributed optimizer's state resumes at another TP (docs/checkpoints.md).
    save, records, _ = _two_ranks(
        corpus_prefix,
        tmp_path,
        layout,
        "--parallel.tp=2",
        "--train.steps=8",
        "--checkpoint.optimizer_sharding=fully_reshardable",
    )
    # megatron initialises the full weights then splits them: TP=2 starts from the 1-rank weights.
    _assert_match(records, from_scratch, "tp=2")
    _assert_learns(records)
    # The TP=2 checkpoint (model + optimizer, resharded) resumes on 1 rank: step 9 matches.
    resumed = train_in_process(
        corpus_prefix, *COMPARE, "--train.steps=9", f"--checkpoint.load={save}"
    )
    assert [r["step"] for r in resumed.history] == [9]
    _assert_match(resumed.history, from_scratch[8:], "tp=2 -> 1 rank")


def test_pp2_matches_one_rank(
    corpus_prefix: str, start_point: str, one_rank: list[dict], tmp_path: Path
) -> None:
    _, records, output = _two_ranks(
        corpus_prefix,
        tmp_path,
        "tp 1 x pp 2 x cp 1 x dp 1",
        "--parallel.pp=2",
        "--train.steps=3",
        f"--checkpoint.load={start_point}",
        "--checkpoint.finetune=true",
    )
    _assert_match(records, one_rank, "pp=2")
    # The same model counts the same parameters at PP=2 as at PP=1 (tied embeddings counted once).
    counted = re.search(r"M parameters \(([\d,]+);", output)
    assert counted, output
    assert int(counted.group(1).replace(",", "")) == ONE_RANK_PARAMS[0]


def test_cp2_trains_like_one_rank(
    corpus_prefix: str, from_scratch: list[dict], tmp_path: Path
) -> None:
    # Packed documents (some samples cross a document end), token shift, B = 2 over L = 32: the
    # zigzag chunks of 8 tokens cut through blocks and documents.
    layout = "tp 1 x pp 1 x cp 2 x dp 1"
    _, records, _ = _two_ranks(
        corpus_prefix, tmp_path, layout, "--parallel.cp=2", "--train.steps=3"
    )
    _assert_match(records, from_scratch, "cp=2")


def test_data_parallel_two_ranks_learns(corpus_prefix: str, tmp_path: Path) -> None:
    layout = "tp 1 x pp 1 x cp 1 x dp 2"
    _, records, _ = _two_ranks(
        corpus_prefix, tmp_path, layout, "--parallel.dp=2", "--train.steps=8"
    )
    assert len(records) == 8
    _assert_learns(records)


def test_tp2_sequence_parallel_matches_one_rank(
    corpus_prefix: str, from_scratch: list[dict], tmp_path: Path
) -> None:
    # Sequence parallelism reaches megatron-core (activations sharded along 2L), with the fused
    # vocab-parallel loss gathering the hidden rows: the same losses and gradient norms as 1 rank.
    # With megatron-core's deprecation notices shown: no layer of ours runs without its TP group
    # (test_tp_group.py checks 1 rank, and that the notice is not filtered).
    layout = "tp 2 x pp 1 x cp 1 x dp 1"
    _, records, output = _two_ranks(
        corpus_prefix,
        tmp_path,
        layout,
        "--parallel.tp=2",
        "--parallel.sequence_parallel=true",
        "--train.steps=3",
        env={"NBDIFF_SHOW_DEPRECATIONS": "1"},
    )
    _assert_match(records, from_scratch, "tp=2 + sp")
    assert "Passing tp_group will be mandatory soon" not in output, output[-4000:]


def test_tp2_cp2_sequence_parallel_four_ranks_match_one_rank(
    corpus_prefix: str, from_scratch: list[dict], tmp_path: Path
) -> None:
    # The production layout of the 32K phase at toy size: SP shards each CP rank's zigzag rows over
    # TP, the attention runs the CP path, the fused loss gathers the SP rows of its CP chunk.
    layout = "tp 2 x pp 1 x cp 2 x dp 1"
    _, records, output = _two_ranks(
        corpus_prefix,
        tmp_path,
        layout,
        "--parallel.tp=2",
        "--parallel.cp=2",
        "--parallel.sequence_parallel=true",
        "--train.steps=3",
        nproc=4,
    )
    _assert_match(records, from_scratch, "tp=2 x cp=2 + sp")
    # Quiet on every rank: torch's renamed-collective notices (megatron-core's calls) and
    # megatron-core's CUDA_DEVICE_MAX_CONNECTIONS advice, meaningless on a CPU, are dropped.
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in output, output[-4000:]
    assert "` is deprecated. Please use `torch.distributed." not in output, output[-4000:]


def test_a_user_error_is_printed_once_under_torchrun(corpus_prefix: str, tmp_path: Path) -> None:
    launched = run_cli(
        corpus_prefix, "--parallel.dp=1", log=tmp_path / "bad.log", nproc=2, expect=None
    )
    out = launched.output()
    assert launched.code != 0
    # Both ranks fail alike; only rank 0 says why (the others exit with the same code, quietly).
    assert out.count("parallel.dp=1 but 2 processes") == 1, out
