"""The one place that imports megatron-core's dataset classes (slow to import, noisy on CPU).

Also where the differences between the megatron-core versions this project supports (0.16.x on
Python 3.11, 0.19.x on 3.12) are checked: a config field the installed version lacks is an error.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch.distributed as dist

from nbdiff_megatron.megatron_compat import known_fields

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
    """GPTDatasetConfig from keyword arguments, every one of which the installed version must know.

    All the fields we pass exist in 0.16.1 and 0.19.x; a field a later release renames or removes
    raises CompatibilityError naming it, instead of vanishing (its default could change the data).
    """
    return GPTDatasetConfig(**known_fields(GPTDatasetConfig, kwargs, what="GPTDatasetConfig"))


@contextlib.contextmanager
def single_process_rank():
    """Let megatron-core build datasets without torch.distributed.

    BlendedDataset._build_indices (0.16.1) calls `torch.distributed.get_rank()` unguarded when its
    cache misses; GPTDataset guards the same call with `is_initialized()`. Without a process group
    this process is rank 0, so answer 0 for the duration of the build, and only then.
    """
    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original
