"""Run integrity on resume (issue 23, docs/resume.md): what a resumed start may change, falling back from
damaged checkpoints, going back to an older checkpoint explicitly, stale unfinished saves.

One trained run (4 steps, checkpoints iter_2 and iter_4) is made once per module; each test works on a
copy of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nbdiff_megatron.errors import CheckpointError
from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.run_identity import check_resume

from .runs import train_in_process

SHORT = ["--checkpoint.save_interval=2", "--checkpoint.keep_last=3"]


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under a directory: equal means nothing was written."""
    return {
        str(f.relative_to(directory)): (f.stat().st_ino, f.stat().st_mtime_ns)
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def trained(corpus_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    save = tmp_path_factory.mktemp("integrity") / "run"
    result = train_in_process(corpus_prefix, *SHORT, "--train.steps=4", f"--checkpoint.save={save}")
    assert result.final_step == 4
    return save


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _continue(prefix: str, save: Path, *extra: str, steps: int = 5):
    return train_in_process(
        prefix, *SHORT, f"--train.steps={steps}", f"--checkpoint.save={save}", *extra
    )


# ------------------------------------------------------------------ §1 the checkpoint states the run


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["--model.vocab_size=8192"], ["model.vocab_size 4096 -> 8192"]),
        (
            ["--model.num_attention_heads=8", "--model.num_query_groups=4"],
            ["model.num_attention_heads 4 -> 8", "model.num_query_groups 2 -> 4"],
        ),
    ],
)
def test_a_model_change_on_resume_is_refused_before_anything_is_written(
    corpus_prefix: str, run_copy: Path, overrides: list[str], named: list[str]
) -> None:
    before = _files(run_copy)
    with pytest.raises(CheckpointError) as caught:
        _continue(corpus_prefix, run_copy, *overrides)
    message = str(caught.value)
    for text in named:
        assert text in message
    # The command that works: the run's own values.
    assert "--model.vocab_size=4096" in message or "--model.num_attention_heads=4" in message
    assert _files(run_copy) == before  # no config.yaml, runs.jsonl, metrics or checkpoint written


def test_a_sequence_length_change_is_refused_and_the_advised_new_run_works(
    corpus_prefix: str, run_copy: Path, tmp_path: Path
) -> None:
    before = _files(run_copy)
    with pytest.raises(CheckpointError) as caught:
        _continue(corpus_prefix, run_copy, "--model.seq_length=16")
    message = str(caught.value)
    assert "model.seq_length 32 -> 16" in message and "--model.seq_length=32" in message
    assert _files(run_copy) == before
    advice = f"--checkpoint.load={run_copy / 'iter_0000004'} --checkpoint.finetune=true"
    assert advice in message
    # Following the advice: a new save directory, these weights, the data afresh.
    new = tmp_path / "short"
    result = train_in_process(
        corpus_prefix,
        *SHORT,
        "--train.steps=1",
        "--model.seq_length=16",
        f"--checkpoint.save={new}",
        f"--checkpoint.load={run_copy / 'iter_0000004'}",
        "--checkpoint.finetune=true",
    )
    assert [r["step"] for r in result.history] == [1]


