#pragma once
// The client side of the Manager: authenticated connections to the server, and the per-process
// pool of them that every proxy of one manager shares.
//
// A connection carries one request and its reply at a time, so a thread takes a connection for
// the length of one operation (a Lease) and gives it back; concurrent threads get distinct
// connections (opened on demand), and a thread parked in the server (lock(), get() on an empty
// queue) never holds up another. Everything here belongs to the process that made it: after a
// fork, the child's copies are never used and never closed (their descriptor numbers may have
// been closed and reused already); the child opens its own connections.

#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <system_error>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../serialize.hpp"
#include "internal_fds.hpp"
#include "io.hpp"
#include "manager_auth.hpp"
#include "manager_wire.hpp"
#include "posix.hpp"
#include "wire.hpp"

namespace procpool::detail {

/// This process's id without a system call per request (glibc no longer caches getpid()):
/// refreshed in every child by a fork handler, which glibc's fork() always runs.
class PidCache {
 public:
  static pid_t get() noexcept { return instance().pid_.load(std::memory_order_relaxed); }

 private:
  PidCache() {
    ::pthread_atfork(nullptr, nullptr,
                     [] { instance().pid_.store(::getpid(), std::memory_order_relaxed); });
  }
  static PidCache& instance() noexcept {
    static PidCache* cache = new PidCache;  // never destroyed: used until the process ends
    return *cache;
  }
  std::atomic<pid_t> pid_{::getpid()};
};

[[noreturn]] inline void manager_gone(const std::string& how) {
  throw ManagerError("procpool: the manager's server is gone (" + how +
                     "): the Manager was shut down, its server was killed, or the program that "
                     "started it exited");
}

/// Fills a sockaddr_un with a filesystem path. @throws std::invalid_argument if it does not fit.
inline socklen_t manager_sockaddr(const std::string& path, sockaddr_un& addr) {
  addr = {};
  addr.sun_family = AF_UNIX;
  // A leading NUL would mean Linux's abstract namespace, which any process of any user on the
  // machine can reach; only absolute filesystem paths are accepted.
  if (path.empty() || path[0] != '/' || path.size() >= sizeof addr.sun_path ||
      path.find('\0') != std::string::npos) {
    throw std::invalid_argument("procpool: bad manager socket path '" + path + "'");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
}

/// One authenticated connection to the server. Used by one thread at a time (see Lease).
class ManagerConnection {
 public:
  /// Connects to the server at `path` and answers its challenge with `key`.
  /// Blocks for the handshake (one round trip).
  /// @throws ManagerError if no server listens there or it refused us; std::system_error for
  /// other failures.
  static std::unique_ptr<ManagerConnection> open(const std::string& path, const ManagerKey& key) {
    sockaddr_un addr;
    socklen_t addr_len = manager_sockaddr(path, addr);
    auto c = std::unique_ptr<ManagerConnection>(new ManagerConnection);
    c->fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!c->fd_) throw_errno("socket");
    // Recorded so that children forked by Process or a pool's fork server close their copy.
    InternalFds::instance().add(c->fd_.get());
    int r = retry_eintr(
        [&] { return ::connect(c->fd_.get(), reinterpret_cast<sockaddr*>(&addr), addr_len); });
    if (r != 0 && errno != EISCONN) {
      if (errno == ENOENT || errno == ECONNREFUSED || errno == ENOTDIR) {
        manager_gone("cannot connect to " + path + ": " + std::strerror(errno));
      }
      throw_errno("connect");
    }
    std::array<std::byte, manager_challenge_size> challenge;
    if (recv_upto(c->fd_.get(), challenge.data(), challenge.size()) != challenge.size()) {
      manager_gone("it closed the connection before its challenge");
    }
    if (std::memcmp(challenge.data(), manager_magic.data(), manager_magic.size()) != 0) {
      throw ProtocolError("procpool: " + path + " is not a procpool manager");
    }
    ManagerAnswer answer = manager_answer(key, challenge);
    c->send(answer.data(), answer.size());
    std::uint8_t verdict = 0;
    if (recv_upto(c->fd_.get(), &verdict, 1) != 1 || verdict != 1) {
      throw ManagerError("procpool: the manager at " + path + " refused the connection: wrong key");
    }
    return c;
  }

  ManagerConnection(const ManagerConnection&) = delete;
  ManagerConnection& operator=(const ManagerConnection&) = delete;

  ~ManagerConnection() {
    if (::getpid() == owner_) {
      // Unrecorded before closed: once closed, the number may be another thread's new fd.
      InternalFds::instance().remove(fd_.get());
    } else {
      (void)fd_.release();  // a fork's copy: its number may belong to something else by now
    }
  }

  /// A fresh request buffer (reused between requests).
  ByteBuffer& request() noexcept {
    out_.clear();
    return out_;
  }

  /// Sends the request built in request() and waits for its reply, whose payload is returned
  /// as a reader valid until the next call. Non-ok statuses are thrown: the error the server
  /// sent (std exceptions as themselves, else RemoteError), ProtocolError, Empty or Full.
  /// @throws ManagerError if the server is gone (the connection is then broken()).
  ReadArchive call() {
    if (out_.size() - sizeof(std::uint64_t) > manager_max_message) {
      throw ProtocolError("procpool: a manager request of " + std::to_string(out_.size()) +
                          " bytes is larger than the limit of " +
                          std::to_string(manager_max_message));
    }
    send(out_.data(), out_.size());
    out_.shrink(std::size_t{1} << 20);
    std::uint64_t len = read_reply();
    ReadArchive r(in_.data() + sizeof len, in_.data() + sizeof len + len);
    std::uint8_t status = 0;
    r(status);
    switch (static_cast<ManagerStatus>(status)) {
      case ManagerStatus::ok:
        return r;
      case ManagerStatus::error:
        std::rethrow_exception(decode_error(r));
      case ManagerStatus::protocol: {
        std::string what;
        r(what);
        throw ProtocolError(what);
      }
      case ManagerStatus::empty:
        throw Empty();
      case ManagerStatus::full:
        throw Full();
    }
    broken_ = true;
    throw ProtocolError("procpool: manager reply with unknown status " + std::to_string(status));
  }

  /// True once the connection can no longer be trusted to be in step with the server.
  bool broken() const noexcept { return broken_; }

 private:
  ManagerConnection() = default;

  void send(const void* data, std::size_t size) {
    try {
      send_all(fd_.get(), data, size);
    } catch (const std::system_error& e) {
      broken_ = true;
      if (e.code() == std::errc::broken_pipe || e.code() == std::errc::connection_reset) {
        manager_gone("sending to it failed");
      }
      throw;
    }
  }

  // Reads exactly one reply into in_ and returns its body length. The buffer grows with the
  // bytes that arrive, never ahead of them.
  std::uint64_t read_reply() {
    std::size_t got = 0;
    std::uint64_t len = 0;
    std::size_t want = sizeof len;
    if (in_.size() < 4096) in_.resize(4096);
    for (;;) {
      std::size_t room = std::min(in_.size() - got, want - got);
      if (room == 0) {
        std::size_t next = std::min<std::size_t>(want, std::max(in_.size() * 2, std::size_t{4096}));
        in_.resize(next);
        room = std::min(in_.size() - got, want - got);
      }
      // The first read asks for as much as fits: a small reply arrives in one recv().
      std::size_t ask = got < sizeof len ? in_.size() - got : room;
      ssize_t n = got == 0
                      ? recv_first(ask)
                      : retry_eintr([&] { return ::recv(fd_.get(), in_.data() + got, ask, 0); });
      if (n == 0 || (n < 0 && errno == ECONNRESET)) {
        broken_ = true;
        manager_gone("it closed the connection");
      }
      if (n < 0) {
        broken_ = true;
        throw_errno("recv");
      }
      got += static_cast<std::size_t>(n);
      if (want == sizeof len && got >= sizeof len) {
        std::memcpy(&len, in_.data(), sizeof len);
        if (len == 0 || len > manager_max_message) {
          broken_ = true;
          throw ProtocolError("procpool: manager reply of " + std::to_string(len) + " bytes");
        }
        want = sizeof len + static_cast<std::size_t>(len);
      }
      if (got > want) {  // a reply never comes unasked: the stream is out of step
        broken_ = true;
        throw ProtocolError("procpool: unexpected bytes after a manager reply");
      }
      if (got == want) break;
    }
    if (in_.size() > (std::size_t{1} << 20) && want < 4096) {
      in_.resize(4096);  // after a huge reply
      in_.shrink_to_fit();
    }
    return len;
  }

  // The first bytes of a reply: polled for a while (see AdaptiveSpin), then waited for.
  ssize_t recv_first(std::size_t ask) {
    if (std::int64_t budget = spin_.budget_ns(); budget > 0) {
      std::int64_t until = AdaptiveSpin::now_ns() + budget;
      for (;;) {
        ssize_t n = ::recv(fd_.get(), in_.data(), ask, MSG_DONTWAIT);
        if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          spin_.hit();
          return n;
        }
        ::sched_yield();  // if the server waits for this CPU, let it run now
        // Checked after the yield: if this process lost its CPU meanwhile, the time ran out and
        // it counts as a miss, so that a busy machine turns polling off.
        if (AdaptiveSpin::now_ns() >= until) break;
      }
      spin_.miss();
    }
    return retry_eintr([&] { return ::recv(fd_.get(), in_.data(), ask, 0); });
  }

