#pragma once
// The building blocks of everything procpool shares between processes by inheritance:
// anonymous MAP_SHARED mappings, futex waits on words inside them, and robust process-shared
// pthread mutexes.
//
// Why anonymous shared mappings: they are created before fork() and every child inherits the
// same physical pages at the same address, so no name, file or cleanup is involved, and nothing
// outlives the last process that maps them (a crashed program leaves no /dev/shm litter).
//
// Why futexes for waiting: a waiter keeps no state in the shared memory that someone else must
// clean up, so a process that dies while waiting cannot strand the others. Mutexes are robust
// pthread mutexes because only the kernel can tell that a lock's owner died (its robust list),
// and glibc reports that as EOWNERDEAD to the next locker.

#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "posix.hpp"

namespace procpool::detail {

/// Maps `bytes` of zeroed memory shared with every process forked afterwards.
/// The mapping is released when the last handle in this process goes away; other processes keep
/// their own mappings. @throws std::system_error naming mmap.
inline std::shared_ptr<void> map_shared(std::size_t bytes) {
  if (bytes == 0) bytes = 1;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw_errno("mmap");
  return std::shared_ptr<void>(p, [bytes](void* q) noexcept { ::munmap(q, bytes); });
}

/// Constructs a T in a fresh shared mapping. T's destructor never runs: other processes may still
/// use the object when this one lets go, and the kernel frees the pages with the last mapping.
template <class T, class... Args>
std::shared_ptr<T> make_shared_object(std::size_t bytes, Args&&... args) {
  static_assert(std::is_standard_layout_v<T>, "shared objects must be standard-layout");
  auto region = map_shared(bytes < sizeof(T) ? sizeof(T) : bytes);
  T* obj = ::new (region.get()) T(std::forward<Args>(args)...);
  return std::shared_ptr<T>(std::move(region), obj);
}

// ---------------------------------------------------------------------------------------------
// Futexes. The words live in MAP_SHARED memory, so the operations must not use
// FUTEX_PRIVATE_FLAG: the kernel then keys the wait on the physical page, which every process
// shares.

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t) &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "futex words must be plain 32-bit atomics");

/// Sleeps while `*word == expected`, until woken or the deadline passes.
/// Returns false only on timeout; a wake-up, a changed value or a signal return true, so callers
/// loop on their own condition.
inline bool futex_wait(std::atomic<std::uint32_t>* word, std::uint32_t expected,
                       const Deadline& deadline) {
  timespec ts;
  const timespec* abs = deadline.as_monotonic_timespec(ts);
  // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time, so a retried wait never stretches
  // the deadline.
  long r = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT_BITSET,
                     expected, abs, nullptr, FUTEX_BITSET_MATCH_ANY);
  if (r == 0) return true;
  if (errno == ETIMEDOUT) return false;
  if (errno == EAGAIN || errno == EINTR) return true;
  throw_errno("futex(FUTEX_WAIT_BITSET)");
}

/// Wakes up to `n` processes sleeping on `word`.
inline void futex_wake(std::atomic<std::uint32_t>* word, int n = INT_MAX) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, n, nullptr, nullptr,
            0);
}

/// Sleeps on the futex word `word` until `ready()` returns true or the deadline passes; returns
/// the last ready(). `sleepers` announces this sleeper: a waker makes `ready()` true (or changes
/// `word`), then, seeing `sleepers` above zero, changes `word` and wakes it. Both sides use
/// seq_cst, so either the waker sees the sleeper or the sleeper sees the change: no lost
/// wake-up, and no system call for the waker when nobody sleeps. `ready()` runs once per round,
/// so it may take what it waits for (a semaphore count).
template <class Ready>
bool sleep_until(std::atomic<std::uint32_t>& word, std::atomic<std::uint32_t>& sleepers,
                 Ready&& ready, const Deadline& deadline) {
  for (;;) {
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    std::uint32_t seen = word.load(std::memory_order_seq_cst);
    if (ready()) {
      sleepers.fetch_sub(1, std::memory_order_seq_cst);
      return true;
    }
    bool woke;
    try {
      woke = futex_wait(&word, seen, deadline);
    } catch (...) {
      sleepers.fetch_sub(1, std::memory_order_seq_cst);
      throw;
    }
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
    if (!woke || deadline.expired()) return ready();
  }
}

