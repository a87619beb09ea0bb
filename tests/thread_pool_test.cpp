#include <procpool/thread_pool.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

// What is particular to ThreadPool. The behaviours it shares with Pool (ordering, chunking,
// laziness, errors, close/join) are tested once for both, elsewhere.
//
// Tasks that must be running or queued at a given moment block on a Gate that the test opens;
// every wait on another thread has a watchdog timeout. A Gate a task may be blocked on is
// opened by an OpenOnExit declared after the pool, so that a failing REQUIRE cannot leave the
// pool's destructor waiting for that task forever.

namespace {

using namespace std::chrono_literals;
constexpr auto watchdog = 20s;

class Gate {
 public:
  // Notifies under the lock: a waiter may destroy the Gate as soon as it sees it open.
  void open() {
    std::lock_guard lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return open_; });
  }
  bool wait_for(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return open_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

struct OpenOnExit {
  std::shared_ptr<Gate> gate;
  ~OpenOnExit() { gate->open(); }
};

class Counter {
 public:
  void add() {
    std::lock_guard lock(mutex_);
    ++n_;
    cv_.notify_all();
  }
  bool wait_for_at_least(int n, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return n_ >= n; });
  }
  int value() {
    std::lock_guard lock(mutex_);
    return n_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int n_ = 0;
};

// Redirects this process's stderr (fd 2) to a temporary file while it lives.
class StderrCapture {
 public:
  StderrCapture() : file_(std::tmpfile()) {
    REQUIRE(file_ != nullptr);
    std::fflush(stderr);
    saved_ = ::dup(STDERR_FILENO);
    REQUIRE(saved_ >= 0);
    REQUIRE(::dup2(::fileno(file_), STDERR_FILENO) >= 0);
  }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;
  ~StderrCapture() {
    restore();
    std::fclose(file_);
  }
  std::string text() {
    restore();
    std::string s;
    std::rewind(file_);
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, file_)) > 0) s.append(buf, n);
    return s;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
    saved_ = -1;
  }
  std::FILE* file_;
  int saved_ = -1;
};

// Neither Serializable nor default-constructible nor copyable.
class Unsendable {
 public:
  explicit Unsendable(std::string s) : s_(std::make_unique<std::string>(std::move(s))) {}
  const std::string& text() const { return *s_; }

 private:
  std::unique_ptr<std::string> s_;
};

struct NotAnException {
  int code;
};

struct InitFailed {
  std::string why;
};

procpool::PoolOptions options(std::size_t threads, std::function<void()> initializer = {}) {
  procpool::PoolOptions o;
  o.processes = threads;
  o.initializer = std::move(initializer);
  return o;
}

}  // namespace

TEST_CASE("thread_pool: a nonzero task_timeout or max_tasks_per_child is std::invalid_argument") {
  auto with_timeout = [](std::chrono::milliseconds t) {
    auto o = options(1);
    o.task_timeout = t;
    return o;
  };
  CHECK_THROWS_AS(procpool::ThreadPool(with_timeout(100ms)), std::invalid_argument);
  CHECK_THROWS_AS(procpool::ThreadPool(with_timeout(-1ms)), std::invalid_argument);
  auto recycled = options(1);
  recycled.max_tasks_per_child = 3;
  CHECK_THROWS_AS(procpool::ThreadPool(recycled), std::invalid_argument);
  procpool::ThreadPool ok(options(1));
  CHECK(ok.apply([] { return 1; }) == 1);
}

TEST_CASE("thread_pool: zero threads means cpu_count()") {
  procpool::ThreadPool a(0);
  procpool::ThreadPool b;
  procpool::ThreadPool c(procpool::PoolOptions{});
  CHECK(a.size() == procpool::cpu_count());
  CHECK(b.size() == procpool::cpu_count());
  CHECK(c.size() == procpool::cpu_count());
  procpool::ThreadPool three(3);
  CHECK(three.size() == 3);
}

