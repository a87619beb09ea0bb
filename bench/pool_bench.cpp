// Pool, Process and Pipe benchmarks, with the definitions of ../shared/BENCHMARKS.md: two
// workers, the pool built and warmed up (one call, so every worker exists) outside the timed
// region, shutdown outside too, all results materialised inside it.
//
//   build/bench/bench/pool_bench                              # every scenario
//   build/bench/bench/pool_bench --benchmark_filter='^pool/'  # one family
//   build/bench/bench/pool_bench --quick                      # a tenth of the items (smoke run)
//
// Each benchmark does exactly the work BENCHMARKS.md defines per iteration and reports its figure
// as a counter, computed from its own clock around the work only (so the JSON output carries
// the figure directly): tasks_per_s / items_per_s, us_per_call / us_per_roundtrip, GB_per_s
// (10^9 bytes of payload per second), ms, speedup. `n` is the item count of one iteration.
// bench/compare.py runs these next to Python and the bare-kernel bounds (kernel_bound_bench);
// bench/scaling.py runs the `scaling/` family.

#include <benchmark/benchmark.h>

#include <procpool/connection.hpp>
#include <procpool/errors.hpp>
#include <procpool/pool.hpp>
#include <procpool/process.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <ranges>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/bench_main.hpp"
#include "support/burn.hpp"

namespace {

using bench_support::burn;
using bench_support::burn_steps;
using bench_support::seconds_since;

using Clock = std::chrono::steady_clock;
using Buffer = std::vector<std::byte>;

bool g_quick = false;  // --quick: a tenth of the items, for a smoke run

std::int64_t scaled(std::int64_t n) { return g_quick ? std::max<std::int64_t>(1, n / 10) : n; }

// ---------------------------------------------------------------------------------------------
// The work functions of BENCHMARKS.md.

std::int64_t ident(std::int64_t x) { return x; }
std::int64_t square(std::int64_t x) { return x * x; }
std::int64_t nbytes(const Buffer& b) { return static_cast<std::int64_t>(b.size()); }
Buffer echo(Buffer b) { return b; }

Buffer make_buffer(std::size_t size, std::size_t seed) {
  Buffer b(size);
  for (std::size_t i = 0; i < size; i += 4096) b[i] = static_cast<std::byte>(i + seed);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Pools.

// Every worker exists and has run a task before anything is timed.
void warm_up(procpool::Pool& pool) {
  auto v = pool.map(
      ident, std::views::iota(std::int64_t{0}, static_cast<std::int64_t>(4 * pool.size())), 1);
  benchmark::DoNotOptimize(v.data());
}

// The scenarios' pool: two workers, built and warmed up once, shut down at exit.
procpool::Pool& warm_pool() {
  static procpool::Pool pool(2);
  static bool warmed = (warm_up(pool), true);
  (void)warmed;
  return pool;
}

// Sets the figure counters of a benchmark that did `per_iteration` items per iteration in
// `secs` seconds of its own timed work.
void set_rate(benchmark::State& state, const char* name, std::int64_t per_iteration, double secs) {
  double items = static_cast<double>(per_iteration) * static_cast<double>(state.iterations());
  state.counters[name] = benchmark::Counter(secs > 0 ? items / secs : 0);
  state.counters["n"] = benchmark::Counter(static_cast<double>(per_iteration));
}
void set_latency(benchmark::State& state, const char* name, std::int64_t per_iteration,
                 double secs) {
  double items = static_cast<double>(per_iteration) * static_cast<double>(state.iterations());
  state.counters[name] = benchmark::Counter(items > 0 ? secs * 1e6 / items : 0);
  state.counters["n"] = benchmark::Counter(static_cast<double>(per_iteration));
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

// apply_latency: n sequential apply(ident, i); µs per call.
void apply_latency(benchmark::State& state, procpool::Pool& pool, std::int64_t n) {
  double secs = 0;
  std::int64_t sum = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    for (std::int64_t i = 0; i < n; ++i) sum += pool.apply(ident, i);
    secs += seconds_since(t0);
  }
  benchmark::DoNotOptimize(sum);
  set_latency(state, "us_per_call", n, secs);
}

// apply_async_throughput: submit n apply_async(square, i), then get() them all; tasks/s.
void apply_async_throughput(benchmark::State& state, std::int64_t n) {
  auto& pool = warm_pool();
  std::vector<procpool::AsyncResult<std::int64_t>> results;
  results.reserve(static_cast<std::size_t>(n));
  double secs = 0;
  for (auto _ : state) {
    results.clear();
    auto t0 = Clock::now();
    for (std::int64_t i = 0; i < n; ++i) results.push_back(pool.apply_async(square, i));
    std::int64_t sum = 0;
    for (auto& r : results) sum += r.get();
    secs += seconds_since(t0);
    benchmark::DoNotOptimize(sum);
  }
  set_rate(state, "tasks_per_s", n, secs);
}

// map_throughput: map(square, 0..n-1) with chunk size `chunksize` (0: automatic); items/s.
void map_throughput(benchmark::State& state, procpool::Pool& pool, std::int64_t n,
                    std::size_t chunksize) {
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    auto v = pool.map(square, std::views::iota(std::int64_t{0}, n), chunksize);
    secs += seconds_since(t0);
    if (static_cast<std::int64_t>(v.size()) != n || v.back() != (n - 1) * (n - 1)) {
      state.SkipWithError("map returned wrong results");
      return;
    }
  }
  set_rate(state, "items_per_s", n, secs);
}

// imap_unordered_throughput: n items with chunk size `chunksize`, consumed fully; items/s.
void imap_unordered_throughput(benchmark::State& state, std::int64_t n, std::size_t chunksize) {
  auto& pool = warm_pool();
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::int64_t sum = 0, count = 0;
    for (std::int64_t x :
         pool.imap_unordered(square, std::views::iota(std::int64_t{0}, n), chunksize)) {
      sum += x;
      ++count;
    }
    secs += seconds_since(t0);
    benchmark::DoNotOptimize(sum);
    if (count != n) {
      state.SkipWithError("imap_unordered lost items");
      return;
    }
  }
  set_rate(state, "items_per_s", n, secs);
}

