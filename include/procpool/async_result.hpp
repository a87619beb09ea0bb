#pragma once
/// @file async_result.hpp
/// AsyncResult (a future-like handle on one submitted task or map), ResultStream (the lazy,
/// iterable results of imap and imap_unordered) and as_completed().

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "detail/posix.hpp"
#include "detail/result_state.hpp"
#include "errors.hpp"
#include "progress.hpp"

namespace procpool {

template <class T>
class AsyncResult;

namespace detail {
template <class T>
std::shared_ptr<ResultState<T>> state_of(const AsyncResult<T>& r);
}  // namespace detail

/// The result of apply_async, map_async or starmap_async: ready once the work finished
/// (Python's multiprocessing.pool.AsyncResult). Copies share one state. Every member is
/// thread-safe.
template <class T>
class AsyncResult {
 public:
  /// The type get() returns.
  using value_type = T;

  /// An empty handle; only assignment and destruction are valid on it.
  AsyncResult() = default;
  /// Made by the pools around the state that their task completes; user code gets results from
  /// apply_async, map_async and starmap_async.
  explicit AsyncResult(std::shared_ptr<detail::ResultState<T>> state) : state_(std::move(state)) {}

  /// Waits until ready and returns the value (a copy; get() may be called again and again).
  /// @throws the task's exception (from a worker process, see RemoteError for which types keep
  /// theirs), CancelledError, PoolTerminatedError, WorkerLostError, TaskTimeoutError;
  /// std::logic_error if called from a callback of the same pool while not ready (it would wait
  /// forever).
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

struct StreamAccess;
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
  /// What end() returns: an Iterator compares equal to it once the stream is exhausted.
  struct Sentinel {};

  /// Made by the pools' imap and imap_unordered around their source of items; user code gets
  /// streams from those.
  explicit ResultStream(std::unique_ptr<detail::StreamSource<T>> source)
      : source_(std::move(source)) {}
  /// Takes over another stream's results; that one may then only be destroyed or assigned to.
  ResultStream(ResultStream&&) noexcept = default;
  /// Takes over another stream's results; this stream's own are dropped as on destruction.
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

  /// Waits for the first result and returns an iterator on it, as Python's
  /// `for x in pool.imap(f, xs)`. A stream is read once: iterating again continues where the
  /// last iteration stopped.
  Iterator begin() {
    fill(detail::Deadline::never());
    return Iterator(this);
  }
  /// The end of the stream.
  Sentinel end() { return {}; }

  /// A single-pass input iterator: `*it` is the current result, `++it` waits for the next.
  class Iterator {
   public:
    /// The type of a result.
    using value_type = T;
    /// Required of every iterator; distances are never measured.
    using difference_type = std::ptrdiff_t;
    /// A single-pass input iterator.
    using iterator_concept = std::input_iterator_tag;

    /// A singular iterator; only assignment and destruction are valid on it.
    Iterator() = default;
    /// An iterator on the current item of `s`; begin() makes it.
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
    /// Moves past the current result, waiting (as next() does) until the next one is ready.
    Iterator& operator++() {
      s_->current_.reset();
      s_->fill(detail::Deadline::never());
      return *this;
    }
    /// As `++it`; an input iterator's post-increment returns nothing.
    void operator++(int) { ++*this; }
    /// Whether the stream is exhausted; waits for the next item if that is needed to tell.
    friend bool operator==(const Iterator& it, Sentinel) { return it.at_end(); }

   private:
    bool at_end() const {
      if (!s_->current_) s_->fill(detail::Deadline::never());
      return std::holds_alternative<std::monostate>(s_->current_->v);
    }
    ResultStream* s_ = nullptr;
  };

 private:
  friend struct detail::StreamAccess;
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

namespace detail {

/// Reaches a ResultStream's source, so that a pool can put a progress bar in front of it.
struct StreamAccess {
  template <class T>
  static std::unique_ptr<StreamSource<T>>& source(ResultStream<T>& s) {
    return s.source_;
  }
};

/// The shortest wait between two looks at a progress bar's count, whatever min_interval says.
inline constexpr std::chrono::milliseconds progress_min_tick{10};

/// A stream source that counts on a progress bar each item the consumer takes, closes the bar
/// at the end of the stream (or when the stream is destroyed), and while the consumer waits
/// redraws it every min_interval, so that the elapsed time moves even when items are slow.
template <class T>
class ProgressSource final : public StreamSource<T> {
 public:
  ProgressSource(std::unique_ptr<StreamSource<T>> inner, Progress options)
      : inner_(std::move(inner)),
        tick_(std::max(options.min_interval, progress_min_tick)),
        bar_(std::move(options)) {}

