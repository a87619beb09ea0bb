#pragma once
/// @file thread_pool.hpp
/// ThreadPool: Pool's interface, run by threads of the calling process (Python's
/// multiprocessing.pool.ThreadPool). For I/O bound work, or work on data that cannot or need
/// not be copied into another process; switching from Pool is a change of one class name.
///
/// ```cpp
/// procpool::ThreadPool pool(8);
/// std::vector<std::string> pages = pool.map(fetch, urls);   // fetch: any callable
/// auto r = pool.apply_async([&cache](std::string key) { return cache.load(key); }, "k");
/// ```
///
/// Differences from Pool, all following from "threads, not processes":
/// - Callables, arguments and results need not be Serializable. A callable may be anything
///   callable, copyable or move-only (a std::function, a lambda capturing by reference or
///   owning objects). Arguments are decay-copied at submission, as std::thread does, and passed
///   to the callable as rvalues. A result needs only to be move-constructible; a reference
///   result is returned as a copy (a task returning `const std::string&` gives std::string).
/// - Each chunk of a map or imap calls its own copy of a copyable callable, as each chunk of a
///   Pool decodes its own, so a callable with mutable state is never called by two threads at
///   once. A move-only callable cannot be copied: the chunks of one job then share it, and it
///   must be safe to call concurrently.
/// - There is no isolation: a task that crashes crashes the program, and a task cannot be
///   stopped once it runs. Hence task_timeout and max_tasks_per_child must be 0
///   (std::invalid_argument otherwise), cancel() fails (returns false) for a task that already
///   started, and terminate() lets running tasks finish (their results fail at once).
/// - A task's exception reaches get() as the very exception object the task threw.
///
/// Thread safety: every member may be called from any thread. Callbacks run on one thread
/// owned by the pool, one at a time.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <ranges>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "async_result.hpp"
#include "detail/jobs.hpp"
#include "detail/thread_pool_core.hpp"
#include "errors.hpp"
#include "pool.hpp"  // PoolOptions, and the result types Pool computes
#include "process.hpp"
#include "progress.hpp"

namespace procpool {
namespace detail {

/// What a task's result becomes in a ThreadPool: the invoke result without reference or cv
/// qualifiers (void stays void).
template <class T>
using thread_result_t = std::remove_cvref_t<T>;

template <class F, class... Args>
using thread_apply_result_t = thread_result_t<apply_result_t<F, Args...>>;

template <class R>
constexpr bool require_thread_result() {
  static_assert(std::is_void_v<R> || std::is_move_constructible_v<R>,
                "procpool: a ThreadPool task's result type must be move-constructible");
  return true;
}

template <class R>
class ThreadSingleJob final : public ThreadJob {
 public:
  using result_type = R;
  explicit ThreadSingleJob(std::shared_ptr<ResultState<R>> s) : o_(std::move(s)) {}
  void set(std::uint32_t, Stored<R>&& v, Completions& out) { o_.set(std::move(v), out); }
  void fail(std::uint32_t, std::exception_ptr e, Completions& out) { o_.fail(std::move(e), out); }
  bool cancel_job(Completions& out) override {
    if (started > 0 || o_.ended()) return false;  // a running thread cannot be stopped
    o_.fail(cancelled_error(), out);
    return true;
  }

 private:
  SingleOutcome<R, Completions> o_;
};

// `Counter` counts each item that ends, for a progress bar (NoItemCounter: none).
template <class R, class Counter = NoItemCounter>
class ThreadMapJob final : public ThreadJob {
 public:
  using result_type = R;
  using Outcome = MapOutcome<R, Completions>;
  using Vector = typename Outcome::Vector;
  ThreadMapJob(std::shared_ptr<ResultState<Vector>> s, std::size_t n, Counter counter = {})
      : o_(std::move(s), n), counter_(std::move(counter)) {}
  void start(Completions& out) { o_.start(out); }
  void set(std::uint32_t i, Stored<R>&& v, Completions& out) {
    counter_.add();
    o_.set(i, [&]() -> Stored<R>&& { return std::move(v); }, out);
  }
  void fail(std::uint32_t i, std::exception_ptr e, Completions& out) {
    counter_.add();
    o_.fail(i, e, out);
  }
  // Queued chunks are dropped; running ones finish and their results are ignored.
  bool cancel_job(Completions& out) override { return o_.cancel(out); }

