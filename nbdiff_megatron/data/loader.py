"""A plain DataLoader over the sample datasets that resumes exactly at a consumed-samples count.

The datasets are already shuffled (megatron-core shuffles its sample index; SFT packing shuffles
with the seed), so the global order is simply sample 0, 1, 2, ... Each optimizer step consumes a
global batch; each micro-batch of the global order (`micro_batch_size * data_parallel_size`
consecutive samples) is split into equal contiguous shares, one per data-parallel rank, as
megatron-LM's pretraining sampler does. Resuming at `consumed_samples` therefore replays exactly the
samples a run that never stopped would have seen.

The training loop reads its micro-batches through `build_dataloader(cyclic=True)` (training/setup.py
`data_iterator`), with the data-parallel rank WITHOUT context parallelism: the CP ranks of a DP rank get the same
micro-batches (each feeds its own shard of them to the model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from nbdiff_megatron.errors import ConfigError

Sample = dict[str, torch.Tensor]


class DeterministicSampler(torch.utils.data.Sampler):
    """Batches of sample indices for one data-parallel rank, starting at `consumed_samples`.

    `consumed_samples` counts samples of the global order consumed by all ranks together (any count:
    a run resumed with another micro-batch or DP size starts where the last one stopped). With
    `cyclic`, indices wrap around the dataset forever (for evaluation loops); otherwise the
    incomplete last global micro-batch is dropped.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        cyclic: bool = False,
    ) -> None:
        if total_samples <= 0:
            raise ConfigError(f"the dataset is empty (total_samples={total_samples}).")
        if micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size must be > 0, got {micro_batch_size}.")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ConfigError(
                f"data_parallel_rank {data_parallel_rank} is not in [0, {data_parallel_size})."
            )
        # Any position works: every step takes the next global batch of the global order from it,
        # whatever the micro-batch size (a resumed run may change it, docs/resume.md).
        if consumed_samples < 0:
            raise ConfigError(f"consumed_samples must be >= 0, got {consumed_samples}.")
        if not cyclic and consumed_samples > total_samples:
            raise ConfigError(
                f"consumed_samples {consumed_samples} exceeds the dataset's {total_samples} samples."
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.world = data_parallel_size
        self.cyclic = cyclic

    def __len__(self) -> int:
        if self.cyclic:
            raise TypeError("a cyclic sampler has no length")
        step = self.micro_batch_size * self.world
        return (self.total_samples - self.consumed_samples) // step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.world
        start = self.consumed_samples
        while self.cyclic or start + step <= self.total_samples:
            first = start + self.rank * self.micro_batch_size
            yield [(first + j) % self.total_samples for j in range(self.micro_batch_size)]
            start += step


def collate_samples(samples: Sequence[Sample]) -> Sample:
    """Stack sample dicts into a batch: every value becomes [b, L]."""
    if not samples:
        raise ValueError("collate_samples got an empty list of samples")
    keys = samples[0].keys()
    return {key: torch.stack([s[key] for s in samples]) for key in keys}


def build_dataloader(
    dataset: torch.utils.data.Dataset,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
    cyclic: bool = False,
) -> torch.utils.data.DataLoader:
    """DataLoader yielding this rank's micro-batches from `consumed_samples` on (see module doc)."""
    sampler = DeterministicSampler(
        len(dataset),
        consumed_samples,
        micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
        cyclic=cyclic,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Each new iterator draws a worker base seed; from its own generator, not the global RNG,
        # whose state a resumed run restores (dropout) and must not see shifted by the loader.
        generator=torch.Generator().manual_seed(0),
    )
