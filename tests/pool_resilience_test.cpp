#include <procpool/pool.hpp>

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <ranges>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#include "support/children.hpp"

using test_support::no_child_processes;

// The resilience tests of Pool (issue 4): workers that die, hang, are cancelled or cannot start;
// a program that dies; signals; descriptors and children; and a fault-injection soak.
//
// Everything here uses real processes and real signals. Tests and tasks synchronize through
// pipes made before the pool (workers are forks, so they inherit them): a task that must be
// running before the test acts writes its pid to a `started` pipe, and a task the test wants to
// hold blocks reading one byte from a `gate` pipe. Nothing sleeps to order events; timeouts are
// watchdogs that turn a hang into a failure, and the few durations below (tasks that run for
// 200 ms, a task_timeout) are the behaviour under test. Every test ends with no child process
// left, running or zombie.
//
// What a worker death costs a chunked map, precisely (docs/ARCHITECTURE.md, "When a worker
// dies"): the item that was running fails; items of its chunk whose results had been sent are
// kept; items that ran but whose results had not been sent yet (at most about 1 ms or 64 KiB
// of them) run once more on another worker; items after it run on another worker.

namespace pool_resilience_test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// How long a test waits for something that must happen before it calls it a hang.
constexpr auto watchdog = 20s;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool under_sanitizer = true;
#else
constexpr bool under_sanitizer = false;
#endif

// ----------------------------------------------------------------------------------------------
// Used inside tasks and initializers (in a worker process): async-signal-safe, allocation-free.

inline void write_all(int fd, const void* data, std::size_t n) noexcept {
  // A write of at most PIPE_BUF bytes to a pipe is atomic: concurrent writers never interleave.
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::write(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return;
    p += k;
    n -= static_cast<std::size_t>(k);
  }
}

inline void write_int(int fd, int value) noexcept { write_all(fd, &value, sizeof value); }

// Two ints in one atomic write: (index, pid), (pid, parent pid), ...
struct IntPair {
  int first;
  int second;
};
inline void write_pair(int fd, int first, int second) noexcept {
  IntPair p{first, second};
  write_all(fd, &p, sizeof p);
}

// Blocks until one byte can be taken from the pipe `fd`.
inline void wait_byte(int fd) noexcept {
  char c;
  while (::read(fd, &c, 1) < 0 && errno == EINTR) {
  }
}

// Waits `ms` milliseconds on a pipe nobody writes to: a task or a decode that takes that long.
inline void take_time(int quiet_fd, int ms) noexcept {
  const auto until = Clock::now() + std::chrono::milliseconds(ms);
  for (auto now = Clock::now(); now < until; now = Clock::now()) {
    pollfd p{quiet_fd, POLLIN, 0};
    auto left = std::chrono::ceil<std::chrono::milliseconds>(until - now).count();
    (void)::poll(&p, 1, static_cast<int>(left));
  }
}

// A worker about to die of a signal leaves no core file (whatever core_pattern says).
inline void no_core_dump() noexcept {
  rlimit none{0, 0};
  (void)::setrlimit(RLIMIT_CORE, &none);
  (void)::prctl(PR_SET_DUMPABLE, 0);
}

// Workers inherit the test program's signal handlers (Catch2 installs some for SIGSEGV,
// SIGABRT, SIGTERM, ...). A task that wants to die of `sig` puts back the default action first.
inline void default_action(int sig) noexcept {
  struct sigaction sa {};
  sa.sa_handler = SIG_DFL;
  sigemptyset(&sa.sa_mask);
  (void)::sigaction(sig, &sa, nullptr);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  (void)::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

// A 64-bit mix (splitmix64's finalizer): a deterministic "random" choice of item.
constexpr std::uint64_t mix(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// ----------------------------------------------------------------------------------------------
// Used by the tests.

// A pipe whose descriptors are plain ints, so that tasks capture them by value.
class TestPipe {
 public:
  explicit TestPipe(int flags = 0) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC | flags) != 0) {
      throw std::system_error(errno, std::generic_category(), "pipe2");
    }
    r_ = fds[0];
    w_ = fds[1];
  }
  ~TestPipe() {
    ::close(r_);
    ::close(w_);
  }
  TestPipe(const TestPipe&) = delete;
  TestPipe& operator=(const TestPipe&) = delete;

  int rfd() const noexcept { return r_; }
  int wfd() const noexcept { return w_; }

  void send(int value) const noexcept { write_int(w_, value); }

  bool has_data() const {
    pollfd p{r_, POLLIN, 0};
    return ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
  }

  // The next T written to the pipe. @throws std::runtime_error if none comes within the
  // watchdog time (a hang becomes a failure).
  template <class T = int>
  T recv() const {
    T value{};
    auto* p = reinterpret_cast<char*>(&value);
    std::size_t got = 0;
    const auto deadline = Clock::now() + watchdog;
    while (got < sizeof value) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0)
        throw std::runtime_error("watchdog: nothing arrived on a pipe in time");
      pollfd pf{r_, POLLIN, 0};
      int ready = ::poll(&pf, 1, static_cast<int>(left.count()));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) continue;
      ssize_t n = ::read(r_, p + got, sizeof value - got);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) throw std::runtime_error("a test pipe was closed");
      got += static_cast<std::size_t>(n);
    }
    return value;
  }

  // Everything written so far, without waiting.
  template <class T = int>
  std::vector<T> drain() const {
    std::vector<T> values;
    while (has_data()) values.push_back(recv<T>());
    return values;
  }

  // Lets `n` tasks blocked in wait_byte() on this pipe go on.
  void release(std::size_t n = 1) const {
    std::string bytes(n, 'g');
    std::size_t done = 0;
    while (done < bytes.size()) {
      ssize_t k = ::write(w_, bytes.data() + done, bytes.size() - done);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) throw std::system_error(errno, std::generic_category(), "write");
      done += static_cast<std::size_t>(k);
    }
  }

 private:
  int r_ = -1;
  int w_ = -1;
};

// Declared after a pool: on the way out of a test, also a failing one, lets every task still
// blocked on the gates go on, so that the pool's destructor (close + join) cannot wait forever.
class ReleaseOnExit {
 public:
  template <class... Pipes>
  explicit ReleaseOnExit(const Pipes&... gates) : gates_{&gates...} {}
  ~ReleaseOnExit() {
    for (const TestPipe* g : gates_) {
      try {
        g->release(256);
      } catch (...) {
      }
    }
  }
  ReleaseOnExit(const ReleaseOnExit&) = delete;
  ReleaseOnExit& operator=(const ReleaseOnExit&) = delete;

 private:
  std::vector<const TestPipe*> gates_;
};

// A counter in memory shared with every process forked after it was made.
class SharedCounter {
 public:
  SharedCounter() {
    void* p = ::mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    value_ = ::new (p) std::atomic<int>(0);
  }
  ~SharedCounter() { ::munmap(value_, sizeof(std::atomic<int>)); }
  SharedCounter(const SharedCounter&) = delete;
  SharedCounter& operator=(const SharedCounter&) = delete;
  std::atomic<int>* get() const noexcept { return value_; }
  int load() const noexcept { return value_->load(); }

 private:
  std::atomic<int>* value_ = nullptr;
};


// The text of a /proc file, or "" if it cannot be read. Not an ifstream: a process that exits
// while its file is read makes read() fail with ESRCH, which libstdc++'s filebuf throws.
std::string read_proc_file(const std::string& path) {
  std::string text;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return text;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return text;
}