 private:
  Outcome o_;
  [[no_unique_address]] Counter counter_;
};

template <class R>
class ThreadStreamJob final : public ThreadJob {
 public:
  using result_type = R;
  using Variant = decltype(StreamItem<R>::v);
  explicit ThreadStreamJob(std::shared_ptr<StreamBuffer<R>> b) : buffer_(std::move(b)) {}
  void set(std::uint32_t i, Stored<R>&& v, Completions&) {
    buffer_->put(i, StreamItem<R>{Variant(std::in_place_index<1>, std::move(v))});
  }
  void fail(std::uint32_t i, std::exception_ptr e, Completions&) {
    buffer_->put(i, StreamItem<R>{Variant(std::in_place_index<2>, std::move(e))});
  }
  bool cancel_job(Completions&) override { return false; }

 private:
  std::shared_ptr<StreamBuffer<R>> buffer_;
};

/// The callable a new chunk calls: its own copy when F is copyable (see the file comment),
/// else the job's one instance.
template <class F>
std::shared_ptr<F> callable_for_chunk(const std::shared_ptr<F>& job_callable) {
  if constexpr (std::is_copy_constructible_v<F>) {
    return std::make_shared<F>(*job_callable);
  } else {
    return job_callable;
  }
}

/// Items [base, base + count) of a job of type Job, each passed to F as Mode says.
template <class Job, class F, class Item, CallMode Mode>
class ThreadTaskChunk final : public ThreadChunk {
 public:
  using R = typename Job::result_type;

  ThreadTaskChunk(std::shared_ptr<Job> j, std::shared_ptr<F> f, std::uint32_t base)
      : ThreadChunk(std::move(j)), f_(std::move(f)), base_(base) {}

  void reserve(std::size_t n) { items_.reserve(n); }
  /// Adds an item, copying or converting it to Item now (the caller's object may change later).
  template <class Ref>
  void add(Ref&& x) {
    items_.emplace_back(std::forward<Ref>(x));
  }
  std::size_t count() const noexcept { return items_.size(); }

  void run() noexcept override {
    try {
      outcomes_.resize(items_.size());
    } catch (...) {
      run_error_ = std::current_exception();
      return;
    }
    for (std::size_t i = 0; i < items_.size(); ++i) {
      try {
        if constexpr (std::is_void_v<R>) {
          call_item<Mode>(*f_, items_[i]);
          outcomes_[i].template emplace<1>();
        } else {
          outcomes_[i].template emplace<1>(call_item<Mode>(*f_, items_[i]));
        }
      } catch (...) {
        outcomes_[i].template emplace<0>(std::current_exception());
      }
    }
  }

  void deliver(Completions& out) override {
    Job& j = static_cast<Job&>(*job);
    for (std::size_t i = 0; i < items_.size(); ++i) {
      auto index = static_cast<std::uint32_t>(base_ + i);
      if (run_error_) {
        j.fail(index, run_error_, out);
      } else if (outcomes_[i].index() == 0) {
        j.fail(index, std::get<0>(outcomes_[i]), out);
      } else {
        try {
          j.set(index, std::move(std::get<1>(outcomes_[i])), out);
        } catch (...) {  // moving the result threw: that is the item's outcome
          j.fail(index, std::current_exception(), out);
        }
      }
    }
  }

  void fail(std::exception_ptr e, Completions& out) override {
    Job& j = static_cast<Job&>(*job);
    for (std::size_t i = 0; i < items_.size(); ++i) {
      j.fail(static_cast<std::uint32_t>(base_ + i), e, out);
    }
  }

 private:
  std::shared_ptr<F> f_;
  std::uint32_t base_;
  std::vector<Item> items_;
  std::vector<std::variant<std::exception_ptr, Stored<R>>> outcomes_;
  std::exception_ptr run_error_;
};

/// Builds and submits the chunks of an imap stream for a ThreadPool (LazyStream's Feeder).
template <class R, class F, class Item>
class ThreadFeeder {
 public:
  using Job = ThreadStreamJob<R>;
  using Chunk = ThreadTaskChunk<Job, F, Item, CallMode::single>;

