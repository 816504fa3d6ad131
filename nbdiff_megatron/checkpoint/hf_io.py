"""Reading and writing HF checkpoint folders tensor by tensor (safetensors, memory-bounded).

Reading opens each `.safetensors` file memory-mapped and fetches single tensors on demand, so a
conversion holds one decoder layer at a time, never a whole shard or model. Shapes and dtypes come from
the file headers, so every check runs before any weight is read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nbdiff_megatron.data.tokenizer import TOKENIZER_FILE_NAMES
from nbdiff_megatron.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What a conversion copies beside the weights: the tokenizer's files, the older JSON form of the chat
# template, and the generation defaults.
TOKENIZER_FILES = (*TOKENIZER_FILE_NAMES, "chat_template.json", "generation_config.json")
# Files that make a folder a tokenizer (the others only accompany one).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def open_safetensors(path: Path) -> Any:
    """safe_open(path), or one ConversionError naming the file when it is truncated or corrupt."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        raise ConversionError(
            f"{path} is not a readable safetensors file ({exc}): it is truncated or corrupt; copy "
            "or export the model again"
        ) from None


class HFCheckpoint:
    """An HF model folder: its config.json and lazily readable safetensors tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(
                f"--hf {self.path} is not a directory (expected an HF model folder)"
            )
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{config_path} is missing: --hf must be an HF model folder")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{config_path} is not valid JSON ({exc})") from exc
        self.weight_map = self._weight_map()
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, tuple[tuple[int, ...], str]] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                mapping = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index} has no readable weight_map ({exc})") from exc
            missing = sorted({f for f in mapping.values() if not (self.path / f).is_file()})
            if missing:
                raise ConversionError(f"{index} names shard files that are missing: {missing}")
            return dict(mapping)
        single = self.path / SINGLE_FILE
        if single.is_file():
            with open_safetensors(single) as handle:
                return {name: SINGLE_FILE for name in handle.keys()}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise ConversionError(
                f"{self.path} holds PyTorch .bin weights only; re-save them as safetensors first "
                "(AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True))"
            )
        raise ConversionError(f"{self.path} has no {SINGLE_FILE} or {INDEX_FILE}")

    def _handle(self, filename: str) -> Any:
        if filename not in self._handles:
            self._handles[filename] = open_safetensors(self.path / filename)
        return self._handles[filename]

    def names(self) -> list[str]:
        """All tensor names of the checkpoint."""
        return list(self.weight_map)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) of a tensor, read from the file header only."""
        if name not in self._headers:
            piece = self._handle(self.weight_map[name]).get_slice(name)
            self._headers[name] = (tuple(piece.get_shape()), piece.get_dtype())
        return self._headers[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its (memory-mapped) shard."""
        return self._handle(self.weight_map[name]).get_tensor(name)

    def close(self) -> None:
        """Drop the open file handles."""
        self._handles.clear()

    def has_tokenizer(self) -> bool:
        """Whether the folder holds a tokenizer (not just a generation config)."""
        return any((self.path / f).is_file() for f in TOKENIZER_MODEL_FILES)

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer (and generation config) files of the folder, to be copied along."""
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]


def copy_files(files: list[Path], dest: Path) -> list[str]:
    """Copy files into `dest` (created); returns their names."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dest / f.name)
    return [f.name for f in files]


class ShardWriter:
    """Writes HF safetensors shards from a precomputed plan (so names carry the shard count)."""

    def __init__(self, out_dir: Path, plan: list[list[str]]) -> None:
        self.out_dir = out_dir
        self.count = len(plan)
        self.shard_of = {name: i for i, names in enumerate(plan) for name in names}
        self.expected = [set(names) for names in plan]
        self.pending: list[dict[str, torch.Tensor]] = [{} for _ in plan]
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def filename(self, shard: int) -> str:
        """File name of shard `shard` (HF's naming; one file is plain model.safetensors)."""
        if self.count == 1:
            return SINGLE_FILE
        return f"model-{shard + 1:05d}-of-{self.count:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor; its shard is written as soon as all of the shard's tensors are in."""
        shard = self.shard_of[name]
        self.pending[shard][name] = tensor.contiguous()
        if set(self.pending[shard]) == self.expected[shard]:
            tensors = self.pending[shard]
            save_file(tensors, str(self.out_dir / self.filename(shard)), metadata={"format": "pt"})
            for key, value in tensors.items():
                self.weight_map[key] = self.filename(shard)
                self.total_bytes += value.numel() * value.element_size()
            self.pending[shard] = {}

    def finish(self) -> None:
        """Check every shard was written; write the index when there are several."""
        unwritten = sorted(n for shard in self.pending for n in shard)
        missing = sorted(set(self.shard_of) - set(self.weight_map) - set(unwritten))
        if unwritten or missing:
            raise ConversionError(f"internal: tensors never written: {unwritten + missing}")
        if self.count > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def plan_shards(units: list[list[tuple[str, int]]], max_shard_bytes: int) -> list[list[str]]:
    """Group whole units (lists of (tensor name, bytes)) greedily into shards of <= max bytes."""
    plan: list[list[str]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(b for _, b in unit)
        if plan[-1] and size + unit_bytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].extend(name for name, _ in unit)
        size += unit_bytes
    return [names for names in plan if names]


def staged_rename(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished temp folder to `out`; an existing `out` is replaced only with overwrite."""
    if out.exists():
        if not overwrite:
            raise ConversionError(f"--out {out} already exists; remove it or pass --overwrite")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
