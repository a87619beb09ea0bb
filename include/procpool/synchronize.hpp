#pragma once
/// @file synchronize.hpp
/// Process-shared synchronization: Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition
/// and Barrier, as in Python's multiprocessing.
///
/// Every object lives in an anonymous shared mapping and is shared with child processes by
/// inheritance: create it before the Process or Pool that uses it, then use it in the child as
/// it is (a reference or pointer captured by a task, a copy given to a Process). Copies of an
/// object are handles to the same lock, as with Python objects. These objects are not
/// Serializable: a lock cannot travel as a message, only be inherited.
///
/// Unlike Python, a process that dies holding a Lock or RLock does not leave the others blocked
/// forever: the next lock() throws OwnerDiedError, without holding the lock, and the lock is
/// usable again.

#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "detail/posix.hpp"
#include "detail/shared_region.hpp"
#include "errors.hpp"

namespace procpool {

class Condition;

namespace detail {

[[noreturn]] inline void throw_owner_died(const char* what) {
  throw OwnerDiedError(std::string("procpool: the process that held this ") + what +
                       " died holding it; the lock is free again, but the data it protected may "
                       "be inconsistent");
}

/// The common body of Lock and RLock.
class LockBase {
 public:
  /// Blocks until the calling thread holds the lock.
  /// @throws OwnerDiedError (not holding the lock) if its previous owner died holding it;
  /// std::logic_error if this thread already holds a (non-recursive) Lock.
  void lock() {
    if (!acquire_until(Deadline::never())) {
      throw std::logic_error("procpool: unreachable: an untimed lock timed out");
    }
  }

  /// Takes the lock if it is free now. Returns false if another thread or process holds it.
  /// @throws OwnerDiedError as lock().
  bool try_lock() {
    switch (m_->try_lock()) {
      case LockResult::acquired:
        return true;
      case LockResult::owner_died:
        died();
      default:
        return false;
    }
  }

  /// Releases the lock. @throws std::logic_error if the calling thread does not hold it.
  void unlock() {
    if (!m_->unlock()) {
      throw std::logic_error(std::string("procpool: ") + kind_ +
                             " released by a thread that does not hold it");
    }
  }

  /// Blocks until the lock is held, as lock().
  void acquire() { lock(); }

  /// Waits up to `timeout` for the lock; true if it is now held, false on timeout.
  /// A negative timeout means zero. @throws OwnerDiedError as lock().
  template <class Rep, class Period>
  bool acquire(std::chrono::duration<Rep, Period> timeout) {
    return acquire_until(Deadline::after(timeout));
  }

  /// Releases the lock, as unlock().
  void release() { unlock(); }

 protected:
  LockBase(bool recursive, const char* kind)
      : m_(make_shared_object<RobustMutex>(sizeof(RobustMutex), recursive)), kind_(kind) {}

  bool acquire_until(const Deadline& deadline) {
    switch (m_->lock(deadline)) {
      case LockResult::acquired:
        return true;
      case LockResult::owner_died:
        died();
      case LockResult::timed_out:
      case LockResult::busy:
        return false;
      case LockResult::deadlock:
        if (deadline.is_never()) {
          throw std::logic_error(std::string("procpool: ") + kind_ +
                                 ".lock() by the thread that holds it would wait forever");
        }
        // Nobody else can release a lock this thread holds: waiting out the timeout and failing
        // is exactly what the wait would have come to.
        while (!deadline.expired()) {
          timespec ts;
          const timespec* left = deadline.as_timespec(ts);
          ::nanosleep(left, nullptr);
        }
        return false;
    }
    return false;
  }

  [[noreturn]] void died() {
    m_->make_consistent();
    m_->unlock();
    throw_owner_died(kind_);
  }

  std::shared_ptr<RobustMutex> m_;
  const char* kind_;

  friend class procpool::Condition;
};

}  // namespace detail

/// A non-recursive lock shared between processes (Python's multiprocessing.Lock).
///
/// Meets Lockable, so std::scoped_lock and std::unique_lock work. It is owned by the thread that
/// locked it: only that thread may unlock it (a release by another thread throws), and a second
/// lock() by the owner throws std::logic_error instead of hanging. If the owner dies holding it,
/// the next lock(), try_lock() or acquire() throws OwnerDiedError without taking it; later calls
/// succeed normally.
class Lock : public detail::LockBase {
 public:
  /// Creates an unlocked lock in shared memory. @throws std::system_error if mmap fails.
  Lock() : LockBase(false, "Lock") {}
};

/// A recursive lock shared between processes (Python's multiprocessing.RLock): the owning
/// thread may lock it again and must unlock it as many times. Owner-death rules as for Lock.
class RLock : public detail::LockBase {
 public:
  /// Creates an unlocked recursive lock in shared memory.
  RLock() : LockBase(true, "RLock") {}
};

namespace detail {

struct SemaphoreState {
  SemaphoreState(std::uint32_t v, std::uint32_t b) : value(v), bound(b) {}
  std::atomic<std::uint32_t> value;
  std::atomic<std::uint32_t> waiters{0};
  std::uint32_t bound;  // 0: unbounded
};

class SemaphoreBase {
 public:
  /// Blocks until the counter is above zero, then decrements it.
  void acquire() { acquire_until(Deadline::never()); }

