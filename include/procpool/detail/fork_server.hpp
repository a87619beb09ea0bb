#pragma once
// The fork server: a single-threaded process forked when a Pool is built, before the pool
// starts any thread. It forks every worker, so no worker is ever forked from a multi-threaded
// parent, and it is the workers' parent, so it reaps them and reports how each one ended.
//
// It talks to the pool over a SOCK_SEQPACKET socket: one fixed-size record per packet, and a
// new worker's channel and pidfd ride along its "spawned" record as SCM_RIGHTS.
//
// Between fork() and worker code it touches no lock and allocates nothing: everything it
// needs was allocated by the parent before the fork.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <vector>

#include "internal_fds.hpp"
#include "posix.hpp"
#include "worker.hpp"

namespace procpool::detail {

enum class FsOp : std::uint32_t {
  spawn = 1,     // pool -> server: fork a worker for slot
  kill_all = 2,  // pool -> server: SIGKILL every worker, reap them, exit
  shutdown = 3,  // pool -> server: exit once every worker has exited
  spawned = 11,  // server -> pool: worker `pid` runs in `slot` (fds: channel, pidfd)
  spawn_failed = 12,  // server -> pool: fork failed with errno `value`
  exited = 13,        // server -> pool: worker `pid` of `slot` ended with wait status `value`
};

struct FsRecord {
  FsOp op;
  std::uint32_t slot;
  std::int32_t pid;
  std::int32_t value;
};

inline int pidfd_send_signal(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

/// What the fork server needs, allocated by the parent before the fork.
struct ForkServerConfig {
  int control = -1;      // the server's end of the control socket
  int parent_pidfd = -1;  // readable once the pool's process has died
  WorkerSlot* slots = nullptr;
  std::size_t nslots = 0;
  const std::function<void()>* initializer = nullptr;
  std::size_t max_tasks = 0;
  bool timed = false;
  std::vector<pid_t> pids;       // per slot: the worker's pid, or 0
  std::vector<int> pidfds;       // per slot: the worker's pidfd, or -1
  std::vector<pollfd> pollfds;   // scratch for poll(): control, parent, one per slot
};

inline void fs_send(int control, const FsRecord& rec, const int* fds, int nfds) noexcept {
  iovec iov{const_cast<FsRecord*>(&rec), sizeof rec};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(2 * sizeof(int))];
  if (nfds > 0) {
    std::memset(cbuf, 0, sizeof cbuf);
    msg.msg_control = cbuf;
    msg.msg_controllen = CMSG_SPACE(static_cast<std::size_t>(nfds) * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(static_cast<std::size_t>(nfds) * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds, static_cast<std::size_t>(nfds) * sizeof(int));
  }
  // If the pool is gone this fails, and the server notices on its next poll.
  (void)retry_eintr([&] { return ::sendmsg(control, &msg, MSG_NOSIGNAL); });
}

/// Forks the worker for `slot`. Runs in the fork server.
inline void fs_spawn(ForkServerConfig& cfg, std::uint32_t slot) noexcept {
  int sv[2];
  if (slot >= cfg.nslots || cfg.pids[slot] != 0) {
    fs_send(cfg.control, {FsOp::spawn_failed, slot, 0, EINVAL}, nullptr, 0);
    return;
  }
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    fs_send(cfg.control, {FsOp::spawn_failed, slot, 0, errno}, nullptr, 0);
    return;
  }
  pid_t server = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(sv[0]);
    ::close(sv[1]);
    fs_send(cfg.control, {FsOp::spawn_failed, slot, 0, err}, nullptr, 0);
    return;
  }
  if (pid == 0) {
    // The worker. Drop every descriptor that is the server's business, so that only the
    // pool's process holds the other end of our channel.
    ::close(sv[0]);
    ::close(cfg.control);
    ::close(cfg.parent_pidfd);
    for (int fd : cfg.pidfds) {
      if (fd >= 0) ::close(fd);
    }
    // Die with the server (SIGKILL, not a signal a task could catch). The server is single-
    // threaded, so "the thread that forked us exits" means "the server exits".
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != server) ::_exit(1);  // the server died before prctl took effect
    WorkerConfig wc{sv[1], &cfg.slots[slot], cfg.initializer, cfg.max_tasks, cfg.timed, slot};
    worker_main(wc);
  }
  ::close(sv[1]);
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  cfg.pids[slot] = pid;
  cfg.pidfds[slot] = pidfd;
  int fds[2] = {sv[0], pidfd};
  fs_send(cfg.control, {FsOp::spawned, slot, pid, 0}, fds, pidfd >= 0 ? 2 : 1);
  ::close(sv[0]);
}

