"""In-memory HF -> NBDiff model loading (for `nbdiff generate --load HF_FOLDER`).

`load_hf_into_model(path, vocab_size=..., build=...)` maps an HF folder through the same family table
and transforms as `hf_to_mcore`, builds the model with the caller's `build(ModelConfig)` and copies the
weights into this rank's shard (any TP/PP, via `model.parallel.load_full_state_dict`). Meant for
models that fit in memory; large models should be converted once with `nbdiff convert hf-to-mcore`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nbdiff_megatron.checkpoint.families import detect_family, model_config_from_hf
from nbdiff_megatron.checkpoint.hf_io import HFCheckpoint
from nbdiff_megatron.checkpoint.tables import VocabSizes, table_for, to_mcore
from nbdiff_megatron.errors import ConversionError
from nbdiff_megatron.model.config import ModelConfig
from nbdiff_megatron.model.parallel import load_full_state_dict


def load_hf_into_model(
    path: str | Path,
    *,
    vocab_size: int = 0,
    build: Callable[[ModelConfig], torch.nn.Module],
) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """(model, config, info) from an HF folder; info holds mask_id, token_shift, block_size if known.

    `vocab_size` is the tokenizer's size ([MASK] included); the model gets max(HF vocab, it) rows,
    new rows initialised to the mean embedding (as in hf_to_mcore).
    """
    hf = HFCheckpoint(path)
    family = detect_family(hf.config, str(hf.path / "config.json"))
    hf_vocab = int(hf.config.get("vocab_size") or 0)
    mask_id = hf.config.get("mask_token_id")
    real = max(hf_vocab, int(vocab_size), int(mask_id) + 1 if mask_id is not None else 0)
    cfg, dropped_o_bias = model_config_from_hf(
        hf.config, family, vocab_size=real, source=str(hf.path / "config.json")
    )
    full: dict[str, torch.Tensor] = {}
    vocab = VocabSizes(hf=hf_vocab, real=real, padded=real)  # load_full_state_dict pads per TP
    for unit in table_for(family, cfg, dropped_o_bias=dropped_o_bias):
        for rule in unit:
            missing = [n for n in rule.hf if n not in hf.weight_map]
            if missing:
                raise ConversionError(f"{hf.path}: missing tensors: {missing}")
            tensor = to_mcore(rule, [hf.get(n).float() for n in rule.hf], cfg, vocab)
            if rule.mcore is not None:
                full[rule.mcore] = tensor
    model = build(cfg)
    load_full_state_dict(model, full)
    nbdiff = hf.config.get("nbdiff") or {}
    info = {
        k: v
        for k, v in {
            "mask_id": mask_id,
            "token_shift": nbdiff.get("token_shift"),
            "block_size": nbdiff.get("block_size"),
        }.items()
        if v is not None
    }
    return model, cfg, info