  /// Waits up to `timeout` to decrement the counter; false on timeout (negative means zero).
  template <class Rep, class Period>
  bool acquire(std::chrono::duration<Rep, Period> timeout) {
    return acquire_until(Deadline::after(timeout));
  }

  /// Decrements the counter if it is above zero now; false otherwise.
  bool try_acquire() noexcept { return take(); }

  /// Increments the counter, waking one waiter.
  /// @throws std::logic_error for a BoundedSemaphore already at its initial value.
  void release() {
    std::uint32_t v = s_->value.load(std::memory_order_relaxed);
    for (;;) {
      if (s_->bound != 0 && v >= s_->bound) {
        throw std::logic_error("procpool: BoundedSemaphore released too many times (its value "
                               "would exceed its initial value " +
                               std::to_string(s_->bound) + ")");
      }
      if (s_->value.compare_exchange_weak(v, v + 1, std::memory_order_seq_cst)) break;
    }
    if (s_->waiters.load(std::memory_order_seq_cst) != 0) futex_wake(&s_->value, 1);
  }

  /// The counter now (it may change at once).
  std::size_t get_value() const noexcept { return s_->value.load(); }

  /// acquire(), so that std::scoped_lock and std::unique_lock work.
  void lock() { acquire(); }
  /// try_acquire(), for std::unique_lock and std::lock.
  bool try_lock() noexcept { return try_acquire(); }
  /// release().
  void unlock() { release(); }

 protected:
  SemaphoreBase(std::size_t value, bool bounded)
      : s_(make_shared_object<SemaphoreState>(sizeof(SemaphoreState), checked(value),
                                              bounded ? checked(value) : 0)) {
    if (bounded && value == 0) {
      throw std::invalid_argument("procpool: a BoundedSemaphore needs an initial value above 0");
    }
  }

 private:
  static std::uint32_t checked(std::size_t value) {
    if (value > 0x7fffffffu) throw std::invalid_argument("procpool: semaphore value too large");
    return static_cast<std::uint32_t>(value);
  }

  bool take() noexcept {
    std::uint32_t v = s_->value.load(std::memory_order_relaxed);
    while (v != 0) {
      if (s_->value.compare_exchange_weak(v, v - 1, std::memory_order_acquire)) return true;
    }
    return false;
  }

  bool acquire_until(const Deadline& deadline) {
    if (spin_until([&] { return take(); }, 200)) return true;
    return sleep_until(s_->value, s_->waiters, [&] { return take(); }, deadline);
  }

  std::shared_ptr<SemaphoreState> s_;
};

}  // namespace detail

/// A counting semaphore shared between processes (Python's multiprocessing.Semaphore).
/// Any thread or process may release it. A process that dies holding a count does not give it
/// back, as in Python.
class Semaphore : public detail::SemaphoreBase {
 public:
  /// A semaphore whose counter starts at `value`. @throws std::invalid_argument above 2^31-1.
  explicit Semaphore(std::size_t value = 1) : SemaphoreBase(value, false) {}
};

/// A Semaphore that may never be released above its initial value: such a release throws
/// std::logic_error and changes nothing.
class BoundedSemaphore : public detail::SemaphoreBase {
 public:
  /// A bounded semaphore starting (and capped) at `value`, which must be at least 1.
  explicit BoundedSemaphore(std::size_t value = 1) : SemaphoreBase(value, true) {}
};

namespace detail {
struct EventState {
  std::atomic<std::uint32_t> flag{0};
  std::atomic<std::uint32_t> waiters{0};
};
}  // namespace detail

/// A flag that processes wait on (Python's multiprocessing.Event). Waiting keeps no state that
/// a dying process could leave behind.
class Event {
 public:
  /// A cleared event in shared memory.
  Event() : s_(detail::make_shared_object<detail::EventState>(sizeof(detail::EventState))) {}

