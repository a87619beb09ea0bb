#pragma once
/// @file queue.hpp
/// Queue<T>, SimpleQueue<T> and JoinableQueue<T>: typed FIFO queues between any processes
/// (Python's multiprocessing.Queue, SimpleQueue and JoinableQueue).
///
/// A queue lives in shared memory and is shared by inheritance: create it before the Process or
/// Pool that uses it. Any number of processes may put and get at once; messages from one
/// producer arrive in the order it put them. Messages of any size pass through the queue's
/// fixed buffer (1 MiB by default): larger ones stream through it while a consumer reads.
///
/// Unlike Python's Queue there is no feeder thread: put() writes into shared memory before it
/// returns, so a process may exit right after put() and nothing is lost or left to flush.
/// When the buffer is full, put() waits for consumers (as Python's put() on a full pipe would,
/// but Python hides it in its feeder thread and then hangs at exit). A process that dies in the
/// middle of put() or get() never corrupts the queue or blocks the others: a half-written
/// message is discarded, and a message half read by a consumer that died is lost.

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "detail/posix.hpp"
#include "detail/shm_queue.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace procpool {

/// A multi-producer, multi-consumer FIFO queue of T between processes (Python's
/// multiprocessing.Queue).
///
/// T must be Serializable. Copies of a Queue are handles to the same queue. All members are safe
/// to call from any thread of any process that inherited the queue.
template <class T>
class Queue {
  static_assert(detail::require_serializable<T>(),
                "procpool::Queue<T>: T must be Serializable (see serialize.hpp)");

 public:
  /// A queue holding at most `maxsize` messages (0: no limit but its buffer).
  /// @throws std::invalid_argument if maxsize is above 2^30-1; std::system_error if mmap fails.
  explicit Queue(std::size_t maxsize = 0) : Queue(maxsize, detail::default_queue_buffer_bytes) {}

  /// As Queue(maxsize), with a shared buffer of `buffer_bytes` (rounded up to a power of two,
  /// between 4 KiB and 1 GiB). Small messages are copied into it whole; bigger messages stream.
  Queue(std::size_t maxsize, std::size_t buffer_bytes)
      : q_(maxsize, buffer_bytes), local_(std::make_shared<Local>()) {}

  /// Puts `item`, waiting as long as it takes for room.
  /// @throws std::logic_error after close(); anything encoding `item` throws (the queue is then
  /// unchanged).
  void put(const T& item) { put_until(item, detail::Deadline::never()); }

  /// Puts `item`, waiting at most `timeout` for room (a slot under maxsize, and buffer space).
  /// @throws Full on timeout; otherwise as put(item).
  template <class Rep, class Period>
  void put(const T& item, std::chrono::duration<Rep, Period> timeout) {
    put_until(item, detail::Deadline::after(timeout));
  }

  /// Puts `item` only if there is room now. @throws Full otherwise.
  void put_nowait(const T& item) { put_until(item, detail::Deadline::after(std::chrono::seconds(0))); }

  /// Takes the next item, waiting as long as it takes.
  /// @throws ProtocolError if the message does not decode as a T (it is consumed).
  T get() { return get_until(detail::Deadline::never()); }

  /// Takes the next item, waiting at most `timeout` for one to begin. @throws Empty on timeout.
  template <class Rep, class Period>
  T get(std::chrono::duration<Rep, Period> timeout) {
    return get_until(detail::Deadline::after(timeout));
  }

  /// Takes the next item if one is there now. @throws Empty otherwise.
  T get_nowait() { return get_until(detail::Deadline::after(std::chrono::seconds(0))); }

  /// The number of items in the queue (approximate while others put and get).
  std::size_t qsize() const noexcept { return q_.size(); }
  /// Whether the queue holds no item (approximate while others put and get).
  bool empty() const noexcept { return qsize() == 0; }
  /// Whether the queue holds maxsize items (never for an unbounded queue).
  bool full() const noexcept { return q_.maxsize() != 0 && qsize() >= q_.maxsize(); }
  /// The bound given at construction (0: none).
  std::size_t maxsize() const noexcept { return q_.maxsize(); }

  /// Declares that this process will put no more: a later put() here throws std::logic_error.
  /// Other processes, and get() here, are unaffected. There is no feeder thread to flush.
  void close() noexcept { local_->closed = true; }

 protected:
  /// The shared-memory queue underneath, for derived queues (JoinableQueue counts unfinished
  /// tasks in it).
  detail::ShmQueue& core() noexcept { return q_; }

 private:
  struct Local {
    bool closed = false;
  };

  void put_until(const T& item, const detail::Deadline& deadline) {
    if (local_->closed) throw std::logic_error("procpool::Queue: put() after close()");
    // Encoded before any lock is taken: a value that fails to encode leaves the queue unchanged.
    std::vector<std::byte> frame = encode(item);
    if (!q_.put(frame, deadline)) throw Full();
  }

  T get_until(const detail::Deadline& deadline) {
    std::optional<T> out;
    if (!q_.get(deadline, [&](std::span<const std::byte> bytes) { out.emplace(decode<T>(bytes)); })) {
      throw Empty();
    }
    return std::move(*out);
  }

  detail::ShmQueue q_;
  std::shared_ptr<Local> local_;
};

/// A Queue with only put, get and empty (Python's multiprocessing.SimpleQueue).
template <class T>
class SimpleQueue {
 public:
  /// An unbounded queue with the default buffer.
  SimpleQueue() = default;
  /// Puts `item`, waiting for buffer space if needed. @throws as Queue::put.
  void put(const T& item) { q_.put(item); }
  /// Takes the next item, waiting for one.
  T get() { return q_.get(); }
  /// Whether the queue holds no item.
  bool empty() const noexcept { return q_.empty(); }
  /// This process puts no more (see Queue::close).
  void close() noexcept { q_.close(); }

 private:
  Queue<T> q_;
};

/// A Queue whose consumers acknowledge each item with task_done(), so that join() can wait
/// until every item put has been processed (Python's multiprocessing.JoinableQueue).
///
/// An item that was half written by a producer that died, or half read by a consumer that died,
/// counts as done. A consumer that dies after get() and before task_done() leaves its item
/// unfinished, as in Python. It has Queue's constructors and members.
template <class T>
class JoinableQueue : public Queue<T> {
 public:
  using Queue<T>::Queue;

  /// Marks one item taken with get() as processed.
  /// @throws std::logic_error if called more times than items were put.
  void task_done() { this->core().task_done(); }

  /// Blocks until every item put has been marked done.
  void join() { this->core().join(detail::Deadline::never()); }

  /// Waits at most `timeout` for every item to be marked done; false on timeout.
  template <class Rep, class Period>
  bool join(std::chrono::duration<Rep, Period> timeout) {
    return this->core().join(detail::Deadline::after(timeout));
  }

  /// The number of items put and not yet marked done.
  std::size_t unfinished_tasks() const noexcept {
    return const_cast<JoinableQueue*>(this)->core().unfinished();
  }
};

}  // namespace procpool