inline void fs_reap(ForkServerConfig& cfg, std::size_t slot, bool report) noexcept {
  int status = 0;
  pid_t r = retry_eintr([&] { return ::waitpid(cfg.pids[slot], &status, 0); });
  if (report && r == cfg.pids[slot]) {
    fs_send(cfg.control,
            {FsOp::exited, static_cast<std::uint32_t>(slot), cfg.pids[slot], status}, nullptr,
            0);
  }
  if (cfg.pidfds[slot] >= 0) ::close(cfg.pidfds[slot]);
  cfg.pidfds[slot] = -1;
  cfg.pids[slot] = 0;
}

[[noreturn]] inline void fs_kill_all_and_exit(ForkServerConfig& cfg, bool report) noexcept {
  for (std::size_t i = 0; i < cfg.nslots; ++i) {
    if (cfg.pids[i] != 0) ::kill(cfg.pids[i], SIGKILL);
  }
  for (std::size_t i = 0; i < cfg.nslots; ++i) {
    if (cfg.pids[i] != 0) fs_reap(cfg, i, report);
  }
  ::_exit(0);
}

/// The fork server's life. Runs in a fresh fork of the pool's process; never returns.
[[noreturn]] inline void fork_server_main(ForkServerConfig& cfg) noexcept {
  // Ctrl-C goes to the whole process group. It is the program's to handle: the server and
  // its workers ignore it, and die with the program if the program dies of it.
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  ::sigaction(SIGINT, &ign, nullptr);
  // Channels of other pools of this program are not ours to hold open.
  int keep[2] = {cfg.control, cfg.parent_pidfd};
  InternalFds::instance().close_all_in_child(keep, 2);

  bool shutting_down = false;
  for (;;) {
    std::size_t n = 0;
    cfg.pollfds[n++] = {cfg.control, POLLIN, 0};
    cfg.pollfds[n++] = {cfg.parent_pidfd, POLLIN, 0};
    std::size_t live = 0;
    for (std::size_t i = 0; i < cfg.nslots; ++i) {
      if (cfg.pids[i] != 0) ++live;
      cfg.pollfds[n++] = {cfg.pidfds[i], POLLIN, 0};  // poll() ignores negative fds
    }
    if (shutting_down && live == 0) ::_exit(0);
    int r = ::poll(cfg.pollfds.data(), n, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      fs_kill_all_and_exit(cfg, false);
    }
    if (cfg.pollfds[1].revents) fs_kill_all_and_exit(cfg, false);  // the program died
    for (std::size_t i = 0; i < cfg.nslots; ++i) {
      if (cfg.pollfds[2 + i].revents && cfg.pids[i] != 0) fs_reap(cfg, i, true);
    }
    if (cfg.pollfds[0].revents & POLLIN) {
      FsRecord rec;
      ssize_t got = retry_eintr([&] { return ::recv(cfg.control, &rec, sizeof rec, 0); });
      if (got <= 0) fs_kill_all_and_exit(cfg, false);  // the pool is gone
      if (got != sizeof rec) continue;
      switch (rec.op) {
        case FsOp::spawn: fs_spawn(cfg, rec.slot); break;
        case FsOp::kill_all: fs_kill_all_and_exit(cfg, true);
        case FsOp::shutdown: shutting_down = true; break;
        default: break;
      }
    } else if (cfg.pollfds[0].revents) {
      fs_kill_all_and_exit(cfg, false);
    }
  }
}

}  // namespace procpool::detail
