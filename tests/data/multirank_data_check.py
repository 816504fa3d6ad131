"""Run under torchrun (gloo): every rank builds the datasets and reads its data-parallel share.

Writes result_{rank}.json with the sample indices' tokens this rank received.
"""

import argparse
import json
import os

import torch.distributed as dist

import nbdiff_megatron
from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.config import DataConfig
from nbdiff_megatron.data.datasets import build_datasets
from nbdiff_megatron.data.loader import build_dataloader
from nbdiff_megatron.data.tokenizer import load_tokenizer


def main() -> None:
    nbdiff_megatron.install_compat()  # as the `nbdiff` command does (docs/ARCHITECTURE.md)
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_path())
    cfg = DataConfig(
        data_path=[args.prefix],
        tokenizer_model=bundled_tokenizer_path(),
        split="90,8,2",
        data_cache_path=args.cache,
    )
    train, _, _ = build_datasets(cfg, 64, tokenizer, (40, 8, 4))
    loader = build_dataloader(
        train,
        micro_batch_size=2,
        consumed_samples=8,
        data_parallel_rank=rank,
        data_parallel_size=world,
    )
    batches = [batch["tokens"].tolist() for batch in loader]
    with open(os.path.join(args.out, f"result_{rank}.json"), "w") as f:
        json.dump({"rank": rank, "batches": batches}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
