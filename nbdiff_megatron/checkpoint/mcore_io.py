"""The megatron-core side: dist_checkpointing save/load without materialising the model.

The keys, shapes and sharding metadata of a checkpoint are exactly those of `NBDiffGPTModel`'s own
`sharded_state_dict()`: the model is built on the `meta` device (no memory, no initialisation) at
TP=1/PP=1 and its sharded state dict is used as the template. Converted tensors replace the template's
meta tensors; since dist_checkpointing stores global (layout-free) tensors, `nbdiff train` loads the
result under any TP/PP (the embedding and output layer are stored with `allow_shape_mismatch`, so a
different vocabulary padding under another TP size is handled by megatron-core on load).

Memory: converted tensors are staged in raw files and handed to dist_checkpointing as memory-mapped
tensors, so the resident size stays at about one decoder layer; pages of staged tensors are file-backed
and the OS can drop them while the checkpoint is written. Reading (mcore -> HF) loads one layer's
slices of the stacked layer tensors at a time.

megatron-core (and model/builder.py, which imports it) is imported inside the functions that use it:
it costs seconds at import (docs/megatron-compat.md), and reading a checkpoint needs only torch's DCP.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from nbdiff_megatron.checkpoint.dist import (
    damaged_shard_files,
    truncated_message,
    write_dist_checkpoint,
)
from nbdiff_megatron.errors import CheckpointError, ConversionError
from nbdiff_megatron.model.config import ModelConfig
from nbdiff_megatron.model.parallel import initialize_parallel

METADATA_KEY = "nbdiff_metadata"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


# ------------------------------------------------------------------ loading rule (local <-> TE spec)
# A checkpoint written from one layer implementation (model.transformer_impl) loads under the other:
# the tensors and their keys are the same (megatron-core maps the local spec's separate norms onto
# TE's fused-norm keys in its sharded state dict); what may differ is the `_extra_state` of a module
# (Transformer Engine keeps FP8 metadata there; a converted checkpoint is written from the local
# spec). Those, and only those, may be absent; the module then keeps its fresh extra state.
EXTRA_STATE = "_extra_state"


def is_extra_state_key(key: str) -> bool:
    """A state-dict or checkpoint key of a module's `get_extra_state()` (e.g. `..._extra_state` or
    `..._extra_state/shard_0_2`)."""
    return key.rsplit(".", 1)[-1].split("/", 1)[0] == EXTRA_STATE


def check_absent_keys(absent: Any, ckpt: Any) -> None:
    """Raise CheckpointError when the checkpoint lacks anything but `_extra_state` entries that the
    model (or optimizer) asked for (`absent`: dist_checkpointing's "unexpected" keys)."""
    missing = sorted(k for k in absent or () if not is_extra_state_key(k))
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt} lacks {len(missing)} tensor(s) the model needs ({missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}): it was written for another model shape; "
            "compare its model section with yours"
        )


def load_model_state_dict(module: torch.nn.Module, state_dict: dict[str, Any]) -> None:
    """`module.load_state_dict(state_dict)`, strict except for `_extra_state` entries: absent ones
    are fine (the rule above), any other missing or unexpected key raises RuntimeError (as a strict
    load does), naming model.transformer_impl when the layer implementations differ."""
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state_key(k)]
    unexpected = [k for k in result.unexpected_keys if not is_extra_state_key(k)]
    if missing or unexpected:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]} (a checkpoint of another layer implementation "
            "loads when only `_extra_state` entries differ; check model.transformer_impl and the "
            "model section)"
        )


def _ensure_single_rank_parallel() -> None:
    """megatron parallel_state for one process (the template is the unsharded TP=1/PP=1 model)."""
    from megatron.core import parallel_state  # lazy: megatron-core (module doc)

    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (tp, pp) == (1, 1):
            return
        raise ConversionError(
            f"conversion runs in a single process, but megatron parallel_state is initialised with "
            f"TP={tp}, PP={pp}; run `nbdiff convert` on its own (not under torchrun)"
        )
    initialize_parallel(1, 1, 1)


def template_model_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config whose TP=1 template pads the vocabulary as `cfg` would under TP=`tp`."""
    return dataclasses.replace(
        cfg,
        params_dtype="fp32",
        attention_backend="sdpa",
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp,
    )


def template_sharded_state_dict(cfg: ModelConfig, tp: int = 1) -> dict[str, Any]:
    """The model's sharded state dict with meta tensors (state-dict name -> ShardedBase)."""
    from nbdiff_megatron.model.builder import build_model  # lazy: imports megatron-core

    _ensure_single_rank_parallel()
    with torch.device("meta"):
        model = build_model(template_model_config(cfg, tp), use_transformer_engine=False)
    return dict(model.sharded_state_dict())


def is_tensor_entry(entry: Any) -> bool:
    """ShardedTensor or ShardedTensorFactory (not the `_extra_state` ShardedObjects)."""
    from megatron.core.dist_checkpointing.mapping import (  # lazy: megatron-core (module doc)
        ShardedTensor,
        ShardedTensorFactory,
    )

    return isinstance(entry, (ShardedTensor, ShardedTensorFactory))


def set_entry_data(entry: Any, tensor: torch.Tensor) -> None:
    """Put real data into a template entry (shape checked against the template)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor  # lazy (module doc)

    if tuple(entry.data.shape) != tuple(tensor.shape):
        raise ConversionError(
            f"internal: {entry.key} has shape {tuple(tensor.shape)}, the model expects "
            f"{tuple(entry.data.shape)}"
        )
    entry.data = tensor
    if isinstance(entry, ShardedTensor):
        entry.dtype = tensor.dtype


def layer_of(name: str) -> int | None:
    """Decoder layer index of a state-dict name, None for the global tensors."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


