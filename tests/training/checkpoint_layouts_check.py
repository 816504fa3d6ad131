"""Run by test_checkpoint_layouts.py under torchrun (2 CPU ranks, gloo): several training runs of the
tiny config in ONE launch (megatron-core is imported once per rank), each at its own layout.

Usage: torchrun --nproc-per-node 2 tests/training/checkpoint_layouts_check.py DATA_PREFIX SCENARIOS.json

SCENARIOS.json is a list of {"name", "args": [CLI overrides], "error_file": path or null, "config": path
or null}. Without a config, the args override the tiny test config (runs.py); with one, that YAML. A
scenario with an error_file must fail with CheckpointError before training: rank 0 writes the message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbdiff_megatron


def main(prefix: str, scenarios_file: str) -> None:
    nbdiff_megatron.install_compat()  # as the `nbdiff` command does (docs/ARCHITECTURE.md)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nbdiff_megatron.errors import CheckpointError
    from nbdiff_megatron.model.parallel import destroy_parallel
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.loop import train
    from tests.training.runs import TINY, tiny_overrides

    for scenario in json.loads(Path(scenarios_file).read_text()):
        if scenario.get("config"):
            cfg = load_config(scenario["config"], scenario["args"])
        else:
            cfg = load_config(TINY, tiny_overrides(prefix, *scenario["args"]))
        error_file = scenario.get("error_file")
        try:
            train(cfg, label=scenario["name"])
        except CheckpointError as exc:
            if not error_file:
                raise
            if dist.get_rank() == 0:
                Path(error_file).write_text(str(exc))
        else:
            if error_file:
                raise AssertionError(f"{scenario['name']}: trained, expected a CheckpointError")
        # The next run sets up its own layout on the same process group.
        parallel_state.destroy_model_parallel()
        dist.barrier()
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
