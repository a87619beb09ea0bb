#pragma once
/// @file process.hpp
/// Process: run a function in a fork()ed child process, as Python's multiprocessing.Process.
/// Also cpu_count(), active_children() and current_process().
///
/// ```cpp
/// procpool::Process p([](std::string who) { std::cout << "hello " << who << "\n"; }, "bob");
/// p.start();
/// p.join();   // p.exitcode() == 0
/// ```
///
/// The child is a fork of the caller: it sees the caller's memory as it was at start(), so
/// the target and its arguments travel by fork, not by serialization. The child runs the
/// target, flushes its own standard output, and leaves with _exit(): it never runs the
/// parent's atexit handlers or static destructors, and text the parent had buffered before
/// start() is flushed by start() in the parent, so it appears once.
///
/// Process is movable (so it can live in a std::vector) but not copyable. Its member functions
/// may be called from several threads: is_alive(), exitcode(), join() and the signals are
/// serialized internally.
///
/// One thing is out of reach: if the target calls exit(), glibc runs the destructors of the
/// forking thread's thread_local objects before any exit handler, so those run in the child.

#include "errors.hpp"  // first: its C++20 check is the first thing a C++17 build reports

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/exceptions.hpp"
#include "detail/internal_fds.hpp"
#include "detail/posix.hpp"

namespace procpool {

class Process;

namespace detail {

/// What one started child is, shared by the Process object and the registry behind
/// active_children(). Every waitpid() for the child happens under `mutex`, so concurrent
/// is_alive()/join() calls never reap twice.
struct ChildState {
  std::mutex mutex;
  pid_t pid = -1;
  pid_t owner = -1;  // the process that started the child: only it may wait for or signal it
  unique_fd pidfd;   // readable once the child has exited; lets join(timeout) wait with poll
  std::optional<int> status;  // the wait status, once reaped

  /// Reaps the child if it has exited. Returns true once it has been reaped.
  bool try_reap() {
    std::lock_guard lock(mutex);
    if (status) return true;
    int st = 0;
    pid_t r = retry_eintr([&] { return ::waitpid(pid, &st, WNOHANG); });
    if (r == pid) {
      status = st;
      pidfd.reset();
      return true;
    }
    if (r < 0 && errno == ECHILD) {
      // Someone else reaped it (SIGCHLD set to SIG_IGN, or a waitpid(-1) of the program's):
      // it has exited, with a status we cannot know.
      status = 0;
      pidfd.reset();
      return true;
    }
    if (r < 0) throw_errno("waitpid");
    return false;
  }
};

/// The registry of started, unjoined children. Its lock is taken around every fork() in the
/// program (pthread_atfork), so no child is ever born with it held by a thread it lacks.
class ChildRegistry {
 public:
  static ChildRegistry& instance() {
    static ChildRegistry* registry = [] {
      auto* r = new ChildRegistry;  // never destroyed: children may outlive static teardown
      ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                       [] { instance().mutex_.unlock(); });
      return r;
    }();
    return *registry;
  }
  void add(std::shared_ptr<ChildState> s) {
    std::lock_guard lock(mutex_);
    children_.push_back(std::move(s));
  }
  void remove(const ChildState* s) {
    std::lock_guard lock(mutex_);
    std::erase_if(children_, [&](const auto& c) { return c.get() == s; });
  }
  std::vector<std::shared_ptr<ChildState>> snapshot() {
    std::lock_guard lock(mutex_);
    return children_;
  }

 private:
  std::mutex mutex_;
  std::vector<std::shared_ptr<ChildState>> children_;
};

/// Flushes the C and C++ standard streams. Called by the parent before every fork, so that
/// nothing buffered is inherited and printed twice, and by the child before it leaves.
inline void flush_std_streams() noexcept {
  try {
    std::cout.flush();
    std::cerr.flush();
    std::clog.flush();
  } catch (...) {
  }
  std::fflush(nullptr);
}

/// In a child, turns exit(n) from user code into: flush the child's own output, then _exit(n).
/// Registered after fork, it runs before every handler the parent registered, so the parent's
/// atexit handlers and static destructors never run in the child.
inline void exit_child_now(int status, void*) noexcept {
  flush_std_streams();
  ::_exit(status);
}

inline std::atomic<unsigned>& process_counter() noexcept {
  static std::atomic<unsigned> counter{0};
  return counter;
}

/// The Process object whose child this process is (nullptr in the main process).
inline Process*& current_process_ptr() noexcept {
  static Process* current = nullptr;
  return current;
}

/// Makes current_process() in this process (a pool worker) report `name` and its own pid.
void become_current_process(std::string name);

inline int pidfd_open(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

}  // namespace detail

/// A child process running a function, or a subclass's run() (Python's multiprocessing.Process:
/// `Process(target=f, args=("bob",))` is `Process(f, std::string("bob"))`).
class Process {
 public:
  /// A process whose run() a subclass overrides.
  Process() : name_("Process-" + std::to_string(++detail::process_counter())) {}

