"""Run under torchrun (2 gloo ranks) by test_eval_cli.py: `run_sharded` deals work items over the
ranks, each rank decodes only its share, and every rank gets all results back in order."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from nbdiff_megatron.inference.eval_report import is_main_rank, run_sharded

dist.init_process_group("gloo")
done: list[int] = []


def decode(item: int) -> int:
    done.append(item)
    return item * item


results = run_sharded(list(range(7)), decode)
shares: list[list[int] | None] = [None] * dist.get_world_size()
dist.all_gather_object(shares, done)
if is_main_rank():
    print(json.dumps({"results": results, "shares": shares}))
dist.destroy_process_group()
sys.exit(0)