/// Spins briefly, for waits that usually end within a few microseconds (a peer on the other CPU
/// is about to publish). Sleeping would cost a wake-up syscall on both sides.
template <class Ready>
bool spin_until(Ready&& ready, int rounds = 2000) {
  for (int i = 0; i < rounds; ++i) {
    if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  return ready();
}

// ---------------------------------------------------------------------------------------------
// Robust process-shared mutexes.

/// What locking a robust mutex came to.
enum class LockResult {
  acquired,    ///< the caller holds it
  owner_died,  ///< the caller holds it, but its previous owner died holding it
  timed_out,   ///< the deadline passed; not held
  busy,        ///< try-lock only: someone else holds it; not held
  deadlock,    ///< the calling thread already holds this non-recursive mutex; not held
};

/// A pthread mutex that works across processes and survives its owner's death.
/// Lives in shared memory; initialised once, before any fork, and never destroyed (see
/// make_shared_object).
class RobustMutex {
 public:
  /// `recursive`: the owning thread may lock again (and must unlock as often).
  explicit RobustMutex(bool recursive) {
    pthread_mutexattr_t attr;
    ::pthread_mutexattr_init(&attr);
    ::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    ::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    // ERRORCHECK rather than NORMAL: a thread that locks its own lock again gets EDEADLK instead
    // of hanging forever, and an unlock by a non-owner gets EPERM instead of undefined behaviour.
    ::pthread_mutexattr_settype(&attr,
                                recursive ? PTHREAD_MUTEX_RECURSIVE : PTHREAD_MUTEX_ERRORCHECK);
    int rc = ::pthread_mutex_init(&m_, &attr);
    ::pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
      errno = rc;
      throw_errno("pthread_mutex_init");
    }
  }
  RobustMutex(const RobustMutex&) = delete;
  RobustMutex& operator=(const RobustMutex&) = delete;

  /// Locks, waiting until the deadline. On owner_died the caller holds the mutex and must call
  /// make_consistent() (or the mutex becomes unusable for everyone once it is unlocked).
  LockResult lock(const Deadline& deadline) {
    int rc;
    if (deadline.is_never()) {
      rc = ::pthread_mutex_lock(&m_);
    } else {
      timespec ts;
      rc = ::pthread_mutex_clocklock(&m_, CLOCK_MONOTONIC, deadline.as_monotonic_timespec(ts));
    }
    return result(rc, "pthread_mutex_lock");
  }

  /// Locks if free right now.
  LockResult try_lock() { return result(::pthread_mutex_trylock(&m_), "pthread_mutex_trylock"); }

  /// Marks a mutex whose owner died as usable again. Only after lock() returned owner_died.
  void make_consistent() noexcept { ::pthread_mutex_consistent(&m_); }

  /// Unlocks. Returns false, changing nothing, if the calling thread does not hold it.
  bool unlock() noexcept { return ::pthread_mutex_unlock(&m_) == 0; }

 private:
  static LockResult result(int rc, const char* call) {
    switch (rc) {
      case 0:
        return LockResult::acquired;
      case EOWNERDEAD:
        return LockResult::owner_died;
      case ETIMEDOUT:
        return LockResult::timed_out;
      case EBUSY:
        return LockResult::busy;
      case EDEADLK:
        return LockResult::deadlock;
      case EAGAIN:
        errno = rc;
        throw_errno("pthread mutex (recursion limit reached)");
      default:
        errno = rc;
        throw_errno(call);
    }
  }

  pthread_mutex_t m_;
};

}  // namespace procpool::detail
