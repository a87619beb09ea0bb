#include <procpool/synchronize.hpp>

#include <catch2/catch.hpp>

#include "support/interrupt.hpp"

#include <procpool/pool.hpp>
#include <procpool/process.hpp>
#include <procpool/shared_memory.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <mutex>
#include <ranges>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>
#include "support/children.hpp"
#include "support/locking.hpp"

using test_support::free_for_another_thread;
using test_support::KillIfRunning;
using test_support::no_child_processes;

// The behaviours of CPython's Lib/test/_test_multiprocessing.py (test_lock, test_rlock,
// test_semaphore, test_event, test_notify, test_waitfor, the barrier tests...) that fit our API,
// with real child processes. Where CPython sleeps to "let the others run", these tests meet on
// events they control (a pipe byte, a Semaphore, a join); timeouts are only watchdogs, except in
// the tests of timeouts themselves, which check a lower bound on the time taken and nothing more.

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr auto watchdog = 30s;
// How much earlier than asked a timed wait may return: none in theory (the deadline is taken
// inside the call), a little for clock granularity.
constexpr auto tolerance = 10ms;
constexpr auto short_timeout = 100ms;

// Fails the child (exit code 1, message on stderr) when something it checks is wrong. Catch's
// CHECK must not run in a child.
void expect(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("child: expected ") + what);
}

