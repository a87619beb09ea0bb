#pragma once
/// @file pool.hpp
/// Pool: a pool of fork()ed worker processes, as Python's multiprocessing.Pool.
///
/// ```cpp
/// procpool::Pool pool(4);
/// std::vector<long> squares = pool.map([](long x) { return x * x; }, std::views::iota(0L, 10L));
/// auto r = pool.apply_async([](int a, int b) { return a + b; }, 1, 2);
/// int three = r.get();
/// ```
///
/// Workers are forks of the program made when the Pool is constructed (through a fork server,
/// so never from a multi-threaded parent): they see memory as it was then. Callables travel by
/// address and the bytes of their captures; arguments and results travel Serializable (see
/// serialize.hpp). A task that throws fails only its own result; a worker that dies fails only
/// the task it was running and is replaced. See docs/ARCHITECTURE.md.
///
/// Thread safety: every member may be called from any thread. Callbacks run on one thread owned
/// by the pool, one at a time.

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <ranges>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "async_result.hpp"
#include "detail/jobs.hpp"
#include "detail/pool_core.hpp"
#include "detail/wire.hpp"
#include "detail/worker.hpp"
#include "errors.hpp"
#include "progress.hpp"
#include "serialize.hpp"

namespace procpool {

/// How a Pool is built. An aggregate, fields in this order:
/// `PoolOptions o; o.processes = 4; o.task_timeout = 2s; Pool pool(o);`
struct PoolOptions {
  std::size_t processes = 0;                  ///< 0: cpu_count()
  std::function<void()> initializer;          ///< runs once in each worker before its first task
  std::size_t max_tasks_per_child = 0;        ///< 0: workers are never recycled
  std::chrono::milliseconds task_timeout{0};  ///< 0: no limit
};

/// Instantiated only for a callable that cannot be sent to a worker, so that the compiler's
/// first line names it ("In instantiation of 'struct procpool::task_callable_cannot_be_sent<...>'").
template <class F>
struct task_callable_cannot_be_sent {
  static_assert(
      sizeof(F) == 0,
      "procpool: the callable named in 'task_callable_cannot_be_sent<...>' above cannot be sent "
      "to a worker process. Use a function pointer, a lambda that captures nothing or only "
      "trivially copyable values (references to data that existed when the Pool was built are "
      "fine), or a function object with a serialize member. A std::function, or a lambda "
      "capturing a std::string, std::vector or other owning object by value, cannot travel: "
      "pass such data as task arguments instead.");
};

namespace detail {

template <class T>
struct is_std_function : std::false_type {};
template <class Sig>
struct is_std_function<std::function<Sig>> : std::true_type {};

/// True when F can be sent to a worker; fails compilation with a readable message otherwise.
template <class F>
constexpr bool require_task_callable() {
  if constexpr (is_std_function<F>::value ||
                !((std::is_trivially_copyable_v<F> && std::is_copy_constructible_v<F>) ||
                  (kind_of<F>() == Kind::user && std::is_default_constructible_v<F>))) {
    (void)sizeof(task_callable_cannot_be_sent<F>);
    return false;
  } else {
    return true;
  }
}

/// A task's result type must come back from the worker: void, or Serializable and
/// default-constructible.
template <class R>
constexpr bool require_result() {
  if constexpr (std::is_void_v<R>) {
    return true;
  } else {
    using V = std::remove_cvref_t<R>;
    if constexpr (!require_serializable<V>()) {
      return false;
    } else {
      static_assert(std::is_default_constructible_v<V>,
                    "procpool: a task's result type must be default-constructible to be decoded");
      return true;
    }
  }
}

/// The header, chunk id placeholder, function reference and callable state that start every
/// chunk of one job.
template <class F, class Item, CallMode Mode>
ByteBuffer chunk_prefix(const F& f) {
  ByteBuffer b;
  b.begin_message(Msg::chunk);
  b.put(std::uint64_t{0});  // chunk id, patched per chunk
  b.put(function_ref(&run_chunk<F, Item, Mode>));
  if constexpr (std::is_empty_v<F> && std::is_default_constructible_v<F>) {
    b.varint(0);
  } else if constexpr (kind_of<F>() == Kind::user) {
    SizeArchive size;
    size.add(f);
    b.varint(size.size());
    b.encode(f);
  } else {
    b.varint(sizeof(F));
    b.append(std::addressof(f), sizeof(F));
  }
  return b;
}

template <class Item>
void skip_item(ReadArchive& r) {
  Item tmp{};
  r.get(tmp);
}

inline std::unique_ptr<Chunk> start_chunk(const ByteBuffer& prefix, std::shared_ptr<JobBase> job,
                                          std::uint32_t base, std::uint64_t id,
                                          void (*skip)(ReadArchive&)) {
  auto c = std::make_unique<Chunk>();
  c->id = id;
  c->job = std::move(job);
  c->base = base;
  c->skip_item = skip;
  c->msg.append(prefix.data(), prefix.size());
  std::memcpy(c->msg.data() + Chunk::id_at, &id, sizeof id);
  c->count_at = c->msg.size();
  c->msg.put(std::uint32_t{0});
  return c;
}

inline void finish_chunk(Chunk& c) {
  std::memcpy(c.msg.data() + c.count_at, &c.count, sizeof c.count);
  c.msg.finish_message(0);
}

/// Appends one item, converting it to Item first only if it is not one already.
template <class Item, class Ref>
void add_item(Chunk& c, Ref&& x) {
  if constexpr (std::is_same_v<std::remove_cvref_t<Ref>, Item>) {
    c.msg.encode(x);
  } else {
    c.msg.encode(static_cast<Item>(std::forward<Ref>(x)));
  }
  ++c.count;
}

template <class R>
Stored<R> decode_result(ReadArchive& in) {
  Stored<R> v{};
  if constexpr (!std::is_void_v<R>) in.get(v);
  return v;
}

template <class R>
class ProcSingleJob final : public JobBase {
 public:
  explicit ProcSingleJob(std::shared_ptr<ResultState<R>> s) : o_(std::move(s)) {}
  void deliver(std::uint32_t, ReadArchive& in, Completions& out) override {
    o_.set(decode_result<R>(in), out);
  }
  void fail(std::uint32_t, std::exception_ptr e, Completions& out) override { o_.fail(e, out); }
  bool cancel_job(Completions& out) override {
    if (o_.ended()) return false;
    o_.fail(cancelled_error(), out);
    return true;
  }

