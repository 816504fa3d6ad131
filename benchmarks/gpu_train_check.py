"""Training on one GPU as the cluster runs it: compiled FlexAttention against dense SDPA, the
distributed optimizer, a checkpoint resume, and the measured peak memory against `nbdiff plan`.

    python benchmarks/gpu_train_check.py --config examples/tiny_cpu.yaml --json out.jsonl \\
        [--steps 6] [--section.field=value ...]       # benchmarks/gpu_suite.py: a ~1B model in bf16

Runs of `train()` in this process, on the same seed, data and noise draws (`--backends`, default
`flex sdpa`):

1. `model.attention_backend=flex` (compiled on CUDA: the forward and the backward of the NBDiff mask);
2. the same with `sdpa` (a dense boolean mask): per-step losses and gradient norms must agree within
   the tolerances below;
3. flex again for the first half of the steps with a checkpoint, then a second `train()` that resumes
   from it to the end: the resumed steps must agree with run 1 within the same tolerances.

The peak memory of runs 1 and 2 (torch.cuda.max_memory_allocated above what was allocated before the
run) is set beside `nbdiff plan`'s per-GPU estimate for the same config (training/plan.py `memory`).
The plan is an estimate, so the ratio is reported, not checked. On a CPU (the suite's dry run) the
same code runs a tiny model in fp32 with `--backends sdpa sdpa` (flex has no backward on CPU), and
no peak is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Relative tolerances between flex and SDPA (and between a run and its resume), per precision. The
# loss barely depends on attention at random initialisation, so the gradient norm (of the whole
# model, before clipping) is compared too: at step 1 it comes from identical weights and data, and
# a wrong mask or a wrong attention backward changes it. The first step differs only by the
# attention kernels' rounding (bf16: 8 bits of mantissa per output); later steps add the optimizer's
# response to that difference. fp32 (the CPU dry run) must agree to float accuracy.
RTOL = {
    "bf16": {"loss_first": 1e-2, "loss_later": 3e-2, "grad_norm": 5e-2},
    "fp32": {"loss_first": 1e-4, "loss_later": 1e-4, "grad_norm": 1e-4},
}


def _config(args: argparse.Namespace, overrides: list[str], *extra: str) -> Any:
    from nbdiff_megatron.training.config import load_config

    common = [
        f"--train.steps={args.steps}",
        "--logging.progress_bar=false",
        "--logging.log_interval=1",
        "--checkpoint.save=null",
        "--checkpoint.load=null",
    ]
    return load_config(args.config, [*common, *overrides, *extra])


def _with_vocab(cfg: Any) -> Any:
    """The config with the vocabulary `train` resolves (0 = from the tokenizer), for the plan."""
    if cfg.model.vocab_size:
        return cfg
    from nbdiff_megatron.data.tokenizer import load_tokenizer

    vocab = int(load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def _planned_bytes(cfg: Any) -> float:
    from nbdiff_megatron.training.plan import layout_of, memory

    return memory(_with_vocab(cfg), layout_of(cfg)).total


def _train_measured(cfg: Any, label: str) -> tuple[list[dict], int | None]:
    """`train(cfg)`'s per-step records, and its peak CUDA memory above what was allocated before."""
    import torch

    from nbdiff_megatron.training.loop import train

    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    history = train(cfg, label=label).history
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    return history, peak


def _disagreements(a: list[dict], b: list[dict], precision: str, first_step: int = 1) -> list[str]:
    """Steps whose loss or gradient norm differ by more than RTOL (relative to run `a`'s value), or
    that are missing from `b` or not finite."""
    tol = RTOL[precision]
    by_step = {r["step"]: r for r in b}
    problems = []
    for record in a:
        step = record["step"]
        other = by_step.get(step)
        if other is None:
            problems.append(f"step {step}: missing from the second run")
            continue
        loss_rtol = tol["loss_first"] if step == first_step else tol["loss_later"]
        for key, rtol in (("loss", loss_rtol), ("grad_norm", tol["grad_norm"])):
            mine, theirs = record.get(key), other.get(key)
            if mine is None and theirs is None:
                continue  # a skipped step reports no gradient norm in either run
            if (
                mine is None
                or theirs is None
                or not math.isfinite(mine)
                or abs(mine - theirs) > rtol * abs(mine)
            ):
                problems.append(f"step {step} {key}: {mine} vs {theirs} (rtol {rtol})")
    return problems