  ThreadFeeder(std::shared_ptr<ThreadPoolCore> core, std::shared_ptr<Job> job,
               std::shared_ptr<F> f)
      : core_(std::move(core)), job_(std::move(job)), f_(std::move(f)) {
    core_->stream_feeding(+1);
  }
  ThreadFeeder(ThreadFeeder&& o) noexcept
      : core_(std::move(o.core_)),
        job_(std::move(o.job_)),
        f_(std::move(o.f_)),
        chunk_(std::move(o.chunk_)),
        feeding_(std::exchange(o.feeding_, false)) {}
  ThreadFeeder& operator=(ThreadFeeder&&) = delete;
  // A stream that was never built still tells the pool it will feed no more.
  ~ThreadFeeder() {
    try {
      stop();
    } catch (...) {
    }
  }

  void begin_chunk(std::uint32_t base) {
    chunk_ = std::make_unique<Chunk>(job_, callable_for_chunk(f_), base);
  }
  template <class Ref>
  void add(Ref&& x) {
    chunk_->add(std::forward<Ref>(x));
  }
  void submit() {
    std::vector<std::unique_ptr<ThreadChunk>> v;
    v.push_back(std::move(chunk_));
    core_->submit(job_, v, true);
  }
  void discard() { chunk_.reset(); }
  void stop() {
    if (std::exchange(feeding_, false)) core_->stream_feeding(-1);
  }

 private:
  std::shared_ptr<ThreadPoolCore> core_;
  std::shared_ptr<Job> job_;
  std::shared_ptr<F> f_;
  std::unique_ptr<Chunk> chunk_;
  bool feeding_ = true;
};

inline std::shared_ptr<ThreadPoolCore> make_thread_pool_core(PoolOptions options) {
  if (options.task_timeout.count() != 0) {
    throw std::invalid_argument(
        "procpool: a ThreadPool cannot enforce task_timeout (a thread cannot be killed); it "
        "must be 0");
  }
  if (options.max_tasks_per_child != 0) {
    throw std::invalid_argument(
        "procpool: a ThreadPool does not recycle its threads; max_tasks_per_child must be 0");
  }
  std::size_t n = options.processes ? options.processes : cpu_count();
  return std::make_shared<ThreadPoolCore>(n, std::move(options.initializer));
}

}  // namespace detail

/// A pool of worker threads with exactly Pool's interface (Python's
/// multiprocessing.pool.ThreadPool); thread_pool.hpp tells what differs.
class ThreadPool {
 public:
  /// cpu_count() threads.
  ThreadPool() : ThreadPool(PoolOptions{}) {}
  /// `processes` threads (0: cpu_count()).
  explicit ThreadPool(std::size_t processes) : ThreadPool(PoolOptions{processes, {}, 0, {}}) {}
  /// Starts `options.processes` threads (0: cpu_count()) and a callback thread. Each thread
  /// runs `options.initializer` once before taking any task; the constructor returns when all
  /// have. If an initializer throws, that is reported on stderr, every thread is stopped and
  /// joined, and the first such exception propagates from the constructor.
  /// @throws std::invalid_argument for a nonzero task_timeout or max_tasks_per_child;
  /// std::system_error if a thread cannot be started.
  explicit ThreadPool(PoolOptions options)
      : core_(detail::make_thread_pool_core(std::move(options))) {
    core_->start();
  }

  /// close() and join(), unless terminate() was called. Never throws. Called from one of the
  /// pool's own tasks or callbacks, which cannot wait for themselves, it closes the pool and
  /// detaches its threads; they finish the queued work and leave.
  ~ThreadPool() { release(); }

  /// Not copyable: a pool owns its threads. Move it instead.
  ThreadPool(const ThreadPool&) = delete;
  /// Not copy-assignable: a pool owns its threads. Move-assign it instead.
  ThreadPool& operator=(const ThreadPool&) = delete;
  /// Takes over another pool's threads and pending results; the moved-from pool may only be
  /// destroyed or assigned to.
  ThreadPool(ThreadPool&&) noexcept = default;
  /// Closes and joins this pool first.
  ThreadPool& operator=(ThreadPool&& other) noexcept {
    if (this != &other) {
      release();
      core_ = std::move(other.core_);
    }
    return *this;
  }

  /// The number of worker threads.
  std::size_t size() const { return core().size(); }

