"""Load a model + tokenizer for decoding from `--load PATH`: a megatron-core checkpoint or an HF folder.

- megatron-core dist_checkpointing (written by `nbdiff train` or `nbdiff convert hf-to-mcore`): a
  checkpoint directory or a save directory (its newest complete checkpoint). The model shape, the
  tokenizer, the [MASK] id, token shift and the block size come from the checkpoint's stored config.
- HF folder (config.json + safetensors, as `nbdiff convert mcore-to-hf` writes it): converted in memory
  through `nbdiff_megatron.convert`; the tokenizer is the folder's own.

`--tokenizer` overrides the stored tokenizer (e.g. a checkpoint copied from another machine).

This module imports megatron-core (the model builder, dist_checkpointing): the commands import it when
they load a model, not for `--help` (inference/cli.py `load_model_from_args`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from megatron.core import dist_checkpointing

from nbdiff_megatron.checkpoint.dist import (
    device_mode,
    find_checkpoint,
    raise_if_truncated,
    read_common_state,
)
from nbdiff_megatron.checkpoint.hf_to_mcore import hf_to_mcore
from nbdiff_megatron.data.tokenizer import load_tokenizer, stop_token_ids, tokenizer_in_run
from nbdiff_megatron.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    InferenceError,
    NBDiffError,
    checkpoint_read_errors,
)
from nbdiff_megatron.inference.decoder import BLOCK_ALIGNS, MASK_KINDS
from nbdiff_megatron.model.builder import build_model
from nbdiff_megatron.model.config import ModelConfig

if TYPE_CHECKING:  # typing.Unpack for **kwargs is Python >= 3.11; annotations are not evaluated
    from typing_extensions import Unpack


@dataclass
class LoadedModel:
    """A model ready for decoding and what decoding needs to know about it."""

    model: torch.nn.Module
    """The NBDiffGPTModel (eval mode)."""
    tokenizer: Any
    """`nbdiff_megatron.data.tokenizer.Tokenizer`."""
    model_config: ModelConfig
    """The model's shape."""
    mask_id: int
    """Id of [MASK]."""
    eos_ids: list[int]
    """Ids that end generation."""
    token_shift: bool = True
    """Whether the model was trained with token shift."""
    block_size: int = 32
    """Block size the model was trained for (the curriculum target)."""
    mask_kind: str = "context_causal"
    """Training mask of the x_0 half: "context_causal" or "block_causal" (how to commit blocks)."""
    block_align: str = "document"
    """Where the model's training blocks started: "document" (our packing) or "prompt"."""
    ar_weight: float | None = None
    """Final λ of the training loss (None when unknown, e.g. a converted AR checkpoint)."""
    source: str = ""
    """What was loaded (path and format)."""


def _is_megatron_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "metadata.json").is_file()
        or (path / "latest").is_file()
        or any(path.glob("iter_*"))
    )


def _tokenizer(kind: str, model: str, override: str | None, override_type: str | None) -> Any:
    name = override or model
    if not name:
        raise InferenceError(
            "the checkpoint names no tokenizer: pass --tokenizer FILE_OR_FOLDER (and --tokenizer-type)"
        )
    try:
        return load_tokenizer(override_type or kind or "HuggingFaceTokenizer", name)
    except NBDiffError as exc:
        raise InferenceError(
            f"cannot load the tokenizer {name!r} ({exc}); pass --tokenizer with a local tokenizer file "
            "or folder"
        ) from exc


def _build(cfg: ModelConfig, params_dtype: str | None) -> torch.nn.Module:
    changes: dict[str, Any] = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    if params_dtype is not None:
        changes["params_dtype"] = params_dtype
    elif not torch.cuda.is_available():
        changes["params_dtype"] = "fp32"
    cfg = dataclasses.replace(cfg, **changes)
    model = build_model(cfg, seed=0)
    model.eval()
    return model


