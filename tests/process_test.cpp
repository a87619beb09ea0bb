#include <procpool/process.hpp>

#include <catch2/catch.hpp>

#include "support/interrupt.hpp"

#include <procpool/connection.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>
#include "support/children.hpp"

using test_support::no_child_processes;
using test_support::KillIfRunning;

// Every test here starts real processes and synchronizes with them through pipes: a child
// says "ready" before the parent acts on it, and is released by a message. Timeouts are only
// watchdogs. Each test checks at its end that no child process is left, running or zombie.

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;


// True when no process with this pid exists any more, not even as a zombie.
bool process_is_gone(pid_t pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

// Blocks until child `pid` has exited, without reaping it (so the Process object still can).
void wait_for_exit_without_reaping(pid_t pid) {
  siginfo_t info{};
  while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) != 0 && errno == EINTR) {
  }
}

// The test runner (Catch) handles SIGTERM, SIGABRT, SIGSEGV... to report fatal errors, and a
// fork inherits those handlers. A child that the test signals restores the defaults first, so
// that the signal kills it as it would kill any program.
void restore_default_signal_handlers() {
  for (int sig : {SIGTERM, SIGINT, SIGABRT, SIGSEGV, SIGILL, SIGFPE, SIGBUS}) {
    std::signal(sig, SIG_DFL);
  }
}

int count_of(const std::string& text, const std::string& what) {
  int n = 0;
  for (auto pos = text.find(what); pos != std::string::npos; pos = text.find(what, pos + 1)) ++n;
  return n;
}

// The exit status of a wait status, or 1000 + N for a process killed by signal N.
int status_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 1000 + WTERMSIG(status);
  return 2000;
}

struct Captured {
  pid_t pid = -1;
  int code = -1;    // status_code() of the helper
  std::string out;  // what it wrote to stdout
  std::string err;  // what it wrote to stderr
};

// Runs `scenario` in a helper process (a plain fork of the test runner) whose stdout and
// stderr are pipes read here. The scenario's return value is the helper's exit status; the
// helper flushes stdio and leaves with _exit unless the scenario exits by itself.
template <class F>
Captured run_captured(F scenario) {
  int out[2], err[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
  std::cout.flush();
  std::fflush(nullptr);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::dup2(err[1], STDERR_FILENO);
    int code = 100;
    try {
      code = scenario();
    } catch (...) {
      code = 101;
    }
    std::cout.flush();
    std::fflush(nullptr);
    ::_exit(code);
  }
  ::close(out[1]);
  ::close(err[1]);
  Captured c;
  c.pid = pid;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  auto give_up = Clock::now() + 30s;  // watchdog
  while (open_fds > 0 && Clock::now() < give_up) {
    int r = ::poll(fds, 2, 1000);
    if (r < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[4096];
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? c.out : c.err).append(buf, static_cast<std::size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) ::close(f.fd);
  }
  if (open_fds > 0) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  c.code = status_code(status);
  INFO("helper stdout: " << c.out);
  INFO("helper stderr: " << c.err);
  REQUIRE(open_fds == 0);  // the watchdog did not fire
  return c;
}

using namespace test_support;  // wait_until_sleeping, InterruptingSignal

// A child that says "ready" on `conn`, then waits for any message (or EOF) and returns.
auto ready_then_wait(procpool::Connection& conn) {
  return [&conn] {
    restore_default_signal_handlers();
    conn.send(std::string("ready"));
    try {
      (void)conn.recv_bytes();
    } catch (const procpool::EOFError&) {
    }
  };
}


