"""What a checkpoint states about its run, and what a resumed start may change (docs/resume.md).

Every checkpoint stores, in its train_state under `run`:

- `model`: the model section's fields that give the weights their meaning (shapes, head split, vocabulary
  padding, RoPE, norms, tying) and `loss.token_shift` (what the logits predict);
- `tokenizer`: vocabulary size, EOD, the [MASK] id the run noises with, and a hash of the vocabulary;
- `data`: what the saved data position (`consumed_samples`) counts: samples of `seq_length` tokens in the
  order that `data.mode`, the data files, `data.split` and `data.seed` give.

A start that loads the full state (continue, resume) compares all three with its own config; a fine-tune
(weights only) compares `model` and `tokenizer`. A difference there is refused before anything is written;
every other difference (layout, batch sizes, schedule, optimizer, logging, faults) is allowed and listed.
Checkpoints written before `run` existed are compared on what they hold: their saved config.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from nbdiff_megatron.errors import CheckpointError

MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "rotary_base",
    "rope_scaling",
    "norm_epsilon",
    "qk_layernorm",
    "add_qkv_bias",
    "tie_embeddings",
)
"""ModelConfig fields that change what the stored weights mean (the others: kernels, dtype, dropout,
recomputation, are how the same model runs)."""

DATA_FIELDS = (
    "mode",
    "split",
    "seed",
    "sft_template",
    "sft_system_template",
    "sft_overflow",
    "sft_valid_fraction",
)
"""DataConfig fields that change which sample the saved data position points at."""


def vocabulary_hash(tokenizer: Any) -> str:
    """A short hash of the vocabulary: every id's text, in id order (any tokenizer kind)."""
    digest = hashlib.sha256()
    for token_id in range(int(tokenizer.vocab_size)):
        try:
            text = tokenizer.decode([token_id])
        except Exception:  # an id that decodes to nothing this tokenizer can say (added [MASK])
            text = "\x00"
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.hexdigest()[:16]


def _data_files(data: dict[str, Any]) -> list[str]:
    """The data files by name (and blend weight): a moved copy of the same files is the same data."""
    paths = data.get("sft_data_path") if data.get("mode") == "sft" else data.get("data_path")
    return [os.path.basename(str(p).rstrip("/")) for p in " ".join(paths or []).split()]


def run_identity(config: dict[str, Any], tokenizer: Any, mask_id: int) -> dict[str, Any]:
    """The `run` record of a checkpoint, from the resolved config (TrainConfig.to_dict())."""
    model = config["model"]
    data = config["data"]
    return {
        "model": {
            **{name: model.get(name) for name in MODEL_FIELDS},
            "token_shift": config["loss"]["token_shift"],
        },
        "tokenizer": {
            "vocab_size": int(tokenizer.vocab_size),
            "eod": int(tokenizer.eod),
            "mask_id": int(mask_id),
            "vocab_hash": vocabulary_hash(tokenizer),
        },
        "data": {
            "unit": "samples",
            "seq_length": model["seq_length"],
            **{name: data.get(name) for name in DATA_FIELDS},
            "files": _data_files(data),
        },
    }


def _stored_identity(info: dict[str, Any]) -> dict[str, Any]:
    """The `run` record of a checkpoint, or what an older checkpoint's saved config says of it."""
    if isinstance(info.get("run"), dict):
        return info["run"]
    config = info.get("config") or {}
    model = config.get("model") or {}
    data = config.get("data") or {}
    stored: dict[str, Any] = {"model": {n: model[n] for n in MODEL_FIELDS if n in model}}
    if "token_shift" in (config.get("loss") or {}):
        stored["model"]["token_shift"] = config["loss"]["token_shift"]
    stored["data"] = {n: data[n] for n in DATA_FIELDS if n in data}
    if "seq_length" in model:
        stored["data"]["seq_length"] = model["seq_length"]
    if data:
        stored["data"]["files"] = _data_files(data)
    return stored


OPTION = {
    "token_shift": "loss.token_shift",
    "seq_length": "model.seq_length",
    "files": "data.data_path",
}


def _option(section: str, name: str) -> str:
    """The config option (or, for the tokenizer, the property) a record field stands for."""
    return OPTION.get(name, f"{section}.{name}")


def _differences(stored: dict[str, Any], new: dict[str, Any], sections: tuple[str, ...]):
    """(section, field, stored value, new value) for each field both records hold and that differ."""
    found = []
    for section in sections:
        old_part, new_part = stored.get(section) or {}, new.get(section) or {}
        for name, old in old_part.items():
            if name in new_part and new_part[name] != old:
                found.append((section, name, old, new_part[name]))
    return found


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "extra_transformer_config" and key != "rope_scaling":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def allowed_changes(stored_config: dict[str, Any] | None, config: dict[str, Any]) -> list[str]:
    """'section.field old -> new' for every other config field this start changes (allowed)."""
    if not stored_config:
        return []
    old, new = _flat(stored_config), _flat(config)
    skip = {"checkpoint.load", "checkpoint.finetune"}
    return [
        f"{key} {old[key]!r} -> {new[key]!r}"
        for key in sorted(new)
        if key in old and old[key] != new[key] and key not in skip
    ]


def check_resume(
    info: dict[str, Any],
    identity: dict[str, Any],
    config: dict[str, Any],
    *,
    checkpoint: str,
    weights_only: bool,
) -> list[str]:
    """Compare a checkpoint's train_state with this start; return the allowed changes (one line each).

    Raises CheckpointError naming every refused field, its stored and its new value, and commands that
    work: the same run with the stored values, or (for data changes) a new run from these weights.
    """
    stored = _stored_identity(info)
    refused_model = _differences(stored, identity, ("model", "tokenizer"))
    refused_data = [] if weights_only else _differences(stored, identity, ("data",))
    if refused_model or refused_data:
        raise CheckpointError(_refusal(refused_model, refused_data, checkpoint=checkpoint))
    # A fine-tune starts a new run: its differences from the previous phase are the point of it.
    return [] if weights_only else allowed_changes(info.get("config"), config)


def _refusal(model_diffs, data_diffs, *, checkpoint: str) -> str:
    diffs = model_diffs + data_diffs
    listed = ", ".join(f"{_option(s, n)} {old!r} -> {new!r}" for s, n, old, new in diffs)
    keep = " ".join(
        f"--{_option(s, n)}={old}" for s, n, old, _ in diffs if s != "tokenizer" and n != "files"
    )
    text = (
        f"checkpoint {checkpoint} was written by a run that differs from this config in: {listed}. "
    )
    if model_diffs:
        text += (
            "Its weights mean something else under the new model or tokenizer fields (loading "
            "them would mix stored and random rows or read them under another head split), so "
            "nothing was loaded or written. "
        )
    else:
        text += (
            "Its data position counts samples of another length, order or data, so nothing was "
            "loaded or written. "
        )
    fix = []
    if keep:
        fix.append(f"continue the run with its own values: the same command with {keep}")
    if any(s == "tokenizer" or n == "files" for s, n, _, _ in diffs):
        fix.append("continue with the tokenizer and data files the run was written with")
    if model_diffs:
        fix.append(
            "or train the new model from scratch in a new save directory "
            "(--checkpoint.save=<new dir>, no --checkpoint.load)"
        )
    else:
        fix.append(
            "or start a new run from these weights with the new data settings: "
            f"--checkpoint.save=<new dir> --checkpoint.load={checkpoint} "
            "--checkpoint.finetune=true"
        )
    return text + "To go on: " + "; ".join(fix) + "."
