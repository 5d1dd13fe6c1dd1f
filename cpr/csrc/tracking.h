// Definitions shared by the CPU (tracking.cpp) and CUDA (tracking_cuda.cu) kernels of the access-tracking
// ops, so that both devices hash, sample and lay out state identically.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace cpr {

// Empty slot of an SSU open-addressing set (row ids are >= 0).
constexpr int64_t kEmptySlot = -1;

// SSU per-table statistics tensor: int64[2].
constexpr int64_t kStatSize = 0;      // ids held in the set
constexpr int64_t kStatOverflow = 1;  // sampled new ids dropped because the set was full
constexpr int64_t kNumStats = 2;

// splitmix64 finaliser: a bijective 64-bit mix, so distinct inputs never collide.
C10_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Seed of one observe() call: every access of the call derives its coin from (seed, step, position, id),
// which makes sampling reproducible and independent of the number of threads or of the device.
C10_HOST_DEVICE inline uint64_t step_key(int64_t seed, int64_t step) {
  return mix64(mix64(static_cast<uint64_t>(seed) + 0x9e3779b97f4a7c15ULL) ^ static_cast<uint64_t>(step));
}

// True with probability threshold / 2^53 (see sample_threshold).
C10_HOST_DEVICE inline bool sample_access(uint64_t key, int64_t position, int64_t id, uint64_t threshold) {
  const uint64_t h = mix64(mix64(key ^ static_cast<uint64_t>(position)) ^ static_cast<uint64_t>(id));
  return (h >> 11) < threshold;
}

// Rate in [0, 1] -> 53-bit threshold; rate 1 keeps every access since (h >> 11) < 2^53 always.
inline uint64_t sample_threshold(double rate) {
  return static_cast<uint64_t>(rate * 9007199254740992.0);  // 2^53
}

// Home slot of an id in a set of `mask + 1` (a power of two) slots.
C10_HOST_DEVICE inline int64_t home_slot(int64_t id, int64_t mask) {
  return static_cast<int64_t>(mix64(static_cast<uint64_t>(id)) & static_cast<uint64_t>(mask));
}

}  // namespace cpr
