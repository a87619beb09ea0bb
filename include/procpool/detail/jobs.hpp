#pragma once
// The typed jobs behind a pool's results: one task (apply_async), a whole map (map_async,
// starmap_async), and a lazily fed stream (imap, imap_unordered). Shared by Pool, whose engine
// delivers encoded results, and ThreadPool, which delivers values.

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <ranges>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "../async_result.hpp"
#include "../errors.hpp"
#include "result_state.hpp"

namespace procpool::detail {

template <class R>
using Stored = std::conditional_t<std::is_void_v<R>, std::monostate, R>;

inline std::exception_ptr cancelled_error() {
  return std::make_exception_ptr(CancelledError("procpool: the task was cancelled"));
}

/// The result of one task. `Completions` receives closures that touch the user-visible state;
/// the caller runs them with its own locks released.
template <class R, class Completions>
class SingleOutcome {
 public:
  explicit SingleOutcome(std::shared_ptr<ResultState<R>> state) : state_(std::move(state)) {}

  void set(Stored<R> v, Completions& out) {
    if (std::exchange(ended_, true)) return;
    out.push_back([s = state_, v = std::make_shared<Stored<R>>(std::move(v))]() mutable {
      s->set_value(std::move(*v));
    });
  }
  void fail(std::exception_ptr e, Completions& out) {
    if (std::exchange(ended_, true)) return;
    out.push_back([s = state_, e] { s->fail(e); });
  }
  bool ended() const noexcept { return ended_; }

 private:
  std::shared_ptr<ResultState<R>> state_;
  bool ended_ = false;
};

/// The results of a map: every item ends once; then the whole completes with the values in
/// input order, or with the error of the lowest-indexed failed item.
template <class R, class Completions>
class MapOutcome {
 public:
  using Element = Stored<R>;
  // ResultState<void> for a void task, so that map_async returns AsyncResult<void>.
  using Vector = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
  using Slot = std::conditional_t<std::is_void_v<R> || std::is_default_constructible_v<Element>,
                                  Element, std::optional<Element>>;

  MapOutcome(std::shared_ptr<ResultState<Vector>> state, std::size_t n)
      : state_(std::move(state)), ended_(n, false), remaining_(n) {
    if constexpr (!std::is_void_v<R>) values_.resize(n);
  }

  /// Completes at once if there are no items.
  void start(Completions& out) {
    if (remaining_ == 0) complete(out);
  }

  template <class Producer>
  void set(std::size_t i, Producer&& produce, Completions& out) {
    if (done_ || i >= ended_.size() || ended_[i]) {
      return;
    }
    if constexpr (!std::is_void_v<R>) {
      values_[i] = produce();
    } else {
      produce();
    }
    end(i, out);
  }
  void fail(std::size_t i, std::exception_ptr e, Completions& out) {
    if (done_ || i >= ended_.size() || ended_[i]) return;
    if (!error_ || i < error_index_) {
      error_ = e;
      error_index_ = i;
    }
    end(i, out);
  }
  bool cancel(Completions& out) {
    if (done_) return false;
    done_ = true;
    out.push_back([s = state_] { s->fail(cancelled_error()); });
    return true;
  }
  bool done() const noexcept { return done_; }

 private:
  void end(std::size_t i, Completions& out) {
    ended_[i] = true;
    if (--remaining_ == 0) complete(out);
  }
  void complete(Completions& out) {
    done_ = true;
    if (error_) {
      out.push_back([s = state_, e = error_] { s->fail(e); });
      return;
    }
    if constexpr (std::is_void_v<R>) {
      out.push_back([s = state_] { s->set_value(std::monostate{}); });
    } else {
      auto v = std::make_shared<std::vector<R>>();
      if constexpr (std::is_same_v<Slot, Element>) {
        *v = std::move(values_);
      } else {
        v->reserve(values_.size());
        for (auto& x : values_) v->push_back(std::move(*x));
      }
      values_ = decltype(values_){};  // not `= {}`: that copies, and R may be move-only
      out.push_back([s = state_, v]() mutable { s->set_value(std::move(*v)); });
    }
  }

  std::shared_ptr<ResultState<Vector>> state_;
  std::conditional_t<std::is_void_v<R>, std::monostate, std::vector<Slot>> values_;
  std::vector<bool> ended_;
  std::size_t remaining_;
  std::exception_ptr error_;
  std::size_t error_index_ = 0;
  bool done_ = false;
};

/// The buffer between a pool delivering stream items and the thread iterating the stream.
/// Items are numbered in input order; `ordered` streams hand them out in that order.
template <class R>
class StreamBuffer {
 public:
  explicit StreamBuffer(bool ordered) : ordered_(ordered) {}

  void put(std::uint32_t index, StreamItem<R> item) {
    {
      std::lock_guard lock(mutex_);
      if (abandoned_) return;
      ++arrived_;
      if (ordered_) {
        by_index_.emplace(index, std::move(item));
      } else {
        fifo_.push_back(std::move(item));
      }
    }
    cv_.notify_all();
  }

  /// The stream was destroyed: drop whatever still arrives.
  void abandon() {
    std::lock_guard lock(mutex_);
    abandoned_ = true;
    by_index_.clear();
    fifo_.clear();
  }