TEST_CASE("thread_pool: callables, arguments and results need not be Serializable") {
  std::atomic<int> calls{0};
  Counter done;
  std::string from_callback;
  procpool::ThreadPool pool(2);

  std::function<std::string(const std::string&, int)> repeat = [](const std::string& s, int n) {
    std::string r;
    for (int i = 0; i < n; ++i) r += s;
    return r;
  };
  CHECK(pool.apply(repeat, std::string("ab"), 3) == "ababab");

  // A capture that owns memory, a move-only argument, a move-only result.
  std::vector<std::string> words{"zero", "one", "two"};
  auto r = pool.apply(
      [words](std::unique_ptr<int> i) { return std::make_unique<std::string>(words[*i]); },
      std::make_unique<int>(2));
  REQUIRE(r);
  CHECK(*r == "two");

  // A result neither default-constructible nor copyable, from apply, map and imap.
  CHECK(pool.apply([](std::string s) { return Unsendable(s + "!"); }, "hi").text() == "hi!");
  auto many = pool.map([](int i) { return Unsendable(std::to_string(i)); },
                       std::vector<int>{1, 2, 3}, 1);
  REQUIRE(many.size() == 3);
  CHECK(many[2].text() == "3");
  auto stream = pool.imap([](int i) { return Unsendable(std::to_string(i * 10)); },
                          std::vector<int>{1, 2});
  std::vector<std::string> seen;
  for (auto& u : stream) seen.push_back(u.text());
  CHECK(seen == std::vector<std::string>{"10", "20"});

  // Move-only items, made on the fly; a std::function over them.
  std::function<int(std::unique_ptr<int>)> deref = [](std::unique_ptr<int> p) { return *p; };
  auto values = pool.map(deref, std::views::iota(0, 5) | std::views::transform([](int i) {
                                  return std::make_unique<int>(i * i);
                                }));
  CHECK(values == std::vector<int>{0, 1, 4, 9, 16});

  // starmap over tuples of anything.
  std::vector<std::tuple<std::string, std::vector<int>>> rows{{"a", {1, 2}}, {"b", {3}}};
  auto sums = pool.starmap(
      [](std::string name, std::vector<int> v) {
        int s = 0;
        for (int x : v) s += x;
        return name + std::to_string(s);
      },
      rows);
  CHECK(sums == std::vector<std::string>{"a3", "b3"});

  // A reference result is returned as a copy; a capture by reference sees the caller's data.
  static const std::string greeting = "hello";
  std::string got = pool.apply([]() -> const std::string& { return greeting; });
  CHECK(got == "hello");
  pool.map([&calls](int) { ++calls; }, std::vector<int>(10, 0));
  CHECK(calls == 10);

  // A move-only result through apply_async: read in a callback.
  auto moved = pool.apply_async([] { return std::make_unique<std::string>("cb"); });
  moved.on_result([&](const std::unique_ptr<std::string>& p) {
        from_callback = *p;
        done.add();
      });
  REQUIRE(done.wait_for_at_least(1, watchdog));
  CHECK(from_callback == "cb");
}

TEST_CASE("thread_pool: arguments are copied when the task is submitted") {
  procpool::ThreadPool pool(1);
  auto release = std::make_shared<Gate>();
  OpenOnExit opener{release};
  auto blocker = pool.apply_async([release] { release->wait(); });
  std::string s = "before";
  std::vector<int> v{1, 2, 3};
  auto r = pool.apply_async([](const std::string& a, const std::vector<int>& b) {
    return a + std::to_string(b.size());
  }, s, v);
  auto m = pool.map_async([](const std::string& x) { return x; }, std::vector<std::string>{s});
  s = "after";
  v.clear();
  release->open();
  CHECK(r.get(watchdog) == "before3");
  CHECK(m.get(watchdog) == std::vector<std::string>{"before"});
}

TEST_CASE("thread_pool: a task's exception reaches get() as the very object it threw") {
  std::atomic<const void*> thrown{nullptr};
  procpool::ThreadPool pool(2);
  auto r = pool.apply_async([&thrown] {
    try {
      throw NotAnException{42};
    } catch (NotAnException& e) {
      thrown = &e;
      throw;
    }
  });
  try {
    r.get(watchdog);
    FAIL("get() did not throw");
  } catch (NotAnException& e) {
    CHECK(e.code == 42);
    CHECK(&e == thrown.load());
  }
  // Types a Pool would turn into RemoteError keep their own type here.
  CHECK_THROWS_AS(pool.apply([] { throw std::system_error(EPERM, std::generic_category()); }),
                  std::system_error);
  CHECK_THROWS_AS(pool.map([](int x) { if (x == 2) throw NotAnException{x}; return x; },
                           std::vector<int>{1, 2, 3}),
                  NotAnException);
}

