// Pool benchmarks, with the definitions of ../shared/BENCHMARKS.md: two workers, the pool
// built and warmed up (one call, so every worker exists) outside the timed region, shutdown
// outside too, all results materialised inside it.
//
//   build/ci-release/bench/pool_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <procpool/pool.hpp>

#include <cstdint>
#include <ranges>
#include <vector>

namespace {

std::int64_t ident(std::int64_t x) { return x; }
std::int64_t square(std::int64_t x) { return x * x; }

procpool::Pool& warm_pool() {
  static procpool::Pool pool(2);
  static bool warmed = [] {
    // One call per worker so that both exist before anything is timed.
    auto a = pool.apply_async(ident, std::int64_t{1});
    auto b = pool.apply_async(ident, std::int64_t{2});
    a.get();
    b.get();
    return true;
  }();
  (void)warmed;
  return pool;
}

// apply_latency: sequential apply(ident, i); reported per call.
void BM_apply_latency(benchmark::State& state) {
  auto& pool = warm_pool();
  std::int64_t i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(pool.apply(ident, i++));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_apply_latency)->Unit(benchmark::kMicrosecond)->UseRealTime();

// apply_async_throughput: submit 100,000 apply_async(square, i), then get() them all.
void BM_apply_async_throughput(benchmark::State& state) {
  auto& pool = warm_pool();
  const std::int64_t n = state.range(0);
  std::vector<procpool::AsyncResult<std::int64_t>> results;
  results.reserve(static_cast<std::size_t>(n));
  for (auto _ : state) {
    results.clear();
    for (std::int64_t i = 0; i < n; ++i) results.push_back(pool.apply_async(square, i));
    for (auto& r : results) benchmark::DoNotOptimize(r.get());
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_apply_async_throughput)->Arg(100'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// map_throughput: map(square, 0..n-1) with the automatic chunk size (0) or chunk size 1.
void BM_map_throughput(benchmark::State& state) {
  auto& pool = warm_pool();
  const std::int64_t n = state.range(0);
  const auto chunksize = static_cast<std::size_t>(state.range(1));
  for (auto _ : state) {
    auto v = pool.map(square, std::views::iota(std::int64_t{0}, n), chunksize);
    benchmark::DoNotOptimize(v.data());
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_map_throughput)
    ->Args({1'000'000, 0})
    ->Args({100'000, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// imap_unordered_throughput: 100,000 items, chunk size 1 and 64, consumed fully.
void BM_imap_unordered_throughput(benchmark::State& state) {
  auto& pool = warm_pool();
  const std::int64_t n = state.range(0);
  const auto chunksize = static_cast<std::size_t>(state.range(1));
  for (auto _ : state) {
    std::int64_t sum = 0;
    for (std::int64_t x :
         pool.imap_unordered(square, std::views::iota(std::int64_t{0}, n), chunksize)) {
      sum += x;
    }
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_imap_unordered_throughput)
    ->Args({100'000, 1})
    ->Args({100'000, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
