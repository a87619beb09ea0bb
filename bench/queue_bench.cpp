// Queue and Lock benchmarks, with the definitions of ../shared/BENCHMARKS.md. The queue exists
// before the timed region; the processes that use it are started and joined inside it (as a
// Python program timing the same thing has to), which costs a fork, well under 1 % of a run.
//
//   build/ci-release/bench/queue_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <procpool/process.hpp>
#include <procpool/queue.hpp>
#include <procpool/shared_memory.hpp>
#include <procpool/synchronize.hpp>

#include <cstdint>
#include <mutex>
#include <vector>

namespace {

// queue_throughput: one producer process puts n small ints, the parent gets them.
void BM_queue_throughput(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  procpool::Queue<std::int64_t> q;
  for (auto _ : state) {
    procpool::Process producer([&q, n] {
      for (std::int64_t i = 0; i < n; ++i) q.put(i);
    });
    producer.start();
    std::int64_t sum = 0;
    for (std::int64_t i = 0; i < n; ++i) sum += q.get();
    producer.join();
    if (sum != n * (n - 1) / 2) state.SkipWithError("lost or corrupted items");
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_queue_throughput)->Arg(200'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// queue_throughput, 2 producers x 2 consumers: n items in all, n/2 per producer, consumers stop
// at an end mark; the parent only starts and joins.
void BM_queue_throughput_2x2(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  procpool::Queue<std::int64_t> q;
  procpool::Queue<std::int64_t> sums;
  for (auto _ : state) {
    std::vector<procpool::Process> producers, consumers;
    for (int p = 0; p < 2; ++p) {
      producers.emplace_back([&q, n] {
        for (std::int64_t i = 0; i < n / 2; ++i) q.put(i);
      });
    }
    for (int c = 0; c < 2; ++c) {
      consumers.emplace_back([&q, &sums] {
        std::int64_t sum = 0;
        for (std::int64_t x = q.get(); x >= 0; x = q.get()) sum += x;
        sums.put(sum);
      });
    }
    for (auto& p : producers) p.start();
    for (auto& c : consumers) c.start();
    for (auto& p : producers) p.join();
    q.put(-1);
    q.put(-1);
    std::int64_t sum = sums.get() + sums.get();
    for (auto& c : consumers) c.join();
    if (sum != 2 * ((n / 2) * (n / 2 - 1) / 2)) state.SkipWithError("lost or corrupted items");
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_queue_throughput_2x2)->Arg(200'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// lock_handoff: two processes take a Lock in turn; a shared turn variable, read and flipped
// under the lock, makes each side wait for the other. Reports hand-offs per second.
void BM_lock_handoff(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  procpool::Lock lock;
  procpool::Value<int> turn(0);  // guarded by `lock`, not by its own lock
  // Waits for `mine`, then gives the turn to the other side.
  auto take_turns = [&lock, &turn, n](int mine) {
    for (std::int64_t i = 0; i < n; ++i) {
      for (;;) {
        std::scoped_lock lk(lock);
        if (turn.value() == mine) {
          turn.value() = 1 - mine;
          break;
        }
      }
    }
  };
  for (auto _ : state) {
    turn.value() = 0;
    procpool::Process other([&take_turns] { take_turns(1); });
    other.start();
    take_turns(0);
    other.join();
  }
  state.SetItemsProcessed(state.iterations() * 2 * n);
}
BENCHMARK(BM_lock_handoff)->Arg(20'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// semaphore_pingpong: the same alternation with no spinning, two Semaphores passing the turn
// back and forth (each hand-off is one wake-up of a sleeping process). Reports hand-offs/s.
void BM_semaphore_pingpong(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  procpool::Semaphore ping(0), pong(0);
  for (auto _ : state) {
    procpool::Process other([&ping, &pong, n] {
      for (std::int64_t i = 0; i < n; ++i) {
        ping.acquire();
        pong.release();
      }
    });
    other.start();
    for (std::int64_t i = 0; i < n; ++i) {
      ping.release();
      pong.acquire();
    }
    other.join();
  }
  state.SetItemsProcessed(state.iterations() * 2 * n);
}
BENCHMARK(BM_semaphore_pingpong)->Arg(20'000)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