TEST_CASE("thread_pool: each chunk calls its own copy of a copyable callable") {
  procpool::ThreadPool pool(2);
  // A mutable counter shared by all chunks would count past 1 (and race).
  auto counts = pool.map([n = 0](int) mutable { return ++n; }, std::vector<int>(20, 0), 1);
  CHECK(counts == std::vector<int>(20, 1));
  auto per_chunk = pool.map([n = 0](int) mutable { return ++n; }, std::vector<int>(6, 0), 3);
  CHECK(per_chunk == std::vector<int>{1, 2, 3, 1, 2, 3});
}

TEST_CASE("thread_pool: the initializer runs once in each thread, before its first task") {
  std::mutex m;
  std::set<std::thread::id> init_threads;
  int init_calls = 0;
  Counter arrived;
  procpool::ThreadPool pool(options(3, [&] {
    std::lock_guard lock(m);
    init_threads.insert(std::this_thread::get_id());
    ++init_calls;
  }));
  {
    // The constructor returns once every thread has run it.
    std::lock_guard lock(m);
    CHECK(init_calls == 3);
    CHECK(init_threads.size() == 3);
    CHECK(init_threads.count(std::this_thread::get_id()) == 0);
  }
  // Three tasks that wait for each other run on three different threads.
  auto ids = pool.map(
      [&](int) {
        arrived.add();
        arrived.wait_for_at_least(3, watchdog);
        return std::this_thread::get_id();
      },
      std::vector<int>{0, 0, 0}, 1);
  CHECK(std::set<std::thread::id>(ids.begin(), ids.end()) == init_threads);
  auto more = pool.map([](int) { return std::this_thread::get_id(); }, std::vector<int>(50, 0), 1);
  for (auto id : more) CHECK(init_threads.count(id) == 1);
  std::lock_guard lock(m);
  CHECK(init_calls == 3);
}

TEST_CASE("thread_pool: an initializer that throws is reported and thrown from the constructor") {
  std::atomic<int> calls{0};
  StderrCapture err;
  try {
    procpool::ThreadPool pool(options(3, [&] {
      if (++calls == 2) throw InitFailed{"no database"};
    }));
    FAIL("the constructor did not throw");
  } catch (const InitFailed& e) {
    CHECK(e.why == "no database");
  }
  std::string text = err.text();
  CHECK(calls == 3);  // every thread ran it; none is left behind
  CHECK(text.find("initializer threw") != std::string::npos);
  CHECK(text.find("InitFailed") != std::string::npos);

  StderrCapture err2;
  CHECK_THROWS_AS(procpool::ThreadPool(options(2, [] { throw std::runtime_error("boom"); })),
                  std::runtime_error);
  CHECK(err2.text().find("std::runtime_error: boom") != std::string::npos);
}

TEST_CASE("thread_pool: cancel() stops a queued task, which then never runs") {
  std::atomic<bool> ran{false};
  Counter errors;
  std::exception_ptr seen;
  procpool::ThreadPool pool(1);
  auto release = std::make_shared<Gate>();
  OpenOnExit opener{release};
  auto blocker = pool.apply_async([release] {
    release->wait();
    return 1;
  });
  auto queued = pool.apply_async([&ran] {
    ran = true;
    return 2;
  });
  queued.on_error([&](std::exception_ptr e) {
    seen = e;
    errors.add();
  });
  CHECK(queued.cancel());
  CHECK(queued.ready());
  CHECK_FALSE(queued.successful());
  CHECK_THROWS_AS(queued.get(), procpool::CancelledError);
  CHECK_FALSE(queued.cancel());  // already finished
  REQUIRE(errors.wait_for_at_least(1, watchdog));
  CHECK_THROWS_AS(std::rethrow_exception(seen), procpool::CancelledError);

  release->open();
  CHECK(blocker.get(watchdog) == 1);
  pool.close();
  pool.join();
  CHECK_FALSE(ran);
}

