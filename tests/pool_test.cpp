#include <procpool/pool.hpp>

#include <catch2/catch.hpp>

#include <procpool/thread_pool.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <new>
#include <numeric>
#include <optional>
#include <ranges>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>
#include "support/children.hpp"

using test_support::no_child_processes;

// The behaviour tests of Pool (issue 3), with real workers.
//
// What makes sense for a ThreadPool too (results and their order, input errors, timeouts,
// cancel of queued work, callbacks, close/join/terminate, exception types, as_completed,
// ResultStream) is written once, as TEMPLATE_TEST_CASEs over POOL_TYPES. What only processes
// can do (pids, kills, fork-time memory, an initializer per process, max_tasks_per_child,
// descriptors and children) is plain TEST_CASEs on Pool.
//
// Tests and tasks synchronize through pipes: a pipe made before a Pool is inherited by its
// workers, and works between threads as well. A task that must be running before the test acts
// writes to a `started` pipe; a task the test wants to hold blocks reading one byte from a
// `gate` pipe. Nothing sleeps to order events; timeouts are watchdogs that turn a hang into a
// failure. Every test ends with no child process left, running or zombie.

#define POOL_TYPES procpool::Pool, procpool::ThreadPool

#if defined(__SANITIZE_THREAD__)
// libstdc++ is not built with ThreadSanitizer, so TSan cannot see the atomic reference count of a
// std::exception_ptr: when the test's thread reads a task's exception and a pool thread then
// drops the last reference, the free looks like a race with the read. It is not one (the count
// is decremented with acquire-release ordering). Only that free is suppressed.
extern "C" const char* __tsan_default_suppressions() {
  return "race:std::__exception_ptr::exception_ptr::_M_release\n";
}
#endif

namespace pool_test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// How long a test waits for something that must happen before it calls it a hang.
constexpr auto watchdog = 20s;

template <class P>
constexpr bool runs_in_processes = std::is_same_v<P, procpool::Pool>;

// ----------------------------------------------------------------------------------------------
// Used inside tasks (in a worker process or thread): async-signal-safe, allocation-free.

inline void write_int(int fd, int value) noexcept {
  // A write of at most PIPE_BUF bytes to a pipe is atomic: concurrent writers never interleave.
  while (::write(fd, &value, sizeof value) < 0 && errno == EINTR) {
  }
}

// Blocks until one byte can be taken from the pipe `fd`.
inline void wait_byte(int fd) noexcept {
  char c;
  while (::read(fd, &c, 1) < 0 && errno == EINTR) {
  }
}

// ----------------------------------------------------------------------------------------------
// Used by the tests.

// A pipe whose descriptors are plain ints, so that tasks capture them by value.
class TestPipe {
 public:
  TestPipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
      throw std::system_error(errno, std::generic_category(), "pipe2");
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

  // Whether something can be read right now.
  bool has_data() const {
    pollfd p{r_, POLLIN, 0};
    return ::poll(&p, 1, 0) > 0;
  }

  // The next int written to the pipe. @throws std::runtime_error if none comes within the
  // watchdog time (a hang becomes a failure).
  int recv() const {
    pollfd p{r_, POLLIN, 0};
    int ready;
    do {
      ready = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(watchdog).count()));
    } while (ready < 0 && errno == EINTR);
    if (ready <= 0) throw std::runtime_error("watchdog: nothing arrived on a pipe in time");
    int value = 0;
    ssize_t n;
    do {
      n = ::read(r_, &value, sizeof value);
    } while (n < 0 && errno == EINTR);
    if (n != sizeof value) throw std::runtime_error("a short read from a test pipe");
    return value;
  }

  // Every int written so far, without waiting.
  std::vector<int> drain() const {
    std::vector<int> values;
    while (has_data()) values.push_back(recv());
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
// blocked on the gates go on, so that the pool's destructor (close + join) does not wait forever.
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

// A watchdog thread: unless cancelled within `limit`, it releases the gate (so that a call that
// wrongly waits for blocked tasks returns, late, and the test fails instead of hanging).
class GateWatchdog {
 public:
  GateWatchdog(const TestPipe& gate, std::chrono::seconds limit)
      : thread_([this, &gate, limit] {
          std::unique_lock lock(mutex_);
          if (!cv_.wait_for(lock, limit, [this] { return cancelled_; })) {
            fired_ = true;
            gate.release(256);
          }
        }) {}
  ~GateWatchdog() { cancel(); }
  GateWatchdog(const GateWatchdog&) = delete;
  GateWatchdog& operator=(const GateWatchdog&) = delete;

  // Stops the watchdog; returns whether it had fired.
  bool cancel() {
    {
      std::lock_guard lock(mutex_);
      cancelled_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    return fired_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool cancelled_ = false;
  bool fired_ = false;
  std::thread thread_;
};

// Points fd 2 at a pipe until stop(), which returns what was written there.
class StderrCapture {
 public:
  StderrCapture() {
    std::fflush(stderr);
    int fds[2];
    // Non-blocking: a writer of fd 2 never blocks on a full pipe while the test is not reading.
    if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0)
      throw std::system_error(errno, std::generic_category(), "pipe2");
    read_ = fds[0];
    saved_ = ::dup(STDERR_FILENO);
    ::dup2(fds[1], STDERR_FILENO);
    ::close(fds[1]);
  }
  ~StderrCapture() { (void)stop(); }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;

  std::string stop() {
    if (saved_ < 0) return {};
    std::fflush(stderr);
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
    saved_ = -1;
    std::string text;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(read_, buf, sizeof buf)) > 0) text.append(buf, static_cast<std::size_t>(n));
    ::close(read_);
    return text;
  }

 private:
  int saved_ = -1;
  int read_ = -1;
};


// True when no process with this pid exists any more, not even as a zombie.
bool process_is_gone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

// Waits (at most the watchdog time) until process `pid`, which need not be our child, is gone.
bool wait_until_gone(pid_t pid) {
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return errno == ESRCH;
  pollfd p{fd, POLLIN, 0};
  int r = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(watchdog).count()));
  ::close(fd);
  return r > 0;
}

std::size_t open_fd_count() {
  std::size_t n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)entry;
    ++n;
  }
  return n;
}

std::vector<long> squares(long n) {
  std::vector<long> v;
  for (long i = 0; i < n; ++i) v.push_back(i * i);
  return v;
}

std::vector<int> iota_vector(int from, int to) {
  std::vector<int> v;
  for (int i = from; i < to; ++i) v.push_back(i);
  return v;
}

// Runs pool.size() tasks that are all running at once (each reports its pid, then waits for
// the gate), and returns their distinct pids: pool.size() of them when the pool really has
// that many working workers.
template <class P>
std::set<int> pids_of_simultaneous_tasks(P& pool, const TestPipe& started, const TestPipe& gate) {
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

// An error thrown by an input range (not by a task).
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// 0, 1, 2, ... 99, except that reading item `at` throws InputError.
auto input_failing_at(int at) {
  return std::views::iota(0, 100) | std::views::transform([at](int i) {
           if (i == at) throw InputError("the input failed at item " + std::to_string(i));
           return i;
         });
}

// Exception types that are not among the ten standard ones a Pool rebuilds as themselves.
struct CustomError : std::exception {
  const char* what() const noexcept override { return "a custom failure"; }
};
struct NotAnException {
  int code;
};

// A callable that travels by its serialize member (it owns a std::string).
struct Greeter {
  std::string greeting;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(greeting);
  }
  std::string operator()(const std::string& name) const { return greeting + ", " + name; }
};

// Trivially copyable data captured by value.
struct Point {
  int x;
  int y;
};

long triple(long x) { return 3 * x; }

