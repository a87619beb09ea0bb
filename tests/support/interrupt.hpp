#pragma once
// Test support shared by connection_test.cpp and process_test.cpp: making a process's blocking
// system calls fail with EINTR, one signal at a time, to show that procpool retries them.

#include <catch2/catch.hpp>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>

namespace test_support {

// Spins (yielding) until `pid`'s main thread is asleep in the kernel, i.e. blocked in a system
// call. Gives up after 20 s (a watchdog) and returns false.
inline bool wait_until_sleeping(pid_t pid) {
  std::string path = "/proc/" + std::to_string(pid) + "/stat";
  auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < give_up) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    char buf[512];
    ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n <= 0) return false;
    buf[n] = '\0';
    const char* paren = std::strrchr(buf, ')');
    if (paren && paren[1] == ' ' && paren[2] == 'S') return true;
    ::sched_yield();
  }
  return false;
}

// A SIGUSR1 handler installed WITHOUT SA_RESTART, so every blocking call it interrupts fails
// with EINTR. Each delivery is counted and acknowledged with one byte on a socket, so the
// sender knows the handler ran before it sends the next one.
inline volatile sig_atomic_t g_signals_handled = 0;
inline int g_ack_fd = -1;

inline void count_and_ack(int) {
  int saved = errno;
  g_signals_handled = g_signals_handled + 1;
  char c = 'a';
  (void)::send(g_ack_fd, &c, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
  errno = saved;
}

class InterruptingSignal {
 public:
  InterruptingSignal() {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    ack_read_ = sv[0];
    g_ack_fd = sv[1];
    g_signals_handled = 0;
    struct sigaction sa {};
    sa.sa_handler = count_and_ack;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: the kernel returns EINTR
    REQUIRE(::sigaction(SIGUSR1, &sa, &old_) == 0);
  }
  ~InterruptingSignal() {
    ::sigaction(SIGUSR1, &old_, nullptr);
    ::close(g_ack_fd);
    ::close(ack_read_);
    g_ack_fd = -1;
  }
  InterruptingSignal(const InterruptingSignal&) = delete;
  InterruptingSignal& operator=(const InterruptingSignal&) = delete;

  /// In a child: sends `count` SIGUSR1 to `target`, each only once `target` is blocked in a
  /// system call, and each after the previous one was handled. Returns false on a failure.
  bool interrupt(pid_t target, int count) const {
    for (int i = 0; i < count; ++i) {
      if (!wait_until_sleeping(target)) return false;
      if (::kill(target, SIGUSR1) != 0) return false;
      char c;
      ssize_t n;
      do {
        n = ::recv(ack_read_, &c, 1, 0);
      } while (n < 0 && errno == EINTR);
      if (n != 1) return false;
    }
    return true;
  }

 private:
  int ack_read_ = -1;
  struct sigaction old_ {};
};

}  // namespace test_support