  /// A process that will call `target(args...)`. The target and the arguments are copied into
  /// this object and reach the child by fork: nothing is serialized.
  template <class F, class... Args>
    requires(!std::is_same_v<std::decay_t<F>, Process>)
  explicit Process(F target, Args... args) : Process() {
    static_assert(std::is_invocable_v<F&, Args&...>,
                  "procpool::Process: the target cannot be called with these arguments");
    target_ = [f = std::move(target), tup = std::make_tuple(std::move(args)...)]() mutable {
      std::apply(f, tup);
    };
  }

  /// Takes over another Process object and its child, if started (to keep processes in a
  /// std::vector, say). The moved-from object may only be destroyed.
  Process(Process&&) noexcept = default;
  /// Not assignable: a Process object stands for one child process for its whole life.
  Process& operator=(Process&&) = delete;
  /// Not copyable: a Process object stands for one child process.
  Process(const Process&) = delete;
  /// Not assignable: a Process object stands for one child process for its whole life.
  Process& operator=(const Process&) = delete;

  /// Joins a started, unjoined child (a daemon one is sent SIGTERM first, then SIGKILL if it
  /// has not exited within 5 s). Never throws: a failure is reported on stderr.
  virtual ~Process() {
    if (!child_ || child_->owner != ::getpid()) return;
    try {
      if (daemon_ && !child_->try_reap()) {
        send_signal(SIGTERM);
        if (!join(std::chrono::seconds(5))) send_signal(SIGKILL);
      }
      join();
    } catch (const std::exception& e) {
      detail::report(std::string("while destroying ") + name_ + ": " + e.what());
    }
  }

  /// What the child does: calls the target given to the constructor. Override it in a
  /// subclass constructed with Process().
  virtual void run() {
    if (target_) target_();
  }

  /// Starts the child. The caller's stdio buffers are flushed first.
  /// @throws std::logic_error if already started; std::system_error if fork() fails.
  void start() {
    if (started_) throw std::logic_error("procpool: " + name_ + " was already started");
    auto child = std::make_shared<detail::ChildState>();
    detail::ChildRegistry::instance();  // installs its fork handlers before the first fork
    detail::flush_std_streams();
    pid_t pid = ::fork();
    if (pid < 0) detail::throw_errno("fork");
    if (pid == 0) run_child();  // never returns
    started_ = true;
    child->pid = pid;
    child->owner = ::getpid();
    int pidfd = detail::pidfd_open(pid);
    if (pidfd < 0) {
      int err = errno;
      ::kill(pid, SIGKILL);  // a child we could not track must not outlive this call
      int st;
      detail::retry_eintr([&] { return ::waitpid(pid, &st, 0); });
      errno = err;
      detail::throw_errno("pidfd_open");
    }
    child->pidfd.reset(pidfd);
    child_ = child;
    detail::ChildRegistry::instance().add(std::move(child));
  }

  /// Waits for the child to exit and reaps it.
  /// @throws std::logic_error if not started, or called from a process other than the one
  /// that started it.
  void join() { (void)join_until(detail::Deadline::never()); }

  /// Waits at most `timeout` for the child to exit. Returns true when it has exited (and is
  /// reaped). A negative timeout means zero.
  template <class Rep, class Period>
  bool join(std::chrono::duration<Rep, Period> timeout) {
    return join_until(detail::Deadline::after(timeout));
  }

  /// Whether the child was started and has not exited yet. Reaps it if it has exited.
  bool is_alive() const {
    if (self_) return true;  // current_process() inside the child
    if (!child_) return false;
    if (child_->owner != ::getpid()) return false;
    return !child_->try_reap();
  }

  /// nullopt while running (or not started); 0 after a normal end; n after exit(n) or
  /// _exit(n); 1 if run() threw; -N if killed by signal N.
  std::optional<int> exitcode() const {
    if (!child_ || child_->owner != ::getpid() || !child_->try_reap()) return std::nullopt;
    return detail::exitcode_from_status(*child_->status);
  }

  /// The child's process id, or -1 before start(). Inside the child (current_process()), its
  /// own pid.
  pid_t pid() const noexcept {
    if (self_) return self_pid_;
    return child_ ? child_->pid : -1;
  }

