#pragma once
// The untyped engine of a process Pool: the fork server, the worker channels, the queue of
// chunks, and the one thread that does all of the pool's I/O. Typed code (pool.hpp) builds
// chunks and jobs; this file moves them and never needs to know their types.
//
// Threads: user threads submit (and may write a chunk straight to an idle worker); the I/O
// thread reads results, dispatches the rest, handles deaths and timeouts and runs callbacks.
// Everything here is guarded by one mutex, mu_; completions (which run user callbacks) always
// run with it released.

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../process.hpp"
#include "fork_server.hpp"
#include "internal_fds.hpp"
#include "io.hpp"
#include "posix.hpp"
#include "result_state.hpp"
#include "wire.hpp"
#include "worker.hpp"

namespace procpool {

/// A worker could not be started: its initializer threw or it died before its first task, too
/// many times in a row. The pool stops; every pending result fails with this error.
class WorkerStartError : public Error {
 public:
  using Error::Error;
};

namespace detail {

using Completions = std::vector<std::function<void()>>;

/// One submitted operation (an apply, a map, an imap stream) as the engine sees it: items
/// numbered from 0, each of which ends exactly once, delivered or failed. Called only with the
/// pool mutex held; what it wants to do to user-visible state goes into `out`.
class JobBase {
 public:
  virtual ~JobBase() = default;
  virtual void deliver(std::uint32_t index, ReadArchive& in, Completions& out) = 0;
  virtual void fail(std::uint32_t index, std::exception_ptr e, Completions& out) = 0;
  /// cancel(): fail the whole job with CancelledError. Returns false if it already ended.
  virtual bool cancel_job(Completions& out) = 0;

  std::uint64_t id = 0;
  bool cancelled = false;  // no item of it is dispatched or re-dispatched any more
};

/// A run of items of one job, encoded as a complete chunk message ready to send:
/// header | u64 chunk id | u64 function ref | varint state length | state | u32 count | items.
struct Chunk {
  std::uint64_t id = 0;
  std::shared_ptr<JobBase> job;
  std::uint32_t base = 0;     // the job's index of item 0
  std::uint32_t count = 0;
  std::uint32_t received = 0;  // results that came back (they come back in order)
  std::size_t count_at = 0;   // offset of the u32 count in msg
  ByteBuffer msg{ByteBuffer::shareable};  // a large one lives in a shared block
  SharedStub stub{0};                     // what the channel carries when msg is shared
  void (*skip_item)(ReadArchive&) = nullptr;  // steps over one encoded item

  static constexpr std::size_t id_at = header_size;

  /// A new chunk holding items [from, to) of this one, for re-dispatch after a worker died.
  std::unique_ptr<Chunk> slice(std::uint32_t from, std::uint32_t to, std::uint64_t new_id) const {
    ReadArchive r(msg.data() + count_at + 4, msg.data() + msg.size());
    for (std::uint32_t i = 0; i < from; ++i) skip_item(r);
    std::size_t begin = count_at + 4 + r.offset();
    for (std::uint32_t i = from; i < to; ++i) skip_item(r);
    std::size_t end = count_at + 4 + r.offset();
    auto c = std::make_unique<Chunk>();
    c->id = new_id;
    c->job = job;
    c->base = base + from;
    c->count = to - from;
    c->count_at = count_at;
    c->skip_item = skip_item;
    c->msg.append(msg.data(), count_at);
    std::memcpy(c->msg.data() + id_at, &new_id, sizeof new_id);
    c->msg.put(c->count);
    c->msg.append(msg.data() + begin, end - begin);
    c->msg.finish_message(0);
    return c;
  }
};

struct PoolConfig {
  std::size_t processes = 0;
  std::function<void()> initializer;
  std::size_t max_tasks_per_child = 0;
  std::chrono::milliseconds task_timeout{0};
};

class PoolCore final : public ResultOwner, public std::enable_shared_from_this<PoolCore> {
 public:
  // Chunks in flight per worker: at least 2 (one running, one waiting, so a worker never idles
  // for a round trip); more while chunks are quick, up to about max_queued_ns of work queued
  // per worker, so that tiny tasks travel many to a send and a result message. Long tasks keep
  // the window at 2, so no worker hoards work another one could start.
  static constexpr std::size_t min_depth = 2;
  static constexpr std::size_t max_depth = 64;
  static constexpr std::int64_t max_queued_ns = 1'000'000;
  static constexpr int max_startup_failures = 5;

  explicit PoolCore(PoolConfig cfg) : cfg_(std::move(cfg)) {
    if (cfg_.processes == 0) cfg_.processes = cpu_count();
    if (cfg_.task_timeout.count() < 0) throw std::invalid_argument("procpool: negative task_timeout");
    n_ = cfg_.processes;
  }

