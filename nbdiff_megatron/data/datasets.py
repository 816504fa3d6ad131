"""Training samples with document ids: megatron-core GPTDataset (pretraining) or packed SFT chats.

Every sample is a dict of three tensors of length L (the model's sequence length):

- `tokens`   LongTensor[L]: x_0, the clean sequence NBDiff noises. No separate labels: the AR loss
  shifts inside the x_0 half.
- `doc_ids`  LongTensor[L]: 0-based within the sample, non-decreasing; a token that follows an EOD
  starts a new document and the EOD belongs to the document it ends. The model uses them so that
  attention never crosses documents and position ids restart per document (docs/METHOD.md §3).
- `loss_mask` BoolTensor[L]: False on padding (and, for SFT, on everything but the responses).
- SFT samples only: `turn_ids` LongTensor[L], +1 right after each response inside a conversation;
  the training mask lets no token see a later turn (data/sft.py, method/masks.py).

megatron-core's GPTDataset draws `sequence_length + 1` tokens per sample (its tokens/labels pair
overlaps by one); we keep the first L of them as x_0, exactly the tokens megatron calls `tokens`.
Its samples run across document boundaries, which is why the document ids matter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nbdiff_megatron.data.config import DataConfig, parse_blend
from nbdiff_megatron.data.preprocess import read_sidecar
from nbdiff_megatron.data.sft import build_sft_datasets
from nbdiff_megatron.data.tokenizer import (
    MegatronTokenizerAdapter,
    Tokenizer,
    check_tokenizer_metadata,
)
from nbdiff_megatron.errors import ConfigError, DataError

Sample = dict[str, torch.Tensor]


def doc_ids_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document id of every token: the number of EODs strictly before it (works on [..., L])."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


class PretrainDataset(torch.utils.data.Dataset):
    """megatron-core GPTDataset / BlendedDataset samples as {tokens, doc_ids, loss_mask}."""

    def __init__(
        self,
        megatron_dataset: Any,
        seq_length: int,
        eod: int,
        pad: int,
        num_samples: int | None = None,
    ) -> None:
        self.megatron_dataset = megatron_dataset
        self.seq_length = seq_length
        self.eod = eod
        self.pad = pad
        n = len(megatron_dataset)
        # megatron may build more than asked (whole epochs); expose exactly what was asked for.
        self._length = n if num_samples is None else min(n, num_samples)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, idx: int) -> Sample:
        if not 0 <= idx < self._length:
            raise IndexError(f"sample {idx} out of range [0, {self._length})")
        sample = self.megatron_dataset[int(idx)]
        tokens = sample["tokens"][: self.seq_length].long().clone()
        # megatron zeroes loss_mask[i] where labels[i] (= the token at i + 1) is its padding, so
        # x_0 position i is real iff i == 0 or loss_mask[i - 1] is set. Padding is a suffix.
        megatron_mask = sample["loss_mask"][: self.seq_length] > 0
        loss_mask = torch.ones(self.seq_length, dtype=torch.bool)
        loss_mask[1:] = megatron_mask[:-1]
        n_real = int(loss_mask.long().cumprod(0).sum())
        loss_mask[n_real:] = False
        doc_ids = doc_ids_from_eod(tokens, self.eod)
        if n_real < self.seq_length:
            tokens[n_real:] = self.pad
            doc_ids[n_real:] = (doc_ids[n_real - 1] + 1) if n_real > 0 else 0
        return {"tokens": tokens, "doc_ids": doc_ids, "loss_mask": loss_mask}


def build_datasets(
    config: DataConfig,
    seq_length: int,
    tokenizer: Tokenizer,
    num_samples: Sequence[int | None],
    seed: int | None = None,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """(train, valid, test) datasets of {tokens, doc_ids, loss_mask} samples of length seq_length.

    `num_samples` gives the samples wanted per split (None: one pass over that split's data).
    A split with weight 0 (or, for SFT, no test split) comes back as None. `seed` overrides
    `config.seed`. Works in one process without torch.distributed; under torch.distributed every
    rank must call it (rank 0 builds megatron's index cache first).
    """
    if seq_length < 2:
        raise ConfigError(f"seq_length must be >= 2, got {seq_length}.")
    if len(num_samples) != 3:
        raise ConfigError(f"num_samples must give (train, valid, test), got {num_samples}.")
    config.validate()
    seed = config.seed if seed is None else seed
    if config.mode == "sft":
        return build_sft_datasets(config, seq_length, tokenizer, num_samples, seed)
    return _build_pretrain_datasets(config, seq_length, tokenizer, num_samples, seed)


SPLITS = ("training", "validation", "test")
"""The splits of `build_datasets`' result, in its order."""


def required_split(datasets: Sequence[Any], split: str, fix: str) -> Any:
    """The `split` dataset of `build_datasets`' result; DataError, ending with `fix` (what the user
    changes), when the config gives it no samples."""
    dataset = datasets[SPLITS.index(split)]
    if dataset is None or len(dataset) == 0:
        raise DataError(f"the {split} split is empty: {fix}")
    return dataset


def index_cache_dir(config: DataConfig) -> str | None:
    """Where megatron-core keeps the pretraining datasets' index files (document, sample and shuffle
    indices): data.data_cache_path, else a `cache` folder beside the first data prefix. None for SFT
    data, which keeps no index cache."""
    if config.mode == "sft":
        return None
    prefixes, _ = parse_blend(config.data_path)
    return config.data_cache_path or os.path.join(
        os.path.dirname(os.path.abspath(prefixes[0])), "cache"
    )


FULL_SCAN_TOKENS = 32 * 2**20
"""Token-id check: a .bin of up to this many tokens is scanned whole; a larger one in SCAN_WINDOWS
evenly spread windows of SCAN_WINDOW tokens (a bounded read at any size)."""
SCAN_WINDOWS = 256
SCAN_WINDOW = 2**16


def _largest_token_id(tokens: np.ndarray) -> int:
    if tokens.size <= FULL_SCAN_TOKENS:
        return int(tokens.max()) if tokens.size else -1
    starts = np.linspace(0, tokens.size - SCAN_WINDOW, SCAN_WINDOWS).astype(np.int64)
    return max(int(tokens[s : s + SCAN_WINDOW].max()) for s in starts)


def check_indexed_dataset(prefix: str, vocab_size: int) -> None:
    """Raise DataError naming the file when `prefix.bin` does not hold what `prefix.idx` describes
    (a truncated copy, an index of other data) or holds token ids outside the vocabulary (data
    made with another tokenizer, e.g. by Megatron-LM without our sidecar). Checked before training:
    otherwise a negative offset or an embedding IndexError would stop the run much later."""
    # lazy: megatron_io imports megatron-core; `nbdiff ablate --help` imports this module
    from nbdiff_megatron.data import megatron_io

    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    try:
        index = megatron_io.IndexedDataset(prefix, mmap=True).index
        lengths, pointers = index.sequence_lengths, index.sequence_pointers
        itemsize = np.dtype(index.dtype).itemsize
    except Exception as exc:
        raise DataError(
            f"{idx_path} cannot be read ({type(exc).__name__}: {exc}); the index is damaged or "
            "not a megatron indexed dataset: copy it again or run `nbdiff preprocess` again"
        ) from None
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = os.path.getsize(bin_path)
    if actual != expected:
        what = "is truncated" if actual < expected else "holds more than its index describes"
        raise DataError(
            f"{bin_path} {what}: {actual:,} bytes, but {idx_path} describes {expected:,} "
            f"({len(lengths):,} sequences); the copy is incomplete or the two files come from "
            "different runs: copy both again or run `nbdiff preprocess` again"
        )
    tokens = np.memmap(bin_path, dtype=index.dtype, mode="r", shape=(expected // itemsize,))
    largest = _largest_token_id(tokens)
    if largest >= vocab_size:
        raise DataError(
            f"{bin_path} holds token id {largest}, outside the tokenizer's {vocab_size} ids: the "
            "data was made with another tokenizer; set data.tokenizer_model to that one or run "
            "`nbdiff preprocess` again with this one"
        )


def _build_pretrain_datasets(config, seq_length, tokenizer, num_samples, seed):
    # lazy: megatron_io imports megatron-core; `nbdiff ablate --help` imports this module
    from nbdiff_megatron.data import megatron_io

    prefixes, weights = parse_blend(config.data_path)
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DataError(
                    f"data.data_path prefix {prefix!r}: {prefix + ext} does not exist; give the "
                    "prefix without .bin/.idx (e.g. out/corpus_text_document) or run "
                    "`nbdiff preprocess` first."
                )
        sidecar = read_sidecar(prefix)
        if sidecar is not None:
            check_tokenizer_metadata(sidecar, tokenizer, f"dataset {prefix}")
        check_indexed_dataset(prefix, int(tokenizer.vocab_size))
    cache = index_cache_dir(config)
    sizes = list(num_samples)
    if weights is not None:
        # megatron's builder needs a size for every weighted split; an unsized split gets one pass
        # over its documents, which we cannot know here, so ask the user.
        if any(s is None for s in sizes):
            raise ConfigError(
                "a weighted data.data_path blend needs num_samples for every split (None given)."
            )
    mcfg = megatron_io.gpt_dataset_config(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=config.split,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache,
        mmap_bin_files=True,
        add_extra_token_to_sequence=True,
        drop_last_partial_validation_sequence=True,
    )
    # megatron logs every index it builds at INFO; keep the training log readable.
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    builder = megatron_io.BlendedMegatronDatasetBuilder(
        megatron_io.GPTDataset, sizes, lambda: True, mcfg
    )
    try:
        with megatron_io.single_process_rank():
            built = builder.build()
    except AssertionError as exc:
        raise DataError(
            f"megatron-core could not build the datasets from {prefixes} with split "
            f"{config.split!r} and num_samples {list(num_samples)} ({exc or 'assertion failed'}); "
            "a split may hold too few documents for one sample of length "
            f"{seq_length}."
        ) from exc
    out = []
    for dataset, n in zip(built, sizes):
        if dataset is None or len(dataset) == 0:
            out.append(None)
        else:
            out.append(PretrainDataset(dataset, seq_length, tokenizer.eod, tokenizer.pad, n))
    return tuple(out)
