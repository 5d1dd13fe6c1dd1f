// Copy-on-write row snapshots (cpr/snapshot.py): before a training step changes the rows a batch looks up,
// keep the values of those not kept yet. One call per batch covers every table, as the tracking ops do: the
// step runs while a save is being written, so its cost is training time (a Python loop over the tables took
// 2-4 ms per kaggle batch; this takes microseconds).
//
// State per table t (allocated by RowSnapshot):
//  * slot int32[rows]: -2 for a row the snapshot does not hold, -1 (kLive) for one it holds whose live
//    values are still the snapshot's, else where its kept values are (the writer reads those instead);
//  * kept_rows int64[tables]: rows kept so far per table;
//  * live[j], kept[j] for j in [tensors_of_table[t], tensors_of_table[t + 1]): the table's per-row tensors
//    (weight, row-wise optimizer state) and the buffers their kept rows go to, back to back in the order
//    they were kept. The buffers are allocated untouched with as many rows as the table, and filled from
//    the front: a batch's kept rows fill a few consecutive memory pages instead of faulting in one page
//    per row (page faults, not copies, were most of the cost).

#include <torch/library.h>
#include <ATen/ATen.h>

#include <climits>
#include <cstring>
#include <vector>

#include "checks.h"

namespace cpr {
namespace {

using at::IntArrayRef;
using at::Tensor;
using at::TensorList;

// A per-row tensor raw-copied row by row: contiguous, on the CPU, with `rows` rows.
void check_rows(const Tensor& t, int64_t rows, const char* what, int64_t j) {
  TORCH_CHECK(t.device().is_cpu(), what, "[", j, "] must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == rows, what, "[", j, "] must have ", rows, " rows, got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), what, "[", j, "] must be contiguous");
}

constexpr int32_t kLive = -1;  // (rows the snapshot does not hold are -2: never kept)

int64_t preserve_rows_cpu(TensorList slot, const Tensor& kept_rows, TensorList live, TensorList kept,
                          IntArrayRef tensors_of_table, const Tensor& values, IntArrayRef key_offsets,
                          IntArrayRef feature_to_table) {
  const int64_t num_tables = static_cast<int64_t>(slot.size());
  check_state(kept_rows, at::kLong, num_tables, values, "kept_rows", 0);
  TORCH_CHECK(static_cast<int64_t>(tensors_of_table.size()) == num_tables + 1 && tensors_of_table[0] == 0 &&
                  tensors_of_table[num_tables] == static_cast<int64_t>(live.size()) && live.size() == kept.size(),
              "tensors_of_table must be offsets into live and kept (", live.size(), " and ", kept.size(),
              " tensors) for ", num_tables, " tables");
  TORCH_CHECK(values.device().is_cpu(), "values must be on the CPU, got ", values.device());
  std::vector<int64_t> rows(num_tables);
  std::vector<int32_t*> slots(num_tables);
  int64_t* next = kept_rows.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tables; ++t) {
    rows[t] = slot[t].numel();
    TORCH_CHECK(rows[t] <= INT32_MAX, "table ", t, " has more than 2^31 - 1 rows");
    check_state(slot[t], at::kInt, rows[t], values, "slot", t);
    slots[t] = slot[t].data_ptr<int32_t>();
    TORCH_CHECK(0 <= next[t] && next[t] <= rows[t], "kept_rows[", t, "] = ", next[t], " is not in [0, ", rows[t], "]");
    TORCH_CHECK(tensors_of_table[t] <= tensors_of_table[t + 1], "tensors_of_table must be non-decreasing");
  }
  std::vector<const char*> sources(live.size());
  std::vector<char*> targets(live.size());
  std::vector<int64_t> row_bytes(live.size());
  for (int64_t t = 0; t < num_tables; ++t) {
    for (int64_t j = tensors_of_table[t]; j < tensors_of_table[t + 1]; ++j) {
      check_rows(live[j], rows[t], "live", j);
      check_rows(kept[j], rows[t], "kept", j);
      TORCH_CHECK(live[j].sizes() == kept[j].sizes() && live[j].scalar_type() == kept[j].scalar_type(),
                  "kept[", j, "] must have the shape and dtype of live[", j, "]");
      row_bytes[j] = live[j].numel() ? live[j].nbytes() / rows[t] : 0;
      sources[j] = static_cast<const char*>(live[j].data_ptr());
      targets[j] = static_cast<char*>(kept[j].data_ptr());
    }
  }
  check_batch_layout(values, key_offsets, feature_to_table, rows);
  int64_t copied = 0;
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "preserve_rows", [&] {
    const index_t* ids = values.data_ptr<index_t>();
    const int64_t num_features = static_cast<int64_t>(feature_to_table.size());
    for (int64_t f = 0; f < num_features; ++f) {  // every id is checked before any row is kept
      const uint64_t table_rows = static_cast<uint64_t>(rows[feature_to_table[f]]);
      for (int64_t i = key_offsets[f]; i < key_offsets[f + 1]; ++i) {
        TORCH_CHECK(static_cast<uint64_t>(static_cast<int64_t>(ids[i])) < table_rows, "feature ", f, ": id ",
                    static_cast<int64_t>(ids[i]), " at value position ", i, " is outside its table's rows [0, ",
                    table_rows, ")");
      }
    }
    for (int64_t f = 0; f < num_features; ++f) {
      const int64_t t = feature_to_table[f];
      for (int64_t i = key_offsets[f]; i < key_offsets[f + 1]; ++i) {
        const int64_t id = static_cast<int64_t>(ids[i]);
        if (slots[t][id] != kLive) continue;
        const int64_t at = next[t]++;  // < rows: each row is kept at most once
        for (int64_t j = tensors_of_table[t]; j < tensors_of_table[t + 1]; ++j) {
          std::memcpy(targets[j] + at * row_bytes[j], sources[j] + id * row_bytes[j], row_bytes[j]);
          copied += row_bytes[j];
        }
        slots[t][id] = static_cast<int32_t>(at);
      }
    }
  });
  return copied;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpr, m) {
  m.def(
      "preserve_rows(Tensor(a!)[] slot, Tensor(b!) kept_rows, Tensor[] live, Tensor(c!)[] kept, "
      "int[] tensors_of_table, Tensor values, int[] key_offsets, int[] feature_to_table) -> int");
}

TORCH_LIBRARY_IMPL(cpr, CPU, m) {
  m.impl("preserve_rows", &preserve_rows_cpu);
}

}  // namespace cpr
