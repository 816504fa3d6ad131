"""The closing line of a run: steps of this start vs the run's total, and a like-with-like loss."""

from __future__ import annotations

from nbdiff_megatron.training.reporting import closing_summary


def _records(steps: range, blocks: list[int], losses: list[float]) -> list[dict]:
    return [
        {"step": s, "block_size": b, "loss": x}
        for s, b, x in zip(steps, blocks, losses, strict=True)
    ]


def test_after_a_resume_the_summary_counts_this_start_and_the_total() -> None:
    history = _records(range(21, 31), [32] * 10, [2.0 - 0.1 * i for i in range(10)])
    text = closing_summary(history, final_step=30, total_steps=30)
    assert text.startswith("done: 10 steps this start (steps 21-30), 30/30")


def test_the_loss_change_compares_steps_at_the_same_block_size() -> None:
    # B = 1 (plain AR, a low loss) early, B = 32 (masked blocks, a higher loss) at the end.
    history = _records(range(1, 7), [1, 1, 2, 32, 32, 32], [1.0, 0.9, 3.0, 6.0, 5.5, 5.0])
    text = closing_summary(history, final_step=6, total_steps=6)
    assert "loss at B=32: 6.0000 (step 4) -> 5.0000 (step 6)" in text
    assert "1.0000" not in text  # the B = 1 loss is not compared with a B = 32 one
    single = closing_summary(history[:4], final_step=4, total_steps=6)
    assert single.endswith("loss 6.0000 at B=32") and "4/6" in single


def test_an_sft_run_reports_kept_truncated_and_dropped_conversations() -> None:
    from types import SimpleNamespace

    from nbdiff_megatron.data.sft import TOO_LONG, SFTStats
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.reporting import report_sft
    from tests.launch import REPO

    stats = SFTStats(conversations=120, used=7)
    for i in range(113):
        stats.skip(TOO_LONG, f"chat.jsonl:{i + 1}")
    lines: list[str] = []
    logger = SimpleNamespace(info=lines.append)
    cfg = load_config(REPO / "examples" / "tiny_cpu.yaml", ["--model.seq_length=48"])
    report_sft(logger, cfg, SimpleNamespace(stats=stats))
    text = "\n".join(lines)
    assert "conversations read: 120: kept 7 (truncated 0), dropped 113" in text
    assert f"dropped ({TOO_LONG}): 113" in text
    assert "--data.sft_overflow=truncate_turns" in text
    report_sft(logger, cfg, SimpleNamespace())  # pretraining data: nothing to report
