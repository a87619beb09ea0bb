#pragma once
/// @file async_result.hpp
/// AsyncResult (a future-like handle on one submitted task or map), ResultStream (the lazy,
/// iterable results of imap and imap_unordered) and as_completed().

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "detail/posix.hpp"
#include "detail/result_state.hpp"
#include "errors.hpp"

namespace procpool {

template <class T>
class AsyncResult;

namespace detail {
template <class T>
std::shared_ptr<ResultState<T>> state_of(const AsyncResult<T>& r);
}  // namespace detail

/// The result of apply_async, map_async or starmap_async: ready once the work finished.
/// Copies share one state. Every member is thread-safe.
template <class T>
class AsyncResult {
 public:
  using value_type = T;

  /// An empty handle; only assignment and destruction are valid on it.
  AsyncResult() = default;
  explicit AsyncResult(std::shared_ptr<detail::ResultState<T>> state) : state_(std::move(state)) {}

  /// Waits until ready and returns the value (a copy; get() may be called again and again).
  /// @throws the task's exception (API.md §8), CancelledError, PoolTerminatedError,
  /// WorkerLostError, TaskTimeoutError; std::logic_error if called from a callback of the
  /// same pool while not ready (it would wait forever).
  T get() {
    wait();
    if constexpr (std::is_void_v<T>) {
      (void)state_->value();
    } else {
      return state_->value();
    }
  }

  /// As get(), but throws TimeoutError if the result is not ready within `timeout` (the work
  /// goes on). A negative timeout means zero.
  template <class Rep, class Period>
  T get(std::chrono::duration<Rep, Period> timeout) {
    if (!wait(timeout)) throw TimeoutError("procpool: the result was not ready in time");
    return get();
  }

  /// Waits until ready.
  void wait() { state_->wait_until(detail::Deadline::never()); }

  /// Waits at most `timeout`; returns whether the result is ready.
  template <class Rep, class Period>
  bool wait(std::chrono::duration<Rep, Period> timeout) {
    return state_->wait_until(detail::Deadline::after(timeout));
  }

  /// Whether the result is ready (a value or an error).
  bool ready() const { return state_->ready(); }

  /// Whether the work succeeded. @throws std::logic_error if not ready.
  bool successful() const { return state_->successful(); }

  /// Cancels the work: a queued task never runs; a running one's worker is killed and replaced.
  /// Returns false if the result was already ready. Afterwards get() throws CancelledError.
  bool cancel() { return state_->cancel(); }

  /// Adds a callback `cb(const T&)` (or `cb()` for void) to run on the pool's callback thread
  /// when the work succeeds. A callback that throws is reported on stderr.
  template <class Callback>
  AsyncResult& on_result(Callback cb) {
    // The state runs its callbacks while alive, and keeps itself alive while one is queued
    // for the callback thread: a raw pointer is enough, and a temporary AsyncResult works.
    auto* s = state_.get();
    state_->add_callback([cb = std::move(cb), s]() mutable {
      if (s->error()) return;
      if constexpr (std::is_void_v<T>) {
        cb();
      } else {
        cb(s->value());
      }
    });
    return *this;
  }

  /// Adds a callback `cb(std::exception_ptr)` to run on the pool's callback thread when the
  /// work fails (or is cancelled).
  template <class ErrorCallback>
  AsyncResult& on_error(ErrorCallback cb) {
    auto* s = state_.get();
    state_->add_callback([cb = std::move(cb), s]() mutable {
      if (s->error()) cb(s->error());
    });
    return *this;
  }

 private:
  friend std::shared_ptr<detail::ResultState<T>> detail::state_of<T>(const AsyncResult<T>&);
  std::shared_ptr<detail::ResultState<T>> state_;
};

namespace detail {
template <class T>
std::shared_ptr<ResultState<T>> state_of(const AsyncResult<T>& r) {
  return r.state_;
}

/// One step of a result stream: a value, the error of one item, or the end.
template <class T>
struct StreamItem {
  std::variant<std::monostate, T, std::exception_ptr> v;  // monostate: end of stream
};

/// Where a ResultStream's items come from (the pool's imap machinery).
template <class T>
class StreamSource {
 public:
  virtual ~StreamSource() = default;
  /// The next item, waiting until `deadline`; nullopt if the deadline passed first.
  virtual std::optional<StreamItem<T>> next(const Deadline& deadline) = 0;
};
}  // namespace detail

/// The results of imap (in input order) or imap_unordered (as they finish): a
/// std::ranges::input_range, read once. It pulls its input lazily from the thread that
/// iterates it. An item whose task failed rethrows that error where it stands (from
/// `*it` or next()); iterating on continues with the next item. Destroying the stream stops
/// reading the input; work already submitted finishes and is discarded. Not thread-safe.
template <class T>
class ResultStream {
 public:
  class Iterator;
  struct Sentinel {};

