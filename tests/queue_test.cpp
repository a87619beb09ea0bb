#include <procpool/queue.hpp>

#include <catch2/catch.hpp>

#include "support/interrupt.hpp"

#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <procpool/synchronize.hpp>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>
#include "support/children.hpp"

using test_support::no_child_processes;
using test_support::KillIfRunning;

// Every test here moves messages between real processes. They synchronize on Events, on the
// queue's own qsize() and on a child being asleep in the kernel, never on sleeps; timeouts are
// only watchdogs, and a timed wait is only ever checked to last at least its timeout. Each test
// checks at its end that no child process is left, running or zombie.

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test_support::wait_until_sleeping;

constexpr std::size_t KiB = 1024;
constexpr std::size_t MiB = 1024 * KiB;



// A string of `n` bytes that depends on every bit of `seed`, so that a chunk lost, doubled or
// moved shows up as a mismatch.
std::string pattern(std::size_t n, std::uint64_t seed) {
  std::string s(n, '\0');
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(s.data() + i, &x, 8);
  }
  for (; i < n; ++i) s[i] = static_cast<char>(i * 31 + seed);
  return s;
}

// Polls `cond` (yielding) until it holds; false after a generous watchdog.
template <class Cond>
bool eventually(Cond&& cond, std::chrono::seconds watchdog = 20s) {
  auto give_up = Clock::now() + watchdog;
  while (!cond()) {
    if (Clock::now() >= give_up) return false;
    std::this_thread::yield();
  }
  return true;
}

// A type whose encoding fails for a negative value: the failure happens in the caller of put().
struct Unencodable {
  int x = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    if (x < 0) throw std::runtime_error("cannot encode a negative Unencodable");
    ar(x);
  }
};

