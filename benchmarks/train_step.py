"""Benchmark one training step through `train()`: NBDiff (x_t ⊕ x_0, 2L rows) vs AR of the same model.

    python benchmarks/train_step.py                                  # tiny CPU model, both objectives
    python benchmarks/train_step.py --objective nbdiff --steps 30 --model.hidden_size=128
    torchrun --nproc-per-node 8 benchmarks/train_step.py --config examples/ablation_8k.yaml \
        --parallel.dp=1 --train.global_batch_size=8 --model.num_layers=4 ...      # on GPUs

Objectives (`--objective`, default `both`, run one after the other in this process):

- `nbdiff`: the NBDiff step -- forward + backward of x_t ⊕ x_0 (2L rows) with the NBDiff mask, the
  loss of eq. 2, the optimizer step.
- `ar`: `train(objective="ar")`, the same model, config, attention backend, optimizer, DDP,
  precision and micro/global batches trained as a plain causal LM on the same x_0 batches: a causal
  forward over L tokens, next-token cross-entropy, backward, optimizer step.

Each runs `--steps` optimizer steps on the bundled corpus (or the config's data when it exists); the
first `--warmup` are left out of the timing. NBDiff trains at the config's target block size from
step 1 (`curriculum.start_block_size` is set to it unless given). Per objective it prints the
median step time, x_0 tokens/s (the same tokens per step for both: the NBDiff model sees twice as
many), the model FLOPs of a step by `nbdiff plan`'s formula (training/plan.py `step_flops`) and, on
GPU, the MFU at the peak bf16 TFLOP/s assumed for the GPU (`--peak-tflops`, default from the GPU's
name: H100/H200 989, A100 312, ...). With `both` it prints the ratio of the step times NBDiff / AR
(ideal 2.0x: NBDiff runs 2L rows; the plan's FLOP ratio beside it). `--json FILE` appends the
result as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from nbdiff_megatron import install_compat

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = {"nbdiff": ["nbdiff"], "ar": ["ar"], "both": ["nbdiff", "ar"]}
LABELS = {"nbdiff": "NBDiff", "ar": "AR"}


def _bench_config(args: argparse.Namespace, overrides: list[str]) -> Any:
    """The run's TrainConfig: no checkpoints, no LR warmup/decay, one log line, B = target from
    step 1; the bundled corpus when the config's data does not exist here."""
    from nbdiff_megatron.training.config import load_config

    extra = [
        f"--train.steps={args.steps}",
        "--schedule.warmup_steps=0",
        "--schedule.decay_steps=0",
        "--logging.progress_bar=false",
        f"--logging.log_interval={max(1, args.steps)}",
        "--checkpoint.save=null",
        "--checkpoint.load=null",
        "--checkpoint.finetune=false",
    ]
    cfg = load_config(args.config, [*extra, *overrides], validate=False)
    # The NBDiff step at the config's target block size from step 1 (the curriculum's B = 1 start
    # masks nothing under token shift); an explicit override still wins.
    extra.append(f"--curriculum.start_block_size={cfg.curriculum.target_block_size}")
    prefix = cfg.data.data_path[0].split()[-1] if cfg.data.data_path else ""
    if cfg.data.mode == "pretrain" and not os.path.isfile(prefix + ".bin"):
        from nbdiff_megatron.data.bundled import bundled_tokenizer_path, prepare_bundled_corpus

        data_dir = os.path.join(tempfile.gettempdir(), "nbdiff-bench-data")
        prefix = prepare_bundled_corpus(data_dir, max_documents=200)
        extra += [
            f"--data.data_path=[{prefix}]",
            f"--data.tokenizer_model={bundled_tokenizer_path()}",
        ]
    return load_config(args.config, [*extra, *overrides])