struct CustomError : std::logic_error {
  using std::logic_error::logic_error;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Running a target

TEST_CASE("process: a target with arguments runs in a child process") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p(
        [&child_end](int n, std::string s, std::vector<int> v) {
          child_end.send(std::tuple<int, std::string, int, pid_t, pid_t>{
              n * 2, s + "!", static_cast<int>(v.size()), ::getpid(), ::getppid()});
        },
        21, std::string("hi"), std::vector<int>{1, 2, 3});
    p.start();
    auto [n, s, size, pid, ppid] =
        parent_end.recv<std::tuple<int, std::string, int, pid_t, pid_t>>();
    CHECK(n == 42);
    CHECK(s == "hi!");
    CHECK(size == 3);
    CHECK(pid == p.pid());
    CHECK(pid != ::getpid());
    CHECK(ppid == ::getpid());
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: arguments are copied when the Process is constructed") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    std::string s = "original";
    procpool::Process p([&child_end](const std::string& v) { child_end.send(v); }, s);
    s = "changed";
    p.start();
    CHECK(parent_end.recv<std::string>() == "original");
    p.join();
  }
  CHECK(no_child_processes());
}

namespace {
class Doubler : public procpool::Process {
 public:
  Doubler(procpool::Connection& conn, int n) : conn_(conn), n_(n) {}
  void run() override {
    conn_.send(n_ * 2);
    conn_.send(procpool::current_process().name());
  }

 private:
  procpool::Connection& conn_;
  int n_;
};

class Thrower : public procpool::Process {
 public:
  void run() override { throw std::runtime_error("from run"); }
};
}  // namespace

