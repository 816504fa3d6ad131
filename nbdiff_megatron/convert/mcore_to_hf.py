"""megatron-core dist checkpoint (converted or trained) -> HF folder that transformers loads.

The input is anything `nbdiff train --checkpoint.load` accepts: a save directory (its `latest`
checkpoint) or one `iter_XXXXXXX` directory, written by `nbdiff convert hf-to-mcore` or `nbdiff train`
under any TP/PP layout. The model config comes from the checkpoint's `nbdiff_metadata` (converted
checkpoints), its `train_state` config (trained ones), or `--model-config` (a training YAML or the
`model.yaml` the converter writes).

The output is a plain transformers folder (Qwen3ForCausalLM, Qwen2ForCausalLM or LlamaForCausalLM,
chosen from the model's options): `config.json` (with `mask_token_id` and an `nbdiff` block for
`nbdiff generate`), safetensors shards written one at a time (with an index when there are several),
the tokenizer files and `nbdiff_metadata.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from nbdiff_megatron.checkpoint import common, mcore_io
from nbdiff_megatron.checkpoint.dist import find_checkpoint, read_common_state
from nbdiff_megatron.checkpoint.families import (
    FAMILIES,
    export_family,
    hf_config_for_export,
)
from nbdiff_megatron.checkpoint.hf_io import (
    TOKENIZER_FILES,
    ShardWriter,
    copy_files,
    plan_shards,
    staged_rename,
)
from nbdiff_megatron.checkpoint.tables import expected_hf_shape, table_for, to_hf
from nbdiff_megatron.convert import hf_export
from nbdiff_megatron.data.tokenizer import load_tokenizer, tokenizer_in_run
from nbdiff_megatron.errors import ConfigError, ConversionError, NBDiffError
from nbdiff_megatron.model.config import ModelConfig


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    raw = str(text).strip().upper()
    for suffix, factor in units.items():
        if raw.endswith(suffix):
            try:
                return int(float(raw[: -len(suffix)]) * factor)
            except ValueError:
                break
    try:
        return int(raw)
    except ValueError:
        raise ConversionError(
            f"--max-shard-size {text!r} is not a size like 2GB or 500MB"
        ) from None


def _model_config_from_yaml(path: str) -> ModelConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionError(f"--model-config {path} cannot be read ({exc})") from exc
    section = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ConversionError(f"--model-config {path} has no `model:` section")
    try:
        return ModelConfig.from_dict(section)
    except ConfigError as exc:
        raise ConversionError(f"--model-config {path}: {exc}") from exc


def _find(mapping: Any, *paths: tuple[str, ...]) -> Any:
    for path in paths:
        value = mapping
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _tokenizer_mask_id(kind: str | None, model: str) -> int | None:
    """[MASK] id of the tokenizer a training run recorded (None if it cannot be loaded here)."""
    try:
        return int(load_tokenizer(kind or "HuggingFaceTokenizer", model).mask_id)
    except NBDiffError:
        return None


def describe_checkpoint(ckpt: Path, model_config: str | None) -> dict[str, Any]:
    """Metadata of a checkpoint: model config, mask id, tokenizer, family, dtype, source HF config."""
    state = read_common_state(ckpt)
    meta = state.get(mcore_io.METADATA_KEY)
    if isinstance(meta, dict):
        info = dict(meta)
    else:
        train_state = state.get("train_state") or {}
        tok = train_state.get("tokenizer") if isinstance(train_state.get("tokenizer"), dict) else {}
        info = {
            "model": _find(train_state, ("config", "model"), ("model_config",), ("model",)),
            "mask_id": _find(train_state, ("mask_id",), ("config", "noise", "mask_token_id")),
            "architecture": _find(train_state, ("architecture",)) or {},
            "nbdiff": {
                "block_size": _find(train_state, ("config", "curriculum", "target_block_size")),
                "token_shift": _find(train_state, ("config", "loss", "token_shift")),
                "mask_kind": _find(train_state, ("config", "curriculum", "mask_kind")),
                # nbdiff train packs documents: blocks count from each document's start
                "block_align": train_state.get("block_align") or "document",
            },
            "trained_context": _find(train_state, ("config", "model", "seq_length")),
            "tokenizer_type": tok.get("type")
            or tok.get("tokenizer_type")
            or _find(train_state, ("config", "data", "tokenizer_type")),
            # the run's own tokenizer copy first (a run exported from another directory)
            "tokenizer_model": tokenizer_in_run(
                ckpt.parent,
                tok.get("model")
                or tok.get("tokenizer_model")
                or _find(train_state, ("config", "data", "tokenizer_model")),
            ),
        }
        if info["mask_id"] is None and info["tokenizer_model"]:
            info["mask_id"] = _tokenizer_mask_id(info["tokenizer_type"], info["tokenizer_model"])
    if model_config is not None:
        info["model"] = _model_config_from_yaml(model_config).to_dict()
    if not isinstance(info.get("model"), dict):
        raise ConversionError(
            f"checkpoint {ckpt} records no model config (neither nbdiff_metadata nor a training "
            "config); pass --model-config with the training YAML (or the converter's model.yaml)"
        )
    try:
        info["model_config"] = ModelConfig.from_dict(info["model"])
    except (ConfigError, TypeError) as exc:
        raise ConversionError(
            f"checkpoint {ckpt}: the recorded model config is invalid ({exc})"
        ) from exc
    return info


def _tokenizer_sources(ckpt: Path, info: dict[str, Any], tokenizer: str | None) -> list[Path]:
    """Tokenizer files to copy: --tokenizer, the save dir's tokenizer/, or the recorded model."""
    candidates: list[Path] = []
    if tokenizer is not None:
        candidates.append(Path(tokenizer))
    else:
        candidates += [ckpt / common.TOKENIZER_DIR, ckpt.parent / common.TOKENIZER_DIR]
        recorded = info.get("tokenizer_model") or (info.get("tokenizer") or {}).get(
            "tokenizer_model"
        )
        if recorded and Path(recorded).is_file() and Path(recorded).name == "tokenizer.json":
            recorded = str(Path(recorded).parent)  # copy its tokenizer_config.json too
        if recorded:
            candidates.append(Path(recorded))
    for cand in candidates:
        if cand.is_dir():
            files = [cand / f for f in TOKENIZER_FILES if (cand / f).is_file()]
            if files:
                return files
        elif cand.is_file():
            return [cand]
    if tokenizer is not None:
        raise ConversionError(f"--tokenizer {tokenizer} holds no tokenizer files")
    return []


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    tokenizer: str | None = None,
    model_config: str | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    show_progress: bool = True,
    include_tokenizer: bool = True,
) -> common.ConversionSummary:
    """Export a megatron-core NBDiff checkpoint as an HF (transformers) folder.

    Args:
        mcore_dir: save directory or iter_XXXXXXX directory.
        out_dir: output folder (must not exist unless overwrite); written atomically.
        dtype: "fp32" / "bf16"; None = the dtype recorded at conversion, else the stored one.
        tokenizer: tokenizer folder/file to copy; None = the checkpoint's own tokenizer/ folder.
        model_config: YAML with a `model:` section, for checkpoints that record none.
        max_shard_size: largest safetensors shard (e.g. "2GB").
        show_progress: tqdm bar over layers on stderr.
        include_tokenizer: False exports without tokenizer files (and without
            generation_config.json); True (default) fails when none is found.
    """
    timer = common.Timer()
    common.check_dtype_arg(dtype)
    ckpt = find_checkpoint(mcore_dir)
    info = describe_checkpoint(ckpt, model_config)
    cfg: ModelConfig = info["model_config"]
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConversionError(
            f"checkpoint {ckpt}: the recorded model config is invalid ({exc})"
        ) from exc
    family_name = export_family(cfg)
    family = FAMILIES[family_name]
    tokenizer_files = _tokenizer_sources(ckpt, info, tokenizer) if include_tokenizer else []
    if include_tokenizer and not tokenizer_files:
        raise ConversionError(
            f"checkpoint {ckpt}: no tokenizer files found (recorded: "
            f"{info.get('tokenizer_model') or 'none'}; no {common.TOKENIZER_DIR}/ beside it); pass "
            "--tokenizer FOLDER_OR_FILE, or --no-tokenizer to export without it (an HF folder "
            "without tokenizer and generation_config.json)"
        )
    template = mcore_io.template_sharded_state_dict(cfg, 1)
    reader = mcore_io.CheckpointReader(ckpt)
    mcore_io.check_stored_keys(template, reader, cfg.num_layers)
    embed_key = template["embedding.word_embeddings.weight"].key
    target = dtype or info.get("dtype") or common.dtype_name(reader.dtype(embed_key))
    torch_dtype = common.DTYPES[target]

    units = table_for(family, cfg)
    plan = _shard_plan(units, cfg, torch_dtype, parse_size(max_shard_size))
    source_hf = (info.get("architecture") or {}).get("hf_config")
    mask_id = info.get("mask_id")
    nbdiff = info.get("nbdiff") or {}
    extra = {"mask_token_id": mask_id, "nbdiff": {**nbdiff, "mask_token_id": mask_id}}
    config = hf_config_for_export(
        cfg,
        family_name,
        source_hf_config=source_hf,
        dtype=target,
        extra=extra,
        context_length=info.get("trained_context"),
    )
    out = Path(out_dir)
    summary = common.ConversionSummary(
        "mcore-to-hf", str(ckpt), str(out.resolve()), family_name, target, mask_id=mask_id
    )
    with common.staging_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, plan)
        names_per_unit = [[rule.mcore for rule in unit if rule.mcore] for unit in units]
        loaded_units = mcore_io.load_units(template, reader, names_per_unit, cfg.vocab_size)
        for unit, loaded in common.progress(
            zip(units, loaded_units), total=len(units), desc="mcore-to-hf", enabled=show_progress
        ):
            _write_unit(unit, loaded, writer, cfg, torch_dtype, summary)
            del loaded
        writer.finish()
        if tokenizer_files:
            copy_files(tokenizer_files, tmp)
        else:
            summary.notes.append("--no-tokenizer: the export holds no tokenizer files")
        _write_hf_files(tmp, config, info, family_name, summary)
        public = {k: v for k, v in info.items() if k != "model_config"}
        public["exported_as"] = family_name
        public["dtype"] = target
        (tmp / common.METADATA_FILE).write_text(json.dumps(public, indent=2, default=str) + "\n")
        staged_rename(tmp, out.resolve(), overwrite)
    summary.seconds = timer.elapsed()
    return summary


