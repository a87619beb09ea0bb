#pragma once
// Whole-buffer socket I/O: partial writes and reads are completed here, EINTR is retried,
// and SIGPIPE is suppressed per call (MSG_NOSIGNAL) so the program's signal dispositions are
// never touched.

#include <sys/socket.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstring>
#include <deque>
#include <span>
#include <system_error>

#include "posix.hpp"

namespace procpool::detail {

/// Sends every byte of every buffer, in order, as one stream.
/// @throws std::system_error (EPIPE when the peer is gone).
inline void send_all(int fd, iovec* iov, std::size_t count) {
  while (count > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = count;
    ssize_t n = retry_eintr([&] { return ::sendmsg(fd, &msg, MSG_NOSIGNAL); });
    if (n < 0) throw_errno("sendmsg");
    auto sent = static_cast<std::size_t>(n);
    while (count > 0 && sent >= iov->iov_len) {
      sent -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + sent;
      iov->iov_len -= sent;
    }
  }
}

inline void send_all(int fd, const void* data, std::size_t size) {
  iovec iov{const_cast<void*>(data), size};
  send_all(fd, &iov, 1);
}

/// Most descriptors one message carries (SCM_RIGHTS) on a pool channel; receivers make room
/// for this many.
inline constexpr std::size_t max_fds_per_send = 16;

/// Fills `control` (sized CMSG_SPACE(n * sizeof(int))) with an SCM_RIGHTS message carrying
/// fds[0..n) and points msg at it.
inline void attach_fds(msghdr& msg, void* control, const int* fds, std::size_t n) noexcept {
  msg.msg_control = control;
  msg.msg_controllen = CMSG_SPACE(n * sizeof(int));
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(n * sizeof(int));
  std::memcpy(CMSG_DATA(c), fds, n * sizeof(int));
}

/// Sends every byte of data, with fd attached to the first byte (SCM_RIGHTS).
/// @throws std::system_error (EPIPE when the peer is gone).
inline void send_all_with_fd(int sock, const void* data, std::size_t size, int fd) {
  iovec iov{const_cast<void*>(data), size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  attach_fds(msg, control, &fd, 1);
  ssize_t n = retry_eintr([&] { return ::sendmsg(sock, &msg, MSG_NOSIGNAL); });
  if (n < 0) throw_errno("sendmsg");
  if (static_cast<std::size_t>(n) < size) {
    send_all(sock, static_cast<const std::byte*>(data) + n, size - static_cast<std::size_t>(n));
  }
}

/// recv() that also takes the descriptors that arrive (SCM_RIGHTS), appending them to `fds` in
/// order; the stream's messages name them in the same order. Returns what recv returns.
inline ssize_t recv_with_fds(int sock, void* data, std::size_t size, int flags,
                             std::deque<unique_fd>& fds) {
  iovec iov{data, size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(max_fds_per_send * sizeof(int))];
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n = retry_eintr([&] { return ::recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC); });
  if (n < 0) return n;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  // Descriptors dropped for lack of room would break the pairing of stubs and descriptors.
  if (msg.msg_flags & MSG_CTRUNC) fds.emplace_back(-1);
  return n;
}

/// Reads until `size` bytes arrived or the peer closed. Returns how many arrived: less than
/// `size` only at end of stream. A reset connection counts as end of stream.
/// @throws std::system_error for any other failure.
inline std::size_t recv_upto(int fd, void* data, std::size_t size) {
  auto* p = static_cast<char*>(data);
  std::size_t got = 0;
  while (got < size) {
    ssize_t n = retry_eintr([&] { return ::recv(fd, p + got, size - got, 0); });
    if (n == 0) break;
    if (n < 0) {
      if (errno == ECONNRESET) break;
      throw_errno("recv");
    }
    got += static_cast<std::size_t>(n);
  }
  return got;
}

}  // namespace procpool::detail
