"""data.num_workers is real: the loop's DataLoader runs that many worker processes, same batches."""

from __future__ import annotations

import torch

from nbdiff_megatron.training.config import load_config
from nbdiff_megatron.training.setup import Placement, data_iterator

from .runs import TINY


class _Samples(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.full((4,), idx), "doc_ids": torch.zeros(4, dtype=torch.long)}


def _batches(workers: int, count: int = 7) -> tuple[list[torch.Tensor], object]:
    cfg = load_config(TINY, [f"--data.num_workers={workers}", "--train.micro_batch_size=4"])
    place = Placement(rank=0, world=1, dp=1, dp_rank=0, device=torch.device("cpu"))
    it = data_iterator(cfg, _Samples(), place, consumed_samples=8)
    return [next(it)["tokens"][:, 0].clone() for _ in range(count)], it


def test_num_workers_reaches_the_dataloader_and_keeps_the_order() -> None:
    serial, it0 = _batches(0)
    parallel, it2 = _batches(2)
    assert getattr(it0, "_num_workers", 0) == 0
    assert it2._num_workers == 2  # worker processes do the loading
    # Same samples in the same order (the sampler decides, not the workers), wrapping around.
    assert [b.tolist() for b in parallel] == [b.tolist() for b in serial]
    assert serial[0].tolist() == [8, 9, 10, 11] and serial[4].tolist() == [0, 1, 2, 3]
    del it2