  /// Sets the flag and wakes every waiter.
  void set() noexcept {
    s_->flag.store(1, std::memory_order_seq_cst);
    if (s_->waiters.load(std::memory_order_seq_cst) != 0) detail::futex_wake(&s_->flag);
  }
  /// Clears the flag.
  void clear() noexcept { s_->flag.store(0, std::memory_order_seq_cst); }
  /// Whether the flag is set.
  bool is_set() const noexcept { return s_->flag.load(std::memory_order_seq_cst) != 0; }

  /// Blocks until the flag is set.
  void wait() { wait_until(detail::Deadline::never()); }
  /// Blocks until the flag is set or `timeout` passes; returns the flag (false on timeout).
  template <class Rep, class Period>
  bool wait(std::chrono::duration<Rep, Period> timeout) {
    return wait_until(detail::Deadline::after(timeout));
  }

 private:
  bool wait_until(const detail::Deadline& deadline) {
    return detail::sleep_until(s_->flag, s_->waiters, [&] { return is_set(); }, deadline);
  }

  std::shared_ptr<detail::EventState> s_;
};

namespace detail {

inline constexpr std::size_t max_condition_waiters = 256;

struct ConditionSlot {
  enum : std::uint32_t { free = 0, waiting = 1, notified = 2 };
  std::atomic<std::uint32_t> state{free};
  pid_t pid = 0;
  std::uint64_t ticket = 0;
};

// Guarded by the condition's lock, except `state`, which a waiter sleeps on.
struct ConditionState {
  std::uint64_t next_ticket = 0;
  ConditionSlot slots[max_condition_waiters];
};

inline bool process_is_gone(pid_t pid) noexcept {
  return ::kill(pid, 0) == -1 && errno == ESRCH;
}

}  // namespace detail

/// A condition variable shared between processes (Python's multiprocessing.Condition).
///
/// Each waiter has its own slot, so notify(n) wakes exactly the n longest waiters, and a waiter
/// that timed out or died never swallows a notification meant for a live one. The caller must
/// hold the lock around wait and notify calls. Up to 256 processes and threads may wait at once.
/// The condition itself is Lockable (it forwards to its lock), so
/// `std::unique_lock lk(cond)` works.
class Condition {
 public:
  /// A condition with its own RLock, as Python's Condition().
  Condition() : Condition(RLock()) {}
  /// A condition over `lock` (a handle to the same lock is kept).
  explicit Condition(const Lock& lock) : Condition(static_cast<const detail::LockBase&>(lock)) {}
  /// A condition over a recursive lock; wait() releases every level and restores it.
  explicit Condition(const RLock& lock) : Condition(static_cast<const detail::LockBase&>(lock)) {}

  /// Locks the underlying lock (see Lock::lock).
  void lock() { lock_.lock(); }
  /// Try-locks the underlying lock.
  bool try_lock() { return lock_.try_lock(); }
  /// Unlocks the underlying lock.
  void unlock() { lock_.unlock(); }
  /// Locks the underlying lock.
  void acquire() { lock_.lock(); }
  /// Waits up to `timeout` for the underlying lock.
  template <class Rep, class Period>
  bool acquire(std::chrono::duration<Rep, Period> timeout) {
    return lock_.acquire(timeout);
  }
  /// Unlocks the underlying lock.
  void release() { lock_.unlock(); }

  /// Releases the lock, sleeps until notified, and takes the lock back.
  /// @throws OwnerDiedError if the lock's owner died while this waiter slept; the lock is then
  /// held again (so the caller's guard stays right), and the data may be inconsistent.
  /// @throws std::length_error if 256 waiters already wait.
  void wait() { wait_until(detail::Deadline::never()); }

  /// As wait(), for at most `timeout`; false if it timed out without a notification.
  template <class Rep, class Period>
  bool wait(std::chrono::duration<Rep, Period> timeout) {
    return wait_until(detail::Deadline::after(timeout));
  }

  /// Waits until `pred()` is true; returns it (predicate first, as Python's wait_for).
  template <class Pred>
  bool wait_for(Pred pred) {
    while (!pred()) wait();
    return true;
  }

  /// Waits until `pred()` is true or `timeout` passes; returns the last value of pred().
  template <class Pred, class Rep, class Period>
  bool wait_for(Pred pred, std::chrono::duration<Rep, Period> timeout) {
    auto deadline = detail::Deadline::after(timeout);
    bool result = pred();
    while (!result) {
      if (deadline.expired()) return result;
      wait_until(deadline);
      result = pred();
    }
    return result;
  }