// The pids listed in a /proc/<pid>/task/<tid>/children file.
std::set<pid_t> children_in(const std::string& path) {
  std::set<pid_t> pids;
  std::istringstream in(read_proc_file(path));
  pid_t pid;
  while (in >> pid) pids.insert(pid);
  return pids;
}

// The children of every thread of this process, zombies included.
std::set<pid_t> child_pids() {
  std::set<pid_t> pids;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    pids.merge(children_in(task.path() / "children"));
  }
  return pids;
}

std::size_t open_fd_count() {
  std::size_t n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)entry;
    ++n;
  }
  return n;
}

// True when no process with this pid exists any more, not even as a zombie.
bool process_is_gone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

// Waits (at most the watchdog time) until process `pid`, which need not be our child, has
// exited.
bool wait_until_exited(pid_t pid) {
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return errno == ESRCH;
  pollfd p{fd, POLLIN, 0};
  int r;
  do {
    r = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(watchdog).count()));
  } while (r < 0 && errno == EINTR);
  ::close(fd);
  return r > 0;
}

// Watches processes that need not be our children, through pidfds opened before anything
// happens to them (so a reused pid can never be mistaken for one of them).
class ExitWatch {
 public:
  explicit ExitWatch(const std::vector<pid_t>& pids) {
    for (pid_t pid : pids) {
      int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
      if (fd < 0) throw std::system_error(errno, std::generic_category(), "pidfd_open");
      fds_.push_back(fd);
    }
  }
  ~ExitWatch() {
    for (int fd : fds_) ::close(fd);
  }
  ExitWatch(const ExitWatch&) = delete;
  ExitWatch& operator=(const ExitWatch&) = delete;

  // Waits until every watched process has exited (a zombie has), at most `limit`. Returns
  // whether they all have.
  bool wait_all(std::chrono::milliseconds limit) const {
    const auto deadline = Clock::now() + limit;
    for (int fd : fds_) {
      for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        pollfd p{fd, POLLIN, 0};
        int r = ::poll(&p, 1, static_cast<int>(std::max<long long>(left.count(), 0)));
        if (r > 0) break;
        if (r == 0) return false;
        if (errno != EINTR) return false;
      }
    }
    return true;
  }

 private:
  std::vector<int> fds_;
};

// Makes this process the reaper of its orphaned descendants for the scope (so that a fork
// server or worker whose parent died is reparented here and can be reaped, leaving no zombie).
class SubreaperScope {
 public:
  SubreaperScope() {
    int was = 0;
    ::prctl(PR_GET_CHILD_SUBREAPER, &was);
    was_ = was;
    if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
      throw std::system_error(errno, std::generic_category(), "prctl(PR_SET_CHILD_SUBREAPER)");
    }
  }
  ~SubreaperScope() { ::prctl(PR_SET_CHILD_SUBREAPER, was_); }
  SubreaperScope(const SubreaperScope&) = delete;
  SubreaperScope& operator=(const SubreaperScope&) = delete;

 private:
  int was_ = 0;
};

// Reaps `pid` if it is a child of ours that has exited; true if it is gone now.
bool reap_if_ours(pid_t pid) {
  int status;
  (void)::waitpid(pid, &status, WNOHANG);
  return process_is_gone(pid);
}

// Kills and reaps a forked child on the way out of a test, also a failing one, unless it was
// reaped already (then `reaped()` was called).
class ChildGuard {
 public:
  explicit ChildGuard(pid_t pid) : pid_(pid) {}
  ~ChildGuard() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  void reaped() noexcept { pid_ = -1; }

 private:
  pid_t pid_;
};

// Runs `call` and returns the exception of type E it threw, or nullopt if it threw nothing.
// Any other exception propagates (and fails the test with its message).
template <class E, class F>
std::optional<E> error_of(F&& call) {
  try {
    call();
  } catch (const E& e) {
    return e;
  }
  return std::nullopt;
}

// Runs pool.size() tasks that are all running at once (each reports its pid, then waits for the
// gate), and returns their distinct pids: pool.size() of them when the pool has that many
// working workers.
std::set<int> pids_of_simultaneous_tasks(procpool::Pool& pool, const TestPipe& started,
                                         const TestPipe& gate) {
  std::vector<procpool::AsyncResult<int>> results;
  for (std::size_t i = 0; i < pool.size(); ++i) {
    results.push_back(pool.apply_async(
        [s = started.wfd(), g = gate.rfd()](int) {
          int pid = static_cast<int>(::getpid());
          write_int(s, pid);
          wait_byte(g);
          return pid;
        },
        0));
  }
  std::set<int> pids;
  for (std::size_t i = 0; i < pool.size(); ++i) pids.insert(started.recv());
  gate.release(pool.size());
  for (auto& r : results) CHECK(pids.count(r.get()) == 1);
  return pids;
}

// The pid of the worker that runs the next task.
int worker_pid(procpool::Pool& pool) {
  return pool.apply([] { return static_cast<int>(::getpid()); });
}

std::vector<int> iota_vector(int from, int to) {
  std::vector<int> v;
  for (int i = from; i < to; ++i) v.push_back(i);
  return v;
}

// ----------------------------------------------------------------------------------------------
// Ways for a worker to die.

enum class Death {
  raise_sigkill,
  segfault,
  abort,
  exit_7,
  killed_from_outside,
  terminated_from_outside
};

struct DeathCase {
  Death how;
  const char* name;
  std::optional<int> signal;
  std::optional<int> exit_status;
  std::string described;  // as WorkerLostError's message puts it
};

const std::vector<DeathCase> death_cases = {
    {Death::raise_sigkill, "raise(SIGKILL)", SIGKILL, std::nullopt, "killed by signal 9 (SIGKILL)"},
    {Death::segfault, "a segmentation fault", SIGSEGV, std::nullopt,
     "killed by signal 11 (SIGSEGV)"},
    {Death::abort, "std::abort()", SIGABRT, std::nullopt, "killed by signal 6 (SIGABRT)"},
    {Death::exit_7, "_exit(7)", std::nullopt, 7, "exited with status 7"},
    {Death::killed_from_outside, "SIGKILL from outside (as the OOM killer)", SIGKILL, std::nullopt,
     "killed by signal 9 (SIGKILL)"},
    {Death::terminated_from_outside, "SIGTERM from outside", SIGTERM, std::nullopt,
     "killed by signal 15 (SIGTERM)"},
};

// A task that reports its pid on `started`, then dies as `how` says (the two "from outside"
// kinds block on `gate` until the test kills them). `forbidden` is a page mapped PROT_NONE.
struct DyingTask {
  Death how;
  int started;
  int gate;
  volatile int* forbidden;

  int operator()(int) const {
    no_core_dump();
    switch (how) {
      case Death::raise_sigkill:
        write_int(started, static_cast<int>(::getpid()));
        ::raise(SIGKILL);
        break;
      case Death::segfault:
        default_action(SIGSEGV);
        write_int(started, static_cast<int>(::getpid()));
        // A real fault (the page is mapped PROT_NONE). With SIGSEGV back at its default
        // action, not even ASan's handler runs: the worker dies of the signal.
        *forbidden = 1;
        break;
      case Death::abort:
        default_action(SIGABRT);
        write_int(started, static_cast<int>(::getpid()));
        std::abort();
      case Death::exit_7:
        write_int(started, static_cast<int>(::getpid()));
        ::_exit(7);
      case Death::killed_from_outside:
      case Death::terminated_from_outside:
        default_action(SIGTERM);
        write_int(started, static_cast<int>(::getpid()));
        wait_byte(gate);
        break;
    }
    return -1;
  }
};

