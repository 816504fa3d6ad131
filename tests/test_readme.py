"""The README as an executed document: its user jobs run as written, in order, on tiny stand-ins.

Code blocks preceded by `<!-- readme-test: run -->` are run by bash, in README order, in one folder that
holds tiny stand-ins for what the README names: `Qwen3-4B-Base/` (a random 2-layer Qwen3 with the
bundled tokenizer), `data/*.jsonl.gz` (a few bundled documents), `data/chat.jsonl` (the bundled chat set),
`prompts.jsonl`, `my_gsm8k.jsonl`, and the repository's `examples/` and `slurm/`. Blocks marked
`<!-- readme-test: check -->` are cluster launches: each `nbdiff train` in them is validated with its
arguments, its world size and the files the run blocks wrote, and each `sbatch` names an existing file.
Unmarked blocks are left alone, so a new README section is tested once it carries a marker.

Every command must also be quiet: no megatron-core optional-dependency warnings, no git messages, no
traceback.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launch import REPO, clean_env

README = REPO / "README.md"
MARKER = re.compile(
    r"<!--\s*readme-test:\s*(run|check)\s*-->\s*\n```(?:bash|sh)?\n(.*?)\n```", re.S
)
NOISE = ("not installed", "fatal:", "Traceback", "Warning:", "IS DEPRECATED", "deprecated")


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(kind, script) of every marked block, in README order."""
    return [(m.group(1), m.group(2)) for m in MARKER.finditer(text)]


def test_readme_blocks_are_found() -> None:
    kinds = [kind for kind, _ in readme_blocks(README.read_text())]
    assert kinds.count("run") >= 5 and "check" in kinds


def _stand_ins(root: Path) -> None:
    """The tiny files the README's commands read, under the names the README uses."""
    from nbdiff_megatron.data.bundled import bundled_chat_path
    from tests.convert.conftest import build_hf_model

    build_hf_model("qwen3_untied", root / "Qwen3-4B-Base")
    data = root / "data"
    data.mkdir()
    texts = _bundled_documents(40)
    for part in range(2):
        with gzip.open(data / f"part-{part}.jsonl.gz", "wt") as f:
            for text in texts[part::2]:
                f.write(json.dumps({"text": text}) + "\n")
    with gzip.open(bundled_chat_path(), "rt", encoding="utf-8") as f:
        (data / "chat.jsonl").write_text(f.read())
    prompts = ["In the beginning", "To be, or not to be"]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    gsm8k = REPO / "tests" / "inference" / "assets" / "gsm8k_mini.jsonl"
    (root / "my_gsm8k.jsonl").write_text("\n".join(gsm8k.read_text().splitlines()[:2]) + "\n")
    for name in ("examples", "slurm"):
        (root / name).symlink_to(REPO / name)


def _bundled_documents(count: int) -> list[str]:
    from nbdiff_megatron.data.bundled import iter_bundled_documents

    return [doc["text"] for _, doc in zip(range(count), iter_bundled_documents())]


