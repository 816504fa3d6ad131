"""`nbdiff demo` end to end, shortened (a few steps per phase, a slice of the corpus)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from nbdiff_megatron import demo
from nbdiff_megatron.cli import main
from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.tokenizer import load_tokenizer
from tests.launch import REPO

README = REPO / "README.md"


def test_same_tokens_counts_equal_positions() -> None:
    assert demo.same_tokens([1, 2, 3, 4], [1, 9, 3, 4]) == 3
    assert demo.same_tokens([1, 2], [1, 2, 3]) == 2
    assert demo.same_tokens([], [1]) == 0


def test_verse_prompts_are_openings_of_the_training_text() -> None:
    prompts = demo.verse_prompts(2, 5)
    assert len(prompts) == 5 and len(set(prompts)) == 5
    for prompt in prompts:
        number, *words = prompt.split()
        assert number.isdigit() and len(words) == 6


def test_source_continuation_is_the_training_text() -> None:
    tok = load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_path())
    ids = demo.source_continuation(demo.DEFAULT_PROMPT, 1, tok, 6)
    assert len(ids) == 6
    assert tok.decode(ids).startswith(" the heavens and the earth")
    assert demo.source_continuation("not a phrase of Genesis 1 at all", 1, tok, 6) == []


def test_demo_runs_and_says_where_everything_is(tmp_path: Path, capsys, monkeypatch) -> None:
    args = argparse.Namespace(
        out=str(tmp_path / "demo"),
        ar_steps=6,
        nbdiff_steps=8,
        prompt=demo.DEFAULT_PROMPT,
        max_new_tokens=8,
        threshold=0.9,
        max_documents=2,
        # The demo's own model is larger; the mechanics are the same with the tests' tiny one.
        overrides=["--model.num_layers=2", "--model.hidden_size=64", "--model.ffn_hidden_size=256"],
    )
    assert demo.run(args) == 0
    out = re.sub(r"\033\[[0-9;]*m", "", capsys.readouterr().out)
    prose = " ".join(out.split())  # notes are wrapped at any space
    for heading in (
        "[1/5]",
        "[2/5] AR pre-training",
        "[3/5] NBDiff adaptation",
        "[4/5] Decoding",
        "[5/5] Pictures",
        "Done in",
    ):
        assert heading in out
    assert "learn by heart" in prose and "not generalisation" in prose

    # Every decoding reports tokens, forwards and TPF, and TPF is their ratio (batch of one).
    costs = re.findall(r"(\d+) tokens in (\d+) forward passes = ([0-9.]+) tokens/forward", out)
    assert len(costs) == 2  # block decoding at the headline threshold, then AR
    for tokens, forwards, tpf in costs:
        assert 1 <= int(tokens) <= 8
        assert abs(float(tpf) - int(tokens) / int(forwards)) <= 0.005 + 1e-9
    ar_tokens, ar_forwards, _ = costs[1]
    assert ar_forwards == ar_tokens  # next-token decoding: one forward per token

    # The sweep table: one row per threshold (0.9 first) for this prompt and for all prompts, the
    # agreement with AR within 0..N.
    assert f"all {1 + demo.MORE_PROMPTS} prompts" in out
    rows = re.findall(
        r"threshold ([0-9.]+)\s+(\d+)\s+([0-9.]+)\s+(\d+)/(\d+)\s+([0-9.]+)\s+(\d+)/(\d+)", out
    )
    assert [float(r[0]) for r in rows] == [0.9, 0.7, 0.5]
    for _, forwards, tpf, same, total, all_tpf, all_same, all_total in rows:
        assert int(total) == int(ar_tokens) and 0 <= int(same) <= int(total)
        assert int(forwards) >= 1 and float(tpf) > 0 and float(all_tpf) > 0
        assert int(total) < int(all_total) and 0 <= int(all_same) <= int(all_total)
    ar_row = re.search(r"AR \(next-token\)\s+(\d+)\s+1\.00\s+-\s+1\.00\s+-", out)
    assert ar_row is not None and ar_row.group(1) == ar_forwards
    assert rows[0][1] == costs[0][1]  # the headline run is the table's first row
    measured = re.search(r"Measured: (\d+)/(\d+) of the block decoder's tokens equal AR", prose)
    assert measured is not None and measured.group(1) == rows[0][3]
    assert re.search(r"AR reproduces \d+/\d+ tokens of the training text", prose)

    root = tmp_path / "demo"
    for png in ("loss_curves.png", "curriculum.png"):
        assert (root / png).stat().st_size > 10_000
        assert str(root / png) in out
    assert (root / "ar" / "iter_0000006").is_dir() and (root / "nbdiff" / "iter_0000008").is_dir()
    for name in ("AR model", "NBDiff model", "decoding", "decode more", "train more"):
        assert re.search(rf"^  {name}\s", out, re.MULTILINE), name

    # The README quotes these closing lines (its paths and step counts are the default run's).
    quoted = re.search(r"<!-- demo-output -->\n```text\n(.*?)\n```", README.read_text(), re.S)
    for line in quoted.group(1).splitlines():
        pattern = re.escape(line).replace(re.escape("/…/runs/demo"), re.escape(str(root)))
        pattern = re.sub(r"\d+", r"\\d+", pattern)
        assert re.search(f"^{pattern}$", out, re.MULTILINE), line

    # "train more" runs as printed, from another directory, and continues the demo's run: same save
    # directory, the block size the demo reached (not tiny_cpu.yaml's growth schedule).
    command = re.search(r"^  train more\s+(.*)$", out, re.MULTILINE).group(1)
    words = shlex.split(command)
    assert words[:2] == ["nbdiff", "train"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(words[1:]) == 0
    more = capsys.readouterr().out
    assert "continu" in more and "checkpoint.save is unset" not in more
    assert (root / "nbdiff" / "iter_0000016").is_dir()
    steps = [
        json.loads(line) for line in (root / "nbdiff" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1]["step"] == 16 and {r["block_size"] for r in steps if r["step"] > 8} == {8}
