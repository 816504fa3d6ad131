"""Best-fit-decreasing packing: C++ == Python, every bin fits, nothing lost or duplicated."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdiff_megatron.data.packing import cpp_extension_available, pack_best_fit_decreasing
from nbdiff_megatron.data.sft import pack_conversations

needs_cpp = pytest.mark.skipif(not cpp_extension_available(), reason="C++ extension not built")

lengths_and_capacity = st.integers(1, 64).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), max_size=200), st.just(cap))
)


def _check_packing(packing, lengths, capacity):
    assert sorted(packing.item_order.tolist()) == list(range(len(lengths)))
    assert packing.bin_offsets[0] == 0 and packing.bin_offsets[-1] == len(lengths)
    for b in range(packing.num_bins):
        members = packing.bin(b)
        assert len(members) > 0
        assert sum(lengths[i] for i in members) <= capacity
        # placed by decreasing length, ties by index
        keys = [(-lengths[i], i) for i in members]
        assert keys == sorted(keys)


def _naive_best_fit_decreasing(lengths, capacity):
    """The rule written as plainly as possible: O(n * bins)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, rooms = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))
        else:
            b = len(bins)
            bins.append([])
            rooms.append(capacity)
        bins[b].append(i)
        rooms[b] -= lengths[i]
    return bins


@settings(max_examples=150, deadline=None)
@given(lengths_and_capacity)
def test_python_packing_follows_the_rule(case):
    lengths, capacity = case
    packing = pack_best_fit_decreasing(lengths, capacity, backend="python")
    _check_packing(packing, lengths, capacity)
    assert packing.bins() == _naive_best_fit_decreasing(lengths, capacity)
    # any-fit property: at most one bin is at most half full
    loads = [sum(lengths[i] for i in packing.bin(b)) for b in range(packing.num_bins)]
    assert sum(2 * load <= capacity for load in loads) <= 1


@needs_cpp
@settings(max_examples=150, deadline=None)
@given(lengths_and_capacity)
def test_cpp_equals_python(case):
    lengths, capacity = case
    a = pack_best_fit_decreasing(lengths, capacity, backend="cpp")
    b = pack_best_fit_decreasing(lengths, capacity, backend="python")
    assert np.array_equal(a.item_order, b.item_order)
    assert np.array_equal(a.bin_offsets, b.bin_offsets)


@needs_cpp
def test_cpp_equals_python_large():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5, 1, size=20000).astype(np.int64) + 1, 1024)
    a = pack_best_fit_decreasing(lengths, 1024, backend="cpp")
    b = pack_best_fit_decreasing(lengths, 1024, backend="python")
    assert np.array_equal(a.item_order, b.item_order)
    assert np.array_equal(a.bin_offsets, b.bin_offsets)
    _check_packing(a, lengths.tolist(), 1024)


def test_known_packing_and_errors():
    p = pack_best_fit_decreasing([5, 3, 3, 2, 1], 6, backend="python")
    assert p.bins() == [[0, 4], [1, 2], [3]]
    with pytest.raises(ValueError, match="lengths"):
        pack_best_fit_decreasing([7], 6)
    with pytest.raises(ValueError, match="lengths"):
        pack_best_fit_decreasing([0], 6)
    with pytest.raises(ValueError, match="backend"):
        pack_best_fit_decreasing([1], 6, backend="rust")


items_strategy = st.integers(4, 40).flatmap(
    lambda L: st.tuples(
        st.lists(
            st.integers(1, L).flatmap(
                lambda n: st.tuples(
                    st.lists(st.integers(3, 99), min_size=n, max_size=n),
                    st.lists(st.booleans(), min_size=n, max_size=n),
                )
            ),
            min_size=1,
            max_size=40,
        ),
        st.just(L),
    )
)


@settings(max_examples=120, deadline=None)
@given(
    items_strategy, st.sampled_from(["python", "cpp"] if cpp_extension_available() else ["python"])
)
def test_packed_sequences_keep_every_token_once(case, backend):
    raw_items, L = case
    pad = 1
    items = [(np.array(ids), np.array(mask)) for ids, mask in raw_items]
    packed = pack_conversations(items, L, pad, backend=backend)
    tokens, doc_ids, loss_mask = packed["tokens"], packed["doc_ids"], packed["loss_mask"]
    assert tokens.shape[1] == doc_ids.shape[1] == loss_mask.shape[1] == L
    recovered = []
    for row in range(tokens.shape[0]):
        d = doc_ids[row]
        assert d[0] == 0 and bool((d[1:] - d[:-1] >= 0).all())
        assert bool((d[1:] - d[:-1] <= 1).all())
        n_docs = int(d[-1]) + 1
        real = 0
        for k in range(n_docs):
            sel = d == k
            seg_tokens = tokens[row][sel].tolist()
            if all(t == pad for t in seg_tokens) and not loss_mask[row][sel].any():
                assert k == n_docs - 1  # padding is the last "document" of a row
                continue
            recovered.append((tuple(seg_tokens), tuple(loss_mask[row][sel].tolist())))
            real += len(seg_tokens)
        assert real <= L
    expected = sorted((tuple(ids), tuple(mask)) for ids, mask in raw_items)
    assert sorted(recovered) == expected


def test_python_fallback_when_extension_absent(monkeypatch):
    import nbdiff_megatron.data.packing as packing

    monkeypatch.setattr(packing, "_nbdiff_cpp", None)
    assert not packing.cpp_extension_available()
    assert packing.pack_best_fit_decreasing([5, 3, 3, 2, 1], 6).bins() == [[0, 4], [1, 2], [3]]
    assert packing.doc_ids_from_eod_batch(np.array([[1, 0, 2]]), 0).tolist() == [[0, 0, 1]]
    with pytest.raises(RuntimeError, match="not built"):
        packing.pack_best_fit_decreasing([1], 6, backend="cpp")