  ~PoolCore() override {
    if (io_thread_.joinable()) {
      // Only reached if the Pool was never joined (a constructor that failed half way).
      hard_stop();
    }
    for (int fd : {control_.get(), wake_.get(), epoll_.get(), fs_pidfd_.get()}) {
      InternalFds::instance().remove(fd);
    }
    if (slots_) ::munmap(slots_, slots_bytes_);
  }

  /// Forks the fork server, asks it for the workers, and starts the I/O thread.
  void start() {
    slots_bytes_ = sizeof(WorkerSlot) * n_;
    void* mem = ::mmap(nullptr, slots_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                       -1, 0);
    if (mem == MAP_FAILED) throw_errno("mmap");
    slots_ = static_cast<WorkerSlot*>(mem);
    for (std::size_t i = 0; i < n_; ++i) ::new (&slots_[i]) WorkerSlot();
    workers_.resize(n_);

    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
      throw_errno("socketpair");
    }
    control_.reset(sv[0]);
    unique_fd server_end(sv[1]);
    InternalFds::instance().add(control_.get());
    unique_fd self_pidfd(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
    if (!self_pidfd) throw_errno("pidfd_open");

    fs_cfg_.control = server_end.get();
    fs_cfg_.parent_pidfd = self_pidfd.get();
    fs_cfg_.slots = slots_;
    fs_cfg_.nslots = n_;
    fs_cfg_.initializer = &cfg_.initializer;
    fs_cfg_.max_tasks = cfg_.max_tasks_per_child;
    fs_cfg_.timed = cfg_.task_timeout.count() > 0;
    fs_cfg_.pids.assign(n_, 0);
    fs_cfg_.pidfds.assign(n_, -1);
    fs_cfg_.pollfds.resize(n_ + 2);

    ChildRegistry::instance();  // its fork handlers must exist before our fork
    flush_std_streams();        // so the server and workers inherit no buffered output
    pid_t pid = ::fork();
    if (pid < 0) throw_errno("fork");
    if (pid == 0) {
      ::close(control_.release());
      fork_server_main(fs_cfg_);
    }
    fs_pid_ = pid;
    server_end.reset();
    self_pidfd.reset();
    fs_pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!fs_pidfd_) throw_errno("pidfd_open");

    wake_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake_) throw_errno("eventfd");
    epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_) throw_errno("epoll_create1");
    for (int fd : {wake_.get(), epoll_.get(), fs_pidfd_.get()}) InternalFds::instance().add(fd);
    watch(wake_.get(), tag_wake, EPOLLIN);
    watch(control_.get(), tag_control, EPOLLIN);
    watch(fs_pidfd_.get(), tag_fs_exit, EPOLLIN);