  /// Runs f(args...) on a worker thread and waits for its result.
  /// @throws the task's exception; PoolTerminatedError; PoolNotRunningError after close();
  /// std::logic_error from a callback of this pool.
  template <class F, class... Args>
  detail::thread_apply_result_t<F, Args...> apply(F f, Args&&... args) {
    using R = detail::thread_apply_result_t<F, Args...>;
    return detail::take_result(*submit_apply<R>(std::move(f), std::forward<Args>(args)...));
  }

  /// Submits f(args...) and returns at once. The arguments are decay-copied now.
  /// cancel() on the result succeeds only while the task is queued.
  /// @throws PoolNotRunningError after close() or terminate().
  template <class F, class... Args>
  AsyncResult<detail::thread_apply_result_t<F, Args...>> apply_async(F f, Args&&... args) {
    using R = detail::thread_apply_result_t<F, Args...>;
    return AsyncResult<R>(submit_apply<R>(std::move(f), std::forward<Args>(args)...));
  }

  /// f applied to every item, results in input order. Reads the whole input first.
  /// chunksize 0 chooses one: ceil(n / (4 × threads)).
  /// @throws the failure of the lowest-indexed failed item (after every item finished);
  /// whatever the input range throws; PoolNotRunningError after close().
  template <class F, std::ranges::input_range Range>
  auto map(F f, Range&& items, std::size_t chunksize = 0) {
    auto r = map_async(std::move(f), std::forward<Range>(items), chunksize);
    return detail::take_result(*detail::state_of(r));
  }

  /// As map, returning at once. The whole input has been read when it returns. cancel() on the
  /// result succeeds until the map completes: queued chunks never run, running ones finish
  /// and are discarded.
  template <class F, std::ranges::input_range Range>
  auto map_async(F f, Range&& items, std::size_t chunksize = 0) {
    using Item = std::remove_cvref_t<std::ranges::range_value_t<Range>>;
    using R = detail::thread_result_t<detail::map_result_t<F, Range>>;
    return submit_map<R, Item, detail::CallMode::single>(std::move(f),
                                                         std::forward<Range>(items), chunksize);
  }

  /// f applied to each tuple's unpacked elements, results in input order.
  template <class F, std::ranges::input_range Range>
  auto starmap(F f, Range&& tuples, std::size_t chunksize = 0) {
    auto r = starmap_async(std::move(f), std::forward<Range>(tuples), chunksize);
    return detail::take_result(*detail::state_of(r));
  }

  /// As starmap, returning at once.
  template <class F, std::ranges::input_range Range>
  auto starmap_async(F f, Range&& tuples, std::size_t chunksize = 0) {
    using Item = std::remove_cvref_t<std::ranges::range_value_t<Range>>;
    using R = detail::thread_result_t<detail::starmap_result_t<F, Item>>;
    return submit_map<R, Item, detail::CallMode::unpack>(std::move(f),
                                                         std::forward<Range>(tuples), chunksize);
  }

  /// As map(f, items), drawing a progress bar (progress.hpp) of the items done as their
  /// results arrive. `progress.total` defaults to the size of a sized input. The calling
  /// thread draws while it waits; the bar's final line is written before map returns or throws.
  /// When the bar would not be drawn (not a terminal, not forced) this is exactly map().
  template <class F, std::ranges::input_range Range>
  auto map(F f, Range&& items, Progress progress) {
    return map(std::move(f), std::forward<Range>(items), 0, std::move(progress));
  }

  /// As map(f, items, chunksize), drawing a progress bar as map(f, items, progress) does.
  template <class F, std::ranges::input_range Range>
  auto map(F f, Range&& items, std::size_t chunksize, Progress progress) {
    using Item = std::remove_cvref_t<std::ranges::range_value_t<Range>>;
    using R = detail::thread_result_t<detail::map_result_t<F, Range>>;
    return map_with_progress<R, Item, detail::CallMode::single>(
        std::move(f), std::forward<Range>(items), chunksize, std::move(progress));
  }

  /// As starmap(f, tuples), drawing a progress bar as map(f, items, progress) does.
  template <class F, std::ranges::input_range Range>
  auto starmap(F f, Range&& tuples, Progress progress) {
    return starmap(std::move(f), std::forward<Range>(tuples), 0, std::move(progress));
  }