  /// Wakes up to `n` waiters, the longest-waiting first. The caller holds the lock.
  void notify(std::size_t n = 1) noexcept {
    auto& st = *state_;
    while (n > 0) {
      detail::ConditionSlot* oldest = nullptr;
      for (auto& slot : st.slots) {
        if (slot.state.load(std::memory_order_relaxed) == detail::ConditionSlot::waiting &&
            (oldest == nullptr || slot.ticket < oldest->ticket)) {
          oldest = &slot;
        }
      }
      if (oldest == nullptr) return;
      if (detail::process_is_gone(oldest->pid)) {
        // Its process died while waiting: a notification given to it would be lost.
        oldest->state.store(detail::ConditionSlot::free, std::memory_order_relaxed);
        continue;
      }
      oldest->state.store(detail::ConditionSlot::notified, std::memory_order_seq_cst);
      detail::futex_wake(&oldest->state, 1);
      --n;
    }
  }

  /// Wakes every waiter. The caller holds the lock.
  void notify_all() noexcept { notify(detail::max_condition_waiters); }

 private:
  explicit Condition(const detail::LockBase& lock)
      : lock_(lock),
        state_(detail::make_shared_object<detail::ConditionState>(
            sizeof(detail::ConditionState))) {}

  detail::ConditionSlot& claim_slot() {
    auto& st = *state_;
    for (int pass = 0; pass < 2; ++pass) {
      for (auto& slot : st.slots) {
        auto s = slot.state.load(std::memory_order_relaxed);
        if (s == detail::ConditionSlot::free ||
            (pass == 1 && s == detail::ConditionSlot::waiting && detail::process_is_gone(slot.pid))) {
          return slot;
        }
      }
    }
    throw std::length_error("procpool: more than 256 waiters on one Condition");
  }

  bool wait_until(const detail::Deadline& deadline) {
    auto& slot = claim_slot();
    slot.pid = ::getpid();
    slot.ticket = state_->next_ticket++;
    slot.state.store(detail::ConditionSlot::waiting, std::memory_order_seq_cst);

    // Release every level of a recursive lock; unlock() fails once this thread no longer owns it.
    int levels = 0;
    while (lock_.m_->unlock()) ++levels;
    if (levels == 0) {
      slot.state.store(detail::ConditionSlot::free);
      throw std::logic_error("procpool: Condition::wait() by a thread that does not hold its lock");
    }

    std::exception_ptr failure;
    try {
      while (slot.state.load(std::memory_order_seq_cst) == detail::ConditionSlot::waiting) {
        if (!detail::futex_wait(&slot.state, detail::ConditionSlot::waiting, deadline)) break;
      }
    } catch (...) {
      failure = std::current_exception();
    }

    bool owner_died = false;
    for (int i = 0; i < levels; ++i) {
      if (lock_.m_->lock(detail::Deadline::never()) == detail::LockResult::owner_died) {
        lock_.m_->make_consistent();
        owner_died = true;
      }
    }
    // A notification that landed after the timeout but before the lock came back still counts:
    // the notifier chose this waiter.
    bool notified =
        slot.state.exchange(detail::ConditionSlot::free) == detail::ConditionSlot::notified;
    if (failure) std::rethrow_exception(failure);
    if (owner_died) {
      throw OwnerDiedError(
          "procpool: a process died holding the lock of this Condition; the lock is held "
          "again, but the data it protected may be inconsistent");
    }
    return notified;
  }

  detail::LockBase lock_;
  std::shared_ptr<detail::ConditionState> state_;
};

namespace detail {
struct BarrierState {
  explicit BarrierState(std::uint32_t n) : m(false), parties(n) {}
  RobustMutex m;
  std::uint32_t parties;
  std::uint32_t count = 0;  // arrivals in the current generation
  std::uint64_t generation = 0;
  bool broken = false;
  // How each recent generation ended (true: broken). A waiter reads its own generation's entry
  // after the generation moved on; 64 entries are far more than can pass while one party of
  // each pass sleeps.
  bool outcome_broken[64] = {};
  std::atomic<std::uint32_t> seq{0};  // bumped whenever waiters must look again
};
}  // namespace detail

/// A barrier for a fixed number of processes (Python's multiprocessing.Barrier), reusable pass
/// after pass.
///
/// wait() returns a distinct index in [0, parties) in each pass. abort() breaks the barrier:
/// every current and later wait() throws BrokenBarrierError until reset(). A wait() that times
/// out breaks the barrier too. An optional action runs once per pass, in the last process to
/// arrive, before any party is released; if it throws, the barrier breaks and that wait()
/// rethrows. A party that dies while waiting is not detected: give waits a timeout if that can
/// happen.
class Barrier {
 public:
  /// A barrier for `parties` (at least 1) processes, with an optional action per pass.
  explicit Barrier(std::size_t parties, std::function<void()> action = {})
      : s_(detail::make_shared_object<detail::BarrierState>(sizeof(detail::BarrierState),
                                                            checked(parties))),
        action_(std::move(action)) {}