TEST_CASE("thread_pool: cancel() of a running task returns false and the task finishes") {
  procpool::ThreadPool pool(1);
  auto started = std::make_shared<Gate>();
  auto release = std::make_shared<Gate>();
  OpenOnExit opener{release};
  auto running = pool.apply_async([started, release] {
    started->open();
    release->wait();
    return 7;
  });
  REQUIRE(started->wait_for(watchdog));
  CHECK_FALSE(running.cancel());
  CHECK_FALSE(running.ready());
  release->open();
  CHECK(running.get(watchdog) == 7);
  CHECK(running.successful());
}

TEST_CASE("thread_pool: cancel() of a map drops its queued chunks and discards running ones") {
  std::atomic<int> ran{0};
  procpool::ThreadPool pool(1);
  auto started = std::make_shared<Gate>();
  auto release = std::make_shared<Gate>();
  OpenOnExit opener{release};
  auto m = pool.map_async(
      [&ran, started, release](int i) {
        ++ran;
        if (i == 0) {
          started->open();
          release->wait();
        }
        return i;
      },
      std::vector<int>{0, 1, 2, 3, 4}, 1);
  REQUIRE(started->wait_for(watchdog));
  CHECK(m.cancel());
  CHECK(m.ready());
  CHECK_THROWS_AS(m.get(), procpool::CancelledError);
  release->open();
  pool.close();
  pool.join();
  CHECK(ran == 1);  // item 0 ran to its end; items 1-4 never started
}

TEST_CASE("thread_pool: terminate() fails unfinished results at once and lets running tasks end") {
  std::atomic<bool> finished{false}, queued_ran{false}, terminate_returned{false};
  Counter errors;
  procpool::ThreadPool pool(1);
  auto started = std::make_shared<Gate>();
  auto release = std::make_shared<Gate>();
  std::jthread terminator;
  OpenOnExit opener{release};  // destroyed first: then terminator can join, then the pool

  auto running = pool.apply_async([started, release, &finished] {
    started->open();
    release->wait();
    finished = true;
    return 1;
  });
  auto queued = pool.apply_async([&queued_ran] {
    queued_ran = true;
    return 2;
  });
  auto mapped = pool.map_async([](int x) { return x; }, std::vector<int>{1, 2, 3});
  auto stream = pool.imap([](int x) { return x; }, std::vector<int>{1, 2, 3});
  running.on_error([&](std::exception_ptr) { errors.add(); });
  queued.on_error([&](std::exception_ptr) { errors.add(); });
  REQUIRE(started->wait_for(watchdog));

  terminator = std::jthread([&] {
    pool.terminate();
    terminate_returned = true;
  });
  // Every result fails while the running task is still blocked.
  REQUIRE(running.wait(watchdog));
  REQUIRE(queued.wait(watchdog));
  REQUIRE(mapped.wait(watchdog));
  CHECK_THROWS_AS(running.get(), procpool::PoolTerminatedError);
  CHECK_THROWS_AS(queued.get(), procpool::PoolTerminatedError);
  CHECK_THROWS_AS(mapped.get(), procpool::PoolTerminatedError);
  CHECK(errors.wait_for_at_least(2, watchdog));  // on_error callbacks still run
  CHECK_THROWS_AS(pool.apply_async([] { return 0; }), procpool::PoolNotRunningError);
  CHECK_THROWS_AS(pool.map([](int x) { return x; }, std::vector<int>{1}),
                  procpool::PoolNotRunningError);
  CHECK_FALSE(terminate_returned);  // it waits for the running task
  CHECK_FALSE(finished);

  release->open();
  terminator.join();
  CHECK(terminate_returned);
  CHECK(finished);  // terminate() returned only after the running task ended
  CHECK_FALSE(queued_ran);
  CHECK_THROWS_AS(running.get(), procpool::PoolTerminatedError);  // its late value is dropped
  // The stream's items failed; it then ends with the error of a pool that no longer runs.
  int failures = 0;
  for (;;) {
    try {
      if (!stream.next(watchdog)) break;
    } catch (const procpool::PoolTerminatedError&) {
      ++failures;
    } catch (const procpool::PoolNotRunningError&) {
      ++failures;
    }
  }
  CHECK(failures >= 1);
  pool.join();      // allowed after terminate()
  pool.terminate();  // idempotent
}