std::int64_t item_of(std::int64_t producer, std::int64_t seq) { return producer * 1'000'000 + seq; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// The basics (CPython's test_put, test_get, test_fork, test_qsize)

TEST_CASE("queue: put and get with timeouts and nowait fill and drain a bounded queue") {
  {
    procpool::Queue<int> q(6);
    procpool::Queue<int> sums;
    procpool::Event filled;
    CHECK(q.maxsize() == 6);
    CHECK(q.empty());
    CHECK_FALSE(q.full());
    CHECK(q.qsize() == 0);

    q.put(1);
    q.put(2, 1s);
    q.put_nowait(3);
    q.put(4, -1s);  // a negative duration means zero: there is room, so it succeeds
    q.put(5);
    CHECK(q.qsize() == 5);
    CHECK_FALSE(q.full());
    q.put(6, 10ms);
    CHECK(q.qsize() == 6);
    CHECK(q.full());
    CHECK_FALSE(q.empty());

    CHECK_THROWS_AS(q.put_nowait(7), procpool::Full);
    auto t0 = Clock::now();
    CHECK_THROWS_AS(q.put(7, 100ms), procpool::Full);
    CHECK(Clock::now() - t0 >= 95ms);
    CHECK(q.qsize() == 6);

    // A child drains it with every flavour of get, and reports what it saw.
    procpool::Process child([&] {
      int sum = q.get();
      sum = sum * 10 + q.get(1s);
      sum = sum * 10 + q.get_nowait();
      sum = sum * 10 + q.get(-1s);
      sum = sum * 10 + q.get(10s);
      sum = sum * 10 + q.get();
      sums.put(sum);
      sums.put(static_cast<int>(q.qsize()));
    });
    child.start();
    KillIfRunning guard{&child};
    CHECK(sums.get(20s) == 123456);
    CHECK(sums.get(20s) == 0);
    child.join();
    CHECK(child.exitcode() == 0);

    CHECK(q.empty());
    CHECK_FALSE(q.full());
    CHECK_THROWS_AS(q.get_nowait(), procpool::Empty);
    t0 = Clock::now();
    CHECK_THROWS_AS(q.get(100ms), procpool::Empty);
    CHECK(Clock::now() - t0 >= 95ms);
    CHECK_THROWS_AS(q.get(-1s), procpool::Empty);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: items put by a child that exits right after put are all received") {
  {
    procpool::Queue<std::tuple<int, std::string>> q;
    procpool::Process child([&] {
      for (int i = 0; i < 10; ++i) q.put({i, std::to_string(i * i)});
      // Returns at once: there is no feeder thread whose buffer could be lost.
    });
    child.start();
    child.join();  // the child is gone before the first get
    CHECK(child.exitcode() == 0);
    CHECK(q.qsize() == 10);
    for (int i = 0; i < 10; ++i) {
      auto [n, s] = q.get(20s);
      CHECK(n == i);
      CHECK(s == std::to_string(i * i));
    }
    CHECK(q.empty());
    CHECK_THROWS_AS(q.get_nowait(), procpool::Empty);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: qsize counts the items put and not yet taken") {
  {
    procpool::Queue<int> q;
    CHECK(q.qsize() == 0);
    q.put(5);
    CHECK(q.qsize() == 1);
    q.put(6);
    CHECK(q.qsize() == 2);
    CHECK(q.get() == 5);
    CHECK(q.qsize() == 1);

    // Across processes: what a child puts counts here, what it takes counts too.
    procpool::Process child([&] {
      (void)q.get();
      for (int i = 0; i < 3; ++i) q.put(i);
    });
    child.start();
    child.join();
    CHECK(child.exitcode() == 0);
    CHECK(q.qsize() == 3);
    CHECK(q.get() == 0);
    CHECK(q.get() == 1);
    CHECK(q.get() == 2);
    CHECK(q.qsize() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: get with a timeout throws Empty after at least the timeout") {
  {
    procpool::Queue<int> q;
    for (auto timeout : {50ms, 200ms}) {
      auto t0 = Clock::now();
      CHECK_THROWS_AS(q.get(timeout), procpool::Empty);
      CHECK(Clock::now() - t0 >= timeout - 5ms);
    }
    CHECK_THROWS_AS(q.get(std::chrono::duration<double>(0.05)), procpool::Empty);
    CHECK_THROWS_AS(q.get_nowait(), procpool::Empty);

    // Empty while a child waits in get() too: a second consumer times out waiting for its turn.
    procpool::Queue<int> replies;
    procpool::Process child([&] { replies.put(q.get() + 1); });
    child.start();
    KillIfRunning guard{&child};
    REQUIRE(wait_until_sleeping(child.pid()));
    auto t0 = Clock::now();
    CHECK_THROWS_AS(q.get(100ms), procpool::Empty);
    CHECK(Clock::now() - t0 >= 95ms);
    q.put(41);
    CHECK(replies.get(20s) == 42);
    child.join();
    CHECK(child.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: close stops puts from this process while get still works") {
  {
    procpool::Queue<int> q;
    procpool::Event go;
    // Started before close(): the child's queue is its own handle, and it may still put.
    procpool::Process child([&] {
      go.wait();
      q.put(2);
    });
    child.start();
    KillIfRunning guard{&child};
    q.put(1);
    q.close();
    CHECK_THROWS_AS(q.put(3), std::logic_error);
    CHECK_THROWS_AS(q.put_nowait(3), std::logic_error);
    CHECK_THROWS_AS(q.put(3, 1s), std::logic_error);
    procpool::Queue<int> copy = q;  // copies are handles to the same queue, closed here too
    CHECK_THROWS_AS(copy.put(3), std::logic_error);
    go.set();
    CHECK(q.get() == 1);
    CHECK(q.get(20s) == 2);
    CHECK(q.qsize() == 0);
    child.join();
    CHECK(child.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a put whose item fails to encode throws in the caller and leaves the queue unchanged") {
  procpool::Queue<Unencodable> q(0, 4096);
  q.put(Unencodable{1});
  CHECK_THROWS_WITH(q.put(Unencodable{-1}), "cannot encode a negative Unencodable");
  CHECK(q.qsize() == 1);
  CHECK_THROWS_AS(q.put_nowait(Unencodable{-2}), std::runtime_error);
  CHECK_THROWS_AS(q.put(Unencodable{-3}, 1s), std::runtime_error);
  CHECK(q.qsize() == 1);
  q.put(Unencodable{2});
  CHECK(q.get().x == 1);
  CHECK(q.get().x == 2);
  CHECK(q.empty());

  procpool::JoinableQueue<Unencodable> jq;
  CHECK_THROWS_AS(jq.put(Unencodable{-1}), std::runtime_error);
  CHECK(jq.unfinished_tasks() == 0);
  CHECK(jq.join(0s));
}

TEST_CASE("queue: constructing with a bad maxsize or buffer size throws std::invalid_argument") {
  CHECK_THROWS_AS(procpool::Queue<int>(std::size_t{1} << 30), std::invalid_argument);
  CHECK_THROWS_AS(procpool::Queue<int>(0, 100), std::invalid_argument);
  CHECK_THROWS_AS(procpool::Queue<int>(0, (std::size_t{1} << 30) + 1), std::invalid_argument);
  procpool::Queue<int> odd(0, 5000);  // rounded up to a power of two
  odd.put(1);
  CHECK(odd.get() == 1);
}

// ---------------------------------------------------------------------------------------------
// JoinableQueue (CPython's test_task_done)

TEST_CASE("queue: JoinableQueue join returns after four workers mark every item done") {
  {
    procpool::JoinableQueue<int> q;
    procpool::Queue<long> results;
    std::vector<procpool::Process> workers;
    for (int w = 0; w < 4; ++w) {
      workers.emplace_back([&] {
        for (;;) {
          int x = q.get();
          if (x < 0) {
            q.task_done();
            return;
          }
          results.put(long{x} * x);
          q.task_done();
        }
      });
    }
    for (auto& w : workers) w.start();
    KillIfRunning guard(workers);
    for (int i = 0; i < 100; ++i) q.put(i);
    for (int w = 0; w < 4; ++w) q.put(-1);
    q.join();
    // Every task_done came after its result was put: all of them are there now.
    CHECK(q.unfinished_tasks() == 0);
    CHECK(results.qsize() == 100);
    long sum = 0;
    for (int i = 0; i < 100; ++i) sum += results.get(20s);
    CHECK(sum == 328350);  // 0² + 1² + ... + 99²
    for (auto& w : workers) {
      w.join();
      CHECK(w.exitcode() == 0);
    }
    CHECK(q.join(0s));
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: task_done called more times than items were put throws std::logic_error") {
  procpool::JoinableQueue<int> q;
  CHECK_THROWS_AS(q.task_done(), std::logic_error);
  CHECK(q.join(0s));
  q.put(1);
  q.put(2);
  CHECK(q.unfinished_tasks() == 2);
  CHECK_FALSE(q.join(50ms));
  CHECK(q.get() == 1);
  q.task_done();
  CHECK(q.unfinished_tasks() == 1);
  CHECK(q.get() == 2);
  q.task_done();
  CHECK(q.unfinished_tasks() == 0);
  CHECK_THROWS_AS(q.task_done(), std::logic_error);
  CHECK(q.unfinished_tasks() == 0);
  CHECK(q.join(0s));
  q.join();
}

// ---------------------------------------------------------------------------------------------
// Many processes, big and mixed messages

TEST_CASE("queue: two producers and two consumers keep each producer's order and lose nothing") {
  constexpr std::int64_t per_producer = 20'000;
  {
    procpool::Queue<std::int64_t> q;
    procpool::Queue<std::vector<std::int64_t>> received;
    std::vector<procpool::Process> procs;
    for (std::int64_t p = 0; p < 2; ++p) {
      procs.emplace_back([&q, p] {
        for (std::int64_t i = 0; i < per_producer; ++i) q.put(item_of(p, i));
      });
    }
    for (int c = 0; c < 2; ++c) {
      procs.emplace_back([&] {
        // Each consumer sees each producer's items in increasing order; it sends back all it got.
        std::vector<std::int64_t> got;
        std::int64_t last[2] = {-1, -1};
        for (;;) {
          std::int64_t x = q.get();
          if (x < 0) break;
          std::int64_t p = x / 1'000'000, i = x % 1'000'000;
          if (p < 0 || p > 1 || i <= last[p]) std::_Exit(3);  // out of order, or a stranger
          last[p] = i;
          got.push_back(x);
        }
        received.put(got);
      });
    }
    for (auto& p : procs) p.start();
    KillIfRunning guard(procs);
    procs[0].join();
    procs[1].join();
    q.put(-1);  // one end mark per consumer, after every item
    q.put(-1);
    std::vector<std::int64_t> all;
    for (int c = 0; c < 2; ++c) {
      auto got = received.get(30s);
      all.insert(all.end(), got.begin(), got.end());
    }
    for (auto& p : procs) {
      p.join();
      CHECK(p.exitcode() == 0);
    }
    std::sort(all.begin(), all.end());
    std::vector<std::int64_t> expected;
    for (std::int64_t p = 0; p < 2; ++p) {
      for (std::int64_t i = 0; i < per_producer; ++i) expected.push_back(item_of(p, i));
    }
    CHECK(all.size() == expected.size());
    CHECK(all == expected);
    CHECK(q.empty());
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a 64 MiB message passes through a 4 KiB buffer") {
  {
    const std::string big = pattern(64 * MiB, 64);
    procpool::Queue<std::string> q(0, 4096);
    procpool::Process child([&] { q.put(big); });
    child.start();
    KillIfRunning guard{&child};
    std::string got = q.get();
    child.join();
    CHECK(child.exitcode() == 0);
    CHECK(got.size() == big.size());
    CHECK(got == big);
    CHECK(q.empty());
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a 64 MiB message passes through the default buffer") {
  {
    const std::string big = pattern(64 * MiB, 65);
    procpool::Queue<std::string> q;
    procpool::Process child([&] {
      q.put(big);
      q.put("after");
    });
    child.start();
    KillIfRunning guard{&child};
    std::string got = q.get();
    CHECK(q.get(20s) == "after");
    child.join();
    CHECK(child.exitcode() == 0);
    CHECK(got.size() == big.size());
    CHECK(got == big);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: messages of mixed sizes from two producers arrive whole and in order") {
  // Sizes from 0 B to 3 MiB, most of them small, chosen by a seeded generator that the parent
  // replays to check every byte.
  constexpr int per_producer = 40;
  auto size_of = [](int p, int i) -> std::size_t {
    std::uint64_t r = (static_cast<std::uint64_t>(p) * 7919 + static_cast<std::uint64_t>(i)) *
                      0x9E3779B97F4A7C15ull;
    r ^= r >> 29;
    switch (r % 4) {
      case 0:
        return r % 64;                 // tiny, including empty
      case 1:
        return (r >> 8) % (16 * KiB);  // fits in the ring whole
      case 2:
        return (r >> 8) % (300 * KiB);  // around a quarter of the ring: whole or streamed
      default:
        return (r >> 8) % (3 * MiB + 1);  // streamed
    }
  };
  for (std::size_t buffer : {std::size_t{64 * KiB}, std::size_t{1 * MiB}}) {
    procpool::Queue<std::tuple<int, int, std::string>> q(0, buffer);
    std::vector<procpool::Process> producers;
    for (int p = 0; p < 2; ++p) {
      producers.emplace_back([&q, p, size_of] {
        for (int i = 0; i < per_producer; ++i) {
          q.put({p, i, pattern(size_of(p, i), static_cast<std::uint64_t>(p * 1000 + i))});
        }
      });
    }
    for (auto& p : producers) p.start();
    KillIfRunning guard(producers);
    int next[2] = {0, 0};
    for (int n = 0; n < 2 * per_producer; ++n) {
      auto [p, i, body] = q.get(30s);
      REQUIRE((p == 0 || p == 1));
      REQUIRE(i == next[p]);
      ++next[p];
      REQUIRE(body.size() == size_of(p, i));
      REQUIRE(body == pattern(size_of(p, i), static_cast<std::uint64_t>(p * 1000 + i)));
    }
    for (auto& p : producers) {
      p.join();
      CHECK(p.exitcode() == 0);
    }
    CHECK(q.empty());
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: put blocks while maxsize items wait and continues when one is taken") {
  {
    procpool::Queue<int> q(2);
    procpool::Event two_put, third_put;
    procpool::Process producer([&] {
      q.put(1);
      q.put(2);
      two_put.set();
      q.put(3);  // blocks: two items wait
      third_put.set();
    });
    producer.start();
    KillIfRunning guard{&producer};
    REQUIRE(two_put.wait(20s));
    REQUIRE(wait_until_sleeping(producer.pid()));  // asleep in put(3)
    CHECK_FALSE(third_put.is_set());
    CHECK(q.qsize() == 2);
    CHECK(q.full());
    CHECK(q.get() == 1);
    REQUIRE(third_put.wait(20s));
    CHECK(q.get() == 2);
    CHECK(q.get() == 3);
    producer.join();
    CHECK(producer.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: SimpleQueue is default-constructible and passes items between processes") {
  {
    procpool::SimpleQueue<std::string> q;
    CHECK(q.empty());
    procpool::Process child([&] {
      q.put("a");
      q.put(std::string(3 * MiB, 'b'));  // bigger than the default buffer
      q.put("c");
    });
    child.start();
    KillIfRunning guard{&child};
    CHECK(q.get() == "a");
    CHECK(q.get() == std::string(3 * MiB, 'b'));
    CHECK(q.get() == "c");
    child.join();
    CHECK(child.exitcode() == 0);
    CHECK(q.empty());
    q.put("d");
    CHECK_FALSE(q.empty());
    CHECK(q.get() == "d");
    q.close();
    CHECK_THROWS_AS(q.put("e"), std::logic_error);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: pool workers put into a queue created before the Pool") {
  procpool::Queue<int> q;
  {
    procpool::Pool pool(2);
    auto squares = pool.map([&q](int x) {
      q.put(x);
      return x * x;
    }, std::views::iota(0, 200));
    CHECK(squares.size() == 200);
    pool.close();
    pool.join();
  }
  std::vector<int> got;
  for (int i = 0; i < 200; ++i) got.push_back(q.get(20s));
  std::sort(got.begin(), got.end());
  std::vector<int> expected(200);
  std::iota(expected.begin(), expected.end(), 0);
  CHECK(got == expected);
  CHECK(q.empty());
  CHECK(no_child_processes());
}

TEST_CASE("queue: qsize and empty never read as huge while others put and get") {
  // qsize() reads two counters; read in the wrong order, a message put and taken in between
  // makes it wrap around to about 2^31.
  {
    procpool::Queue<int> q(0, 4096);
    procpool::Event stop;
    procpool::Process producer([&] {
      for (int i = 0; !stop.is_set(); ++i) q.put(i);
      q.put(-1);
    });
    procpool::Process consumer([&] {
      while (q.get() >= 0) {
      }
    });
    producer.start();
    consumer.start();
    KillIfRunning guard{&producer, &consumer};
    std::size_t worst = 0;
    auto until = Clock::now() + 1s;  // a sampling period, not a synchronization
    while (Clock::now() < until) {
      for (int i = 0; i < 1000; ++i) worst = std::max(worst, q.qsize());
    }
    stop.set();
    producer.join();
    consumer.join();
    CHECK(producer.exitcode() == 0);
    CHECK(consumer.exitcode() == 0);
    // An overestimate is possible (messages put and taken between the two reads), a wrap is not.
    CHECK(worst < 1'000'000);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Crash safety

TEST_CASE("queue: a producer killed in the middle of a large message does not corrupt the queue") {
  {
    procpool::Queue<std::string> q(0, 64 * KiB);
    const std::string big = pattern(16 * MiB, 16);
    procpool::Process dying([&] { q.put(big); });
    dying.start();
    KillIfRunning guard{&dying};
    // The FIRST chunk is published (the message counts), then the ring fills and put() waits.
    REQUIRE(eventually([&] { return q.qsize() >= 1; }));
    REQUIRE(wait_until_sleeping(dying.pid()));
    dying.kill();
    dying.join();
    CHECK(dying.exitcode() == -SIGKILL);

    procpool::Process next([&] {
      q.put("next");
      q.put(pattern(200 * KiB, 2));  // streamed through the 64 KiB ring
    });
    next.start();
    KillIfRunning guard2{&next};
    CHECK(q.get(20s) == "next");  // the partial message is skipped, never delivered
    CHECK(q.get(20s) == pattern(200 * KiB, 2));
    next.join();
    CHECK(next.exitcode() == 0);
    CHECK(q.qsize() == 0);

    // The queue keeps working in both directions.
    q.put("here");
    CHECK(q.get() == "here");
    CHECK_THROWS_AS(q.get_nowait(), procpool::Empty);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a consumer that finds a dead producer's partial message alone discards it") {
  // The consumer has read what the dead producer wrote and waits mid-message on an empty ring,
  // with no producer coming: it must notice the writer died, not wait forever.
  {
    procpool::Queue<std::string> q(0, 64 * KiB);
    const std::string big = pattern(16 * MiB, 17);
    procpool::Process dying([&] { q.put(big); });
    dying.start();
    KillIfRunning guard{&dying};
    REQUIRE(eventually([&] { return q.qsize() >= 1; }));
    REQUIRE(wait_until_sleeping(dying.pid()));
    dying.kill();
    dying.join();
    auto t0 = Clock::now();
    CHECK_THROWS_AS(q.get(100ms), procpool::Empty);
    CHECK(Clock::now() - t0 >= 95ms);
    CHECK(q.qsize() == 0);
    q.put("fine");
    CHECK(q.get() == "fine");
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a producer killed mid-message does not block the next producer of a bounded queue") {
  // maxsize 1: the dead producer's half message holds the only slot, and the next producer
  // waits for it while holding the write lock. The consumer must still get past it.
  {
    procpool::Queue<std::string> q(1, 64 * KiB);
    procpool::Queue<std::string> out;
    const std::string big = pattern(16 * MiB, 18);
    procpool::Process dying([&] { q.put(big); });
    dying.start();
    KillIfRunning guard{&dying};
    REQUIRE(eventually([&] { return q.qsize() >= 1; }));
    REQUIRE(wait_until_sleeping(dying.pid()));
    dying.kill();
    dying.join();

    procpool::Process next([&] { q.put("next"); });
    next.start();
    KillIfRunning guard2{&next};
    REQUIRE(wait_until_sleeping(next.pid()));  // waiting for the slot (or already done)
    // The consumer runs in a child so that a hang fails the test instead of the watchdog.
    procpool::Process consumer([&] { out.put(q.get()); });
    consumer.start();
    KillIfRunning guard3{&consumer};
    REQUIRE(out.get(20s) == "next");
    next.join();
    consumer.join();
    CHECK(next.exitcode() == 0);
    CHECK(consumer.exitcode() == 0);
    CHECK(q.qsize() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a consumer killed in the middle of a large message does not block the others") {
  {
    procpool::Queue<std::string> q(0, 64 * KiB);
    const std::string first = pattern(4 * MiB, 1), second = pattern(1 * MiB, 2);
    procpool::Process producer([&] {
      q.put(first);
      q.put(second);
      q.put("third");
    });
    producer.start();
    KillIfRunning guard{&producer};
    // The producer fills the ring with the start of `first` and waits; then it is stopped, so
    // the consumer can drain what is there and no more: it ends up waiting mid-message.
    REQUIRE(eventually([&] { return q.qsize() >= 1; }));
    REQUIRE(wait_until_sleeping(producer.pid()));
    REQUIRE(::kill(producer.pid(), SIGSTOP) == 0);

    procpool::Event getting;
    procpool::Process consumer([&] {
      getting.set();
      (void)q.get();  // sleeps only once it has drained the ring, mid-message
    });
    consumer.start();
    KillIfRunning guard2{&consumer};
    REQUIRE(getting.wait(20s));
    REQUIRE(wait_until_sleeping(consumer.pid()));
    consumer.kill();
    consumer.join();
    CHECK(consumer.exitcode() == -SIGKILL);

    REQUIRE(::kill(producer.pid(), SIGCONT) == 0);
    // The rest of `first` is discarded; the next consumer gets the next whole message.
    std::string got = q.get();
    CHECK(got.size() == second.size());
    CHECK(got == second);
    CHECK(q.get(20s) == "third");
    producer.join();  // it was not left blocked
    CHECK(producer.exitcode() == 0);
    CHECK(q.qsize() == 0);
    q.put("again");
    CHECK(q.get() == "again");
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a consumer killed mid-message of a JoinableQueue counts it as done") {
  {
    procpool::JoinableQueue<std::string> q(0, 64 * KiB);
    procpool::Process producer([&] {
      q.put(pattern(4 * MiB, 3));
      q.put("second");
    });
    producer.start();
    KillIfRunning guard{&producer};
    REQUIRE(eventually([&] { return q.qsize() >= 1; }));
    REQUIRE(wait_until_sleeping(producer.pid()));
    REQUIRE(::kill(producer.pid(), SIGSTOP) == 0);
    procpool::Event getting;
    procpool::Process consumer([&] {
      getting.set();
      (void)q.get();  // sleeps only once it has drained the ring, mid-message
    });
    consumer.start();
    KillIfRunning guard2{&consumer};
    REQUIRE(getting.wait(20s));
    REQUIRE(wait_until_sleeping(consumer.pid()));
    consumer.kill();
    consumer.join();
    REQUIRE(::kill(producer.pid(), SIGCONT) == 0);
    CHECK(q.get() == "second");
    q.task_done();
    producer.join();
    CHECK(q.join(20s));
    CHECK(q.unfinished_tasks() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: a producer that dies holding the write lock between messages blocks nobody") {
  SECTION("waiting for a slot under maxsize") {
    {
      procpool::Queue<int> q(1);
      q.put(1);
      procpool::Process dying([&] { q.put(2); });  // takes the write lock, waits for a slot
      dying.start();
      KillIfRunning guard{&dying};
      REQUIRE(wait_until_sleeping(dying.pid()));
      dying.kill();
      dying.join();
      CHECK(q.qsize() == 1);
      CHECK(q.get() == 1);
      CHECK(q.qsize() == 0);
      q.put(3);
      CHECK(q.qsize() == 1);
      CHECK(q.get() == 3);
      procpool::Process next([&] { q.put(4); });
      next.start();
      next.join();
      CHECK(next.exitcode() == 0);
      CHECK(q.get(20s) == 4);
      CHECK(q.empty());
    }
    CHECK(no_child_processes());
  }
  SECTION("waiting for buffer space") {
    {
      procpool::Queue<std::string> q(0, 4096);
      int n = 0;
      for (;; ++n) {
        try {
          q.put_nowait("item " + std::to_string(n));
        } catch (const procpool::Full&) {
          break;
        }
      }
      REQUIRE(n > 10);
      procpool::Process dying([&] { q.put("never"); });
      dying.start();
      KillIfRunning guard{&dying};
      REQUIRE(wait_until_sleeping(dying.pid()));
      dying.kill();
      dying.join();
      CHECK(static_cast<int>(q.qsize()) == n);
      for (int i = 0; i < n; ++i) REQUIRE(q.get() == "item " + std::to_string(i));
      CHECK_THROWS_AS(q.get_nowait(), procpool::Empty);
      q.put("after");
      CHECK(q.get() == "after");
      CHECK(q.empty());
    }
    CHECK(no_child_processes());
  }
}

TEST_CASE("queue: a put that times out mid-message throws Full and is never delivered") {
  {
    procpool::Queue<std::string> q(0, 64 * KiB);
    const std::string big = pattern(16 * MiB, 4);
    auto t0 = Clock::now();
    CHECK_THROWS_AS(q.put(big, 100ms), procpool::Full);  // nobody reads: the ring fills
    CHECK(Clock::now() - t0 >= 95ms);
    CHECK(q.qsize() == 0);  // a put that failed left nothing behind
    CHECK(q.empty());
    CHECK_THROWS_AS(q.put_nowait(big), procpool::Full);  // its bytes fill the ring until read
    CHECK(q.qsize() == 0);
    // A consumer in another process gets only complete messages.
    procpool::Queue<std::string> out;
    procpool::Process consumer([&] {
      out.put(q.get());
      out.put(q.get());
    });
    consumer.start();
    KillIfRunning guard{&consumer};
    q.put("next");
    REQUIRE(out.get(20s) == "next");
    q.put(big);  // the whole of it, now that someone reads
    CHECK(out.get(20s) == big);
    consumer.join();
    CHECK(consumer.exitcode() == 0);
    CHECK(q.empty());
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: JoinableQueue join does not hang after a put that timed out mid-message") {
  {
    procpool::JoinableQueue<std::string> q(0, 64 * KiB);
    CHECK_THROWS_AS(q.put(pattern(16 * MiB, 5), 50ms), procpool::Full);
    CHECK(q.unfinished_tasks() == 0);
    CHECK(q.join(5s));  // nothing was put
    procpool::Process consumer([&] {
      if (q.get() == "real") q.task_done();
    });
    consumer.start();
    KillIfRunning guard{&consumer};
    q.put("real");  // waits for the consumer to read past the withdrawn bytes
    CHECK(q.join(20s));
    consumer.join();
    CHECK(consumer.exitcode() == 0);
    CHECK(q.unfinished_tasks() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("queue: JoinableQueue join waiting on a message whose put then times out returns") {
  {
    procpool::JoinableQueue<std::string> q(0, 64 * KiB);
    procpool::Process producer([&] {
      try {
        q.put(pattern(16 * MiB, 6), 1s);  // nobody reads: times out mid-message
      } catch (const procpool::Full&) {
        std::_Exit(7);
      }
    });
    producer.start();
    KillIfRunning guard{&producer};
    REQUIRE(eventually([&] { return q.qsize() >= 1; }));
    // Usually asleep here before the put gives up (after 1 s), and woken when it does: not
    // left asleep until its own timeout, which is why the generous upper bound.
    auto t0 = Clock::now();
    CHECK(q.join(40s));
    CHECK(Clock::now() - t0 < 20s);
    producer.join();
    CHECK(producer.exitcode() == 7);
    CHECK(q.unfinished_tasks() == 0);
  }
  CHECK(no_child_processes());
}
