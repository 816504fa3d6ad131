"""`nbdiff ablate` at a small budget: its outputs, and that every variant trained with the mask and
losses it names (read back from its metrics.jsonl)."""

from __future__ import annotations

import json
import subprocess
import sys

from nbdiff_megatron.training.logging import read_metrics
from tests.launch import REPO, clean_env

TINY = [
    "--model.num_layers=2",
    "--model.hidden_size=64",
    "--model.ffn_hidden_size=128",
    "--model.seq_length=32",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--logging.progress_bar=false",
]


def test_ablate_runs_every_variant_and_records_what_it_trained(tmp_path):
    out = tmp_path / "ablate"
    cmd = [
        sys.executable,
        "-m",
        "nbdiff_megatron.cli",
        "ablate",
        f"--out={out}",
        "--steps=8",
        "--ar-steps=6",
        "--documents=30",
        "--eval-samples=8",
        "--eval-prompts=2",
        "--max-new-tokens=8",
        "--prompt-tokens=8",
        *TINY,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| nbdiff | context_causal |" in proc.stdout  # the printed table
    results = json.loads((out / "results.json").read_text())
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(results["variants"]) == ["annealed", "plain", "ar", "nbdiff", "block_causal"]
    assert results["steps"] == 8 and results["tokens_per_variant"] == 8 * 8 * 32
    for entry in [results["ar_start"], *results["variants"].values()]:
        ev = entry["eval"]
        assert ev["heldout_mdm"] > 0 and ev["heldout_ar"] > 0 and ev["tokens_per_forward"] > 0
    for entry in results["variants"].values():
        assert 0.0 <= entry["eval"]["agreement_with_ar"] <= 1.0

    def metrics(name):
        records = read_metrics(out / name / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, 9))
        return records

    expected = {  # mask, AR loss on, block sizes
        "annealed": ("annealed", False, [8] * 8),
        "plain": ("context_causal", False, [8] * 8),
        "ar": ("context_causal", True, [8] * 8),
        "nbdiff": ("context_causal", True, [1, 2, 4, 8, 8, 8, 8, 8]),
        "block_causal": ("block_causal", False, [8] * 8),
    }
    for name, (kind, ar_loss, sizes) in expected.items():
        records = metrics(name)
        assert {r["mask_kind"] for r in records} == {kind}, name
        assert all((r["ar_weight"] > 0) == ar_loss for r in records), name
        assert [r["block_size"] for r in records] == sizes, name
        if not ar_loss:  # λ = 0: the total is the diffusion loss alone
            assert all(abs(r["loss"] - r["mdm"]) < 1e-5 for r in records), name
    progress = [r["anneal_progress"] for r in metrics("annealed")]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    assert all(r["anneal_progress"] is None for r in metrics("plain"))
