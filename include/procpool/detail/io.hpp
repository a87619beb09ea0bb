#pragma once
// Whole-buffer socket I/O: partial writes and reads are completed here, EINTR is retried,
// and SIGPIPE is suppressed per call (MSG_NOSIGNAL) so the program's signal dispositions are
// never touched.

#include <sys/socket.h>
#include <sys/uio.h>

#include <cstddef>
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
