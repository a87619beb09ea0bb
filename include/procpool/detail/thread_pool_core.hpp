#pragma once
// The untyped engine of a ThreadPool: worker threads taking chunks from one queue, the callback
// thread, cancellation, close/join/terminate. Typed code (thread_pool.hpp) builds the chunks and
// jobs; this file runs them and never needs to know their types.
//
// Threads: user threads submit; N worker threads run chunks and deliver their outcomes; one
// callback thread runs result callbacks, one batch at a time. Queue, jobs and chunk states are
// guarded by one mutex, mu_; completions (which wake waiters and post callbacks) and the
// destruction of user objects (callables, arguments) always happen with it released.

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "exceptions.hpp"
#include "posix.hpp"
#include "result_state.hpp"

namespace procpool::detail {

// The same alias as pool_core.hpp's: closures that touch user-visible state, run unlocked.
using Completions = std::vector<std::function<void()>>;

/// One submitted operation (apply, map, imap stream) as the engine sees it. Its members are
/// guarded by the pool mutex.
class ThreadJob {
 public:
  virtual ~ThreadJob() = default;
  /// cancel(): fails the whole job with CancelledError. Returns false if it cannot (it ended, or
  /// a single task already started). Pool mutex held.
  virtual bool cancel_job(Completions& out) = 0;

  std::uint64_t id = 0;      // 0: not cancellable (streams)
  std::size_t started = 0;   // chunks a worker has taken
  bool cancelled = false;
};

/// A run of items of one job. run() computes outcomes on a worker thread without the lock;
/// deliver() or fail() hands them to the job, exactly once, with the lock held.
class ThreadChunk {
 public:
  explicit ThreadChunk(std::shared_ptr<ThreadJob> j) : job(std::move(j)) {}
  virtual ~ThreadChunk() = default;
  /// Runs every item, catching what each throws. Worker thread, pool mutex not held.
  virtual void run() noexcept = 0;
  /// Hands the outcomes of run() to the job. Pool mutex held.
  virtual void deliver(Completions& out) = 0;
  /// Fails every item with `e` (the chunk never ran, or its outcomes will be dropped).
  /// Pool mutex held.
  virtual void fail(std::exception_ptr e, Completions& out) = 0;