def test_safe_changes_continue_and_are_listed(
    corpus_prefix: str, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A micro-batch size that does not divide the saved data position (32 samples) was refused with
    advice that did nothing; the position counts samples, so any micro-batch size resumes exactly."""
    result = _continue(
        corpus_prefix,
        run_copy,
        "--train.micro_batch_size=6",
        "--train.global_batch_size=12",
        "--optimizer.lr=1e-3",
    )
    assert [r["step"] for r in result.history] == [5]
    out = capsys.readouterr().out
    assert "changed since" in out
    for text in ("train.micro_batch_size 4 -> 6", "train.global_batch_size 8 -> 12", "lr 0.003"):
        assert text in out
    info = checkpointing.read_checkpoint_info(run_copy / "iter_0000005")
    assert info["consumed_samples"] == 4 * 8 + 12
    assert info["run"]["tokenizer"]["vocab_hash"]  # the checkpoint states its tokenizer


def test_tokenizer_and_old_checkpoints_are_compared_on_what_they_hold(trained: Path) -> None:
    info = checkpointing.read_checkpoint_info(trained / "iter_0000004")
    identity, config = info["run"], info["config"]
    assert check_resume(info, identity, config, checkpoint="c", weights_only=False) == []
    other_vocab = {**identity, "tokenizer": {**identity["tokenizer"], "vocab_hash": "0" * 16}}
    with pytest.raises(CheckpointError, match="vocab_hash"):
        check_resume(info, other_vocab, config, checkpoint="c", weights_only=False)
    other_mask = {**identity, "tokenizer": {**identity["tokenizer"], "mask_id": 7}}
    with pytest.raises(CheckpointError, match="mask_id"):
        check_resume(info, other_mask, config, checkpoint="c", weights_only=True)
    # A checkpoint from before `run` existed: its saved config still says the head split.
    old = {k: v for k, v in info.items() if k != "run"}
    split = {**identity, "model": {**identity["model"], "num_query_groups": 4}}
    with pytest.raises(CheckpointError, match="num_query_groups 2 -> 4"):
        check_resume(old, split, config, checkpoint="c", weights_only=False)
    # A data change matters to a full resume, not to a fine-tune (the data starts afresh).
    shifted = {**identity, "data": {**identity["data"], "seed": 99}}
    with pytest.raises(CheckpointError, match="data.seed"):
        check_resume(info, shifted, config, checkpoint="c", weights_only=False)
    assert check_resume(info, shifted, config, checkpoint="c", weights_only=True) == []


# ------------------------------------------------------------------------- §3 fall back, never strand


def _truncate(path: Path, keep: int = 16) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _largest_shard(ckpt: Path) -> Path:
    return max((f for f in ckpt.glob("*.distcp")), key=lambda f: f.stat().st_size)


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_loaded(
    corpus_prefix: str, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _truncate(_largest_shard(run_copy / "iter_0000004"))
    result = _continue(corpus_prefix, run_copy, steps=5)
    assert [r["step"] for r in result.history] == [3, 4, 5]  # from iter_2
    out = capsys.readouterr().out
    assert "WARNING" in out and "truncated" in out
    assert (run_copy / checkpointing.CORRUPT_DIR / "iter_0000004").is_dir()  # kept, not deleted
    assert [s for s, _ in checkpointing.list_checkpoints(run_copy)] == [2, 4, 5]


def test_a_truncated_common_state_is_named_as_damage_not_as_converted_weights(
    trained: Path, tmp_path: Path
) -> None:
    save = tmp_path / "run"
    shutil.copytree(trained, save)
    common = save / "iter_0000004" / "common.pt"
    if not common.is_file():
        pytest.skip("this megatron-core keeps the common state in the shards (tested above)")
    _truncate(common)
    notes = checkpointing.prepare_save_dir(save, None)
    assert any("common state" in n for n in notes)
    assert (save / checkpointing.CORRUPT_DIR / "iter_0000004").is_dir()
    assert checkpointing.plan_start(str(save), None, False).path == save / "iter_0000002"
    # With nothing intact to fall back to: the damage, never "converted weights? use finetune".
    only = tmp_path / "only"
    only.mkdir()
    shutil.copytree(save / checkpointing.CORRUPT_DIR / "iter_0000004", only / "iter_0000004")
    with pytest.raises(CheckpointError) as caught:
        checkpointing.prepare_save_dir(only, None)
    assert "common state" in str(caught.value) and "converted" not in str(caught.value)
    with pytest.raises(CheckpointError) as caught:
        checkpointing.plan_start(str(only), None, False)
    assert "converted" not in str(caught.value) and "finetune" not in str(caught.value)


def test_an_own_older_checkpoint_is_selected_explicitly_once(
    corpus_prefix: str, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = run_copy / ".tmp_iter_0000009"
    stale.mkdir()
    (stale / "shard").write_bytes(b"x" * 1024)
    older = f"--checkpoint.load={run_copy / 'iter_0000002'}"
    result = _continue(corpus_prefix, run_copy, older, steps=5)
    assert [r["step"] for r in result.history] == [3, 4, 5]
    out = capsys.readouterr().out
    assert "superseded" in out and "iter_0000004" in out
    assert (run_copy / checkpointing.SUPERSEDED_DIR / "iter_0000004").is_dir()
    assert not stale.exists()  # the unfinished save of an earlier start is gone
    # A requeue of the very same command goes on from what this start wrote, not back to iter_2.
    again = _continue(corpus_prefix, run_copy, older, steps=6)
    assert [r["step"] for r in again.history] == [6]
    assert [s for s, _ in checkpointing.list_checkpoints(run_copy)] == [4, 5, 6]