def _load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load the model tensors of a dist checkpoint, whatever wrapper prefix they were saved under.

    `nbdiff train` saves the DDP-wrapped model, whose tensors are keyed `module.decoder...`, while
    `nbdiff convert` saves the bare model (`decoder...`): read the stored keys and match them.
    """
    try:
        stored = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the tensor index of {ckpt} ({type(exc).__name__}: {exc})"
        ) from exc
    prefix = "module." if any(k.startswith("module.") for k in stored) else ""
    sharded = model.sharded_state_dict(prefix=prefix)
    try:
        with device_mode():
            loaded = dist_checkpointing.load({"model": sharded}, str(ckpt))
    except checkpoint_read_errors() as exc:
        raise_if_truncated(ckpt)
        raise CheckpointError(
            f"cannot read the tensors of checkpoint {ckpt} ({type(exc).__name__}: "
            f"{str(exc)[:300]}): it may be corrupt; load an earlier checkpoint"
        ) from None
    try:
        state = {k[len(prefix) :]: v for k, v in loaded["model"].items()}
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {ckpt} does not match the model built from its stored config "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def _stored_mask_kind(config: dict, converted: dict, ckpt: Path) -> str:
    """The training mask kind: train config's curriculum.mask_kind, else the convert metadata's."""
    kind = (config.get("curriculum") or {}).get("mask_kind")
    if kind is None:
        kind = converted.get("mask_kind") or (converted.get("nbdiff") or {}).get("mask_kind")
    kind = kind or "context_causal"
    if kind == "annealed":
        # the annealed baseline ends training on the target context-causal mask (progress 1), and
        # its clean half is context-causal throughout: it decodes as a context-causal model
        kind = "context_causal"
    if kind not in MASK_KINDS:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with mask kind {kind!r}; the decoder supports "
            f"{', '.join(MASK_KINDS)}"
        )
    return str(kind)


def _stored_block_align(train_state: dict, converted: dict, ckpt: Path) -> str:
    """Training block alignment: the train state's `block_align` (nbdiff train packs documents, so
    "document"), else the convert metadata's, else "document"."""
    align = train_state.get("block_align")
    if align is None:
        align = converted.get("block_align") or (converted.get("nbdiff") or {}).get("block_align")
    align = align or "document"
    if align not in BLOCK_ALIGNS:
        raise CheckpointError(
            f"checkpoint {ckpt} records block alignment {align!r}; expected one of "
            f"{', '.join(BLOCK_ALIGNS)}"
        )
    return str(align)


def _hf_nbdiff_settings(path: Path) -> dict[str, Any]:
    """block_size / token_shift / mask_kind from an exported HF config.json's `nbdiff` block."""
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InferenceError(f"cannot read {path / 'config.json'} ({exc})") from exc
    nbdiff = hf_config.get("nbdiff") if isinstance(hf_config, dict) else None
    nbdiff = nbdiff if isinstance(nbdiff, dict) else {}
    keys = ("block_size", "token_shift", "mask_kind", "block_align")
    return {k: nbdiff[k] for k in keys if nbdiff.get(k) is not None}


class LoadOptions(TypedDict, total=False):
    """What every loader takes besides the path (``load_for_inference`` passes them on to
    ``load_hf`` and ``load_megatron``, whose signature gives the meaning and the defaults)."""

    tokenizer: str | None
    tokenizer_type: str | None
    params_dtype: str | None


