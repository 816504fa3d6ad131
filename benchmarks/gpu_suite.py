"""One GPU check suite: every GPU-only check and benchmark in one run, one results file (<= 8 min on
one H100 / H200).

    python benchmarks/gpu_suite.py [--out gpu_suite_results.json]
    python benchmarks/gpu_suite.py --dry-run      # CPU: validate every step without a GPU

Steps (each in its own process, with its own time limit, so that one failure does not stop the rest):

1. `pytest -m gpu`: FlexAttention fwd+bwd vs SDPA in bf16, the fused loss vs the reference in bf16,
   the fused loss's Triton chunk kernels vs its torch ones (fp32, 256 x 151,936), bf16 training with the distributed optimizer, megatron's gradient clipping.
2. ~20 bf16 training steps of a ~300M model (16 layers, hidden 1024) with FlexAttention and the
   distributed optimizer on the bundled corpus: 10 steps with a checkpoint, then a resume to 20;
   checks that the loss falls, nothing is NaN and the resumed run continues at step 11.
3. benchmarks/attention.py: NBDiff mask at 2L vs causal at L (ideal 2.0x).
4. benchmarks/loss.py: fused vs reference loss path at h = 4096, 2L = 16,384, bf16.
5. benchmarks/train_step.py --objective both: the NBDiff training step of the ~300M model at
   L = 4K vs an AR step of the same model (causal LM on the same x_0), in one run: step times,
   x_0 tokens/s, MFU (nbdiff plan's FLOP count) and the ratio NBDiff / AR (ideal 2.0x).

`--dry-run` runs what a CPU can: each benchmark's --help, the training config through
`nbdiff train --print-config` and `nbdiff plan`, and `pytest -m gpu --collect-only`.
The results file holds, per step: the command, exit code, seconds, pass/fail and the output's tail
(and the train-step benchmark's JSON record under "figures").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = str(REPO / "examples" / "tiny_cpu.yaml")

# The files that hold gpu-marked tests (the dry run collects only these; the real run collects all).
GPU_TESTS = [
    "tests/model/test_attention.py",
    "tests/kernels/test_linear_loss.py",
    "tests/kernels/test_ce_chunk.py",
    "tests/training/test_gpu_paths.py",
]

# ~300M parameters (16 x 16.8M + the 32K x 1024 tied embedding), L = 1024.
MODEL_300M = [
    "--model.num_layers=16",
    "--model.hidden_size=1024",
    "--model.ffn_hidden_size=4096",
    "--model.num_attention_heads=16",
    "--model.num_query_groups=4",
    "--model.seq_length=1024",
    "--model.attention_backend=flex",
    "--train.precision=bf16",
    "--parallel.distributed_optimizer=true",
    "--train.micro_batch_size=4",
    "--train.global_batch_size=8",
    "--train.token_budget=null",
    "--schedule.warmup_steps=2",
    "--schedule.decay_steps=0",
    "--optimizer.lr=1e-3",
    "--logging.progress_bar=false",
    "--logging.log_interval=1",
]


def _run(name: str, cmd: list[str], timeout: float, env: dict[str, str]) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = 124
        out = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        out += f"\n[timed out after {timeout:.0f} s]"
    return dict(
        step=name,
        command=" ".join(cmd),
        returncode=code,
        seconds=round(time.perf_counter() - start, 1),
        ok=code == 0,
        output_tail=out[-4000:],
    )


def _train_checks(save: Path) -> dict:
    """Loss falls, no NaN, and the resumed run continued at step 11."""
    records = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines() if x]
    by_step = {r["step"]: r for r in records}
    losses = [by_step[s]["loss"] for s in sorted(by_step)]
    finite = all(math.isfinite(x) for x in losses)
    falls = len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    resumed = sorted(by_step)[-1] == 20 and 11 in by_step
    return dict(
        steps=len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
        finite=finite,
        loss_falls=falls,
        resumed_to_20=resumed,
        ok=finite and falls and resumed,
    )


def steps(dry_run: bool, work: Path, data_args: list[str]) -> list[tuple[str, list[str], float]]:
    save = work / "run300m"
    train = [PY, "-m", "nbdiff_megatron.cli", "train", "--config", TINY, *MODEL_300M, *data_args]
    if dry_run:
        return [
            (
                "pytest-gpu",
                [PY, "-m", "pytest", "-q", "-m", "gpu", "--collect-only", *GPU_TESTS],
                300,
            ),
            ("train-300m", [*train, "--train.steps=20", "--print-config"], 120),
            (
                "plan-300m",
                [
                    PY,
                    "-m",
                    "nbdiff_megatron.cli",
                    "plan",
                    "--config",
                    TINY,
                    *MODEL_300M,
                    "--train.steps=20",
                ],
                120,
            ),
            ("attention", [PY, "benchmarks/attention.py", "--help"], 60),
            ("loss", [PY, "benchmarks/loss.py", "--help"], 60),
            ("train-step", [PY, "benchmarks/train_step.py", "--help"], 60),
        ]
    return [
        (
            "pytest-gpu",
            [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-p", "no:cacheprovider"],
            150,
        ),
        (
            "train-300m",
            [
                *train,
                "--train.steps=10",
                f"--checkpoint.save={save}",
                "--checkpoint.save_interval=10",
            ],
            90,
        ),
        (
            "resume-300m",
            [
                *train,
                "--train.steps=20",
                f"--checkpoint.save={save}",
                f"--checkpoint.load={save}",
                "--checkpoint.save_interval=100",
            ],
            75,
        ),
        ("attention", [PY, "benchmarks/attention.py", "--lengths", "4096", "--batch", "8"], 60),
        (
            "loss",
            [
                PY,
                "benchmarks/loss.py",
                "--device",
                "cuda",
                "--hidden",
                "4096",
                "--length",
                "8192",
                "--dtype",
                "bf16",
                "--repeats",
                "3",
            ],
            60,
        ),
        (
            "train-step",
            [
                PY,
                "benchmarks/train_step.py",
                "--config",
                TINY,
                "--objective",
                "both",
                "--steps",
                "6",
                "--warmup",
                "2",
                "--json",
                str(work / "train_step.jsonl"),
                *MODEL_300M,
                *data_args,
                "--model.seq_length=4096",
                "--train.micro_batch_size=1",
                "--train.global_batch_size=2",
            ],
            # Two runs in one process (FlexAttention compiles the 2L and the causal L masks).
            120,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "gpu_suite_results.json"))
    parser.add_argument("--dry-run", action="store_true", help="CPU: validate the steps only")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
            return 2
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="nbdiff-gpu-suite-"))
    sys.path.insert(0, str(REPO))
    from nbdiff_megatron.data.bundled import bundled_tokenizer_path, prepare_bundled_corpus

    prefix = prepare_bundled_corpus(str(work / "data"), max_documents=20 if args.dry_run else 200)
    data_args = [
        f"--data.data_path=[{prefix}]",
        f"--data.tokenizer_model={bundled_tokenizer_path()}",
    ]
    started = time.perf_counter()
    results = []
    for name, cmd, timeout in steps(args.dry_run, work, data_args):
        result = _run(name, cmd, timeout, env)
        if name == "resume-300m" and result["ok"]:
            checks = _train_checks(work / "run300m")
            result.update(checks=checks, ok=checks["ok"])
        figures = work / "train_step.jsonl"
        if name == "train-step" and result["ok"] and figures.is_file():
            # Per objective: step time, x_0 tokens/s, MFU; and the ratio NBDiff / AR.
            result["figures"] = json.loads(figures.read_text().splitlines()[-1])
        results.append(result)
        print(f"[{'ok' if result['ok'] else 'FAIL'}] {name}: {result['seconds']} s", flush=True)
        if not result["ok"]:
            print(result["output_tail"][-1500:], flush=True)
    summary = dict(
        suite="gpu_suite",
        dry_run=args.dry_run,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=platform.node(),
        seconds=round(time.perf_counter() - started, 1),
        ok=all(r["ok"] for r in results),
        steps=results,
    )
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(
        f"results: {args.out} ({'all ok' if summary['ok'] else 'FAILURES'}, {summary['seconds']} s)"
    )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