// A page that faults on any access, mapped before the pools (so workers have it too).
class ForbiddenPage {
 public:
  ForbiddenPage() {
    void* p = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    page_ = static_cast<volatile int*>(p);
  }
  ~ForbiddenPage() { ::munmap(const_cast<int*>(page_), 4096); }
  ForbiddenPage(const ForbiddenPage&) = delete;
  ForbiddenPage& operator=(const ForbiddenPage&) = delete;
  volatile int* get() const noexcept { return page_; }

 private:
  volatile int* page_ = nullptr;
};

// ----------------------------------------------------------------------------------------------
// Results that cannot be encoded.

// Its serialize member throws while the worker encodes a poisoned value.
struct Fragile {
  int value = 0;
  bool poisoned = false;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value, poisoned);
    if (poisoned) throw std::runtime_error("cannot encode");
  }
};

struct EncodingFailure : std::exception {
  const char* what() const noexcept override { return "no wire format for this value"; }
};

// As Fragile, but throws a type that is not one of the standard ones.
struct Strange {
  int value = 0;
  bool poisoned = false;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value, poisoned);
    if (poisoned) throw EncodingFailure();
  }
};

// ----------------------------------------------------------------------------------------------
// A callable whose decoding in the worker (its serialize member, run before the chunk's first
// item) can take time, or block: for what happens between a chunk's arrival and its first item.
struct SlowToDecode {
  int decode_ms = 0;  // decoding takes this long
  int ticket = -1;    // if a byte can be taken from this pipe (non-blocking), decoding then...
  int started = -1;   // ...reports the pid here...
  int gate = -1;      // ...and blocks on this pipe
  int quiet = -1;     // a pipe nobody writes to, for decode_ms
  template <class Archive>
  void serialize(Archive& ar) {
    ar(decode_ms, ticket, started, gate, quiet);
    if constexpr (std::is_same_v<Archive, procpool::detail::ReadArchive>) {
      if (decode_ms > 0) take_time(quiet, decode_ms);
      char c;
      if (ticket >= 0 && ::read(ticket, &c, 1) == 1) {
        write_int(started, static_cast<int>(::getpid()));
        wait_byte(gate);
      }
    }
  }
  int operator()(int x) const { return 10 * x; }
};

// ----------------------------------------------------------------------------------------------
// Signals in the parent.