def load_megatron(
    path: Path,
    *,
    tokenizer: str | None = None,
    tokenizer_type: str | None = None,
    params_dtype: str | None = None,
) -> LoadedModel:
    """A model from a megatron-core dist checkpoint (training or converted)."""
    ckpt = find_checkpoint(path)
    common = read_common_state(ckpt)
    train_state = common.get("train_state") or {}
    converted = common.get("nbdiff_metadata") or {}
    config = train_state.get("config") or converted.get("config") or {}
    model_section = config.get("model") or converted.get("model") or converted.get("model_config")
    if not model_section:
        raise CheckpointError(
            f"checkpoint {ckpt} stores no model config (neither train_state.config.model nor "
            "nbdiff_metadata): it was not written by nbdiff train / nbdiff convert"
        )
    cfg = ModelConfig.from_dict(dict(model_section))
    tok_info = train_state.get("tokenizer") or converted.get("tokenizer") or {}
    data = config.get("data") or {}
    tok = _tokenizer(
        tok_info.get("type") or tok_info.get("tokenizer_type") or data.get("tokenizer_type", ""),
        # the run's own tokenizer copy first: the run works from any directory and after a move
        tokenizer_in_run(
            ckpt.parent,
            tok_info.get("model")
            or tok_info.get("tokenizer_model")
            or data.get("tokenizer_model", ""),
        ),
        tokenizer,
        tokenizer_type,
    )
    if cfg.vocab_size < tok.vocab_size:
        raise InferenceError(
            f"the tokenizer has {tok.vocab_size} tokens but the checkpoint's model only "
            f"{cfg.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)"
        )
    model = _build(cfg, params_dtype)
    _load_weights(ckpt, model)
    noise = config.get("noise") or {}
    mask_id = noise.get("mask_token_id")
    if mask_id is None:
        mask_id = converted.get("mask_id")
    mask_id = int(mask_id) if mask_id is not None else int(tok.mask_id)
    token_shift = bool(
        (config.get("loss") or {}).get("token_shift", converted.get("token_shift", True))
    )
    block = int(
        (config.get("curriculum") or {}).get("target_block_size", converted.get("block_size", 32))
    )
    mask_kind = _stored_mask_kind(config, converted, ckpt)
    block_align = _stored_block_align(train_state, converted, ckpt)
    curriculum = config.get("curriculum") or {}
    # λ at the end of training: the final value when it was annealed
    ar_weight = curriculum.get("ar_weight_final")
    if ar_weight is None:
        ar_weight = curriculum.get("ar_weight")
    return LoadedModel(
        model=model,
        tokenizer=tok,
        model_config=cfg,
        mask_id=mask_id,
        eos_ids=stop_token_ids(tok),
        token_shift=token_shift,
        block_size=block,
        mask_kind=mask_kind,
        block_align=block_align,
        ar_weight=None if ar_weight is None else float(ar_weight),
        source=f"{ckpt} (megatron-core)",
    )


def load_hf(path: Path, **options: Unpack[LoadOptions]) -> LoadedModel:
    """A model from an HF folder: converted by `nbdiff_megatron.checkpoint.hf_to_mcore` into a temporary
    megatron-core checkpoint (the converter's own tables, so HF -> model mapping lives in one place),
    then loaded like one. Costs a copy of the weights on disk while loading."""
    with tempfile.TemporaryDirectory(prefix="nbdiff_hf_") as tmp:
        out = Path(tmp) / "mcore"
        try:
            dtype = options.get("params_dtype") or (None if torch.cuda.is_available() else "fp32")
            # Carry the exported NBDiff settings through the temporary checkpoint's metadata.
            hf_to_mcore(
                path,
                out,
                tokenizer=options.get("tokenizer"),
                dtype=dtype,
                show_progress=False,
                **_hf_nbdiff_settings(path),
            )
        except (ConversionError, ConfigError) as exc:
            raise InferenceError(f"cannot load the HF folder {path}: {exc}") from exc
        loaded = load_megatron(out, **options)
    loaded.source = f"{path} (HF)"
    return loaded


def load_for_inference(path: str | Path, **options: Unpack[LoadOptions]) -> LoadedModel:
    """Load `--load PATH` (megatron-core checkpoint / save dir, or HF folder); InferenceError if unknown."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(
            f"checkpoint path {path} does not exist: pass a megatron-core checkpoint (or save "
            "directory) written by nbdiff train / nbdiff convert, or an HF model folder"
        )
    if _is_megatron_checkpoint_dir(path):
        try:
            return load_megatron(path, **options)
        except CheckpointError as exc:
            raise InferenceError(str(exc)) from exc
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path, **options)
    raise InferenceError(
        f"{path} is neither a megatron-core checkpoint (metadata.json, or iter_* sub-directories) nor "
        "an HF model folder (config.json + safetensors)"
    )
