"""`nbdiff build-index`: build a training config's dataset index cache ahead of the job.

    nbdiff build-index --config examples/phase1_8k.yaml [--section.field=value ...]

A first training start builds megatron-core's dataset indices (document, sample and shuffle index of
every split) on rank 0 while every other rank waits in a barrier; for a phase-1-sized run (tens of
millions of samples, on shared storage) that takes long enough to matter on a reserved cluster.
This command runs the very dataset construction `nbdiff train` runs, in one process and without a GPU,
so the job's ranks find the cache and only load it. Give it the same config and overrides as the job:
the cache is keyed by the split, sequence length, sample counts and seed those determine.
"""

from __future__ import annotations

import argparse
import os
import time

from nbdiff_megatron.data.datasets import index_cache_dir
from nbdiff_megatron.training.cli import add_config_arguments
from nbdiff_megatron.training.config import load_config

# Unknown `--a.b=value` arguments are handed to `run` as config overrides (see nbdiff_megatron/cli.py).
ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_config_arguments(parser)
    parser.epilog = (
        "Pass the job's --section.field=value overrides too (e.g. --data.data_path=... "
        "--train.steps=...): they decide which index the job looks for."
    )


def _cache_files(cache_dir: str) -> dict[str, float]:
    if not os.path.isdir(cache_dir):
        return {}
    return {
        os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
        for root, _, names in os.walk(cache_dir)
        for name in names
    }


def run(args: argparse.Namespace) -> int:
    # The training set-up's own tokenizer loading and dataset construction (so that the sample
    # counts, and so the cache key, are those of `nbdiff train` by construction). Lazy: it imports
    # megatron-core, and `nbdiff build-index --help` must not.
    from nbdiff_megatron.training.setup import build_dataset, load_run_tokenizer

    overrides = list(getattr(args, "overrides", None) or [])
    cfg = load_config(args.config, overrides, model_file=args.model_config)
    cache_dir = index_cache_dir(cfg.data)
    if cache_dir is None:
        print(f"data.mode={cfg.data.mode} keeps no index cache: nothing to build")
        return 0
    before = _cache_files(cache_dir)
    start = time.perf_counter()
    train_set = build_dataset(cfg, load_run_tokenizer(cfg))
    seconds = time.perf_counter() - start
    written = sorted(set(_cache_files(cache_dir).items()) - set(before.items()))
    what = f"built {len(written)} index files" if written else "found the index complete"
    print(
        f"nbdiff build-index: {what} in {cache_dir} ({seconds:.1f} s); the training split has "
        f"{len(train_set)} samples of {cfg.seq_length()} tokens"
    )
    return 0
