"""Run by test_tp_group.py in a fresh process with NBDIFF_SHOW_DEPRECATIONS=1.

`nbdiff train` (a tiny model, 2 steps, a checkpoint) then `nbdiff generate` from that checkpoint, in
one interpreter, as the CLI runs them; then CONTROL on stderr and one forward of megatron-core's own
RowParallelLinear (built and called without a group), which still warns "Passing tp_group": proof
that the installed megatron-core raises the notice and that the switch lets it through to stderr.

Usage: python tests/training/tp_group_check.py DATA_PREFIX SAVE_DIR
"""

from __future__ import annotations

import sys

CONTROL = "=== control: megatron-core's RowParallelLinear without a group"


def control_forward() -> None:
    """One forward of a stock RowParallelLinear with no tp_group (megatron-core warns)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nbdiff_megatron.model.parallel import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1, 1, 1)
    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True
    )
    layer = RowParallelLinear(
        8,
        8,
        config=config,
        init_method=torch.nn.init.zeros_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
    )
    layer(torch.zeros(2, 1, 8))


def main(prefix: str, save: str) -> int:
    from nbdiff_megatron.cli import main as nbdiff
    from tests.training.runs import TINY, tiny_overrides

    train = ["train", "--config", TINY]
    train += tiny_overrides(prefix, "--train.steps=2", f"--checkpoint.save={save}")
    if nbdiff(train) != 0:
        return 1
    generate = ["generate", "--load", save, "--prompt", "In the beginning", "--max-new-tokens", "8"]
    if nbdiff(generate) != 0:
        return 1
    print(CONTROL, file=sys.stderr, flush=True)
    control_forward()
    return 0


if __name__ == "__main__":  # the first checkpoint save starts a spawn Manager: guard the entry
    sys.exit(main(sys.argv[1], sys.argv[2]))