 private:
  SingleOutcome<R, Completions> o_;
};

// `Counter` counts each item that ends, for a progress bar (NoItemCounter: none).
template <class R, class Counter = NoItemCounter>
class ProcMapJob final : public JobBase {
 public:
  using Outcome = MapOutcome<R, Completions>;
  ProcMapJob(std::shared_ptr<ResultState<typename Outcome::Vector>> s, std::size_t n,
             Counter counter = {})
      : o_(std::move(s), n), counter_(std::move(counter)) {}
  void deliver(std::uint32_t i, ReadArchive& in, Completions& out) override {
    counter_.add();
    if (o_.done()) {
      (void)decode_result<R>(in);  // step over it
      return;
    }
    o_.set(i, [&] { return decode_result<R>(in); }, out);
  }
  void fail(std::uint32_t i, std::exception_ptr e, Completions& out) override {
    counter_.add();
    o_.fail(i, e, out);
  }
  bool cancel_job(Completions& out) override { return o_.cancel(out); }
  void start(Completions& out) { o_.start(out); }

 private:
  Outcome o_;
  [[no_unique_address]] Counter counter_;
};

template <class R>
class ProcStreamJob final : public JobBase {
 public:
  explicit ProcStreamJob(std::shared_ptr<StreamBuffer<R>> b) : buffer_(std::move(b)) {}
  void deliver(std::uint32_t i, ReadArchive& in, Completions&) override {
    R v = decode_result<R>(in);
    buffer_->put(i, StreamItem<R>{std::move(v)});
  }
  void fail(std::uint32_t i, std::exception_ptr e, Completions&) override {
    // Moved, not copied: the consumer may wake and read the error at once, so the I/O thread
    // must keep no reference (ThreadSanitizer cannot see exception_ptr's reference count in
    // the uninstrumented libstdc++, and would report the consumer's read against our release).
    buffer_->put(i, StreamItem<R>{std::move(e)});
  }
  bool cancel_job(Completions&) override { return false; }

