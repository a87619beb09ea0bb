#include <procpool/manager.hpp>

#include <catch2/catch.hpp>

#include "support/interrupt.hpp"
#include "support/manager_raw.hpp"

#include <procpool/connection.hpp>
#include <procpool/pool.hpp>
#include <procpool/process.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <ranges>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <variant>
#include <vector>
#include "support/children.hpp"

using test_support::no_child_processes;
using test_support::KillIfRunning;

// The Manager (issue 6), with real processes, real sockets and real signals.
//
// Children are procpool::Process objects (forks that capture proxies) or pool workers (that get
// proxies as task arguments); they report through their exit code or through the manager
// itself. Where the test must act while a child is in a given state, the child says so on a
// Pipe, or the test waits until the child sleeps in the kernel (parked in the server). Blocking
// manager calls in the test carry generous timeouts, as watchdogs only. Every test ends with no
// child process left, running or zombie: the Manager's server included.

namespace {

using namespace std::chrono_literals;
using procpool::DictProxy;
using procpool::ListProxy;
using procpool::LockProxy;
using procpool::Manager;
using procpool::QueueProxy;
using procpool::ValueProxy;

constexpr auto watchdog = 20s;


// True when no process with this pid exists any more, not even as a zombie.
bool process_is_gone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

bool path_exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

std::string dir_of(const std::string& path) { return path.substr(0, path.rfind('/')); }

// Runs `f` in a child Process and returns its exit code (0: f returned; 1: it threw).
template <class F>
int run_child(F f) {
  procpool::Process p(std::move(f));
  p.start();
  p.join();
  return p.exitcode().value_or(-1000);
}

template <class T>
std::vector<T> sorted(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// An update callable with state that is not trivially copyable: it travels by its serialize
// member.
struct AppendSuffix {
  std::string suffix;
  void operator()(std::string& s) const { s += suffix; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(suffix);
  }
};

int triple(int x) { return 3 * x; }

struct CustomError : std::runtime_error {
  using std::runtime_error::runtime_error;
};


}  // namespace

// ---------------------------------------------------------------------------------------------
// Containers: the list and dict behaviours of CPython's _TestContainers (test_list, test_dict,
// test_list_proxy_in_list, test_dict_proxy_nested), and values, locks and queues.

TEST_CASE("manager: a list holds what it was made from and grows with append") {
  {
    Manager manager;
    auto a = manager.list<int>(std::views::iota(0, 10));
    CHECK(a.snapshot() == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
    CHECK(a.size() == 10);

    auto b = manager.list<int>();
    CHECK(b.snapshot().empty());
    CHECK(b.size() == 0);
    for (int i = 0; i < 5; ++i) b.append(i);  // b.extend(range(5))
    CHECK(b.snapshot() == std::vector<int>{0, 1, 2, 3, 4});
    CHECK(b.get(2) == 2);
    CHECK(b.get(4) == 4);

    b.set(2, 20);
    CHECK(b.snapshot() == std::vector<int>{0, 1, 20, 3, 4});

    a.reverse();
    CHECK(a.snapshot() == std::vector<int>{9, 8, 7, 6, 5, 4, 3, 2, 1, 0});
    auto empty = manager.list<std::string>();
    empty.reverse();
    CHECK(empty.size() == 0);

    // Every copy refers to the one list.
    ListProxy<int> c = b;
    c.append(5);
    CHECK(b.size() == 6);
    CHECK(b.get(5) == 5);

    b.clear();
    CHECK(b.size() == 0);
    CHECK(c.snapshot().empty());

    auto words = manager.list<std::string>(std::vector<std::string>{"a", "bb", "ccc"});
    CHECK(words.snapshot() == std::vector<std::string>{"a", "bb", "ccc"});
    CHECK(words.update(1, [](std::string& s) { s += "!"; }) == "bb!");
    CHECK(words.get(1) == "bb!");
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: list get set and update past the end throw std::out_of_range") {
  {
    Manager manager;
    auto l = manager.list<int>(std::vector<int>{1, 2, 3});
    CHECK_THROWS_AS(l.get(3), std::out_of_range);
    CHECK_THROWS_AS(l.get(1000000), std::out_of_range);
    CHECK_THROWS_AS(l.set(3, 7), std::out_of_range);
    CHECK_THROWS_AS(l.update(3, [](int& x) { ++x; }), std::out_of_range);
    CHECK(l.snapshot() == std::vector<int>{1, 2, 3});  // nothing changed
    auto empty = manager.list<int>();
    CHECK_THROWS_AS(empty.get(0), std::out_of_range);
    CHECK_THROWS_WITH(l.get(5), Catch::Matchers::Contains("past the end"));
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a list of proxies refers to the live lists") {
  {
    Manager manager;
    auto a = manager.list<int>(std::views::iota(0, 10));
    auto b = manager.list<int>();
    auto d = manager.list<ListProxy<int>>(std::vector<ListProxy<int>>{a, b});
    auto e = manager.list<ListProxy<int>>();
    e.append(d.get(0));  // e = [d[0]]
    CHECK(e.get(0).snapshot() == a.snapshot());
    d.get(1).append(7);  // through the stored proxy
    CHECK(b.snapshot() == std::vector<int>{7});
    e.get(0).set(0, 100);
    CHECK(a.get(0) == 100);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a dict maps keys to values as Python's dict does") {
  {
    Manager manager;
    auto d = manager.dict<int, std::string>();
    std::map<int, std::string> expected;
    for (int i = 65; i < 70; ++i) {
      d.set(i, std::string(1, static_cast<char>(i)));
      expected[i] = std::string(1, static_cast<char>(i));
    }
    auto items = d.items();
    CHECK(std::map<int, std::string>(items.begin(), items.end()) == expected);
    CHECK(d.size() == 5);
    CHECK(d.get(65) == "A");
    CHECK(d.get(69) == "E");
    CHECK_THROWS_AS(d.get(70), std::out_of_range);
    CHECK(d.get(70, "none") == "none");
    CHECK(d.get(66, "none") == "B");
    CHECK(d.contains(67));
    CHECK_FALSE(d.contains(70));

    d.set(65, "a");  // overwrite
    CHECK(d.get(65) == "a");
    CHECK(d.size() == 5);

    CHECK(d.erase(65));
    CHECK_FALSE(d.erase(65));
    CHECK_FALSE(d.contains(65));
    CHECK(d.size() == 4);

    DictProxy<int, std::string> copy = d;
    copy.clear();
    CHECK(d.size() == 0);
    CHECK(d.items().empty());

    auto init = manager.dict<std::string, int>({{"one", 1}, {"two", 2}, {"one", 11}});
    CHECK(init.size() == 2);
    CHECK(init.get("one") == 11);  // later pairs win, as in a dict display
    CHECK(init.get("two") == 2);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: dict keys and values may be variants optionals and containers") {
  {
    Manager manager;
    using Key = std::variant<int, std::string, double>;
    using Val = std::optional<std::vector<std::string>>;
    auto d = manager.dict<Key, Val>();
    d.set(Key{1}, Val{{"1"}});
    d.set(Key{std::string("2")}, Val{{"two", "2"}});
    d.set(Key{0.25}, std::nullopt);
    CHECK(d.size() == 3);
    CHECK(d.get(Key{1}) == Val{{"1"}});
    CHECK(d.get(Key{std::string("2")}) == Val{{"two", "2"}});
    CHECK(d.contains(Key{0.25}));
    CHECK_FALSE(d.get(Key{0.25}).has_value());
    CHECK_FALSE(d.contains(Key{2}));                 // not the int 1...
    CHECK_FALSE(d.contains(Key{std::string("1")}));  // ...nor the string "1"
    auto m = manager.dict<std::map<std::string, int>, int>();
    m.set({{"a", 1}, {"b", 2}}, 3);
    CHECK(m.get({{"a", 1}, {"b", 2}}) == 3);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a dict of proxies refers to the live objects") {
  {
    Manager manager;
    auto pets = manager.dict<std::string, int>({{"ferrets", 2}, {"hamsters", 4}});
    auto supplies = manager.dict<std::string, int>({{"water", 10}, {"feed", 3}});
    auto stocks = manager.dict<std::string, DictProxy<std::string, int>>();
    stocks.set("pets", pets);
    stocks.set("supplies", supplies);
    CHECK(stocks.get("pets").get("ferrets") == 2);
    stocks.get("supplies").set("water", 7);
    CHECK(supplies.get("water") == 7);
    pets.clear();
    CHECK(stocks.get("pets").size() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a value can be read, set and updated in place or by return") {
  {
    Manager manager;
    auto v = manager.value(1.5);
    CHECK(v.get() == 1.5);
    v.set(3.25);
    CHECK(v.get() == 3.25);
    CHECK(v.update([](double x) { return x * 2; }) == 6.5);
    CHECK(v.update([](double& x) { x += 1; }) == 7.5);
    CHECK(v.get() == 7.5);

    auto s = manager.value<std::string>("abc");
    CHECK(s.update(AppendSuffix{"def"}) == "abcdef");  // a function object with state
    auto i = manager.value(7);
    CHECK(i.update(&triple) == 21);  // a function pointer
    int k = 5;
    CHECK(i.update([k](int x) { return x + k; }) == 26);  // a capture travels by its bytes
    CHECK(i.get() == 26);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: an update that throws leaves the value unchanged and rethrows") {
  {
    Manager manager;
    auto d = manager.dict<std::string, int>({{"n", 1}});
    CHECK_THROWS_AS(d.update("missing", [](int& x) { ++x; }), std::out_of_range);
    CHECK_FALSE(d.contains("missing"));
    CHECK(d.update("missing", 40, [](int& x) { x += 2; }) == 42);  // starts from the initial value
    CHECK(d.get("missing") == 42);
    CHECK(d.update("n", 100, [](int& x) { x += 2; }) == 3);  // present: the initial is unused

    CHECK_THROWS_MATCHES(d.update("n", [](int&) -> void { throw std::invalid_argument("no way"); }),
                         std::invalid_argument, Catch::Matchers::Message("no way"));
    CHECK(d.get("n") == 3);
    try {
      d.update("n", [](int&) -> void { throw CustomError("custom"); });
      FAIL("update did not throw");
    } catch (const procpool::RemoteError& e) {
      CHECK(e.type_name().find("CustomError") != std::string::npos);
      CHECK(std::string(e.what()) == "custom");
    }
    CHECK(d.get("n") == 3);
    // The manager serves on after a failed update.
    CHECK(d.update("n", [](int x) { return x * 10; }) == 30);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a proxy of the wrong type gets a ProtocolError naming both types") {
  {
    Manager manager;
    auto v = manager.value<std::int32_t>(5);
    // A proxy's bytes re-read as a proxy of another value type: a forgery no program makes by
    // accident, but the codec's fingerprints still catch it.
    auto forged = procpool::decode<ValueProxy<std::uint32_t>>([&] {
      auto frame = procpool::encode(v);
      auto other = procpool::encode(ValueProxy<std::uint32_t>{});
      std::memcpy(frame.data(), other.data(), procpool::detail::fingerprint_size);
      return frame;
    }());
    CHECK_THROWS_WITH(forged.get(),
                      Catch::Matchers::Contains("int") && Catch::Matchers::Contains("unsigned"));
    CHECK(v.get() == 5);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a proxy survives encode and decode and refers to the same object") {
  {
    Manager manager;
    auto d = manager.dict<int, int>();
    auto copy = procpool::decode<DictProxy<int, int>>(procpool::encode(d));
    copy.set(1, 2);
    CHECK(d.get(1) == 2);
    auto q = manager.queue<int>(3);
    auto q2 = procpool::decode<QueueProxy<int>>(procpool::encode(q));
    CHECK(q2.maxsize() == 3);
    q2.put(9);
    CHECK(q.get(watchdog) == 9);
    DictProxy<int, int> nothing;
    CHECK_THROWS_AS(nothing.get(1), std::logic_error);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a lock excludes, and try_lock and acquire with a timeout say so") {
  {
    Manager manager;
    LockProxy lock = manager.lock();
    lock.lock();
    CHECK_FALSE(lock.try_lock());
    auto t0 = std::chrono::steady_clock::now();
    CHECK_FALSE(lock.acquire(50ms));
    CHECK(std::chrono::steady_clock::now() - t0 >= 50ms);
    CHECK_FALSE(lock.acquire(-5s));  // negative means zero
    lock.unlock();
    CHECK(lock.try_lock());
    lock.unlock();
    CHECK_THROWS_AS(lock.unlock(), std::logic_error);  // release of an unlocked lock
    {
      std::scoped_lock guard(lock);
      CHECK_FALSE(lock.try_lock());
    }
    CHECK(lock.acquire(watchdog));
    lock.unlock();
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a queue is FIFO and honours maxsize with Empty and Full") {
  {
    Manager manager;
    auto q = manager.queue<std::string>(3);
    CHECK(q.maxsize() == 3);
    CHECK(q.empty());
    CHECK_FALSE(q.full());
    CHECK_THROWS_AS(q.get_nowait(), procpool::Empty);
    auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(q.get(50ms), procpool::Empty);
    CHECK(std::chrono::steady_clock::now() - t0 >= 50ms);
    q.put("a");
    q.put("b", 1s);
    q.put_nowait("c");
    CHECK(q.full());
    CHECK(q.qsize() == 3);
    CHECK_THROWS_AS(q.put_nowait("d"), procpool::Full);
    CHECK_THROWS_AS(q.put("d", 50ms), procpool::Full);
    CHECK(q.get() == "a");
    CHECK(q.get(1s) == "b");
    CHECK(q.get_nowait() == "c");
    CHECK(q.empty());

    auto unbounded = manager.queue<int>();
    for (int i = 0; i < 1000; ++i) unbounded.put_nowait(i);
    CHECK_FALSE(unbounded.full());
    CHECK(unbounded.qsize() == 1000);
    for (int i = 0; i < 1000; ++i) REQUIRE(unbounded.get_nowait() == i);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: after close this process puts no more while others still can") {
  {
    Manager manager;
    auto q = manager.queue<int>();
    q.put(1);
    QueueProxy<int> other_copy = q;
    q.close();
    CHECK_THROWS_AS(q.put(2), std::logic_error);
    CHECK_THROWS_AS(other_copy.put_nowait(2), std::logic_error);  // "this process", any copy
    CHECK(q.get(watchdog) == 1);                                  // gets still work
    CHECK(run_child([q] { q.put(3); }) == 0);                     // another process may still put
    CHECK(q.get(watchdog) == 3);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Across processes and threads.

TEST_CASE("manager: a dict set in a child is seen by the parent") {
  {
    Manager manager;
    auto d = manager.dict<std::variant<int, std::string, double>,
                          std::variant<std::string, int, std::monostate>>();
    auto l = manager.list<int>(std::views::iota(0, 10));
    int code = run_child([d, l] {
      d.set(1, std::string("1"));
      d.set(std::string("2"), 2);
      d.set(0.25, std::monostate{});
      l.reverse();
    });
    CHECK(code == 0);
    CHECK(d.size() == 3);
    CHECK(std::get<std::string>(d.get(1)) == "1");
    CHECK(std::get<int>(d.get(std::string("2"))) == 2);
    CHECK(std::holds_alternative<std::monostate>(d.get(0.25)));
    CHECK(l.snapshot() == std::vector<int>{9, 8, 7, 6, 5, 4, 3, 2, 1, 0});
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: proxies passed to a Pool created before the Manager work in its workers") {
  {
    procpool::Pool pool(2);
    pool.apply([] { return 0; });  // the workers exist before the Manager does
    Manager manager;
    auto d = manager.dict<int, int>();
    auto l = manager.list<int>();
    auto q = manager.queue<int>();
    auto counter = manager.value(0);

    std::vector<procpool::AsyncResult<pid_t>> results;
    for (int i = 0; i < 20; ++i) {
      results.push_back(pool.apply_async(
          [](DictProxy<int, int> dict, ValueProxy<int> count, int k) {
            dict.set(k, k * k);
            count.update([](int& c) { ++c; });
            return ::getpid();
          },
          d, counter, i));
    }
    std::set<pid_t> pids;
    for (auto& r : results) pids.insert(r.get(watchdog));
    CHECK(d.size() == 20);
    for (int i = 0; i < 20; ++i) CHECK(d.get(i) == i * i);
    CHECK(counter.get() == 20);
    CHECK_FALSE(pids.count(::getpid()));

    std::vector<std::pair<ListProxy<int>, int>> items;
    for (int i = 0; i < 50; ++i) items.emplace_back(l, i);
    auto sums = pool.map(
        [](std::pair<ListProxy<int>, int> item) {
          item.first.append(item.second);
          return item.second;
        },
        items, 5);
    CHECK(sums.size() == 50);
    std::vector<int> expected(50);
    std::iota(expected.begin(), expected.end(), 0);
    CHECK(sorted(l.snapshot()) == expected);

    // Workers block in the server on a queue and are released by the parent.
    auto got = pool.map_async([](QueueProxy<int> in) { return in.get(std::chrono::seconds(20)); },
                              std::vector<QueueProxy<int>>(4, q), 1);
    for (int i = 0; i < 4; ++i) q.put(i);
    CHECK(sorted(got.get(watchdog)) == std::vector<int>{0, 1, 2, 3});
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: proxies work in a Pool created after the Manager") {
  {
    Manager manager;
    auto counts = manager.dict<std::string, int>({{"count", 0}});
    CHECK(counts.get("count") == 0);  // this process holds a connection when the pool forks
    procpool::Pool pool(2);
    pool.map([](DictProxy<std::string, int> d) { d.update("count", [](int& c) { ++c; }); },
             std::vector<DictProxy<std::string, int>>(100, counts), 10);
    CHECK(counts.get("count") == 100);
    auto seen = pool.apply([](DictProxy<std::string, int> d) { return d.get("count"); }, counts);
    CHECK(seen == 100);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: threads of one process use proxies concurrently on separate connections") {
  {
    Manager manager;
    auto v = manager.value(0);
    auto q = manager.queue<int>();
    // One thread parks in the server on an empty queue; the others must not wait behind it.
    std::thread getter([q] {
      try {
        (void)q.get(std::chrono::seconds(20));
      } catch (const procpool::Empty&) {
      }
    });
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([v] {
        for (int i = 0; i < 500; ++i) v.update([](int& x) { ++x; });
      });
    }
    for (auto& t : threads) t.join();
    CHECK(v.get() == 2000);
    q.put(1);
    getter.join();
    CHECK(q.empty());
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: eight processes updating under a manager lock lose no update") {
  {
    Manager manager;
    auto d = manager.dict<std::string, int>({{"count", 0}});
    auto lock = manager.lock();
    std::vector<procpool::Process> children;
    for (int i = 0; i < 8; ++i) {
      children.emplace_back([d, lock] {
        for (int k = 0; k < 1000; ++k) {
          std::scoped_lock guard(lock);
          d.set("count", d.get("count") + 1);
        }
      });
    }
    KillIfRunning guard(children);
    for (auto& c : children) c.start();
    for (auto& c : children) {
      c.join();
      CHECK(c.exitcode() == 0);
    }
    CHECK(d.get("count") == 8000);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: eight processes using the atomic update lose no update") {
  {
    Manager manager;
    auto d = manager.dict<std::string, int>({{"count", 0}});
    auto v = manager.value<long>(0);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 8; ++i) {
      children.emplace_back([d, v] {
        for (int k = 0; k < 1000; ++k) {
          d.update("count", [](int& c) { ++c; });
          if (k % 10 == 0) v.update([](long x) { return x + 1; });
        }
      });
    }
    KillIfRunning guard(children);
    for (auto& c : children) c.start();
    for (auto& c : children) {
      c.join();
      CHECK(c.exitcode() == 0);
    }
    CHECK(d.get("count") == 8000);
    CHECK(v.get() == 800);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a get parked in the server is served by a put from another process") {
  {
    Manager manager;
    auto q = manager.queue<std::string>(1);
    procpool::Process producer([q] {
      q.put("first");
      q.put("second");  // parks: the queue is full until the parent gets
    });
    KillIfRunning guard{&producer};
    producer.start();
    CHECK(q.get(watchdog) == "first");
    CHECK(q.get(watchdog) == "second");
    producer.join();
    CHECK(producer.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a lock held by a process that dies is released to the next waiter") {
  {
    Manager manager;
    auto lock = manager.lock();
    auto ready = procpool::Pipe(false);
    procpool::Connection& ready_r = ready.first;
    procpool::Connection& ready_w = ready.second;
    procpool::Process holder([lock, &ready_w] {
      lock.lock();
      ready_w.send(1);
      for (;;) ::pause();  // dies holding the lock
    });
    // A second process waits for the lock in the server and dies waiting.
    procpool::Process waiter([lock] { lock.lock(); });
    KillIfRunning guard{&holder, &waiter};
    holder.start();
    REQUIRE(ready_r.poll(watchdog));
    CHECK(ready_r.recv<int>() == 1);
    CHECK_FALSE(lock.try_lock());
    waiter.start();
    REQUIRE(test_support::wait_until_sleeping(waiter.pid()));  // parked in the server
    waiter.kill();
    waiter.join();
    holder.kill();
    holder.join();
    CHECK(holder.exitcode() == -SIGKILL);
    // The holder's connection closed, so the server released the lock; the dead waiter is not
    // handed it.
    CHECK(lock.acquire(watchdog));
    lock.unlock();
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a request to a shut-down manager throws ManagerError in every process") {
  {
    auto pipe = procpool::Pipe();
    procpool::Connection& parent_end = pipe.first;
    procpool::Connection& child_end = pipe.second;
    std::optional<procpool::Process> child;
    {
      Manager manager;
      auto d = manager.dict<int, int>({{1, 1}});
      child.emplace([d, &child_end] {
        if (d.get(1) != 1) ::_exit(2);  // connected before the shutdown
        child_end.send(1);
        (void)child_end.recv<int>();
        try {
          d.get(1);
        } catch (const procpool::ManagerError&) {
          ::_exit(42);
        }
        ::_exit(3);
      });
      KillIfRunning guard{&*child};
      child->start();
      REQUIRE(parent_end.poll(watchdog));
      CHECK(parent_end.recv<int>() == 1);
      manager.shutdown();
      manager.shutdown();  // again: nothing happens
      CHECK_THROWS_AS(d.get(1), procpool::ManagerError);
      CHECK_THROWS_WITH(d.set(2, 2), Catch::Matchers::Contains("shut down"));
      CHECK_THROWS_AS((manager.dict<int, int>()), procpool::ManagerError);
      parent_end.send(1);
      child->join();
    }
    CHECK(child->exitcode() == 42);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: shutdown reaps the server and removes its socket and directory") {
  {
    Manager manager;
    pid_t server = manager.server_pid();
    std::string address = manager.address();
    REQUIRE(path_exists(address));
    CHECK(manager.value(1).get() == 1);
    manager.shutdown();
    CHECK(process_is_gone(server));
    CHECK_FALSE(path_exists(address));
    CHECK_FALSE(path_exists(dir_of(address)));

    std::string moved_address;
    {
      Manager first;
      moved_address = first.address();
      Manager second(std::move(first));  // the moved-from one owns nothing
      CHECK_THROWS_AS(first.address(), std::logic_error);
      CHECK(second.value(2).get() == 2);
    }  // the destructor shuts down
    CHECK_FALSE(path_exists(dir_of(moved_address)));
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: the server outlives the thread that made the Manager") {
  {
    // PR_SET_PDEATHSIG would kill the server when the *thread* that forked it exits: the server
    // watches a pidfd of the process instead.
    std::optional<Manager> manager;
    std::thread maker([&] { manager.emplace(); });
    maker.join();
    auto v = manager->value(std::string("alive"));
    CHECK(v.get() == "alive");
    CHECK(v.update([](std::string& s) { s += "!"; }) == "alive!");
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: the server exits when the program that made the Manager dies") {
  // A helper process becomes a subreaper; its child makes a Manager, reports the server's pid
  // and address, and is SIGKILLed. The orphaned server is re-parented to the helper, which
  // waits for it to exit (watchdog: 20 s) and checks that it removed its directory. The test
  // process itself stays an ordinary parent.
  std::cout.flush();
  std::fflush(nullptr);
  pid_t helper = ::fork();
  REQUIRE(helper >= 0);
  if (helper == 0) {
    int code = 0;
    try {
      if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) ::_exit(10);
      int p[2];
      if (::pipe2(p, O_CLOEXEC) != 0) ::_exit(11);
      pid_t owner = ::fork();
      if (owner < 0) ::_exit(12);
      if (owner == 0) {
        ::close(p[0]);
        try {
          Manager manager;
          std::string msg = std::to_string(manager.server_pid()) + " " + manager.address();
          if (::write(p[1], msg.data(), msg.size()) != static_cast<ssize_t>(msg.size())) {
            ::_exit(1);
          }
          for (;;) ::pause();  // with the Manager alive, until SIGKILLed
        } catch (...) {
          ::_exit(2);
        }
      }
      ::close(p[1]);
      // The owner is SIGKILLed as soon as its report arrives: its Manager never shuts down.
      char buf[512];
      pollfd pfd{p[0], POLLIN, 0};
      if (::poll(&pfd, 1, 20000) != 1) ::_exit(13);
      ::kill(owner, SIGKILL);
      ssize_t n = ::read(p[0], buf, sizeof buf);
      if (n <= 0) ::_exit(14);
      std::string msg(buf, static_cast<std::size_t>(n));
      pid_t server = static_cast<pid_t>(std::stol(msg.substr(0, msg.find(' '))));
      std::string address = msg.substr(msg.find(' ') + 1);
      int st = 0;
      ::waitpid(owner, &st, 0);
      (void)st;
      int server_pidfd = static_cast<int>(::syscall(SYS_pidfd_open, server, 0));
      if (server_pidfd >= 0) {
        pollfd s{server_pidfd, POLLIN, 0};
        if (::poll(&s, 1, 20000) != 1) {
          ::kill(server, SIGKILL);
          code = 20;  // did not exit within 20 s
        }
      }
      if (::waitpid(server, &st, 0) != server) {
        code = code ? code : 21;
      } else if (code == 0 && !(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
        code = 22;
      }
      if (code == 0 && path_exists(dir_of(address))) code = 23;  // it cleaned up
    } catch (...) {
      code = 30;
    }
    ::_exit(code);
  }
  int status = 0;
  REQUIRE(::waitpid(helper, &status, 0) == helper);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Security and robustness.

TEST_CASE("manager: the socket is a filesystem path in a fresh private directory") {
  {
    Manager a;
    Manager b;
    std::string address = a.address();
    REQUIRE(!address.empty());
    CHECK(address[0] == '/');  // not the abstract namespace (which starts with a NUL byte)
    struct stat st;
    REQUIRE(::stat(dir_of(address).c_str(), &st) == 0);
    CHECK(S_ISDIR(st.st_mode));
    CHECK((st.st_mode & 07777) == 0700);
    CHECK(st.st_uid == ::geteuid());
    REQUIRE(::lstat(address.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK(dir_of(a.address()) != dir_of(b.address()));
    // The server holds no TCP or UDP socket: each of its sockets is a Unix one.
    std::string fd_dir = "/proc/" + std::to_string(a.server_pid()) + "/fd";
    auto unix_inodes = manager_raw::unix_socket_inodes();
    for (const auto& inode : manager_raw::socket_inodes_of(fd_dir)) {
      CHECK(unix_inodes.count(inode) == 1);
    }
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a connection without the key is refused and the manager keeps working") {
  {
    Manager manager;
    auto v = manager.value(1);
    const auto& key = procpool::detail::ManagerAccess::key(manager);

    SECTION("a wrong answer") {
      manager_raw::Fd fd = manager_raw::connect(manager.address());
      auto challenge =
          manager_raw::read_exactly(fd.get(), procpool::detail::manager_challenge_size);
      REQUIRE(challenge.size() == procpool::detail::manager_challenge_size);
      std::vector<std::byte> zeros(procpool::detail::manager_answer_size);
      manager_raw::send(fd.get(), zeros);
      CHECK(manager_raw::closed_by_server(fd.get()));
    }
    SECTION("the key itself instead of the keyed digest of the challenge") {
      manager_raw::Fd fd = manager_raw::connect(manager.address());
      (void)manager_raw::read_exactly(fd.get(), procpool::detail::manager_challenge_size);
      manager_raw::send(fd.get(), std::vector<std::byte>(key.begin(), key.end()));
      CHECK(manager_raw::closed_by_server(fd.get()));
    }
    SECTION("the right digest under another key") {
      manager_raw::Fd fd = manager_raw::connect(manager.address());
      auto challenge =
          manager_raw::read_exactly(fd.get(), procpool::detail::manager_challenge_size);
      procpool::detail::ManagerKey other = key;
      other[0] ^= std::byte{1};
      auto answer = procpool::detail::manager_answer(other, challenge);
      manager_raw::send(fd.get(), std::vector<std::byte>(answer.begin(), answer.end()));
      CHECK(manager_raw::closed_by_server(fd.get()));
    }
    SECTION("a replayed answer to an earlier challenge") {
      manager_raw::Fd first = manager_raw::connect(manager.address());
      auto challenge =
          manager_raw::read_exactly(first.get(), procpool::detail::manager_challenge_size);
      auto answer = procpool::detail::manager_answer(key, challenge);
      manager_raw::Fd second = manager_raw::connect(manager.address());
      (void)manager_raw::read_exactly(second.get(), procpool::detail::manager_challenge_size);
      manager_raw::send(second.get(), std::vector<std::byte>(answer.begin(), answer.end()));
      CHECK(manager_raw::closed_by_server(second.get()));
    }
    SECTION("a request sent without answering at all") {
      manager_raw::Fd fd = manager_raw::connect(manager.address());
      (void)manager_raw::read_exactly(fd.get(), procpool::detail::manager_challenge_size);
      auto req = manager_raw::request(procpool::detail::ManagerOp::value_get, 1, {});
      req.resize(std::max<std::size_t>(req.size(), procpool::detail::manager_answer_size));
      manager_raw::send(fd.get(), req);
      CHECK(manager_raw::closed_by_server(fd.get()));
    }
    SECTION("the real answer is accepted (so the refusals above are meaningful)") {
      manager_raw::Fd fd = manager_raw::authenticated(manager.address(), key);
      REQUIRE(fd.get() >= 0);
      auto reply = manager_raw::call(
          fd.get(), manager_raw::request(procpool::detail::ManagerOp::create_lock, 0, {}));
      CHECK(reply.status == 0);
    }
    CHECK(v.get() == 1);
    CHECK(v.update([](int& x) { ++x; }) == 2);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a client that sends garbage loses its connection and others keep working") {
  {
    Manager manager;
    auto d = manager.dict<int, int>({{1, 1}});
    const auto& key = procpool::detail::ManagerAccess::key(manager);
    using procpool::detail::ManagerOp;
    manager_raw::Fd fd = manager_raw::authenticated(manager.address(), key);
    REQUIRE(fd.get() >= 0);

    SECTION("an unknown operation") {
      manager_raw::send(fd.get(), manager_raw::request(static_cast<ManagerOp>(200), 0, {}));
    }
    SECTION("an oversized length") {
      std::uint64_t len = std::uint64_t{1} << 40;
      std::vector<std::byte> msg(sizeof len + 16);
      std::memcpy(msg.data(), &len, sizeof len);
      manager_raw::send(fd.get(), msg);
    }
    SECTION("a length too small to hold a request") {
      std::vector<std::byte> msg(sizeof(std::uint64_t) + 4);
      std::uint64_t len = 4;
      std::memcpy(msg.data(), &len, sizeof len);
      manager_raw::send(fd.get(), msg);
    }
    SECTION("random bytes") {
      std::vector<std::byte> junk(4096);
      for (std::size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<std::byte>(i * 7 + 3);
      std::uint64_t len = 200;
      std::memcpy(junk.data(), &len, sizeof len);
      manager_raw::send(fd.get(), junk);
    }
    SECTION("a bytes field whose length runs past the request") {
      std::vector<std::byte> args{std::byte{0xff}, std::byte{0x7f}, std::byte{1}};
      manager_raw::send(fd.get(), manager_raw::request(ManagerOp::dict_set, 1, args));
    }
    SECTION("trailing bytes after a valid request") {
      std::vector<std::byte> args{std::byte{0}};
      manager_raw::send(fd.get(), manager_raw::request(ManagerOp::dict_size, 1, args));
    }
    SECTION("an update naming a function that is not a registered update") {
      auto made = manager_raw::call(
          fd.get(), manager_raw::request(ManagerOp::create_value, 0,
                                         manager_raw::bytes_field(procpool::encode(5))));
      REQUIRE(made.status == 0);
      std::uint64_t id;
      REQUIRE(made.payload.size() == sizeof id);
      std::memcpy(&id, made.payload.data(), sizeof id);
      std::vector<std::byte> args(sizeof(std::uint64_t) + 1);
      // The offset of ::abort from the anchor: a real function, just not an update.
      std::uint64_t ref = static_cast<std::uint64_t>(
          reinterpret_cast<std::uintptr_t>(&::abort) -
          reinterpret_cast<std::uintptr_t>(&procpool::detail::function_anchor));
      std::memcpy(args.data(), &ref, sizeof ref);
      manager_raw::send(fd.get(), manager_raw::request(ManagerOp::value_update, id, args));
    }
    CHECK(manager_raw::closed_by_server(fd.get()));
    CHECK(d.get(1) == 1);
    d.set(2, 2);
    CHECK(d.size() == 2);
    CHECK(run_child([d] {
            if (d.update(1, [](int& x) { x += 10; }) != 11) ::_exit(5);
          }) == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a truncated request or a disconnect mid-request harms no other client") {
  {
    Manager manager;
    auto v = manager.value(0);
    const auto& key = procpool::detail::ManagerAccess::key(manager);
    // Clients the server must not wait for: one that never answers the challenge, one stopped
    // inside a request's length, one stopped inside a request's body.
    manager_raw::Fd silent = manager_raw::connect(manager.address());
    manager_raw::Fd half_header = manager_raw::authenticated(manager.address(), key);
    manager_raw::Fd half_body = manager_raw::authenticated(manager.address(), key);
    REQUIRE(half_header.get() >= 0);
    REQUIRE(half_body.get() >= 0);
    auto req = manager_raw::request(procpool::detail::ManagerOp::value_set, 1,
                                    manager_raw::bytes_field(procpool::encode(99)));
    manager_raw::send(half_header.get(), std::vector<std::byte>(req.begin(), req.begin() + 3));
    manager_raw::send(half_body.get(), std::vector<std::byte>(req.begin(), req.end() - 2));

    // Everybody else is served meanwhile, from this process and from another.
    for (int i = 0; i < 100; ++i) v.update([](int& x) { ++x; });
    CHECK(run_child([v] {
            for (int i = 0; i < 100; ++i) v.update([](int& x) { ++x; });
          }) == 0);
    CHECK(v.get() == 200);

    // They disconnect mid-request: nothing of their requests happens.
    half_header.reset();
    half_body.reset();
    silent.reset();
    CHECK(v.get() == 200);
    CHECK(v.update([](int& x) { ++x; }) == 201);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: a value larger than any socket buffer goes through while others are served") {
  {
    Manager manager;
    auto big = manager.value(std::string());
    auto small = manager.value(0);
    std::string payload(24 << 20, 'x');
    for (std::size_t i = 0; i < payload.size(); i += 4096)
      payload[i] = static_cast<char>('a' + i % 26);
    procpool::Process reader([big] {
      for (int i = 0; i < 3; ++i) (void)big.get();
    });
    procpool::Process counter([small] {
      for (int i = 0; i < 200; ++i) small.update([](int& x) { ++x; });
    });
    KillIfRunning guard{&reader, &counter};
    big.set(payload);
    reader.start();
    counter.start();
    CHECK(big.get() == payload);
    reader.join();
    counter.join();
    CHECK(reader.exitcode() == 0);
    CHECK(counter.exitcode() == 0);
    CHECK(small.get() == 200);
  }
  CHECK(no_child_processes());
}

TEST_CASE("manager: SipHash-2-4 matches the reference test vectors") {
  std::array<std::byte, 16> key;
  std::array<std::byte, 64> msg;
  for (int i = 0; i < 16; ++i) key[static_cast<std::size_t>(i)] = static_cast<std::byte>(i);
  for (int i = 0; i < 64; ++i) msg[static_cast<std::size_t>(i)] = static_cast<std::byte>(i);
  auto sip64 = [&](std::size_t len) {
    std::array<std::byte, 8> out;
    procpool::detail::siphash24(key, std::span<const std::byte>(msg.data(), len), out);
    std::uint64_t v = 0;
    for (int i = 7; i >= 0; --i)
      v = (v << 8) | static_cast<std::uint8_t>(out[static_cast<std::size_t>(i)]);
    return v;
  };
  CHECK(sip64(0) == 0x726fdb47dd0e0e31ull);
  CHECK(sip64(1) == 0x74f839c593dc67fdull);
  CHECK(sip64(8) == 0x93f5f5799a932462ull);
  CHECK(sip64(15) == 0xa129ca6149be45e5ull);
  CHECK(sip64(63) == 0x958a324ceb064572ull);
  auto sip128 = [&](std::size_t len) {
    std::array<std::byte, 16> out;
    procpool::detail::siphash24(key, std::span<const std::byte>(msg.data(), len), out);
    std::vector<int> v;
    for (auto b : out) v.push_back(static_cast<int>(b));
    return v;
  };
  CHECK(sip128(0) == std::vector<int>{0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6,
                                      0x72, 0x14, 0xc7, 0x55, 0x02, 0x93});
  CHECK(sip128(1) == std::vector<int>{0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76,
                                      0x59, 0x11, 0x9b, 0x22, 0xfc, 0x45});
}
