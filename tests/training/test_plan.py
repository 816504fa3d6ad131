"""`nbdiff plan`: the memory model against measured peaks, the verdicts, the example headers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nbdiff_megatron.cli import main
from nbdiff_megatron.training import plan
from nbdiff_megatron.training.config import load_config
from tests.launch import REPO, clean_env

from .plan_peak_check import PEAK_MODEL

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _peak_config(length: int, fused: bool):
    overrides = [f"--model.{key}={value}" for key, value in PEAK_MODEL.items()]
    overrides += [
        f"--model.seq_length={length}",
        "--train.precision=fp32",
        "--train.micro_batch_size=1",
        "--train.global_batch_size=1",
        "--train.token_budget=null",
        f"--loss.fused={'true' if fused else 'false'}",
    ]
    return load_config(REPO / "examples" / "tiny_cpu.yaml", overrides)


def _planned(length: int, fused: bool) -> float:
    cfg = _peak_config(length, fused)
    mem = plan.memory(cfg, plan.layout_of(cfg))
    return mem.activations + mem.loss + mem.backward


def _measured_peak(length: int, fused: bool) -> int:
    script = Path(__file__).with_name("plan_peak_check.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(length), "1" if fused else "0"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_activation_and_loss_model_matches_measured_peaks(fused: bool) -> None:
    # The difference of two peaks (2L = 512 and 1024) cancels the interpreter, torch and the weights.
    measured = _measured_peak(512, fused) - _measured_peak(256, fused)
    planned = _planned(512, fused) - _planned(256, fused)
    assert planned == pytest.approx(measured, rel=0.20), (planned / 2**20, measured / 2**20)


def test_fused_loss_needs_far_less_than_the_reference_at_a_real_vocabulary() -> None:
    cfg = load_config(REPO / "examples" / "phase1_8k.yaml")
    lay = plan.layout_of(cfg)
    fused = plan.loss_bytes(cfg, lay, 2)
    reference = plan.loss_bytes(cfg, plan.Layout(**{**lay.__dict__, "fused_loss": False}), 2)
    assert fused < 0.1 * reference


def test_switches_lower_the_memory() -> None:
    cfg = load_config(REPO / "examples" / "phase1_8k.yaml")
    lay = plan.layout_of(cfg)
    base = plan.memory(cfg, lay).total

    def total(**changes) -> float:
        return plan.memory(cfg, plan.Layout(**{**lay.__dict__, **changes})).total

    assert total(sequence_parallel=False) > base
    assert total(distributed_optimizer=False) > base
    assert total(recompute="selective") < base
    assert total(recompute="full") < total(recompute="selective")


def test_a_config_that_does_not_fit_gets_a_change_that_fits() -> None:
    cfg = load_config(
        REPO / "examples" / "phase1_8k.yaml",
        ["--parallel.tp=1", "--parallel.dp=512", "--parallel.sequence_parallel=false"],
    )
    text, fits = plan.plan_report(cfg, gpu_memory_gb=80)
    assert not fits
    assert "DOES NOT FIT" in text and "-> change: --" in text


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_header_quotes_its_plan(path: Path) -> None:
    cfg = load_config(path)
    text, _ = plan.plan_report(cfg)
    verdict = re.search(r"verdict: (.*)", text).group(1)
    header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert verdict.split(" (")[0] in header, f"{path.name}: header lacks the plan's verdict"
    total = re.search(r"total\s+([\d.]+) GiB", text).group(1)
    assert f"{total} GiB" in header, f"{path.name}: header lacks the planned {total} GiB per GPU"


def test_cli_prints_the_plan() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbdiff_megatron.cli",
            "plan",
            "--config",
            str(REPO / "examples" / "phase1_8k.yaml"),
            "--gpu-memory-gb",
            "80",
            "--parallel.tp=8",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tp 8 x" in proc.stdout and "verdict:" in proc.stdout


def _plan_output(capsys, *args: str) -> str:
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def test_a_layout_override_keeps_the_configs_gpu_count(capsys) -> None:
    ablation = str(REPO / "examples" / "ablation_8k.yaml")  # tp 2 x dp 64 = 128 GPUs
    out = _plan_output(capsys, "--config", ablation, "--parallel.tp=4")
    assert "dp 64 -> 32 keeps the config's 128 GPUs" in out
    assert "tp 4 x pp 1 x cp 1 x dp 32 = 128 GPUs" in out
    # An explicit dp plans another count, and says so.
    out = _plan_output(capsys, "--config", ablation, "--parallel.tp=4", "--parallel.dp=64")
    assert "this plan is for 256 GPUs, not the config's 128" in out and "= 256 GPUs" in out
    # A model-parallel size that does not divide the GPUs: dp stays, loudly.
    _, note = plan.keep_gpu_count(load_config(ablation), ["--parallel.tp=3"])
    assert note.startswith("WARNING: the GPU count changes") and "192 GPUs" in note


def test_the_suggested_change_fits_by_the_plans_own_model(capsys) -> None:
    ablation = REPO / "examples" / "ablation_8k.yaml"
    out = _plan_output(capsys, "--config", str(ablation), "--gpu-memory-gb", "24")
    assert "DOES NOT FIT" in out
    change = re.search(r"-> change: (.*): [\d.]+ GiB per GPU", out).group(1).split()
    changed = load_config(ablation, change)
    assert plan.planned_total(changed) <= (24 - plan._RESERVED_GIB) * plan.GIB
    assert plan.gpus_of(changed) == plan.gpus_of(load_config(ablation)) == 128
    # Nothing fits: no suggestion (micro_batch_size is 1 already, so none of lowering it either).
    out = _plan_output(capsys, "--config", str(ablation), "--gpu-memory-gb", "8")
    assert "-> no change the plan knows fits" in out
    assert "-> change" not in out and "micro_batch_size" not in out


def test_duration_at_an_mfu_and_the_model_config(capsys, tmp_path: Path) -> None:
    phase1 = REPO / "examples" / "phase1_8k.yaml"
    cfg = load_config(phase1)
    nbdiff, _ = plan.step_flops(cfg)
    days = cfg.train.steps * nbdiff / (plan.gpus_of(cfg) * 989e12 * 0.4) / 86400
    out = _plan_output(capsys, "--config", str(phase1))
    stated = re.search(r"duration: at 40% MFU .* take ([\d.]+) days", out)
    assert stated is not None and float(stated.group(1)) == pytest.approx(days, abs=0.05)
    out = _plan_output(capsys, "--config", str(phase1), "--mfu", "20", "--days", "7")
    assert float(re.search(r"at 20% MFU .* take ([\d.]+) days", out).group(1)) == pytest.approx(
        2 * days, abs=0.05
    )
    assert re.search(r"deadline: [\d,]+ steps in 7 days need \d+% MFU", out)
    model_yaml = tmp_path / "model.yaml"
    shape = {"num_layers": 2, "hidden_size": 256, "ffn_hidden_size": 512, "num_attention_heads": 8}
    model_yaml.write_text(yaml.safe_dump({"model": {**shape, "num_query_groups": 4}}))
    out = _plan_output(capsys, "--config", str(phase1), "--model-config", str(model_yaml))
    assert "model: 2 layers, hidden 256" in out and "--model-config" in out
