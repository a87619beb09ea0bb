// The bare-kernel lower bounds of ../shared/BENCHMARKS.md: what the same work costs with plain
// system calls and no procpool at all, so that procpool's figures can be read as a fraction of
// what the machine allows. Measured in the same run as procpool's (bench/compare.py).
//
//   build/bench/bench/kernel_bound_bench
//   build/bench/bench/kernel_bound_bench --quick    # a tenth of the items (smoke run)
//
// Counters carry the figures, from each benchmark's own clock around the work only:
// us_per_roundtrip, tasks_per_s, items_per_s, GB_per_s (10^9 bytes/s), ms, speedup; `n` is the
// item count of one iteration.
//
// Round trips between two processes depend on where the scheduler puts them: a wake-up on
// another CPU costs much more than one on the same CPU. `pinned` puts the parent and the child
// on two different CPUs (sched_setaffinity), `same_cpu` both on one, `unpinned` lets the
// scheduler choose. The latency bound procpool is held to is the pinned one.

#include <benchmark/benchmark.h>

#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "support/bench_main.hpp"
#include "support/burn.hpp"

namespace {

using bench_support::burn;
using bench_support::burn_steps;
using bench_support::seconds_since;

using Clock = std::chrono::steady_clock;

bool g_quick = false;

std::int64_t scaled(std::int64_t n) { return g_quick ? std::max<std::int64_t>(1, n / 10) : n; }

[[noreturn]] void die(const char* what) {
  throw std::system_error(errno, std::generic_category(), what);
}

// ---------------------------------------------------------------------------------------------
// Plain helpers: whole reads and writes, children, CPUs.

void write_all(int fd, const void* p, std::size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t k = ::write(fd, c, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      die("write");
    }
    c += k;
    n -= static_cast<std::size_t>(k);
  }
}

// Reads exactly n bytes; false at end of stream before the first byte.
bool read_all(int fd, void* p, std::size_t n) {
  auto* c = static_cast<char*>(p);
  std::size_t got = 0;
  while (got < n) {
    ssize_t k = ::read(fd, c + got, n - got);
    if (k < 0) {
      if (errno == EINTR) continue;
      die("read");
    }
    if (k == 0) {
      if (got == 0) return false;
      die("read: end of stream inside a message");
    }
    got += static_cast<std::size_t>(k);
  }
  return true;
}

std::pair<int, int> socket_pair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
  return {sv[0], sv[1]};
}

// Forks a child that runs body() and _exits; the parent gets its pid.
template <class Body>
pid_t fork_child(Body&& body) {
  std::fflush(nullptr);  // nothing buffered is inherited (the child leaves with _exit anyway)
  pid_t pid = ::fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    int code = 0;
    try {
      body();
    } catch (...) {
      code = 1;
    }
    ::_exit(code);
  }
  return pid;
}

void reap(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
}

// The CPUs this process may run on.
std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) != 0) die("sched_getaffinity");
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

void pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (::sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity");
}

// Restores the process's CPU mask when a benchmark that pinned it ends.
class AffinityGuard {
 public:
  AffinityGuard() {
    CPU_ZERO(&saved_);
    if (::sched_getaffinity(0, sizeof saved_, &saved_) != 0) die("sched_getaffinity");
  }
  ~AffinityGuard() { (void)::sched_setaffinity(0, sizeof saved_, &saved_); }
  AffinityGuard(const AffinityGuard&) = delete;
  AffinityGuard& operator=(const AffinityGuard&) = delete;