  /// The name, "Process-N" unless set.
  std::string name() const { return name_; }
  /// Renames the process (the name is only a label; the child sees the name it had at start).
  void set_name(std::string name) { name_ = std::move(name); }

  /// Whether the child is a daemon: terminated, not waited for, when this object is destroyed.
  bool daemon() const noexcept { return daemon_; }
  /// @throws std::logic_error after start().
  void set_daemon(bool daemon) {
    if (started_) throw std::logic_error("procpool: set_daemon() after start()");
    daemon_ = daemon;
  }

  /// Sends SIGTERM to the child. Nothing happens if it has already exited and been reaped.
  void terminate() { send_signal(SIGTERM); }
  /// Sends SIGKILL to the child. Nothing happens if it has already exited and been reaped.
  void kill() { send_signal(SIGKILL); }

 private:
  friend const Process& current_process();
  friend void detail::become_current_process(std::string name);
  struct MainTag {};
  explicit Process(MainTag, std::string name = "MainProcess")
      : name_(std::move(name)), self_(true), self_pid_(::getpid()) {}

  bool join_until(const detail::Deadline& deadline) {
    if (!child_) throw std::logic_error("procpool: can only join a started process");
    if (child_->owner != ::getpid()) {
      throw std::logic_error("procpool: can only join a child of this process");
    }
    for (;;) {
      if (child_->try_reap()) {
        detail::ChildRegistry::instance().remove(child_.get());
        return true;
      }
      int fd;
      {
        std::lock_guard lock(child_->mutex);
        fd = child_->pidfd.get();
      }
      if (fd >= 0 && !detail::wait_readable(fd, deadline)) return false;
    }
  }

  void send_signal(int sig) {
    if (!child_) throw std::logic_error("procpool: the process was not started");
    if (child_->owner != ::getpid()) return;
    std::lock_guard lock(child_->mutex);
    // While unreaped the pid cannot be reused, so this signal reaches our child or nobody.
    if (!child_->status && ::kill(child_->pid, sig) != 0 && errno != ESRCH) {
      detail::throw_errno("kill");
    }
  }

  [[noreturn]] void run_child() noexcept {
    // From here on we are the child. exit() from user code must not run the parent's handlers.
    ::on_exit(detail::exit_child_now, nullptr);
    detail::current_process_ptr() = this;
    self_ = true;  // pid() in the child is its own pid
    self_pid_ = ::getpid();
    // Pools of the parent are not the child's: drop their channels so their workers see EOF
    // when the parent closes them.
    detail::InternalFds::instance().close_all_in_child();
    int code = 0;
    try {
      run();
    } catch (...) {
      detail::report_uncaught(name_, std::current_exception());
      code = 1;
    }
    detail::flush_std_streams();
    ::_exit(code);
  }

  std::function<void()> target_;
  std::string name_;
  bool daemon_ = false;
  bool started_ = false;
  bool self_ = false;      // this object is the process we run in (current_process())
  pid_t self_pid_ = -1;
  std::shared_ptr<detail::ChildState> child_;
};

/// The Process object this code runs in: in a child, the Process that started it (its name,
/// its pid()); in the main program, one named "MainProcess".
inline const Process& current_process() {
  if (Process* p = detail::current_process_ptr()) return *p;
  static const Process main_process{Process::MainTag{}};
  return main_process;
}

namespace detail {
inline void become_current_process(std::string name) {
  // Lives as long as the process: a worker never returns from its loop.
  current_process_ptr() = new Process(Process::MainTag{}, std::move(name));
}
}  // namespace detail

/// The number of CPUs this process may run on (its affinity mask), at least 1.
inline std::size_t cpu_count() {
  for (int n = 1024; n <= (1 << 20); n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (!set) break;
    std::size_t size = CPU_ALLOC_SIZE(n);
    if (::sched_getaffinity(0, size, set) == 0) {
      int count = CPU_COUNT_S(size, set);
      CPU_FREE(set);
      return count > 0 ? static_cast<std::size_t>(count) : 1;
    }
    CPU_FREE(set);
    if (errno != EINVAL) break;
  }
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<std::size_t>(n) : 1;
}

/// The pids of the Process children this process started that are still running (children
/// that have exited are reaped). Pool workers are not listed.
inline std::vector<pid_t> active_children() {
  std::vector<pid_t> pids;
  for (const auto& child : detail::ChildRegistry::instance().snapshot()) {
    if (child->owner != ::getpid()) continue;
    if (child->try_reap()) {
      detail::ChildRegistry::instance().remove(child.get());
    } else {
      pids.push_back(child->pid);
    }
  }
  return pids;
}

}  // namespace procpool
