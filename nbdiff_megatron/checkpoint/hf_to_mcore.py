"""HF folder -> megatron-core dist checkpoint that `nbdiff train --checkpoint.load=OUT` reads.

Output layout (the save-directory layout of `training/checkpointing.py`, so `--checkpoint.load=OUT`
with `--checkpoint.finetune=true` finds it):

    OUT/iter_0000000/        the dist_checkpointing directory: {'model': sharded state dict} plus the
                             common entry `nbdiff_metadata` (below)
    OUT/latest               "0"
    OUT/tokenizer/           the HF tokenizer files, copied unchanged
    OUT/nbdiff_metadata.json the same metadata, readable without megatron
    OUT/model.yaml           the `model:` section to paste into a training config

The metadata holds the ModelConfig, the source architecture and HF config, the tokenizer metadata and
[MASK] id, the dtype, the intended TP/PP layout and the NBDiff settings (block size, token shift, mask
kind). The checkpoint itself is layout-free: megatron-core reshards it on load under any TP/PP; `--tp`
only sets the vocabulary padding (to the multiple megatron allocates under that TP) and validates that
the shape divides, `--pp` only validates and is recorded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from nbdiff_megatron.checkpoint import common, mcore_io
from nbdiff_megatron.checkpoint.families import (
    IGNORED_HF_SUFFIXES,
    detect_family,
    model_config_from_hf,
)
from nbdiff_megatron.checkpoint.hf_io import (
    TOKENIZER_FILES,
    HFCheckpoint,
    copy_files,
    staged_rename,
)
from nbdiff_megatron.checkpoint.tables import VocabSizes, expected_hf_shape, table_for, to_mcore
from nbdiff_megatron.data.tokenizer import load_tokenizer
from nbdiff_megatron.errors import ConfigError, ConversionError
from nbdiff_megatron.model.config import ModelConfig


def _resolve_tokenizer(hf: HFCheckpoint, tokenizer: str | None) -> Any | None:
    """Our tokenizer wrapper for the model's tokenizer (adds [MASK] when missing), or None."""
    if tokenizer is None:
        if not hf.has_tokenizer():
            return None
        tokenizer = str(hf.path)
    path = Path(tokenizer)
    if (
        path.is_dir()
        and not (path / "tokenizer.json").is_file()
        and (path / "tokenizer.model").is_file()
    ):
        return load_tokenizer("SentencePieceTokenizer", str(path / "tokenizer.model"))
    if path.suffix == ".model":
        return load_tokenizer("SentencePieceTokenizer", str(path))
    return load_tokenizer("HuggingFaceTokenizer", str(path))


def _tokenizer_files(hf: HFCheckpoint, tokenizer: str | None) -> list[Path]:
    if tokenizer is None:
        return hf.tokenizer_files()
    path = Path(tokenizer)
    if path.is_dir():
        return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    return [path]


def _source_dtype(hf_config: dict[str, Any]) -> str:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return common.HF_DTYPE_NAMES.get(str(name).replace("torch.", ""), "fp32")


def _check_tensors(
    hf: HFCheckpoint, units: list[list[Any]], cfg: ModelConfig, hf_vocab: int, tied_lm_head: bool
) -> None:
    """Missing / unexpected / wrongly shaped HF tensors -> one ConversionError listing them all."""
    needed = {name for unit in units for rule in unit for name in rule.hf}
    present = set(hf.names())
    optional = {"lm_head.weight"} if tied_lm_head else set()
    missing = needed - present
    unexpected = {n for n in present - needed - optional if not n.endswith(IGNORED_HF_SUFFIXES)}
    wrong = []
    for name in sorted((needed | optional) & present):
        shape, dtype = hf.header(name)
        want = expected_hf_shape(name, cfg, hf_vocab)
        if shape != want:
            wrong.append(f"{name} {shape} (expected {want})")
        elif dtype not in ("F32", "BF16", "F16"):
            wrong.append(f"{name} has dtype {dtype} (expected F32, BF16 or F16)")
    problems = []
    if missing:
        problems.append(f"missing tensors: {common.listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {common.listing(unexpected)}")
    if wrong:
        problems.append(f"wrongly shaped tensors: {common.listing(wrong)}")
    if problems:
        raise ConversionError(
            f"{hf.path} does not match its config.json ({cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}): " + "; ".join(problems)
        )