 private:
  cpu_set_t saved_;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A MAP_SHARED anonymous mapping: the memory parent and children share after fork.
template <class T>
T* shared_array(std::size_t n) {
  void* p =
      ::mmap(nullptr, n * sizeof(T), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) die("mmap");
  return static_cast<T*>(p);
}
template <class T>
void unmap(T* p, std::size_t n) {
  ::munmap(p, n * sizeof(T));
}

void set_rate(benchmark::State& state, const char* name, double per_iteration, double secs) {
  double items = per_iteration * static_cast<double>(state.iterations());
  state.counters[name] = benchmark::Counter(secs > 0 ? items / secs : 0);
  state.counters["n"] = benchmark::Counter(per_iteration);
}

// ---------------------------------------------------------------------------------------------
// socketpair ping-pong: the parent writes an 8-byte int, the child writes it back.

enum class Placement { pinned, same_cpu, unpinned };

void socket_pingpong(benchmark::State& state, Placement where, std::int64_t n) {
  std::vector<int> cpus = allowed_cpus();
  if (where == Placement::pinned && cpus.size() < 2) {
    state.SkipWithError("needs two CPUs");
    return;
  }
  AffinityGuard guard;
  int parent_cpu = cpus[0];
  int child_cpu = where == Placement::pinned ? cpus[1] : cpus[0];
  auto [mine, theirs] = socket_pair();
  pid_t child = fork_child([&, fd = theirs] {
    ::close(mine);
    if (where != Placement::unpinned) pin_to(child_cpu);
    std::int64_t x;
    while (read_all(fd, &x, sizeof x)) write_all(fd, &x, sizeof x);
  });
  ::close(theirs);
  if (where != Placement::unpinned) pin_to(parent_cpu);
  std::int64_t x = 0;
  write_all(mine, &x, sizeof x);  // the child runs before the clock starts
  read_all(mine, &x, sizeof x);
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    for (std::int64_t i = 1; i <= n; ++i) {
      write_all(mine, &i, sizeof i);
      read_all(mine, &x, sizeof x);
    }
    secs += seconds_since(t0);
    if (x != n) state.SkipWithError("the child sent back something else");
  }
  ::close(mine);  // end of stream: the child leaves
  reap(child);
  state.counters["us_per_roundtrip"] =
      benchmark::Counter(secs * 1e6 / static_cast<double>(n * state.iterations()));
  state.counters["n"] = benchmark::Counter(static_cast<double>(n));
}

// Shared-memory ping-pong, both spinning, pinned to two CPUs: the floor under any round trip.
void shm_spin_pingpong(benchmark::State& state, std::int64_t n) {
  std::vector<int> cpus = allowed_cpus();
  if (cpus.size() < 2) {
    state.SkipWithError("needs two CPUs");
    return;
  }
  AffinityGuard guard;
  struct alignas(64) Line {
    std::atomic<std::int64_t> v{0};
  };
  Line* lines = shared_array<Line>(2);
  new (&lines[0]) Line();
  new (&lines[1]) Line();
  std::atomic<std::int64_t>& ping = lines[0].v;
  std::atomic<std::int64_t>& pong = lines[1].v;
  pid_t child = fork_child([&] {
    pin_to(cpus[1]);
    std::int64_t last = 0;
    for (;;) {
      std::int64_t v;
      while ((v = ping.load(std::memory_order_acquire)) == last) cpu_relax();
      if (v < 0) return;
      pong.store(v, std::memory_order_release);
      last = v;
    }
  });
  pin_to(cpus[0]);
  std::int64_t next = 0;
  auto round_trip = [&] {
    ++next;
    ping.store(next, std::memory_order_release);
    while (pong.load(std::memory_order_acquire) != next) cpu_relax();
  };
  round_trip();
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    for (std::int64_t i = 0; i < n; ++i) round_trip();
    secs += seconds_since(t0);
  }
  ping.store(-1, std::memory_order_release);
  reap(child);
  unmap(lines, 2);
  state.counters["us_per_roundtrip"] =
      benchmark::Counter(secs * 1e6 / static_cast<double>(n * state.iterations()));
  state.counters["n"] = benchmark::Counter(static_cast<double>(n));
}

// ---------------------------------------------------------------------------------------------
// "chunk 1" task throughput: the parent writes each 8-byte task with its own write(), keeping
// at most `window` in flight; one child reads whatever has arrived, squares each, and writes
// the results of that read back with one write(). The floor under apply_async / map chunk 1.

