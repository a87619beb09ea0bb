#pragma once
// Test support for manager_test.cpp: a client that speaks the Manager's protocol by hand, so that
// tests can send what no proxy would (wrong answers, garbage, half requests), and a look at which
// sockets a process holds.

#include <dirent.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <procpool/detail/manager_auth.hpp>
#include <procpool/detail/manager_wire.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace manager_raw {

constexpr int watchdog_ms = 20000;

/// An owned socket.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    reset();
    fd_ = std::exchange(o.fd_, -1);
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

/// A plain connection to the server's socket, nothing said yet.
inline Fd connect(const std::string& path) {
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), std::min(path.size(), sizeof addr.sun_path - 1));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return Fd();
  return fd;
}

inline void send(int fd, const std::vector<std::byte>& bytes) {
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the server hung up on us: what the tests look for next
    sent += static_cast<std::size_t>(n);
  }
}

/// Up to n bytes: fewer only if the server closed, or nothing came for the watchdog's time.
inline std::vector<std::byte> read_exactly(int fd, std::size_t n) {
  std::vector<std::byte> out(n);
  std::size_t got = 0;
  while (got < n) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, watchdog_ms) != 1) break;
    ssize_t r = ::recv(fd, out.data() + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<std::size_t>(r);
  }
  out.resize(got);
  return out;
}

/// True when the server closes the connection (within the watchdog's time). Whatever it sent
/// before closing is read and ignored.
inline bool closed_by_server(int fd) {
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, watchdog_ms) != 1) return false;
    std::byte buf[4096];
    ssize_t r = ::recv(fd, buf, sizeof buf, 0);
    if (r == 0 || (r < 0 && errno == ECONNRESET)) return true;
    if (r < 0 && errno != EINTR) return false;
  }
}

/// A connection that answered the challenge with the manager's key; empty if refused.
inline Fd authenticated(const std::string& path, const procpool::detail::ManagerKey& key) {
  Fd fd = connect(path);
  auto challenge = read_exactly(fd.get(), procpool::detail::manager_challenge_size);
  if (challenge.size() != procpool::detail::manager_challenge_size) return Fd();
  auto answer = procpool::detail::manager_answer(key, challenge);
  send(fd.get(), std::vector<std::byte>(answer.begin(), answer.end()));
  auto verdict = read_exactly(fd.get(), 1);
  if (verdict.size() != 1 || verdict[0] != std::byte{1}) return Fd();
  return fd;
}

/// A whole request message: u64 length | u8 op | u64 object id | args.
inline std::vector<std::byte> request(procpool::detail::ManagerOp op, std::uint64_t id,
                                      const std::vector<std::byte>& args) {
  std::uint64_t len = 1 + sizeof id + args.size();
  std::vector<std::byte> msg(sizeof len + len);
  std::memcpy(msg.data(), &len, sizeof len);
  msg[sizeof len] = static_cast<std::byte>(op);
  std::memcpy(msg.data() + sizeof len + 1, &id, sizeof id);
  if (!args.empty()) std::memcpy(msg.data() + sizeof len + 1 + sizeof id, args.data(), args.size());
  return msg;
}

/// A bytes argument: varint length, then the bytes.
inline std::vector<std::byte> bytes_field(const std::vector<std::byte>& bytes) {
  std::vector<std::byte> out;
  std::uint64_t n = bytes.size();
  while (n >= 0x80) {
    out.push_back(static_cast<std::byte>(n | 0x80));
    n >>= 7;
  }
  out.push_back(static_cast<std::byte>(n));
  out.insert(out.end(), bytes.begin(), bytes.end());
  return out;
}

struct Reply {
  int status = -1;  // -1: no reply
  std::vector<std::byte> payload;
};

/// Sends a request and reads its reply.
inline Reply call(int fd, const std::vector<std::byte>& msg) {
  send(fd, msg);
  Reply r;
  auto header = read_exactly(fd, sizeof(std::uint64_t));
  if (header.size() != sizeof(std::uint64_t)) return r;
  std::uint64_t len;
  std::memcpy(&len, header.data(), sizeof len);
  if (len == 0 || len > (1u << 20)) return r;
  auto body = read_exactly(fd, static_cast<std::size_t>(len));
  if (body.size() != len) return r;
  r.status = static_cast<int>(body[0]);
  r.payload.assign(body.begin() + 1, body.end());
  return r;
}

/// The inodes of every Unix-domain socket on the machine (/proc/net/unix).
inline std::set<std::string> unix_socket_inodes() {
  std::set<std::string> out;
  std::ifstream in("/proc/net/unix");
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string f[7];
    for (auto& x : f) fields >> x;
    out.insert(f[6]);  // Num RefCount Protocol Flags Type St Inode [Path]
  }
  return out;
}

/// The inodes of the sockets among a process's descriptors (its /proc/<pid>/fd).
inline std::set<std::string> socket_inodes_of(const std::string& fd_dir) {
  std::set<std::string> out;
  DIR* d = ::opendir(fd_dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    char target[256];
    std::string link = fd_dir + "/" + e->d_name;
    ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    std::string t(target, static_cast<std::size_t>(n));
    if (t.rfind("socket:[", 0) == 0) out.insert(t.substr(8, t.size() - 9));
  }
  ::closedir(d);
  return out;
}

}  // namespace manager_raw
