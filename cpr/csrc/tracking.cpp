// Access tracking for CPR's partial checkpoints: schemas of the `cpr` ops, their CPU kernels and the kernels
// of the counter resets, which are the same on every device.
//
// State per table (allocated by cpr/tracking/tracker.py):
//  * counts  int32[rows]           CPR-MFU access counters since the row was last saved.
//  * slots   int64[S], stats int64[2]  CPR-SSU: open-addressing set of sampled ids, S a power of two
//                                   > capacity, plus (size, overflow); memory independent of rows.
//
// Why int32 counters that saturate: MFU only needs to rank rows, and a row's counter is reset whenever the
// row is saved, so it would need 2^31 accesses between two saves of that row to saturate; a saturated row
// simply ties with the other hottest rows, which are saved first anyway. That keeps MFU at 4 bytes/row
// instead of 8 with int64.
//
// Why saving resets a counter to 0 rather than decaying it: "updated since the row was last saved" is read
// off the counter as count > 0, and 4 bytes/row leaves no room for a separate dirty bit.
//
// Batches are given as a KeyedJaggedTensor's values, its per-feature value offsets (offset_per_key(),
// length F + 1) and a feature -> table map, so one call covers every table. Every id is validated before
// anything is written: a bad id raises and leaves all state unchanged.

#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "checks.h"
#include "tracking.h"

namespace cpr {
namespace {

using at::IntArrayRef;
using at::Tensor;
using at::TensorList;

// Below this many ids a call runs on the calling thread. One thread counts ~200M ids/s, so a Criteo batch
// (26 x 2048 ids) takes ~0.25 ms, while waking idle pool threads between training steps was measured to
// cost 5-15 ms on a 2-vCPU VM: threads only pay off for batches of millions of ids.
constexpr int64_t kMinParallelIds = int64_t{1} << 20;

// Checks the jagged layout of a batch; returns the features of each table, in feature order.
std::vector<std::vector<int64_t>> check_batch(const Tensor& values, IntArrayRef key_offsets,
                                              IntArrayRef feature_to_table, IntArrayRef table_rows) {
  check_batch_layout(values, key_offsets, feature_to_table, table_rows);
  std::vector<std::vector<int64_t>> features_of_table(table_rows.size());
  for (int64_t f = 0; f < static_cast<int64_t>(feature_to_table.size()); ++f) {
    features_of_table[feature_to_table[f]].push_back(f);
  }
  return features_of_table;
}

// Raises, naming the first bad id, if any id of feature f is outside [0, rows of its table).
template <typename index_t>
void check_ids(const index_t* ids, IntArrayRef key_offsets, IntArrayRef feature_to_table, IntArrayRef table_rows) {
  const int64_t num_features = static_cast<int64_t>(feature_to_table.size());
  std::vector<char> feature_bad(num_features, 0);
  const int64_t grain = key_offsets[num_features] < kMinParallelIds ? num_features : 1;
  at::parallel_for(0, num_features, std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      // Unsigned compare catches negative ids too; no early exit keeps the loop vectorisable.
      const uint64_t rows = static_cast<uint64_t>(table_rows[feature_to_table[f]]);
      bool bad = false;
      for (int64_t i = key_offsets[f]; i < key_offsets[f + 1]; ++i) {
        bad |= static_cast<uint64_t>(static_cast<int64_t>(ids[i])) >= rows;
      }
      feature_bad[f] = bad;
    }
  });
  for (int64_t f = 0; f < num_features; ++f) {
    if (!feature_bad[f]) continue;
    const int64_t t = feature_to_table[f];
    for (int64_t i = key_offsets[f]; i < key_offsets[f + 1]; ++i) {
      const int64_t id = static_cast<int64_t>(ids[i]);
      TORCH_CHECK(0 <= id && id < table_rows[t], "feature ", f, " (table ", t, "): id ", id,
                  " at value position ", i, " is outside the table's rows [0, ", table_rows[t],
                  "); no access of this batch was recorded");
    }
  }
}

// Calls visit(table, position, id) for every access, parallel over tables: each table is written by one
// thread only, in feature then position order, so results need no atomics and do not depend on the
// number of threads.
template <typename index_t, typename Visit>
void for_each_access_by_table(const index_t* ids, IntArrayRef key_offsets,
                              const std::vector<std::vector<int64_t>>& features_of_table, Visit visit) {
  const int64_t num_tables = static_cast<int64_t>(features_of_table.size());
  const int64_t total = key_offsets[key_offsets.size() - 1];
  const int64_t grain = total < kMinParallelIds ? num_tables : 1;
  at::parallel_for(0, num_tables, std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (const int64_t f : features_of_table[t]) {
        for (int64_t i = key_offsets[f]; i < key_offsets[f + 1]; ++i) {
          visit(t, i, static_cast<int64_t>(ids[i]));
        }
      }
    }
  });
}

void count_accesses_cpu(TensorList counts, IntArrayRef table_rows, const Tensor& values, IntArrayRef key_offsets,
                        IntArrayRef feature_to_table) {
  const auto features_of_table = check_batch(values, key_offsets, feature_to_table, table_rows);
  TORCH_CHECK(counts.size() == table_rows.size(), "got ", counts.size(), " counters for ", table_rows.size(),
              " tables");
  std::vector<int32_t*> counters;
  for (size_t t = 0; t < counts.size(); ++t) {
    check_state(counts[t], at::kInt, table_rows[t], values, "counts", static_cast<int64_t>(t));
    counters.push_back(counts[t].data_ptr<int32_t>());
  }
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "count_accesses", [&] {
    const index_t* ids = values.data_ptr<index_t>();
    check_ids(ids, key_offsets, feature_to_table, table_rows);
    for_each_access_by_table(ids, key_offsets, features_of_table, [&](int64_t t, int64_t, int64_t id) {
      int32_t& c = counters[t][id];
      c += (c != INT32_MAX);
    });
  });
}