def _mask_row(
    mask_id: int | None, tok: Any | None, hf_vocab: int, notes: list[str]
) -> tuple[int, int]:
    """([MASK] id, real vocabulary size): the given id, else the tokenizer's, else a new row after
    the HF vocabulary (a row added for it is noted)."""
    if mask_id is None and tok is not None:
        mask_id = int(tok.mask_id)
    if mask_id is None:
        mask_id = hf_vocab
        notes.append(
            f"no tokenizer: [MASK] gets a new row, id {mask_id} (pass --mask-id to reuse one)"
        )
    if mask_id < 0 or mask_id > max(hf_vocab, tok.vocab_size if tok else 0):
        raise ConversionError(
            f"[MASK] id {mask_id} is outside the vocabulary (HF vocab_size {hf_vocab}); pass a "
            "--mask-id inside it or equal to it (one new row)"
        )
    real_vocab = max(hf_vocab, mask_id + 1)
    if tok is not None and tok.vocab_size > real_vocab:
        raise ConversionError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's embedding only {hf_vocab} "
            "rows: pass the tokenizer that belongs to this model (--tokenizer)"
        )
    if real_vocab > hf_vocab:
        notes.append(
            f"added {real_vocab - hf_vocab} embedding row(s) for [MASK] (id {mask_id}), "
            "initialised to the mean embedding"
        )
    return mask_id, real_vocab


def _check_layout(cfg: ModelConfig, tp: int, pp: int, block_size: int | None) -> None:
    """ConversionError naming the layouts that fit when --tp / --pp cannot split this model."""
    try:
        cfg.validate(tp=tp, pp=pp, block_size=block_size)
    except ConfigError as exc:
        # The config's advice (change the heads, the layers) is not the converter's to follow.
        reason = re.split(r": (?:change|use|pick) ", str(exc))[0]
        raise ConversionError(
            f"the model cannot be laid out with --tp {tp} --pp {pp} ({reason}); the converter keeps "
            f"the checkpoint's shape: {_layouts_that_fit(cfg, block_size)}"
        ) from exc


def _check_table_covers_model(
    units: list[list[Any]], template: dict[str, Any], family: str
) -> None:
    """The conversion table maps exactly the model's tensors (an internal check of the tables)."""
    mapped = {rule.mcore for unit in units for rule in unit if rule.mcore}
    expected = {name for name, entry in template.items() if mcore_io.is_tensor_entry(entry)}
    if mapped != expected:
        raise ConversionError(
            f"internal: the {family} table does not cover the model (unmapped model tensors: "
            f"{common.listing(expected - mapped)}; unknown: {common.listing(mapped - expected)})"
        )


def _stage_unit(
    unit: list[Any],
    hf: HFCheckpoint,
    template: dict[str, Any],
    stager: mcore_io.Stager,
    cfg: ModelConfig,
    vocab: VocabSizes,
    dtype: str,
    tied_lm_head: bool,
    summary: common.ConversionSummary,
) -> None:
    """Convert one unit of the table (rules read together) and stage its tensors into `template`."""
    torch_dtype = common.DTYPES[dtype]
    for rule in unit:
        sources = [hf.get(name).to(torch_dtype) for name in rule.hf]
        tensor = to_mcore(rule, sources, cfg, vocab)
        if rule.mcore is None:
            continue
        if tied_lm_head and rule.mcore == "embedding.word_embeddings.weight":
            head = hf.get("lm_head.weight").to(torch_dtype)
            if not torch.equal(head, sources[0]):
                raise ConversionError(
                    "config.json says tie_word_embeddings=true but lm_head.weight differs "
                    "from model.embed_tokens.weight; fix tie_word_embeddings"
                )
        mcore_io.set_entry_data(template[rule.mcore], stager.stage(tensor))
        summary.tensors += 1
        summary.parameters += sum(s.numel() for s in sources)
        del sources, tensor  # before the next rule reads its sources: one rule's tensors at a time


