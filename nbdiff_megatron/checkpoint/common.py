"""Pieces both conversion directions share: dtypes, the run summary, temp-dir handling, messages."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nbdiff_megatron.errors import ConversionError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}
METADATA_FILE = "nbdiff_metadata.json"
MODEL_YAML = "model.yaml"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_SUBDIR = "iter_0000000"
METADATA_FORMAT_VERSION = 1


def dtype_name(dtype: torch.dtype) -> str:
    """'fp32' / 'bf16' for a torch dtype (others raise)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"tensors of dtype {dtype} are unsupported: use fp32 or bf16")


def check_dtype_arg(dtype: str | None) -> None:
    """Validate a --dtype value."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}")


def listing(names: list[str] | set[str], limit: int = 20) -> str:
    """Sorted names for an error message, shortened past `limit`."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


@dataclass
class ConversionSummary:
    """What a conversion did (printed at the end of `nbdiff convert`)."""

    direction: str
    """hf-to-mcore or mcore-to-hf."""
    source: str
    """Input folder."""
    out: str
    """Output folder."""
    family: str
    """Model family (source family for hf-to-mcore, export family for mcore-to-hf)."""
    dtype: str
    """dtype of the written tensors."""
    tensors: int = 0
    """Number of tensors written."""
    parameters: int = 0
    """Number of parameters written (vocabulary padding excluded)."""
    seconds: float = 0.0
    """Wall time."""
    mask_id: int | None = None
    """Id of the [MASK] token."""
    notes: list[str] = field(default_factory=list)
    """Things the user should know (added rows, dropped zero biases, missing tokenizer)."""

    def format(self) -> str:
        """Multi-line human-readable summary."""
        lines = [
            f"{self.direction}: {self.source} -> {self.out}",
            f"  family {self.family}, dtype {self.dtype}, {self.tensors} tensors, "
            f"{self.parameters / 1e6:.2f}M parameters, {self.seconds:.1f} s",
        ]
        if self.mask_id is not None:
            lines.append(f"  [MASK] id {self.mask_id}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder next to `out`, removed on failure (nothing partial is left at `out`)."""
    out = out.resolve()
    if out.exists() and not overwrite:
        raise ConversionError(f"--out {out} already exists; remove it or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress(iterable: Any, *, total: int, desc: str, enabled: bool) -> Any:
    """tqdm over conversion units on stderr (plain iteration when disabled)."""
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="layer", file=sys.stderr, leave=False)


class Timer:
    """Seconds since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds elapsed."""
        return time.perf_counter() - self.start