// Memory that workers see as it was when their Pool was built.
int generation = 0;
// Set by a Pool's initializer in each worker.
pid_t initialized_in = 0;

const std::string the_message = "the task says no";

template <class E>
[[noreturn]] void throw_standard() {
  if constexpr (std::is_same_v<E, std::bad_alloc>) {
    throw std::bad_alloc();
  } else {
    throw E(the_message);
  }
}

// Checks that an exception of type E thrown by a task comes back as E with the same message.
template <class E, class P>
void check_rethrown_as_itself(P& pool) {
  INFO("thrown: " << procpool::detail::demangle(typeid(E)));
  const std::string expected =
      std::is_same_v<E, std::bad_alloc> ? std::bad_alloc().what() : the_message;
  auto outcome = [](auto&& call) -> std::pair<std::string, std::string> {
    try {
      call();
    } catch (const std::exception& e) {
      return {typeid(e) == typeid(E) ? "the same type" : procpool::detail::demangle(typeid(e)),
              e.what()};
    }
    return {"nothing", ""};
  };
  auto single = outcome([&] { (void)pool.apply([](int) -> int { throw_standard<E>(); }, 1); });
  CHECK(single.first == "the same type");
  CHECK(single.second == expected);

  // From a map: the one failed item fails the whole, as itself.
  auto mapped = outcome([&] {
    (void)pool.map(
        [](int i) -> int {
          if (i == 3) throw_standard<E>();
          return i;
        },
        iota_vector(0, 10), 1);
  });
  CHECK(mapped.first == "the same type");
  CHECK(mapped.second == expected);
}

}  // namespace pool_test

using namespace pool_test;

// ==============================================================================================
// Results and their order