  /// As starmap(f, tuples, chunksize), drawing a progress bar as map(f, items, progress) does.
  template <class F, std::ranges::input_range Range>
  auto starmap(F f, Range&& tuples, std::size_t chunksize, Progress progress) {
    using Item = std::remove_cvref_t<std::ranges::range_value_t<Range>>;
    using R = detail::thread_result_t<detail::starmap_result_t<F, Item>>;
    return map_with_progress<R, Item, detail::CallMode::unpack>(
        std::move(f), std::forward<Range>(tuples), chunksize, std::move(progress));
  }

  /// Lazily maps f over items, yielding results in input order. The input is read only as
  /// results are consumed (about 2 × threads chunks ahead), from the thread that iterates, so
  /// it may be infinite. An lvalue input must outlive the stream.
  template <class F, std::ranges::input_range Range>
  auto imap(F f, Range&& items, std::size_t chunksize = 1) {
    return make_stream(std::move(f), std::forward<Range>(items), chunksize, true);
  }

  /// As imap, yielding results as they finish.
  template <class F, std::ranges::input_range Range>
  auto imap_unordered(F f, Range&& items, std::size_t chunksize = 1) {
    return make_stream(std::move(f), std::forward<Range>(items), chunksize, false);
  }

  /// As imap(f, items), with a progress bar (progress.hpp) of the results the caller has
  /// taken. `progress.total` defaults to the size of a sized input. The bar is drawn by the
  /// thread that iterates (also while it waits), and writes its final line when the stream is
  /// exhausted or destroyed. When the bar would not be drawn this is exactly imap().
  template <class F, std::ranges::input_range Range>
  auto imap(F f, Range&& items, Progress progress) {
    return imap(std::move(f), std::forward<Range>(items), 1, std::move(progress));
  }

  /// As imap(f, items, chunksize), with a progress bar as imap(f, items, progress) has.
  template <class F, std::ranges::input_range Range>
  auto imap(F f, Range&& items, std::size_t chunksize, Progress progress) {
    detail::default_total(progress, items);
    return detail::with_progress(
        make_stream(std::move(f), std::forward<Range>(items), chunksize, true),
        std::move(progress));
  }

  /// As imap_unordered(f, items), with a progress bar as imap(f, items, progress) has.
  template <class F, std::ranges::input_range Range>
  auto imap_unordered(F f, Range&& items, Progress progress) {
    return imap_unordered(std::move(f), std::forward<Range>(items), 1, std::move(progress));
  }

  /// As imap_unordered(f, items, chunksize), with a progress bar as imap(f, items, progress)
  /// has.
  template <class F, std::ranges::input_range Range>
  auto imap_unordered(F f, Range&& items, std::size_t chunksize, Progress progress) {
    detail::default_total(progress, items);
    return detail::with_progress(
        make_stream(std::move(f), std::forward<Range>(items), chunksize, false),
        std::move(progress));
  }

  /// No new tasks; submitted ones still run. Threads exit once all work is done.
  void close() { core().close(); }

  /// Waits for every thread to exit. Only after close() or terminate().
  /// @throws std::logic_error before close()/terminate(), or from a task or callback of this
  /// pool.
  void join() { core().join(); }

  /// Fails every unfinished result with PoolTerminatedError at once and drops the queued
  /// tasks, then waits for the threads: a task already running cannot be interrupted and
  /// finishes first (its outcome is discarded). Called from one of the pool's own tasks or
  /// callbacks it does not wait; join() or the destructor does.
  void terminate() { core().terminate(); }

 private:
  detail::ThreadPoolCore& core() const {
    if (!core_) throw std::logic_error("procpool: use of a moved-from ThreadPool");
    return *core_;
  }

  void release() noexcept {
    if (!core_) return;
    core_->release();
    core_.reset();
  }

  template <class State>
  void register_result(detail::ThreadJob& job, State& state) {
    job.id = core().new_job_id();
    state.set_owner(std::weak_ptr<detail::ResultOwner>(core_), job.id);
  }

  template <class R, class F, class... Args>
  std::shared_ptr<detail::ResultState<R>> submit_apply(F f, Args&&... args) {
    using D = std::decay_t<F>;
    using Tup = std::tuple<std::decay_t<Args>...>;
    using Job = detail::ThreadSingleJob<R>;
    using Chunk = detail::ThreadTaskChunk<Job, D, Tup, detail::CallMode::unpack>;
    static_assert(detail::require_thread_result<R>());
    core().check_running();
    auto state = std::make_shared<detail::ResultState<R>>();
    auto job = std::make_shared<Job>(state);
    auto chunk = std::make_unique<Chunk>(job, std::make_shared<D>(std::move(f)), 0);
    chunk->add(Tup(std::forward<Args>(args)...));
    register_result(*job, *state);
    std::vector<std::unique_ptr<detail::ThreadChunk>> chunks;
    chunks.push_back(std::move(chunk));
    core().submit(job, chunks, false);
    return state;
  }