void sample_accesses_cpu(TensorList slots, TensorList stats, IntArrayRef table_rows, const Tensor& values,
                         IntArrayRef key_offsets, IntArrayRef feature_to_table, int64_t seed, int64_t step,
                         double rate, int64_t capacity) {
  const auto features_of_table = check_batch(values, key_offsets, feature_to_table, table_rows);
  const std::vector<int64_t> masks = check_ssu_sets(slots, stats, table_rows, values, rate, capacity);
  std::vector<int64_t*> slot_ptrs, stat_ptrs;
  for (size_t t = 0; t < slots.size(); ++t) {
    slot_ptrs.push_back(slots[t].data_ptr<int64_t>());
    stat_ptrs.push_back(stats[t].data_ptr<int64_t>());
  }
  const uint64_t key = step_key(seed, step);
  const uint64_t threshold = sample_threshold(rate);
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "sample_accesses", [&] {
    const index_t* ids = values.data_ptr<index_t>();
    check_ids(ids, key_offsets, feature_to_table, table_rows);
    for_each_access_by_table(ids, key_offsets, features_of_table, [&](int64_t t, int64_t position, int64_t id) {
      if (!sample_access(key, position, id, threshold)) return;
      int64_t* set = slot_ptrs[t];
      const int64_t mask = masks[t];
      // Linear probing; the set is never more than capacity / (mask + 1) < 1 full, so an empty slot exists.
      for (int64_t s = home_slot(id, mask);; s = (s + 1) & mask) {
        if (set[s] == id) return;
        if (set[s] == kEmptySlot) {
          // Full: keep what is held (the earliest sampled ids) and count the drop.
          if (stat_ptrs[t][kStatSize] >= capacity) {
            ++stat_ptrs[t][kStatOverflow];
          } else {
            set[s] = id;
            ++stat_ptrs[t][kStatSize];
          }
          return;
        }
      }
    });
  });
}

// Resetting counters is a few ATen calls, the same on every device, so these two ops have one kernel for
// all of them (registered as CompositeExplicitAutograd below).

void mark_saved_rows(const Tensor& counts, const Tensor& rows) {
  check_counters(counts);
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be a 1-D int64 tensor, got ",
              rows.scalar_type(), " of shape ", rows.sizes());
  const int64_t num_rows = counts.numel();
  const Tensor r = rows.to(counts.device());
  const Tensor outside = r.lt(0).logical_or_(r.ge(num_rows));
  if (outside.any().item<bool>()) {
    const int64_t i = outside.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, "rows[", i, "] = ", r[i].item<int64_t>(), " is outside [0, ", num_rows, ")");
  }
  counts.index_fill_(0, r, 0);
}

void mark_saved_range(const Tensor& counts, int64_t start, int64_t end) {
  check_counters(counts);
  check_range(start, end, counts.numel());
  counts.slice(0, start, end).zero_();
}

// Top-k rows of [start, end) by count, ascending ids. Each candidate is packed into one uint64 key,
// (count << 32) | (2^32 - 1 - offset), so that one nth_element (expected linear time) ranks by count and
// breaks ties towards the lower id; only the k chosen ids are then sorted.
Tensor select_hottest_cpu(const Tensor& counts, int64_t start, int64_t end, int64_t k) {
  check_counters(counts);
  check_range(start, end, counts.numel());
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK(end - start <= UINT32_MAX, "row range of ", end - start, " rows exceeds 2^32 - 1");
  const int32_t* c = counts.data_ptr<int32_t>();
  std::vector<uint64_t> keys;
  for (int64_t r = start; r < end; ++r) {
    if (c[r] > 0) {
      keys.push_back((static_cast<uint64_t>(c[r]) << 32) | (UINT32_MAX - static_cast<uint64_t>(r - start)));
    }
  }
  k = std::min<int64_t>(k, static_cast<int64_t>(keys.size()));
  if (k > 0 && k < static_cast<int64_t>(keys.size())) {
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
  }
  Tensor out = at::empty({k}, counts.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) o[i] = start + static_cast<int64_t>(UINT32_MAX - (keys[i] & UINT32_MAX));
  std::sort(o, o + k);
  return out;
}

}  // namespace

TORCH_LIBRARY(cpr, m) {
  m.def(
      "count_accesses(Tensor(a!)[] counts, int[] table_rows, Tensor values, int[] key_offsets, "
      "int[] feature_to_table) -> ()");
  m.def(
      "sample_accesses(Tensor(a!)[] slots, Tensor(b!)[] stats, int[] table_rows, Tensor values, "
      "int[] key_offsets, int[] feature_to_table, int seed, int step, float rate, int capacity) -> ()");
  m.def("mark_saved_rows(Tensor(a!) counts, Tensor rows) -> ()");
  m.def("mark_saved_range(Tensor(a!) counts, int start, int end) -> ()");
  m.def("select_hottest(Tensor counts, int start, int end, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpr, CPU, m) {
  m.impl("count_accesses", &count_accesses_cpu);
  m.impl("sample_accesses", &sample_accesses_cpu);
  m.impl("select_hottest", &select_hottest_cpu);
}

TORCH_LIBRARY_IMPL(cpr, CompositeExplicitAutograd, m) {
  m.impl("mark_saved_rows", &mark_saved_rows);
  m.impl("mark_saved_range", &mark_saved_range);
}

}  // namespace cpr

// `import cpr._C` only has to load this library so that the registrations above run; the module itself is
// empty (the ops are reached through torch.ops.cpr), as in PyTorch's custom-op extension template.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