class Stager:
    """Stages converted tensors in raw files and reopens them memory-mapped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Write `tensor` to disk; return a read-only-use memory-mapped tensor with the same values."""
        tensor = tensor.detach().contiguous().cpu()
        path = self.directory / f"{self.count:06d}.bin"
        self.count += 1
        with open(path, "wb") as handle:
            handle.write(
                tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            )
        if tensor.numel() == 0:
            return tensor.clone()
        mapped = torch.from_file(str(path), shared=False, size=tensor.numel(), dtype=tensor.dtype)
        return mapped.view(tensor.shape)


def save_checkpoint_dir(sharded: dict[str, Any], metadata: dict[str, Any], directory: Path) -> None:
    """dist_checkpointing.save of {'model': sharded, METADATA_KEY: metadata} (training's layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_dist_checkpoint({"model": sharded, METADATA_KEY: metadata}, directory)


class CheckpointReader:
    """Reads regions of the global tensors of a torch_dist checkpoint (one layer at a time).

    megatron-core's torch_dist format is a torch.distributed.checkpoint (DCP) directory whose keys are
    the sharded keys; decoder-layer tensors are stacked along a leading layer axis. Reading a region
    goes through DCP's own resharding helper, so it works whatever TP/PP layout wrote the checkpoint.
    """

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        try:
            self._reader = FileSystemReader(str(ckpt))
            self._metadata = self._reader.read_metadata()
            self._reader.set_up_storage_reader(self._metadata, True)
        except Exception as exc:
            raise ConversionError(
                f"cannot read the tensor index of {ckpt} ({type(exc).__name__}: {exc}); is it a "
                "megatron-core torch_dist checkpoint?"
            ) from exc
        damaged = damaged_shard_files(ckpt, self._metadata)
        if damaged:
            raise ConversionError(truncated_message(damaged))
        self.tensors = {
            key: md
            for key, md in self._metadata.state_dict_metadata.items()
            if hasattr(md, "chunks")
        }

    def stored_key(self, key: str) -> str | None:
        """The key a model tensor is stored under, or None.

        Checkpoints saved from a model still wrapped in megatron's DistributedDataParallel carry a
        `module.` prefix on every key; both spellings are accepted.
        """
        for candidate in (key, f"module.{key}"):
            if candidate in self.tensors:
                return candidate
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of a stored tensor."""
        return tuple(self.tensors[self.stored_key(key) or key].size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of a tensor."""
        return self.tensors[self.stored_key(key) or key].properties.dtype

    def read(
        self,
        key: str,
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of the global tensor `key`."""
        dest = torch.empty(sizes, dtype=dtype or self.dtype(key))
        key = self.stored_key(key) or key
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, self.tensors[key], [chunk])
        covered = sum(_numel(item.lengths) for item in items)
        if covered != dest.numel():
            raise ConversionError(
                f"checkpoint {self.ckpt} does not cover {key}[{offsets} + {sizes}] (read "
                f"{covered} of {dest.numel()} values): the checkpoint is incomplete"
            )
        self._reader.read_data(LoadPlan(items), _RegionPlanner(dest)).wait()
        return dest


class _RegionPlanner:
    """The three LoadPlanner callbacks FileSystemReader.read_data uses, writing into one tensor."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def resolve_tensor(self, item: Any) -> torch.Tensor:
        view = self.dest
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, item: Any, tensor: torch.Tensor) -> None:
        return None

    def load_bytes(self, item: Any, value: Any) -> None:
        raise ConversionError(f"internal: unexpected byte item {item.storage_index}")


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_stored_keys(template: dict[str, Any], reader: CheckpointReader, num_layers: int) -> None:
    """Raise ConversionError listing model tensors missing from the checkpoint or wrongly shaped."""
    missing: set[str] = set()
    wrong: set[str] = set()
    for name, entry in template.items():
        if not is_tensor_entry(entry):
            continue
        key = entry.key
        if reader.stored_key(key) is None:
            missing.add(key)
            continue
        if getattr(entry, "allow_shape_mismatch", False):
            continue  # vocabulary tables: padding depends on the TP size that wrote them
        want = tuple(entry.data.shape)
        if layer_of(name) is not None:
            want = (num_layers, *want)
        have = reader.shape(key)
        if have != want:
            wrong.add(f"{key}: stored {have}, model {want}")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors: {sorted(missing)}")
        if wrong:
            parts.append(f"wrongly shaped tensors: {sorted(wrong)}")
        raise ConversionError(
            f"checkpoint {reader.ckpt} does not match its recorded model config ({'; '.join(parts)})"
        )


def load_units(
    template: dict[str, Any], reader: CheckpointReader, units: list[list[str]], vocab_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, unit by unit, {state-dict name: full tensor} read from the checkpoint.

    Each unit is a list of template names (one decoder layer, or the global tensors); only those
    regions are read. Vocabulary tables are cut to `vocab_size` rows (their padding depends on the
    TP size that wrote them).
    """
    for names in units:
        out: dict[str, torch.Tensor] = {}
        for name in names:
            key = template[name].key
            shape = reader.shape(key)
            layer = layer_of(name)
            if layer is not None:
                region = reader.read(key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:]))
                out[name] = region[0]
            elif getattr(template[name], "allow_shape_mismatch", False):
                if shape[0] < vocab_size:
                    raise ConversionError(
                        f"checkpoint {reader.ckpt}: {key} has {shape[0]} rows, fewer than the "
                        f"vocabulary ({vocab_size})"
                    )
                out[name] = reader.read(key, (0,) * len(shape), (vocab_size, *shape[1:]))
            else:
                out[name] = reader.read(key, (0,) * len(shape), shape)
        yield out