TEST_CASE("thread_pool: callbacks run on one pool thread, one at a time, even after ready") {
  std::mutex m;
  std::set<std::thread::id> callback_threads, task_threads;
  std::atomic<bool> in_callback{false};
  std::atomic<int> overlaps{0};
  Counter done;
  procpool::ThreadPool pool(4);
  auto callback_body = [&] {
    if (in_callback.exchange(true)) ++overlaps;
    {
      std::lock_guard lock(m);
      callback_threads.insert(std::this_thread::get_id());
    }
    for (int i = 0; i < 50; ++i) std::this_thread::yield();  // widens any overlap window
    in_callback = false;
    done.add();
  };
  auto task = [&](int i) {
    {
      std::lock_guard lock(m);
      task_threads.insert(std::this_thread::get_id());
    }
    if (i % 3 == 0) throw std::runtime_error("odd one out");
    return i;
  };

  constexpr int n = 120;
  std::vector<procpool::AsyncResult<int>> results;
  for (int i = 0; i < n; ++i) {
    results.push_back(pool.apply_async(task, i));
    results.back().on_result([&](int) { callback_body(); });
    results.back().on_error([&](std::exception_ptr) { callback_body(); });
  }
  auto whole = pool.map_async([](int x) { return x; }, std::vector<int>(40, 1));
  whole.on_result([&](const std::vector<int>&) { callback_body(); });
  REQUIRE(done.wait_for_at_least(n + 1, watchdog));

  // Registered after ready: still on the callback thread, never on the registering one.
  for (auto& r : results) r.wait();
  for (int i = 0; i < 10; ++i) {
    results[static_cast<std::size_t>(i)].on_result([&](int) { callback_body(); });
    results[static_cast<std::size_t>(i)].on_error([&](std::exception_ptr) { callback_body(); });
  }
  REQUIRE(done.wait_for_at_least(n + 11, watchdog));

  std::lock_guard lock(m);
  CHECK(overlaps == 0);
  CHECK(callback_threads.size() == 1);
  CHECK(callback_threads.count(std::this_thread::get_id()) == 0);
  for (auto id : callback_threads) CHECK(task_threads.count(id) == 0);
}

TEST_CASE("thread_pool: a callback on a result that was not kept still runs") {
  Counter done;
  std::atomic<int> sum{0};
  procpool::ThreadPool pool(2);
  auto release = std::make_shared<Gate>();
  OpenOnExit opener{release};
  // Python's `pool.apply_async(f, callback=cb)`: the AsyncResult is a temporary, gone before
  // the task ends (it waits for the release) and long before the callback runs.
  for (int i = 1; i <= 10; ++i) {
    pool.apply_async([release](int x) {
          release->wait();
          return x;
        }, i)
        .on_result([&](int x) {
          sum += x;
          done.add();
        });
  }
  pool.map_async([release](int x) {
        release->wait();
        return x;
      }, std::vector<int>{100, 200})
      .on_result([&](const std::vector<int>& v) {
        sum += v[0] + v[1];
        done.add();
      });
  pool.apply_async([release] {
        release->wait();
        throw std::runtime_error("x");
      })
      .on_error([&](std::exception_ptr) { done.add(); });
  release->open();
  REQUIRE(done.wait_for_at_least(12, watchdog));
  CHECK(sum == 55 + 300);
}

TEST_CASE("thread_pool: a callback throwing is reported and the next callbacks still run") {
  Counter done;
  std::string text;
  procpool::ThreadPool pool(2);
  {
    StderrCapture err;
    auto r = pool.apply_async([] { return 1; });
    r.on_result([](int) { throw std::runtime_error("callback broke"); });
    r.on_result([&](int) { done.add(); });
    REQUIRE(done.wait_for_at_least(1, watchdog));
    text = err.text();
  }
  CHECK(text.find("callback broke") != std::string::npos);
  CHECK(pool.apply([] { return 2; }) == 2);
}

