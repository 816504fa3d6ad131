"""Data: tokenizers, `nbdiff preprocess` into Megatron indexed datasets, training samples with
document ids (pretraining through megatron-core's GPTDataset, SFT chats packed best-fit-decreasing),
a resumable DataLoader, and the bundled corpus / tokenizer / chat set.

Names are imported lazily so that `import nbdiff_megatron.data` does not pull in megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "load_tokenizer_from_metadata": "tokenizer",
    "tokenizer_metadata": "tokenizer",
    "build_datasets": "datasets",
    "doc_ids_from_eod": "datasets",
    "build_dataloader": "loader",
    "collate_samples": "loader",
    "DeterministicSampler": "loader",
    "preprocess": "preprocess",
    "read_sidecar": "preprocess",
    "pack_best_fit_decreasing": "packing",
    "ChatFormatter": "sft",
    "bundled_corpus_path": "bundled",
    "bundled_tokenizer_path": "bundled",
    "bundled_tokenizer_dir": "bundled",
    "bundled_chat_path": "bundled",
    "prepare_bundled_corpus": "bundled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nbdiff_megatron.data' has no attribute {name!r}")
    module = importlib.import_module(f"nbdiff_megatron.data.{_EXPORTS[name]}")
    return getattr(module, name)