    for (std::size_t i = 0; i < n_; ++i) request_spawn(i);
    io_thread_ = std::thread([self = this] { self->run(); });
    io_thread_id_.store(io_thread_.get_id());
  }

  std::size_t size() const noexcept { return n_; }
  std::uint64_t new_chunk_id() noexcept { return next_chunk_id_.fetch_add(1) + 1; }
  std::uint64_t new_job_id() noexcept { return next_job_id_.fetch_add(1) + 1; }

  /// Registers a job (so cancel() can find it) and queues its chunks.
  /// @throws PoolNotRunningError after close()/terminate(), or for a stream fed after join().
  void submit(const std::shared_ptr<JobBase>& job, std::vector<std::unique_ptr<Chunk>>& chunks,
              bool feeding_stream) {
    std::unique_lock lock(mu_);
    check_accepting(feeding_stream);
    if (jobs_.try_emplace(job->id, job).second && (job->id & 1023) == 0) {
      std::erase_if(jobs_, [](const auto& j) { return j.second.expired(); });
    }
    for (auto& c : chunks) pending_.push_back(std::move(c));
    chunks.clear();
    dispatch();
  }

  /// Whether submit() would accept a new (non-stream) job now.
  void check_running() {
    std::lock_guard lock(mu_);
    check_accepting(false);
  }

  /// A stream opened (+1) or will feed no more (-1): join() waits for none to be feeding.
  void stream_feeding(int delta) {
    std::lock_guard lock(mu_);
    open_streams_ += delta;
    if (open_streams_ == 0) wake();
  }

  void close() {
    std::lock_guard lock(mu_);
    if (state_ == State::running) state_ = State::closed;
    wake();
  }

  /// Fails everything pending, kills every worker, waits until they and the fork server are
  /// reaped, and stops the I/O thread. Idempotent.
  void terminate() {
    Completions out;
    {
      std::lock_guard lock(mu_);
      if (state_ != State::terminated) {
        state_ = State::terminated;
        fail_everything(std::make_exception_ptr(
                            PoolTerminatedError("procpool: the pool was terminated")),
                        out);
        FsRecord rec{FsOp::kill_all, 0, 0, 0};
        (void)::send(control_.get(), &rec, sizeof rec, MSG_NOSIGNAL);
        wake();
      }
    }
    run_completions(out);
    join_thread();
  }

  /// Waits until every submitted task finished and every worker exited.
  /// @throws std::logic_error unless close() or terminate() was called.
  void join() {
    {
      std::lock_guard lock(mu_);
      if (state_ == State::running) {
        throw std::logic_error("procpool: join() before close() or terminate()");
      }
      stop_feeding_ = true;
      wake();
    }
    join_thread();
  }

  // ResultOwner
  bool post_callback(std::function<void()> fn) override {
    std::lock_guard lock(mu_);
    if (io_done_) return false;
    posted_.push_back(std::move(fn));
    wake();
    return true;
  }

  bool on_callback_thread() const override {
    return std::this_thread::get_id() == io_thread_id_.load();
  }

  bool cancel(std::uint64_t id) override {
    Completions out;
    bool done;
    {
      std::lock_guard lock(mu_);
      auto it = jobs_.find(id);
      if (it == jobs_.end()) return false;
      std::shared_ptr<JobBase> job = it->second.lock();
      if (!job || job->cancelled) return false;
      done = job->cancel_job(out);
      if (done) {
        job->cancelled = true;
        jobs_.erase(it);
        withdraw(*job);
      }
    }
    run_completions(out);
    return done;
  }

 private:
  enum class State { running, closed, terminated, broken };
  enum class WorkerState { empty, spawning, ready, dead };
  enum class KillReason { none, cancel, timeout };

  struct Outgoing {
    const std::byte* data;
    std::size_t size;
    std::size_t sent;
    int fd = -1;           // a shared block's memfd, attached to the first byte
    bool fd_sent = false;  // it left with an earlier sendmsg
  };

  struct Worker {
    WorkerState state = WorkerState::empty;
    std::uint32_t gen = 0;
    pid_t pid = -1;
    unique_fd fd, pidfd;
    std::deque<std::unique_ptr<Chunk>> in_flight;
    std::deque<Outgoing> out;
    std::deque<unique_fd> fds;  // memfds received, for the `shared` stubs still unread
    std::unique_ptr<ReceivedBlocks> received;  // its result blocks, kept mapped
    bool want_write = false;
    bool eof = false;
    std::size_t tasks_sent = 0;
    ByteBuffer in;
    std::string init_error;      // what the initializer threw, if it did
    bool start_counted = false;  // its successful start-up has ended a run of failures
    KillReason kill = KillReason::none;
    std::uint64_t kill_chunk = 0;
    std::uint32_t kill_item = 0;
    std::int64_t front_since_ns = 0;  // when its first in-flight chunk became first
  };

  static constexpr std::uint64_t tag_wake = 1, tag_control = 2, tag_fs_exit = 3;
  static constexpr std::uint64_t tag_worker = 1ull << 32;

  static std::uint64_t worker_tag(std::size_t slot, std::uint32_t gen) {
    return tag_worker | (static_cast<std::uint64_t>(gen) << 40) | slot;
  }

  void watch(int fd, std::uint64_t tag, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = tag;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) throw_errno("epoll_ctl");
  }

  void wake() noexcept {
    std::uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof one);
  }

  void check_accepting(bool feeding_stream) {
    if (state_ == State::running) return;
    if (feeding_stream && state_ == State::closed && !stop_feeding_) return;
    if (state_ == State::broken) throw PoolNotRunningError("procpool: the pool is broken: " + broken_why_);
    throw PoolNotRunningError(state_ == State::closed ? "procpool: the pool is closed"
                                                      : "procpool: the pool was terminated");
  }

  void request_spawn(std::size_t slot) {
    slots_[slot].reset();
    Worker& w = workers_[slot];
    w = Worker{};
    w.gen = ++gen_;
    w.state = WorkerState::spawning;
    FsRecord rec{FsOp::spawn, static_cast<std::uint32_t>(slot), 0, 0};
    if (::send(control_.get(), &rec, sizeof rec, MSG_NOSIGNAL) != sizeof rec) {
      w.state = WorkerState::empty;  // the server is gone; its exit is handled by run()
    }
  }

  // ------------------------------------------------------------------------------------------
  // Dispatch: give queued chunks to workers with room, least loaded first.

  void dispatch() {
    // While a worker is starting, no worker gets a second chunk: it would wait behind the first
    // one (maybe a long task) while the new worker, ready a moment later, sits idle.
    // A worker being killed (cancel, timeout) or retiring (max_tasks_per_child) is about to be
    // replaced, so it counts as starting, and gets nothing more.
    auto leaving = [&](const Worker& w) {
      return w.kill != KillReason::none ||
             (cfg_.max_tasks_per_child && w.tasks_sent >= cfg_.max_tasks_per_child);
    };
    bool starting = std::any_of(workers_.begin(), workers_.end(), [&](const Worker& w) {
      return w.state == WorkerState::spawning || (w.state == WorkerState::ready && leaving(w));
    });
    std::size_t room = starting ? 1 : window();
    while (!pending_.empty()) {
      // Least loaded first; ties go round-robin, so sequential tasks visit every worker.
      Worker* best = nullptr;
      rotate_ = (rotate_ + 1) % workers_.size();
      for (std::size_t k = 0; k < workers_.size(); ++k) {
        Worker& w = workers_[(rotate_ + k) % workers_.size()];
        if (w.state != WorkerState::ready) continue;
        if (w.in_flight.size() >= room || leaving(w)) continue;
        if (!best || w.in_flight.size() < best->in_flight.size()) best = &w;
      }
      if (!best) break;
      std::unique_ptr<Chunk> c = std::move(pending_.front());
      pending_.pop_front();
      if (c->job->cancelled) continue;
      ++best->tasks_sent;
      Chunk* raw = c.get();
      if (best->in_flight.empty()) best->front_since_ns = monotonic_ns();
      best->in_flight.push_back(std::move(c));
      if (raw->msg.shared()) {
        raw->stub = SharedStub(raw->msg.size());
        best->out.push_back({raw->stub.bytes, sizeof raw->stub.bytes, 0, raw->msg.shared_fd()});
      } else {
        send_to(*best, raw->msg.data(), raw->msg.size());
      }
    }
    for (auto& w : workers_) {
      // A worker whose socket is full gets the rest when EPOLLOUT says there is room.
      if (!w.out.empty() && !w.want_write) flush_out(w);
    }
  }

  std::size_t window() const noexcept {
    if (chunk_ns_ < 0) return min_depth;
    std::int64_t per = std::max<std::int64_t>(chunk_ns_, 1);
    return static_cast<std::size_t>(std::clamp<std::int64_t>(
        max_queued_ns / per, static_cast<std::int64_t>(min_depth),
        static_cast<std::int64_t>(max_depth)));
  }

  // Queues a chunk for w; dispatch() sends what it queued when it is done choosing.
  void send_to(Worker& w, const std::byte* data, std::size_t size) {
    w.out.push_back({data, size, 0});
  }

  // Writes what is queued for w without blocking; the rest waits for EPOLLOUT.
  // Chunks queued for one worker leave together, in one sendmsg.
  void flush_out(Worker& w) {
    while (!w.out.empty()) {
      iovec iov[64];
      int fds[max_fds_per_send];
      std::size_t nfds = 0;
      std::size_t count = 0;
      for (; count < std::min<std::size_t>(w.out.size(), 64); ++count) {
        Outgoing& o = w.out[count];
        if (o.fd >= 0 && !o.fd_sent) {
          if (nfds == max_fds_per_send) break;  // the rest go with the next sendmsg
          fds[nfds++] = o.fd;
        }
        iov[count] = iovec{const_cast<std::byte*>(o.data + o.sent), o.size - o.sent};
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = count;
      alignas(cmsghdr) char control[CMSG_SPACE(max_fds_per_send * sizeof(int))];
      if (nfds) attach_fds(msg, control, fds, nfds);
      ssize_t n = retry_eintr(
          [&] { return ::sendmsg(w.fd.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT); });
      if (n < 0) {
        if (errno == EAGAIN) break;
        w.out.clear();  // the worker is gone; its death re-queues what it held
        break;
      }
      // The descriptors went with the first byte sent, however few bytes that was.
      for (std::size_t i = 0; i < count; ++i) w.out[i].fd_sent = true;
      auto sent = static_cast<std::size_t>(n);
      while (sent > 0) {
        Outgoing& o = w.out.front();
        std::size_t take = std::min(sent, o.size - o.sent);
        o.sent += take;
        sent -= take;
        if (o.sent == o.size) w.out.pop_front();
      }
    }
    bool want = !w.out.empty();
    if (want != w.want_write && w.fd) {
      epoll_event ev{};
      ev.events = EPOLLIN | (want ? EPOLLOUT : 0u);
      ev.data.u64 = worker_tag(static_cast<std::size_t>(&w - workers_.data()), w.gen);
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, w.fd.get(), &ev);
      w.want_write = want;
    }
  }

  // ------------------------------------------------------------------------------------------
  // The I/O thread.

  void run() {
    epoll_event events[64];
    for (;;) {
      int timeout = poll_timeout();
      int n = ::epoll_wait(epoll_.get(), events, 64, timeout);
      if (n < 0 && errno != EINTR) {
        report(std::string("epoll_wait failed: ") + std::strerror(errno));
        n = 0;
      }
      Completions out;
      std::vector<std::function<void()>> posted;
      bool finished = false;
      {
        std::lock_guard lock(mu_);
        for (int i = 0; i < n; ++i) handle_event(events[i], out);
        check_timeouts();
        dispatch();
        maybe_shut_down();
        posted.swap(posted_);
        if (fs_reaped_) {
          io_done_ = true;
          finished = true;
        }
      }
      run_completions(out);
      for (auto& fn : posted) ResultStateBase::invoke_callback(fn);
      if (finished) {
        // Callbacks posted while we were finishing still run, here.
        std::vector<std::function<void()>> rest;
        {
          std::lock_guard lock(mu_);
          rest.swap(posted_);
        }
        for (auto& fn : rest) ResultStateBase::invoke_callback(fn);
        return;
      }
    }
  }

  int poll_timeout() {
    std::lock_guard lock(mu_);
    if (cfg_.task_timeout.count() <= 0) return -1;
    for (auto& w : workers_) {
      if (w.state == WorkerState::ready && !w.in_flight.empty()) {
        // Checked often enough that a timeout is noticed within a tenth of it (or 10 ms).
        auto tenth = cfg_.task_timeout.count() / 10;
        return static_cast<int>(std::clamp<long long>(tenth, 1, 10));
      }
    }
    return -1;
  }

  void handle_event(const epoll_event& ev, Completions& out) {
    std::uint64_t tag = ev.data.u64;
    if (tag == tag_wake) {
      std::uint64_t v;
      (void)!::read(wake_.get(), &v, sizeof v);
    } else if (tag == tag_control) {
      read_control(out);
    } else if (tag == tag_fs_exit) {
      on_fork_server_exit(out);
    } else if (tag & tag_worker) {
      std::size_t slot = tag & 0xffffffffu;
      auto gen = static_cast<std::uint32_t>((tag >> 40) & 0xffffffu);
      if (slot >= workers_.size()) return;
      Worker& w = workers_[slot];
      if (w.gen != gen || w.state != WorkerState::ready) return;
      if (ev.events & EPOLLOUT) flush_out(w);
      if (ev.events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) read_worker(slot, out);
    }
  }

  void read_control(Completions& out) {
    for (;;) {
      FsRecord rec;
      alignas(cmsghdr) char cbuf[CMSG_SPACE(2 * sizeof(int))];
      iovec iov{&rec, sizeof rec};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = cbuf;
      msg.msg_controllen = sizeof cbuf;
      ssize_t got = retry_eintr(
          [&] { return ::recvmsg(control_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC); });
      if (got <= 0) return;  // EAGAIN, or the server is gone (its pidfd tells us)
      int fds[2] = {-1, -1};
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
          std::size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
          std::memcpy(fds, CMSG_DATA(c), std::min<std::size_t>(nfds, 2) * sizeof(int));
        }
      }
      unique_fd channel(fds[0]), pidfd(fds[1]);
      if (static_cast<std::size_t>(got) != sizeof rec || rec.slot >= workers_.size()) continue;
      Worker& w = workers_[rec.slot];
      switch (rec.op) {
        case FsOp::spawned: {
          if (w.state != WorkerState::spawning || !channel) break;
          w.pid = rec.pid;
          w.fd = std::move(channel);
          w.pidfd = std::move(pidfd);
          InternalFds::instance().add(w.fd.get());
          InternalFds::instance().add(w.pidfd.get());
          w.state = WorkerState::ready;
          watch(w.fd.get(), worker_tag(rec.slot, w.gen), EPOLLIN | EPOLLRDHUP);
          if (state_ == State::terminated) {
            kill_worker(w, KillReason::none, 0, 0);
          } else if (shutdown_sent_) {
            // It was still starting when the others were told to leave: tell it too.
            ::shutdown(w.fd.get(), SHUT_WR);
          }
          break;
        }
        case FsOp::spawn_failed:
          w.state = WorkerState::empty;
          startup_failed(std::string("fork failed: ") + std::strerror(rec.value), out);
          if (state_ == State::running || state_ == State::closed) request_spawn(rec.slot);
          break;
        case FsOp::exited:
          if (w.pid == rec.pid) on_worker_exit(rec.slot, rec.value, out);
          break;
        default: break;
      }
    }
  }

  void read_worker(std::size_t slot, Completions& out) {
    Worker& w = workers_[slot];
    for (;;) {
      std::size_t before = w.in.size();
      std::byte* p = w.in.grow(64 * 1024);
      ssize_t n = recv_with_fds(w.fd.get(), p, 64 * 1024, MSG_DONTWAIT, w.fds);
      if (n > 0) {
        w.in.truncate(before + static_cast<std::size_t>(n));
        if (static_cast<std::size_t>(n) == 64 * 1024) continue;
        break;
      }
      w.in.truncate(before);
      if (n == 0 || errno != EAGAIN) {
        // End of stream: the worker is dead or dying. How it ended comes from the fork
        // server; until then stop watching this channel.
        w.eof = true;
        ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, w.fd.get(), nullptr);
      }
      break;
    }
    parse_worker_messages(w, out);
  }

  void parse_worker_messages(Worker& w, Completions& out) {
    if (state_ == State::terminated || state_ == State::broken) {
      // Everything it held has been failed and it is being killed: results it sent in the
      // meantime are for chunks that are gone, and are no protocol error.
      w.in.clear();
      w.fds.clear();
      return;
    }
    std::size_t pos = 0;
    try {
      pos = parse_messages(w, w.in.data(), w.in.size(), true, out);
    } catch (const std::exception& e) {
      // A worker that speaks nonsense is killed; its death re-queues what it held.
      report(std::string("a worker sent a corrupt message (") + e.what() + "); killing it");
      kill_worker(w, KillReason::none, 0, 0);
      pos = w.in.size();
    }
    w.in.consume(pos);
  }

  // Handles the whole messages in [data, data + size); returns how many bytes they took. A
  // `shared` stub (only on the channel itself, never inside a block) stands for the messages
  // in the block whose memfd arrived with it.
  std::size_t parse_messages(Worker& w, const std::byte* data, std::size_t size,
                             bool on_channel, Completions& out) {
    std::size_t pos = 0;
    while (size - pos >= header_size) {
      std::uint64_t len;
      std::memcpy(&len, data + pos, sizeof len);
      if (size - pos - header_size < len) break;
      auto type = static_cast<Msg>(data[pos + sizeof len]);
      ReadArchive body(data + pos + header_size, data + pos + header_size + len);
      pos += header_size + static_cast<std::size_t>(len);
      if (type == Msg::results) {
        on_results(w, body, out);
      } else if (type == Msg::init_failed) {
        std::uint8_t code;
        std::string type_name, message;
        body(code, type_name, message);
        w.init_error = "the initializer threw " + type_name + ": " + message;
      } else if (type == Msg::shared && on_channel) {
        std::uint64_t bytes;
        body(bytes);
        if (!w.received) w.received = std::make_unique<ReceivedBlocks>();
        ReceivedBlocks::Lease block = w.received->open_next(w.fds, bytes);
        if (parse_messages(w, block.data(), block.size(), false, out) != block.size()) {
          throw ProtocolError("procpool: a shared block ends inside a message");
        }
      } else {
        throw ProtocolError("procpool: unknown message from a worker");
      }
    }
    return pos;
  }

  void on_results(Worker& w, ReadArchive& body, Completions& out) {
    std::uint64_t chunk_id;
    std::uint32_t first, count;
    body(chunk_id, first, count);
    if (w.in_flight.empty() || w.in_flight.front()->id != chunk_id) {
      throw ProtocolError("procpool: results for a chunk the worker does not hold");
    }
    Chunk& c = *w.in_flight.front();
    if (first != c.received || count > c.count - c.received) {
      throw ProtocolError("procpool: results out of order");
    }
    for (std::uint32_t i = 0; i < count; ++i) {
      std::uint8_t status;
      body(status);
      std::uint32_t index = c.base + first + i;
      switch (static_cast<ItemStatus>(status)) {
        case ItemStatus::ok:
          c.job->deliver(index, body, out);  // a cancelled job ignores it
          break;
        case ItemStatus::error:
          c.job->fail(index, decode_error(body), out);
          break;
        case ItemStatus::cancelled:
          if (!c.job->cancelled) throw ProtocolError("procpool: a running chunk was skipped");
          break;
        default: throw ProtocolError("procpool: bad item status");
      }
      ++c.received;
    }
    if (c.received == c.count) {
      clear_cancel_flag(static_cast<std::size_t>(&w - workers_.data()), c.id);
      w.in_flight.pop_front();
      // How long a chunk takes, roughly: the time it spent at the front of this worker's
      // queue. Results that arrive together make some samples long and the rest zero; the
      // average is right.
      std::int64_t now = monotonic_ns();
      std::int64_t took = now - w.front_since_ns;
      w.front_since_ns = now;
      chunk_ns_ = chunk_ns_ < 0 ? took : chunk_ns_ + (took - chunk_ns_) / 16;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Deaths, timeouts, cancellation.

  void kill_worker(Worker& w, KillReason why, std::uint64_t chunk, std::uint32_t item) {
    if (w.kill == KillReason::none) {
      w.kill = why;
      w.kill_chunk = chunk;
      w.kill_item = item;
    }
    if (w.pidfd) (void)pidfd_send_signal(w.pidfd.get(), SIGKILL);
  }

  void check_timeouts() {
    if (cfg_.task_timeout.count() <= 0) return;
    std::int64_t now = monotonic_ns();
    std::int64_t limit =
        std::chrono::duration_cast<std::chrono::nanoseconds>(cfg_.task_timeout).count();
    for (std::size_t i = 0; i < workers_.size(); ++i) {
      Worker& w = workers_[i];
      if (w.state != WorkerState::ready || w.in_flight.empty() || w.kill != KillReason::none) {
        continue;
      }
      std::uint64_t chunk = slots_[i].chunk_id.load(std::memory_order_acquire);
      if (chunk == 0) continue;
      std::uint32_t item = slots_[i].item.load(std::memory_order_acquire);
      std::int64_t started = slots_[i].item_started_ns.load(std::memory_order_relaxed);
      if (started != 0 && now - started > limit) kill_worker(w, KillReason::timeout, chunk, item);
    }
  }

  void on_worker_exit(std::size_t slot, int status, Completions& out) {
    Worker& w = workers_[slot];
    if (w.fd && !w.eof) {
      // Whatever it wrote before dying is still in the socket: take it first.
      read_worker(slot, out);
    }
    WorkerSlot& s = slots_[slot];
    bool initialized = s.initialized.load() != 0;
    std::uint64_t running_chunk = s.chunk_id.load();
    std::uint32_t running_item = s.item.load();
    std::string how = "worker " + std::to_string(w.pid) + " died: " + describe_status(status);

    // The running chunk need not be the first one held: a worker may keep the results of
    // finished chunks back for a moment while it runs the next (ResultSink).
    std::deque<std::unique_ptr<Chunk>> requeue;
    for (auto& cp : w.in_flight) {
      Chunk& c = *cp;
      if (c.job->cancelled) continue;
      std::uint32_t from = c.received;
      if (running_chunk == c.id && running_item >= c.received && running_item < c.count) {
        std::exception_ptr e;
        if (w.kill == KillReason::timeout && w.kill_chunk == c.id && w.kill_item == running_item) {
          e = std::make_exception_ptr(TaskTimeoutError(
              "procpool: the task ran longer than task_timeout (" +
              std::to_string(cfg_.task_timeout.count()) + " ms); worker " +
              std::to_string(w.pid) + " was killed"));
        } else {
          std::optional<int> sig, code;
          if (WIFSIGNALED(status)) sig = WTERMSIG(status);
          else code = WEXITSTATUS(status);
          e = std::make_exception_ptr(WorkerLostError(w.pid, sig, code, "procpool: " + how));
        }
        c.job->fail(c.base + running_item, std::move(e), out);
        // Items that ran before the fatal one but whose results had not been sent yet run
        // again elsewhere; items after it have not run.
        if (running_item > from) requeue.push_back(c.slice(from, running_item, new_chunk_id()));
        from = running_item + 1;
      }
      if (from < c.count) {
        requeue.push_back(from == 0 ? std::move(cp) : c.slice(from, c.count, new_chunk_id()));
      }
    }
    for (auto it = requeue.rbegin(); it != requeue.rend(); ++it) {
      pending_.push_front(std::move(*it));
    }
    if (w.fd) InternalFds::instance().remove(w.fd.get());
    if (w.pidfd) InternalFds::instance().remove(w.pidfd.get());
    bool startup_failure = !initialized;
    bool start_counted = w.start_counted;
    std::string cause = !w.init_error.empty() ? w.init_error : how;
    w = Worker{};
    w.state = WorkerState::empty;
    if (startup_failure) {
      startup_failed(cause, out);
    } else if (!start_counted) {
      consecutive_startup_failures_ = 0;
    }
    if (state_ == State::running || state_ == State::closed) {
      if (state_ == State::running || !pending_.empty() || busy()) request_spawn(slot);
    }
  }

  // Only failures with no successful start-up between them count as "in a row". Each start-up
  // that succeeded counts once, when it is first noticed: here, or when its worker exits. Not a
  // completed chunk: a healthy worker's results must not hide a slot that never starts.
  void startup_failed(const std::string& cause, Completions& out) {
    for (std::size_t i = 0; i < workers_.size(); ++i) {
      Worker& w = workers_[i];
      if (w.state == WorkerState::ready && !w.start_counted && slots_[i].initialized.load() != 0) {
        w.start_counted = true;
        consecutive_startup_failures_ = 0;
      }
    }
    if (++consecutive_startup_failures_ < max_startup_failures) return;
    if (state_ == State::broken || state_ == State::terminated) return;
    broken_why_ = "worker start-up failed " + std::to_string(consecutive_startup_failures_) +
                  " times in a row; the last time: " + cause;
    state_ = State::broken;
    fail_everything(std::make_exception_ptr(WorkerStartError("procpool: " + broken_why_)), out);
    FsRecord rec{FsOp::kill_all, 0, 0, 0};
    (void)::send(control_.get(), &rec, sizeof rec, MSG_NOSIGNAL);
  }

  // Fails every item that has not ended, of every job, pending or in flight.
  void fail_everything(std::exception_ptr e, Completions& out) {
    auto fail_chunk = [&](Chunk& c) {
      if (c.job->cancelled) return;
      for (std::uint32_t i = c.received; i < c.count; ++i) c.job->fail(c.base + i, e, out);
      c.received = c.count;
    };
    for (auto& c : pending_) fail_chunk(*c);
    pending_.clear();
    for (auto& w : workers_) {
      for (auto& c : w.in_flight) fail_chunk(*c);
      w.in_flight.clear();
      w.out.clear();
    }
  }

  // Takes a cancelled job's chunks out of the queue, and stops those already sent: a chunk
  // that has not started is skipped by its worker, a running one has its worker killed.
  void withdraw(const JobBase& job) {
    std::erase_if(pending_, [&](const auto& c) { return c->job.get() == &job; });
    for (std::size_t i = 0; i < workers_.size(); ++i) {
      Worker& w = workers_[i];
      for (auto& c : w.in_flight) {
        if (c->job.get() != &job) continue;
        if (!set_cancel_flag(i, c->id) ||
            slots_[i].chunk_id.load(std::memory_order_seq_cst) == c->id) {
          kill_worker(w, KillReason::cancel, c->id, 0);
        }
      }
    }
  }

  bool set_cancel_flag(std::size_t slot, std::uint64_t id) {
    for (auto& f : slots_[slot].cancelled) {
      std::uint64_t zero = 0;
      if (f.compare_exchange_strong(zero, id, std::memory_order_seq_cst)) return true;
    }
    return false;
  }
  void clear_cancel_flag(std::size_t slot, std::uint64_t id) {
    for (auto& f : slots_[slot].cancelled) {
      std::uint64_t expected = id;
      f.compare_exchange_strong(expected, 0);
    }
  }

  bool busy() const {
    for (auto& w : workers_) {
      if (!w.in_flight.empty()) return true;
    }
    return false;
  }

  // Once closed and idle (and no stream may still feed work), tell the workers to leave and the
  // server to exit when they have.
  void maybe_shut_down() {
    if (shutdown_sent_) return;
    if (state_ == State::running) return;
    if (state_ == State::closed) {
      if (!pending_.empty() || busy()) return;
      if (open_streams_ > 0 && !stop_feeding_) return;
    }
    shutdown_sent_ = true;
    for (auto& w : workers_) {
      if (w.fd) ::shutdown(w.fd.get(), SHUT_WR);  // the worker reads end of stream and leaves
    }
    FsRecord rec{state_ == State::closed ? FsOp::shutdown : FsOp::kill_all, 0, 0, 0};
    (void)::send(control_.get(), &rec, sizeof rec, MSG_NOSIGNAL);
  }

  void on_fork_server_exit(Completions& out) {
    int status = 0;
    pid_t r = retry_eintr([&] { return ::waitpid(fs_pid_, &status, WNOHANG); });
    if (r == 0) return;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fs_pidfd_.get(), nullptr);
    fs_reaped_ = true;
    if (state_ == State::running || state_ == State::closed) {
      // Nobody asked it to go: the server was killed. Its workers died with it.
      broken_why_ = "the fork server " + std::to_string(fs_pid_) + " died: " +
                    (r == fs_pid_ ? describe_status(status) : std::string("reaped elsewhere"));
      state_ = State::broken;
      // How it ended, as for a worker (API: a WorkerLostError has a signal or an exit status),
      // unless another waitpid() in the program took its status first.
      std::optional<int> sig, code;
      if (r == fs_pid_ && WIFSIGNALED(status)) sig = WTERMSIG(status);
      if (r == fs_pid_ && WIFEXITED(status)) code = WEXITSTATUS(status);
      fail_everything(
          std::make_exception_ptr(WorkerLostError(fs_pid_, sig, code, "procpool: " + broken_why_)),
          out);
    }
    for (auto& w : workers_) {
      if (w.fd) InternalFds::instance().remove(w.fd.get());
      if (w.pidfd) InternalFds::instance().remove(w.pidfd.get());
      w = Worker{};
    }
  }

  void run_completions(Completions& out) {
    for (auto& fn : out) fn();
    out.clear();
  }

  void join_thread() {
    if (io_thread_.joinable()) {
      if (on_callback_thread()) {
        throw std::logic_error("procpool: join()/terminate() from a callback of the same pool");
      }
      io_thread_.join();
    }
  }

  // Last resort in the destructor: kill everything without waiting for work.
  void hard_stop() noexcept {
    try {
      terminate();
    } catch (...) {
    }
  }

  PoolConfig cfg_;
  std::size_t n_ = 0;
  WorkerSlot* slots_ = nullptr;
  std::size_t slots_bytes_ = 0;
  ForkServerConfig fs_cfg_;
  pid_t fs_pid_ = -1;
  unique_fd control_, fs_pidfd_, wake_, epoll_;
  std::thread io_thread_;
  std::atomic<std::thread::id> io_thread_id_{};

  std::mutex mu_;
  State state_ = State::running;
  std::string broken_why_;
  std::vector<Worker> workers_;
  std::deque<std::unique_ptr<Chunk>> pending_;
  std::unordered_map<std::uint64_t, std::weak_ptr<JobBase>> jobs_;
  std::vector<std::function<void()>> posted_;
  std::atomic<std::uint64_t> next_job_id_{0};
  std::atomic<std::uint64_t> next_chunk_id_{0};
  std::uint32_t gen_ = 0;
  std::size_t rotate_ = 0;
  std::int64_t chunk_ns_ = -1;  // moving average of how long a chunk takes; -1: unknown yet
  int consecutive_startup_failures_ = 0;
  int open_streams_ = 0;
  bool stop_feeding_ = false;
  bool shutdown_sent_ = false;
  bool fs_reaped_ = false;
  bool io_done_ = false;
};

}  // namespace detail
}  // namespace procpool