// cpu_bound_speedup: `tasks` × burn(~target s): serial time ÷ pool time (ideal 2.0).
void cpu_bound_speedup(benchmark::State& state, std::int64_t tasks, double target) {
  auto& pool = warm_pool();
  const std::uint64_t steps = burn_steps(target);
  std::vector<std::uint64_t> work(static_cast<std::size_t>(tasks), steps);
  double serial = 0, pooled = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::uint64_t a = 0;
    for (std::uint64_t s : work) a ^= burn(s);
    serial += seconds_since(t0);
    t0 = Clock::now();
    auto v = pool.map(burn, work, 1);
    pooled += seconds_since(t0);
    std::uint64_t b = 0;
    for (std::uint64_t x : v) b ^= x;
    if (a != b) {
      state.SkipWithError("burn gave different results in the pool");
      return;
    }
  }
  auto iters = static_cast<double>(state.iterations());
  state.counters["speedup"] = benchmark::Counter(pooled > 0 ? serial / pooled : 0);
  state.counters["serial_s"] = benchmark::Counter(serial / iters);
  state.counters["pool_s"] = benchmark::Counter(pooled / iters);
  state.counters["burn_s"] = benchmark::Counter(serial / iters / static_cast<double>(tasks));
  state.counters["n"] = benchmark::Counter(static_cast<double>(tasks));
}

// large_payload: map(nbytes or echo, `count` buffers of `size` bytes, chunk size 1); GB/s of
// payload (each byte counted once, also for the round trip).
void large_payload(benchmark::State& state, procpool::Pool& pool, std::size_t count,
                   std::size_t size, bool round_trip) {
  std::vector<Buffer> bufs;
  for (std::size_t i = 0; i < count; ++i) bufs.push_back(make_buffer(size, i));
  double secs = 0;
  for (auto _ : state) {
    if (round_trip) {
      auto t0 = Clock::now();
      std::vector<Buffer> back = pool.map(echo, bufs, 1);
      secs += seconds_since(t0);
      if (back.size() != count || back.back() != bufs.back()) {
        state.SkipWithError("echo returned wrong buffers");
        return;
      }
    } else {
      auto t0 = Clock::now();
      std::vector<std::int64_t> sizes = pool.map(nbytes, bufs, 1);
      secs += seconds_since(t0);
      if (sizes.size() != count || sizes.back() != static_cast<std::int64_t>(size)) {
        state.SkipWithError("nbytes returned wrong sizes");
        return;
      }
    }
  }
  double bytes = static_cast<double>(count * size) * static_cast<double>(state.iterations());
  state.counters["GB_per_s"] = benchmark::Counter(secs > 0 ? bytes / secs / 1e9 : 0);
  state.counters["items_per_s"] = benchmark::Counter(
      secs > 0 ? static_cast<double>(count) * static_cast<double>(state.iterations()) / secs : 0);
  state.counters["payload_bytes"] = benchmark::Counter(static_cast<double>(size));
  state.counters["n"] = benchmark::Counter(static_cast<double>(count));
}

// pool_startup: construct a 2-worker pool, one apply, close, join; median ms of `runs`.
void pool_startup(benchmark::State& state, int runs) {
  std::vector<double> ms;
  for (auto _ : state) {
    for (int i = 0; i < runs; ++i) {
      auto t0 = Clock::now();
      {
        procpool::Pool pool(2);
        benchmark::DoNotOptimize(pool.apply(ident, std::int64_t{1}));
        pool.close();
        pool.join();
      }
      ms.push_back(seconds_since(t0) * 1e3);
    }
  }
  std::sort(ms.begin(), ms.end());
  double median =
      ms.size() % 2 ? ms[ms.size() / 2] : (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]) / 2;
  state.counters["ms"] = benchmark::Counter(median);
  state.counters["ms_min"] = benchmark::Counter(ms.front());
  state.counters["n"] = benchmark::Counter(runs);
}