TEST_CASE("process: a subclass overriding run() runs it in the child") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    Doubler d(child_end, 8);
    CHECK(std::regex_match(d.name(), std::regex("Process-[0-9]+")));
    d.set_name("doubler");
    d.start();
    CHECK(parent_end.recv<int>() == 16);
    CHECK(parent_end.recv<std::string>() == "doubler");
    d.join();
    CHECK(d.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: a target that returns normally gives exitcode 0") {
  {
    procpool::Process p([] {});
    p.start();
    p.join();
    CHECK(p.exitcode() == 0);
    procpool::Process q([] { return 5; });  // a return value is not an exit status
    q.start();
    q.join();
    CHECK(q.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: exit(n) in the target gives exitcode n") {
  for (int n : {0, 1, 2, 3, 42, 255}) {
    INFO("exit(" << n << ")");
    procpool::Process p([](int code) { std::exit(code); }, n);
    p.start();
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == n);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: _exit(n) in the target gives exitcode n") {
  for (int n : {0, 1, 7, 255}) {
    INFO("_exit(" << n << ")");
    procpool::Process p([](int code) { ::_exit(code); }, n);
    p.start();
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == n);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: a child killed by signal N gives exitcode -N") {
  for (int sig : {SIGUSR2, SIGKILL, SIGTERM}) {
    INFO("signal " << sig);
    procpool::Process p(
        [](int s) {
          restore_default_signal_handlers();
          ::raise(s);
          ::_exit(99);  // not reached
        },
        sig);
    p.start();
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == -sig);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// run() throwing

TEST_CASE("process: run() that throws gives exitcode 1 and prints the type and message") {
  {
    int err[2];
    REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
    procpool::Process p([&] {
      ::dup2(err[1], STDERR_FILENO);  // the report goes to the pipe, not the test's stderr
      throw std::runtime_error("boom");
    });
    p.set_name("boomer");
    p.start();
    ::close(err[1]);
    std::string text;
    char buf[1024];
    for (ssize_t n; (n = ::read(err[0], buf, sizeof buf)) != 0;) {
      if (n < 0 && errno == EINTR) continue;
      REQUIRE(n > 0);
      text.append(buf, static_cast<std::size_t>(n));
    }
    ::close(err[0]);
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == 1);
    CHECK(count_of(text, "std::runtime_error: boom") == 1);
    CHECK(count_of(text, "boomer") == 1);  // the report names the process
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: a signal while the uncaught exception report is blocked does not lose it") {
  // The child's stderr is a full pipe, so the report's write() blocks; a signal handler
  // installed without SA_RESTART (inherited from this process) interrupts it, and only once
  // the handler has run is the pipe drained. The report must still arrive whole.
  {
    InterruptingSignal sig;
    int err[2];
    REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p([&] {
      ::dup2(err[1], STDERR_FILENO);
      int flags = ::fcntl(STDERR_FILENO, F_GETFL);
      ::fcntl(STDERR_FILENO, F_SETFL, flags | O_NONBLOCK);
      char filler[4096];
      std::memset(filler, '.', sizeof filler);
      while (::write(STDERR_FILENO, filler, sizeof filler) > 0) {
      }
      while (::write(STDERR_FILENO, filler, 1) > 0) {
      }
      ::fcntl(STDERR_FILENO, F_SETFL, flags);  // full, and blocking again
      child_end.send(std::string("stderr is full"));
      throw std::runtime_error("reported despite a signal");
    });
    KillIfRunning guard{&p};
    p.start();
    ::close(err[1]);
    REQUIRE(parent_end.recv<std::string>() == "stderr is full");
    REQUIRE(sig.interrupt(p.pid(), 1));  // once blocked writing the report
    std::string text;
    char buf[4096];
    for (ssize_t n; (n = ::read(err[0], buf, sizeof buf)) != 0;) {
      if (n < 0 && errno == EINTR) continue;
      REQUIRE(n > 0);
      text.append(buf, static_cast<std::size_t>(n));
    }
    ::close(err[0]);
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == 1);
    CHECK(count_of(text, "std::runtime_error: reported despite a signal") == 1);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: an exception of any type escaping run() gives exitcode 1 and is reported") {
  Captured c = run_captured([] {
    procpool::Process custom([] { throw CustomError("custom message"); });
    procpool::Process integer([] { throw 42; });
    Thrower subclass;
    custom.start();
    custom.join();
    integer.start();
    integer.join();
    subclass.start();
    subclass.join();
    if (custom.exitcode() != 1) return 10;
    if (integer.exitcode() != 1) return 11;
    if (subclass.exitcode() != 1) return 12;
    return 0;
  });
  INFO("stderr: " << c.err);
  CHECK(c.code == 0);
  CHECK(count_of(c.err, "CustomError: custom message") == 1);
  CHECK(count_of(c.err, "int") >= 1);
  CHECK(count_of(c.err, "std::runtime_error: from run") == 1);
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// terminate, kill, join, is_alive, exitcode, pid

TEST_CASE("process: terminate gives exitcode -SIGTERM") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p(ready_then_wait(child_end));
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    CHECK(p.is_alive());
    p.terminate();
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == -SIGTERM);
    CHECK_FALSE(p.is_alive());
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: kill gives exitcode -SIGKILL") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p([&] {
      std::signal(SIGTERM, SIG_IGN);  // kill() must not depend on SIGTERM
      child_end.send(std::string("ready"));
      (void)child_end.recv_bytes();
    });
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    p.kill();
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == -SIGKILL);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: terminate and kill after the child was reaped do nothing") {
  {
    procpool::Process p([] {});
    p.start();
    p.join();
    CHECK_NOTHROW(p.terminate());
    CHECK_NOTHROW(p.kill());
    CHECK(p.exitcode() == 0);  // unchanged
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: terminate and kill before start throw std::logic_error") {
  procpool::Process p([] {});
  CHECK_THROWS_AS(p.terminate(), std::logic_error);
  CHECK_THROWS_AS(p.kill(), std::logic_error);
}

