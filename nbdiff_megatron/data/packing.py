"""Best-fit-decreasing packing of documents into fixed-length sequences (C++ with a Python twin).

Rule (both implementations, identical results): take the items by decreasing length (ties: lower
index first); put each into the open bin whose remaining room is the smallest that still fits it
(ties: the bin opened first); open a new bin when none fits. The result is in CSR form:
`bins[b] = item_order[bin_offsets[b]:bin_offsets[b + 1]]`, items in the order they were placed.

The C++ version lives in csrc/packing.cpp (module `nbdiff_megatron._nbdiff_cpp`, built by the
package install); when it is absent the Python version runs.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

try:  # built from csrc/ by setup.py; optional
    from nbdiff_megatron import _nbdiff_cpp
except ImportError:  # pragma: no cover - depends on the build
    _nbdiff_cpp = None

PACKING_BACKENDS = ("auto", "cpp", "python")


def cpp_extension_available() -> bool:
    """True when the compiled packing extension was built and imports."""
    return _nbdiff_cpp is not None


@dataclass
class Packing:
    """Bins of item indices in CSR form (see module doc)."""

    item_order: np.ndarray
    bin_offsets: np.ndarray

    @property
    def num_bins(self) -> int:
        return len(self.bin_offsets) - 1

    def bin(self, b: int) -> np.ndarray:
        return self.item_order[self.bin_offsets[b] : self.bin_offsets[b + 1]]

    def bins(self) -> list[list[int]]:
        return [self.bin(b).tolist() for b in range(self.num_bins)]


def pack_best_fit_decreasing(
    lengths: Sequence[int] | np.ndarray, capacity: int, backend: str = "auto"
) -> Packing:
    """Pack items of the given lengths into bins of `capacity` tokens (see module doc)."""
    if backend not in PACKING_BACKENDS:
        raise ValueError(f"backend must be one of {PACKING_BACKENDS}, got {backend!r}")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0, got {capacity}")
    if lengths.size and (lengths.min() <= 0 or lengths.max() > capacity):
        raise ValueError(
            f"lengths must lie in [1, capacity={capacity}]; got min {lengths.min()}, "
            f"max {lengths.max()} (drop or truncate longer items first)"
        )
    if backend == "cpp" or (backend == "auto" and _nbdiff_cpp is not None):
        if _nbdiff_cpp is None:
            raise RuntimeError(
                "backend='cpp' but nbdiff_megatron._nbdiff_cpp is not built; reinstall the package "
                "with a C++17 compiler (pip install -e .) or use backend='python'"
            )
        order, offsets = _nbdiff_cpp.pack_best_fit_decreasing(lengths, int(capacity))
        return Packing(np.asarray(order), np.asarray(offsets))
    return _pack_python(lengths, capacity)


def _pack_python(lengths: np.ndarray, capacity: int) -> Packing:
    n = len(lengths)
    # stable sort on -length: ties keep the lower index first
    order = np.argsort(-lengths, kind="stable")
    # Segment tree over "remaining room" values 0..capacity counting open bins with that room;
    # heaps hold the bin ids per room value so ties go to the bin opened first.
    size = 1
    while size < capacity + 1:
        size *= 2
    tree = [0] * (2 * size)
    by_room: dict[int, list[int]] = {}
    room_of_bin: list[int] = []
    bin_of_item = np.empty(n, dtype=np.int64)

    def add(room: int, delta: int) -> None:
        i = room + size
        while i:
            tree[i] += delta
            i //= 2

    def first_at_least(lo: int) -> int:
        i = lo + size
        if tree[i]:
            return lo
        while i > 1:
            if i % 2 == 0 and tree[i + 1]:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] else 2 * i + 1
                return i - size
            i //= 2
        return -1

    for item in order.tolist():
        length = int(lengths[item])
        room = first_at_least(length)
        if room < 0:
            b = len(room_of_bin)
            room_of_bin.append(capacity)
        else:
            b = heapq.heappop(by_room[room])
            add(room, -1)
        new_room = room_of_bin[b] - length
        room_of_bin[b] = new_room
        if new_room > 0:
            heapq.heappush(by_room.setdefault(new_room, []), b)
            add(new_room, 1)
        bin_of_item[item] = b
    # group by bin, keeping placement order inside a bin
    placed_bins = bin_of_item[order]
    regroup = np.argsort(placed_bins, kind="stable")
    item_order = order[regroup]
    counts = np.bincount(placed_bins, minlength=len(room_of_bin))
    offsets = np.zeros(len(room_of_bin) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Packing(item_order.astype(np.int64), offsets)


def doc_ids_from_eod_batch(tokens: np.ndarray, eod: int, backend: str = "auto") -> np.ndarray:
    """Per-row document ids of a [num_samples, seq_len] token array (EODs before each token).

    Same rule as datasets.doc_ids_from_eod; for precomputing ids over many samples at once.
    """
    if backend not in PACKING_BACKENDS:
        raise ValueError(f"backend must be one of {PACKING_BACKENDS}, got {backend!r}")
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D [samples, seq_len], got shape {tokens.shape}")
    if backend == "cpp" or (backend == "auto" and _nbdiff_cpp is not None):
        if _nbdiff_cpp is None:
            raise RuntimeError("backend='cpp' but nbdiff_megatron._nbdiff_cpp is not built")
        return np.asarray(_nbdiff_cpp.doc_ids_from_eod(tokens, int(eod)))
    is_eod = (tokens == eod).astype(np.int64)
    return np.cumsum(is_eod, axis=1) - is_eod