// pipe_pingpong: a Pipe between the parent and one child Process that sends back what it
// gets; n round trips of a small int; µs per round trip.
void pipe_pingpong(benchmark::State& state, std::int64_t n) {
  auto pipe = procpool::Pipe();
  procpool::Connection& parent_end = pipe.first;
  procpool::Connection& child_end = pipe.second;
  procpool::Process child([&child_end] {
    for (;;) {
      auto x = child_end.recv<std::int64_t>();
      if (x < 0) return;
      child_end.send(x);
    }
  });
  child.start();
  child_end.close();
  parent_end.send(std::int64_t{0});  // the child is running before the clock starts
  (void)parent_end.recv<std::int64_t>();
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    for (std::int64_t i = 1; i <= n; ++i) {
      parent_end.send(i);
      if (parent_end.recv<std::int64_t>() != i) {
        state.SkipWithError("the child sent back something else");
        break;
      }
    }
    secs += seconds_since(t0);
  }
  parent_end.send(std::int64_t{-1});
  child.join();
  set_latency(state, "us_per_roundtrip", n, secs);
}

// ---------------------------------------------------------------------------------------------
// Scaling: the same measurements with 1, 2, 4, 8 workers, and against payload size.

// A pool of `workers`, built and warmed up before the timed loop and shut down after it.
template <class Body>
void with_pool(std::size_t workers, Body&& body) {
  procpool::Pool pool(workers);
  warm_up(pool);
  body(pool);
}

// 8 B to 64 MiB: 8 × 4^k, then 64 MiB.
std::vector<std::size_t> payload_sizes() {
  std::vector<std::size_t> v;
  for (std::size_t s = 8; s <= (std::size_t{32} << 20); s *= 4) v.push_back(s);
  v.push_back(std::size_t{64} << 20);
  return v;
}

// About 256 MiB per measurement (32 MiB with --quick), between 4 and 4096 buffers.
std::size_t payload_count(std::size_t size) {
  std::size_t total = g_quick ? (std::size_t{32} << 20) : (std::size_t{256} << 20);
  return std::clamp<std::size_t>(total / size, 4, g_quick ? 512 : 4096);
}

void register_all() {
  using benchmark::RegisterBenchmark;
  auto reg = [](const std::string& name, auto fn) {
    return RegisterBenchmark(name.c_str(), fn)->UseRealTime()->Unit(benchmark::kMillisecond);
  };

  reg("pool/apply_latency",
      [](benchmark::State& s) { apply_latency(s, warm_pool(), scaled(5'000)); });
  reg("pool/apply_async_throughput",
      [](benchmark::State& s) { apply_async_throughput(s, scaled(100'000)); });
  reg("pool/map_throughput/auto",
      [](benchmark::State& s) { map_throughput(s, warm_pool(), scaled(1'000'000), 0); });
  reg("pool/map_throughput/chunk1",
      [](benchmark::State& s) { map_throughput(s, warm_pool(), scaled(100'000), 1); });
  reg("pool/imap_unordered_throughput/chunk1",
      [](benchmark::State& s) { imap_unordered_throughput(s, scaled(100'000), 1); });
  reg("pool/imap_unordered_throughput/chunk64",
      [](benchmark::State& s) { imap_unordered_throughput(s, scaled(100'000), 64); });
  reg("pool/cpu_bound_speedup", [](benchmark::State& s) {
    cpu_bound_speedup(s, 16, g_quick ? 0.02 : 0.1);
  })->Iterations(1);
  reg("pool/large_payload/one_way", [](benchmark::State& s) {
    large_payload(s, warm_pool(), 16, (g_quick ? 1 : 16) << 20, false);
  });
  reg("pool/large_payload/round_trip", [](benchmark::State& s) {
    large_payload(s, warm_pool(), 16, (g_quick ? 1 : 16) << 20, true);
  });
  reg("pool/pool_startup", [](benchmark::State& s) {
    pool_startup(s, g_quick ? 5 : 20);
  })->Iterations(1);
  reg("pipe/pingpong", [](benchmark::State& s) { pipe_pingpong(s, scaled(20'000)); });

  for (std::size_t w : {1, 2, 4, 8}) {
    std::string suffix = "/workers:" + std::to_string(w);
    reg("scaling/map_throughput" + suffix, [w](benchmark::State& s) {
      with_pool(w, [&](procpool::Pool& p) { map_throughput(s, p, scaled(1'000'000), 0); });
    });
    reg("scaling/apply_latency" + suffix, [w](benchmark::State& s) {
      with_pool(w, [&](procpool::Pool& p) { apply_latency(s, p, scaled(2'000)); });
    });
  }
  for (std::size_t size : payload_sizes()) {
    reg("scaling/payload/bytes:" + std::to_string(size), [size](benchmark::State& s) {
      with_pool(2,
                [&](procpool::Pool& p) { large_payload(s, p, payload_count(size), size, false); });
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
  return bench_support::run_main(
      argc, argv,
      "pool_bench: procpool's Pool/Process/Pipe scenarios (BENCHMARKS.md).\n"
      "  --quick  a tenth of the items per scenario (a smoke run)",
      g_quick, register_all);
}
