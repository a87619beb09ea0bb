#pragma once
// Thin, exception-based wrappers over the POSIX calls procpool makes: RAII file descriptors,
// EINTR retried in one place, deadlines for timed waits, and wait-status decoding.

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <optional>
#include <string>
#include <system_error>
#include <utility>

namespace procpool::detail {

/// Throws std::system_error for `errno`, naming the call that failed.
[[noreturn]] inline void throw_errno(const char* call) {
  throw std::system_error(errno, std::generic_category(), std::string("procpool: ") + call);
}

/// Calls `f` until it fails with something other than EINTR. A signal handler the program
/// installed may interrupt any blocking call; that is never an error for procpool.
template <class F>
auto retry_eintr(F&& f) {
  for (;;) {
    auto r = f();
    if (!(r == -1 && errno == EINTR)) return r;
  }
}

/// An owned file descriptor: closed on destruction, move-only, -1 when empty.
class unique_fd {
 public:
  unique_fd() noexcept = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept { return std::exchange(fd_, -1); }
  /// Closes the current descriptor, if any. close() is not retried on EINTR: on Linux the
  /// descriptor is gone either way, and a retry could close a descriptor another thread opened.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

using Clock = std::chrono::steady_clock;

/// A point in time to wait until, or forever. Durations below zero mean "now".
class Deadline {
 public:
  static Deadline never() noexcept { return Deadline(); }
  template <class Rep, class Period>
  static Deadline after(std::chrono::duration<Rep, Period> d) noexcept {
    Deadline r;
    if (d <= d.zero()) {
      r.at_ = Clock::now();
    } else if (d >= std::chrono::duration_cast<std::chrono::duration<Rep, Period>>(
                         std::chrono::hours(24 * 365 * 100))) {
      // A century is forever, and keeps the arithmetic below from overflowing.
    } else {
      r.at_ = Clock::now() + std::chrono::ceil<Clock::duration>(d);
    }
    return r;
  }
  bool is_never() const noexcept { return !at_; }
  bool expired() const noexcept { return at_ && Clock::now() >= *at_; }
  /// The time left, zero once expired. Only for deadlines that are not never().
  Clock::duration remaining() const noexcept {
    auto left = *at_ - Clock::now();
    return left < Clock::duration::zero() ? Clock::duration::zero() : left;
  }
  /// The time left as a timespec for ppoll(), or nullptr for never.
  const timespec* as_timespec(timespec& storage) const noexcept {
    if (!at_) return nullptr;
    auto left = remaining();
    auto secs = std::chrono::duration_cast<std::chrono::seconds>(left);
    storage.tv_sec = static_cast<time_t>(secs.count());
    storage.tv_nsec = static_cast<long>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(left - secs).count());
    return &storage;
  }
  /// The deadline as an absolute CLOCK_MONOTONIC time (what steady_clock reads on Linux) for
  /// futex and pthread clock waits, or nullptr for never.
  const timespec* as_monotonic_timespec(timespec& storage) const noexcept {
    if (!at_) return nullptr;
    auto since = at_->time_since_epoch();
    auto secs = std::chrono::duration_cast<std::chrono::seconds>(since);
    storage.tv_sec = static_cast<time_t>(secs.count());
    storage.tv_nsec = static_cast<long>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(since - secs).count());
    return &storage;
  }

 private:
  std::optional<Clock::time_point> at_;
};

/// Waits until `fd` is readable (or at EOF, or in error) or the deadline passes.
/// Returns true when readable. A signal handler running meanwhile does not cut the wait short.
inline bool wait_readable(int fd, const Deadline& deadline, short events = POLLIN) {
  for (;;) {
    pollfd p{fd, events, 0};
    timespec ts;
    int r = ::ppoll(&p, 1, deadline.as_timespec(ts), nullptr);
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) throw_errno("ppoll");
  }
}

/// The short name of a signal ("KILL" for 9), or its number when it has none.
inline std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

/// Python's exit code convention for a wait status: the exit status, or -N for signal N.
inline int exitcode_from_status(int status) noexcept {
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 0;
}

/// "exited with status 3" or "killed by signal 9 (SIGKILL)".
inline std::string describe_status(int status) {
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    return "killed by signal " + std::to_string(sig) + " (" + signal_name(sig) + ")";
  }
  return "exited with status " + std::to_string(WEXITSTATUS(status));
}

/// Prints a failure that cannot be thrown (a destructor, a forked child) to stderr with a
/// single write(), so concurrent reports from several processes do not interleave.
inline void report(const std::string& text) noexcept {
  std::string line = "procpool: " + text + "\n";
  const char* p = line.data();
  std::size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

}  // namespace procpool::detail