def _with_vocab(cfg: Any) -> Any:
    """The config with the model's real vocabulary (0 = from the tokenizer, as `train` resolves it),
    so that the FLOP count is that of the model that ran."""
    if cfg.model.vocab_size:
        return cfg
    from nbdiff_megatron.data.tokenizer import load_tokenizer

    vocab = int(load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def _peak_tflops(given: float | None) -> tuple[float | None, str]:
    """Peak bf16 TFLOP/s of one GPU for the MFU, and where it comes from."""
    from nbdiff_megatron.training.logging import guess_peak_tflops

    if given is not None:
        return given, "--peak-tflops"
    peak = guess_peak_tflops()
    return peak, ("the GPU's name" if peak is not None else "none (CPU or an unknown GPU)")


def _measure(cfg: Any, objective: str, warmup: int, flops: float, peak: float | None) -> dict:
    from nbdiff_megatron.training.loop import train

    result = train(cfg, label=f"bench-{objective}", objective=objective)
    timed = [r for r in result.history[warmup:] if not r["skipped"]]
    if not timed:
        raise SystemExit(f"{objective}: no timed steps: raise --steps above --warmup")
    step_time = statistics.median(r["step_time"] for r in timed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "objective": objective,
        "timed_steps": len(timed),
        "step_time_s": step_time,
        "tokens_per_s": cfg.tokens_per_step() / step_time,
        "model_flops_per_step": flops,
        "tflops_per_rank": flops / step_time / world / 1e12,
        "mfu": flops / step_time / (world * peak * 1e12) if peak else None,
        "first_loss": result.history[0]["loss"],
        "last_loss": result.history[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    install_compat()  # as the `nbdiff` command does, before megatron-core is imported
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "examples" / "tiny_cpu.yaml"))
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="both")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per objective")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak bf16 TFLOP/s of one GPU for the MFU (default: from the GPU's name)",
    )
    parser.add_argument("--json", default=None, help="append the result to this JSON-lines file")
    args, overrides = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from nbdiff_megatron.model.parallel import destroy_parallel
    from nbdiff_megatron.training.plan import step_flops

    cfg = _bench_config(args, overrides)
    flops = dict(zip(("nbdiff", "ar"), step_flops(_with_vocab(cfg)), strict=True))
    peak, peak_source = _peak_tflops(args.peak_tflops)
    results = {}
    try:
        for objective in OBJECTIVES[args.objective]:
            # One process group for both runs: `train` re-creates megatron's parallel state.
            results[objective] = _measure(cfg, objective, args.warmup, flops[objective], peak)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        destroy_parallel()
    ratio = (
        results["nbdiff"]["step_time_s"] / results["ar"]["step_time_s"]
        if len(results) == 2
        else None
    )
    record = {
        "benchmark": "train_step",
        "config": Path(args.config).name,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "seq_length": cfg.seq_length(),
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size,
        "peak_tflops": peak,
        "peak_tflops_from": peak_source,
        "results": results,
        "ratio_nbdiff_over_ar": ratio,
        "flops_ratio_nbdiff_over_ar": flops["nbdiff"] / flops["ar"],
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print(_report(record))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


def _report(record: dict) -> str:
    lines = [
        f"train step (L = {record['seq_length']}, global batch {record['global_batch_size']} in "
        f"micro-batches of {record['micro_batch_size']}, {record['world_size']} x "
        f"{record['device']}; MFU at {record['peak_tflops'] or '-'} TFLOP/s peak per GPU, from "
        f"{record['peak_tflops_from']}):"
    ]
    for objective, r in record["results"].items():
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        lines.append(
            f"  {LABELS[objective]:<6} {1000 * r['step_time_s']:9.1f} ms median over "
            f"{r['timed_steps']} steps, {r['tokens_per_s']:12,.0f} x_0 tokens/s, "
            f"{r['model_flops_per_step'] / 1e12:,.3f} TFLOP/step ({r['tflops_per_rank']:,.2f} "
            f"TFLOP/s per rank){mfu}"
        )
    if record["ratio_nbdiff_over_ar"] is not None:
        lines.append(
            f"  NBDiff / AR step time: {record['ratio_nbdiff_over_ar']:.2f}x (ideal 2.0x: NBDiff "
            f"runs 2L rows; the plan's FLOP ratio {record['flops_ratio_nbdiff_over_ar']:.2f}x)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