 private:
  std::shared_ptr<StreamBuffer<R>> buffer_;
};

/// Builds and submits the chunks of an imap stream for a process pool.
template <class Item>
class ProcFeeder {
 public:
  ProcFeeder(std::shared_ptr<PoolCore> core, std::shared_ptr<JobBase> job, ByteBuffer prefix)
      : core_(std::move(core)), job_(std::move(job)), prefix_(std::move(prefix)) {
    core_->stream_feeding(+1);
  }
  ProcFeeder(ProcFeeder&&) noexcept = default;
  void begin_chunk(std::uint32_t base) {
    chunk_ = start_chunk(prefix_, job_, base, core_->new_chunk_id(), &skip_item<Item>);
  }
  template <class Ref>
  void add(Ref&& x) {
    add_item<Item>(*chunk_, std::forward<Ref>(x));
  }
  void submit() {
    finish_chunk(*chunk_);
    std::vector<std::unique_ptr<Chunk>> v;
    v.push_back(std::move(chunk_));
    core_->submit(job_, v, true);
  }
  void discard() { chunk_.reset(); }
  void stop() { core_->stream_feeding(-1); }

 private:
  std::shared_ptr<PoolCore> core_;
  std::shared_ptr<JobBase> job_;
  ByteBuffer prefix_;
  std::unique_ptr<Chunk> chunk_;
};

template <class F, class... Args>
using apply_result_t = std::invoke_result_t<std::decay_t<F>&, std::decay_t<Args>...>;

template <class F, class Range>
using map_result_t = std::invoke_result_t<std::decay_t<F>&, std::ranges::range_value_t<Range>>;

template <class F, class Tuple>
using starmap_result_t =
    decltype(std::apply(std::declval<std::decay_t<F>&>(), std::declval<Tuple>()));

}  // namespace detail

/// A pool of worker processes (Python's multiprocessing.Pool: `with Pool(4) as p:` becomes
/// `procpool::Pool p(4);`, whose destructor closes and joins). pool.hpp tells what workers see
/// and how a task that throws or a worker that dies is contained.
class Pool {
 public:
  /// cpu_count() workers.
  Pool() : Pool(PoolOptions{}) {}
  /// `processes` workers (0: cpu_count()).
  explicit Pool(std::size_t processes) : Pool(PoolOptions{processes, {}, 0, {}}) {}
  /// @throws std::system_error if the fork server cannot be started; std::invalid_argument
  /// for a negative task_timeout.
  explicit Pool(PoolOptions options)
      : core_(std::make_shared<detail::PoolCore>(detail::PoolConfig{
            options.processes, std::move(options.initializer), options.max_tasks_per_child,
            options.task_timeout})) {
    core_->start();
  }

  /// close() and join(), unless terminate() was called. Never throws.
  ~Pool() { release(); }

  /// Not copyable: a pool owns its worker processes. Move it instead.
  Pool(const Pool&) = delete;
  /// Not copy-assignable: a pool owns its worker processes. Move-assign it instead.
  Pool& operator=(const Pool&) = delete;
  /// Takes over another pool's workers and pending results; the moved-from pool may only be
  /// destroyed or assigned to.
  Pool(Pool&&) noexcept = default;
  /// Closes and joins this pool first.
  Pool& operator=(Pool&& other) noexcept {
    if (this != &other) {
      release();
      core_ = std::move(other.core_);
    }
    return *this;
  }

  /// The number of worker processes.
  std::size_t size() const { return core().size(); }

  /// Runs f(args...) in a worker and waits for its result (Python's `p.apply(f, (a, b))`).
  /// @throws the task's exception (see RemoteError for which types keep theirs),
  /// WorkerLostError, TaskTimeoutError, PoolNotRunningError after close().
  template <class F, class... Args>
  detail::apply_result_t<F, Args...> apply(F f, Args&&... args) {
    return apply_async(std::move(f), std::forward<Args>(args)...).get();
  }

  /// Submits f(args...) and returns at once (Python's `p.apply_async`; its `callback` and
  /// `error_callback` are AsyncResult::on_result and AsyncResult::on_error). Arguments are
  /// encoded now (the caller's objects may change afterwards).
  /// @throws PoolNotRunningError after close() or terminate().
  template <class F, class... Args>
  AsyncResult<detail::apply_result_t<F, Args...>> apply_async(F f, Args&&... args) {
    using D = std::decay_t<F>;
    using R = detail::apply_result_t<F, Args...>;
    using Tup = std::tuple<std::decay_t<Args>...>;
    if constexpr (!(detail::require_task_callable<D>() &&
                    (detail::require_serializable<std::decay_t<Args>>() && ...) &&
                    detail::require_result<R>())) {
      return {};
    } else {
      auto state = make_state<R>();
      auto job = std::make_shared<detail::ProcSingleJob<R>>(state);
      detail::ByteBuffer prefix = detail::chunk_prefix<D, Tup, detail::CallMode::unpack>(f);
      auto c = detail::start_chunk(prefix, job, 0, core().new_chunk_id(),
                                   &detail::skip_item<Tup>);
      (c->msg.encode(args), ...);  // the same bytes as the tuple of them
      c->count = 1;
      detail::finish_chunk(*c);
      submit(job, state, c);
      return AsyncResult<R>(state);
    }
  }

