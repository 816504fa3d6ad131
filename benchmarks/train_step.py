"""Benchmark one NBDiff training step (x_t ⊕ x_0 forward + backward + optimizer) through `train()`.

    python benchmarks/train_step.py                                  # tiny CPU model, 20 steps
    python benchmarks/train_step.py --config examples/tiny_cpu.yaml --steps 30 --model.hidden_size=128
    torchrun --nproc-per-node 8 benchmarks/train_step.py --config examples/ablation_8k.yaml \
        --parallel.dp=1 --train.global_batch_size=8 --model.num_layers=4 ...      # on GPUs

Runs `--steps` optimizer steps on the bundled corpus (or the config's data when it exists), skips the
first `--warmup` steps, and prints the median step time, tokens/s (x_0 tokens; the model sees twice as
many) and, on GPU, the MFU estimate. `--json FILE` appends the result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "examples" / "tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--json", default=None, help="append the result to this JSON-lines file")
    args, overrides = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from nbdiff_megatron.model.parallel import destroy_parallel
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.loop import train

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
    prefix = cfg.data.data_path[0].split()[-1] if cfg.data.data_path else ""
    if cfg.data.mode == "pretrain" and not os.path.isfile(prefix + ".bin"):
        from nbdiff_megatron.data.bundled import bundled_tokenizer_path, prepare_bundled_corpus

        data_dir = os.path.join(tempfile.gettempdir(), "nbdiff-bench-data")
        prefix = prepare_bundled_corpus(data_dir, max_documents=200)
        extra += [
            f"--data.data_path=[{prefix}]",
            f"--data.tokenizer_model={bundled_tokenizer_path()}",
        ]
    cfg = load_config(args.config, [*extra, *overrides])
    try:
        result = train(cfg, label="bench")
    finally:
        destroy_parallel()
    timed = [r for r in result.history[args.warmup :] if not r["skipped"]]
    if not timed:
        print("no timed steps: raise --steps above --warmup", file=sys.stderr)
        return 1
    step_time = statistics.median(r["step_time"] for r in timed)
    mfus = [r["mfu"] for r in timed if r["mfu"] is not None]
    record = {
        "benchmark": "train_step",
        "config": Path(args.config).name,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "seq_length": cfg.seq_length(),
        "global_batch_size": cfg.train.global_batch_size,
        "step_time_s": step_time,
        "tokens_per_s": cfg.tokens_per_step() / step_time,
        "mfu": statistics.median(mfus) if mfus else None,
    }
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        mfu = f", MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
        print(
            f"train step: {1000 * step_time:.1f} ms median over {len(timed)} steps, "
            f"{record['tokens_per_s']:,.0f} tokens/s (L = {record['seq_length']}, global batch "
            f"{record['global_batch_size']}, {record['device']}){mfu}"
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
