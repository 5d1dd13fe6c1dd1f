// Host-side argument checks shared by the CPU and CUDA kernels of the `cpr` ops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "tracking.h"

namespace cpr {

// A per-table state tensor (`what`[table]) must have this dtype and size, sit on the batch's device, and
// be contiguous: the kernels index it raw.
inline void check_state(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Tensor& values,
                        const char* what, int64_t table) {
  TORCH_CHECK(t.scalar_type() == dtype, what, "[", table, "] must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == values.device(), what, "[", table, "] is on ", t.device(), " but values are on ",
              values.device());
  TORCH_CHECK(t.is_contiguous(), what, "[", table, "] must be contiguous");
  TORCH_CHECK(t.numel() == numel, what, "[", table, "] has ", t.numel(), " elements, expected ", numel);
}

// The jagged layout of a batch: 1-D int32/int64 values, F + 1 non-decreasing key offsets that span them,
// a table index for every feature, and a row count for every table.
inline void check_batch_layout(const at::Tensor& values, at::IntArrayRef key_offsets,
                               at::IntArrayRef feature_to_table, at::IntArrayRef table_rows) {
  TORCH_CHECK(values.dim() == 1, "values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kInt || values.scalar_type() == at::kLong,
              "values must be int32 or int64, got ", values.scalar_type());
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  const int64_t num_features = static_cast<int64_t>(feature_to_table.size());
  const int64_t num_tables = static_cast<int64_t>(table_rows.size());
  TORCH_CHECK(static_cast<int64_t>(key_offsets.size()) == num_features + 1, "key_offsets has ",
              key_offsets.size(), " entries, expected num_features + 1 = ", num_features + 1);
  TORCH_CHECK(key_offsets[0] == 0, "key_offsets[0] must be 0, got ", key_offsets[0]);
  TORCH_CHECK(key_offsets[num_features] == values.numel(), "key_offsets[", num_features, "] = ",
              key_offsets[num_features], " but values has ", values.numel(), " elements");
  for (int64_t f = 0; f < num_features; ++f) {
    TORCH_CHECK(key_offsets[f] <= key_offsets[f + 1], "key_offsets must be non-decreasing, but key_offsets[",
                f, "] = ", key_offsets[f], " > key_offsets[", f + 1, "] = ", key_offsets[f + 1]);
    TORCH_CHECK(0 <= feature_to_table[f] && feature_to_table[f] < num_tables, "feature_to_table[", f, "] = ",
                feature_to_table[f], " is not a table index in [0, ", num_tables, ")");
  }
  for (int64_t t = 0; t < num_tables; ++t) {
    TORCH_CHECK(table_rows[t] >= 0, "table_rows[", t, "] = ", table_rows[t], " is negative");
  }
}

// One table's MFU counters, as the ops that read or reset them (not per batch) take them.
inline void check_counters(const at::Tensor& counts) {
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kInt && counts.is_contiguous(),
              "counts must be a contiguous 1-D int32 tensor, got ", counts.scalar_type(), " of shape ",
              counts.sizes());
}

// The arguments of one SSU sampling call beside its batch: a rate in [0, 1], a capacity >= 1, and for every
// table a set of slots (a power of two above the capacity) and its stats, as check_state requires. Returns
// each set's slot mask (slots - 1).
inline std::vector<int64_t> check_ssu_sets(at::TensorList slots, at::TensorList stats, at::IntArrayRef table_rows,
                                           const at::Tensor& values, double rate, int64_t capacity) {
  TORCH_CHECK(0.0 <= rate && rate <= 1.0, "rate must be in [0, 1], got ", rate);
  TORCH_CHECK(capacity >= 1, "capacity must be >= 1, got ", capacity);
  TORCH_CHECK(slots.size() == table_rows.size() && stats.size() == table_rows.size(), "got ", slots.size(),
              " slot sets and ", stats.size(), " stats for ", table_rows.size(), " tables");
  std::vector<int64_t> masks;
  for (size_t t = 0; t < slots.size(); ++t) {
    const int64_t n = slots[t].numel();
    TORCH_CHECK(n > capacity && (n & (n - 1)) == 0, "slots[", t, "] has ", n,
                " elements; expected a power of two greater than capacity ", capacity);
    check_state(slots[t], at::kLong, n, values, "slots", static_cast<int64_t>(t));
    check_state(stats[t], at::kLong, kNumStats, values, "stats", static_cast<int64_t>(t));
    masks.push_back(n - 1);
  }
  return masks;
}

inline void check_range(int64_t start, int64_t end, int64_t num_rows) {
  TORCH_CHECK(0 <= start && start <= end && end <= num_rows, "row range [", start, ", ", end,
              ") is not within [0, ", num_rows, ")");
}

}  // namespace cpr