  unique_fd fd_;
  AdaptiveSpin spin_;
  pid_t owner_ = ::getpid();
  ByteBuffer out_;
  std::vector<std::byte> in_;
  bool broken_ = false;
};

/// One manager as seen from one process: its address and key, the idle connections to it, and
/// the queues this process has closed.
class ManagerEndpoint {
 public:
  ManagerEndpoint(std::string address, const ManagerKey& key)
      : address_(std::move(address)), key_(key) {}

  ManagerEndpoint(const ManagerEndpoint&) = delete;
  ManagerEndpoint& operator=(const ManagerEndpoint&) = delete;

  /// The process this endpoint belongs to; in any other process it must not be used.
  pid_t pid() const noexcept { return pid_; }
  const std::string& address() const noexcept { return address_; }
  const ManagerKey& key() const noexcept { return key_; }

  /// A connection for one request: returned to the idle list on destruction unless broken.
  class Lease {
   public:
    Lease(ManagerEndpoint& ep, std::unique_ptr<ManagerConnection> c) : ep_(&ep), c_(std::move(c)) {}
    Lease(Lease&&) = delete;
    ~Lease() {
      if (c_ && !c_->broken()) ep_->give_back(std::move(c_));
    }
    ManagerConnection* operator->() const noexcept { return c_.get(); }

