// Manager benchmarks (BENCHMARKS.md, manager_dict_ops): a Manager dict's set and get from one
// client, and from two processes at once, plus the atomic update and the kernel's bound.
//
//   build/bench/bench/manager_bench                                   # every scenario
//   build/bench/bench/manager_bench --benchmark_filter='dict_ops'     # some of them
//   build/bench/bench/manager_bench --quick                           # a tenth of the ops
//
// The Manager is built, and its dict made and touched once, outside the timed region. Each
// scenario reports ops_per_s and us_per_op from its own clock around the work only.
//
//   manager/dict_ops/one_client        20,000 set then 20,000 get from the parent (the
//                                      BENCHMARKS.md scenario)
//   manager/dict_set, dict_get         the two halves on their own
//   manager/dict_update/one_client     20,000 d.update(key, ++) (one round trip each)
//   manager/dict_ops/two_processes     two Process children, each 10,000 set then 10,000 get of
//                                      its own keys, at once; total ops over the wall time
//   manager/dict_ops/pinned            as one_client, with the client on CPU 0 and the server on
//                                      CPU 1
//   kernel/socketpair_roundtrip/pinned a bare socketpair ping-pong between two processes pinned
//                                      to CPUs 0 and 1: the bound BENCHMARKS.md compares with
//                                      (ops_per_roundtrip of the pinned scenario = its ops_per_s
//                                      x this us_per_op / 1e6)

#include <benchmark/benchmark.h>

#include <procpool/manager.hpp>
#include <procpool/process.hpp>

#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "support/bench_main.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using Dict = procpool::DictProxy<std::int64_t, std::int64_t>;

bool g_quick = false;

std::int64_t scaled(std::int64_t n) { return g_quick ? std::max<std::int64_t>(1, n / 10) : n; }

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void set_rate(benchmark::State& state, double ops, double secs) {
  state.counters["ops_per_s"] = benchmark::Counter(secs > 0 ? ops / secs : 0);
  state.counters["us_per_op"] = benchmark::Counter(ops > 0 ? secs * 1e6 / ops : 0);
}

bool pin(pid_t pid, int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return ::sched_setaffinity(pid, sizeof set, &set) == 0;
}

void unpin(pid_t pid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int i = 0; i < CPU_SETSIZE; ++i) CPU_SET(i, &set);
  ::sched_setaffinity(pid, sizeof set, &set);
}

// One Manager for the whole run (its construction is not what is measured).
procpool::Manager& manager() {
  static procpool::Manager m;
  return m;
}

Dict fresh_dict() {
  Dict d = manager().dict<std::int64_t, std::int64_t>();
  d.set(-1, -1);  // the connection exists before the clock starts
  return d;
}

void dict_ops(benchmark::State& state, Dict d, std::int64_t n, bool sets, bool gets) {
  double secs = 0;
  std::int64_t sum = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    if (sets) {
      for (std::int64_t i = 0; i < n; ++i) d.set(i, i);
    }
    if (gets) {
      for (std::int64_t i = 0; i < n; ++i) sum += d.get(i);
    }
    secs += seconds_since(t0);
  }
  benchmark::DoNotOptimize(sum);
  set_rate(state,
           static_cast<double>(n * ((sets ? 1 : 0) + (gets ? 1 : 0))) *
               static_cast<double>(state.iterations()),
           secs);
}

void dict_update(benchmark::State& state, std::int64_t n) {
  Dict d = fresh_dict();
  d.set(0, 0);
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    for (std::int64_t i = 0; i < n; ++i) d.update(0, [](std::int64_t& x) { ++x; });
    secs += seconds_since(t0);
  }
  set_rate(state, static_cast<double>(n) * static_cast<double>(state.iterations()), secs);
}