  /// f applied to every item, results in input order (Python's `p.map(f, xs)`); blocks until
  /// every item has finished. Reads the whole input first.
  /// chunksize 0 chooses one: ceil(n / (4 × processes)).
  /// @throws the failure of the lowest-indexed failed item (after every item finished);
  /// whatever the input range throws; PoolNotRunningError after close().
  template <class F, std::ranges::input_range Range>
  auto map(F f, Range&& items, std::size_t chunksize = 0) {
    auto r = map_async(std::move(f), std::forward<Range>(items), chunksize);
    return detail::take_result(*detail::state_of(r));  // moved out, not copied
  }

  /// As map, returning at once (Python's `p.map_async`). The whole input has been read when it
  /// returns.
  template <class F, std::ranges::input_range Range>
  auto map_async(F f, Range&& items, std::size_t chunksize = 0) {
    using Item = std::remove_cvref_t<std::ranges::range_value_t<Range>>;
    using R = detail::map_result_t<F, Range>;
    return submit_map<R, Item, detail::CallMode::single>(std::move(f), std::forward<Range>(items),
                                                         chunksize);
  }

  /// f applied to each tuple's unpacked elements, results in input order (Python's
  /// `p.starmap(f, [(1, 2), (3, 4)])`); blocks and throws as map does.
  template <class F, std::ranges::input_range Range>
  auto starmap(F f, Range&& tuples, std::size_t chunksize = 0) {
    auto r = starmap_async(std::move(f), std::forward<Range>(tuples), chunksize);
    return detail::take_result(*detail::state_of(r));  // moved out, not copied
  }

  /// As starmap, returning at once (Python's `p.starmap_async`).
  template <class F, std::ranges::input_range Range>
  auto starmap_async(F f, Range&& tuples, std::size_t chunksize = 0) {
    using Item = std::remove_cvref_t<std::ranges::range_value_t<Range>>;
    using R = detail::starmap_result_t<F, Item>;
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
    using R = detail::map_result_t<F, Range>;
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
    using R = detail::starmap_result_t<F, Item>;
    return map_with_progress<R, Item, detail::CallMode::unpack>(
        std::move(f), std::forward<Range>(tuples), chunksize, std::move(progress));
  }

  /// Lazily maps f over items, yielding results in input order (Python's `p.imap`). The input
  /// is read only as results are consumed (about 2 × processes chunks ahead), so it may be
  /// infinite. An lvalue input must outlive the stream. Iterating blocks until the next result
  /// is ready; a failed item rethrows its error there (see ResultStream).
  template <class F, std::ranges::input_range Range>
  auto imap(F f, Range&& items, std::size_t chunksize = 1) {
    return make_stream(std::move(f), std::forward<Range>(items), chunksize, true);
  }

  /// As imap, yielding results as they finish (Python's `p.imap_unordered`).
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

  /// No new tasks; submitted ones still run. Workers exit once all work is done (Python's
  /// `p.close()`).
  void close() { core().close(); }

  /// Waits for every worker to exit (Python's `p.join()`). Only after close() or terminate().
  /// @throws std::logic_error before close()/terminate(), or from a callback of this pool.
  void join() { core().join(); }

  /// Stops the workers now (Python's `p.terminate()`): every unfinished result fails with
  /// PoolTerminatedError. Kills and reaps every worker before it returns.
  void terminate() { core().terminate(); }

 private:
  detail::PoolCore& core() const {
    if (!core_) throw std::logic_error("procpool: use of a moved-from Pool");
    return *core_;
  }

  void release() noexcept {
    if (!core_) return;
    try {
      core_->close();
      core_->join();
    } catch (const std::exception& e) {
      detail::report(std::string("while destroying a Pool: ") + e.what());
      try {
        core_->terminate();
      } catch (...) {
      }
    }
    core_.reset();
  }