TEMPLATE_TEST_CASE("pool: apply and apply_async return what the task returns", "[pool]",
                   POOL_TYPES) {
  {
    TestType pool(2);
    CHECK(pool.size() == 2);
    CHECK(pool.apply([](int a, int b) { return a + b; }, 20, 22) == 42);
    CHECK(pool.apply([] { return 7; }) == 7);
    CHECK(pool.apply(
              [](const std::string& s, int n) {
                std::string out;
                for (int i = 0; i < n; ++i) out += s;
                return out;
              },
              std::string("ab"), 3) == "ababab");

    auto r =
        pool.apply_async([](std::vector<int> v) { return std::accumulate(v.begin(), v.end(), 0); },
                         std::vector<int>{1, 2, 3});
    CHECK(r.get() == 6);
    CHECK(r.get() == 6);  // again and again

    std::vector<procpool::AsyncResult<long>> many;
    for (long i = 0; i < 100; ++i)
      many.push_back(pool.apply_async([](long x) { return x * x; }, i));
    for (long i = 0; i < 100; ++i) CHECK(many[static_cast<std::size_t>(i)].get() == i * i);

    // Arguments are taken when the task is submitted: the caller's object may change afterwards.
    std::string arg = "before";
    auto later = pool.apply_async([](std::string s) { return s; }, arg);
    arg = "after";
    CHECK(later.get() == "before");
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: map, map_async, starmap and starmap_async return results in input order for every chunk "
    "size",
    "[pool]", POOL_TYPES) {
  {
    TestType pool(2);
    const std::vector<long> expected = squares(1000);
    std::vector<long> input(1000);
    std::iota(input.begin(), input.end(), 0L);
    std::vector<std::tuple<long, long>> pairs;
    for (long i = 0; i < 1000; ++i) pairs.emplace_back(i, i);
    const auto square = [](long x) { return x * x; };
    const auto multiply = [](long a, long b) { return a * b; };

    for (std::size_t chunksize :
         {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{100}}) {
      INFO("chunksize " << chunksize << (chunksize == 0 ? " (automatic)" : ""));
      CHECK(pool.map(square, std::views::iota(0L, 1000L), chunksize) == expected);
      CHECK(pool.map(square, input, chunksize) == expected);
      auto async = pool.map_async(square, input, chunksize);
      static_assert(std::is_same_v<decltype(async), procpool::AsyncResult<std::vector<long>>>);
      CHECK(async.get() == expected);
      CHECK(pool.starmap(multiply, pairs, chunksize) == expected);
      CHECK(pool.starmap_async(multiply, pairs, chunksize).get() == expected);
    }
    // An input that is neither sized nor forward keeps its order too.
    auto unsized = std::views::iota(0L) | std::views::take_while([](long x) { return x < 1000; });
    CHECK(pool.map(square, unsized) == expected);
    CHECK(pool.map(square, unsized, 7) == expected);

    // Empty inputs.
    CHECK(pool.map(square, std::vector<long>{}).empty());
    CHECK(pool.map(square, std::vector<long>{}, 7).empty());
    CHECK(pool.map_async(square, std::vector<long>{}).get().empty());
    CHECK(pool.starmap(multiply, std::vector<std::tuple<long, long>>{}).empty());
    CHECK(pool.starmap_async(multiply, std::vector<std::tuple<long, long>>{}).get().empty());
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: imap yields results in input order and imap_unordered yields each result once", "[pool]",
    POOL_TYPES) {
  {
    TestType pool(2);
    const std::vector<long> expected = squares(1000);
    const auto square = [](long x) { return x * x; };
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}, std::size_t{100}}) {
      INFO("chunksize " << chunksize);
      std::vector<long> ordered;
      for (long v : pool.imap(square, std::views::iota(0L, 1000L), chunksize)) ordered.push_back(v);
      CHECK(ordered == expected);
      std::vector<long> unordered;
      for (long v : pool.imap_unordered(square, std::views::iota(0L, 1000L), chunksize))
        unordered.push_back(v);
      std::sort(unordered.begin(), unordered.end());
      CHECK(unordered == expected);
    }
    // The default chunk size, over an lvalue container.
    std::vector<long> input(1000);
    std::iota(input.begin(), input.end(), 0L);
    std::vector<long> got;
    for (long v : pool.imap(square, input)) got.push_back(v);
    CHECK(got == expected);

    // Empty inputs.
    auto empty = pool.imap(square, std::vector<long>{});
    CHECK_FALSE(empty.next());
    int n = 0;
    for (long v : pool.imap_unordered(square, std::vector<long>{}, 7)) n += static_cast<int>(v) + 1;
    CHECK(n == 0);
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: imap_unordered yields a result as soon as it is ready", "[pool]",
                   POOL_TYPES) {
  {
    TestPipe gate;
    TestType pool(2);
    ReleaseOnExit unblock(gate);
    // Item 0 waits for the gate; item 1 does not, so it comes first.
    auto stream = pool.imap_unordered(
        [g = gate.rfd()](int i) {
          if (i == 0) wait_byte(g);
          return i;
        },
        std::views::iota(0, 2));
    CHECK(stream.next(watchdog) == 1);
    gate.release();
    CHECK(stream.next(watchdog) == 0);
    CHECK_FALSE(stream.next(watchdog));
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: void tasks work with apply, apply_async, map, map_async and starmap",
                   "[pool]", POOL_TYPES) {
  {
    TestPipe out;  // the tasks' only effect
    TestType pool(2);
    const auto note = [w = out.wfd()](int x) { write_int(w, x); };

    static_assert(std::is_void_v<decltype(pool.apply(note, 1))>);
    pool.apply(note, 1);
    CHECK(out.recv() == 1);

    procpool::AsyncResult<void> one = pool.apply_async(note, 2);
    one.get();
    CHECK(one.successful());
    CHECK(out.recv() == 2);

    static_assert(std::is_void_v<decltype(pool.map(note, std::vector<int>{}))>);
    for (std::size_t chunksize :
         {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{100}}) {
      pool.map(note, std::views::iota(0, 1000), chunksize);
      std::vector<int> seen;
      for (int i = 0; i < 1000; ++i) seen.push_back(out.recv());
      std::sort(seen.begin(), seen.end());
      CHECK(seen == iota_vector(0, 1000));
    }

    procpool::AsyncResult<void> all = pool.map_async(note, std::views::iota(1000, 1100), 7);
    all.get();
    std::vector<int> seen;
    for (int i = 0; i < 100; ++i) seen.push_back(out.recv());
    std::sort(seen.begin(), seen.end());
    CHECK(seen == iota_vector(1000, 1100));

    static_assert(std::is_void_v<decltype(pool.starmap([](int, int) {},
                                                       std::vector<std::tuple<int, int>>{}))>);
    pool.starmap([w = out.wfd()](int a, int b) { write_int(w, a * b); },
                 std::vector<std::tuple<int, int>>{{2, 3}, {4, 5}});
    std::set<int> products{out.recv(), out.recv()};
    CHECK(products == std::set<int>{6, 20});
    procpool::AsyncResult<void> star =
        pool.starmap_async([w = out.wfd()](int a, int b) { write_int(w, a + b); },
                           std::vector<std::tuple<int, int>>{{2, 3}});
    star.get();
    CHECK(out.recv() == 5);

    // Empty: nothing runs, and the result is ready.
    pool.map(note, std::vector<int>{});
    procpool::AsyncResult<void> none = pool.map_async(note, std::vector<int>{});
    none.get();
    CHECK(none.successful());
    CHECK_FALSE(out.has_data());
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Inputs that fail, infinite inputs, lazy reading

TEMPLATE_TEST_CASE(
    "pool: an input range that throws makes map rethrow its exception, and the pool stays usable",
    "[pool]", POOL_TYPES) {
  {
    TestType pool(2);
    const auto twice = [](int x) { return 2 * x; };
    for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{7}}) {
      INFO("chunksize " << chunksize);
      CHECK_THROWS_MATCHES(pool.map(twice, input_failing_at(50), chunksize), InputError,
                           Catch::Message("the input failed at item 50"));
      CHECK_THROWS_AS(pool.map_async(twice, input_failing_at(50), chunksize), InputError);
      CHECK_THROWS_AS(pool.starmap([](int a) { return a; },
                                   input_failing_at(3) | std::views::transform([](int i) {
                                     return std::tuple<int>(i);
                                   }),
                                   chunksize),
                      InputError);
    }
    CHECK(pool.map(twice, input_failing_at(1000)) == [] {
      std::vector<int> v;
      for (int i = 0; i < 100; ++i) v.push_back(2 * i);
      return v;
    }());
    CHECK(pool.apply(twice, 21) == 42);
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: imap yields the items before a failing input, then rethrows the input's exception",
    "[pool]", POOL_TYPES) {
  {
    TestType pool(2);
    const auto identity = [](int x) { return x; };
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}}) {
      INFO("chunksize " << chunksize);
      auto stream = pool.imap(identity, input_failing_at(50), chunksize);
      std::vector<int> got;
      std::string error = "none";
      try {
        while (auto v = stream.next()) got.push_back(*v);
      } catch (const InputError& e) {
        error = e.what();
      }
      CHECK(got == iota_vector(0, 50));
      CHECK(error == "the input failed at item 50");
      CHECK_FALSE(stream.next());  // nothing after it

      // Unordered: every item read before the failure, then the failure.
      auto unordered = pool.imap_unordered(identity, input_failing_at(50), chunksize);
      got.clear();
      error = "none";
      try {
        while (auto v = unordered.next()) got.push_back(*v);
      } catch (const InputError& e) {
        error = e.what();
      }
      std::sort(got.begin(), got.end());
      CHECK(got == iota_vector(0, 50));
      CHECK(error == "the input failed at item 50");
    }
    CHECK(pool.apply(identity, 5) == 5);
    CHECK(pool.map(identity, std::views::iota(0, 10)) == iota_vector(0, 10));
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: imap over an infinite input can be dropped part way and the pool goes on",
                   "[pool]", POOL_TYPES) {
  {
    TestType pool(2);
    const auto square = [](long x) { return x * x; };
    {
      auto stream = pool.imap(square, std::views::iota(0L), 3);
      for (long i = 0; i < 20; ++i) CHECK(stream.next() == i * i);
    }
    {
      int n = 0;
      for (long v : pool.imap_unordered(square, std::views::iota(0L))) {
        (void)v;
        if (++n == 20) break;
      }
      CHECK(n == 20);
    }
    CHECK(pool.apply(square, 12L) == 144);
    CHECK(pool.map(square, std::views::iota(0L, 100L), 7) == squares(100));
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: imap reads its input lazily, a bounded number of chunks ahead of the consumer", "[pool]",
    POOL_TYPES) {
  {
    TestPipe gate;  // before the pool: workers inherit it
    TestType pool(2);
    ReleaseOnExit unblock(gate);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{5}}) {
      // Counted where the input is read: the thread that iterates the stream.
      std::atomic<std::size_t> produced{0};
      auto input = std::views::iota(0) | std::views::transform([&produced](int i) {
                     ++produced;
                     return i;
                   });
      auto stream = pool.imap([](int x) { return x; }, input, chunksize);
      // The documented bound: about 2 × size() chunks in flight plus as many buffered; one more
      // chunk of slack for the one being read when the limit is reached.
      const std::size_t ahead = 4 * pool.size() * chunksize + chunksize;
      int consumed = 0;
      for (int k : {1, 10, 100, 500}) {
        while (consumed < k) {
          REQUIRE(stream.next() == consumed);
          ++consumed;
        }
        INFO("chunksize " << chunksize << ", consumed " << k << ", produced " << produced.load());
        CHECK(produced.load() >= static_cast<std::size_t>(k));
        CHECK(produced.load() <= static_cast<std::size_t>(k) + ahead);
      }
    }

    // A consumer stuck at item 0 (its task waits for the gate) while the later results pile up:
    // the stream still reads no further than the bound.
    std::atomic<std::size_t> produced{0};
    auto input = std::views::iota(0) | std::views::transform([&produced](int i) {
                   ++produced;
                   return i;
                 });
    auto stream = pool.imap(
        [g = gate.rfd()](int x) {
          if (x == 0) wait_byte(g);
          return x;
        },
        input, 2);
    const std::size_t ahead = 4 * pool.size() * 2 + 2;
    for (int attempt = 0; attempt < 20; ++attempt) {
      CHECK_THROWS_AS(stream.next(1ms), procpool::TimeoutError);
      CHECK(produced.load() <= ahead);
    }
    gate.release();
    for (int i = 0; i < 100; ++i) REQUIRE(stream.next(watchdog) == i);
    CHECK(produced.load() <= 100 + ahead);
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// AsyncResult: timeouts, state, cancel, as_completed

TEMPLATE_TEST_CASE("pool: get with a timeout throws TimeoutError while the task keeps running",
                   "[pool]", POOL_TYPES) {
  {
    TestPipe started, gate;  // before the pool: workers inherit them
    TestType pool(2);
    ReleaseOnExit unblock(gate);
    auto r = pool.apply_async(
        [s = started.wfd(), g = gate.rfd()](int x) {
          write_int(s, x);
          wait_byte(g);
          return 2 * x;
        },
        21);
    CHECK(started.recv() == 21);

    CHECK_THROWS_AS(r.get(10ms), procpool::TimeoutError);
    CHECK_THROWS_AS(r.get(-5ms), procpool::TimeoutError);  // a negative timeout means zero
    CHECK_FALSE(r.ready());
    CHECK_FALSE(r.wait(10ms));
    CHECK_THROWS_AS(r.successful(), std::logic_error);

    gate.release();
    CHECK(r.get(watchdog) == 42);  // the task went on and finished
    CHECK(r.ready());
    CHECK(r.successful());
    CHECK(r.wait(0ms));
    r.wait();
    CHECK(r.get(0ms) == 42);

    auto failed = pool.apply_async([](int) -> int { throw std::runtime_error("no"); }, 1);
    failed.wait();
    CHECK(failed.ready());
    CHECK_FALSE(failed.successful());
    CHECK_THROWS_AS(failed.get(), std::runtime_error);
    CHECK_THROWS_AS(failed.get(), std::runtime_error);  // again
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: cancel of a queued task means it never runs and its result fails with CancelledError",
    "[pool]", POOL_TYPES) {
  {
    TestPipe started, gate, ran, told;
    TestType pool(2);
    ReleaseOnExit unblock(gate);

    // Every worker busy: size() tasks that have started and wait for the gate.
    std::vector<procpool::AsyncResult<int>> busy;
    for (int i = 0; i < static_cast<int>(pool.size()); ++i) {
      busy.push_back(pool.apply_async(
          [s = started.wfd(), g = gate.rfd()](int x) {
            write_int(s, x);
            wait_byte(g);
            return x;
          },
          i));
    }
    std::set<int> running;
    for (std::size_t i = 0; i < pool.size(); ++i) running.insert(started.recv());
    REQUIRE(running.size() == pool.size());

    const auto report_error = [w = told.wfd()](std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const procpool::CancelledError&) {
        write_int(w, 1);
      } catch (...) {
        write_int(w, 2);
      }
    };
    auto queued = pool.apply_async(
        [w = ran.wfd()](int x) {
          write_int(w, x);
          return x;
        },
        99);
    queued.on_error(report_error);
    queued.on_result([w = told.wfd()](int) { write_int(w, 3); });

    CHECK(queued.cancel());
    CHECK(queued.ready());
    CHECK_FALSE(queued.successful());
    CHECK_THROWS_AS(queued.get(), procpool::CancelledError);
    CHECK_FALSE(queued.cancel());   // already cancelled
    CHECK(told.recv() == 1);        // on_error got a CancelledError
    queued.on_error(report_error);  // registered after the cancel: still told
    CHECK(told.recv() == 1);

    gate.release(pool.size());
    for (std::size_t i = 0; i < busy.size(); ++i) CHECK(busy[i].get() == static_cast<int>(i));
    CHECK(pool.map([](int x) { return x; }, std::views::iota(0, 20), 1) == iota_vector(0, 20));

    // Once every worker has exited, anything the cancelled task wrote would be in the pipe.
    pool.close();
    pool.join();
    CHECK_FALSE(ran.has_data());
    CHECK_FALSE(told.has_data());  // and on_result was never called
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: cancel of a finished task returns false and leaves its result", "[pool]",
                   POOL_TYPES) {
  {
    TestType pool(2);
    auto r = pool.apply_async([](int x) { return x + 1; }, 1);
    CHECK(r.get() == 2);
    CHECK_FALSE(r.cancel());
    CHECK(r.successful());
    CHECK(r.get() == 2);

    auto failed = pool.apply_async([](int) -> int { throw std::invalid_argument("bad"); }, 1);
    failed.wait();
    CHECK_FALSE(failed.cancel());
    CHECK_THROWS_AS(failed.get(), std::invalid_argument);

    auto m = pool.map_async([](int x) { return x; }, std::views::iota(0, 10));
    CHECK(m.get() == iota_vector(0, 10));
    CHECK_FALSE(m.cancel());
    CHECK(m.get() == iota_vector(0, 10));
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: as_completed yields results in the order they finish", "[pool]",
                   POOL_TYPES) {
  {
    constexpr int n = 4;
    TestPipe started;
    std::array<TestPipe, n> gates;  // one per task, so the test decides which finishes when
    TestType pool(2);
    ReleaseOnExit unblock(gates[0], gates[1], gates[2], gates[3]);

    std::vector<procpool::AsyncResult<int>> results;
    for (int i = 0; i < n; ++i) {
      results.push_back(pool.apply_async(
          [s = started.wfd(), g = gates[static_cast<std::size_t>(i)].rfd()](int x) {
            write_int(s, x);
            wait_byte(g);
            return 10 * x;
          },
          i));
    }
    std::set<int> running;
    const std::vector<int> order{1, 0, 3, 2};
    std::size_t step = 0;
    // Releases the next task of `order` once it runs: only one task is released at a time, so
    // results become ready in exactly this order.
    auto release_next = [&] {
      int i = order[step++];
      while (running.count(i) == 0) running.insert(started.recv());
      gates[static_cast<std::size_t>(i)].release();
    };

    std::vector<int> got;
    release_next();
    for (auto& r : procpool::as_completed(results, watchdog)) {
      got.push_back(r.get() / 10);
      if (step < order.size()) release_next();
    }
    CHECK(got == order);
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: as_completed with a timeout throws TimeoutError when results stay pending", "[pool]",
    POOL_TYPES) {
  {
    TestPipe gate;
    TestType pool(2);
    ReleaseOnExit unblock(gate);
    auto done = pool.apply_async([](int x) { return x; }, 1);
    CHECK(done.get() == 1);
    auto blocked = pool.apply_async(
        [g = gate.rfd()](int x) {
          wait_byte(g);
          return x;
        },
        2);

    std::vector<int> got;
    CHECK_THROWS_AS(([&] {
                      for (auto& r : procpool::as_completed(std::vector{done, blocked}, 50ms))
                        got.push_back(r.get());
                    }()),
                    procpool::TimeoutError);
    CHECK(got == std::vector<int>{1});  // the ready one came first
    CHECK_THROWS_AS(([&] {
                      for (auto& r : procpool::as_completed(std::vector{blocked}, 0ms))
                        got.push_back(r.get());
                    }()),
                    procpool::TimeoutError);

    gate.release();
    got.clear();
    for (auto& r : procpool::as_completed(std::vector{blocked, done}, watchdog))
      got.push_back(r.get());
    std::sort(got.begin(), got.end());
    CHECK(got == std::vector<int>{1, 2});
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Callbacks

TEMPLATE_TEST_CASE(
    "pool: on_result and on_error each run once, one at a time, on one thread of the pool",
    "[pool]", POOL_TYPES) {
  {
    constexpr int n = 200;
    TestPipe done;
    std::mutex mutex;
    std::set<std::thread::id> threads;
    std::vector<std::atomic<int>> result_calls(n), error_calls(n);
    std::atomic<int> wrong_values{0};
    std::atomic<bool> inside{false};
    std::atomic<int> overlaps{0};
    auto enter = [&] {
      if (inside.exchange(true)) ++overlaps;
      std::lock_guard lock(mutex);
      threads.insert(std::this_thread::get_id());
    };
    auto leave = [&] {
      // Stay a little while, so that a second callback started concurrently would be seen.
      for (int i = 0; i < 100; ++i) std::this_thread::yield();
      inside.store(false);
    };

    TestType pool(2);
    std::vector<procpool::AsyncResult<int>> results;
    for (int i = 0; i < n; ++i) {
      auto r = pool.apply_async(
          [](int x) -> int {
            if (x % 5 == 0) throw std::runtime_error("item " + std::to_string(x));
            return x;
          },
          i);
      r.on_result([&, i](const int& v) {
         enter();
         if (v != i) ++wrong_values;
         ++result_calls[static_cast<std::size_t>(i)];
         leave();
         done.send(i);
       }).on_error([&, i](std::exception_ptr) {
        enter();
        ++error_calls[static_cast<std::size_t>(i)];
        leave();
        done.send(i);
      });
      results.push_back(r);
    }
    for (int i = 0; i < n; ++i) (void)done.recv();

    for (int i = 0; i < n; ++i) {
      INFO("task " << i);
      const auto k = static_cast<std::size_t>(i);
      CHECK(result_calls[k].load() == (i % 5 == 0 ? 0 : 1));
      CHECK(error_calls[k].load() == (i % 5 == 0 ? 1 : 0));
    }
    CHECK(wrong_values.load() == 0);
    CHECK(overlaps.load() == 0);
    std::thread::id callback_thread;
    {
      std::lock_guard lock(mutex);
      REQUIRE(threads.size() == 1);
      callback_thread = *threads.begin();
    }
    CHECK(callback_thread != std::this_thread::get_id());

    // Registered after the result is ready: it still runs, on that same thread.
    std::thread::id late_thread;
    results[1].on_result([&](const int& v) {
      late_thread = std::this_thread::get_id();
      done.send(v);
    });
    CHECK(done.recv() == 1);
    CHECK(late_thread == callback_thread);
    results[0].on_result([&](const int&) { done.send(777); });  // it failed: never called
    results[0].on_error([&](std::exception_ptr) {
      late_thread = std::this_thread::get_id();
      done.send(555);
    });
    CHECK(done.recv() == 555);
    CHECK(late_thread == callback_thread);

    // A void task's on_result takes no argument.
    procpool::AsyncResult<void> v = pool.apply_async([] {});
    v.on_result([&] { done.send(9); });
    CHECK(done.recv() == 9);

    pool.close();
    pool.join();
    CHECK_FALSE(done.has_data());
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: a callback that throws is reported on stderr and harms nothing", "[pool]",
                   POOL_TYPES) {
  {
    TestPipe done;
    TestType pool(2);
    std::string text;
    auto r = pool.apply_async([](int x) { return x; }, 5);
    {
      StderrCapture capture;
      r.on_result([](const int&) {
         throw std::runtime_error("callback boom");
       }).on_result([w = done.wfd()](const int& v) { write_int(w, v); });
      CHECK(done.recv() == 5);  // the next callback still ran
      r.wait();
      r.on_result([](const int&) {
         throw std::out_of_range("late callback boom");
       }).on_result([w = done.wfd()](const int& v) { write_int(w, v + 1); });
      CHECK(done.recv() == 6);
      text = capture.stop();
    }
    CHECK_THAT(text, Catch::Contains("callback boom"));
    CHECK_THAT(text, Catch::Contains("late callback boom"));
    CHECK(r.get() == 5);
    CHECK(pool.apply([](int x) { return x * 3; }, 3) == 9);
    auto again = pool.apply_async([](int x) { return x; }, 7);
    again.on_result([w = done.wfd()](const int& v) { write_int(w, v); });
    CHECK(done.recv() == 7);
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: a blocking get inside a callback of the same pool throws std::logic_error", "[pool]",
    POOL_TYPES) {
  {
    TestPipe gate, done;
    TestType pool(2);
    ReleaseOnExit unblock(gate);
    auto ready = pool.apply_async([](int x) { return x; }, 3);
    CHECK(ready.get() == 3);
    auto slow = pool.apply_async(
        [g = gate.rfd()](int x) {
          wait_byte(g);
          return x;
        },
        2);
    auto quick = pool.apply_async([](int x) { return x; }, 1);
    quick.on_result([slow, ready, w = done.wfd()](const int&) mutable {
      auto code = [](auto&& f) {
        try {
          f();
          return 1;
        } catch (const std::logic_error&) {
          return 2;
        } catch (...) {
          return 3;
        }
      };
      write_int(w, code([&] { (void)slow.get(); }));
      write_int(w, code([&] { slow.wait(); }));
      write_int(w, ready.get());  // a result that is ready is fine
    });
    CHECK(done.recv() == 2);
    CHECK(done.recv() == 2);
    CHECK(done.recv() == 3);
    gate.release();
    CHECK(slow.get() == 2);
    CHECK(pool.apply([](int x) { return x; }, 4) == 4);
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// close, join, terminate, destruction

TEMPLATE_TEST_CASE("pool: close then join finishes every submitted task", "[pool]", POOL_TYPES) {
  {
    TestPipe gate;
    TestType pool(2);
    ReleaseOnExit unblock(gate);
    std::vector<procpool::AsyncResult<int>> results;
    for (int i = 0; i < 20; ++i) {
      results.push_back(pool.apply_async(
          [g = gate.rfd()](int x) {
            wait_byte(g);
            return 3 * x;
          },
          i));
    }
    auto m = pool.map_async([](int x) { return x; }, std::views::iota(0, 50), 3);
    pool.close();
    CHECK_FALSE(results.back().ready());  // every task waits for the gate: all were outstanding
    gate.release(20);
    pool.join();
    for (int i = 0; i < 20; ++i) {
      CHECK(results[static_cast<std::size_t>(i)].ready());
      CHECK(results[static_cast<std::size_t>(i)].get() == 3 * i);
    }
    CHECK(m.get() == iota_vector(0, 50));
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: submitting after close or terminate throws PoolNotRunningError, join before either "
    "throws std::logic_error",
    "[pool]", POOL_TYPES) {
  {
    const auto f = [](int x) { return x; };
    const std::vector<int> items{1, 2, 3};
    const std::vector<std::tuple<int>> tuples{{1}, {2}};
    auto check_not_running = [&](auto& pool) {
      CHECK_THROWS_AS(pool.apply(f, 1), procpool::PoolNotRunningError);
      CHECK_THROWS_AS(pool.apply_async(f, 1), procpool::PoolNotRunningError);
      CHECK_THROWS_AS(pool.map(f, items), procpool::PoolNotRunningError);
      CHECK_THROWS_AS(pool.map_async(f, items), procpool::PoolNotRunningError);
      CHECK_THROWS_AS(pool.starmap(f, tuples), procpool::PoolNotRunningError);
      CHECK_THROWS_AS(pool.starmap_async(f, tuples), procpool::PoolNotRunningError);
      CHECK_THROWS_AS(([&] {
                        auto s = pool.imap(f, items);
                        (void)s.next();
                      }()),
                      procpool::PoolNotRunningError);
      CHECK_THROWS_AS(([&] {
                        auto s = pool.imap_unordered(f, items);
                        (void)s.next();
                      }()),
                      procpool::PoolNotRunningError);
    };

    TestType closed(2);
    CHECK_THROWS_AS(closed.join(), std::logic_error);
    CHECK(closed.apply(f, 1) == 1);  // join's refusal changed nothing
    closed.close();
    check_not_running(closed);
    closed.join();
    check_not_running(closed);

    TestType terminated(2);
    terminated.terminate();
    check_not_running(terminated);
    terminated.join();  // allowed after terminate
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: terminate fails every unfinished result with PoolTerminatedError",
                   "[pool]", POOL_TYPES) {
  {
    TestPipe started, gate;
    TestType pool(2);
    ReleaseOnExit unblock(gate);
    std::vector<procpool::AsyncResult<int>> results;
    for (int i = 0; i < 2 * static_cast<int>(pool.size()) + 2; ++i) {
      results.push_back(pool.apply_async(
          [s = started.wfd(), g = gate.rfd()](int x) {
            write_int(s, x);
            wait_byte(g);
            return x;
          },
          i));
    }
    auto m = pool.map_async(
        [g = gate.rfd()](int x) {
          wait_byte(g);
          return x;
        },
        std::views::iota(0, 10));
    for (std::size_t i = 0; i < pool.size(); ++i) (void)started.recv();  // some are running

    // From another thread: a ThreadPool's terminate waits for the running tasks (a thread cannot
    // be stopped), but fails their results at once.
    std::thread terminator([&] { pool.terminate(); });
    for (auto& r : results) CHECK(r.wait(watchdog));
    CHECK(m.wait(watchdog));
    gate.release(64);  // lets a ThreadPool's running tasks end; a Pool's were killed
    terminator.join();

    for (auto& r : results) {
      CHECK_FALSE(r.successful());
      CHECK_THROWS_AS(r.get(), procpool::PoolTerminatedError);
    }
    CHECK_THROWS_AS(m.get(), procpool::PoolTerminatedError);
    CHECK_THROWS_AS(pool.apply_async([](int x) { return x; }, 1), procpool::PoolNotRunningError);
    pool.terminate();  // again: nothing happens
    pool.join();
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE("pool: the destructor waits for running and queued tasks to finish", "[pool]",
                   POOL_TYPES) {
  {
    TestPipe started, gate, finished, destroying;
    std::vector<procpool::AsyncResult<int>> results;  // outlive the pool
    std::thread releaser;
    {
      TestType pool(2);
      for (int i = 0; i < 6; ++i) {
        results.push_back(pool.apply_async(
            [s = started.wfd(), g = gate.rfd(), f = finished.wfd()](int x) {
              write_int(s, x);
              wait_byte(g);
              write_int(f, x);
              return x + 100;
            },
            i));
      }
      for (std::size_t i = 0; i < pool.size(); ++i) (void)started.recv();
      // Released only once the pool is being destroyed (or so nearly that the tasks still wait).
      releaser = std::thread([&] {
        try {
          (void)destroying.recv();
        } catch (...) {
        }
        gate.release(6);
      });
      destroying.send(1);
    }  // ~Pool: close() + join()
    releaser.join();
    for (int i = 0; i < 6; ++i) {
      CHECK(results[static_cast<std::size_t>(i)].ready());
      CHECK(results[static_cast<std::size_t>(i)].get() == i + 100);
    }
    auto ends = finished.drain();
    std::sort(ends.begin(), ends.end());
    CHECK(ends == iota_vector(0, 6));
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Exceptions

TEMPLATE_TEST_CASE(
    "pool: the standard exception types come back as the same type with the same message", "[pool]",
    POOL_TYPES) {
  {
    TestType pool(2);
    check_rethrown_as_itself<std::runtime_error>(pool);
    check_rethrown_as_itself<std::logic_error>(pool);
    check_rethrown_as_itself<std::invalid_argument>(pool);
    check_rethrown_as_itself<std::out_of_range>(pool);
    check_rethrown_as_itself<std::domain_error>(pool);
    check_rethrown_as_itself<std::length_error>(pool);
    check_rethrown_as_itself<std::range_error>(pool);
    check_rethrown_as_itself<std::overflow_error>(pool);
    check_rethrown_as_itself<std::underflow_error>(pool);
    check_rethrown_as_itself<std::bad_alloc>(pool);

    // map rethrows the failure of the lowest-indexed failed item.
    CHECK_THROWS_MATCHES(pool.map(
                             [](int i) -> int {
                               if (i == 7) throw std::out_of_range("seven");
                               if (i == 3) throw std::domain_error("three");
                               return i;
                             },
                             std::views::iota(0, 10), 1),
                         std::domain_error, Catch::Message("three"));
    CHECK(pool.apply([](int x) { return x; }, 1) == 1);
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: other exception types arrive as RemoteError naming the type in a Pool, as themselves in "
    "a ThreadPool",
    "[pool]", POOL_TYPES) {
  {
    TestType pool(2);
    auto outcome = [&](auto task) -> std::pair<std::string, std::string> {
      try {
        (void)pool.apply(task, 0);
      } catch (const procpool::RemoteError& e) {
        return {"RemoteError " + e.type_name(), e.what()};
      } catch (const std::system_error& e) {
        return {"std::system_error", e.what()};
      } catch (const CustomError& e) {
        return {"pool_test::CustomError", e.what()};
      } catch (const NotAnException& e) {
        return {"pool_test::NotAnException", std::to_string(e.code)};
      } catch (int e) {
        return {"int", std::to_string(e)};
      } catch (...) {
        return {"something else", ""};
      }
      return {"nothing", ""};
    };
    const std::string system_what =
        std::system_error(ENOENT, std::generic_category(), "opening").what();
    auto system = outcome(
        [](int) -> int { throw std::system_error(ENOENT, std::generic_category(), "opening"); });
    auto custom = outcome([](int) -> int { throw CustomError(); });
    auto plain = outcome([](int) -> int { throw NotAnException{5}; });
    auto number = outcome([](int) -> int { throw 42; });
    if constexpr (runs_in_processes<TestType>) {
      CHECK(system.first == "RemoteError std::system_error");
      CHECK(system.second == system_what);
      CHECK(custom.first == "RemoteError pool_test::CustomError");
      CHECK(custom.second == "a custom failure");
      CHECK(plain.first == "RemoteError pool_test::NotAnException");
      CHECK(number.first == "RemoteError int");
      CHECK_THAT(number.second, Catch::Contains("int"));
      // RemoteError is a procpool::Error.
      CHECK_THROWS_AS(pool.apply([](int) -> int { throw 1.5; }, 0), procpool::Error);
    } else {
      CHECK(system == std::pair<std::string, std::string>{"std::system_error", system_what});
      CHECK(custom ==
            std::pair<std::string, std::string>{"pool_test::CustomError", "a custom failure"});
      CHECK(plain == std::pair<std::string, std::string>{"pool_test::NotAnException", "5"});
      CHECK(number == std::pair<std::string, std::string>{"int", "42"});
    }
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Callables

TEMPLATE_TEST_CASE(
    "pool: lambdas with trivially copyable captures, references to earlier data, function pointers "
    "and serializable function objects all run",
    "[pool]", POOL_TYPES) {
  {
    const std::vector<std::string> words{"alpha", "beta", "gamma",
                                         std::string(100, 'x')};  // before the pool
    TestType pool(2);

    const int k = 3;
    const double scale = 0.5;
    const std::array<int, 3> arr{1, 2, 3};
    const Point p{4, 5};
    CHECK(pool.apply([k, scale, arr, p](int x) { return (x * k + arr[2] + p.x * p.y) * scale; },
                     2) == (2 * 3 + 3 + 20) * 0.5);
    CHECK(pool.map([k, p](int x) { return x * k + p.y; }, std::views::iota(0, 5)) ==
          std::vector<int>{5, 8, 11, 14, 17});

    CHECK(pool.apply([&words](std::size_t i) { return words[i]; }, std::size_t{1}) == "beta");
    CHECK(pool.map([&words](std::size_t i) { return words[i]; },
                   std::views::iota(std::size_t{0}, words.size())) == words);

    CHECK(pool.apply(&triple, 14L) == 42);
    CHECK(pool.apply(triple, 5L) == 15);
    CHECK(pool.map(&triple, std::views::iota(0L, 4L)) == std::vector<long>{0, 3, 6, 9});

    CHECK(pool.apply(Greeter{"hello"}, std::string("world")) == "hello, world");
    CHECK(pool.map(Greeter{std::string(50, 'h')}, std::vector<std::string>{"a", "b"}, 1) ==
          std::vector<std::string>{std::string(50, 'h') + ", a", std::string(50, 'h') + ", b"});
    std::vector<std::string> greeted;
    for (auto& s : pool.imap(Greeter{"hi"}, std::vector<std::string>{"x", "y"}))
      greeted.push_back(s);
    CHECK(greeted == std::vector<std::string>{"hi, x", "hi, y"});
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// ResultStream

static_assert(std::ranges::input_range<procpool::ResultStream<int>>);
static_assert(std::ranges::input_range<procpool::ResultStream<std::string>>);

TEMPLATE_TEST_CASE(
    "pool: a ResultStream is an input range whose next() ends with nullopt and waits with a "
    "timeout",
    "[pool]", POOL_TYPES) {
  {
    TestPipe gate;
    TestType pool(2);
    ReleaseOnExit unblock(gate);

    std::vector<int> got;
    for (int v : pool.imap([](int x) { return x + 1; }, std::views::iota(0, 5))) got.push_back(v);
    CHECK(got == iota_vector(1, 6));
    auto stream = pool.imap([](int x) { return x; }, std::views::iota(0, 2));
    static_assert(std::is_same_v<decltype(stream.next()), std::optional<int>>);
    CHECK(stream.next() == 0);
    CHECK(stream.next() == 1);
    CHECK_FALSE(stream.next());
    CHECK_FALSE(stream.next());  // stays at the end

    auto waiting = pool.imap(
        [g = gate.rfd()](int x) {
          if (x == 0) wait_byte(g);
          return x;
        },
        std::views::iota(0, 3));
    CHECK_THROWS_AS(waiting.next(20ms), procpool::TimeoutError);  // item 0 waits for the gate
    CHECK_THROWS_AS(waiting.next(0ms), procpool::TimeoutError);
    gate.release();
    CHECK(waiting.next() == 0);  // nothing was lost
    CHECK(waiting.next(watchdog) == 1);
    CHECK(waiting.next() == 2);
    CHECK_FALSE(waiting.next(watchdog));
  }
  CHECK(no_child_processes());
}

TEMPLATE_TEST_CASE(
    "pool: a ResultStream rethrows a failed item at its position and goes on with the next",
    "[pool]", POOL_TYPES) {
  {
    TestType pool(2);
    const auto fail_at_3 = [](int x) {
      if (x == 3) throw std::runtime_error("item 3 failed");
      return x;
    };
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{4}}) {
      INFO("chunksize " << chunksize);
      auto stream = pool.imap(fail_at_3, std::views::iota(0, 8), chunksize);
      std::vector<int> got;
      for (int i = 0; i < 3; ++i) got.push_back(stream.next().value());
      CHECK_THROWS_MATCHES(stream.next(), std::runtime_error, Catch::Message("item 3 failed"));
      while (auto v = stream.next()) got.push_back(*v);
      CHECK(got == std::vector<int>{0, 1, 2, 4, 5, 6, 7});

      // The same through iterators: *it throws at that item, ++it goes on.
      auto iterated = pool.imap(fail_at_3, std::views::iota(0, 8), chunksize);
      got.clear();
      std::vector<int> failed_after;
      for (auto it = iterated.begin(); it != iterated.end(); ++it) {
        try {
          got.push_back(*it);
        } catch (const std::runtime_error&) {
          failed_after.push_back(static_cast<int>(got.size()));
        }
      }
      CHECK(got == std::vector<int>{0, 1, 2, 4, 5, 6, 7});
      CHECK(failed_after == std::vector<int>{3});

      auto unordered = pool.imap_unordered(fail_at_3, std::views::iota(0, 8), chunksize);
      got.clear();
      int errors = 0;
      for (;;) {
        try {
          auto v = unordered.next();
          if (!v) break;
          got.push_back(*v);
        } catch (const std::runtime_error&) {
          ++errors;
        }
      }
      std::sort(got.begin(), got.end());
      CHECK(got == std::vector<int>{0, 1, 2, 4, 5, 6, 7});
      CHECK(errors == 1);
    }
  }
  CHECK(no_child_processes());
}

// ==============================================================================================
// Process-specific behaviour

TEST_CASE("pool: tasks run in worker processes, only size() of them when none dies", "[pool]") {
  {
    TestPipe started, gate;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate);
    CHECK(pool.size() == 2);
    auto pids =
        pool.map([](int) { return static_cast<int>(::getpid()); }, std::views::iota(0, 200), 1);
    std::set<int> distinct(pids.begin(), pids.end());
    CHECK(distinct.count(static_cast<int>(::getpid())) == 0);
    CHECK(distinct.size() <= pool.size());
    // size() tasks at once run in size() different processes, the same ones as before.
    auto at_once = pids_of_simultaneous_tasks(pool, started, gate);
    CHECK(at_once.size() == pool.size());
    distinct.insert(at_once.begin(), at_once.end());
    CHECK(distinct.size() == pool.size());
  }
  {
    procpool::Pool automatic(0);
    CHECK(automatic.size() == procpool::cpu_count());
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: tasks submitted right after the pool is built start on different workers",
          "[pool]") {
  // Regression: dispatch gave the first worker that was ready a second task while the other
  // worker was still starting, so two tasks submitted at once could run one after the other
  // (and two tasks that wait for each other never finished).
  for (int round = 0; round < 20; ++round) {
    INFO("round " << round);
    TestPipe started, gate;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate);
    REQUIRE(pids_of_simultaneous_tasks(pool, started, gate).size() == 2);
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: workers see memory as it was when the pool was built", "[pool]") {
  {
    generation = 1;
    std::vector<std::string> before{"alpha", "beta"};
    procpool::Pool pool(2);
    generation = 2;  // after the fork: the workers still see 1
    before[0] = "changed";
    CHECK(pool.apply([] { return generation; }) == 1);
    CHECK(pool.apply([&before] { return before[0]; }) == "alpha");
    CHECK(pool.apply([](int g) { return g; }, generation) ==
          2);  // what changes travels as an argument
    // A task's own changes stay in its worker.
    (void)pool.map([](int) { return ++generation; }, std::views::iota(0, 10), 1);
    CHECK(generation == 2);
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: the initializer runs once in each worker, before its tasks", "[pool]") {
  {
    TestPipe inits, started, gate;
    std::set<int> task_pids;
    {
      procpool::Pool pool(procpool::PoolOptions{.processes = 2, .initializer = [w = inits.wfd()] {
                                                  initialized_in = ::getpid();
                                                  write_int(w, static_cast<int>(::getpid()));
                                                }});
      ReleaseOnExit unblock(gate);
      auto seen = pool.map(
          [](int) { return std::pair<int, bool>(::getpid(), initialized_in == ::getpid()); },
          std::views::iota(0, 50), 1);
      for (auto& [pid, initialized] : seen) {
        task_pids.insert(pid);
        CHECK(initialized);
      }
      auto at_once = pids_of_simultaneous_tasks(pool, started, gate);
      task_pids.insert(at_once.begin(), at_once.end());
      pool.close();
      pool.join();
    }
    // Every worker has exited: every initializer's report is in the pipe.
    auto init_pids = inits.drain();
    std::set<int> distinct(init_pids.begin(), init_pids.end());
    CHECK(init_pids.size() == 2);  // no worker died: one run per worker
    CHECK(distinct.size() == 2);
    CHECK(task_pids.size() == 2);
    for (int pid : task_pids) CHECK(distinct.count(pid) == 1);
    CHECK(initialized_in == 0);  // it never ran in this process
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: max_tasks_per_child replaces workers and every result still arrives", "[pool]") {
  {
    TestPipe inits;
    std::vector<std::pair<int, int>> outcomes;
    {
      procpool::Pool pool(procpool::PoolOptions{
          .processes = 2,
          .initializer = [w = inits.wfd()] { write_int(w, static_cast<int>(::getpid())); },
          .max_tasks_per_child = 2,
      });
      std::vector<procpool::AsyncResult<std::pair<int, int>>> results;
      for (int i = 0; i < 20; ++i) {
        results.push_back(
            pool.apply_async([](int x) { return std::pair<int, int>(x, ::getpid()); }, i));
      }
      for (auto& r : results) outcomes.push_back(r.get());
      auto mapped = pool.map([](int x) { return x * 2; }, std::views::iota(0, 30), 1);
      CHECK(mapped == [] {
        std::vector<int> v;
        for (int i = 0; i < 30; ++i) v.push_back(2 * i);
        return v;
      }());
      pool.close();
      pool.join();
    }
    std::map<int, int> tasks_per_pid;
    for (int i = 0; i < 20; ++i) {
      CHECK(outcomes[static_cast<std::size_t>(i)].first == i);
      ++tasks_per_pid[outcomes[static_cast<std::size_t>(i)].second];
    }
    CHECK(tasks_per_pid.size() >= 10);  // at most 2 tasks per worker: more pids than workers
    for (auto& [pid, count] : tasks_per_pid) CHECK(count <= 2);
    auto init_pids = inits.drain();
    std::set<int> initialized(init_pids.begin(), init_pids.end());
    CHECK(initialized.size() == init_pids.size());  // once per worker
    for (auto& [pid, count] : tasks_per_pid) CHECK(initialized.count(pid) == 1);
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: a worker killed by a signal fails only its own task with WorkerLostError",
          "[pool]") {
  {
    TestPipe started, gate, started2, gate2;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate, gate2);
    auto victim = pool.apply_async(
        [s = started.wfd(), g = gate.rfd()](int) {
          write_int(s, static_cast<int>(::getpid()));
          wait_byte(g);  // never released: the worker is killed first
          return -1;
        },
        0);
    const pid_t pid = started.recv();
    std::vector<procpool::AsyncResult<int>> others;  // some queue behind the victim
    for (int i = 0; i < 20; ++i) others.push_back(pool.apply_async([](int x) { return 2 * x; }, i));
    REQUIRE(::kill(pid, SIGKILL) == 0);

    std::optional<procpool::WorkerLostError> lost;
    try {
      (void)victim.get();
    } catch (const procpool::WorkerLostError& e) {
      lost = e;
    }
    REQUIRE(lost);
    CHECK(lost->pid() == pid);
    CHECK(lost->signal() == SIGKILL);
    CHECK_FALSE(lost->exit_status());
    CHECK_THAT(lost->what(), Catch::Contains("worker " + std::to_string(pid) +
                                             " died: killed by signal 9 (SIGKILL)"));
    CHECK_THROWS_AS(victim.get(), procpool::Error);  // it is a procpool::Error

    for (int i = 0; i < 20; ++i) CHECK(others[static_cast<std::size_t>(i)].get() == 2 * i);
    auto pids = pids_of_simultaneous_tasks(pool, started2, gate2);
    CHECK(pids.size() == pool.size());  // replaced
    CHECK(pids.count(pid) == 0);
    CHECK(process_is_gone(pid));
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: a task that calls _exit fails with WorkerLostError carrying the exit status",
          "[pool]") {
  {
    TestPipe started, gate;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate);
    std::vector<procpool::AsyncResult<int>> before, after;
    for (int i = 0; i < 10; ++i) before.push_back(pool.apply_async([](int x) { return x; }, i));
    auto dying = pool.apply_async([](int code) -> int { ::_exit(code); }, 3);
    for (int i = 0; i < 10; ++i) after.push_back(pool.apply_async([](int x) { return x; }, i));

    std::optional<procpool::WorkerLostError> lost;
    try {
      (void)dying.get();
    } catch (const procpool::WorkerLostError& e) {
      lost = e;
    }
    REQUIRE(lost);
    CHECK(lost->exit_status() == 3);
    CHECK_FALSE(lost->signal());
    CHECK(lost->pid() > 0);
    CHECK_THAT(lost->what(), Catch::Contains("worker " + std::to_string(lost->pid()) +
                                             " died: exited with status 3"));
    for (int i = 0; i < 10; ++i) {
      CHECK(before[static_cast<std::size_t>(i)].get() == i);
      CHECK(after[static_cast<std::size_t>(i)].get() == i);
    }
    auto pids = pids_of_simultaneous_tasks(pool, started, gate);
    CHECK(pids.size() == pool.size());
    CHECK(pids.count(lost->pid()) == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: cancel of a running task kills its worker, which is replaced", "[pool]") {
  {
    TestPipe started, gate, started2, gate2;
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate, gate2);
    auto running = pool.apply_async(
        [s = started.wfd(), g = gate.rfd()](int) {
          write_int(s, static_cast<int>(::getpid()));
          wait_byte(g);  // never released: the cancel kills the worker
          return 1;
        },
        0);
    const pid_t pid = started.recv();
    CHECK(running.cancel());
    CHECK(running.ready());
    CHECK_THROWS_AS(running.get(), procpool::CancelledError);
    CHECK(wait_until_gone(pid));
    CHECK_FALSE(running.cancel());

    auto pids = pids_of_simultaneous_tasks(pool, started2, gate2);
    CHECK(pids.size() == pool.size());
    CHECK(pids.count(pid) == 0);
    CHECK(pool.map([](int x) { return x; }, std::views::iota(0, 100)) == iota_vector(0, 100));
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: terminate returns promptly and reaps every worker even while tasks block forever",
          "[pool]") {
  {
    TestPipe started, gate;  // nothing releases the gate, unless terminate hangs
    procpool::Pool pool(2);
    ReleaseOnExit unblock(gate);  // only matters if the test fails before terminate()
    std::vector<procpool::AsyncResult<int>> results;
    for (int i = 0; i < 6; ++i) {
      results.push_back(pool.apply_async(
          [s = started.wfd(), g = gate.rfd()](int) {
            write_int(s, static_cast<int>(::getpid()));
            wait_byte(g);
            return 0;
          },
          i));
    }
    std::set<int> pids;
    for (std::size_t i = 0; i < pool.size(); ++i) pids.insert(started.recv());

    GateWatchdog dog(gate, 10s);
    const auto start = Clock::now();
    pool.terminate();
    const auto took = Clock::now() - start;
    CHECK_FALSE(dog.cancel());
    CHECK(took < 10s);
    for (auto& r : results) {
      CHECK(r.ready());
      CHECK_THROWS_AS(r.get(), procpool::PoolTerminatedError);
    }
    for (int pid : pids)
      CHECK(process_is_gone(pid));  // killed and reaped before terminate returned
    CHECK(no_child_processes());    // the fork server too
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool: terminate while workers are sending results reports no corrupt message",
          "[pool]") {
  // Regression: terminate() dropped the chunks in flight before the workers were killed, so
  // results a worker still sent in between were taken for a protocol error, and "a worker sent
  // a corrupt message ... killing it" went to stderr.
  std::string text;
  {
    StderrCapture capture;
    for (int round = 0; round < 20; ++round) {
      TestPipe started;
      procpool::Pool pool(2);
      auto busy = pool.map_async(
          [s = started.wfd()](int x) {
            if (x == 0) write_int(s, x);
            return x;
          },
          std::views::iota(0, 20000), 1);
      (void)started.recv();  // the workers are running chunks and sending results
      pool.terminate();
      CHECK_THROWS_AS(busy.get(), procpool::PoolTerminatedError);
    }
    text = capture.stop();
  }
  CHECK(text.find("corrupt") == std::string::npos);
  CHECK(text == "");
  CHECK(no_child_processes());
}

TEST_CASE("pool: building and destroying pools leaks no descriptor and no child process",
          "[pool]") {
  {
    procpool::Pool warm_up(1);  // process-wide state made once
    CHECK(warm_up.apply([](int x) { return x; }, 1) == 1);
  }
  const std::size_t before = open_fd_count();
  for (int i = 0; i < 50; ++i) {
    procpool::Pool pool(2);
    CHECK(pool.apply([](int x) { return x + 1; }, i) == i + 1);
  }
  for (int i = 0; i < 5; ++i) {
    procpool::Pool pool(2);
    (void)pool.apply_async([](int x) { return x; }, i);
    pool.terminate();
  }
  CHECK(open_fd_count() == before);
  CHECK(no_child_processes());
}