  std::optional<StreamItem<T>> next(const Deadline& deadline) override {
    for (;;) {
      const bool last_slice = !deadline.is_never() && deadline.remaining() <= tick_;
      auto item = inner_->next(last_slice ? deadline : Deadline::after(tick_));
      if (item) {
        if (std::holds_alternative<std::monostate>(item->v)) {
          bar_.close();
        } else {
          bar_.update(1);
        }
        return item;
      }
      if (last_slice) return std::nullopt;
      bar_.update(0);
    }
  }

 private:
  std::unique_ptr<StreamSource<T>> inner_;
  std::chrono::milliseconds tick_;
  ProgressBar bar_;  // declared last: closed before the inner source goes
};

/// `stream` with a progress bar counting the items its consumer takes, or `stream` itself
/// when the bar would not be drawn (so that an unseen bar costs nothing per item).
template <class T>
ResultStream<T> with_progress(ResultStream<T> stream, Progress options) {
  if (!progress_drawn(options)) return stream;
  auto& source = StreamAccess::source(stream);
  if (source) source = std::make_unique<ProgressSource<T>>(std::move(source), std::move(options));
  return stream;
}

/// Waits until `result` is ready while this thread draws a progress bar of the items `done`
/// counts (items that ended, delivered or failed), then closes the bar with its final line.
template <class T>
void wait_showing_progress(AsyncResult<T>& result, const ItemCounter& done, Progress options) {
  const auto tick = std::max(options.min_interval, progress_min_tick);
  ProgressBar bar(std::move(options));
  std::size_t shown = 0;
  for (;;) {
    const bool ready = result.wait(tick);
    const std::size_t now = done.count();
    bar.update(now - shown);
    shown = now;
    if (ready) break;
  }
  bar.close();
}

/// map or starmap with a progress bar, for either pool: `submit(input, counter)` submits the
/// map with that counter on its job and returns its AsyncResult. Without a drawn bar this is
/// the plain map. An unsized input is read first (the map would read it all first anyway), so
/// that the bar knows its total.
template <class Item, class Range, class Submit>
auto map_showing_progress(Range&& items, Progress progress, Submit&& submit) {
  if (!progress_drawn(progress)) {
    auto r = submit(std::forward<Range>(items), NoItemCounter{});
    return take_result(*state_of(r));
  }
  if constexpr (!std::ranges::sized_range<Range> || !std::ranges::forward_range<Range>) {
    std::vector<Item> all;
    for (auto&& x : items) all.emplace_back(std::forward<decltype(x)>(x));
    return map_showing_progress<Item>(
        all | std::views::transform([](Item& x) -> Item&& { return std::move(x); }),
        std::move(progress), submit);
  } else {
    default_total(progress, items);
    ItemCounter done;
    auto r = submit(std::forward<Range>(items), done);
    wait_showing_progress(r, done, std::move(progress));
    return take_result(*state_of(r));
  }
}

}  // namespace detail

/// The results given to as_completed(), yielded one by one as each becomes ready.
template <class T>
class AsyncResultRange {
 public:
  /// What end() returns: an Iterator compares equal to it once every result was yielded.
  struct Sentinel {};
  /// A single-pass input iterator: `*it` is a result that is ready, `++it` waits for the next.
  class Iterator {
   public:
    /// The type of an element: the AsyncResult that became ready.
    using value_type = AsyncResult<T>;
    /// Required of every iterator; distances are never measured.
    using difference_type = std::ptrdiff_t;
    /// A single-pass input iterator.
    using iterator_concept = std::input_iterator_tag;
    /// A singular iterator; only assignment and destruction are valid on it.
    Iterator() = default;
    /// An iterator on the current result of `r`; begin() makes it.
    explicit Iterator(AsyncResultRange* r) : r_(r) {}
    /// The result that became ready: its get() returns (or throws) without waiting.
    AsyncResult<T>& operator*() const { return r_->results_[*r_->current_]; }
    /// Waits until the next result is ready. @throws TimeoutError if the timeout given to
    /// as_completed() ran out first.
    Iterator& operator++() {
      r_->advance();
      return *this;
    }
    /// As `++it`; an input iterator's post-increment returns nothing.
    void operator++(int) { ++*this; }
    /// Whether every result has been yielded.
    friend bool operator==(const Iterator& it, Sentinel) { return it.at_end(); }

   private:
    bool at_end() const { return !r_->current_; }
    AsyncResultRange* r_ = nullptr;
  };

  /// Made by as_completed(), which is how user code gets one.
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
  /// The end of the range.
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