  std::mutex& mutex() { return mutex_; }
  std::condition_variable& cv() { return cv_; }
  std::uint32_t arrived() const { return arrived_; }  // with mutex() held

  /// The next item to hand out (index `next` if ordered), if it has arrived. Mutex held.
  std::optional<StreamItem<R>> take(std::uint32_t next) {
    if (ordered_) {
      auto it = by_index_.find(next);
      if (it == by_index_.end()) return std::nullopt;
      StreamItem<R> item = std::move(it->second);
      by_index_.erase(it);
      return item;
    }
    if (fifo_.empty()) return std::nullopt;
    StreamItem<R> item = std::move(fifo_.front());
    fifo_.pop_front();
    return item;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool ordered_;
  bool abandoned_ = false;
  std::uint32_t arrived_ = 0;
  std::map<std::uint32_t, StreamItem<R>> by_index_;
  std::deque<StreamItem<R>> fifo_;
};

/// Python's automatic chunk size: ceil(n / (4 * workers)), at least 1.
inline std::size_t auto_chunksize(std::size_t n, std::size_t workers) {
  std::size_t per = 4 * (workers ? workers : 1);
  return std::max<std::size_t>(1, (n + per - 1) / per);
}

}  // namespace procpool::detail

namespace procpool::detail {

/// A result stream fed lazily from an input range, from the thread that iterates it. Keeps at
/// most `max_chunks` chunks in flight and about as many buffered, so an infinite input or a
/// slow consumer never makes memory grow. `Feeder` builds and submits chunks for one pool
/// kind: begin_chunk(base), add(*it), submit() (may throw PoolNotRunningError), discard(),
/// and stop() once no more will be fed.
template <class R, class View, class Feeder>
class LazyStream final : public StreamSource<R> {
 public:
  LazyStream(View view, std::shared_ptr<StreamBuffer<R>> buffer, Feeder feeder,
             std::size_t chunksize, std::size_t max_chunks)
      : view_(std::move(view)),
        buffer_(std::move(buffer)),
        feeder_(std::move(feeder)),
        chunksize_(chunksize ? chunksize : 1),
        max_chunks_(max_chunks ? max_chunks : 1) {}

  ~LazyStream() override {
    buffer_->abandon();
    stop_feeding();
  }

  std::optional<StreamItem<R>> next(const Deadline& deadline) override {
    for (;;) {
      feed();
      std::unique_lock lock(buffer_->mutex());
      for (;;) {
        if (auto item = buffer_->take(yielded_)) {
          ++yielded_;
          return item;
        }
        if (input_done_ && yielded_ == submitted_) {
          if (input_error_) {
            StreamItem<R> err{std::exchange(input_error_, nullptr)};
            return err;
          }
          return StreamItem<R>{};
        }
        if (can_feed(buffer_->arrived())) break;
        if (deadline.is_never()) {
          buffer_->cv().wait(lock);
        } else if (buffer_->cv().wait_for(lock, deadline.remaining()) == std::cv_status::timeout &&
                   deadline.expired()) {
          if (auto item = buffer_->take(yielded_)) {
            ++yielded_;
            return item;
          }
          return std::nullopt;
        }
      }
    }
  }

 private:
  bool can_feed(std::uint32_t arrived) const {
    if (input_done_) return false;
    std::size_t in_flight = submitted_ - arrived;
    std::size_t buffered = arrived - yielded_;
    return in_flight < max_chunks_ * chunksize_ && buffered < max_chunks_ * chunksize_;
  }

  void feed() {
    for (;;) {
      {
        std::lock_guard lock(buffer_->mutex());
        if (!can_feed(buffer_->arrived())) return;
      }
      if (!it_) it_.emplace(std::ranges::begin(view_));
      feeder_.begin_chunk(submitted_);
      std::uint32_t n = 0;
      try {
        while (n < chunksize_ && *it_ != std::ranges::end(view_)) {
          feeder_.add(**it_);
          ++n;
          ++*it_;
        }
      } catch (...) {
        // The input failed: what was read before it still runs; the error stands after it.
        end_input(std::current_exception());
      }
      if (n > 0) {
        try {
          feeder_.submit();
        } catch (...) {
          feeder_.discard();
          input_error_ = nullptr;
          end_input(std::current_exception());
          return;
        }
        submitted_ += n;
      } else {
        feeder_.discard();
      }
      if (!input_done_ && *it_ == std::ranges::end(view_)) end_input(nullptr);
      if (input_done_) return;
    }
  }

  void end_input(std::exception_ptr e) {
    input_done_ = true;
    if (e) input_error_ = e;
    stop_feeding();
  }
  void stop_feeding() {
    if (!stopped_) {
      stopped_ = true;
      feeder_.stop();
    }
  }

  View view_;
  std::optional<std::ranges::iterator_t<View>> it_;
  std::shared_ptr<StreamBuffer<R>> buffer_;
  Feeder feeder_;
  std::size_t chunksize_;
  std::size_t max_chunks_;
  std::uint32_t submitted_ = 0;
  std::uint32_t yielded_ = 0;
  bool input_done_ = false;
  bool stopped_ = false;
  std::exception_ptr input_error_;
};

}  // namespace procpool::detail