  template <class R>
  std::shared_ptr<detail::ResultState<R>> make_state() {
    auto state = std::make_shared<detail::ResultState<R>>();
    return state;
  }

  template <class State>
  void submit(const std::shared_ptr<detail::JobBase>& job, const std::shared_ptr<State>& state,
              std::unique_ptr<detail::Chunk>& c) {
    std::vector<std::unique_ptr<detail::Chunk>> v;
    v.push_back(std::move(c));
    submit_all(job, state, v);
  }

  template <class State>
  void submit_all(const std::shared_ptr<detail::JobBase>& job,
                  const std::shared_ptr<State>& state,
                  std::vector<std::unique_ptr<detail::Chunk>>& chunks) {
    job->id = core().new_job_id();
    state->set_owner(std::weak_ptr<detail::ResultOwner>(core_), job->id);
    core().submit(job, chunks, false);
  }

  template <class R, class Item, detail::CallMode Mode, class F, class Range,
            class Counter = detail::NoItemCounter>
  auto submit_map(F f, Range&& items, std::size_t chunksize, Counter counter = {}) {
    using D = std::decay_t<F>;
    using Vector = typename detail::MapOutcome<R, detail::Completions>::Vector;
    using Result = AsyncResult<std::conditional_t<std::is_void_v<R>, void, std::vector<R>>>;
    if constexpr (!(detail::require_task_callable<D>() && detail::require_serializable<Item>() &&
                    detail::require_result<R>())) {
      return Result{};
    } else {
      core().check_running();
      if constexpr (!std::ranges::sized_range<Range> || !std::ranges::forward_range<Range>) {
        // Count first: the automatic chunk size needs the length.
        std::vector<Item> all;
        for (auto&& x : items) all.push_back(static_cast<Item>(std::forward<decltype(x)>(x)));
        return submit_map<R, Item, Mode>(std::move(f), all, chunksize, std::move(counter));
      } else {
        std::size_t n = static_cast<std::size_t>(std::ranges::size(items));
        std::size_t cs = chunksize ? chunksize : detail::auto_chunksize(n, core().size());
        auto state = std::make_shared<detail::ResultState<Vector>>();
        auto job = std::make_shared<detail::ProcMapJob<R, Counter>>(state, n, std::move(counter));
        detail::ByteBuffer prefix = detail::chunk_prefix<D, Item, Mode>(f);
        std::vector<std::unique_ptr<detail::Chunk>> chunks;
        chunks.reserve(n / cs + 1);
        std::uint32_t index = 0;
        std::unique_ptr<detail::Chunk> c;
        for (auto&& x : items) {
          if (!c) {
            c = detail::start_chunk(prefix, job, index, core().new_chunk_id(),
                                    &detail::skip_item<Item>);
          }
          detail::add_item<Item>(*c, std::forward<decltype(x)>(x));
          ++index;
          if (c->count == cs) {
            detail::finish_chunk(*c);
            chunks.push_back(std::move(c));
          }
        }
        if (c) {
          detail::finish_chunk(*c);
          chunks.push_back(std::move(c));
        }
        detail::Completions out;
        job->start(out);
        submit_all(job, state, chunks);
        for (auto& fn : out) fn();
        return Result(state);
      }
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
    using R = detail::map_result_t<F, Range>;
    static_assert(!std::is_void_v<R>,
                  "procpool: imap and imap_unordered need a task that returns a value");
    using View = std::views::all_t<Range>;
    using Feeder = detail::ProcFeeder<Item>;
    if constexpr (!(detail::require_task_callable<D>() && detail::require_serializable<Item>() &&
                    detail::require_result<R>())) {
      return ResultStream<R>(nullptr);
    } else {
      core().check_running();
      auto buffer = std::make_shared<detail::StreamBuffer<R>>(ordered);
      auto job = std::make_shared<detail::ProcStreamJob<R>>(buffer);
      job->id = core().new_job_id();
      Feeder feeder(core_, job, detail::chunk_prefix<D, Item, detail::CallMode::single>(f));
      return ResultStream<R>(std::make_unique<detail::LazyStream<R, View, Feeder>>(
          std::views::all(std::forward<Range>(items)), buffer, std::move(feeder),
          chunksize ? chunksize : 1, 2 * core().size()));
    }
  }

  std::shared_ptr<detail::PoolCore> core_;
};

}  // namespace procpool
