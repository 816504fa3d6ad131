// Best-fit-decreasing packing of document lengths into fixed-capacity bins.
//
// The C++ twin of nbdiff_megatron/data/packing.py::_pack_python; both follow the same rule so their
// results are identical (tested): items by decreasing length (ties: lower index first), each into
// the open bin with the smallest remaining room that fits (ties: the bin opened first), else a new
// bin. Returns (item_order, bin_offsets) in CSR form.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <functional>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;

static py::tuple pack_best_fit_decreasing(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths_arr, int64_t capacity) {
  if (capacity <= 0) throw std::invalid_argument("capacity must be > 0");
  auto lengths = lengths_arr.unchecked<1>();
  const int64_t n = lengths.shape(0);
  for (int64_t i = 0; i < n; ++i) {
    if (lengths(i) <= 0 || lengths(i) > capacity)
      throw std::invalid_argument("lengths must lie in [1, capacity]");
  }

  std::vector<int64_t> order(n);
  std::vector<int64_t> sorted_len(n);
  // bin of the k-th placed item; indexed by placement rank (not item id) so every pass over it
  // is sequential: random access into n-sized arrays costs a cache miss per item at 1M items.
  std::vector<int64_t> bin_at(n);
  std::vector<int64_t> counts;
  {
    py::gil_scoped_release release;  // pure C++ from here on
    // Counting sort by decreasing length; equal lengths keep increasing index (a stable sort).
    std::vector<int64_t> start(capacity + 2, 0);
    for (int64_t i = 0; i < n; ++i) start[capacity - lengths(i) + 1] += 1;
    for (int64_t v = 1; v <= capacity + 1; ++v) start[v] += start[v - 1];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = start[capacity - lengths(i)]++;
      order[k] = i;
      sorted_len[k] = lengths(i);
    }

    // Segment tree over remaining-room values 0..capacity counting open bins per room; a min-heap
    // of bin ids per room gives ties to the bin opened first (same rule as the Python twin).
    int64_t size = 1;
    while (size < capacity + 1) size *= 2;
    std::vector<int32_t> tree(2 * size, 0);
    std::vector<std::vector<int64_t>> by_room(capacity + 1);
    std::vector<int64_t> room_of_bin;
    auto add = [&](int64_t room, int32_t delta) {
      for (int64_t i = room + size; i; i >>= 1) tree[i] += delta;
    };
    auto first_at_least = [&](int64_t lo) -> int64_t {
      int64_t i = lo + size;
      if (tree[i]) return lo;
      while (i > 1) {
        if (!(i & 1) && tree[i + 1]) {
          ++i;
          while (i < size) i = tree[2 * i] ? 2 * i : 2 * i + 1;
          return i - size;
        }
        i >>= 1;
      }
      return -1;
    };
    const auto heap_cmp = std::greater<int64_t>();
    for (int64_t k = 0; k < n; ++k) {
      const int64_t len = sorted_len[k];
      const int64_t room = first_at_least(len);
      int64_t bin;
      if (room < 0) {
        bin = static_cast<int64_t>(room_of_bin.size());
        room_of_bin.push_back(capacity);
      } else {
        auto& heap = by_room[room];
        std::pop_heap(heap.begin(), heap.end(), heap_cmp);
        bin = heap.back();
        heap.pop_back();
        add(room, -1);
      }
      const int64_t new_room = room_of_bin[bin] - len;
      room_of_bin[bin] = new_room;
      if (new_room > 0) {
        auto& heap = by_room[new_room];
        heap.push_back(bin);
        std::push_heap(heap.begin(), heap.end(), heap_cmp);
        add(new_room, 1);
      }
      bin_at[k] = bin;
    }
    counts.assign(room_of_bin.size(), 0);
    for (int64_t k = 0; k < n; ++k) counts[bin_at[k]] += 1;
  }

  const int64_t num_bins = static_cast<int64_t>(counts.size());
  py::array_t<int64_t> offsets_arr(num_bins + 1);
  py::array_t<int64_t> item_order_arr(n);
  auto offsets = offsets_arr.mutable_unchecked<1>();
  auto item_order = item_order_arr.mutable_unchecked<1>();
  {
    py::gil_scoped_release release;
    offsets(0) = 0;
    for (int64_t b = 0; b < num_bins; ++b) offsets(b + 1) = offsets(b) + counts[b];
    std::vector<int64_t> cursor(num_bins);
    for (int64_t b = 0; b < num_bins; ++b) cursor[b] = offsets(b);
    // placement order inside each bin = the decreasing-length order
    for (int64_t k = 0; k < n; ++k) item_order(cursor[bin_at[k]]++) = order[k];
  }
  return py::make_tuple(item_order_arr, offsets_arr);
}

// Document id of every token of a [num_samples, seq_len] batch: the number of EODs before it in
// its row (the EOD belongs to the document it ends).
static py::array_t<int64_t> doc_ids_from_eod(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> tokens_arr, int64_t eod) {
  if (tokens_arr.ndim() != 2) throw std::invalid_argument("tokens must be 2-D [samples, seq_len]");
  auto tokens = tokens_arr.unchecked<2>();
  const int64_t rows = tokens.shape(0), cols = tokens.shape(1);
  py::array_t<int64_t> out_arr({rows, cols});
  auto out = out_arr.mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    for (int64_t r = 0; r < rows; ++r) {
      int64_t doc = 0;
      for (int64_t c = 0; c < cols; ++c) {
        out(r, c) = doc;
        if (tokens(r, c) == eod) ++doc;
      }
    }
  }
  return out_arr;
}

PYBIND11_MODULE(_nbdiff_cpp, m) {
  m.doc() = "nbdiff-megatron C++ data helpers (packing, document ids)";
  m.def("pack_best_fit_decreasing", &pack_best_fit_decreasing, py::arg("lengths"),
        py::arg("capacity"),
        "Best-fit-decreasing packing; returns (item_order, bin_offsets) int64 arrays (CSR).");
  m.def("doc_ids_from_eod", &doc_ids_from_eod, py::arg("tokens"), py::arg("eod"),
        "Per-row document ids of a 2-D token array: the number of EODs before each token.");
}