std::atomic<int> sigint_seen{0};
std::atomic<int> sigterm_seen{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void count_signal(int sig) {
  if (sig == SIGINT) sigint_seen.fetch_add(1, std::memory_order_relaxed);
  if (sig == SIGTERM) sigterm_seen.fetch_add(1, std::memory_order_relaxed);
}

// Installs count_signal for SIGINT and SIGTERM, without SA_RESTART (so a blocking call that a
// signal interrupts fails with EINTR), and puts the old handlers back at the end.
class CountingHandlers {
 public:
  CountingHandlers() {
    struct sigaction sa {};
    sa.sa_handler = count_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~CountingHandlers() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  CountingHandlers(const CountingHandlers&) = delete;
  CountingHandlers& operator=(const CountingHandlers&) = delete;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

std::vector<pid_t> thread_ids() {
  std::vector<pid_t> tids;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    tids.push_back(static_cast<pid_t>(std::stol(task.path().filename().string())));
  }
  return tids;
}

// A thread that, `rounds` times, sends SIGINT and SIGTERM to every other thread of this process
// (the pool's I/O thread included) and SIGINT to `group` (the workers and the fork server, as
// Ctrl-C would), then releases `gate` by `release` bytes. Blocked calls of the test thread are
// thus interrupted again and again while they wait.
class SignalStorm {
 public:
  SignalStorm(std::vector<pid_t> group, const TestPipe& gate, std::size_t release, int rounds = 40)
      : thread_([this, group = std::move(group), &gate, release, rounds] {
          sigset_t set;
          sigemptyset(&set);
          sigaddset(&set, SIGINT);
          sigaddset(&set, SIGTERM);
          ::pthread_sigmask(SIG_BLOCK, &set, nullptr);  // the signals are for the others
          const pid_t self = static_cast<pid_t>(::syscall(SYS_gettid));
          for (int round = 0; round < rounds; ++round) {
            for (pid_t tid : thread_ids()) {
              if (tid == self) continue;
              ::syscall(SYS_tgkill, ::getpid(), tid, SIGINT);
              ::syscall(SYS_tgkill, ::getpid(), tid, SIGTERM);
            }
            for (pid_t pid : group) ::kill(pid, SIGINT);
            // Pacing, so that the signals spread over the wait (not an ordering of events).
            std::this_thread::sleep_for(1ms);
          }
          gate.release(release);
        }) {}
  ~SignalStorm() { join(); }
  SignalStorm(const SignalStorm&) = delete;
  SignalStorm& operator=(const SignalStorm&) = delete;
  void join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::thread thread_;
};

}  // namespace pool_resilience_test

using namespace pool_resilience_test;

// ==============================================================================================
// A worker that dies while running a task

TEST_CASE(
    "pool resilience: a worker that dies of a signal, an abort, a segfault or _exit fails only its "
    "own task with WorkerLostError naming its pid and how it died",
    "[pool][resilience]") {
  ForbiddenPage page;
  for (const DeathCase& c : death_cases) {
    INFO("the worker dies of " << c.name);
    {
      TestPipe started, gate, started2, gate2;
      procpool::Pool pool(2);
      ReleaseOnExit unblock(gate, gate2);
      std::vector<procpool::AsyncResult<int>> before, after;
      for (int i = 0; i < 10; ++i)
        before.push_back(pool.apply_async([](int x) { return 2 * x; }, i));
      auto victim = pool.apply_async(DyingTask{c.how, started.wfd(), gate.rfd(), page.get()}, 0);
      for (int i = 0; i < 10; ++i)
        after.push_back(pool.apply_async([](int x) { return 3 * x; }, i));

      const pid_t pid = started.recv();
      if (c.how == Death::killed_from_outside) REQUIRE(::kill(pid, SIGKILL) == 0);
      if (c.how == Death::terminated_from_outside) REQUIRE(::kill(pid, SIGTERM) == 0);

      auto lost = error_of<procpool::WorkerLostError>([&] { (void)victim.get(); });
      REQUIRE(lost);
      CHECK(lost->pid() == pid);
      CHECK(lost->signal() == c.signal);
      CHECK(lost->exit_status() == c.exit_status);
      CHECK_THAT(lost->what(),
                 Catch::Contains("worker " + std::to_string(pid) + " died: " + c.described));
      CHECK_FALSE(victim.successful());

      // Every other task completes, also those that were queued behind the victim.
      for (int i = 0; i < 10; ++i) {
        CHECK(before[static_cast<std::size_t>(i)].get() == 2 * i);
        CHECK(after[static_cast<std::size_t>(i)].get() == 3 * i);
      }
      // A replacement runs: size() workers again, none of them the dead one.
      auto pids = pids_of_simultaneous_tasks(pool, started2, gate2);
      CHECK(pids.size() == pool.size());
      CHECK(pids.count(pid) == 0);
      CHECK(pool.map([](int x) { return x + 1; }, std::views::iota(0, 100)) == iota_vector(1, 101));
      CHECK(wait_until_exited(pid));
    }
    CHECK(no_child_processes());
  }
}

TEST_CASE(
    "pool resilience: workers that die one after another are each replaced and the pool stays "
    "usable",
    "[pool][resilience]") {
  {
    TestPipe started, gate;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate);
    std::set<int> dead;
    for (int round = 0; round < 10; ++round) {
      auto victim = pool.apply_async(
          [s = started.wfd()](int) {
            no_core_dump();
            write_int(s, static_cast<int>(::getpid()));
            ::raise(SIGKILL);
            return 0;
          },
          round);
      const int pid = started.recv();
      auto lost = error_of<procpool::WorkerLostError>([&] { (void)victim.get(); });
      REQUIRE(lost);
      CHECK(lost->pid() == pid);
      CHECK(dead.insert(pid).second);
      CHECK(pool.apply([](int x) { return x * x; }, round) == round * round);
    }
    auto pids = pids_of_simultaneous_tasks(pool, started, gate);
    CHECK(pids.size() == 2);
    for (int pid : pids) CHECK(dead.count(pid) == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool resilience: in a chunked map only the item that was running when its worker died fails, "
    "and every other item gives its result",
    "[pool][resilience]") {
  // Items 10..19 form one chunk. Item 14 reports its pid and blocks; the test kills its worker.
  constexpr int victim = 14;
  constexpr int n = 30;
  // With results of 70,000 bytes each result is sent the moment it is ready, so items 10..13
  // have been delivered before item 14 starts and must not run again. With small results the
  // worker had not sent them yet (it sends every ~1 ms or 64 KiB): they run once more elsewhere.
  const bool big_results = GENERATE(true, false);
  INFO((big_results ? "results of 70,000 bytes (sent at once)"
                    : "results of 8 bytes (sent in batches)"));
  {
    TestPipe started, gate, ran;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate);
    auto stream = pool.imap(
        [s = started.wfd(), g = gate.rfd(), r = ran.wfd(), big_results](int i) {
          write_int(r, i);
          if (i == victim) {
            write_int(s, static_cast<int>(::getpid()));
            wait_byte(g);  // never released: the test kills this worker
          }
          return std::pair<int, std::string>(3 * i, std::string(big_results ? 70000 : 8, 'x'));
        },
        std::views::iota(0, n), 10);
    // The first next() submits every chunk (the stream reads ahead) and returns item 0.
    auto first = stream.next();
    REQUIRE(first);
    CHECK(first->first == 0);
    const pid_t pid = started.recv();
    REQUIRE(::kill(pid, SIGKILL) == 0);

    std::map<int, std::pair<int, std::size_t>> values;
    std::optional<procpool::WorkerLostError> lost;
    int lost_at = -1;
    for (int i = 1; i < n; ++i) {
      try {
        auto v = stream.next();
        REQUIRE(v);
        values[i] = {v->first, v->second.size()};
      } catch (const procpool::WorkerLostError& e) {
        CHECK(lost_at == -1);
        lost = e;
        lost_at = i;
      }
    }
    CHECK_FALSE(stream.next());
    REQUIRE(lost);
    CHECK(lost_at == victim);
    CHECK(lost->pid() == pid);
    CHECK(lost->signal() == SIGKILL);
    for (int i = 1; i < n; ++i) {
      if (i == victim) continue;
      INFO("item " << i);
      REQUIRE(values.count(i) == 1);
      CHECK(values[i].first == 3 * i);
      CHECK(values[i].second == (big_results ? 70000u : 8u));
    }

    // How often each item ran.
    std::map<int, int> runs;
    for (int i : ran.drain()) ++runs[i];
    for (int i = 0; i < n; ++i) {
      INFO("item " << i << " ran " << runs[i] << " times");
      if (i >= 10 && i < victim && !big_results) {
        CHECK(runs[i] >= 1);
        CHECK(runs[i] <= 2);  // its result was lost with the worker: it ran again elsewhere
      } else {
        CHECK(runs[i] == 1);  // the victim is never retried; items after it ran only elsewhere
      }
    }
    CHECK(wait_until_exited(pid));
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool resilience: a worker that dies before the first item of a chunk starts fails that "
    "chunk's first item, not an item number left from its previous chunk",
    "[pool][resilience]") {
  // Regression: the worker published a new chunk's id while its slot still held the item index
  // (and start time) of its previous chunk, so a death while the chunk was being set up (its
  // callable decoded) blamed item 9 of the new chunk, an item that never ran.
  {
    TestPipe ticket(O_NONBLOCK), started, gate, quiet;
    procpool::Pool pool(1);
    ReleaseOnExit unblock(gate);
    // Leaves item 9 (of a chunk of 10) as the last item this worker ran.
    CHECK(pool.map([](int x) { return x; }, std::views::iota(0, 10), 10) == iota_vector(0, 10));

    ticket.release(1);  // the first decode of SlowToDecode takes it and blocks
    auto results = pool.imap(SlowToDecode{0, ticket.rfd(), started.wfd(), gate.rfd(), quiet.rfd()},
                             std::views::iota(0, 20), 20);
    // next() with no time to wait submits the chunk without waiting for its results.
    CHECK_THROWS_AS(results.next(0ms), procpool::TimeoutError);
    const pid_t pid = started.recv();
    REQUIRE(::kill(pid, SIGKILL) == 0);

    std::vector<int> failed;
    for (int i = 0; i < 20; ++i) {
      try {
        auto v = results.next();
        REQUIRE(v);
        CHECK(*v == 10 * i);
      } catch (const procpool::WorkerLostError& e) {
        CHECK(e.pid() == pid);
        failed.push_back(i);
      }
    }
    CHECK_FALSE(results.next());
    CHECK(failed == std::vector<int>{0});
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// task_timeout

TEST_CASE(
    "pool resilience: a task that runs past task_timeout fails with TaskTimeoutError, its worker "
    "is killed and replaced, and the pool keeps working",
    "[pool][resilience]") {
  {
    TestPipe started, gate, started2, gate2;
    procpool::Pool pool(procpool::PoolOptions{
        .processes = 2, .initializer = {}, .max_tasks_per_child = 0, .task_timeout = 300ms});
    ReleaseOnExit unblock(gate, gate2);
    auto hung = pool.apply_async(
        [s = started.wfd(), g = gate.rfd()](int) {
          write_int(s, static_cast<int>(::getpid()));
          wait_byte(g);  // never released
          return 1;
        },
        0);
    std::vector<procpool::AsyncResult<int>> others;
    for (int i = 0; i < 20; ++i) others.push_back(pool.apply_async([](int x) { return x + 7; }, i));
    const pid_t pid = started.recv();

    auto timed_out = error_of<procpool::TaskTimeoutError>([&] { (void)hung.get(watchdog); });
    REQUIRE(timed_out);
    CHECK_THAT(timed_out->what(), Catch::Contains("task_timeout (300 ms)"));
    CHECK_THAT(timed_out->what(), Catch::Contains("worker " + std::to_string(pid) + " was killed"));
    CHECK(wait_until_exited(pid));
    for (int i = 0; i < 20; ++i) CHECK(others[static_cast<std::size_t>(i)].get() == i + 7);

    auto pids = pids_of_simultaneous_tasks(pool, started2, gate2);
    CHECK(pids.size() == 2);
    CHECK(pids.count(pid) == 0);

    // Inside a chunk: only the hanging item fails, the others of its chunk still run.
    auto stream = pool.imap(
        [g = gate.rfd()](int i) {
          if (i == 5) wait_byte(g);  // the gate has no bytes: item 5 hangs
          return i * 2;
        },
        std::views::iota(0, 12), 4);
    for (int i = 0; i < 12; ++i) {
      INFO("item " << i);
      if (i == 5) {
        CHECK_THROWS_AS(stream.next(), procpool::TaskTimeoutError);
      } else {
        auto v = stream.next();
        REQUIRE(v);
        CHECK(*v == i * 2);
      }
    }
    CHECK_FALSE(stream.next());
    CHECK(pool.apply([](int x) { return x; }, 42) == 42);
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool resilience: the task_timeout clock starts when a task starts in its worker, not when it "
    "is submitted",
    "[pool][resilience]") {
  {
    TestPipe quiet;  // nobody writes to it: tasks wait on it to take their time
    procpool::Pool pool(procpool::PoolOptions{
        .processes = 1, .initializer = {}, .max_tasks_per_child = 0, .task_timeout = 500ms});
    const auto submitted = Clock::now();
    // One worker: each task waits in the queue for every task before it. The last ones wait
    // 4 × 200 ms, longer than task_timeout, yet each runs for less than that.
    std::vector<procpool::AsyncResult<int>> slow, quick;
    for (int i = 0; i < 4; ++i) {
      slow.push_back(pool.apply_async(
          [q = quiet.rfd()](int x) {
            take_time(q, 200);
            return x;
          },
          i));
    }
    for (int i = 0; i < 4; ++i) quick.push_back(pool.apply_async([](int x) { return -x; }, i));
    for (int i = 0; i < 4; ++i) CHECK(slow[static_cast<std::size_t>(i)].get() == i);
    for (int i = 0; i < 4; ++i) CHECK(quick[static_cast<std::size_t>(i)].get() == -i);
    CHECK(Clock::now() - submitted >= 800ms);  // they really did wait longer than the limit

    // Per item, not per chunk: a chunk of four 200 ms items runs 800 ms and nothing times out.
    auto per_item = pool.map(
        [q = quiet.rfd()](int x) {
          take_time(q, 200);
          return x;
        },
        std::views::iota(0, 4), 4);
    CHECK(per_item == iota_vector(0, 4));
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool resilience: the task_timeout clock of a chunk never starts at the start of an earlier "
    "task of the same worker",
    "[pool][resilience]") {
  // Regression: while a worker set up a new chunk (decoded its callable) its slot still held the
  // start time of its previous task, so a task that followed a long one was killed for the time
  // the earlier task had run.
  {
    TestPipe quiet;
    procpool::Pool pool(procpool::PoolOptions{
        .processes = 1, .initializer = {}, .max_tasks_per_child = 0, .task_timeout = 1000ms});
    // 600 ms of task, then a chunk whose callable takes 600 ms to decode: each well within the
    // limit, together past it.
    auto first = pool.apply_async(
        [q = quiet.rfd()](int x) {
          take_time(q, 600);
          return x;
        },
        1);
    auto second = pool.apply_async(SlowToDecode{600, -1, -1, -1, quiet.rfd()}, 2);
    CHECK(first.get() == 1);
    CHECK(second.get() == 20);
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// cancel() of a running task

TEST_CASE(
    "pool resilience: cancel of a running task kills and replaces its worker, fails the task with "
    "CancelledError, and the tasks queued behind it still run",
    "[pool][resilience]") {
  {
    TestPipe started, gate, errors;
    procpool::Pool pool(1);  // one worker: everything else is queued behind the running task
    ReleaseOnExit unblock(gate);
    auto running = pool.apply_async(
        [s = started.wfd(), g = gate.rfd()](int) {
          write_int(s, static_cast<int>(::getpid()));
          wait_byte(g);  // never released
          return 1;
        },
        0);
    running.on_error([&errors](std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const procpool::CancelledError&) {
        errors.send(1);
      } catch (...) {
        errors.send(0);
      }
    });
    std::vector<procpool::AsyncResult<int>> queued;
    for (int i = 0; i < 10; ++i) queued.push_back(pool.apply_async([](int x) { return x * 5; }, i));
    const pid_t pid = started.recv();

    CHECK(running.cancel());
    CHECK(running.ready());
    CHECK_FALSE(running.successful());
    CHECK_THROWS_AS(running.get(), procpool::CancelledError);
    CHECK_FALSE(running.cancel());
    CHECK(wait_until_exited(pid));
    for (int i = 0; i < 10; ++i) CHECK(queued[static_cast<std::size_t>(i)].get() == i * 5);
    const int replacement = worker_pid(pool);
    CHECK(replacement != pid);
    CHECK(errors.recv() == 1);       // on_error got the CancelledError
    CHECK_FALSE(errors.has_data());  // once

    // A map with a running chunk: cancel kills that worker too, and only the map fails.
    auto map = pool.map_async(
        [s = started.wfd(), g = gate.rfd()](int i) {
          if (i == 3) {
            write_int(s, static_cast<int>(::getpid()));
            wait_byte(g);
          }
          return i;
        },
        std::views::iota(0, 8), 4);
    const pid_t map_pid = started.recv();
    CHECK(map_pid == replacement);
    auto after = pool.apply_async([](int x) { return x - 1; }, 100);
    CHECK(map.cancel());
    CHECK_THROWS_AS(map.get(), procpool::CancelledError);
    CHECK(wait_until_exited(map_pid));
    CHECK(after.get() == 99);
    CHECK(worker_pid(pool) != map_pid);
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Start-up failures

TEST_CASE(
    "pool resilience: an initializer that always throws stops the pool after a bounded number of "
    "start-ups, pending results fail with WorkerStartError naming the cause, and submits throw "
    "PoolNotRunningError",
    "[pool][resilience]") {
  {
    TestPipe attempts, gate;
    std::optional<std::string> start_error, map_error;
    {
      // Each start-up waits for a byte on the gate, so that the tasks below are surely
      // submitted while the pool is still trying.
      procpool::Pool pool(procpool::PoolOptions{
          .processes = 2,
          .initializer =
              [a = attempts.wfd(), g = gate.rfd()] {
                write_int(a, static_cast<int>(::getpid()));
                wait_byte(g);
                throw std::runtime_error("boom");
              },
      });
      auto single = pool.apply_async([](int x) { return x; }, 1);
      auto mapped = pool.map_async([](int x) { return x; }, std::views::iota(0, 100));
      auto stream = pool.imap([](int x) { return x; }, std::views::iota(0, 10), 1);
      // next() with no time to wait submits the stream's first chunks (imap reads lazily).
      CHECK_THROWS_AS(stream.next(0ms), procpool::TimeoutError);
      gate.release(256);

      auto e1 = error_of<procpool::WorkerStartError>([&] { (void)single.get(watchdog); });
      REQUIRE(e1);
      start_error = e1->what();
      auto e2 = error_of<procpool::WorkerStartError>([&] { (void)mapped.get(watchdog); });
      REQUIRE(e2);
      map_error = e2->what();
      CHECK_THROWS_AS(stream.next(watchdog), procpool::WorkerStartError);
      // It is a procpool::Error like every other.
      CHECK_THROWS_AS(single.get(), procpool::Error);

      auto refused = error_of<procpool::PoolNotRunningError>(
          [&] { (void)pool.apply_async([](int x) { return x; }, 2); });
      REQUIRE(refused);
      CHECK_THAT(refused->what(),
                 Catch::Contains("the initializer threw std::runtime_error: boom"));
      CHECK_THROWS_AS(pool.map([](int x) { return x; }, std::views::iota(0, 3)),
                      procpool::PoolNotRunningError);
      CHECK_THROWS_AS(pool.imap([](int x) { return x; }, std::views::iota(0, 3)),
                      procpool::PoolNotRunningError);
    }  // the destructor (close + join) returns
    REQUIRE(start_error);
    CHECK_THAT(*start_error, Catch::Contains("the initializer threw std::runtime_error: boom"));
    CHECK_THAT(*start_error, Catch::Contains("5 times in a row"));
    CHECK(*map_error == *start_error);
    // Bounded: 5 failures, plus at most one start-up of the other slot under way at the time.
    const auto tries = attempts.drain();
    CHECK(tries.size() >= 5);
    CHECK(tries.size() <= 6);
    for (int pid : tries) CHECK(wait_until_exited(pid));
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool resilience: an initializer that crashes or exits stops the pool the same way, naming how "
    "the worker died",
    "[pool][resilience]") {
  struct Case {
    const char* name;
    int how;  // 0: raise(SIGSEGV), 1: _exit(5), 2: exit(9), 3: raise(SIGKILL)
    std::string cause;
  };
  const std::vector<Case> cases = {
      {"raise(SIGSEGV)", 0, "died: killed by signal 11 (SIGSEGV)"},
      {"_exit(5)", 1, "died: exited with status 5"},
      {"exit(9)", 2, "died: exited with status 9"},
      {"raise(SIGKILL)", 3, "died: killed by signal 9 (SIGKILL)"},
  };
  for (const Case& c : cases) {
    INFO("the initializer does " << c.name);
    TestPipe gate;
    SharedCounter attempts;
    {
      procpool::Pool pool(procpool::PoolOptions{
          .processes = 1,
          .initializer =
              [how = c.how, g = gate.rfd(), a = attempts.get()] {
                a->fetch_add(1);
                wait_byte(g);
                no_core_dump();
                switch (how) {
                  case 0:
                    default_action(SIGSEGV);
                    ::raise(SIGSEGV);
                    break;
                  case 1:
                    ::_exit(5);
                  case 2:
                    std::exit(9);
                  default:
                    ::raise(SIGKILL);
                }
              },
      });
      auto pending = pool.apply_async([](int x) { return x; }, 1);
      gate.release(256);
      auto e = error_of<procpool::WorkerStartError>([&] { (void)pending.get(watchdog); });
      REQUIRE(e);
      CHECK_THAT(e->what(), Catch::Contains("worker start-up failed 5 times in a row"));
      CHECK_THAT(e->what(), Catch::Contains(c.cause));
      CHECK_THROWS_AS(pool.apply([](int x) { return x; }, 2), procpool::PoolNotRunningError);
    }
    CHECK(attempts.load() == 5);  // one worker: exactly five start-ups, then no more
    CHECK(no_child_processes());
  }
}

TEST_CASE("pool resilience: a start-up that succeeds ends a run of start-up failures",
          "[pool][resilience]") {
  // Regression: only a completed chunk reset the count of start-up failures, so failures
  // separated by successful start-ups (whose workers then died in a task) added up and stopped
  // a pool that was working.
  {
    TestPipe plan, attempts;
    // One entry per start-up, in order: 1 succeeds, 0 throws.
    for (int p : {1, 0, 0, 0, 0, 1, 0, 1}) plan.send(p);
    procpool::Pool pool(procpool::PoolOptions{
        .processes = 1,
        .initializer =
            [p = plan.rfd(), a = attempts.wfd()] {
              int ok = 0;
              if (::read(p, &ok, sizeof ok) != sizeof ok) ok = 0;
              write_int(a, ok);
              if (!ok) throw std::runtime_error("planned failure");
            },
    });
    auto kill_own_worker = [](int) {
      no_core_dump();
      ::raise(SIGKILL);
      return 0;
    };
    // Start-up 1 succeeds; its worker dies in a task.
    CHECK_THROWS_AS(pool.apply(kill_own_worker, 0), procpool::WorkerLostError);
    // Start-ups 2-5 fail, 6 succeeds; its worker dies in a task.
    CHECK_THROWS_AS(pool.apply(kill_own_worker, 0), procpool::WorkerLostError);
    // Start-up 7 fails: one failure after a success, not five in a row. Start-up 8 succeeds.
    CHECK(pool.apply([](int x) { return x + 1; }, 1) == 2);
    CHECK(attempts.drain() == std::vector<int>{1, 0, 0, 0, 0, 1, 0, 1});
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool resilience: a worker slot whose initializer always fails stops the pool even while "
    "another worker keeps completing tasks",
    "[pool][resilience]") {
  // Regression: every completed chunk of the healthy worker reset the count of start-up
  // failures, so the failing slot was respawned again and again, for as long as work went on.
  {
    TestPipe ticket(O_NONBLOCK);
    ticket.release(1);  // one start-up succeeds; every later one fails
    SharedCounter attempts;
    procpool::Pool pool(procpool::PoolOptions{
        .processes = 2,
        .initializer =
            [t = ticket.rfd(), a = attempts.get()] {
              a->fetch_add(1);
              char c;
              if (::read(t, &c, 1) != 1) throw std::runtime_error("no ticket left");
            },
    });
    // An endless stream of quick tasks: the healthy worker completes chunks all the time.
    auto stream = pool.imap([](int x) { return x; }, std::views::iota(0), 1);
    bool stopped = false;
    const auto deadline = Clock::now() + 10s;
    long long consumed = 0;
    while (!stopped && Clock::now() < deadline) {
      try {
        auto v = stream.next(watchdog);
        REQUIRE(v);
        CHECK(*v == consumed);
        ++consumed;
      } catch (const procpool::WorkerStartError&) {
        stopped = true;  // the items in flight when the pool stopped
      } catch (const procpool::PoolNotRunningError&) {
        stopped = true;  // the stream could feed no more
      }
    }
    INFO("start-ups: " << attempts.load() << ", items consumed: " << consumed);
    REQUIRE(stopped);
    // The healthy start-up, five failures in a row, and at most a few more under way.
    CHECK(attempts.load() <= 12);
    auto refused = error_of<procpool::PoolNotRunningError>(
        [&] { (void)pool.apply([](int x) { return x; }, 1); });
    REQUIRE(refused);
    CHECK_THAT(refused->what(), Catch::Contains("no ticket left"));
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// The parent dies

TEST_CASE(
    "pool resilience: when the program is killed with SIGKILL its fork server and every worker "
    "exit within a second, leaving no orphan",
    "[pool][resilience]") {
  SubreaperScope reaper;  // the orphaned fork server is reparented here, so it can be reaped
  for (bool busy : {true, false}) {
    INFO((busy ? "with tasks running and queued" : "with idle workers"));
    TestPipe reports, gate, idle;
    std::fflush(nullptr);
    const pid_t program = ::fork();
    REQUIRE(program >= 0);
    if (program == 0) {
      // The "program": a pool with workers that report (pid, parent pid) and then block (busy)
      // or return (idle). It never gets to finish: the test kills it.
      try {
        procpool::Pool pool(2);
        std::vector<procpool::AsyncResult<int>> results;
        for (int i = 0; i < 6; ++i) {
          results.push_back(pool.apply_async(
              [r = reports.wfd(), g = gate.rfd()](int) {
                write_pair(r, static_cast<int>(::getpid()), static_cast<int>(::getppid()));
                wait_byte(g);
                return 0;
              },
              i));
        }
        if (!busy) {
          for (auto& r : results) (void)r.get();
          write_int(idle.wfd(), 1);
        }
        for (;;) ::pause();
      } catch (...) {
      }
      ::_exit(1);
    }
    ChildGuard guard(program);

    // Two tasks run at once, one per worker; in the idle case all six run and return.
    std::set<pid_t> workers;
    pid_t server = 0;
    for (int i = 0; i < 2; ++i) {
      auto [pid, ppid] = reports.recv<IntPair>();
      workers.insert(pid);
      if (server == 0) server = ppid;
      CHECK(ppid == server);  // every worker is a child of the fork server
    }
    if (!busy) {
      gate.release(6);
      CHECK(idle.recv() == 1);
      for (auto& [pid, ppid] : reports.drain<IntPair>()) workers.insert(pid);
    }
    REQUIRE(workers.size() == 2);
    {
      // The fork server is the program's child.
      const std::string program_thread =
          "/proc/" + std::to_string(program) + "/task/" + std::to_string(program);
      CHECK(children_in(program_thread + "/children") == std::set<pid_t>{server});
    }

    std::vector<pid_t> all(workers.begin(), workers.end());
    all.push_back(server);
    ExitWatch watch(all);
    REQUIRE(::kill(program, SIGKILL) == 0);
    const auto killed = Clock::now();
    const bool exited = watch.wait_all(1000ms);
    const auto took = Clock::now() - killed;
    INFO("they exited after " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                              << " ms");
    CHECK(exited);
    int status = 0;
    REQUIRE(::waitpid(program, &status, 0) == program);
    guard.reaped();
    CHECK(WIFSIGNALED(status));
    // And nothing is left, not even a zombie: the fork server (and any worker orphaned before
    // it reaped it) was reparented here.
    const auto deadline = Clock::now() + watchdog;
    auto all_gone = [&] { return std::all_of(all.begin(), all.end(), reap_if_ours); };
    while (!all_gone() && Clock::now() < deadline) std::this_thread::yield();
    CHECK(all_gone());
    CHECK(no_child_processes());
  }
}

TEST_CASE(
    "pool resilience: a fork server killed with SIGKILL takes its workers with it, and the pending "
    "results fail with WorkerLostError naming its pid and signal",
    "[pool][resilience]") {
  SubreaperScope reaper;  // the orphaned workers are reparented here, so they can be reaped
  {
    TestPipe reports, gate;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate);
    std::vector<procpool::AsyncResult<int>> results;
    for (int i = 0; i < 4; ++i) {
      results.push_back(pool.apply_async(
          [r = reports.wfd(), g = gate.rfd()](int) {
            write_pair(r, static_cast<int>(::getpid()), static_cast<int>(::getppid()));
            wait_byte(g);
            return 0;
          },
          i));
    }
    auto [w1, server] = reports.recv<IntPair>();
    auto [w2, server2] = reports.recv<IntPair>();
    REQUIRE(server == server2);
    CHECK(child_pids().count(server) == 1);

    const std::vector<pid_t> workers{w1, w2};
    ExitWatch watch(workers);
    REQUIRE(::kill(server, SIGKILL) == 0);
    CHECK(watch.wait_all(1000ms));  // PR_SET_PDEATHSIG: the workers die with their server

    for (auto& r : results) {
      auto lost = error_of<procpool::WorkerLostError>([&] { (void)r.get(watchdog); });
      REQUIRE(lost);
      CHECK(lost->pid() == server);
      CHECK(lost->signal() == SIGKILL);  // regression: neither signal() nor exit_status() was set
      CHECK_FALSE(lost->exit_status());
      CHECK_THAT(lost->what(), Catch::Contains("the fork server " + std::to_string(server) +
                                               " died: killed by signal 9 (SIGKILL)"));
    }
    CHECK_THROWS_AS(pool.apply([](int x) { return x; }, 1), procpool::PoolNotRunningError);
    const auto deadline = Clock::now() + watchdog;
    auto gone = [&] { return std::all_of(workers.begin(), workers.end(), reap_if_ours); };
    while (!gone() && Clock::now() < deadline) std::this_thread::yield();
    CHECK(gone());
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// No zombies, no leaked descriptors

TEST_CASE(
    "pool resilience: creating and destroying 1,000 pools leaves the descriptor count and the "
    "child count where they started",
    "[pool][resilience]") {
  // Under a sanitizer a pool costs 3 to 5 times as much (measured on an idle 2-core machine:
  // 1,000 pools take about 4.5 s plain, 20 s under ASan+UBSan, 14 s under TSan; ctest runs two
  // tests at once in CI). There, 200 pools keep the test well inside its time limit and still
  // exercise every way a pool ends.
  const int pools = under_sanitizer ? 200 : 1000;
  {
    procpool::Pool warm_up(1);  // process-wide state made once
    CHECK(warm_up.apply([](int x) { return x; }, 1) == 1);
  }
  const std::size_t fds_before = open_fd_count();
  const std::set<pid_t> children_before = child_pids();
  REQUIRE(no_child_processes());
  int failures = 0;
  for (int i = 0; i < pools; ++i) {
    procpool::Pool pool(1);
    switch (i % 10) {
      case 3: {  // a worker dies: the replacement's descriptors are released too
        try {
          (void)pool.apply(
              [](int) {
                no_core_dump();
                ::raise(SIGKILL);
                return 0;
              },
              i);
          ++failures;
        } catch (const procpool::WorkerLostError&) {
        }
        if (pool.apply([](int x) { return x + 1; }, i) != i + 1) ++failures;
        break;
      }
      case 7:  // terminated with a task pending or running
        (void)pool.apply_async([](int x) { return x; }, i);
        pool.terminate();
        break;
      default:
        if (pool.apply([](int x) { return x + 1; }, i) != i + 1) ++failures;
    }
  }
  CHECK(failures == 0);
  CHECK(open_fd_count() == fds_before);
  CHECK(child_pids() == children_before);
  CHECK(no_child_processes());
}

// ==============================================================================================
// Results that cannot be encoded

TEST_CASE(
    "pool resilience: a result that cannot be encoded fails its task with the encoder's error and "
    "the worker survives",
    "[pool][resilience]") {
  {
    procpool::Pool pool(1);
    const int pid = worker_pid(pool);

    auto single = pool.apply_async([](int x) { return Fragile{x, true}; }, 1);
    auto e = error_of<std::runtime_error>([&] { (void)single.get(); });
    REQUIRE(e);
    CHECK(typeid(*e) == typeid(std::runtime_error));
    CHECK(std::string(e->what()) == "cannot encode");
    CHECK(worker_pid(pool) == pid);  // the same worker serves the next task

    CHECK(pool.apply([](int x) { return Fragile{x, false}; }, 5).value == 5);

    // A type other than the standard ones arrives as RemoteError naming it.
    auto strange = error_of<procpool::RemoteError>([&] {
      (void)pool.apply([](int x) { return Strange{x, true}; }, 1);
    });
    REQUIRE(strange);
    CHECK_THAT(strange->type_name(), Catch::Contains("EncodingFailure"));
    CHECK(std::string(strange->what()) == "no wire format for this value");
    CHECK(worker_pid(pool) == pid);

    // In a chunk: only that item fails, the items after it still run in the same worker.
    auto stream = pool.imap(
        [](int x) {
          return std::pair<Fragile, int>(Fragile{x, x == 3}, ::getpid());
        },
        std::views::iota(0, 8), 8);
    for (int i = 0; i < 8; ++i) {
      INFO("item " << i);
      if (i == 3) {
        CHECK_THROWS_WITH(stream.next(), "cannot encode");
      } else {
        auto v = stream.next();
        REQUIRE(v);
        CHECK(v->first.value == i);
        CHECK(v->second == pid);
      }
    }
    CHECK_FALSE(stream.next());
    CHECK_THROWS_WITH(pool.map(
                          [](int x) {
                            return Fragile{x, x % 4 == 1};
                          },
                          std::views::iota(0, 8)),
                      "cannot encode");
    CHECK(worker_pid(pool) == pid);
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Signals in the parent

TEST_CASE(
    "pool resilience: the program's SIGINT and SIGTERM handlers still run, and signals never break "
    "get, wait, next or join",
    "[pool][resilience]") {
  {
    CountingHandlers handlers;  // installed before the pool, as a program would
    sigint_seen = 0;
    sigterm_seen = 0;
    {
      TestPipe started, gate;
      procpool::Pool pool(2);
      ReleaseOnExit unblock(gate);
      auto blocked = [s = started.wfd(), g = gate.rfd()](int x) {
        write_pair(s, static_cast<int>(::getpid()), static_cast<int>(::getppid()));
        wait_byte(g);
        return x * 2;
      };
      // Learn the workers and the fork server: they get SIGINT too, as from Ctrl-C.
      std::vector<pid_t> group;
      {
        auto a = pool.apply_async(blocked, 1);
        auto b = pool.apply_async(blocked, 2);
        auto [p1, server] = started.recv<IntPair>();
        auto [p2, server2] = started.recv<IntPair>();
        group = {p1, p2, server};
        CHECK(server == server2);
        SignalStorm storm(group, gate, 2);
        CHECK(a.get() == 2);  // get() blocked while the signals came
        CHECK(b.get() == 4);
      }
      auto check_phase = [&](const char* what, auto&& wait_for_it) {
        INFO("blocked in " << what);
        const int int_before = sigint_seen.load(), term_before = sigterm_seen.load();
        auto r = pool.apply_async(blocked, 21);
        (void)started.recv<IntPair>();
        SignalStorm storm(group, gate, 1);
        wait_for_it(r);
        storm.join();
        CHECK(r.ready());
        CHECK(r.get() == 42);
        CHECK(sigint_seen.load() > int_before);
        CHECK(sigterm_seen.load() > term_before);
      };
      check_phase("wait()", [](auto& r) { r.wait(); });
      check_phase("wait(timeout)", [](auto& r) { CHECK(r.wait(watchdog)); });
      check_phase("get(timeout)", [](auto& r) { CHECK(r.get(watchdog) == 42); });
      {
        INFO("blocked in next() of imap");
        auto stream = pool.imap(blocked, std::views::iota(0, 2), 1);
        SignalStorm storm(group, gate, 2);
        CHECK(stream.next() == 0);
        CHECK(stream.next() == 2);
        CHECK_FALSE(stream.next());
        (void)started.drain<IntPair>();  // both tasks have reported (they finished)
      }
      {
        INFO("blocked in map()");
        SignalStorm storm(group, gate, 2);
        CHECK(pool.map(blocked, std::vector<int>{5, 6}, 1) == std::vector<int>{10, 12});
        (void)started.drain<IntPair>();
      }
      {
        INFO("blocked in join()");
        std::vector<procpool::AsyncResult<int>> last;
        for (int i = 0; i < 2; ++i) last.push_back(pool.apply_async(blocked, i));
        (void)started.recv<IntPair>();
        (void)started.recv<IntPair>();
        SignalStorm storm(group, gate, 2);
        pool.close();
        pool.join();
        storm.join();
        CHECK(last[0].get() == 0);
        CHECK(last[1].get() == 2);
      }
      // Ctrl-C is the program's to handle: the workers and the fork server ignored it.
      for (pid_t p : group) CHECK(process_is_gone(p));  // they exited at join(), not before
    }
    CHECK(sigint_seen.load() > 0);
    CHECK(sigterm_seen.load() > 0);
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Fault-injection soak

TEST_CASE(
    "pool resilience: soak, a map of 20,000 items on 2 workers in which 1% of the tasks SIGKILL "
    "their worker fails exactly those items and returns every other result",
    "[pool][resilience][soak]") {
  constexpr int n = 20000;
  auto kills_its_worker = [](int i) { return mix(static_cast<std::uint64_t>(i)) % 100 == 0; };
  std::set<int> killers;
  for (int i = 0; i < n; ++i) {
    if (kills_its_worker(i)) killers.insert(i);
  }
  REQUIRE(killers.size() > 150);
  REQUIRE(killers.size() < 250);

  {
    procpool::Pool warm_up(2);
    CHECK(warm_up.apply([](int x) { return x; }, 1) == 1);
  }
  const std::size_t fds_before = open_fd_count();
  {
    TestPipe reports;  // (item, pid) from each task just before it kills its worker
    procpool::Pool pool(2);
    auto task = [r = reports.wfd()](int i) -> long {
      if (mix(static_cast<std::uint64_t>(i)) % 100 == 0) {
        no_core_dump();
        write_pair(r, i, static_cast<int>(::getpid()));
        ::raise(SIGKILL);
      }
      return 3L * i + 1;
    };
    auto read_reports = [&] {
      std::map<int, int> pid_of;
      for (auto [i, pid] : reports.drain<IntPair>()) {
        CHECK(pid_of.count(i) == 0);  // a killer item never runs twice
        pid_of[i] = pid;
      }
      return pid_of;
    };

    SECTION("imap, item by item") {
      auto stream = pool.imap(task, std::views::iota(0, n), 20);
      std::map<int, procpool::WorkerLostError> lost;
      int wrong = 0, other_errors = 0;
      for (int i = 0; i < n; ++i) {
        try {
          auto v = stream.next();
          if (!v || *v != 3L * i + 1) ++wrong;
        } catch (const procpool::WorkerLostError& e) {
          lost.emplace(i, e);
        } catch (...) {
          ++other_errors;
        }
      }
      CHECK_FALSE(stream.next());
      CHECK(wrong == 0);
      CHECK(other_errors == 0);
      const auto pid_of = read_reports();
      std::set<int> lost_items;
      int mismatched = 0;
      for (auto& [i, e] : lost) {
        lost_items.insert(i);
        if (pid_of.count(i) == 0 || e.pid() != pid_of.at(i) || e.signal() != SIGKILL) ++mismatched;
      }
      CHECK(lost_items == killers);
      CHECK(mismatched == 0);
      CHECK(pid_of.size() == killers.size());
    }
    SECTION("map_async with the automatic chunk size") {
      auto result = pool.map_async(task, std::views::iota(0, n));
      auto lost = error_of<procpool::WorkerLostError>([&] { (void)result.get(); });
      const auto pid_of = read_reports();
      REQUIRE(lost);
      // map reports the failure of the lowest-indexed failed item: the first killer.
      CHECK(lost->pid() == pid_of.at(*killers.begin()));
      CHECK(lost->signal() == SIGKILL);
      std::set<int> ran_killers;
      for (auto& [i, pid] : pid_of) ran_killers.insert(i);
      CHECK(ran_killers == killers);
    }
    // Still usable afterwards.
    CHECK(pool.map([](int x) { return x; }, std::views::iota(0, 1000)) == iota_vector(0, 1000));
  }
  CHECK(open_fd_count() == fds_before);
  CHECK(no_child_processes());
}
