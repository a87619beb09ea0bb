#pragma once
// Test support shared by every test file that starts processes: checking that none is left
// behind, and killing the ones a failed REQUIRE would otherwise leave running.

#include <errno.h>
#include <signal.h>
#include <sys/wait.h>

#include <initializer_list>
#include <vector>

#include <procpool/process.hpp>

namespace test_support {

// True when this process has no child at all, running or zombie (nothing was left unreaped).
inline bool no_child_processes() {
  siginfo_t info{};
  int r = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT);
  return r == -1 && errno == ECHILD;
}

// Kills children still running when a failed REQUIRE leaves a test early, so that ~Process
// (which joins) does not wait forever for a child that is waiting for the test. Declared after
// the Processes it guards, so it runs first.
class KillIfRunning {
 public:
  KillIfRunning(std::initializer_list<procpool::Process*> ps) : ps_(ps) {}
  explicit KillIfRunning(std::vector<procpool::Process>& ps) {
    for (auto& p : ps) ps_.push_back(&p);
  }
  KillIfRunning(const KillIfRunning&) = delete;
  KillIfRunning& operator=(const KillIfRunning&) = delete;
  ~KillIfRunning() {
    for (auto* p : ps_) {
      try {
        if (p->is_alive()) {
          ::kill(p->pid(), SIGCONT);  // a stopped child dies of SIGKILL too; this is explicit
          p->kill();
        }
      } catch (...) {
      }
    }
  }

 private:
  std::vector<procpool::Process*> ps_;
};

}  // namespace test_support
