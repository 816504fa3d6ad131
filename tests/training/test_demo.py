"""`nbdiff demo` end to end, shortened (a few steps per phase, a slice of the corpus)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nbdiff_megatron import demo


def test_demo_runs_and_says_where_everything_is(tmp_path: Path, capsys) -> None:
    args = argparse.Namespace(
        out=str(tmp_path / "demo"),
        ar_steps=6,
        nbdiff_steps=8,
        prompt=demo.DEFAULT_PROMPT,
        max_new_tokens=8,
        threshold=0.9,
        max_documents=20,
        # The demo's own model is larger; the mechanics are the same with the tests' tiny one.
        overrides=["--model.num_layers=2", "--model.hidden_size=64", "--model.ffn_hidden_size=256"],
    )
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    for heading in (
        "[1/5]",
        "[2/5] AR pre-training",
        "[3/5] NBDiff adaptation",
        "[4/5] Decoding",
        "[5/5] Pictures",
        "Done in",
    ):
        assert heading in out
    assert "tokens/forward" in out
    root = tmp_path / "demo"
    for png in ("loss_curves.png", "curriculum.png"):
        assert (root / png).stat().st_size > 10_000
        assert str(root / png) in out
    assert (root / "ar" / "iter_0000006").is_dir() and (root / "nbdiff" / "iter_0000008").is_dir()