void chunk1_tasks(benchmark::State& state, std::int64_t n, std::int64_t window) {
  auto [mine, theirs] = socket_pair();
  pid_t child = fork_child([&, fd = theirs] {
    ::close(mine);
    std::vector<char> in(64 * 1024);
    std::vector<std::int64_t> out(in.size() / 8);
    std::size_t have = 0;
    for (;;) {
      ssize_t k = ::read(fd, in.data() + have, in.size() - have);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) return;
      have += static_cast<std::size_t>(k);
      std::size_t whole = have / 8;
      for (std::size_t i = 0; i < whole; ++i) {
        std::int64_t x;
        std::memcpy(&x, in.data() + i * 8, 8);
        out[i] = x * x;
      }
      write_all(fd, out.data(), whole * 8);
      std::memmove(in.data(), in.data() + whole * 8, have - whole * 8);
      have -= whole * 8;
    }
  });
  ::close(theirs);
  std::vector<char> buf(64 * 1024);
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::int64_t sent = 0, received = 0, sum = 0;
    std::size_t have = 0;
    while (received < n) {
      while (sent < n && sent - received < window) {
        write_all(mine, &sent, sizeof sent);
        ++sent;
      }
      ssize_t k = ::read(mine, buf.data() + have, buf.size() - have);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) die("read");
      have += static_cast<std::size_t>(k);
      std::size_t whole = have / 8;
      for (std::size_t i = 0; i < whole; ++i) {
        std::int64_t r;
        std::memcpy(&r, buf.data() + i * 8, 8);
        sum += r;
      }
      received += static_cast<std::int64_t>(whole);
      std::memmove(buf.data(), buf.data() + whole * 8, have - whole * 8);
      have -= whole * 8;
    }
    secs += seconds_since(t0);
    benchmark::DoNotOptimize(sum);
  }
  ::close(mine);
  reap(child);
  set_rate(state, "tasks_per_s", static_cast<double>(n), secs);
  state.counters["window"] = benchmark::Counter(static_cast<double>(window));
}

// ---------------------------------------------------------------------------------------------
// A map of square over n int64s that are already in shared memory, into shared memory.

void square_range(const std::int64_t* in, std::int64_t* out, std::size_t from, std::size_t to) {
  for (std::size_t i = from; i < to; ++i) out[i] = in[i] * in[i];
}

// Two processes that live across iterations (forked before the clock starts): a byte on a
// pipe tells each to square its half, a byte back says it is done.
void processes_map(benchmark::State& state, std::size_t n) {
  auto* in = shared_array<std::int64_t>(n);
  auto* out = shared_array<std::int64_t>(n);
  for (std::size_t i = 0; i < n; ++i) in[i] = static_cast<std::int64_t>(i);
  struct Child {
    pid_t pid;
    int fd;
  };
  std::vector<Child> children;
  for (std::size_t k = 0; k < 2; ++k) {
    auto [mine, theirs] = socket_pair();
    std::size_t from = k * n / 2, to = (k + 1) * n / 2;
    pid_t pid = fork_child([&, fd = theirs, from, to] {
      ::close(mine);
      for (const Child& c : children) ::close(c.fd);
      char go;
      while (read_all(fd, &go, 1)) {
        square_range(in, out, from, to);
        write_all(fd, &go, 1);
      }
    });
    ::close(theirs);
    children.push_back({pid, mine});
  }
  auto run = [&] {
    char go = 1;
    for (const Child& c : children) write_all(c.fd, &go, 1);
    for (const Child& c : children) read_all(c.fd, &go, 1);
  };
  run();  // the children run and the output pages exist before the clock starts
  double secs = 0;
  for (auto _ : state) {
    out[n - 1] = 0;
    auto t0 = Clock::now();
    run();
    secs += seconds_since(t0);
    if (out[n - 1] != in[n - 1] * in[n - 1]) state.SkipWithError("wrong result");
  }
  for (const Child& c : children) {
    ::close(c.fd);
    reap(c.pid);
  }
  unmap(in, n);
  unmap(out, n);
  set_rate(state, "items_per_s", static_cast<double>(n), secs);
}