def _checkpoint_metadata(
    hf: HFCheckpoint,
    family: str,
    cfg: ModelConfig,
    *,
    tokenizer_meta: dict[str, Any] | None,
    vocab: VocabSizes,
    mask_id: int,
    dtype: str,
    layout: dict[str, int],
    nbdiff: dict[str, Any],
) -> dict[str, Any]:
    """The common state a converted checkpoint records (what loading, resuming and export read)."""
    return {
        "format": "nbdiff-mcore",
        "format_version": common.METADATA_FORMAT_VERSION,
        "model": cfg.to_dict(),
        "architecture": {"family": family, "hf_config": hf.config},
        "tokenizer": tokenizer_meta,
        "tokenizer_dir": common.TOKENIZER_DIR if tokenizer_meta is not None else None,
        "mask_id": mask_id,
        "mask_rows_added": vocab.real - vocab.hf,
        "dtype": dtype,
        "layout": layout,
        "nbdiff": nbdiff,
        # flat copies: what `nbdiff generate` (inference/loading.py) reads
        "block_size": nbdiff["block_size"],
        "token_shift": nbdiff["token_shift"],
        "source": str(hf.path.resolve()),
    }


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    tokenizer: str | None = None,
    mask_id: int | None = None,
    seq_length: int | None = None,
    block_size: int = 32,
    token_shift: bool = True,
    mask_kind: str = "context_causal",
    block_align: str = "document",
    overwrite: bool = False,
    show_progress: bool = True,
) -> common.ConversionSummary:
    """Convert an HF Llama / Qwen2 / Qwen3 (openPangu-style) folder into a megatron-core checkpoint.

    Args:
        hf_dir: HF model folder (config.json + safetensors).
        out_dir: output folder (must not exist unless overwrite); written atomically.
        tp, pp: intended tensor / pipeline parallel sizes (validated; tp sets the vocab padding).
        dtype: "fp32" or "bf16"; None = the source dtype (fp16 sources become bf16).
        tokenizer: tokenizer folder/file; None = the HF folder's own tokenizer files, if any.
        mask_id: [MASK] id override; None = the tokenizer's (or a new row after the vocabulary).
        seq_length: ModelConfig.seq_length to record; None = min(max_position_embeddings, 4096).
        block_size, token_shift, mask_kind, block_align: NBDiff settings recorded in the metadata
            (block_align "prompt" for a model whose blocks start at the prompt's end, as the
            NBDiff release's).
        show_progress: tqdm bar over layers on stderr.
    """
    timer = common.Timer()
    common.check_dtype_arg(dtype)
    hf = HFCheckpoint(hf_dir)
    family = detect_family(hf.config, str(hf.path / "config.json"))
    hf_vocab = int(hf.config.get("vocab_size") or 0)
    if hf_vocab <= 0:
        raise ConversionError(f"{hf.path / 'config.json'}: vocab_size is missing or not positive")
    tok = _resolve_tokenizer(hf, tokenizer)
    notes: list[str] = []
    mask_id, real_vocab = _mask_row(mask_id, tok, hf_vocab, notes)
    cfg, dropped_o_bias = model_config_from_hf(
        hf.config,
        family,
        vocab_size=real_vocab,
        seq_length=seq_length,
        source=str(hf.path / "config.json"),
    )
    _check_layout(cfg, tp, pp, block_size)
    target = dtype or _source_dtype(hf.config)

    units = table_for(family, cfg, dropped_o_bias=dropped_o_bias)
    tied_lm_head = cfg.tie_embeddings and "lm_head.weight" in hf.weight_map
    _check_tensors(hf, units, cfg, hf_vocab, tied_lm_head)
    if dropped_o_bias:
        notes.append("o_proj biases are zero and were dropped (checked tensor by tensor)")
    template = mcore_io.template_sharded_state_dict(cfg, tp)
    _check_table_covers_model(units, template, family.name)
    vocab = VocabSizes(hf=hf_vocab, real=real_vocab, padded=cfg.padded_vocab_size(tp))
    out = Path(out_dir)
    summary = common.ConversionSummary(
        "hf-to-mcore",
        str(hf.path),
        str(out.resolve()),
        family.name,
        target,
        mask_id=mask_id,
        notes=notes,
    )
    with common.staging_dir(out, overwrite) as tmp:
        stager = mcore_io.Stager(tmp / ".staging")
        for unit in common.progress(
            units, total=len(units), desc="hf-to-mcore", enabled=show_progress
        ):
            _stage_unit(unit, hf, template, stager, cfg, vocab, target, tied_lm_head, summary)
        hf.close()

        nbdiff = {
            "block_size": block_size,
            "token_shift": token_shift,
            "mask_kind": mask_kind,
            "block_align": block_align,
        }
        metadata = _checkpoint_metadata(
            hf,
            family.name,
            cfg,
            tokenizer_meta=_tokenizer_metadata(tok, out, tokenizer),
            vocab=vocab,
            mask_id=mask_id,
            dtype=target,
            layout={"tp": tp, "pp": pp},
            nbdiff=nbdiff,
        )
        tokenizer_files = _tokenizer_files(hf, tokenizer) if tok is not None else None
        _write_folder(tmp, template, metadata, cfg, tokenizer_files)
        staged_rename(tmp, out.resolve(), overwrite)
    summary.seconds = timer.elapsed()
    return summary


