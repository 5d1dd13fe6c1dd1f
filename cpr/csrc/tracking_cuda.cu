// CUDA kernels of the access-tracking ops declared in tracking.cpp; same semantics as the CPU kernels
// (the counter resets, mark_saved_*, have one device-generic kernel there):
//  * counts are commutative updates (saturating increments), so the atomics below give the same state as
//    the CPU kernels whatever the order;
//  * SSU sampling uses the same (seed, step, position, id) coin as the CPU; the set holds the same ids as
//    on the CPU while it is below capacity. Once full, which new ids are dropped depends on arrival order.
// Every id is validated (one kernel and one small device-to-host copy) before any state is written.
#ifdef CPR_WITH_CUDA

#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <vector>

#include "checks.h"
#include "tracking.h"

namespace cpr {
namespace {

using at::IntArrayRef;
using at::Tensor;
using at::TensorList;

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

// The per-feature layout of a batch, on the device: key_offsets[F + 1], feature_to_table[F], rows[T].
struct DeviceBatch {
  Tensor meta;  // int64: key_offsets | feature_to_table | table_rows
  int64_t num_features;
  const int64_t* key_offsets() const { return meta.data_ptr<int64_t>(); }
  const int64_t* feature_to_table() const { return key_offsets() + num_features + 1; }
  const int64_t* table_rows() const { return feature_to_table() + num_features; }
};

DeviceBatch check_batch(const Tensor& values, IntArrayRef key_offsets, IntArrayRef feature_to_table,
                        IntArrayRef table_rows) {
  check_batch_layout(values, key_offsets, feature_to_table, table_rows);
  const int64_t num_features = static_cast<int64_t>(feature_to_table.size());
  std::vector<int64_t> host(key_offsets.begin(), key_offsets.end());
  host.insert(host.end(), feature_to_table.begin(), feature_to_table.end());
  host.insert(host.end(), table_rows.begin(), table_rows.end());
  Tensor meta = at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(values.device(), /*non_blocking=*/true);
  return DeviceBatch{meta, num_features};
}

// Pointers to per-table tensors, as an int64 device tensor the kernels index by table.
template <typename T>
Tensor device_pointers(TensorList tensors, const Tensor& values) {
  std::vector<int64_t> host;
  for (const Tensor& t : tensors) host.push_back(reinterpret_cast<int64_t>(t.data_ptr<T>()));
  return at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(values.device(), /*non_blocking=*/true);
}

// Feature of value position i: the last f with key_offsets[f] <= i (binary search, F is small).
__device__ inline int64_t feature_of(const int64_t* key_offsets, int64_t num_features, int64_t i) {
  int64_t lo = 0, hi = num_features - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (key_offsets[mid] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// first_bad[0] <- the lowest position whose id is outside its table's rows.
template <typename index_t>
__global__ void find_bad_id_kernel(const index_t* ids, int64_t n, const int64_t* key_offsets,
                                   const int64_t* feature_to_table, const int64_t* table_rows,
                                   int64_t num_features, unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = feature_of(key_offsets, num_features, i);
    const int64_t id = static_cast<int64_t>(ids[i]);
    if (id < 0 || id >= table_rows[feature_to_table[f]]) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

template <typename index_t>
void check_ids(const Tensor& values, const DeviceBatch& batch, IntArrayRef key_offsets,
               IntArrayRef feature_to_table, IntArrayRef table_rows) {
  const int64_t n = values.numel();
  if (n == 0) return;
  Tensor first_bad = at::full({1}, LLONG_MAX, values.options().dtype(at::kLong));
  find_bad_id_kernel<index_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      values.data_ptr<index_t>(), n, batch.key_offsets(), batch.feature_to_table(), batch.table_rows(),
      batch.num_features, reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t i = first_bad.item<int64_t>();
  if (i == LLONG_MAX) return;
  int64_t f = 0;
  while (key_offsets[f + 1] <= i) ++f;
  const int64_t t = feature_to_table[f];
  TORCH_CHECK(false, "feature ", f, " (table ", t, "): id ", values[i].item<int64_t>(), " at value position ", i,
              " is outside the table's rows [0, ", table_rows[t], "); no access of this batch was recorded");
}

// Saturating increment: a compare-and-swap loop, so no counter ever wraps past INT32_MAX.
__device__ inline void saturating_increment(int32_t* counter) {
  int32_t old = *counter;
  while (old != INT32_MAX) {
    const int32_t seen = atomicCAS(counter, old, old + 1);
    if (seen == old) return;
    old = seen;
  }
}

template <typename index_t>
__global__ void count_kernel(const index_t* ids, int64_t n, const int64_t* key_offsets,
                             const int64_t* feature_to_table, int64_t num_features, const int64_t* counters) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = feature_to_table[feature_of(key_offsets, num_features, i)];
    const int64_t id = static_cast<int64_t>(ids[i]);
    saturating_increment(reinterpret_cast<int32_t*>(counters[t]) + id);
  }
}

void count_accesses_cuda(TensorList counts, IntArrayRef table_rows, const Tensor& values, IntArrayRef key_offsets,
                         IntArrayRef feature_to_table) {
  const c10::cuda::CUDAGuard guard(values.device());
  const DeviceBatch batch = check_batch(values, key_offsets, feature_to_table, table_rows);
  TORCH_CHECK(counts.size() == table_rows.size(), "got ", counts.size(), " counters for ", table_rows.size(),
              " tables");
  for (size_t t = 0; t < counts.size(); ++t) {
    check_state(counts[t], at::kInt, table_rows[t], values, "counts", static_cast<int64_t>(t));
  }
  const int64_t n = values.numel();
  if (n == 0) return;
  const Tensor counter_ptrs = device_pointers<int32_t>(counts, values);
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "count_accesses_cuda", [&] {
    check_ids<index_t>(values, batch, key_offsets, feature_to_table, table_rows);
    count_kernel<index_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        values.data_ptr<index_t>(), n, batch.key_offsets(), batch.feature_to_table(), batch.num_features,
        counter_ptrs.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Inserts id into an open-addressing set of mask + 1 slots holding at most `capacity` ids. A thread first
// reserves room in stats[kStatSize], so the set never holds more than capacity ids; a reservation that
// turns out not to be needed (the id was already there) is returned.
__device__ inline void insert_sampled(int64_t* slots, int64_t mask, int64_t* stats, int64_t capacity, int64_t id) {
  auto* size = reinterpret_cast<unsigned long long*>(stats + kStatSize);
  auto* cells = reinterpret_cast<unsigned long long*>(slots);
  const auto empty = static_cast<unsigned long long>(kEmptySlot);
  const auto key = static_cast<unsigned long long>(id);
  bool reserved = false;
  for (int64_t s = home_slot(id, mask);; s = (s + 1) & mask) {
    unsigned long long seen = cells[s];
    if (seen == key) break;
    if (seen != empty) continue;
    if (!reserved) {
      if (atomicAdd(size, 1ULL) >= static_cast<unsigned long long>(capacity)) {
        atomicAdd(size, static_cast<unsigned long long>(-1LL));
        atomicAdd(reinterpret_cast<unsigned long long*>(stats + kStatOverflow), 1ULL);
        return;
      }
      reserved = true;
    }
    seen = atomicCAS(cells + s, empty, key);
    if (seen == empty) return;  // inserted; the reservation is used
    if (seen == key) break;      // another thread inserted the same id
  }
  if (reserved) atomicAdd(size, static_cast<unsigned long long>(-1LL));
}

template <typename index_t>
__global__ void sample_kernel(const index_t* ids, int64_t n, const int64_t* key_offsets,
                              const int64_t* feature_to_table, int64_t num_features, const int64_t* slots,
                              const int64_t* masks, const int64_t* stats, int64_t capacity, uint64_t key,
                              uint64_t threshold) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = feature_to_table[feature_of(key_offsets, num_features, i)];
    const int64_t id = static_cast<int64_t>(ids[i]);
    if (sample_access(key, i, id, threshold)) {
      insert_sampled(reinterpret_cast<int64_t*>(slots[t]), masks[t], reinterpret_cast<int64_t*>(stats[t]), capacity,
                     id);
    }
  }
}

void sample_accesses_cuda(TensorList slots, TensorList stats, IntArrayRef table_rows, const Tensor& values,
                          IntArrayRef key_offsets, IntArrayRef feature_to_table, int64_t seed, int64_t step,
                          double rate, int64_t capacity) {
  const c10::cuda::CUDAGuard guard(values.device());
  const DeviceBatch batch = check_batch(values, key_offsets, feature_to_table, table_rows);
  const std::vector<int64_t> masks = check_ssu_sets(slots, stats, table_rows, values, rate, capacity);
  const int64_t n = values.numel();
  if (n == 0) return;
  const Tensor slot_ptrs = device_pointers<int64_t>(slots, values);
  const Tensor stat_ptrs = device_pointers<int64_t>(stats, values);
  const Tensor mask_dev = at::tensor(masks, at::TensorOptions().dtype(at::kLong)).to(values.device(), true);
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "sample_accesses_cuda", [&] {
    check_ids<index_t>(values, batch, key_offsets, feature_to_table, table_rows);
    sample_kernel<index_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        values.data_ptr<index_t>(), n, batch.key_offsets(), batch.feature_to_table(), batch.num_features,
        slot_ptrs.data_ptr<int64_t>(), mask_dev.data_ptr<int64_t>(), stat_ptrs.data_ptr<int64_t>(), capacity,
        step_key(seed, step), sample_threshold(rate));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Top-k by count with ties towards lower ids, via the same packed key as the CPU kernel and ATen's CUDA
// radix select (at::topk), expected linear in the range; only the k chosen ids are sorted.
Tensor select_hottest_cuda(const Tensor& counts, int64_t start, int64_t end, int64_t k) {
  const c10::cuda::CUDAGuard guard(counts.device());
  check_counters(counts);
  check_range(start, end, counts.numel());
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK(end - start <= UINT32_MAX, "row range of ", end - start, " rows exceeds 2^32 - 1");
  k = std::min<int64_t>(k, end - start);
  if (k == 0) return at::empty({0}, counts.options().dtype(at::kLong));
  const Tensor offsets = at::arange(end - start, counts.options().dtype(at::kLong));
  const Tensor keys = counts.slice(0, start, end).to(at::kLong).bitwise_left_shift(32).bitwise_or(
      at::rsub(offsets, static_cast<int64_t>(UINT32_MAX)));
  const Tensor top = std::get<0>(at::topk(keys, k, 0, /*largest=*/true, /*sorted=*/false));
  const Tensor hot = top.masked_select(top.ge(int64_t{1} << 32));  // count >= 1
  const Tensor ids = at::rsub(hot.bitwise_and(static_cast<int64_t>(UINT32_MAX)), static_cast<int64_t>(UINT32_MAX))
                         .add_(start);
  return std::get<0>(ids.sort());
}

}  // namespace

TORCH_LIBRARY_IMPL(cpr, CUDA, m) {
  m.impl("count_accesses", &count_accesses_cuda);
  m.impl("sample_accesses", &sample_accesses_cuda);
  m.impl("select_hottest", &select_hottest_cuda);
}

}  // namespace cpr

#endif  // CPR_WITH_CUDA