def _shard_plan(
    units: list[list[Any]], cfg: ModelConfig, dtype: torch.dtype, max_shard_bytes: int
) -> list[list[str]]:
    """The HF tensor names of each safetensors shard, from their sizes in `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [
        [
            (name, itemsize * _numel(expected_hf_shape(name, cfg, cfg.vocab_size)))
            for rule in unit
            for name in rule.hf
        ]
        for unit in units
    ]
    return plan_shards(sizes, max_shard_bytes)


def _write_unit(
    unit: list[Any],
    loaded: dict[str, torch.Tensor],
    writer: ShardWriter,
    cfg: ModelConfig,
    dtype: torch.dtype,
    summary: common.ConversionSummary,
) -> None:
    """Convert one unit of the table's loaded megatron tensors to HF tensors and write them."""
    for rule in unit:
        outputs = to_hf(rule, loaded[rule.mcore], cfg)
        for name, tensor in zip(rule.hf, outputs):
            want = expected_hf_shape(name, cfg, cfg.vocab_size)
            if tuple(tensor.shape) != want:
                raise ConversionError(
                    f"internal: {name} came out {tuple(tensor.shape)}, expected {want}"
                )
            writer.add(name, tensor.to(dtype))
            summary.tensors += 1
            summary.parameters += tensor.numel()


def _write_hf_files(
    tmp: Path,
    config: Any,
    info: dict[str, Any],
    family_name: str,
    summary: common.ConversionSummary,
) -> None:
    """config.json (with the tokenizer's special tokens when it loads), generation_config.json, the
    block-generation code and the model card, into the staging folder `tmp`."""
    special = hf_export.special_token_ids(tmp, info)
    if special is None:
        summary.notes.append(
            "the tokenizer could not be loaded: config.json keeps the source's "
            "special token ids and no generation_config.json is written"
        )
    else:
        hf_export.set_special_tokens(config, special)
    config.save_pretrained(str(tmp))
    if special is not None:
        hf_export.write_generation_config(tmp, special, info.get("mask_id"))
    hf_export.write_block_generate(tmp)
    hf_export.write_model_card(tmp, family_name, config)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