def _resume_check(args: argparse.Namespace, overrides: list[str], reference: list[dict]) -> dict:
    """The first backend to half the steps with a checkpoint, then a resume to the end; compared with
    `reference` (the first backend's uninterrupted run)."""
    from nbdiff_megatron.model.parallel import destroy_parallel

    half = max(1, args.steps // 2)
    save = Path(tempfile.mkdtemp(prefix="nbdiff-gpu-check-", dir=args.work))
    first = _config(
        args,
        overrides,
        f"--model.attention_backend={args.backends[0]}",
        f"--train.steps={half}",
        f"--checkpoint.save={save}",
        f"--checkpoint.save_interval={half}",
    )
    precision = _precision_of(first)
    try:
        _train_measured(first, "first-half")
        resumed_cfg = dataclasses.replace(
            first, train=dataclasses.replace(first.train, steps=args.steps)
        )
        resumed, _ = _train_measured(resumed_cfg, "resumed")
    except Exception as exc:  # noqa: BLE001 -- recorded: the other checks' results stand
        destroy_parallel()
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-2000:]}
    steps = [r["step"] for r in resumed]
    later = [r for r in reference if r["step"] > half]
    problems = _disagreements(later, resumed, precision, first_step=-1)
    if steps != list(range(half + 1, args.steps + 1)):
        problems.append(f"the resumed run ran steps {steps}, not {half + 1}..{args.steps}")
    return {"ok": not problems, "resumed_from": half, "steps": steps, "problems": problems}


def _precision_of(cfg: Any) -> str:
    import torch

    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def run_checks(args: argparse.Namespace, overrides: list[str]) -> dict:
    from nbdiff_megatron.model.parallel import destroy_parallel

    record: dict[str, Any] = {"device": _device_name(), "steps": args.steps, "runs": []}
    histories = []
    try:
        for backend in args.backends:
            cfg = _config(args, overrides, f"--model.attention_backend={backend}")
            history, peak = _train_measured(cfg, backend)
            planned = _planned_bytes(cfg)
            histories.append(history)
            record["runs"].append(
                {
                    "backend": backend,
                    "losses": [r["loss"] for r in history],
                    "grad_norms": [r["grad_norm"] for r in history],
                    "peak_bytes": peak,
                    "plan_bytes": planned,
                    "peak_over_plan": peak / planned if peak is not None else None,
                }
            )
        precision = _precision_of(cfg)
        record["precision"] = precision
        record["distributed_optimizer"] = cfg.parallel.distributed_optimizer
        problems = _disagreements(histories[0], histories[1], precision)
        finite = all(math.isfinite(r["loss"]) for h in histories for r in h)
        record["agreement"] = {"ok": finite and not problems, "problems": problems}
        record["resume"] = _resume_check(args, overrides, histories[0])
    finally:
        destroy_parallel()
    record["ok"] = record["agreement"]["ok"] and record["resume"]["ok"]
    return record


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def report(record: dict) -> str:
    gib = 2**30
    lines = [
        f"training check on {record['device']} ({record['precision']}, {record['steps']} steps, "
        f"distributed optimizer {'on' if record['distributed_optimizer'] else 'off'}):"
    ]
    for r in record["runs"]:
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        peak = (
            f"peak {r['peak_bytes'] / gib:.2f} GiB vs plan {r['plan_bytes'] / gib:.2f} GiB "
            f"({r['peak_over_plan']:.2f}x)"
            if r["peak_bytes"] is not None
            else f"plan {r['plan_bytes'] / gib:.2f} GiB (no GPU: peak not measured)"
        )
        lines.append(f"  {r['backend']:<5} losses [{losses}]; {peak}")
    first, second = (r["backend"] for r in record["runs"])
    check = record["agreement"]
    verdict = "agree" if check["ok"] else f"DIFFER {check['problems']}"
    lines.append(f"  {first} vs {second}: {verdict}")
    resume = record["resume"]
    lines.append(
        f"  resume ({first}): "
        + (
            f"ok (from step {resume['resumed_from']})"
            if resume["ok"]
            else f"FAILED {resume.get('error') or resume.get('problems')}"
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "examples" / "tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (>= 2)")
    parser.add_argument(
        "--backends",
        nargs=2,
        default=["flex", "sdpa"],
        metavar=("FIRST", "SECOND"),
        help="the two attention backends compared (the CPU dry run: sdpa sdpa, flex has no "
        "backward on CPU); the resume check uses FIRST",
    )
    parser.add_argument("--work", default=None, help="folder for the resume check's checkpoints")
    parser.add_argument("--json", default=None, help="append the result to this JSON-lines file")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the resume check splits the run in two)")
    args.work = args.work or tempfile.mkdtemp(prefix="nbdiff-gpu-check-")
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO))
    from nbdiff_megatron import install_compat

    install_compat(cpu_patches=False)  # as the nbdiff command (the model builder patches on CPU)
    record = run_checks(args, overrides)
    print(report(record), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
