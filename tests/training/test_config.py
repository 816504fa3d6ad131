"""Training config: YAML + overrides, type conversion, validation messages, the example configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.method.curriculum import block_size_at
from nbdiff_megatron.training.config import (
    check_world_size,
    dump_config,
    load_config,
    parse_overrides,
    parse_token_count,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SLURM = sorted((REPO / "slurm").glob("*.sbatch"))
TINY = REPO / "examples" / "tiny_cpu.yaml"


def test_every_phase_has_an_example_config() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"tiny_cpu", "ablation_8k", "phase1_8k", "phase2_32k", "phase3_sft"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_loads_validates_and_states_its_budget(path: Path) -> None:
    cfg = load_config(path)  # validates against the config's own tp/pp/cp/dp
    assert cfg.train.token_budget is not None, "every example states its token budget"
    stated = parse_token_count(cfg.train.token_budget)
    assert abs(cfg.token_budget() - stated) <= 0.05 * stated
    # The header comment states the budget in words too.
    assert re.search(r"Token budget:", path.read_text())
    if cfg.parallel.dp is not None:
        world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp * cfg.parallel.dp
        assert check_world_size(cfg, world) == cfg.parallel.dp
    # The dumped config (saved beside checkpoints) loads back to the same values.
    import yaml

    from nbdiff_megatron.training.config import config_from_dict

    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_phase_settings_match_the_paper() -> None:
    ablation = load_config(REPO / "examples" / "ablation_8k.yaml")
    cur = ablation.curriculum
    sizes = [
        block_size_at(
            s,
            target=cur.target_block_size,
            start=cur.start_block_size,
            base=cur.growth_base,
            interval=cur.growth_interval,
            warmup=cur.growth_warmup,
        )
        for s in range(ablation.train.steps)
    ]
    assert ablation.train.steps == 4000 and sizes[0] == 1
    assert sizes.index(32) <= 2500  # growth finished by iteration 2500
    assert cur.ar_weight > 0  # AR loss on
    phase1 = load_config(REPO / "examples" / "phase1_8k.yaml")
    assert phase1.seq_length() == 8192
    assert abs(phase1.tokens_per_step() - 8e6) / 8e6 < 0.06  # ~8M tokens per iteration
    assert phase1.schedule.style == "wsd" and phase1.schedule.decay_steps > 0
    phase2 = load_config(REPO / "examples" / "phase2_32k.yaml")
    assert phase2.seq_length() == 32768 and phase2.parallel.cp > 1
    assert phase2.model.rotary_base > phase1.model.rotary_base
    phase3 = load_config(REPO / "examples" / "phase3_sft.yaml")
    assert phase3.data.mode == "sft"


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        TINY,
        [
            "--train.steps=107",
            "--optimizer.lr=1e-3",
            "--noise.per_block=false",
            "--parallel.dp=1",
            "--checkpoint.save=/tmp/x",
        ],
    )
    assert cfg.train.steps == 107 and isinstance(cfg.train.steps, int)
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.noise.per_block is False
    assert cfg.checkpoint.save == "/tmp/x"
    assert parse_overrides(["--a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["--train.stpes=3"], r"unknown config key 'train\.stpes'.*Did you mean 'steps'"),
        (["--optimzer.lr=1"], r"unknown config key 'optimzer'.*Did you mean 'optimizer'"),
        (
            ["--parallel.tp=3"],
            r"num_attention_heads=4 is not divisible by the tensor parallel size 3",
        ),
        (["--parallel.pp=3"], r"num_layers=4 is not divisible by the pipeline parallel size 3"),
        (
            ["--train.global_batch_size=12", "--parallel.dp=2"],
            r"global_batch_size=12 is not divisible by train\.micro_batch_size \(8\) x data-parallel "
            r"size \(2\) = 16",
        ),
        (["--curriculum.mask_kind=context"], r"Did you mean 'context_causal'"),
        (["--train.steps=ten"], r"train\.steps: expected an integer"),
        (["--curriculum.ar_weight=1.5"], r"curriculum\.ar_weight must lie in \[0, 1\]"),
        (
            ["--curriculum.target_block_size=128"],
            r"block_size=128 is larger than model\.seq_length",
        ),
        (["--train.token_budget=1B"], r"train\.token_budget says 1B"),
        (["--train.steps=100", "--train.token_budget=307K"], r"token_budget says 307K"),
        (["--schedule.decay_steps=1000"], r"exceed train\.steps"),
        (["--checkpoint.finetune=true"], r"--checkpoint\.load"),
        (["--noise.skew=1.5"], r"noise\.skew must lie in \[0, 1\]"),
        (
            ["--parallel.cp=3"],
            r"model\.seq_length=64 does not fit parallel\.cp=3.*divisible by 6",
        ),
        (["train.steps"], r"has no value"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, overrides)


def test_context_parallel_layouts_validate() -> None:
    cfg = load_config(TINY, ["--parallel.cp=2", "--parallel.tp=2"])
    assert check_world_size(cfg, 8) == 2  # world = tp * pp * cp * dp
    phase2 = load_config(REPO / "examples" / "phase2_32k.yaml")
    par = phase2.parallel
    assert par.cp == 4 and phase2.seq_length() % (2 * par.cp) == 0
    assert check_world_size(phase2, par.tp * par.pp * par.cp * par.dp) == par.dp


def test_lr_of_the_first_and_the_last_step() -> None:
    def lr_of(cfg, step: int) -> float:
        return cfg.step_schedule().lr(step)

    sched = ["--train.steps=10", "--optimizer.lr=1e-3", "--optimizer.min_lr=1e-4"]
    wsd = load_config(TINY, [*sched, "--schedule.warmup_steps=4", "--schedule.decay_steps=3"])
    # Step 1 (steps count from 1, as logged) already trains at peak / warmup; the peak at step 4; min_lr at the last step.
    assert lr_of(wsd, 1) == pytest.approx(2.5e-4)
    assert lr_of(wsd, 4) == pytest.approx(1e-3) and lr_of(wsd, 7) == pytest.approx(1e-3)
    assert lr_of(wsd, 10) == pytest.approx(1e-4)
    cosine = load_config(
        TINY,
        [
            *sched,
            "--schedule.style=cosine",
            "--schedule.warmup_steps=0",
            "--schedule.decay_steps=0",
        ],
    )
    assert lr_of(cosine, 1) < 1e-3 and lr_of(cosine, 10) == pytest.approx(1e-4)
    flat = load_config(TINY, [*sched, "--schedule.warmup_steps=0", "--schedule.decay_steps=0"])
    assert lr_of(flat, 1) == lr_of(flat, 10) == pytest.approx(1e-3)


def test_world_size_is_checked_against_the_layout() -> None:
    cfg = load_config(TINY, ["--parallel.tp=2"])
    assert check_world_size(cfg, 2) == 1
    with pytest.raises(ConfigError, match="cannot be split"):
        check_world_size(cfg, 3)
    cfg = load_config(TINY, ["--parallel.dp=2"])
    with pytest.raises(ConfigError, match=r"parallel\.dp=2 but 4 processes"):
        check_world_size(cfg, 4)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


PHASE_LAUNCHERS = [p for p in SLURM if p.name != "nbdiff.sbatch"]


@pytest.mark.parametrize("path", PHASE_LAUNCHERS, ids=lambda p: p.stem)
def test_phase_launchers_call_the_generic_one_with_an_existing_config(path: Path) -> None:
    """Syntax and the config named; tests/slurm runs the launcher itself on a real scheduler."""
    import subprocess

    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    configs = re.findall(r"examples/[\w.]+\.yaml", text)
    assert configs, f"{path.name} names no example config"
    for name in configs:
        assert (REPO / name).is_file(), f"{path.name} names {name}, which does not exist"
    assert 'exec bash "$here/nbdiff.sbatch"' in text and "--open-mode=append" in text
    load_config(REPO / configs[0])


def test_every_phase_has_a_slurm_launcher() -> None:
    assert {p.stem for p in SLURM} >= {"ablation_8k", "phase1_8k", "phase2_32k", "phase3_sft"}


def test_cli_prints_config_errors_without_a_traceback() -> None:
    import subprocess
    import sys

    base = [sys.executable, "-m", "nbdiff_megatron.cli", "train", "--config", str(TINY)]
    bad = subprocess.run([*base, "--train.stpes=3"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "Did you mean 'steps'" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run(
        [*base, "--train.steps=120", "--print-config"], capture_output=True, text=True, cwd=REPO
    )
    assert good.returncode == 0, good.stderr
    assert "steps: 120" in good.stdout


def test_every_config_problem_is_reported_in_one_message() -> None:
    with pytest.raises(ConfigError) as typed:
        load_config(
            TINY, ["--optimzer.lr=1", "--train.steps=ten", "--curriculum.mask_kind=context"]
        )
    message = str(typed.value)
    assert "3 problems" in message
    assert "Did you mean 'optimizer'" in message and "train.steps: expected an integer" in message
    assert "Did you mean 'context_causal'" in message
    with pytest.raises(ConfigError) as invalid:
        load_config(
            TINY,
            [
                "--parallel.tp=3",
                "--noise.skew=1.5",
                "--schedule.decay_steps=1000",
                "--checkpoint.finetune=true",
            ],
        )
    message = str(invalid.value)
    assert "4 problems" in message
    for needle in ("tensor parallel size 3", "noise.skew", "exceed train.steps", "checkpoint.load"):
        assert needle in message


def test_launch_problems_are_reported_together() -> None:
    from nbdiff_megatron.training.config import check_launch

    cluster = load_config(REPO / "examples" / "ablation_8k.yaml")
    with pytest.raises(ConfigError) as launch:
        check_launch(cluster, 8, on_cuda=False)
    message = str(launch.value)
    assert "2 problems" in message
    assert "parallel.dp=64 but 8 processes" in message and "--parallel.dp=4" in message
    assert "attention_backend='flex'" in message
    # bf16 runs on a CPU too (the same precision code as on a GPU, slowly): not a launch problem.
    assert "train.precision" not in message
    assert check_launch(cluster, 128, on_cuda=True) == 64


def test_only_rank_zero_prints_a_user_error() -> None:
    import subprocess
    import sys

    from tests.launch import clean_env

    cmd = [sys.executable, "-m", "nbdiff_megatron.cli", "train", "--config", str(TINY)]
    runs = {
        rank: subprocess.run(
            [*cmd, "--train.stpes=3"],
            capture_output=True,
            text=True,
            cwd=REPO,
            # Rank 1 would wait 10 s for a launcher to stop it; nothing stops it here.
            env=clean_env({"RANK": rank, "WORLD_SIZE": "2", "NBDIFF_QUIET_RANK_GRACE_S": "0.5"}),
        )
        for rank in ("0", "1")
    }
    assert runs["0"].returncode == runs["1"].returncode == 2
    assert runs["0"].stderr.count("Did you mean 'steps'") == 1
    assert runs["1"].stderr == "" and runs["1"].stdout == ""


def test_quiet_rank_grace_reads_the_environment_and_survives_a_bad_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbdiff_megatron.cli import QUIET_RANK_GRACE_S, quiet_rank_grace_s

    monkeypatch.delenv("NBDIFF_QUIET_RANK_GRACE_S", raising=False)
    assert quiet_rank_grace_s() == QUIET_RANK_GRACE_S
    monkeypatch.setenv("NBDIFF_QUIET_RANK_GRACE_S", "0.5")
    assert quiet_rank_grace_s() == 0.5
    monkeypatch.setenv("NBDIFF_QUIET_RANK_GRACE_S", "soon")
    assert quiet_rank_grace_s() == QUIET_RANK_GRACE_S