  std::shared_ptr<ThreadJob> job;
  bool ended = false;  // delivered or failed
};

/// What a thread of some ThreadPool is, so that a pool can tell its own threads apart.
struct ThreadRole {
  const void* pool = nullptr;
  bool callbacks = false;
};

inline ThreadRole& this_thread_role() noexcept {
  static thread_local ThreadRole role;
  return role;
}

class ThreadPoolCore final : public ResultOwner,
                             public std::enable_shared_from_this<ThreadPoolCore> {
 public:
  /// `threads` must be at least 1. Call start() next.
  ThreadPoolCore(std::size_t threads, std::function<void()> initializer)
      : n_(threads), initializer_(std::move(initializer)), running_(threads, nullptr) {}

  ~ThreadPoolCore() override {
    // Every thread holds a reference to the core, so they have all left by now; this only
    // makes sure no std::thread is still joinable (which would call std::terminate).
    try {
      terminate();
    } catch (...) {
    }
  }

  ThreadPoolCore(const ThreadPoolCore&) = delete;
  ThreadPoolCore& operator=(const ThreadPoolCore&) = delete;

  /// Starts the callback thread and the workers, and waits until every worker ran the
  /// initializer. If an initializer threw, stops and joins every thread and rethrows the first
  /// such exception. @throws std::system_error if a thread cannot be started.
  void start() {
    try {
      // Threads hold a reference to the core, so a pool destroyed from one of its own threads
      // (which can only detach them) stays alive until its last thread leaves.
      auto self = shared_from_this();
      cb_thread_ = std::thread([self] { self->callback_main(); });
      workers_.reserve(n_);
      for (std::size_t i = 0; i < n_; ++i) {
        workers_.emplace_back([self, i] { self->worker_main(i); });
      }
    } catch (...) {
      {
        std::lock_guard lock(mu_);
        live_workers_ = workers_.size();
      }
      terminate();
      throw;
    }
    std::unique_lock lock(mu_);
    init_cv_.wait(lock, [&] { return init_done_ == n_; });
    if (std::exception_ptr e = init_error_) {
      lock.unlock();
      terminate();
      std::rethrow_exception(e);
    }
  }

  std::size_t size() const noexcept { return n_; }

  /// Runs completions (closures that make results ready) with no lock held. Never throws: a
  /// completion that fails (a result's move constructor threw) is reported.
  void run_completions(Completions& out) noexcept {
    if (out.empty()) return;
    std::shared_ptr<Completions> keep;
    try {
      keep = std::make_shared<Completions>(std::move(out));
    } catch (...) {  // out of memory: complete them without keeping them for the callbacks
    }
    Completions& run = keep ? *keep : out;
    Posting saved = std::exchange(this_thread_posting(), Posting{this, keep});
    for (auto& fn : run) {
      try {
        fn();
      } catch (const std::exception& e) {
        report(std::string("completing a result failed: ") + e.what());
      } catch (...) {
        report("completing a result failed");
      }
    }
    this_thread_posting() = std::move(saved);
    out.clear();
  }

  std::uint64_t new_job_id() noexcept { return next_job_id_.fetch_add(1) + 1; }

  /// Queues the chunks of a job and registers the job for cancel().
  /// @throws PoolNotRunningError after close()/terminate(), or for a stream fed after join().
  void submit(const std::shared_ptr<ThreadJob>& job,
              std::vector<std::unique_ptr<ThreadChunk>>& chunks, bool feeding_stream) {
    std::size_t n = chunks.size();
    {
      std::lock_guard lock(mu_);
      check_accepting(feeding_stream);
      if (job->id != 0 && jobs_.try_emplace(job->id, job).second && (job->id & 1023) == 0) {
        std::erase_if(jobs_, [](const auto& j) { return j.second.expired(); });
      }
      for (auto& c : chunks) pending_.push_back(std::move(c));
      chunks.clear();
    }
    if (n == 1) {
      work_cv_.notify_one();
    } else if (n > 1) {
      work_cv_.notify_all();
    }
  }

  /// @throws PoolNotRunningError unless submit() would accept a new (non-stream) job now.
  void check_running() {
    std::lock_guard lock(mu_);
    check_accepting(false);
  }

  /// A stream opened (+1) or will feed no more (-1): a closed pool's workers stay until no
  /// stream may still feed work.
  void stream_feeding(int delta) {
    {
      std::lock_guard lock(mu_);
      open_streams_ += delta;
    }
    work_cv_.notify_all();
  }

  void close() {
    {
      std::lock_guard lock(mu_);
      if (state_ == State::running) state_ = State::closed;
    }
    work_cv_.notify_all();
  }

  /// Fails every unfinished result with PoolTerminatedError, drops the queue, then waits for
  /// the workers (a running task finishes first: a thread cannot be stopped) and the callback
  /// thread. From one of this pool's own threads it does not wait. Idempotent.
  void terminate() {
    Completions out;
    std::deque<std::unique_ptr<ThreadChunk>> dropped;
    {
      std::lock_guard lock(mu_);
      if (state_ != State::terminated) {
        state_ = State::terminated;
        auto e = std::make_exception_ptr(PoolTerminatedError("procpool: the pool was terminated"));
        for (auto& c : pending_) end_chunk(*c, e, out);
        for (ThreadChunk* c : running_) {
          if (c) end_chunk(*c, e, out);
        }
        dropped.swap(pending_);
        jobs_.clear();
      }
    }
    work_cv_.notify_all();
    run_completions(out);
    dropped.clear();  // user callables and arguments, destroyed unlocked
    if (!on_own_thread()) join_threads();
  }

  /// Waits until every worker and the callback thread exited.
  /// @throws std::logic_error unless close() or terminate() was called, or when called from
  /// one of this pool's tasks or callbacks (it would wait for itself).
  void join() {
    {
      std::lock_guard lock(mu_);
      if (state_ == State::running) {
        throw std::logic_error("procpool: join() before close() or terminate()");
      }
      if (on_own_thread()) {
        throw std::logic_error(
            "procpool: join() from a task or callback of the same ThreadPool would wait for "
            "itself");
      }
      stop_feeding_ = true;
    }
    work_cv_.notify_all();
    join_threads();
  }

  /// The destructor's close() + join(): from one of the pool's own threads, which cannot wait
  /// for itself, the threads are detached instead; they finish the queued work and leave.
  void release() noexcept {
    try {
      bool terminated;
      {
        std::lock_guard lock(mu_);
        terminated = state_ == State::terminated;
        if (state_ == State::running) state_ = State::closed;
        stop_feeding_ = true;
      }
      work_cv_.notify_all();
      if (!on_own_thread()) {
        join_threads();
        return;
      }
      if (!terminated) {
        report("a ThreadPool was destroyed by one of its own tasks or callbacks; its threads "
               "are detached and finish the queued work");
      }
      std::lock_guard join_lock(join_mu_);
      bool stop_callbacks_now;
      {
        std::lock_guard lock(mu_);
        detached_ = true;
        stop_callbacks_now = live_workers_ == 0;
      }
      if (stop_callbacks_now) stop_callbacks();
      for (auto& t : workers_) {
        if (t.joinable()) t.detach();
      }
      if (cb_thread_.joinable()) cb_thread_.detach();
    } catch (const std::exception& e) {
      report(std::string("while destroying a ThreadPool: ") + e.what());
    }
  }

  // ResultOwner
  bool post_callback(std::function<void()> fn) override {
    const Posting& posting = this_thread_posting();
    if (posting.pool == this && posting.keep) {
      fn = [fn = std::move(fn), keep = posting.keep] { fn(); };
    }
    {
      std::lock_guard lock(cb_mu_);
      if (cb_done_) return false;
      posted_.push_back(std::move(fn));
    }
    cb_cv_.notify_one();
    return true;
  }

  bool on_callback_thread() const override {
    const ThreadRole& role = this_thread_role();
    return role.pool == this && role.callbacks;
  }

  bool cancel(std::uint64_t id) override {
    Completions out;
    std::vector<std::unique_ptr<ThreadChunk>> dropped;
    std::shared_ptr<ThreadJob> job;
    bool done;
    {
      std::lock_guard lock(mu_);
      auto it = jobs_.find(id);
      if (it == jobs_.end()) return false;
      job = it->second.lock();
      if (!job || job->cancelled) return false;
      done = job->cancel_job(out);
      if (done) {
        job->cancelled = true;
        jobs_.erase(it);
        // Its queued chunks never run; those already running finish and are ignored.
        for (auto c = pending_.begin(); c != pending_.end();) {
          if ((*c)->job == job) {
            (*c)->ended = true;
            dropped.push_back(std::move(*c));
            c = pending_.erase(c);
          } else {
            ++c;
          }
        }
      }
    }
    run_completions(out);
    return done;  // `dropped` and `job` die here, unlocked
  }

 private:
  enum class State { running, closed, terminated };

  bool on_own_thread() const noexcept { return this_thread_role().pool == this; }

  void check_accepting(bool feeding_stream) const {
    if (state_ == State::running) return;
    if (feeding_stream && state_ == State::closed && !stop_feeding_) return;
    throw PoolNotRunningError(state_ == State::closed ? "procpool: the pool is closed"
                                                      : "procpool: the pool was terminated");
  }

  // Whether an idle worker leaves: nothing queued, and nothing can be queued any more.
  bool no_more_work() const {
    if (state_ == State::terminated) return true;
    return state_ == State::closed && pending_.empty() && (open_streams_ == 0 || stop_feeding_);
  }

  static void end_chunk(ThreadChunk& c, const std::exception_ptr& e, Completions& out) {
    if (std::exchange(c.ended, true)) return;
    c.fail(e, out);
  }

  void worker_main(std::size_t index) {
    this_thread_role() = ThreadRole{this, false};
    run_initializer();
    std::unique_lock lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return !pending_.empty() || no_more_work(); });
      if (state_ == State::terminated || pending_.empty()) break;
      std::unique_ptr<ThreadChunk> c = std::move(pending_.front());
      pending_.pop_front();
      ++c->job->started;
      running_[index] = c.get();
      lock.unlock();
      c->run();
      Completions out;
      lock.lock();
      running_[index] = nullptr;
      if (!std::exchange(c->ended, true)) c->deliver(out);
      lock.unlock();
      run_completions(out);
      c.reset();  // the task's callable and arguments, destroyed unlocked
      lock.lock();
    }
    bool last = --live_workers_ == 0 && detached_;
    lock.unlock();
    if (last) stop_callbacks();
    this_thread_role() = ThreadRole{};
  }

  void run_initializer() {
    std::exception_ptr error;
    if (initializer_) {
      try {
        initializer_();
      } catch (...) {
        error = std::current_exception();
        ExceptionText t = describe_exception(error);
        report("a ThreadPool initializer threw " + t.type_name + ": " + t.message);
      }
    }
    {
      std::lock_guard lock(mu_);
      if (error && !init_error_) init_error_ = error;
      ++init_done_;
    }
    init_cv_.notify_all();
  }

  void callback_main() {
    this_thread_role() = ThreadRole{this, true};
    std::unique_lock lock(cb_mu_);
    for (;;) {
      cb_cv_.wait(lock, [&] { return !posted_.empty() || cb_stop_; });
      if (posted_.empty()) {
        // Checked and set under the same lock: a post that comes later is told so and runs
        // its callback itself.
        cb_done_ = true;
        lock.unlock();
        this_thread_role() = ThreadRole{};
        return;
      }
      std::vector<std::function<void()>> batch;
      batch.swap(posted_);
      lock.unlock();
      for (auto& fn : batch) ResultStateBase::invoke_callback(fn);
      batch.clear();  // captured user objects, destroyed before the lock is retaken
      lock.lock();
    }
  }

  void stop_callbacks() {
    {
      std::lock_guard lock(cb_mu_);
      cb_stop_ = true;
    }
    cb_cv_.notify_all();
  }

  // The workers first: their last completions still post callbacks, which the callback thread
  // runs before it leaves.
  void join_threads() {
    std::lock_guard join_lock(join_mu_);
    for (auto& t : workers_) {
      if (t.joinable()) t.join();
    }
    stop_callbacks();
    if (cb_thread_.joinable()) cb_thread_.join();
  }

  // Completions run on the thread that finished the work, not on the callback thread, so the
  // callbacks they post outlive the call. Those callbacks hold only weak references to their
  // result (async_result.hpp); the completions hold strong ones, so each posted callback keeps
  // the completions that posted it alive until it has run: `pool.apply_async(f).on_result(cb)`
  // still calls cb after the temporary AsyncResult is gone, as with Pool.
  struct Posting {
    const ThreadPoolCore* pool = nullptr;
    std::shared_ptr<Completions> keep;
  };
  static Posting& this_thread_posting() noexcept {
    static thread_local Posting posting;
    return posting;
  }

  const std::size_t n_;
  const std::function<void()> initializer_;

  std::mutex join_mu_;  // serializes join/detach of the std::thread objects below
  std::vector<std::thread> workers_;
  std::thread cb_thread_;

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable init_cv_;
  State state_ = State::running;
  std::deque<std::unique_ptr<ThreadChunk>> pending_;
  std::vector<ThreadChunk*> running_;  // per worker, the chunk it runs
  std::unordered_map<std::uint64_t, std::weak_ptr<ThreadJob>> jobs_;
  std::size_t live_workers_ = n_;
  std::size_t init_done_ = 0;
  std::exception_ptr init_error_;
  int open_streams_ = 0;
  bool stop_feeding_ = false;
  bool detached_ = false;

  std::mutex cb_mu_;
  std::condition_variable cb_cv_;
  std::vector<std::function<void()>> posted_;
  bool cb_stop_ = false;
  bool cb_done_ = false;

  std::atomic<std::uint64_t> next_job_id_{0};
};

}  // namespace procpool::detail
