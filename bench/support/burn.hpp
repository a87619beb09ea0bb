#pragma once
// The cpu_bound_speedup work of BENCHMARKS.md, shared so that pool_bench and kernel_bound_bench
// burn exactly the same loop.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace bench_support {

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A fixed CPU loop: xorshift steps, each depending on the last, so nothing folds it away.
inline std::uint64_t burn(std::uint64_t n) {
  std::uint64_t x = 88172645463325252ull;
  for (std::uint64_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
  }
  return x;
}

// The n for which burn(n) takes about `target` seconds here (best of three, calibrated once).
inline std::uint64_t burn_steps(double target) {
  static const std::uint64_t per_second = [] {
    const std::uint64_t probe = 1u << 24;
    double best = 1e9;
    for (int i = 0; i < 3; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(burn(probe));
      best = std::min(best, seconds_since(t0));
    }
    return static_cast<std::uint64_t>(static_cast<double>(probe) / best);
  }();
  return std::max<std::uint64_t>(1, static_cast<std::uint64_t>(per_second * target));
}

}  // namespace bench_support