void dict_ops_processes(benchmark::State& state, int processes, std::int64_t per_process) {
  Dict d = fresh_dict();
  double secs = 0;
  for (auto _ : state) {
    std::vector<procpool::Process> children;
    for (int p = 0; p < processes; ++p) {
      children.emplace_back([d, p, per_process] {
        std::int64_t base = static_cast<std::int64_t>(p) << 32;
        for (std::int64_t i = 0; i < per_process; ++i) d.set(base + i, i);
        std::int64_t sum = 0;
        for (std::int64_t i = 0; i < per_process; ++i) sum += d.get(base + i);
        if (sum != per_process * (per_process - 1) / 2) ::_exit(1);
      });
    }
    auto t0 = Clock::now();
    for (auto& c : children) c.start();
    for (auto& c : children) c.join();
    secs += seconds_since(t0);
    for (auto& c : children) {
      if (c.exitcode() != 0) state.SkipWithError("a child process failed");
    }
  }
  set_rate(
      state,
      2.0 * static_cast<double>(per_process) * processes * static_cast<double>(state.iterations()),
      secs);
}

void dict_ops_pinned(benchmark::State& state, std::int64_t n) {
  if (procpool::cpu_count() < 2 || !pin(0, 0) || !pin(manager().server_pid(), 1)) {
    state.SkipWithError("needs two CPUs");
    return;
  }
  dict_ops(state, fresh_dict(), n, true, true);
  unpin(0);
  unpin(manager().server_pid());
}

// The kernel's bound: a small message there and back between two processes pinned to
// different CPUs, blocking reads (as in kernel_bound_bench).
void socketpair_roundtrip_pinned(benchmark::State& state, std::int64_t n) {
  int sv[2];
  if (procpool::cpu_count() < 2 || ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    state.SkipWithError("needs two CPUs and a socketpair");
    return;
  }
  pid_t child = ::fork();
  if (child == 0) {
    ::close(sv[0]);
    pin(0, 1);
    char buf[64];
    for (;;) {
      ssize_t got = ::recv(sv[1], buf, sizeof buf, 0);
      if (got <= 0 || ::send(sv[1], buf, static_cast<std::size_t>(got), MSG_NOSIGNAL) != got) {
        ::_exit(0);
      }
    }
  }
  ::close(sv[1]);
  pin(0, 0);
  char msg[32] = {};
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    for (std::int64_t i = 0; i < n; ++i) {
      (void)::send(sv[0], msg, sizeof msg, MSG_NOSIGNAL);
      std::size_t got = 0;
      while (got < sizeof msg) {
        ssize_t r = ::recv(sv[0], msg + got, sizeof msg - got, 0);
        if (r <= 0) break;
        got += static_cast<std::size_t>(r);
      }
    }
    secs += seconds_since(t0);
  }
  ::close(sv[0]);
  int st;
  ::waitpid(child, &st, 0);
  unpin(0);
  set_rate(state, static_cast<double>(n) * static_cast<double>(state.iterations()), secs);
}

void register_all() {
  using benchmark::RegisterBenchmark;
  auto reg = [](const std::string& name, auto fn) {
    return RegisterBenchmark(name.c_str(), fn)->UseRealTime()->Unit(benchmark::kMillisecond);
  };
  reg("manager/dict_ops/one_client",
      [](benchmark::State& s) { dict_ops(s, fresh_dict(), scaled(20'000), true, true); });
  reg("manager/dict_set/one_client",
      [](benchmark::State& s) { dict_ops(s, fresh_dict(), scaled(20'000), true, false); });
  reg("manager/dict_get/one_client", [](benchmark::State& s) {
    Dict d = fresh_dict();
    for (std::int64_t i = 0; i < scaled(20'000); ++i) d.set(i, i);
    dict_ops(s, d, scaled(20'000), false, true);
  });
  reg("manager/dict_update/one_client",
      [](benchmark::State& s) { dict_update(s, scaled(20'000)); });
  reg("manager/dict_ops/two_processes",
      [](benchmark::State& s) { dict_ops_processes(s, 2, scaled(10'000)); });
  reg("manager/dict_ops/pinned", [](benchmark::State& s) { dict_ops_pinned(s, scaled(20'000)); });
  reg("kernel/socketpair_roundtrip/pinned",
      [](benchmark::State& s) { socketpair_roundtrip_pinned(s, scaled(5'000)); });
}

}  // namespace

int main(int argc, char** argv) {
  return bench_support::run_main(argc, argv,
                                 "manager_bench: procpool's Manager scenarios (BENCHMARKS.md).\n"
                                 "  --quick  a tenth of the operations per scenario (a smoke run)",
                                 g_quick, register_all);
}