TEST_CASE("thread_pool: waiting for one of its results inside a callback is std::logic_error") {
  Counter done;
  std::atomic<int> logic_errors{0};
  procpool::ThreadPool pool(2);
  auto release = std::make_shared<Gate>();
  OpenOnExit opener{release};
  auto blocked = pool.apply_async([release] {
    release->wait();
    return 1;
  });
  auto trigger = pool.apply_async([] { return 0; });
  trigger.on_result([&, blocked](int) mutable {
    try {
      blocked.get();
    } catch (const std::logic_error&) {
      ++logic_errors;
    }
    try {
      pool.apply([release] {  // not ready before the release either
        release->wait();
        return 0;
      });
    } catch (const std::logic_error&) {
      ++logic_errors;
    }
    done.add();
  });
  REQUIRE(done.wait_for_at_least(1, watchdog));
  CHECK(logic_errors == 2);
  release->open();
  CHECK(blocked.get(watchdog) == 1);
}

TEST_CASE("thread_pool: join() from one of its own tasks is std::logic_error") {
  procpool::ThreadPool pool(2);
  auto release = std::make_shared<Gate>();
  OpenOnExit opener{release};
  auto r = pool.apply_async([&pool, release] {
    release->wait();
    try {
      pool.join();
    } catch (const std::logic_error& e) {
      return std::string(e.what());
    }
    return std::string("joined");
  });
  pool.close();
  release->open();
  CHECK(r.get(watchdog).find("itself") != std::string::npos);
  pool.join();
}

TEST_CASE("thread_pool: terminate() from one of its own tasks does not wait for itself") {
  procpool::ThreadPool pool(2);
  auto r = pool.apply_async([&pool] {
    pool.terminate();
    return 1;
  });
  REQUIRE(r.wait(watchdog));
  CHECK_THROWS_AS(r.get(), procpool::PoolTerminatedError);
  pool.join();
}

TEST_CASE("thread_pool: a pool destroyed by one of its own tasks finishes its queued work") {
  auto gone = std::make_shared<Gate>();  // opened when the pool's state is finally destroyed
  std::shared_ptr<void> sentinel(nullptr, [gone](void*) { gone->open(); });
  auto go = std::make_shared<Gate>();
  OpenOnExit opener{go};
  auto pool = std::make_unique<procpool::ThreadPool>(
      options(1, [sentinel] {}));
  sentinel.reset();
  std::string text;
  {
    StderrCapture err;
    auto first = pool->apply_async([&pool, go] {
      go->wait();
      pool.reset();  // ~ThreadPool on the pool's own thread
    });
    auto second = pool->apply_async([] { return 5; });
    go->open();
    CHECK(second.get(watchdog) == 5);
    CHECK(first.wait(watchdog));
    REQUIRE(gone->wait_for(watchdog));
    text = err.text();
  }
  CHECK(text.find("destroyed by one of its own tasks") != std::string::npos);
}

TEST_CASE("thread_pool: many threads submit, cancel and wait at once") {
  std::atomic<long> total{0};
  std::atomic<int> cancelled{0};
  procpool::ThreadPool pool(3);
  {
    std::vector<std::jthread> users;
    for (int t = 0; t < 4; ++t) {
      users.emplace_back([&, t] {
        std::vector<procpool::AsyncResult<int>> mine;
        for (int i = 0; i < 50; ++i) {
          mine.push_back(pool.apply_async([](int a, int b) { return a + b; }, t, i));
          if (i % 7 == 0 && mine.back().cancel()) ++cancelled;
        }
        auto m = pool.map([](int x) { return x * 2; }, std::views::iota(0, 100), 7);
        long s = 0;
        for (int x : m) s += x;
        for (auto& r : mine) {
          try {
            s += r.get();
          } catch (const procpool::CancelledError&) {
          }
        }
        for (int x : pool.imap_unordered([](int x) { return x; }, std::views::iota(0, 20), 3)) {
          s += x;
        }
        total += s;
      });
    }
  }
  long per_thread_map = 9900, per_thread_imap = 190;
  CHECK(cancelled <= 4 * 8);
  CHECK(total >= 4 * (per_thread_map + per_thread_imap));
}
