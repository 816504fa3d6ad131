"""Benchmark checkpoint saves and loads on CPU ranks: synchronous vs fully parallel vs asynchronous.

    torchrun --nproc-per-node 4 benchmarks/checkpoint.py              # DP = 4 on gloo, a small model
    torchrun --nproc-per-node 4 benchmarks/checkpoint.py --hidden 512 --layers 4 --json out.jsonl

Each mode trains the tiny CPU config (examples/tiny_cpu.yaml, model size from the flags, distributed
optimizer on, dp_reshardable optimizer state) for `--steps` steps with a checkpoint after every step,
through `train()` as a run does, then resumes from the last checkpoint for one more step. Per mode it
prints, as the maximum over ranks:

- blocking: seconds the training loop spent in `save_checkpoint` (the training time a save costs);
- complete: seconds from the save's start to its finalisation (renamed, `latest`): the same as
  blocking for a synchronous save, later for an asynchronous one;
- bytes: per-rank bytes of the last checkpoint's shard files (`__<rank>_*.distcp`), max / min over ranks;
- load: seconds of `load_checkpoint` in the resumed run (with the mode's fully parallel load setting).

Modes: `sync` (the first DP rank writes the replicated weights), `fully_parallel` (megatron-core's fully
parallel save and load over DP), `async` (fully parallel, written by a forked process per save).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from nbdiff_megatron import install_compat

MODES = {
    "sync": ["--checkpoint.fully_parallel_save=false", "--checkpoint.fully_parallel_load=false"],
    "fully_parallel": [
        "--checkpoint.fully_parallel_save=true",
        "--checkpoint.fully_parallel_load=true",
    ],
    "async": [
        "--checkpoint.fully_parallel_save=true",
        "--checkpoint.fully_parallel_load=true",
        "--checkpoint.async_save=true",
    ],
}


def _timed_checkpointing(times: dict[str, list[float]]) -> None:
    """Wrap save_checkpoint / load_checkpoint (as the loop calls them) to record their durations."""
    from nbdiff_megatron.training import checkpointing

    save, load = checkpointing.save_checkpoint, checkpointing.load_checkpoint

    def timed_save(*args: Any, on_complete: Any = None, **kwargs: Any) -> Any:
        start = time.perf_counter()

        def complete(path: Path) -> None:
            times["complete"].append(time.perf_counter() - start)
            if on_complete is not None:
                on_complete(path)

        result = save(*args, on_complete=complete, **kwargs)
        times["blocking"].append(time.perf_counter() - start)
        return result

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = load(*args, **kwargs)
        times["load"].append(time.perf_counter() - start)
        return result

    checkpointing.save_checkpoint = timed_save
    checkpointing.load_checkpoint = timed_load


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _rank_bytes(ckpt: Path, world: int) -> list[int]:
    return [sum(f.stat().st_size for f in ckpt.glob(f"__{r}_*.distcp")) for r in range(world)]


def run_mode(name: str, args: argparse.Namespace, root: Path, base: list[str]) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.loop import train

    times: dict[str, list[float]] = {"blocking": [], "complete": [], "load": []}
    _timed_checkpointing(times)
    save = root / name
    common = [*base, *MODES[name], f"--checkpoint.save={save}", "--checkpoint.keep_last=1"]
    train(load_config(args.config, [*common, f"--train.steps={args.steps}"]), label=name)
    parallel_state.destroy_model_parallel()
    last = sorted(save.glob("iter_*"))[-1]
    world = dist.get_world_size()
    per_rank = _rank_bytes(last, world)
    resume = [*common, f"--train.steps={args.steps + 1}"]
    train(load_config(args.config, resume), label=f"{name} resume")
    parallel_state.destroy_model_parallel()
    return {
        "mode": name,
        "ranks": world,
        "blocking_s": _max_over_ranks(
            statistics.median(times["blocking"][1:] or times["blocking"])
        ),
        "complete_s": _max_over_ranks(
            statistics.median(times["complete"][1:] or times["complete"])
        ),
        "load_s": _max_over_ranks(times["load"][0]),
        "bytes_max": max(per_rank),
        "bytes_min": min(per_rank),
        "bytes_total": sum(per_rank),
    }


def main() -> None:
    install_compat()  # as the `nbdiff` command does, before megatron-core is imported
    import torch.distributed as dist

    from nbdiff_megatron.data.bundled import prepare_bundled_corpus
    from nbdiff_megatron.model.parallel import destroy_parallel, initialize_parallel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/tiny_cpu.yaml")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps (= saves) per mode")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    args = parser.parse_args()

    initialize_parallel(1, 1, 1)
    world = dist.get_world_size()
    # One directory for all ranks: rank 0's, broadcast.
    shared = [tempfile.mkdtemp(prefix="nbdiff-ckpt-bench-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    root = Path(shared[0])
    try:
        corpus = str(root / "corpus")
        data = [prepare_bundled_corpus(corpus, max_documents=40) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(data, src=0)
        base = [
            f"--data.data_path=[{data[0]}]",
            f"--model.hidden_size={args.hidden}",
            f"--model.ffn_hidden_size={4 * args.hidden}",
            f"--model.num_layers={args.layers}",
            "--model.seq_length=32",
            f"--train.global_batch_size={4 * world}",
            "--train.micro_batch_size=4",
            "--train.precision=fp32",
            "--schedule.warmup_steps=0",
            "--schedule.decay_steps=0",
            f"--parallel.dp={world}",
            "--logging.progress_bar=false",
            "--logging.log_interval=100",
            "--checkpoint.save_interval=1",
        ]
        results = [run_mode(name, args, root, base) for name in args.modes.split(",")]
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    if dist.get_rank() == 0:
        print(
            f"\ncheckpoint save/load, {world} CPU ranks (gloo), hidden {args.hidden}, "
            f"{args.layers} layers, distributed optimizer (dp_reshardable)"
        )
        print(
            f"{'mode':<16}{'blocking s':>11}{'complete s':>11}{'load s':>8}"
            f"{'MB/rank max':>13}{'MB/rank min':>13}{'MB total':>10}"
        )
        for r in results:
            print(
                f"{r['mode']:<16}{r['blocking_s']:>11.2f}{r['complete_s']:>11.2f}"
                f"{r['load_s']:>8.2f}{r['bytes_max'] / 1e6:>13.2f}{r['bytes_min'] / 1e6:>13.2f}"
                f"{r['bytes_total'] / 1e6:>10.2f}"
            )
        if args.json:
            with open(args.json, "a") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
    destroy_parallel()


if __name__ == "__main__":
    main()