// The same with a fork (and a wait) of the two children per map.
void processes_map_fork(benchmark::State& state, std::size_t n) {
  auto* in = shared_array<std::int64_t>(n);
  auto* out = shared_array<std::int64_t>(n);
  for (std::size_t i = 0; i < n; ++i) in[i] = static_cast<std::int64_t>(i);
  square_range(in, out, 0, n);  // the output pages exist before the clock starts
  double secs = 0;
  for (auto _ : state) {
    out[n - 1] = 0;
    auto t0 = Clock::now();
    pid_t a = fork_child([&] { square_range(in, out, 0, n / 2); });
    pid_t b = fork_child([&] { square_range(in, out, n / 2, n); });
    reap(a);
    reap(b);
    secs += seconds_since(t0);
    if (out[n - 1] != in[n - 1] * in[n - 1]) state.SkipWithError("wrong result");
  }
  unmap(in, n);
  unmap(out, n);
  set_rate(state, "items_per_s", static_cast<double>(n), secs);
}

// Two threads (started per map) doing the same in one address space.
void threads_map(benchmark::State& state, std::size_t n) {
  std::vector<std::int64_t> in(n), out(n);
  for (std::size_t i = 0; i < n; ++i) in[i] = static_cast<std::int64_t>(i);
  square_range(in.data(), out.data(), 0, n);
  double secs = 0;
  for (auto _ : state) {
    out[n - 1] = 0;
    auto t0 = Clock::now();
    std::thread a([&] { square_range(in.data(), out.data(), 0, n / 2); });
    std::thread b([&] { square_range(in.data(), out.data(), n / 2, n); });
    a.join();
    b.join();
    secs += seconds_since(t0);
    if (out[n - 1] != in[n - 1] * in[n - 1]) state.SkipWithError("wrong result");
  }
  set_rate(state, "items_per_s", static_cast<double>(n), secs);
}

// ---------------------------------------------------------------------------------------------
// Bandwidth: memcpy of a buffer, and the same buffer through a socketpair to another process.

void memcpy_bandwidth(benchmark::State& state, std::size_t size) {
  std::vector<char> src(size, 1), dst(size, 0);
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::memcpy(dst.data(), src.data(), size);
    benchmark::ClobberMemory();
    secs += seconds_since(t0);
  }
  benchmark::DoNotOptimize(dst.data());
  double bytes = static_cast<double>(size) * static_cast<double>(state.iterations());
  state.counters["GB_per_s"] = benchmark::Counter(secs > 0 ? bytes / secs / 1e9 : 0);
  state.counters["payload_bytes"] = benchmark::Counter(static_cast<double>(size));
}

// The parent writes `size` bytes; the child reads all of them into its buffer, then answers
// with one byte. Default socket buffer sizes.
void socket_bandwidth(benchmark::State& state, std::size_t size) {
  std::vector<char> src(size, 1);
  auto [mine, theirs] = socket_pair();
  pid_t child = fork_child([&, fd = theirs] {
    ::close(mine);
    std::vector<char> dst(size);
    while (read_all(fd, dst.data(), size)) {
      char ok = dst[size - 1];
      write_all(fd, &ok, 1);
    }
  });
  ::close(theirs);
  char ok;
  write_all(mine, src.data(), size);  // the child's buffer exists before the clock starts
  read_all(mine, &ok, 1);
  double secs = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    write_all(mine, src.data(), size);
    read_all(mine, &ok, 1);
    secs += seconds_since(t0);
  }
  ::close(mine);
  reap(child);
  double bytes = static_cast<double>(size) * static_cast<double>(state.iterations());
  state.counters["GB_per_s"] = benchmark::Counter(secs > 0 ? bytes / secs / 1e9 : 0);
  state.counters["payload_bytes"] = benchmark::Counter(static_cast<double>(size));
}

// ---------------------------------------------------------------------------------------------
// fork + _exit + waitpid.

void fork_wait(benchmark::State& state) {
  std::vector<double> ms;
  for (auto _ : state) {
    auto t0 = Clock::now();
    pid_t pid = fork_child([] {});
    reap(pid);
    ms.push_back(seconds_since(t0) * 1e3);
  }
  std::sort(ms.begin(), ms.end());
  state.counters["ms"] = benchmark::Counter(ms.empty() ? 0 : ms[ms.size() / 2]);
  state.counters["ms_min"] = benchmark::Counter(ms.empty() ? 0 : ms.front());
}