  /// Blocks until `parties` processes have called wait(); returns this one's arrival index.
  /// @throws BrokenBarrierError if the barrier is or becomes broken.
  std::size_t wait() { return wait_until(detail::Deadline::never()); }

  /// As wait(), for at most `timeout`; on timeout the barrier breaks and this throws
  /// BrokenBarrierError.
  template <class Rep, class Period>
  std::size_t wait(std::chrono::duration<Rep, Period> timeout) {
    return wait_until(detail::Deadline::after(timeout));
  }

  /// Breaks the barrier: current and later waits throw BrokenBarrierError until reset().
  void abort() {
    Guard g(*s_);
    break_locked();
  }

  /// Returns the barrier to its empty, unbroken state; parties waiting now get
  /// BrokenBarrierError.
  void reset() {
    Guard g(*s_);
    if (!s_->broken && s_->count > 0) end_generation(true);
    s_->broken = false;
  }

  /// The number of processes needed to pass.
  std::size_t parties() const noexcept { return s_->parties; }
  /// The number of processes waiting now.
  std::size_t n_waiting() const {
    Guard g(*s_);
    return s_->broken ? 0 : s_->count;
  }
  /// Whether the barrier is broken.
  bool broken() const {
    Guard g(*s_);
    return s_->broken;
  }

 private:
  // The barrier's own mutex guards a few words; a process that died inside it may have left
  // them half-updated, so the barrier breaks (waiters learn it; reset() makes it usable).
  struct Guard {
    explicit Guard(detail::BarrierState& s) : s_(s) {
      auto r = s_.m.lock(detail::Deadline::never());
      // The action runs under the guard of the wait() that completed the pass; if it asks the
      // barrier something (broken(), n_waiting()), this thread already holds the mutex and
      // must neither take it again nor release it under that wait().
      owns_ = r != detail::LockResult::deadlock;
      if (r == detail::LockResult::owner_died) {
        s_.m.make_consistent();
        if (!s_.broken) {
          s_.outcome_broken[s_.generation % 64] = true;
          ++s_.generation;
          s_.count = 0;
          s_.broken = true;
          s_.seq.fetch_add(1);
          detail::futex_wake(&s_.seq);
        }
      }
    }
    ~Guard() {
      if (owns_) s_.m.unlock();
    }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    detail::BarrierState& s_;
    bool owns_;
  };

  static std::uint32_t checked(std::size_t parties) {
    if (parties == 0 || parties > 0x7fffffffu) {
      throw std::invalid_argument("procpool: a Barrier needs between 1 and 2^31-1 parties");
    }
    return static_cast<std::uint32_t>(parties);
  }

  void end_generation(bool broken) {
    s_->outcome_broken[s_->generation % 64] = broken;
    ++s_->generation;
    s_->count = 0;
    s_->seq.fetch_add(1, std::memory_order_seq_cst);
    detail::futex_wake(&s_->seq);
  }

  void break_locked() {
    if (!s_->broken) end_generation(true);
    s_->broken = true;
  }

  [[noreturn]] static void throw_broken() {
    throw BrokenBarrierError("procpool: the Barrier is broken (aborted, reset, or a wait timed "
                             "out)");
  }

  std::size_t wait_until(const detail::Deadline& deadline) {
    std::uint64_t gen;
    std::size_t index;
    std::uint32_t seen;
    {
      Guard g(*s_);
      if (s_->broken) throw_broken();
      gen = s_->generation;
      index = s_->count++;
      if (s_->count == s_->parties) {
        if (action_) {
          try {
            action_();
          } catch (...) {
            break_locked();
            throw;
          }
        }
        end_generation(false);
        return index;
      }
      seen = s_->seq.load(std::memory_order_seq_cst);
    }
    for (;;) {
      bool woke = detail::futex_wait(&s_->seq, seen, deadline);
      Guard g(*s_);
      if (s_->generation != gen) {
        if (s_->outcome_broken[gen % 64]) throw_broken();
        return index;
      }
      if (!woke || deadline.expired()) {
        break_locked();
        throw_broken();
      }
      seen = s_->seq.load(std::memory_order_seq_cst);
    }
  }

  std::shared_ptr<detail::BarrierState> s_;
  std::function<void()> action_;
};

}  // namespace procpool
