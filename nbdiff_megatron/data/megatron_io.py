"""The one place that imports megatron-core's dataset classes (slow to import, noisy on CPU).

Also smooths over the differences between megatron-core versions this project supports (0.16.x on
Python 3.11, 0.19.x on 3.12): config fields are passed only when the installed version has them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

with warnings.catch_warnings():
    # megatron-core warns at import time that Transformer Engine / Apex are absent (expected on CPU)
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

__all__ = [
    "BlendedMegatronDatasetBuilder",
    "GPTDataset",
    "GPTDatasetConfig",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "gpt_dataset_config",
    "optimal_dtype",
    "single_process_rank",
]


def optimal_dtype(vocab_size: int):
    """uint16 below 65,500 ids, else int32: the rule Megatron's own preprocessing uses."""
    return DType.optimal_dtype(vocab_size)


def gpt_dataset_config(**kwargs: Any) -> GPTDatasetConfig:
    """GPTDatasetConfig from the keyword arguments this megatron-core version knows.

    Fields we pass that an older/newer version lacks are dropped; a field that matters for
    correctness must be in REQUIRED (present in 0.16.1 and 0.19.x).
    """
    required = {
        "random_seed",
        "sequence_length",
        "blend",
        "split",
        "tokenizer",
        "reset_position_ids",
        "reset_attention_mask",
        "eod_mask_loss",
    }
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    missing = required - known
    if missing:
        raise RuntimeError(f"megatron-core's GPTDatasetConfig lacks {sorted(missing)}")
    return GPTDatasetConfig(**{k: v for k, v in kwargs.items() if k in known})


@contextlib.contextmanager
def single_process_rank():
    """Let megatron-core build datasets without torch.distributed.

    BlendedDataset._build_indices (0.16.1) calls `torch.distributed.get_rank()` unguarded when its
    cache misses; GPTDataset guards the same call with `is_initialized()`. Without a process group
    this process is rank 0, so answer 0 for the duration of the build, and only then.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original
