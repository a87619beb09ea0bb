#pragma once
/// @file connection.hpp
/// Pipe() and Connection: a message channel between two processes, as Python's
/// multiprocessing.Pipe. Create the pipe, then start the Process (or Pool) that uses it: the
/// child inherits both ends by fork.
///
/// ```cpp
/// auto [parent_end, child_end] = procpool::Pipe();
/// procpool::Process p([&] { child_end.send(std::string("hello")); });
/// p.start();
/// child_end.close();  // so that recv() sees EOF if the child dies without sending
/// std::cout << parent_end.recv<std::string>() << "\n";
/// p.join();
/// ```
///
/// On the wire each message is an 8-byte length, then that many bytes, over a Unix stream
/// socket: message boundaries are kept, an empty message is a message, and a message of any
/// size goes through. A Connection is not thread-safe: use one from one thread at a time.

#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "detail/io.hpp"
#include "detail/posix.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace procpool {

/// One end of a Pipe (Python's multiprocessing.connection.Connection). Move-only; closes its
/// descriptor when destroyed.
class Connection {
 public:
  /// A closed connection.
  Connection() noexcept = default;
  /// Takes ownership of a connected stream socket.
  Connection(detail::unique_fd fd, bool readable, bool writable) noexcept
      : fd_(std::move(fd)), readable_(readable), writable_(writable) {}

  /// Takes over another connection's socket; that one is left closed.
  Connection(Connection&&) noexcept = default;
  /// Closes this connection's socket and takes over another's; that one is left closed.
  Connection& operator=(Connection&&) noexcept = default;

  /// Sends one message holding `obj`: the same as send_bytes(encode(obj)).
  /// Blocks while the socket buffer is full.
  /// @throws std::logic_error if closed or receive-only; std::system_error (EPIPE) if the peer
  /// is gone; whatever a user serialize() throws (then nothing was sent).
  template <class T>
  void send(const T& obj) {
    detail::require_serializable<T>();
    check_writable();
    std::size_t frame = detail::fingerprint_size + detail::encoded_payload_size(obj);
    std::vector<std::byte> buf(sizeof(std::uint64_t) + frame);
    std::uint64_t len = frame;
    std::memcpy(buf.data(), &len, sizeof len);
    detail::encode_frame_into(obj, buf.data() + sizeof len);
    detail::send_all(fd_.get(), buf.data(), buf.size());
  }

  /// Receives one message and decodes it as a T: decode<T>(recv_bytes()).
  /// Blocks until a whole message arrived.
  /// @throws EOFError if the peer closed and nothing is left; ProtocolError if the message
  /// holds another type or is corrupt (the message is consumed either way).
  template <class T>
  T recv() {
    std::vector<std::byte> frame = recv_bytes();
    return decode<T>(frame);
  }

  /// Sends `data` as one message (empty is allowed).
  /// @throws std::logic_error if closed or receive-only; std::system_error (EPIPE) if the peer
  /// is gone.
  void send_bytes(std::span<const std::byte> data) {
    check_writable();
    std::uint64_t len = data.size();
    iovec iov[2] = {{&len, sizeof len}, {const_cast<std::byte*>(data.data()), data.size()}};
    detail::send_all(fd_.get(), iov, data.empty() ? 1 : 2);
  }

  /// Receives one whole message.
  /// @throws EOFError if the peer closed and nothing is left; ProtocolError if the message is
  /// longer than `maxlength` (it is consumed) or the peer closed in the middle of one.
  std::vector<std::byte> recv_bytes(std::size_t maxlength = SIZE_MAX) {
    std::uint64_t len = read_header();
    if (len > maxlength) {
      discard(len);
      throw ProtocolError("procpool: message of " + std::to_string(len) +
                          " bytes is longer than maxlength " + std::to_string(maxlength));
    }
    return read_body(len);
  }

  /// Receives one message into `buffer` and returns its size.
  /// @throws BufferTooShortError (holding the whole message, which is consumed) if it does not
  /// fit; EOFError, ProtocolError as recv_bytes().
  std::size_t recv_bytes_into(std::span<std::byte> buffer) {
    std::uint64_t len = read_header();
    if (len > buffer.size()) {
      std::vector<std::byte> whole = read_body(len);
      throw BufferTooShortError(std::move(whole),
                                "procpool: message of " + std::to_string(len) +
                                    " bytes does not fit a buffer of " +
                                    std::to_string(buffer.size()));
    }
    read_exact(buffer.data(), static_cast<std::size_t>(len));
    return static_cast<std::size_t>(len);
  }