// A one-byte message through a pipe: a child says "I hold it" and the parent waits for that
// with a watchdog. Independent of the primitives under test.
class Notice {
 public:
  Notice() { REQUIRE(::pipe2(fds_, O_CLOEXEC) == 0); }
  Notice(const Notice&) = delete;
  Notice& operator=(const Notice&) = delete;
  ~Notice() {
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  void give() noexcept {
    char c = 'x';
    while (::write(fds_[1], &c, 1) < 0 && errno == EINTR) {
    }
  }
  // True once a byte arrived; false if the watchdog fired.
  bool take(std::chrono::milliseconds limit = watchdog) noexcept {
    pollfd p{fds_[0], POLLIN, 0};
    int r;
    while ((r = ::poll(&p, 1, static_cast<int>(limit.count()))) < 0 && errno == EINTR) {
    }
    if (r != 1) return false;
    char c;
    return ::read(fds_[0], &c, 1) == 1;
  }

 private:
  int fds_[2] = {-1, -1};
};

// Starts every process, in order.
void start_all(std::vector<procpool::Process>& ps) {
  for (auto& p : ps) p.start();
}

// Joins every process (with a watchdog) and checks each ended with exit code 0.
void join_all_ok(std::vector<procpool::Process>& ps) {
  for (auto& p : ps) {
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
  }
}

// A child that blocks until killed.
[[noreturn]] void wait_to_be_killed() {
  for (;;) ::pause();
}

template <class D>
auto elapsed_since(Clock::time_point start) {
  return std::chrono::duration_cast<D>(Clock::now() - start);
}

// Spins (yielding) until `ready()`; false if the watchdog fires first. For states that no event
// announces, such as "two parties are inside Barrier::wait".
template <class F>
bool spin_until(F ready) {
  auto give_up = Clock::now() + watchdog;
  while (!ready()) {
    if (Clock::now() > give_up) return false;
    ::sched_yield();
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Lock (CPython test_lock, test_lock_context)

TEST_CASE("synchronize: a Lock is taken, refuses try_lock while held and is released") {
  procpool::Lock lock;
  lock.acquire();
  CHECK_FALSE(lock.try_lock());  // held by this very thread: no recursion
  CHECK_FALSE(free_for_another_thread(lock));
  lock.release();
  CHECK(lock.try_lock());
  lock.unlock();
  CHECK(lock.acquire(0s));
  lock.release();
  CHECK(free_for_another_thread(lock));
}

TEST_CASE("synchronize: releasing an unlocked Lock throws std::logic_error") {
  procpool::Lock lock;
  CHECK_THROWS_AS(lock.release(), std::logic_error);
  CHECK_THROWS_AS(lock.unlock(), std::logic_error);
  lock.acquire();
  lock.release();
  CHECK_THROWS_AS(lock.release(), std::logic_error);
  CHECK(lock.try_lock());  // the failed releases changed nothing
  lock.release();
}

TEST_CASE("synchronize: a Lock locked again by its owner throws instead of hanging") {
  procpool::Lock lock;
  lock.lock();
  CHECK_THROWS_AS(lock.lock(), std::logic_error);
  auto start = Clock::now();
  CHECK_FALSE(lock.acquire(short_timeout));  // nobody else could ever release it
  CHECK(elapsed_since<std::chrono::milliseconds>(start) >= short_timeout - tolerance);
  lock.unlock();
  CHECK(free_for_another_thread(lock));
}

TEST_CASE("synchronize: a Lock held by a child process keeps the parent out until released") {
  {
    procpool::Lock lock;
    Notice holding, go_on;
    procpool::Process p([&] {
      lock.acquire();
      holding.give();
      expect(go_on.take(), "the parent's go-ahead");
      lock.release();
    });
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(holding.take());
    CHECK_FALSE(lock.try_lock());
    CHECK_FALSE(lock.acquire(0s));
    auto start = Clock::now();
    CHECK_FALSE(lock.acquire(short_timeout));
    CHECK(elapsed_since<std::chrono::milliseconds>(start) >= short_timeout - tolerance);
    go_on.give();
    REQUIRE(lock.acquire(watchdog));  // the child releases it
    lock.release();
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: a child process cannot release a Lock the parent holds") {
  {
    procpool::Lock lock;
    lock.acquire();
    procpool::Process p([&] {
      bool threw = false;
      try {
        lock.release();
      } catch (const std::logic_error&) {
        threw = true;
      }
      expect(threw, "release by a non-owner to throw std::logic_error");
      expect(!lock.try_lock(), "the lock to stay held by the parent");
    });
    p.start();
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    lock.release();  // still the parent's
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: std::scoped_lock and std::unique_lock hold a Lock for their scope") {
  procpool::Lock lock;
  {
    std::scoped_lock lk(lock);
    CHECK_FALSE(free_for_another_thread(lock));
  }
  CHECK(free_for_another_thread(lock));
  {
    std::unique_lock lk(lock, std::try_to_lock);
    CHECK(lk.owns_lock());
    CHECK_FALSE(free_for_another_thread(lock));
    lk.unlock();
    CHECK(free_for_another_thread(lock));
  }
  // A copy is a handle to the same lock, as a Python object passed around.
  procpool::Lock copy = lock;
  {
    std::scoped_lock lk(copy);
    CHECK_FALSE(lock.try_lock());
  }
  CHECK(lock.try_lock());
  lock.release();
}

TEST_CASE("synchronize: a Lock makes the increments of pool workers exact") {
  procpool::Value<int> counter(0);
  procpool::Lock lock;
  {
    procpool::Pool pool(2);  // built after the lock and the counter, so its workers share them
    auto ones = pool.map(
        [&counter, &lock](int) {
          std::scoped_lock lk(lock);
          int seen = counter.value();  // a read-modify-write that loses updates without the lock
          counter.value() = seen + 1;
          return 1;
        },
        std::views::iota(0, 1000));
    CHECK(ones.size() == 1000);
    pool.close();
    pool.join();
  }
  CHECK(counter.value() == 1000);
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// RLock (CPython test_rlock)

TEST_CASE("synchronize: an RLock is taken again by its owner and released as many times") {
  {
    procpool::RLock lock;
    lock.acquire();
    lock.acquire();
    CHECK(lock.try_lock());
    CHECK(lock.acquire(0s));
    CHECK_FALSE(free_for_another_thread(lock));
    procpool::Process p([&] {
      expect(!lock.try_lock(), "try_lock of a lock the parent holds to fail");
      expect(!lock.acquire(10ms), "a timed acquire of a lock the parent holds to fail");
    });
    p.start();
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    for (int i = 0; i < 3; ++i) {
      lock.release();
      CHECK_FALSE(free_for_another_thread(lock));  // still held: 4 acquires, 1 + i releases
    }
    lock.release();
    CHECK(free_for_another_thread(lock));
    CHECK_THROWS_AS(lock.release(), std::logic_error);
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: releasing an RLock from a process or thread that does not own it throws") {
  {
    procpool::RLock lock;
    lock.acquire();
    lock.acquire();
    procpool::Process p([&] {
      bool threw = false;
      try {
        lock.release();
      } catch (const std::logic_error&) {
        threw = true;
      }
      expect(threw, "release by a non-owner process to throw std::logic_error");
      expect(!lock.try_lock(), "the lock to stay held by the parent");
    });
    p.start();
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    bool threw = false;
    std::thread t([&] {
      try {
        lock.release();
      } catch (const std::logic_error&) {
        threw = true;
      }
    });
    t.join();
    CHECK(threw);
    lock.release();
    lock.release();
    CHECK(free_for_another_thread(lock));
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Owner death

namespace {

// Runs a child that takes `lock` `times` times and then dies holding it: by _exit, or by
// SIGKILL from the parent once it has said that it holds it. Returns when the child is reaped.
template <class L>
void die_holding(L& lock, int times, bool by_sigkill) {
  Notice holding;
  procpool::Process p([&] {
    for (int i = 0; i < times; ++i) lock.acquire();
    if (!by_sigkill) ::_exit(0);
    holding.give();
    wait_to_be_killed();
  });
  KillIfRunning guard{&p};
  p.start();
  if (by_sigkill) {
    REQUIRE(holding.take());
    p.kill();
  }
  REQUIRE(p.join(watchdog));
  CHECK(p.exitcode() == (by_sigkill ? -SIGKILL : 0));
}

template <class L>
void check_owner_died_once(L& lock, const std::string& how) {
  INFO("the next call: " << how);
  std::string what = "nothing thrown";
  try {
    if (how == "lock") {
      lock.lock();
    } else if (how == "try_lock") {
      (void)lock.try_lock();
    } else {
      (void)lock.acquire(watchdog);
    }
  } catch (const procpool::OwnerDiedError& e) {
    what = e.what();
  }
  CHECK_THAT(what, Catch::Contains("died holding it"));
  // The call that reported the death does not hold the lock: another thread takes it at once.
  CHECK(free_for_another_thread(lock));
  // Later calls succeed normally.
  CHECK(lock.try_lock());
  lock.unlock();
  CHECK_NOTHROW(lock.lock());
  lock.unlock();
  {
    std::scoped_lock lk(lock);
    CHECK_FALSE(free_for_another_thread(lock));
  }
  CHECK(free_for_another_thread(lock));
}

}  // namespace

TEST_CASE("synchronize: a Lock whose owner died throws OwnerDiedError once") {
  const bool by_sigkill = GENERATE(false, true);
  const std::string how = GENERATE(as<std::string>{}, "lock", "try_lock", "acquire");
  INFO((by_sigkill ? "the owner was killed by SIGKILL" : "the owner called _exit"));
  procpool::Lock lock;
  die_holding(lock, 1, by_sigkill);
  check_owner_died_once(lock, how);
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: an RLock taken twice by a process that died throws OwnerDiedError once") {
  const bool by_sigkill = GENERATE(false, true);
  const std::string how = GENERATE(as<std::string>{}, "lock", "try_lock", "acquire");
  INFO((by_sigkill ? "the owner was killed by SIGKILL" : "the owner called _exit"));
  procpool::RLock lock;
  die_holding(lock, 2, by_sigkill);
  check_owner_died_once(lock, how);
  // Recursion works as before.
  lock.lock();
  lock.lock();
  lock.unlock();
  CHECK_FALSE(free_for_another_thread(lock));
  lock.unlock();
  CHECK(free_for_another_thread(lock));
  CHECK(no_child_processes());
}

TEST_CASE(
    "synchronize: a parent blocked on a Lock is woken with OwnerDiedError when the holder is "
    "killed") {
  const bool timed = GENERATE(false, true);
  INFO((timed ? "acquire(timeout)" : "lock()"));
  {
    procpool::Lock lock;
    Notice holding;
    procpool::Process p([&] {
      lock.acquire();
      holding.give();
      wait_to_be_killed();
    });
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(holding.take());
    // Another thread kills the holder once this thread is asleep (in the lock, almost always;
    // if it is killed sooner, the lock reports the death at once, which is right too).
    const pid_t me = ::gettid();
    std::thread killer([&] {
      (void)test_support::wait_until_sleeping(me);
      p.kill();
    });
    if (timed) {
      CHECK_THROWS_AS(lock.acquire(watchdog), procpool::OwnerDiedError);
    } else {
      CHECK_THROWS_AS(lock.lock(), procpool::OwnerDiedError);
    }
    killer.join();
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == -SIGKILL);
    CHECK(free_for_another_thread(lock));
    CHECK(lock.try_lock());
    lock.unlock();
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "synchronize: one of several processes blocked on a dead owner's Lock gets OwnerDiedError") {
  {
    procpool::Lock lock;
    procpool::Value<int> died(0), took(0);
    procpool::Semaphore ready(0);
    Notice holding;
    procpool::Process owner([&] {
      lock.acquire();
      holding.give();
      wait_to_be_killed();
    });
    KillIfRunning owner_guard{&owner};
    owner.start();
    REQUIRE(holding.take());
    std::vector<procpool::Process> waiters;
    for (int i = 0; i < 3; ++i) {
      waiters.emplace_back([&] {
        ready.release();
        try {
          lock.lock();
        } catch (const procpool::OwnerDiedError&) {
          std::scoped_lock lk(died.get_lock());
          ++died.value();
          return;
        }
        {
          std::scoped_lock lk(took.get_lock());
          ++took.value();
        }
        lock.unlock();
      });
    }
    KillIfRunning guard(waiters);
    start_all(waiters);
    for (int i = 0; i < 3; ++i) REQUIRE(ready.acquire(watchdog));
    owner.kill();
    REQUIRE(owner.join(watchdog));
    join_all_ok(waiters);
    CHECK(died.value() == 1);
    CHECK(took.value() == 2);
    CHECK(lock.try_lock());
    lock.unlock();
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Semaphore and BoundedSemaphore (CPython test_semaphore, test_bounded_semaphore, test_timeout)

TEST_CASE("synchronize: a Semaphore counts acquires and releases") {
  procpool::Semaphore sem(2);
  CHECK(sem.get_value() == 2);
  sem.acquire();
  CHECK(sem.get_value() == 1);
  CHECK(sem.acquire(0s));
  CHECK(sem.get_value() == 0);
  CHECK_FALSE(sem.try_acquire());
  CHECK_FALSE(sem.acquire(0s));
  sem.release();
  CHECK(sem.get_value() == 1);
  sem.release();
  CHECK(sem.get_value() == 2);
  sem.release();  // an unbounded semaphore may go above its start
  CHECK(sem.get_value() == 3);
  {
    std::scoped_lock lk(sem);
    CHECK(sem.get_value() == 2);
  }
  CHECK(sem.get_value() == 3);
  CHECK(procpool::Semaphore().get_value() == 1);
  CHECK_THROWS_AS(procpool::Semaphore(std::size_t{1} << 40), std::invalid_argument);
}

TEST_CASE(
    "synchronize: a BoundedSemaphore released above its initial value throws std::logic_error") {
  procpool::BoundedSemaphore sem(2);
  CHECK_THROWS_AS(sem.release(), std::logic_error);
  CHECK(sem.get_value() == 2);
  sem.acquire();
  sem.acquire();
  CHECK(sem.get_value() == 0);
  sem.release();
  sem.release();
  CHECK(sem.get_value() == 2);
  CHECK_THROWS_WITH(sem.release(), Catch::Contains("released too many times"));
  CHECK(sem.get_value() == 2);  // unchanged
  CHECK_THROWS_AS(procpool::BoundedSemaphore(0), std::invalid_argument);
}

TEST_CASE("synchronize: a Semaphore acquire with a timeout returns false after the timeout") {
  procpool::Semaphore sem(0);
  procpool::BoundedSemaphore bounded(1);
  bounded.acquire();
  CHECK_FALSE(sem.acquire(0s));
  CHECK_FALSE(sem.acquire(-1s));  // a negative timeout means zero
  auto times_out = [](auto& s) {
    auto start = Clock::now();
    CHECK_FALSE(s.acquire(short_timeout));
    CHECK(elapsed_since<std::chrono::milliseconds>(start) >= short_timeout - tolerance);
    CHECK(s.get_value() == 0);
  };
  times_out(sem);
  times_out(bounded);
}

TEST_CASE("synchronize: a Semaphore released by a child wakes the parent blocked in acquire") {
  {
    procpool::Semaphore sem(0);
    const pid_t parent = ::getpid();
    procpool::Process p([&] {
      (void)test_support::wait_until_sleeping(parent);  // most often: asleep in acquire()
      sem.release();
    });
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(sem.acquire(watchdog));
    CHECK(sem.get_value() == 0);
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: five children blocked on a Semaphore are let through one per release") {
  {
    procpool::Semaphore sem(0), ready(0), through(0);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 5; ++i) {
      children.emplace_back([&] {
        ready.release();
        expect(sem.acquire(watchdog), "a release for every child");
        through.release();
      });
    }
    KillIfRunning guard(children);
    start_all(children);
    for (int i = 0; i < 5; ++i) REQUIRE(ready.acquire(watchdog));
    for (int i = 1; i <= 5; ++i) {
      sem.release();
      REQUIRE(through.acquire(watchdog));
      CHECK(through.get_value() == 0);  // exactly one went through per release
    }
    join_all_ok(children);
    CHECK(sem.get_value() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: a Semaphore of 3 never lets more than 3 of 8 processes in at once") {
  {
    procpool::Semaphore sem(3);
    procpool::Value<int> inside(0), most(0), entered(0);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 8; ++i) {
      children.emplace_back([&] {
        for (int round = 0; round < 50; ++round) {
          std::scoped_lock in(sem);
          {
            std::scoped_lock lk(inside.get_lock());
            ++inside.value();
            ++entered.value();
            most.value() = std::max(most.value(), inside.value());
          }
          ::sched_yield();
          std::scoped_lock lk(inside.get_lock());
          --inside.value();
        }
      });
    }
    KillIfRunning guard(children);
    start_all(children);
    join_all_ok(children);
    CHECK(entered.value() == 8 * 50);
    CHECK(inside.value() == 0);
    CHECK(most.value() >= 1);
    CHECK(most.value() <= 3);
    CHECK(sem.get_value() == 3);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Event (CPython test_event)

TEST_CASE("synchronize: an Event wait with a timeout returns false while it is clear") {
  procpool::Event event;
  CHECK_FALSE(event.is_set());
  CHECK_FALSE(event.wait(0s));
  CHECK_FALSE(event.wait(-1s));
  auto start = Clock::now();
  CHECK_FALSE(event.wait(short_timeout));
  CHECK(elapsed_since<std::chrono::milliseconds>(start) >= short_timeout - tolerance);
  event.set();
  CHECK(event.is_set());
  event.wait();  // returns at once
  CHECK(event.wait(0s));
  CHECK(event.wait(watchdog));
  event.set();  // setting a set event changes nothing
  CHECK(event.is_set());
  event.clear();
  CHECK_FALSE(event.is_set());
  CHECK_FALSE(event.wait(0s));
}

TEST_CASE("synchronize: an Event set by a child wakes the waiting parent") {
  {
    procpool::Event event;
    const pid_t parent = ::getpid();
    procpool::Process p([&] {
      (void)test_support::wait_until_sleeping(parent);  // most often: asleep in wait()
      event.set();
    });
    KillIfRunning guard{&p};
    p.start();
    CHECK(event.wait(watchdog));
    CHECK(event.is_set());
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    event.clear();
    CHECK_FALSE(event.is_set());
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: an Event set by the parent wakes every waiting child") {
  {
    procpool::Event event;
    procpool::Semaphore waiting(0);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 4; ++i) {
      children.emplace_back(
          [&](bool timed) {
            waiting.release();
            if (timed) {
              expect(event.wait(watchdog), "the event to be set");
            } else {
              event.wait();
            }
            expect(event.is_set(), "the event to be set");
          },
          i % 2 == 0);
    }
    KillIfRunning guard(children);
    start_all(children);
    for (int i = 0; i < 4; ++i) REQUIRE(waiting.acquire(watchdog));
    event.set();
    join_all_ok(children);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Condition (CPython test_notify, test_notify_all, test_notify_n, test_timeout, test_waitfor,
// test_waitfor_timeout)
//
// A child takes the condition's lock, releases `sleeping`, and waits. Since it released
// `sleeping` while holding the lock and registers as a waiter before it lets the lock go, the
// parent knows every child it counted on `sleeping` is waiting once it holds the lock itself.

namespace {

// Starts `n` children that wait on `cond` (with a watchdog) and then release `woken`, recording
// in `order` (if given) the order in which they woke.
std::vector<procpool::Process> sleepers(int n, procpool::Condition& cond,
                                        procpool::Semaphore& sleeping, procpool::Semaphore& woken,
                                        procpool::Array<int>* order = nullptr,
                                        procpool::Value<int>* next = nullptr) {
  std::vector<procpool::Process> children;
  for (int i = 0; i < n; ++i) {
    children.emplace_back(
        [&cond, &sleeping, &woken, order, next](int id) {
          std::unique_lock lk(cond);
          sleeping.release();
          expect(cond.wait(watchdog), "a notification before the watchdog");
          if (order) (*order)[static_cast<std::size_t>(next->value()++)] = id;
          woken.release();
        },
        i);
  }
  return children;
}

}  // namespace

TEST_CASE(
    "synchronize: Condition notify wakes exactly one of two sleeping children and notify_all the "
    "other") {
  {
    procpool::Condition cond{procpool::Lock()};
    procpool::Semaphore sleeping(0), woken(0);
    procpool::Array<int> order(2, -1);
    procpool::Value<int> next(0);
    auto children = sleepers(2, cond, sleeping, woken, &order, &next);
    KillIfRunning guard(children);
    // One at a time, so that child 0 is known to be the longest waiter.
    for (auto& child : children) {
      child.start();
      REQUIRE(sleeping.acquire(watchdog));
    }
    {
      std::scoped_lock lk(cond);
      cond.notify();
    }
    REQUIRE(woken.acquire(watchdog));
    {
      std::scoped_lock lk(cond);
      CHECK(next.value() == 1);  // only one woke: the other was never notified
      CHECK(woken.get_value() == 0);
      cond.notify_all();
    }
    REQUIRE(woken.acquire(watchdog));
    join_all_ok(children);
    CHECK(woken.get_value() == 0);
    CHECK(next.value() == 2);
    CHECK(order[0] == 0);  // the longest waiter went first
    CHECK(order[1] == 1);
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: Condition notify(n) wakes n waiters and notify_all the rest") {
  {
    procpool::Condition cond;  // its own RLock
    procpool::Semaphore sleeping(0), woken(0);
    auto children = sleepers(6, cond, sleeping, woken);
    KillIfRunning guard(children);
    start_all(children);
    for (int i = 0; i < 6; ++i) REQUIRE(sleeping.acquire(watchdog));
    {
      std::scoped_lock lk(cond);
      cond.notify(2);
    }
    for (int i = 0; i < 2; ++i) REQUIRE(woken.acquire(watchdog));
    {
      std::scoped_lock lk(cond);
      CHECK(woken.get_value() == 0);  // the other four are still waiting
      cond.notify(3);
    }
    for (int i = 0; i < 3; ++i) REQUIRE(woken.acquire(watchdog));
    {
      std::scoped_lock lk(cond);
      CHECK(woken.get_value() == 0);
      cond.notify_all();
    }
    REQUIRE(woken.acquire(watchdog));
    join_all_ok(children);
    CHECK(woken.get_value() == 0);  // six woke in all
    {
      std::scoped_lock lk(cond);
      cond.notify(10);  // nobody waits: nothing happens
      cond.notify_all();
    }
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: Condition wait with a timeout returns false and holds the lock again") {
  procpool::Lock lock;
  procpool::Condition cond(lock);
  std::unique_lock lk(cond);
  auto start = Clock::now();
  CHECK_FALSE(cond.wait(short_timeout));
  CHECK(elapsed_since<std::chrono::milliseconds>(start) >= short_timeout - tolerance);
  CHECK_FALSE(cond.wait(0s));
  CHECK_FALSE(free_for_another_thread(lock));  // held again
  lk.unlock();
  CHECK(free_for_another_thread(lock));
}

TEST_CASE("synchronize: Condition wait without holding its lock throws std::logic_error") {
  procpool::Condition cond{procpool::Lock()};
  CHECK_THROWS_AS(cond.wait(0s), std::logic_error);
  CHECK_THROWS_AS(cond.wait(), std::logic_error);
  CHECK_THROWS_AS(cond.wait_for([] { return false; }), std::logic_error);
  // Nothing was left registered: a later waiter is the one notified.
  CHECK(cond.try_lock());
  cond.notify_all();
  CHECK_FALSE(cond.wait(0s));
  cond.release();
}

TEST_CASE(
    "synchronize: Condition wait over an RLock held twice releases every level and restores them") {
  {
    procpool::RLock lock;
    procpool::Condition cond(lock);
    procpool::Process p([&] {
      std::scoped_lock lk(cond);  // only possible while the parent waits
      cond.notify();
    });
    KillIfRunning guard{&p};
    lock.acquire();
    lock.acquire();
    p.start();
    CHECK(cond.wait(watchdog));
    CHECK_FALSE(free_for_another_thread(lock));
    lock.release();
    CHECK_FALSE(free_for_another_thread(lock));  // the second level came back too
    lock.release();
    CHECK(free_for_another_thread(lock));
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: Condition wait_for returns once a child makes the predicate true") {
  {
    procpool::Condition cond;
    procpool::Semaphore sleeping(0);
    procpool::Value<int> state(0);
    procpool::Value<int> checks(0);
    const bool timed = GENERATE(false, true);
    INFO((timed ? "wait_for(pred, timeout)" : "wait_for(pred)"));
    procpool::Process p([&] {
      std::scoped_lock lk(cond);
      sleeping.release();
      auto pred = [&] {
        ++checks.value();
        return state.value() == 4;
      };
      bool result = timed ? cond.wait_for(pred, watchdog) : cond.wait_for(pred);
      expect(result, "wait_for to return true");
      expect(state.value() == 4, "the predicate's state to hold on return");
    });
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(sleeping.acquire(watchdog));
    for (int i = 0; i < 4; ++i) {
      std::scoped_lock lk(cond);
      ++state.value();
      cond.notify();
    }
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    CHECK(checks.value() >= 2);  // the predicate was false first, then true
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "synchronize: Condition wait_for with a timeout returns false while the predicate stays "
    "false") {
  {
    procpool::Condition cond;
    procpool::Value<int> state(0);
    std::unique_lock lk(cond);
    CHECK(cond.wait_for([] { return true; }, 0s));  // true at once, no waiting
    CHECK_FALSE(cond.wait_for([&] { return state.value() == 4; }, 0s));
    auto start = Clock::now();
    CHECK_FALSE(cond.wait_for([&] { return state.value() == 4; }, short_timeout));
    CHECK(elapsed_since<std::chrono::milliseconds>(start) >= short_timeout - tolerance);

    // Notifications that leave the predicate false do not end the wait early.
    procpool::Semaphore notified(0);
    procpool::Process p([&] {
      for (int i = 0; i < 3; ++i) {
        std::scoped_lock lk2(cond);
        ++state.value();
        cond.notify();
      }
      notified.release();
    });
    KillIfRunning guard{&p};
    p.start();
    start = Clock::now();
    CHECK_FALSE(cond.wait_for([&] { return state.value() == 4; }, 2 * short_timeout));
    CHECK(elapsed_since<std::chrono::milliseconds>(start) >= 2 * short_timeout - tolerance);
    lk.unlock();
    REQUIRE(notified.acquire(watchdog));
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    CHECK(state.value() == 3);
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "synchronize: a Condition waiter whose lock holder died wakes with OwnerDiedError holding the "
    "lock") {
  const bool by_sigkill = GENERATE(false, true);
  INFO((by_sigkill ? "the holder was killed by SIGKILL" : "the holder called _exit"));
  {
    procpool::Lock lock;
    procpool::Condition cond(lock);
    procpool::Semaphore sleeping(0);
    procpool::Process waiter([&] {
      cond.acquire();
      sleeping.release();
      bool died = false;
      try {
        (void)cond.wait(watchdog);
      } catch (const procpool::OwnerDiedError&) {
        died = true;
      }
      expect(died, "wait to throw OwnerDiedError");
      cond.release();  // it holds the lock again: this must not throw
    });
    Notice holding;
    procpool::Process holder([&] {
      cond.acquire();
      cond.notify();  // the waiter wakes, and needs the lock back
      if (!by_sigkill) ::_exit(0);
      holding.give();
      wait_to_be_killed();
    });
    KillIfRunning guard{&waiter, &holder};
    waiter.start();
    REQUIRE(sleeping.acquire(watchdog));
    holder.start();
    if (by_sigkill) {
      REQUIRE(holding.take());
      holder.kill();
    }
    REQUIRE(holder.join(watchdog));
    REQUIRE(waiter.join(watchdog));
    CHECK(waiter.exitcode() == 0);
    // The waiter made the lock consistent and released it: later locks succeed normally.
    CHECK_NOTHROW(lock.lock());
    lock.unlock();
    CHECK(free_for_another_thread(lock));
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Barrier (CPython test_barrier, test_action, test_abort, test_reset, test_timeout,
// test_abort_and_reset)

namespace {

// Five parties (four children and this process) pass `passes` times; every wait's index is
// written to an Array and checked: in each pass, the indexes are 0..4 in some order.
void barrier_passes(int passes) {
  constexpr int parties = 5;
  {
    procpool::Barrier barrier(parties);
    procpool::Array<int> index(static_cast<std::size_t>(passes * parties), -1);
    auto pass_all = [&barrier, &index, passes](int party) {
      for (int pass = 0; pass < passes; ++pass) {
        index[static_cast<std::size_t>(pass * parties + party)] =
            static_cast<int>(barrier.wait(watchdog));
      }
    };
    std::vector<procpool::Process> children;
    for (int party = 0; party < parties - 1; ++party) children.emplace_back(pass_all, party);
    KillIfRunning guard(children);
    start_all(children);
    REQUIRE_NOTHROW(pass_all(parties - 1));
    join_all_ok(children);
    int bad_passes = 0;
    for (int pass = 0; pass < passes; ++pass) {
      std::vector<int> seen(index.begin() + pass * parties, index.begin() + (pass + 1) * parties);
      std::sort(seen.begin(), seen.end());
      if (seen != std::vector<int>{0, 1, 2, 3, 4}) {
        UNSCOPED_INFO("pass " << pass << " gave " << Catch::Detail::stringify(seen));
        ++bad_passes;
      }
    }
    CHECK(bad_passes == 0);
    CHECK(barrier.n_waiting() == 0);
    CHECK_FALSE(barrier.broken());
    CHECK(barrier.parties() == 5);
  }
  CHECK(no_child_processes());
}

}  // namespace

TEST_CASE("synchronize: a Barrier of five gives each party a distinct index in each of 10 passes") {
  barrier_passes(10);
}

TEST_CASE(
    "synchronize: a Barrier of five gives each party a distinct index in each of 1000 passes") {
  barrier_passes(1000);
}

TEST_CASE("synchronize: a Barrier of one party passes at once") {
  procpool::Barrier barrier(1);
  CHECK(barrier.wait() == 0);
  CHECK(barrier.wait(0s) == 0);
  CHECK_THROWS_AS(procpool::Barrier(0), std::invalid_argument);
}

TEST_CASE("synchronize: an aborted Barrier throws BrokenBarrierError in current and later waits") {
  {
    procpool::Barrier barrier(3);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 2; ++i) {
      children.emplace_back([&] {
        for (int attempt = 0; attempt < 2; ++attempt) {  // the wait it was in, then a later one
          bool broken = false;
          try {
            (void)barrier.wait(watchdog);
          } catch (const procpool::BrokenBarrierError&) {
            broken = true;
          }
          expect(broken, "BrokenBarrierError from an aborted barrier");
        }
      });
    }
    KillIfRunning guard(children);
    start_all(children);
    REQUIRE(spin_until([&] { return barrier.n_waiting() == 2; }));
    barrier.abort();
    CHECK(barrier.broken());
    CHECK(barrier.n_waiting() == 0);
    CHECK_THROWS_AS(barrier.wait(), procpool::BrokenBarrierError);
    CHECK_THROWS_AS(barrier.wait(watchdog), procpool::BrokenBarrierError);
    join_all_ok(children);
    barrier.abort();  // again: nothing changes
    CHECK(barrier.broken());
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: a reset Barrier breaks the current waits and is usable again") {
  {
    procpool::Barrier barrier(3);
    procpool::Array<int> index(3, -1);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 2; ++i) {
      children.emplace_back(
          [&](int party) {
            bool broken = false;
            try {
              (void)barrier.wait(watchdog);
            } catch (const procpool::BrokenBarrierError&) {
              broken = true;
            }
            expect(broken, "BrokenBarrierError from the reset");
            index[static_cast<std::size_t>(party)] = static_cast<int>(barrier.wait(watchdog));
          },
          i);
    }
    KillIfRunning guard(children);
    start_all(children);
    REQUIRE(spin_until([&] { return barrier.n_waiting() == 2; }));
    barrier.reset();
    CHECK_FALSE(barrier.broken());
    index[2] = static_cast<int>(barrier.wait(watchdog));  // passes with the two children
    join_all_ok(children);
    std::vector<int> seen(index.begin(), index.end());
    std::sort(seen.begin(), seen.end());
    CHECK(seen == std::vector<int>{0, 1, 2});
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: an aborted then reset Barrier passes again") {
  {
    procpool::Barrier barrier(2);
    barrier.abort();
    CHECK(barrier.broken());
    barrier.reset();
    CHECK_FALSE(barrier.broken());
    procpool::Value<int> child_index(-1);
    procpool::Process p([&] { child_index.value() = static_cast<int>(barrier.wait(watchdog)); });
    KillIfRunning guard{&p};
    p.start();
    const int mine = static_cast<int>(barrier.wait(watchdog));
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    CHECK(mine + child_index.value() == 1);  // 0 and 1
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: a Barrier wait that times out breaks the barrier for the other parties") {
  {
    procpool::Barrier barrier(3);
    procpool::Process p([&] {
      bool broken = false;
      try {
        (void)barrier.wait(watchdog);
      } catch (const procpool::BrokenBarrierError&) {
        broken = true;
      }
      expect(broken, "BrokenBarrierError after another party's timeout");
    });
    KillIfRunning guard{&p};
    p.start();
    auto start = Clock::now();
    CHECK_THROWS_AS(barrier.wait(short_timeout), procpool::BrokenBarrierError);  // only 2 of 3
    CHECK(elapsed_since<std::chrono::milliseconds>(start) >= short_timeout - tolerance);
    CHECK(barrier.broken());
    REQUIRE(p.join(watchdog));
    CHECK(p.exitcode() == 0);
    CHECK_THROWS_AS(barrier.wait(), procpool::BrokenBarrierError);
  }
  CHECK(no_child_processes());
}

TEST_CASE("synchronize: a Barrier action runs exactly once per pass before any party goes on") {
  {
    constexpr int passes = 20;
    procpool::Value<int> actions(0);
    procpool::Barrier barrier(3, [&actions] { ++actions.value(); });
    auto pass_all = [&barrier, &actions] {
      for (int pass = 0; pass < passes; ++pass) {
        (void)barrier.wait(watchdog);
        // The next pass needs this party, so exactly pass + 1 actions have run.
        expect(actions.load() == pass + 1, "one action per pass, before the parties go on");
      }
    };
    std::vector<procpool::Process> children;
    for (int i = 0; i < 2; ++i) children.emplace_back(pass_all);
    KillIfRunning guard(children);
    start_all(children);
    REQUIRE_NOTHROW(pass_all());
    join_all_ok(children);
    CHECK(actions.value() == passes);
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "synchronize: a Barrier whose action throws breaks and the last party gets the exception") {
  {
    procpool::Barrier barrier(3, [] { throw std::runtime_error("action failed"); });
    // Per party: 1 for the action's exception, 2 for BrokenBarrierError, 3 for passing.
    procpool::Array<int> outcome(3);
    auto one_wait = [&barrier, &outcome](int party) {
      int result = 3;
      try {
        (void)barrier.wait(watchdog);
      } catch (const procpool::BrokenBarrierError&) {
        result = 2;
      } catch (const std::runtime_error& e) {
        result = std::string(e.what()) == "action failed" ? 1 : 4;
      }
      outcome[static_cast<std::size_t>(party)] = result;
    };
    std::vector<procpool::Process> children;
    for (int party = 0; party < 2; ++party) children.emplace_back(one_wait, party);
    KillIfRunning guard(children);
    start_all(children);
    one_wait(2);
    join_all_ok(children);
    CHECK(std::count(outcome.begin(), outcome.end(), 1) == 1);
    CHECK(std::count(outcome.begin(), outcome.end(), 2) == 2);
    CHECK(barrier.broken());
    CHECK_THROWS_AS(barrier.wait(), procpool::BrokenBarrierError);
  }
  CHECK(no_child_processes());
}

// Fixed bug: the action runs while the barrier's own mutex is held; asking the barrier
// something from it took the mutex "again" (EDEADLK, ignored) and then released it, so the rest
// of that pass ran unguarded.
TEST_CASE("synchronize: a Barrier action may ask the barrier whether it is broken and who waits") {
  {
    constexpr int passes = 5;
    procpool::Value<int> broken_seen(0), waiting_seen(0), actions(0);
    procpool::Barrier* self = nullptr;
    procpool::Barrier barrier(3, [&] {
      ++actions.value();
      if (self->broken()) ++broken_seen.value();
      waiting_seen.value() += static_cast<int>(self->n_waiting());
    });
    self = &barrier;
    auto pass_all = [&barrier] {
      for (int pass = 0; pass < passes; ++pass) (void)barrier.wait(watchdog);
    };
    std::vector<procpool::Process> children;
    for (int i = 0; i < 2; ++i) children.emplace_back(pass_all);
    KillIfRunning guard(children);
    start_all(children);
    REQUIRE_NOTHROW(pass_all());
    join_all_ok(children);
    CHECK(actions.value() == passes);
    CHECK(broken_seen.value() == 0);
    CHECK(waiting_seen.value() == 3 * passes);  // all three have arrived, as in Python
    CHECK_FALSE(barrier.broken());
    CHECK(barrier.n_waiting() == 0);
  }
  CHECK(no_child_processes());
}