def _env(root: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return clean_env(
        {
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_OFFLINE": "1",
            "HOME": str(root),  # no user-level caches or configs leak in
        }
    )


def _run_block(script: str, root: Path, env: dict[str, str]) -> str:
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # the suite's own per-test limit; ~3 min of CPU in all on a quiet 2-core machine
    )
    output = done.stdout + done.stderr
    print(f"[{time.monotonic() - started:5.1f} s] {script.splitlines()[0][:90]}")
    assert done.returncode == 0, f"README block failed:\n{script}\n---\n{output[-6000:]}"
    noisy = [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, f"README block is noisy:\n{script}\n---\n" + "\n".join(noisy[:20])
    return output


def _commands(script: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    joined = script.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def _check_block(script: str, root: Path) -> None:
    """Validate cluster launches: config + overrides + world size, loads of files that exist."""
    from nbdiff_megatron.training.checkpointing import find_checkpoint
    from nbdiff_megatron.training.config import check_world_size

    checked = 0
    for words in _commands(script):
        if words[0] == "sbatch":
            launcher = next(w for w in words[1:] if not w.startswith("-"))
            assert (root / launcher).is_file(), f"{launcher} does not exist"
            continue
        world = 1
        if words[0] == "torchrun":
            nproc = next(w for w in words if w.startswith("--nproc")).split("=")[-1]
            if nproc.startswith("--"):
                nproc = words[words.index(nproc) + 1]
            world = int(nproc)
            words = words[words.index("nbdiff_megatron.cli") - 1 :]
            words[0:2] = ["nbdiff"]
        assert words[:2] == ["nbdiff", "train"], words
        cfg = _resolved_train_config(words[2:], root)
        check_world_size(cfg, world)
        if cfg.checkpoint.load:
            find_checkpoint(root / cfg.checkpoint.load)  # written by an earlier block
        checked += 1
    assert checked, f"no nbdiff train command in the check block:\n{script}"


def _resolved_train_config(train_args: list[str], root: Path):
    """`nbdiff train ARGS` resolved in `root` as the CLI does; its data and tokenizer exist."""
    from nbdiff_megatron.data.config import parse_blend
    from nbdiff_megatron.training import cli as train_cli
    from nbdiff_megatron.training.config import load_config

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser, "train")
    args, extra = parser.parse_known_args(train_args)
    args.overrides = extra
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(
            args.config, train_cli.overrides_from_args(args), model_file=args.model_config
        )
        assert Path(cfg.data.tokenizer_model).exists(), cfg.data.tokenizer_model
        if cfg.data.mode == "pretrain":
            for prefix in parse_blend(cfg.data.data_path)[0]:
                assert Path(prefix + ".idx").is_file(), prefix
        for path in cfg.data.sft_data_path:
            assert Path(path).is_file(), path
    finally:
        os.chdir(cwd)
    return cfg


def _check_pipeline(output: str, root: Path) -> None:
    """The phase jobs slurm/pipeline.sh --dry-run printed resolve and validate as written, with the
    README's own conversion of the same model (ckpt/qwen3-4b) standing in for the one its convert job
    will write (runs/pipeline/base-mcore)."""
    real = root.resolve()
    planned = f"{real}/runs/pipeline/base-mcore"
    phases = []
    for line in output.splitlines():
        words = shlex.split(line)
        launcher = next((w for w in words if w.endswith(".sbatch")), None)
        if not words or words[0] != "sbatch" or launcher is None:
            continue
        assert Path(launcher).is_file(), launcher
        config = root / "examples" / f"{Path(launcher).stem}.yaml"
        args = [
            w.replace(planned, f"{real}/ckpt/qwen3-4b") for w in words[words.index(launcher) + 1 :]
        ]
        cfg = _resolved_train_config(["--config", str(config), *args], root)
        assert cfg.checkpoint.save.startswith(f"{real}/runs/pipeline/")
        phases.append(Path(launcher).stem)
    assert phases == ["phase1_8k", "phase2_32k", "phase3_sft"], output


@pytest.mark.slow
def test_readme_user_jobs_run_as_written(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    root = tmp_path / "work"
    root.mkdir()
    _stand_ins(root)
    env = _env(root)
    outputs = []
    for kind, script in readme_blocks(README.read_text()):
        if kind == "run":
            outputs.append(_run_block(script, root, env))
            if script.startswith("slurm/pipeline.sh"):
                _check_pipeline(outputs[-1], root)
        else:
            _check_block(script, root)
    # What the jobs promise: a converted checkpoint, data, trained runs, an HF export, completions,
    # and an evaluation stored as valid JSON with its configs as a mapping.
    assert (root / "ckpt" / "qwen3-4b" / "model.yaml").is_file()
    assert (root / "data" / "corpus_text_document.idx").is_file()
    for phase in ("tiny_cpu", "ablation_8k", "phase1_8k", "phase2_32k", "phase3_sft"):
        assert (root / "runs" / phase / "iter_0000002").is_dir(), phase
        # self-contained: the run's tokenizer and model section travel with it
        assert (root / "runs" / phase / "tokenizer" / "tokenizer.json").is_file(), phase
        assert (root / "runs" / phase / "model.yaml").is_file(), phase
    # The loop's --model-config keeps phase 2's raised RoPE base (the checkpoint's is 1e6).
    phase2 = yaml.safe_load((root / "runs" / "phase2_32k" / "config.yaml").read_text())
    assert phase2["model"]["rotary_base"] == 8_000_000
    assert (root / "hf" / "nbdiff-7b" / "config.json").is_file()
    completions = (root / "out.jsonl").read_text().splitlines()
    assert len(completions) == 2
    result = json.loads((root / "eval.json").read_text())
    assert isinstance(result["configs"], dict) and result["results"]
    text = "\n".join(outputs)
    assert "SFT data: conversations read:" in text  # the SFT run accounts for its conversations
