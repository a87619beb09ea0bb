#pragma once
// The shared state behind an AsyncResult: the value or error, the threads waiting for it, the
// callbacks to run when it is ready, and the way back to its pool for cancel().

#include <atomic>
#include <cstdint>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "../errors.hpp"
#include "exceptions.hpp"
#include "posix.hpp"

namespace procpool::detail {

/// What a pool offers the results it hands out: a single thread on which callbacks run one at
/// a time, and cancellation. Implemented by the process pool's core and by ThreadPool's.
class ResultOwner {
 public:
  virtual ~ResultOwner() = default;
  /// Runs `fn` on the pool's callback thread. Returns false if that thread is gone (the pool
  /// was destroyed): the caller then runs it itself.
  virtual bool post_callback(std::function<void()> fn) = 0;
  /// Cancels the work behind result `id`. Returns true if it was pending or running.
  virtual bool cancel(std::uint64_t id) = 0;
  /// Whether the calling thread is this pool's callback thread (where blocking on one of its
  /// own results would wait forever).
  virtual bool on_callback_thread() const = 0;
};

/// Collects results as they become ready, for as_completed().
class CompletionQueue {
 public:
  void push(std::size_t index) {
    {
      std::lock_guard lock(mutex_);
      ready_.push_back(index);
    }
    cv_.notify_all();
  }
  /// Waits for the next ready index; nullopt when the deadline passes.
  std::optional<std::size_t> pop(const Deadline& deadline) {
    std::unique_lock lock(mutex_);
    auto has = [&] { return next_ < ready_.size(); };
    if (deadline.is_never()) {
      cv_.wait(lock, has);
    } else if (!cv_.wait_for(lock, deadline.remaining(), has)) {
      return std::nullopt;
    }
    return ready_[next_++];
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::size_t> ready_;
  std::size_t next_ = 0;
};

class ResultStateBase : public std::enable_shared_from_this<ResultStateBase> {
 public:
  virtual ~ResultStateBase() = default;

  bool ready() const noexcept { return ready_.load(std::memory_order_acquire); }

  bool wait_until(const Deadline& deadline) {
    if (ready()) return true;
    check_not_deadlocking();
    std::unique_lock lock(mutex_);
    auto is_ready = [&] { return ready_.load(std::memory_order_relaxed); };
    if (deadline.is_never()) {
      cv_.wait(lock, is_ready);
      return true;
    }
    return cv_.wait_for(lock, deadline.remaining(), is_ready);
  }

  bool successful() const {
    if (!ready()) throw std::logic_error("procpool: successful() on a result that is not ready");
    return !error_;
  }

  std::exception_ptr error() const noexcept { return error_; }

  /// Fails the result unless it is already ready. Returns whether it did.
  bool fail(std::exception_ptr e) {
    std::vector<std::function<void()>> run;
    {
      std::lock_guard lock(mutex_);
      if (ready_.load(std::memory_order_relaxed)) return false;
      error_ = std::move(e);
      run = finish_locked();
    }
    run_callbacks(run);
    return true;
  }

  /// Adds a callback to run once the result is ready: on the owner's callback thread, or at
  /// once on that thread if the result is ready already.
  void add_callback(std::function<void()> cb) {
    {
      std::lock_guard lock(mutex_);
      if (!ready_.load(std::memory_order_relaxed)) {
        callbacks_.push_back(std::move(cb));
        return;
      }
    }
    auto owner = owner_.lock();
    if (owner && owner->on_callback_thread()) {
      invoke_callback(cb);
    } else if (!owner || !owner->post_callback([self = shared_from_this(), cb] {
                 invoke_callback(cb);
               })) {
      invoke_callback(cb);
    }
  }

  void add_completion_queue(std::shared_ptr<CompletionQueue> q, std::size_t index) {
    {
      std::lock_guard lock(mutex_);
      if (!ready_.load(std::memory_order_relaxed)) {
        queues_.emplace_back(std::move(q), index);
        return;
      }
    }
    q->push(index);
  }

  void set_owner(std::weak_ptr<ResultOwner> owner, std::uint64_t id) {
    owner_ = std::move(owner);
    id_ = id;
  }

  bool cancel() {
    if (ready()) return false;
    auto owner = owner_.lock();
    if (!owner) return false;
    return owner->cancel(id_);
  }

  /// Runs a callback, reporting (never propagating) what it throws.
  static void invoke_callback(const std::function<void()>& cb) noexcept {
    try {
      cb();
    } catch (...) {
      ExceptionText t = describe_exception(std::current_exception());
      report("a result callback threw " + t.type_name + ": " + t.message);
    }
  }

 protected:
  // Marks the state ready; returns the callbacks to run (outside the lock).
  std::vector<std::function<void()>> finish_locked() {
    ready_.store(true, std::memory_order_release);
    cv_.notify_all();
    for (auto& [q, index] : queues_) q->push(index);
    queues_.clear();
    return std::exchange(callbacks_, {});
  }

  // Runs the callbacks here if this is the owner's callback thread (or there is no owner
  // any more), else posts them there; the posted batch keeps this state alive until it ran.
  void run_callbacks(std::vector<std::function<void()>>& run) {
    if (run.empty()) return;
    auto owner = owner_.lock();
    if (owner && !owner->on_callback_thread()) {
      auto batch = std::make_shared<std::vector<std::function<void()>>>(std::move(run));
      if (owner->post_callback([self = shared_from_this(), batch] {
            for (auto& cb : *batch) invoke_callback(cb);
          })) {
        return;
      }
      run = std::move(*batch);
    }
    for (auto& cb : run) invoke_callback(cb);
  }

  void check_not_deadlocking() const {
    auto owner = owner_.lock();
    if (owner && owner->on_callback_thread()) {
      throw std::logic_error(
          "procpool: waiting for a result of this pool inside one of its callbacks would wait "
          "forever (callbacks run on the thread that delivers results)");
    }
  }

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<bool> ready_{false};
  std::exception_ptr error_;
  std::vector<std::function<void()>> callbacks_;
  std::vector<std::pair<std::shared_ptr<CompletionQueue>, std::size_t>> queues_;
  std::weak_ptr<ResultOwner> owner_;
  std::uint64_t id_ = 0;
};

template <class T>
class ResultState : public ResultStateBase {
 public:
  using Stored = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

  /// Fulfils the result unless it is already ready. Returns whether it did.
  bool set_value(Stored v) {
    std::vector<std::function<void()>> run;
    {
      std::lock_guard lock(mutex_);
      if (ready_.load(std::memory_order_relaxed)) return false;
      value_.emplace(std::move(v));
      run = finish_locked();
    }
    run_callbacks(run);
    return true;
  }

  /// The value (after ready()): rethrows the error if it failed.
  const Stored& value() const {
    if (error_) std::rethrow_exception(error_);
    return *value_;
  }

 private:
  std::optional<Stored> value_;
};

/// Waits for a result that only the caller holds and moves its value out (so that a
/// move-only result can be returned). @throws what get() throws.
template <class T>
T take_result(ResultState<T>& state) {
  state.wait_until(Deadline::never());
  if constexpr (std::is_void_v<T>) {
    (void)state.value();
  } else {
    // value() is const for shared handles; nobody else can see this state, so its value is
    // ours to move.
    return std::move(const_cast<T&>(state.value()));
  }
}

}  // namespace procpool::detail