   private:
    ManagerEndpoint* ep_;
    std::unique_ptr<ManagerConnection> c_;
  };

  /// Takes an idle connection, or opens one (without holding the lock: the handshake blocks).
  /// @throws ManagerError if this process's Manager was shut down or the server is gone.
  std::unique_ptr<ManagerConnection> take() {
    {
      std::lock_guard lock(mutex_);
      if (shut_down_) {
        throw ManagerError("procpool: the manager has been shut down");
      }
      if (!idle_.empty()) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
    }
    return ManagerConnection::open(address_, key_);
  }

  void give_back(std::unique_ptr<ManagerConnection> c) noexcept {
    std::lock_guard lock(mutex_);
    if (shut_down_) return;
    try {
      idle_.push_back(std::move(c));
    } catch (...) {
    }
  }

  /// Makes every later request through this endpoint throw ManagerError, and closes the idle
  /// connections.
  void shut_down() noexcept {
    std::vector<std::unique_ptr<ManagerConnection>> drop;
    std::lock_guard lock(mutex_);
    shut_down_ = true;
    drop.swap(idle_);
  }

  bool queue_closed(std::uint64_t id) {
    std::lock_guard lock(mutex_);
    return closed_queues_.count(id) != 0;
  }
  void close_queue(std::uint64_t id) {
    std::lock_guard lock(mutex_);
    closed_queues_.insert(id);
  }

 private:
  const pid_t pid_ = PidCache::get();
  const std::string address_;
  const ManagerKey key_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<ManagerConnection>> idle_;
  std::unordered_set<std::uint64_t> closed_queues_;
  bool shut_down_ = false;
};

/// The endpoints of this process, by manager (address and key), so that proxies that arrived
/// as task arguments, or were copied into a forked child, share one set of connections.
class ManagerRegistry {
 public:
  static ManagerRegistry& instance() {
    static ManagerRegistry* registry = [] {
      auto* r = new ManagerRegistry;  // never destroyed: proxies may outlive static teardown
      // Held across every fork, so that no child is born with it locked by a thread it lacks.
      ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                       [] { instance().mutex_.unlock(); });
      return r;
    }();
    return *registry;
  }

  /// This process's endpoint for the manager at `address` with `key`, made on first use.
  std::shared_ptr<ManagerEndpoint> get(const std::string& address, const ManagerKey& key) {
    std::lock_guard lock(mutex_);
    forget_parent_entries();
    auto& slot = map_[map_key(address, key)];
    if (!slot) slot = std::make_shared<ManagerEndpoint>(address, key);
    return slot;
  }

  /// Registers the endpoint a Manager made, so that decoded proxies of it find it.
  void add(const std::shared_ptr<ManagerEndpoint>& ep) {
    std::lock_guard lock(mutex_);
    forget_parent_entries();
    map_[map_key(ep->address(), ep->key())] = ep;
  }

  void remove(const ManagerEndpoint& ep) noexcept {
    std::lock_guard lock(mutex_);
    if (pid_ != ::getpid()) return;
    try {
      map_.erase(map_key(ep.address(), ep.key()));
    } catch (...) {
    }
  }

 private:
  ManagerRegistry() = default;

  static std::string map_key(const std::string& address, const ManagerKey& key) {
    std::string k = address;
    k.push_back('\0');
    k.append(reinterpret_cast<const char*>(key.data()), key.size());
    return k;
  }

  // After a fork the entries are the parent's; the endpoints never touch their connections in
  // this process, so dropping them is safe.
  void forget_parent_entries() {
    if (pid_ == ::getpid()) return;
    map_.clear();
    pid_ = ::getpid();
  }

  std::mutex mutex_;
  pid_t pid_ = ::getpid();
  std::unordered_map<std::string, std::shared_ptr<ManagerEndpoint>> map_;
};

}  // namespace procpool::detail