// ---------------------------------------------------------------------------------------------
// cpu_bound_speedup: `tasks` × burn serially, then split between two forked children.

void cpu_bound_speedup(benchmark::State& state, int tasks, double target) {
  const std::uint64_t steps = burn_steps(target);
  auto* results = shared_array<std::uint64_t>(static_cast<std::size_t>(tasks));
  double serial = 0, parallel = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::uint64_t a = 0;
    for (int i = 0; i < tasks; ++i) a ^= burn(steps);
    serial += seconds_since(t0);
    t0 = Clock::now();
    pid_t p = fork_child([&] {
      for (int i = 0; i < tasks / 2; ++i) results[i] = burn(steps);
    });
    pid_t q = fork_child([&] {
      for (int i = tasks / 2; i < tasks; ++i) results[i] = burn(steps);
    });
    reap(p);
    reap(q);
    parallel += seconds_since(t0);
    std::uint64_t b = 0;
    for (int i = 0; i < tasks; ++i) b ^= results[i];
    if (a != b) state.SkipWithError("the children computed something else");
  }
  unmap(results, static_cast<std::size_t>(tasks));
  auto iters = static_cast<double>(state.iterations());
  state.counters["speedup"] = benchmark::Counter(parallel > 0 ? serial / parallel : 0);
  state.counters["serial_s"] = benchmark::Counter(serial / iters);
  state.counters["pool_s"] = benchmark::Counter(parallel / iters);
  state.counters["n"] = benchmark::Counter(tasks);
}

void register_all() {
  using benchmark::RegisterBenchmark;
  auto reg = [](const std::string& name, auto fn) {
    return RegisterBenchmark(name.c_str(), fn)->UseRealTime()->Unit(benchmark::kMillisecond);
  };
  // Before anything else: fork cost grows with the parent's memory.
  reg("kernel/fork_wait", [](benchmark::State& s) { fork_wait(s); })->Iterations(g_quick ? 5 : 20);
  reg("kernel/socket_pingpong/pinned",
      [](benchmark::State& s) { socket_pingpong(s, Placement::pinned, scaled(20'000)); });
  reg("kernel/socket_pingpong/same_cpu",
      [](benchmark::State& s) { socket_pingpong(s, Placement::same_cpu, scaled(20'000)); });
  reg("kernel/socket_pingpong/unpinned",
      [](benchmark::State& s) { socket_pingpong(s, Placement::unpinned, scaled(20'000)); });
  reg("kernel/shm_spin_pingpong/pinned",
      [](benchmark::State& s) { shm_spin_pingpong(s, scaled(100'000)); });
  reg("kernel/chunk1_tasks", [](benchmark::State& s) { chunk1_tasks(s, scaled(100'000), 256); });
  reg("kernel/processes_map",
      [](benchmark::State& s) { processes_map(s, static_cast<std::size_t>(scaled(1'000'000))); });
  reg("kernel/processes_map_fork", [](benchmark::State& s) {
    processes_map_fork(s, static_cast<std::size_t>(scaled(1'000'000)));
  });
  reg("kernel/threads_map",
      [](benchmark::State& s) { threads_map(s, static_cast<std::size_t>(scaled(1'000'000))); });
  reg("kernel/memcpy_bandwidth",
      [](benchmark::State& s) { memcpy_bandwidth(s, std::size_t{16} << 20); });
  reg("kernel/socket_bandwidth",
      [](benchmark::State& s) { socket_bandwidth(s, std::size_t{16} << 20); });
  reg("kernel/cpu_bound_speedup", [](benchmark::State& s) {
    cpu_bound_speedup(s, 16, g_quick ? 0.02 : 0.1);
  })->Iterations(1);
}

}  // namespace

int main(int argc, char** argv) {
  return bench_support::run_main(argc, argv,
                                 "kernel_bound_bench: bare-syscall lower bounds (BENCHMARKS.md).\n"
                                 "  --quick  a tenth of the items per benchmark (a smoke run)",
                                 g_quick, register_all);
}