  explicit ResultStream(std::unique_ptr<detail::StreamSource<T>> source)
      : source_(std::move(source)) {}
  ResultStream(ResultStream&&) noexcept = default;
  ResultStream& operator=(ResultStream&&) noexcept = default;

  /// The next result; std::nullopt once the stream is exhausted.
  /// @throws the item's error (the stream then moves past it).
  std::optional<T> next() { return take(detail::Deadline::never()); }

  /// As next(), waiting at most `timeout`. @throws TimeoutError if nothing was ready in time
  /// (nothing is lost: a later call gets it).
  template <class Rep, class Period>
  std::optional<T> next(std::chrono::duration<Rep, Period> timeout) {
    return take(detail::Deadline::after(timeout));
  }

  Iterator begin() {
    fill(detail::Deadline::never());
    return Iterator(this);
  }
  Sentinel end() { return {}; }

  class Iterator {
   public:
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;

    Iterator() = default;
    explicit Iterator(ResultStream* s) : s_(s) {}
    /// The current result. @throws the item's error (the stream then moves past it).
    T& operator*() const {
      auto& cur = *s_->current_;
      if (auto* e = std::get_if<std::exception_ptr>(&cur.v)) {
        std::exception_ptr err = *e;
        s_->current_.reset();
        std::rethrow_exception(err);
      }
      return std::get<T>(cur.v);
    }
    Iterator& operator++() {
      s_->current_.reset();
      s_->fill(detail::Deadline::never());
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const Iterator& it, Sentinel) { return it.at_end(); }

   private:
    bool at_end() const {
      if (!s_->current_) s_->fill(detail::Deadline::never());
      return std::holds_alternative<std::monostate>(s_->current_->v);
    }
    ResultStream* s_ = nullptr;
  };

 private:
  void fill(const detail::Deadline& deadline) {
    if (current_) return;
    auto item = source_->next(deadline);
    if (!item) throw TimeoutError("procpool: no result was ready in time");
    current_ = std::move(*item);
  }
  std::optional<T> take(const detail::Deadline& deadline) {
    fill(deadline);
    detail::StreamItem<T> item = std::move(*current_);
    if (std::holds_alternative<std::monostate>(item.v)) return std::nullopt;  // stays at end
    current_.reset();
    if (auto* e = std::get_if<std::exception_ptr>(&item.v)) std::rethrow_exception(*e);
    return std::move(std::get<T>(item.v));
  }

  std::unique_ptr<detail::StreamSource<T>> source_;
  std::optional<detail::StreamItem<T>> current_;
};

/// The results given to as_completed(), yielded one by one as each becomes ready.
template <class T>
class AsyncResultRange {
 public:
  struct Sentinel {};
  class Iterator {
   public:
    using value_type = AsyncResult<T>;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;
    Iterator() = default;
    explicit Iterator(AsyncResultRange* r) : r_(r) {}
    AsyncResult<T>& operator*() const { return r_->results_[*r_->current_]; }
    Iterator& operator++() {
      r_->advance();
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const Iterator& it, Sentinel) { return it.at_end(); }

   private:
    bool at_end() const { return !r_->current_; }
    AsyncResultRange* r_ = nullptr;
  };

  AsyncResultRange(std::vector<AsyncResult<T>> results, detail::Deadline deadline)
      : results_(std::move(results)),
        queue_(std::make_shared<detail::CompletionQueue>()),
        deadline_(deadline) {
    for (std::size_t i = 0; i < results_.size(); ++i) {
      detail::state_of(results_[i])->add_completion_queue(queue_, i);
    }
  }

  /// Waits for the first ready result. @throws TimeoutError if the time ran out first.
  Iterator begin() {
    if (!started_) {
      started_ = true;
      advance();
    }
    return Iterator(this);
  }
  Sentinel end() { return {}; }

 private:
  void advance() {
    current_.reset();
    if (yielded_ == results_.size()) return;
    auto index = queue_->pop(deadline_);
    if (!index) throw TimeoutError("procpool: as_completed ran out of time");
    ++yielded_;
    current_ = *index;
  }

  std::vector<AsyncResult<T>> results_;
  std::shared_ptr<detail::CompletionQueue> queue_;
  detail::Deadline deadline_;
  std::optional<std::size_t> current_;
  std::size_t yielded_ = 0;
  bool started_ = false;
};

/// Yields each result as it becomes ready (in completion order), like
/// concurrent.futures.as_completed.
template <class T>
AsyncResultRange<T> as_completed(std::vector<AsyncResult<T>> results) {
  return AsyncResultRange<T>(std::move(results), detail::Deadline::never());
}

/// As as_completed(results), but iterating throws TimeoutError once `timeout` (counted from
/// this call) has passed with results still pending.
template <class T, class Rep, class Period>
AsyncResultRange<T> as_completed(std::vector<AsyncResult<T>> results,
                                 std::chrono::duration<Rep, Period> timeout) {
  return AsyncResultRange<T>(std::move(results), detail::Deadline::after(timeout));
}

}  // namespace procpool