  template <class R, class Item, detail::CallMode Mode, class F, class Range,
            class Counter = detail::NoItemCounter>
  auto submit_map(F f, Range&& items, std::size_t chunksize, Counter counter = {}) {
    using D = std::decay_t<F>;
    using Job = detail::ThreadMapJob<R, Counter>;
    using Chunk = detail::ThreadTaskChunk<Job, D, Item, Mode>;
    static_assert(detail::require_thread_result<R>());
    core().check_running();
    if constexpr (!std::ranges::sized_range<Range> || !std::ranges::forward_range<Range>) {
      // Read it all first: the automatic chunk size needs the length. The copies are then
      // moved into the chunks.
      std::vector<Item> all;
      for (auto&& x : items) all.emplace_back(std::forward<decltype(x)>(x));
      return submit_map<R, Item, Mode>(
          std::move(f), all | std::views::transform([](Item& x) -> Item&& { return std::move(x); }),
          chunksize, std::move(counter));
    } else {
      std::size_t n = static_cast<std::size_t>(std::ranges::size(items));
      std::size_t cs = chunksize ? chunksize : detail::auto_chunksize(n, core().size());
      auto state = std::make_shared<detail::ResultState<typename Job::Vector>>();
      auto job = std::make_shared<Job>(state, n, std::move(counter));
      auto callable = std::make_shared<D>(std::move(f));
      std::vector<std::unique_ptr<detail::ThreadChunk>> chunks;
      chunks.reserve(n / cs + 1);
      std::uint32_t index = 0;
      std::unique_ptr<Chunk> c;
      for (auto&& x : items) {
        if (!c) {
          c = std::make_unique<Chunk>(job, detail::callable_for_chunk(callable), index);
          c->reserve(std::min(cs, n > index ? n - index : std::size_t{1}));
        }
        c->add(std::forward<decltype(x)>(x));
        ++index;
        if (c->count() == cs) chunks.push_back(std::move(c));
      }
      if (c) chunks.push_back(std::move(c));
      detail::Completions out;
      job->start(out);
      register_result(*job, *state);
      core().submit(job, chunks, false);
      core().run_completions(out);
      return AsyncResult<typename Job::Vector>(state);
    }
  }

  // Without a drawn bar, plain map; else the job counts its items and this thread draws them.
  template <class R, class Item, detail::CallMode Mode, class F, class Range>
  auto map_with_progress(F f, Range&& items, std::size_t chunksize, Progress progress) {
    return detail::map_showing_progress<Item>(
        std::forward<Range>(items), std::move(progress), [&](auto&& input, auto counter) {
          return submit_map<R, Item, Mode>(std::move(f), std::forward<decltype(input)>(input),
                                           chunksize, std::move(counter));
        });
  }

  template <class F, class Range>
  auto make_stream(F f, Range&& items, std::size_t chunksize, bool ordered) {
    using D = std::decay_t<F>;
    using Item = std::remove_cvref_t<std::ranges::range_value_t<Range>>;
    using R = detail::thread_result_t<detail::map_result_t<F, Range>>;
    static_assert(!std::is_void_v<R>,
                  "procpool: imap and imap_unordered need a task that returns a value");
    static_assert(detail::require_thread_result<R>());
    using View = std::views::all_t<Range>;
    using Feeder = detail::ThreadFeeder<R, D, Item>;
    core().check_running();
    auto buffer = std::make_shared<detail::StreamBuffer<R>>(ordered);
    auto job = std::make_shared<detail::ThreadStreamJob<R>>(buffer);
    Feeder feeder(core_, job, std::make_shared<D>(std::move(f)));
    return ResultStream<R>(std::make_unique<detail::LazyStream<R, View, Feeder>>(
        std::views::all(std::forward<Range>(items)), buffer, std::move(feeder),
        chunksize ? chunksize : 1, 2 * core().size()));
  }

  std::shared_ptr<detail::ThreadPoolCore> core_;
};

}  // namespace procpool