  /// Receives one message into `buffer` starting at byte `offset` (Python's
  /// recv_bytes_into(buffer, offset)) and returns the message's size.
  /// @throws std::out_of_range if offset > buffer.size(); otherwise as recv_bytes_into(buffer).
  std::size_t recv_bytes_into(std::span<std::byte> buffer, std::size_t offset) {
    check_readable();
    if (offset > buffer.size()) throw std::out_of_range("procpool: offset past the buffer");
    return recv_bytes_into(buffer.subspan(offset));
  }

  /// Whether a message (or end of stream) can be received without blocking, waiting up to
  /// `timeout` for one. A negative timeout means zero.
  /// @throws std::logic_error if closed or send-only.
  template <class Rep = std::int64_t, class Period = std::milli>
  bool poll(std::chrono::duration<Rep, Period> timeout = {}) {
    check_readable();
    return detail::wait_readable(fd_.get(), detail::Deadline::after(timeout));
  }

  /// Closes this end. Further calls on it throw std::logic_error; closing twice is harmless.
  void close() noexcept { fd_.reset(); }
  /// Whether close() was called (or the connection was moved from).
  bool closed() const noexcept { return !fd_; }
  /// The socket's file descriptor, for use with poll/epoll.
  /// @throws std::logic_error if closed.
  int fileno() const {
    check_open();
    return fd_.get();
  }
  /// Whether this end may receive.
  bool readable() const noexcept { return readable_; }
  /// Whether this end may send.
  bool writable() const noexcept { return writable_; }

 private:
  void check_open() const {
    if (!fd_) throw std::logic_error("procpool: the connection is closed");
  }
  void check_readable() const {
    check_open();
    if (!readable_) throw std::logic_error("procpool: the connection is send-only");
  }
  void check_writable() const {
    check_open();
    if (!writable_) throw std::logic_error("procpool: the connection is receive-only");
  }

  std::uint64_t read_header() {
    check_readable();
    std::uint64_t len = 0;
    std::size_t got = detail::recv_upto(fd_.get(), &len, sizeof len);
    if (got == 0) throw EOFError("procpool: the other end of the connection is closed");
    if (got < sizeof len) {
      throw ProtocolError("procpool: truncated message: the peer closed inside a header");
    }
    return len;
  }

  void read_exact(std::byte* out, std::size_t len) {
    if (detail::recv_upto(fd_.get(), out, len) < len) {
      throw ProtocolError("procpool: truncated message: the peer closed after part of a " +
                          std::to_string(len) + "-byte message");
    }
  }

  // The buffer grows with the bytes that actually arrive, so a corrupt length field can make
  // the receiver wait, but never allocate what the sender did not send.
  std::vector<std::byte> read_body(std::uint64_t len) {
    constexpr std::size_t first_chunk = std::size_t{1} << 20;
    std::vector<std::byte> out;
    std::size_t got = 0;
    while (got < len) {
      std::uint64_t want = std::min<std::uint64_t>(len, std::max(first_chunk, got * 2));
      out.resize(static_cast<std::size_t>(want));
      read_exact(out.data() + got, out.size() - got);
      got = out.size();
    }
    return out;
  }

  void discard(std::uint64_t len) {
    std::byte sink[65536];
    while (len > 0) {
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(len, sizeof sink));
      read_exact(sink, n);
      len -= n;
    }
  }

  detail::unique_fd fd_;
  bool readable_ = false;
  bool writable_ = false;
};

/// Creates a connected pair of Connections, as Python's `a, b = Pipe()` (in C++,
/// `auto [a, b] = procpool::Pipe();`). With duplex (the default) both ends send and receive;
/// with duplex = false the first end only receives and the second only sends.
/// Both descriptors are close-on-exec (a fork inherits them, an exec'd program does not).
/// @throws std::system_error if socketpair() fails.
inline std::pair<Connection, Connection> Pipe(bool duplex = true) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    detail::throw_errno("socketpair");
  }
  detail::unique_fd a(fds[0]), b(fds[1]);
  if (!duplex) {
    // Shutting the unused directions makes a wrong-way use by another process fail too.
    ::shutdown(a.get(), SHUT_WR);
    ::shutdown(b.get(), SHUT_RD);
  }
  return {Connection(std::move(a), true, duplex), Connection(std::move(b), duplex, true)};
}

}  // namespace procpool