TEST_CASE("process: join with a timeout returns false while the child runs and true after") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p(ready_then_wait(child_end));
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    CHECK_FALSE(p.join(50ms));
    CHECK_FALSE(p.join(0ms));
    auto start = Clock::now();
    CHECK_FALSE(p.join(-1s));  // a negative timeout means zero
    CHECK(Clock::now() - start < 5s);
    CHECK(p.is_alive());
    CHECK_FALSE(p.exitcode().has_value());
    parent_end.send(std::string("go"));
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == 0);
    CHECK(p.join(0ms));  // joining again is immediate
    p.join();
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: is_alive and exitcode follow the child's life") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p(ready_then_wait(child_end));
    KillIfRunning guard{&p};
    CHECK_FALSE(p.is_alive());  // not started
    CHECK_FALSE(p.exitcode().has_value());
    CHECK(p.pid() == -1);
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    CHECK(p.is_alive());
    CHECK_FALSE(p.exitcode().has_value());
    pid_t pid = p.pid();
    CHECK(pid > 0);

    parent_end.send(std::string("go"));
    wait_for_exit_without_reaping(pid);
    CHECK_FALSE(p.is_alive());  // it has exited: is_alive reaps it
    CHECK(process_is_gone(pid));
    CHECK(p.exitcode() == 0);
    CHECK(p.pid() == pid);  // the pid stays known after the end
    CHECK(p.join(0ms));
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: pid is the child's own pid") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p([&] { child_end.send(::getpid()); });
    p.start();
    CHECK(parent_end.recv<pid_t>() == p.pid());
    p.join();
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: start twice throws std::logic_error") {
  {
    procpool::Process p([] {});
    p.start();
    CHECK_THROWS_AS(p.start(), std::logic_error);
    p.join();
    CHECK_THROWS_AS(p.start(), std::logic_error);
    CHECK(p.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: join before start throws std::logic_error") {
  procpool::Process p([] {});
  CHECK_THROWS_AS(p.join(), std::logic_error);
  CHECK_THROWS_AS(p.join(1s), std::logic_error);
  CHECK(no_child_processes());
}

TEST_CASE("process: set_daemon after start throws std::logic_error") {
  {
    procpool::Process p([] {});
    CHECK_FALSE(p.daemon());
    p.set_daemon(true);
    CHECK(p.daemon());
    p.set_daemon(false);
    CHECK_FALSE(p.daemon());
    p.start();
    CHECK_THROWS_AS(p.set_daemon(true), std::logic_error);
    CHECK_FALSE(p.daemon());
    p.join();
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: join from two threads at once reaps the child once") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p(ready_then_wait(child_end));
    KillIfRunning guard{&p};
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    bool joined_a = false, joined_b = false;
    std::thread a([&] { joined_a = p.join(20s); });
    std::thread b([&] { joined_b = p.join(20s); });
    parent_end.send(std::string("go"));
    a.join();
    b.join();
    CHECK(joined_a);
    CHECK(joined_b);
    CHECK(p.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: a signal handler firing during join is not an error") {
  constexpr int signals = 10;
  {
    InterruptingSignal sig;
    pid_t parent = ::getpid();
    procpool::Process p([&] { ::_exit(sig.interrupt(parent, signals) ? 0 : 1); });
    procpool::Process q([&] { ::_exit(sig.interrupt(parent, signals) ? 0 : 1); });
    p.start();
    p.join();  // interrupted again and again, and resumed
    CHECK(p.exitcode() == 0);
    CHECK(static_cast<int>(g_signals_handled) == signals);
    q.start();
    REQUIRE(q.join(30s));
    CHECK(q.exitcode() == 0);
    CHECK(static_cast<int>(g_signals_handled) == 2 * signals);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Names and current_process()

TEST_CASE("process: name defaults to Process-N and names are distinct") {
  procpool::Process a([] {});
  procpool::Process b([] {});
  Thrower c;
  std::regex pattern("Process-[0-9]+");
  CHECK(std::regex_match(a.name(), pattern));
  CHECK(std::regex_match(b.name(), pattern));
  CHECK(std::regex_match(c.name(), pattern));
  CHECK(a.name() != b.name());
  CHECK(b.name() != c.name());
  a.set_name("renamed");
  CHECK(a.name() == "renamed");
}

TEST_CASE("process: current_process() in the main process is MainProcess") {
  CHECK(procpool::current_process().name() == "MainProcess");
  CHECK(procpool::current_process().pid() == ::getpid());
}

TEST_CASE("process: current_process().name() inside a child equals the Process's name") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process named([&] { child_end.send(procpool::current_process().name()); });
    named.set_name("worker-7");
    procpool::Process unnamed([&] { child_end.send(procpool::current_process().name()); });
    named.start();
    CHECK(parent_end.recv<std::string>() == "worker-7");
    unnamed.start();
    CHECK(parent_end.recv<std::string>() == unnamed.name());
    named.join();
    unnamed.join();
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: current_process().pid() inside a child is the child's pid") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process p([&] {
      child_end.send(std::pair<pid_t, pid_t>{procpool::current_process().pid(), ::getpid()});
    });
    p.start();
    auto [reported, actual] = parent_end.recv<std::pair<pid_t, pid_t>>();
    CHECK(reported == actual);
    CHECK(reported == p.pid());
    p.join();
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Daemons and destruction

TEST_CASE("process: a non-daemon Process destroyed while running is joined") {
  auto [parent_end, child_end] = procpool::Pipe();
  pid_t pid = -1;
  {
    procpool::Process p([&] {
      child_end.send(std::string("ready"));
      if (child_end.recv<std::string>() != "release") ::_exit(2);
      child_end.send(std::string("finished"));  // work done after the release
    });
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    pid = p.pid();
    parent_end.send(std::string("release"));
  }                          // ~Process waits for the child to finish
  CHECK(parent_end.poll());  // already there: the destructor waited for it
  CHECK(parent_end.recv<std::string>() == "finished");
  CHECK(process_is_gone(pid));
  CHECK(no_child_processes());
}

namespace {
int g_sigterm_fd = -1;
extern "C" void note_sigterm_and_exit(int) {
  (void)!::write(g_sigterm_fd, "T", 1);
  ::_exit(0);
}
}  // namespace

TEST_CASE("process: a daemon Process destroyed while running is terminated") {
  auto [parent_end, child_end] = procpool::Pipe();
  int term[2];
  REQUIRE(::pipe2(term, O_CLOEXEC) == 0);
  pid_t pid = -1;
  {
    procpool::Process p([&] {
      g_sigterm_fd = term[1];  // the child says it was sent SIGTERM, not SIGKILL
      std::signal(SIGTERM, note_sigterm_and_exit);
      child_end.send(std::string("ready"));
      (void)child_end.recv_bytes();
    });
    p.set_daemon(true);
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    pid = p.pid();
  }  // ~Process sends SIGTERM and reaps it
  ::close(term[1]);
  char c = 0;
  ssize_t n;
  while ((n = ::read(term[0], &c, 1)) < 0 && errno == EINTR) {
  }
  ::close(term[0]);
  CHECK(n == 1);
  CHECK(c == 'T');
  CHECK(process_is_gone(pid));
  CHECK(no_child_processes());
}

TEST_CASE("process: a daemon Process that ignores SIGTERM is killed when destroyed") {
  auto [parent_end, child_end] = procpool::Pipe();
  pid_t pid = -1;
  {
    procpool::Process p([&] {
      std::signal(SIGTERM, SIG_IGN);
      child_end.send(std::string("ready"));
      (void)child_end.recv_bytes();
    });
    p.set_daemon(true);
    p.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");
    pid = p.pid();
  }  // SIGTERM is ignored; SIGKILL follows after the grace period
  CHECK(process_is_gone(pid));
  CHECK(no_child_processes());
}

TEST_CASE("process: a daemon Process that already exited is reaped when destroyed") {
  pid_t pid = -1;
  {
    procpool::Process p([] {});
    p.set_daemon(true);
    p.start();
    pid = p.pid();
    wait_for_exit_without_reaping(pid);
  }
  CHECK(process_is_gone(pid));
  CHECK(no_child_processes());
}

TEST_CASE("process: a Process that was never started is destroyed without effect") {
  {
    procpool::Process p([] {});
  }
  { Thrower t; }
  CHECK(no_child_processes());
}

TEST_CASE("process: every started child is reaped") {
  {
    std::vector<pid_t> pids;
    {
      procpool::Process joined([] {});
      procpool::Process timed([] {});
      procpool::Process polled([] {});
      procpool::Process listed([] {});
      procpool::Process destroyed([] {});
      for (auto* p : {&joined, &timed, &polled, &listed}) {
        p->start();
        pids.push_back(p->pid());
      }
      joined.join();
      REQUIRE(timed.join(10s));
      wait_for_exit_without_reaping(polled.pid());
      CHECK_FALSE(polled.is_alive());
      wait_for_exit_without_reaping(listed.pid());
      (void)procpool::active_children();  // reaps every exited child it lists
      CHECK(listed.exitcode() == 0);
      destroyed.start();
      pids.push_back(destroyed.pid());
      wait_for_exit_without_reaping(destroyed.pid());
      CHECK(process_is_gone(joined.pid()));
      CHECK(process_is_gone(timed.pid()));
      CHECK(process_is_gone(polled.pid()));
      CHECK(process_is_gone(listed.pid()));
      CHECK_FALSE(process_is_gone(destroyed.pid()));  // a zombie until its destructor
    }
    for (pid_t pid : pids) CHECK(process_is_gone(pid));
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Moves

TEST_CASE("process: Processes can live in a vector and be moved after start") {
  {
    std::vector<procpool::Process> ps;
    ps.reserve(1);  // later emplace_backs reallocate: started processes move
    for (int i = 0; i < 5; ++i) {
      ps.emplace_back([](int code) { std::exit(code); }, 10 + i);
      ps.back().start();
    }
    procpool::Process moved(std::move(ps.front()));
    REQUIRE(moved.join(10s));
    CHECK(moved.exitcode() == 10);
    for (std::size_t i = 1; i < ps.size(); ++i) {
      REQUIRE(ps[i].join(10s));
      CHECK(ps[i].exitcode() == 10 + static_cast<int>(i));
    }
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Many, nested and inherited processes

TEST_CASE("process: many processes can be started, terminated or killed, and joined") {
  constexpr int n = 16;
  {
    std::vector<std::pair<procpool::Connection, procpool::Connection>> pipes;
    for (int i = 0; i < n; ++i) pipes.push_back(procpool::Pipe());
    std::vector<procpool::Process> ps;
    ps.reserve(n);
    for (int i = 0; i < n; ++i) ps.emplace_back(ready_then_wait(pipes[i].second));
    KillIfRunning guard(ps);
    for (auto& p : ps) p.start();
    for (auto& pipe : pipes) REQUIRE(pipe.first.recv<std::string>() == "ready");
    CHECK(procpool::active_children().size() == static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      if (i % 2 == 0) {
        ps[i].terminate();
      } else {
        ps[i].kill();
      }
    }
    for (int i = 0; i < n; ++i) {
      REQUIRE(ps[i].join(10s));
      CHECK(ps[i].exitcode() == (i % 2 == 0 ? -SIGTERM : -SIGKILL));
    }
    CHECK(procpool::active_children().empty());
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: nested processes talk over one pipe created by the grandparent") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    procpool::Process child([&] {
      procpool::Process grandchild([&] {
        child_end.send(std::string("from the grandchild"));
        child_end.send(std::pair<pid_t, pid_t>{::getpid(), ::getppid()});
        std::exit(7);
      });
      grandchild.start();
      grandchild.join();
      child_end.send(std::string("from the child"));
      child_end.send(grandchild.pid());
      std::exit(*grandchild.exitcode());  // passes the grandchild's exit code up
    });
    child.start();
    CHECK(parent_end.recv<std::string>() == "from the grandchild");
    auto [grandchild_pid, its_parent] = parent_end.recv<std::pair<pid_t, pid_t>>();
    CHECK(its_parent == child.pid());
    CHECK(parent_end.recv<std::string>() == "from the child");
    CHECK(parent_end.recv<pid_t>() == grandchild_pid);
    REQUIRE(child.join(10s));
    CHECK(child.exitcode() == 7);
    CHECK(process_is_gone(grandchild_pid));
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: a Process inherited by another child is not its child there") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    auto [report_end, reporter_end] = procpool::Pipe();
    procpool::Process first(ready_then_wait(child_end));
    KillIfRunning guard{&first};
    first.start();
    REQUIRE(parent_end.recv<std::string>() == "ready");

    procpool::Process second([&] {
      // `first` is a copy made by fork: this process did not start it.
      int failures = 0;
      try {
        first.join();
        ++failures;
      } catch (const std::logic_error&) {
      }
      try {
        (void)first.join(1s);
        ++failures;
      } catch (const std::logic_error&) {
      }
      if (first.is_alive()) ++failures;
      if (first.exitcode().has_value()) ++failures;
      first.terminate();  // must not reach the sibling
      first.kill();
      if (!procpool::active_children().empty()) ++failures;  // not its children either
      reporter_end.send(failures);
    });
    second.start();
    CHECK(report_end.recv<int>() == 0);
    REQUIRE(second.join(10s));
    CHECK(second.exitcode() == 0);
    CHECK(first.is_alive());  // untouched by the sibling's terminate() and kill()
    parent_end.send(std::string("go"));
    REQUIRE(first.join(10s));
    CHECK(first.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// cpu_count and active_children

TEST_CASE("process: cpu_count honours the CPU affinity mask") {
  cpu_set_t mine;
  CPU_ZERO(&mine);
  REQUIRE(::sched_getaffinity(0, sizeof mine, &mine) == 0);
  CHECK(procpool::cpu_count() == static_cast<std::size_t>(CPU_COUNT(&mine)));
  CHECK(procpool::cpu_count() >= 1);

  std::vector<int> allowed;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &mine)) allowed.push_back(cpu);
  }
  for (std::size_t want : {std::size_t{1}, std::size_t{2}}) {
    if (want > allowed.size()) continue;
    INFO("restricted to " << want << " CPU(s)");
    procpool::Process p(
        [&](std::size_t count) {
          cpu_set_t set;
          CPU_ZERO(&set);
          for (std::size_t i = 0; i < count; ++i) CPU_SET(allowed[i], &set);
          if (::sched_setaffinity(0, sizeof set, &set) != 0) ::_exit(100);
          ::_exit(procpool::cpu_count() == count ? 0 : 1);
        },
        want);
    p.start();
    REQUIRE(p.join(10s));
    CHECK(p.exitcode() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("process: active_children lists running children and not joined ones") {
  {
    CHECK(procpool::active_children().empty());
    auto [a_parent, a_child] = procpool::Pipe();
    auto [b_parent, b_child] = procpool::Pipe();
    procpool::Process a(ready_then_wait(a_child));
    procpool::Process b(ready_then_wait(b_child));
    KillIfRunning guard{&a, &b};
    procpool::Process unstarted([] {});
    a.start();
    b.start();
    REQUIRE(a_parent.recv<std::string>() == "ready");
    REQUIRE(b_parent.recv<std::string>() == "ready");

    auto kids = procpool::active_children();
    std::sort(kids.begin(), kids.end());
    std::vector<pid_t> expected{a.pid(), b.pid()};
    std::sort(expected.begin(), expected.end());
    CHECK(kids == expected);

    a_parent.send(std::string("go"));
    REQUIRE(a.join(10s));
    CHECK(procpool::active_children() == std::vector<pid_t>{b.pid()});

    // A child that has exited but was not joined is not active (and gets reaped).
    b_parent.send(std::string("go"));
    wait_for_exit_without_reaping(b.pid());
    CHECK(procpool::active_children().empty());
    CHECK(process_is_gone(b.pid()));
    CHECK(b.exitcode() == 0);
    CHECK_FALSE(b.is_alive());
    CHECK(b.join(0ms));
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// What a fork must not duplicate

namespace {
// Armed only inside a helper process: a static object whose destructor leaves a mark, and an
// atexit handler that does, both tagged with the pid of the process that ran them.
bool g_marker_armed = false;

void write_marker(const char* what) {
  char line[64];
  int n = std::snprintf(line, sizeof line, "%s:%d\n", what, static_cast<int>(::getpid()));
  if (n > 0) (void)!::write(STDOUT_FILENO, line, static_cast<std::size_t>(n));
}

struct StaticMarker {
  ~StaticMarker() {
    if (g_marker_armed) write_marker("static-destructor");
  }
};
StaticMarker g_static_marker;

extern "C" void atexit_marker() { write_marker("atexit"); }
}  // namespace

TEST_CASE("process: a child never runs the parent's atexit handlers or static destructors") {
  Captured c = run_captured([]() -> int {
    g_marker_armed = true;
    std::atexit(atexit_marker);
    static StaticMarker local_static;  // a static registered after the runner started
    (void)local_static;

    procpool::Process returns([] {});
    procpool::Process exits([] { std::exit(3); });
    procpool::Process underscore_exits([] { ::_exit(4); });
    procpool::Process throws([] { throw std::runtime_error("thrown"); });
    int failures = 0;
    for (auto* p : {&returns, &exits, &underscore_exits, &throws}) {
      p->start();
      p->join();
    }
    if (returns.exitcode() != 0) ++failures;
    if (exits.exitcode() != 3) ++failures;
    if (underscore_exits.exitcode() != 4) ++failures;
    if (throws.exitcode() != 1) ++failures;
    std::fflush(nullptr);
    std::exit(failures);  // the helper's own exit runs its handlers, once
  });
  INFO("stdout: " << c.out);
  CHECK(c.code == 0);
  std::string helper = ":" + std::to_string(c.pid) + "\n";
  CHECK(count_of(c.out, "atexit:") == 1);
  CHECK(count_of(c.out, "atexit" + helper) == 1);
  CHECK(count_of(c.out, "static-destructor:") == 2);  // the global and the local static
  CHECK(count_of(c.out, "static-destructor" + helper) == 2);
  CHECK(no_child_processes());
}

TEST_CASE("process: output the parent buffered in stdio before start() appears once") {
  Captured c = run_captured([] {
    std::printf("[printf before start]");  // no newline: still in the stdio buffer
    std::cout << "[cout before start]";
    std::fprintf(stderr, "[stderr before start]");
    procpool::Process p([] { std::printf("[from the child]"); });
    p.start();
    p.join();
    std::printf("[printf between]");
    procpool::Process q([] {
      std::printf("[from the exiting child]");
      std::exit(5);  // exit() still flushes the child's own output
    });
    q.start();
    q.join();
    std::printf("[printf after]");
    return p.exitcode() == 0 && q.exitcode() == 5 ? 0 : 1;
  });
  INFO("stdout: " << c.out);
  CHECK(c.code == 0);
  CHECK(count_of(c.out, "[printf before start]") == 1);
  CHECK(count_of(c.out, "[cout before start]") == 1);
  CHECK(count_of(c.err, "[stderr before start]") == 1);
  CHECK(count_of(c.out, "[from the child]") == 1);
  CHECK(count_of(c.out, "[printf between]") == 1);
  CHECK(count_of(c.out, "[from the exiting child]") == 1);
  CHECK(count_of(c.out, "[printf after]") == 1);
  CHECK(c.out.find("[printf before start]") < c.out.find("[from the child]"));
  CHECK(no_child_processes());
}