def _write_folder(
    tmp: Path,
    template: dict[str, Any],
    metadata: dict[str, Any],
    cfg: ModelConfig,
    tokenizer_files: list[Path] | None,
) -> None:
    """Into the staging folder `tmp`: the checkpoint (from the staged tensors, then dropped), its
    `latest` marker, the tokenizer copy (None: no tokenizer), the metadata and the model section."""
    mcore_io.save_checkpoint_dir(template, metadata, tmp / common.CHECKPOINT_SUBDIR)
    (tmp / "latest").write_text("0\n")
    _remove_tree(tmp / ".staging")
    if tokenizer_files is not None:
        copy_files(tokenizer_files, tmp / common.TOKENIZER_DIR)
    (tmp / common.METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    (tmp / common.MODEL_YAML).write_text(_model_yaml(cfg))


def _tokenizer_metadata(tok: Any, out: Path, tokenizer: str | None) -> dict[str, Any] | None:
    """Tokenizer metadata pointing at the copy inside the output folder (self-contained)."""
    if tok is None:
        return None
    meta = dict(tok.metadata())
    copied = out.resolve() / common.TOKENIZER_DIR
    if meta["tokenizer_type"] == "SentencePieceTokenizer":
        copied = copied / Path(meta["tokenizer_model"]).name
    meta["tokenizer_model"] = str(copied)
    meta["source_tokenizer_model"] = str(Path(tokenizer).resolve()) if tokenizer else None
    return meta


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fits(cfg: ModelConfig, tp: int, pp: int, block_size: int | None) -> bool:
    try:
        cfg.validate(tp=tp, pp=pp, block_size=block_size)
    except ConfigError:
        return False
    return True


def _layouts_that_fit(cfg: ModelConfig, block_size: int | None) -> str:
    """The --tp and --pp values this model's shape allows (a converter cannot change the shape)."""
    tps = [t for t in range(1, cfg.num_attention_heads + 1) if _fits(cfg, t, 1, block_size)]
    pps = [p for p in range(1, cfg.num_layers + 1) if _fits(cfg, 1, p, block_size)]
    return (
        f"use --tp {' / '.join(map(str, tps))} and --pp {' / '.join(map(str, pps))} (training "
        "may use another layout: megatron-core reshards the checkpoint on load)"
    )


def _model_yaml(cfg: ModelConfig) -> str:
    values = {k: v for k, v in cfg.to_dict().items() if k != "extra_transformer_config" or v}
    header = (
        "# The model section matching this checkpoint (nbdiff convert hf-to-mcore); paste it\n"
        "# into a training config. params_dtype is the run dtype, not the stored one.\n"
    )
    return header + yaml.safe_dump({"model": values}, sort_keys=False)
