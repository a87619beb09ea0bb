#include <procpool/connection.hpp>

#include <catch2/catch.hpp>

#include "support/interrupt.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>
#include "support/children.hpp"

using test_support::no_child_processes;

// Every test here uses real processes (fork) and real sockets. Children run plain code, never
// Catch assertions: they report through their exit status, which the parent checks. Nothing
// sleeps to let things happen: children and parent wait on each other's messages, and timeouts
// are only watchdogs.

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

std::vector<std::byte> to_bytes(std::string_view s) {
  std::vector<std::byte> out(s.size());
  if (!s.empty()) std::memcpy(out.data(), s.data(), s.size());
  return out;
}

std::string to_string(std::span<const std::byte> b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

// A byte pattern that differs with the position and the seed, so a message that is cut,
// merged, reordered or shifted does not match. Made and checked a 64-bit word at a time, so
// that 256 MiB stay quick in an unoptimized, sanitized build.
std::uint64_t pattern_word(std::size_t k, unsigned seed) {
  std::uint64_t x = (k + 1) * 0x9E3779B97F4A7C15ull ^ (seed + 1) * 0xBF58476D1CE4E5B9ull;
  return x ^ (x >> 29);
}

void fill_pattern(std::byte* out, std::size_t size, unsigned seed) {
  std::size_t k = 0;
  for (; (k + 1) * 8 <= size; ++k) {
    std::uint64_t w = pattern_word(k, seed);
    std::memcpy(out + k * 8, &w, 8);
  }
  if (size > k * 8) {  // a partial last word (never memcpy with a null empty buffer)
    std::uint64_t w = pattern_word(k, seed);
    std::memcpy(out + k * 8, &w, size - k * 8);
  }
}

std::vector<std::byte> pattern(std::size_t size, unsigned seed) {
  std::vector<std::byte> out(size);
  fill_pattern(out.data(), size, seed);
  return out;
}

bool matches_pattern(std::span<const std::byte> data, unsigned seed) {
  std::size_t k = 0;
  for (; (k + 1) * 8 <= data.size(); ++k) {
    std::uint64_t got;
    std::memcpy(&got, data.data() + k * 8, 8);
    if (got != pattern_word(k, seed)) return false;
  }
  if (data.size() == k * 8) return true;
  std::uint64_t w = pattern_word(k, seed);
  return std::memcmp(data.data() + k * 8, &w, data.size() - k * 8) == 0;
}

// The exit status of a wait status, or 1000 + N for a child killed by signal N.
int status_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 1000 + WTERMSIG(status);
  return 2000;
}

// A forked child running `body`; body's return value is the child's exit status (101 if it
// threw). The child always leaves with _exit, so it never runs the test runner's handlers.
class Child {
 public:
  template <class F>
  explicit Child(F body) {
    std::fflush(nullptr);
    pid_ = ::fork();
    if (pid_ < 0) throw std::system_error(errno, std::generic_category(), "fork");
    if (pid_ == 0) {
      int code = 100;
      try {
        code = body();
      } catch (...) {
        code = 101;
      }
      ::_exit(code);
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      reap();
    }
  }

  pid_t pid() const { return pid_; }

  /// Waits (at most `watchdog`) for the child to exit, reaps it and returns status_code().
  int join(std::chrono::seconds watchdog = 30s) {
    int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    bool exited = true;
    if (pidfd >= 0) {
      pollfd p{pidfd, POLLIN, 0};
      int r;
      do {
        r = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(watchdog).count()));
      } while (r < 0 && errno == EINTR);
      ::close(pidfd);
      exited = r > 0;
      if (!exited) ::kill(pid_, SIGKILL);
    }
    int status = reap();
    if (!exited) FAIL("watchdog: the child did not exit in time");
    return status_code(status);
  }

 private:
  int reap() {
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
    return status;
  }

  pid_t pid_ = -1;
};


using namespace test_support;  // wait_until_sleeping, InterruptingSignal

struct Point {
  int x = 0;
  std::string label;
  std::vector<double> values;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(x, label, values);
  }
  bool operator==(const Point&) const = default;
};

// Writes raw bytes to a socket (used to forge broken frames).
void write_raw(int fd, const void* data, std::size_t size) {
  REQUIRE(::send(fd, data, size, MSG_NOSIGNAL) == static_cast<ssize_t>(size));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Typed messages

TEST_CASE("connection: send and recv carry typed values within one process") {
  auto [a, b] = procpool::Pipe();
  a.send(42);
  a.send(std::string("hello"));
  a.send(std::vector<int>{1, 2, 3});
  a.send(std::tuple<int, std::string, double>{7, "seven", 7.5});
  a.send(Point{3, "p", {1.5, 2.5}});
  a.send(std::map<std::string, int>{{"a", 1}, {"b", 2}});
  a.send(std::optional<int>{});

  CHECK(b.recv<int>() == 42);
  CHECK(b.recv<std::string>() == "hello");
  CHECK(b.recv<std::vector<int>>() == std::vector<int>{1, 2, 3});
  CHECK(b.recv<std::tuple<int, std::string, double>>() ==
        std::tuple<int, std::string, double>{7, "seven", 7.5});
  CHECK(b.recv<Point>() == Point{3, "p", {1.5, 2.5}});
  CHECK(b.recv<std::map<std::string, int>>() == std::map<std::string, int>{{"a", 1}, {"b", 2}});
  CHECK_FALSE(b.recv<std::optional<int>>().has_value());
  CHECK_FALSE(b.poll());
}

TEST_CASE("connection: typed messages go to a child and come back") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    Child child([&] {
      parent_end.close();
      for (;;) {
        Point p;
        try {
          p = child_end.recv<Point>();
        } catch (const procpool::EOFError&) {
          return 0;
        }
        p.x *= 2;
        p.label += "!";
        p.values.push_back(static_cast<double>(p.values.size()));
        child_end.send(p);
      }
    });
    child_end.close();

    for (int i = 0; i < 20; ++i) {
      Point p{i, std::string(static_cast<std::size_t>(i), 'x'), std::vector<double>(i, 0.5)};
      parent_end.send(p);
      Point back = parent_end.recv<Point>();
      CHECK(back.x == 2 * i);
      CHECK(back.label == p.label + "!");
      REQUIRE(back.values.size() == static_cast<std::size_t>(i + 1));
      CHECK(back.values.back() == static_cast<double>(i));
    }
    parent_end.close();  // the child sees EOF and ends
    CHECK(child.join() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: send is send_bytes of encode and recv is decode of recv_bytes") {
  auto [a, b] = procpool::Pipe();
  a.send(std::string("typed"));
  CHECK(b.recv_bytes() == procpool::encode(std::string("typed")));

  a.send_bytes(procpool::encode(std::vector<int>{4, 5}));
  CHECK(b.recv<std::vector<int>>() == std::vector<int>{4, 5});
}

TEST_CASE("connection: recv of another type throws ProtocolError and consumes the message") {
  auto [a, b] = procpool::Pipe();

  a.send(std::int32_t{-1});
  a.send(std::int32_t{5});
  CHECK_THROWS_AS(b.recv<std::uint32_t>(), procpool::ProtocolError);
  CHECK(b.recv<std::int32_t>() == 5);

  a.send(std::tuple<int, int>{1, 2});
  a.send(std::pair<int, int>{3, 4});
  using IntPair = std::pair<int, int>;
  CHECK_THROWS_AS(b.recv<IntPair>(), procpool::ProtocolError);
  CHECK(b.recv<IntPair>() == IntPair{3, 4});

  a.send(std::string("text"));
  a.send(std::string("after"));
  CHECK_THROWS_AS(b.recv<std::vector<char>>(), procpool::ProtocolError);
  CHECK(b.recv<std::string>() == "after");

  // Raw bytes that are no frame at all, and an empty message.
  a.send_bytes(to_bytes("garbage!garbage!"));
  a.send_bytes({});
  a.send(1.5);
  CHECK_THROWS_AS(b.recv<double>(), procpool::ProtocolError);
  CHECK_THROWS_AS(b.recv<double>(), procpool::ProtocolError);
  CHECK(b.recv<double>() == 1.5);
  CHECK_FALSE(b.poll());
}

// ---------------------------------------------------------------------------------------------
// Message boundaries and sizes

TEST_CASE("connection: an empty message is a message") {
  auto [a, b] = procpool::Pipe();
  a.send_bytes({});
  a.send_bytes({});
  a.send_bytes(to_bytes("x"));
  a.send_bytes({});

  CHECK(b.poll());
  CHECK(b.recv_bytes().empty());
  std::byte buf[4];
  CHECK(b.recv_bytes_into(buf) == 0);
  CHECK(to_string(b.recv_bytes()) == "x");
  CHECK(b.recv_bytes(0).empty());  // an empty message fits a maxlength of 0
  CHECK_FALSE(b.poll());
}

TEST_CASE("connection: messages sent by a child never merge or split") {
  // Sizes around the header size, page size and socket buffer size, empty ones between, and a
  // long run of small ones sent back to back.
  std::vector<std::size_t> sizes = {0,     1,      7,      8, 9,       0, 4095, 4096,          4097,
                                    65536, 212992, 212993, 0, 1 << 20, 3, 0,    (3 << 20) + 5, 17};
  for (std::size_t i = 0; i < 500; ++i) sizes.push_back(i % 23);

  {
    auto [parent_end, child_end] = procpool::Pipe();
    Child child([&] {
      parent_end.close();
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        child_end.send_bytes(pattern(sizes[i], static_cast<unsigned>(i)));
      }
      return 0;
    });
    child_end.close();

    std::vector<std::byte> into((3 << 20) + 5);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      INFO("message " << i << " of " << sizes[i] << " bytes");
      if (i % 2 == 0) {
        std::vector<std::byte> m = parent_end.recv_bytes();
        REQUIRE(m.size() == sizes[i]);
        REQUIRE(matches_pattern(m, static_cast<unsigned>(i)));
      } else {
        std::size_t n = parent_end.recv_bytes_into(into);
        REQUIRE(n == sizes[i]);
        REQUIRE(matches_pattern(std::span(into).first(n), static_cast<unsigned>(i)));
      }
    }
    CHECK_THROWS_AS(parent_end.recv_bytes(), procpool::EOFError);
    CHECK(child.join() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: a 256 MiB message goes through") {
  constexpr std::size_t size = std::size_t{256} << 20;
  SECTION("raw bytes from a child") {
    {
      auto [parent_end, child_end] = procpool::Pipe();
      Child child([&] {
        parent_end.close();
        child_end.send_bytes(pattern(size, 256));
        child_end.send_bytes(to_bytes("next"));
        return 0;
      });
      child_end.close();
      std::vector<std::byte> m = parent_end.recv_bytes();
      REQUIRE(m.size() == size);
      CHECK(matches_pattern(m, 256));
      CHECK(to_string(parent_end.recv_bytes()) == "next");
      CHECK(child.join() == 0);
    }
    CHECK(no_child_processes());
  }
  SECTION("a typed value to a child") {
    {
      std::string big(size, '\0');
      fill_pattern(reinterpret_cast<std::byte*>(big.data()), size, 7);
      auto [parent_end, child_end] = procpool::Pipe();
      Child child([&] {
        parent_end.close();
        std::string got = child_end.recv<std::string>();
        if (got.size() != size) return 1;
        if (!matches_pattern(std::as_bytes(std::span(got)), 7)) return 2;
        child_end.send(got.size());
        return 0;
      });
      child_end.close();
      parent_end.send(big);
      CHECK(parent_end.recv<std::size_t>() == size);
      CHECK(child.join() == 0);
    }
    CHECK(no_child_processes());
  }
}

TEST_CASE("connection: large messages go both ways over one duplex pipe") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    Child child([&] {  // echoes every message until EOF
      parent_end.close();
      for (;;) {
        std::vector<std::byte> m;
        try {
          m = child_end.recv_bytes();
        } catch (const procpool::EOFError&) {
          return 0;
        }
        child_end.send_bytes(m);
      }
    });
    child_end.close();

    std::vector<std::size_t> sizes = {1 << 20, 0, (16 << 20) + 1, 5, 4 << 20, 212993};
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      INFO("round " << i << " of " << sizes[i] << " bytes");
      parent_end.send_bytes(pattern(sizes[i], static_cast<unsigned>(i + 1000)));
      std::vector<std::byte> back = parent_end.recv_bytes();
      REQUIRE(back.size() == sizes[i]);
      REQUIRE(matches_pattern(back, static_cast<unsigned>(i + 1000)));
    }
    parent_end.close();
    CHECK(child.join() == 0);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// End of stream

TEST_CASE("connection: recv when the peer has closed and nothing is left throws EOFError") {
  auto [a, b] = procpool::Pipe();
  a.send(1);
  a.send_bytes(to_bytes("two"));
  a.close();
  CHECK(b.recv<int>() == 1);
  CHECK(to_string(b.recv_bytes()) == "two");
  CHECK_THROWS_AS(b.recv<int>(), procpool::EOFError);
  CHECK_THROWS_AS(b.recv_bytes(), procpool::EOFError);
  std::byte buf[8];
  CHECK_THROWS_AS(b.recv_bytes_into(buf), procpool::EOFError);
  CHECK_THROWS_AS(b.recv_bytes_into(buf, 2), procpool::EOFError);
  CHECK(b.poll());  // end of stream is "ready": recv would not block
}

TEST_CASE("connection: EOF arrives once the peer process has exited") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    Child child([&] {
      parent_end.close();
      child_end.send(std::string("first"));
      child_end.send(std::string("last"));
      return 0;
    });
    child_end.close();  // the child now holds the only other end
    CHECK(parent_end.recv<std::string>() == "first");
    CHECK(parent_end.recv<std::string>() == "last");
    CHECK_THROWS_AS(parent_end.recv<std::string>(), procpool::EOFError);
    CHECK(child.join() == 0);
    CHECK_THROWS_AS(parent_end.recv<std::string>(), procpool::EOFError);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: EOF is reported even when the exited peer left unread data behind") {
  // A socket closed with unread data resets the connection (ECONNRESET), which must read as
  // end of stream once the messages that did arrive are received.
  {
    auto [parent_end, child_end] = procpool::Pipe();
    auto [go_in, go_out] = procpool::Pipe(false);  // the child receives, the parent sends
    Child child([&] {
      parent_end.close();
      // Waits until the parent has sent what this child leaves unread.
      if (go_in.recv<std::string>() != "go") return 1;
      child_end.send(std::string("bye"));
      return 0;
    });
    child_end.close();
    for (int i = 0; i < 10; ++i) parent_end.send(std::string(100, 'u'));  // never read
    go_out.send(std::string("go"));
    CHECK(child.join() == 0);
    CHECK(parent_end.poll());
    CHECK(parent_end.recv<std::string>() == "bye");
    CHECK_THROWS_AS(parent_end.recv<std::string>(), procpool::EOFError);
    CHECK_THROWS_AS(parent_end.recv_bytes(), procpool::EOFError);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: a peer that closes inside a message gives ProtocolError") {
  SECTION("inside the header") {
    auto [a, b] = procpool::Pipe();
    write_raw(a.fileno(), "\x05\x00\x00", 3);
    a.close();
    CHECK_THROWS_AS(b.recv_bytes(), procpool::ProtocolError);
  }
  SECTION("inside the body") {
    auto [a, b] = procpool::Pipe();
    std::uint64_t len = 100;
    write_raw(a.fileno(), &len, sizeof len);
    write_raw(a.fileno(), "0123456789", 10);
    a.close();
    CHECK_THROWS_AS(b.recv_bytes(), procpool::ProtocolError);
  }
  SECTION("inside the body with recv<T>") {
    auto [a, b] = procpool::Pipe();
    std::vector<std::byte> frame = procpool::encode(std::string(50, 's'));
    std::uint64_t len = frame.size();
    write_raw(a.fileno(), &len, sizeof len);
    write_raw(a.fileno(), frame.data(), frame.size() - 1);
    a.close();
    CHECK_THROWS_AS(b.recv<std::string>(), procpool::ProtocolError);
  }
  SECTION("inside the body with recv_bytes_into") {
    auto [a, b] = procpool::Pipe();
    std::uint64_t len = 8;
    write_raw(a.fileno(), &len, sizeof len);
    write_raw(a.fileno(), "0123", 4);
    a.close();
    std::byte buf[16];
    CHECK_THROWS_AS(b.recv_bytes_into(buf), procpool::ProtocolError);
  }
}

TEST_CASE("connection: a huge length field never allocates what was not sent") {
  // 2^62 bytes announced, 16 sent: the receiver must fail with ProtocolError (truncated), not
  // bad_alloc, whichever receive call it uses.
  auto forge = [](procpool::Connection& a) {
    std::uint64_t len = std::uint64_t{1} << 62;
    write_raw(a.fileno(), &len, sizeof len);
    write_raw(a.fileno(), "0123456789abcdef", 16);
    a.close();
  };
  SECTION("recv_bytes") {
    auto [a, b] = procpool::Pipe();
    forge(a);
    CHECK_THROWS_AS(b.recv_bytes(), procpool::ProtocolError);
  }
  SECTION("recv_bytes with a maxlength") {
    auto [a, b] = procpool::Pipe();
    forge(a);
    CHECK_THROWS_AS(b.recv_bytes(1024), procpool::ProtocolError);
  }
  SECTION("recv_bytes_into a small buffer") {
    auto [a, b] = procpool::Pipe();
    forge(a);
    std::byte buf[4];
    CHECK_THROWS_AS(b.recv_bytes_into(buf), procpool::ProtocolError);
  }
  SECTION("recv<T>") {
    auto [a, b] = procpool::Pipe();
    forge(a);
    CHECK_THROWS_AS(b.recv<std::string>(), procpool::ProtocolError);
  }
}

// ---------------------------------------------------------------------------------------------
// maxlength, recv_bytes_into, BufferTooShortError

TEST_CASE("connection: recv_bytes with a maxlength shorter than the message throws ProtocolError") {
  auto [a, b] = procpool::Pipe();
  a.send_bytes(pattern(100, 1));
  a.send_bytes(to_bytes("next"));
  a.send_bytes(pattern(100, 2));
  CHECK_THROWS_AS(b.recv_bytes(99), procpool::ProtocolError);
  CHECK(to_string(b.recv_bytes(4)) == "next");       // the long message was consumed, no more
  std::vector<std::byte> exact = b.recv_bytes(100);  // a maxlength equal to the size fits
  CHECK(exact == pattern(100, 2));
  CHECK_FALSE(b.poll());
}

TEST_CASE("connection: a message over maxlength is consumed even when it is large") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    Child child([&] {
      parent_end.close();
      child_end.send_bytes(pattern((1 << 20) + 3, 3));
      child_end.send_bytes(pattern(777, 4));
      return 0;
    });
    child_end.close();
    CHECK_THROWS_AS(parent_end.recv_bytes(1000), procpool::ProtocolError);
    std::vector<std::byte> next = parent_end.recv_bytes(1000);
    CHECK(next.size() == 777);
    CHECK(matches_pattern(next, 4));
    CHECK(child.join() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: recv_bytes_into writes at an offset and returns the message size") {
  auto [a, b] = procpool::Pipe();
  const std::vector<std::byte> msg = to_bytes("hello world");  // 11 bytes
  constexpr std::byte filler{0xEE};

  for (std::size_t offset : {std::size_t{0}, std::size_t{5}, std::size_t{29}}) {
    INFO("offset " << offset);
    std::vector<std::byte> buffer(40, filler);
    a.send_bytes(msg);
    std::size_t n = offset == 0 ? b.recv_bytes_into(buffer) : b.recv_bytes_into(buffer, offset);
    REQUIRE(n == msg.size());
    for (std::size_t i = 0; i < buffer.size(); ++i) {
      if (i >= offset && i < offset + n) {
        REQUIRE(buffer[i] == msg[i - offset]);
      } else {
        REQUIRE(buffer[i] == filler);
      }
    }
  }

  SECTION("an empty message fits at the very end") {
    std::vector<std::byte> buffer(40, filler);
    a.send_bytes({});
    CHECK(b.recv_bytes_into(buffer, 40) == 0);
    CHECK(buffer == std::vector<std::byte>(40, filler));
  }
  SECTION("an offset past the end throws std::out_of_range and consumes nothing") {
    std::vector<std::byte> buffer(40, filler);
    a.send_bytes(msg);
    CHECK_THROWS_AS(b.recv_bytes_into(buffer, 41), std::out_of_range);
    CHECK(b.recv_bytes() == msg);
  }
  SECTION("a message that does not fit after the offset throws BufferTooShortError") {
    std::vector<std::byte> buffer(40, filler);
    a.send_bytes(msg);
    a.send_bytes(to_bytes("ok"));
    try {
      b.recv_bytes_into(buffer, 30);  // 10 bytes of room for 11
      FAIL("recv_bytes_into did not throw");
    } catch (const procpool::BufferTooShortError& e) {
      CHECK(e.message() == msg);
    }
    CHECK(b.recv_bytes_into(buffer, 30) == 2);
    CHECK(to_string(std::span(buffer).subspan(30, 2)) == "ok");
  }
}

TEST_CASE("connection: BufferTooShortError carries the whole message and consumes it") {
  SECTION("a small message") {
    auto [a, b] = procpool::Pipe();
    a.send_bytes(pattern(100, 5));
    a.send_bytes(to_bytes("after"));
    std::vector<std::byte> buffer(10, std::byte{0x11});
    try {
      b.recv_bytes_into(buffer);
      FAIL("recv_bytes_into did not throw");
    } catch (const procpool::BufferTooShortError& e) {
      CHECK(e.message() == pattern(100, 5));
    }
    // BufferTooShortError is a procpool::Error too.
    a.send_bytes(to_bytes("0123456789A"));
    CHECK(to_string(b.recv_bytes()) == "after");
    CHECK_THROWS_AS(b.recv_bytes_into(buffer), procpool::Error);
    CHECK_FALSE(b.poll());
  }
  SECTION("a message of several MiB from a child") {
    {
      auto [parent_end, child_end] = procpool::Pipe();
      Child child([&] {
        parent_end.close();
        child_end.send_bytes(pattern((3 << 20) + 1, 6));
        child_end.send_bytes(to_bytes("tail"));
        return 0;
      });
      child_end.close();
      std::vector<std::byte> buffer(1024);
      try {
        parent_end.recv_bytes_into(buffer);
        FAIL("recv_bytes_into did not throw");
      } catch (const procpool::BufferTooShortError& e) {
        REQUIRE(e.message().size() == (3 << 20) + 1);
        CHECK(matches_pattern(e.message(), 6));
      }
      CHECK(parent_end.recv_bytes_into(buffer) == 4);
      CHECK(to_string(std::span(buffer).first(4)) == "tail");
      CHECK(child.join() == 0);
    }
    CHECK(no_child_processes());
  }
}

// ---------------------------------------------------------------------------------------------
// poll

TEST_CASE("connection: poll is false on an empty pipe with a zero and a 50 ms timeout") {
  auto [a, b] = procpool::Pipe();
  CHECK_FALSE(b.poll());
  CHECK_FALSE(b.poll(0ms));
  CHECK_FALSE(b.poll(std::chrono::seconds(0)));
  auto start = Clock::now();
  CHECK_FALSE(b.poll(50ms));
  CHECK(Clock::now() - start >= 45ms);  // it did wait, about as long as asked
  CHECK_FALSE(b.poll(std::chrono::duration<double>(0.01)));
  CHECK_FALSE(a.poll());  // nothing was sent the other way either
}

TEST_CASE("connection: poll is true when a message is waiting and does not consume it") {
  auto [a, b] = procpool::Pipe();
  a.send(std::string("m"));
  CHECK(b.poll());
  CHECK(b.poll(0ms));
  CHECK(b.poll(10s));  // returns at once
  CHECK(b.recv<std::string>() == "m");
  CHECK_FALSE(b.poll());
}

TEST_CASE("connection: poll is true at end of stream") {
  auto [a, b] = procpool::Pipe();
  a.close();
  CHECK(b.poll());
  CHECK(b.poll(10s));
  CHECK_THROWS_AS(b.recv_bytes(), procpool::EOFError);
}

TEST_CASE("connection: a negative poll timeout means zero") {
  auto [a, b] = procpool::Pipe();
  auto start = Clock::now();
  CHECK_FALSE(b.poll(-1s));
  CHECK_FALSE(b.poll(std::chrono::milliseconds(-5)));
  CHECK(Clock::now() - start < 5s);  // watchdog: it did not wait
  a.send(1);
  CHECK(b.poll(-1ms));
}

TEST_CASE("connection: poll waits for a message a child sends later") {
  {
    auto [parent_end, child_end] = procpool::Pipe();
    Child child([&] {
      parent_end.close();
      if (child_end.recv<std::string>() != "go") return 1;
      child_end.send(std::string("done"));
      return 0;
    });
    child_end.close();
    CHECK_FALSE(parent_end.poll());
    parent_end.send(std::string("go"));
    REQUIRE(parent_end.poll(20s));  // a watchdog, not a delay
    CHECK(parent_end.recv<std::string>() == "done");
    CHECK(child.join() == 0);
    CHECK(parent_end.poll());  // the child has exited: EOF
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// close, closed, fileno, moves

TEST_CASE("connection: every call on a closed connection throws std::logic_error") {
  auto [a, b] = procpool::Pipe();
  CHECK_FALSE(a.closed());
  a.close();
  CHECK(a.closed());
  a.close();  // closing twice is harmless
  CHECK(a.closed());

  procpool::Connection never_opened;
  for (procpool::Connection* c : {&a, &never_opened}) {
    std::byte buf[4];
    CHECK(c->closed());
    CHECK_THROWS_AS(c->send(1), std::logic_error);
    CHECK_THROWS_AS(c->send_bytes(to_bytes("x")), std::logic_error);
    CHECK_THROWS_AS(c->send_bytes({}), std::logic_error);
    CHECK_THROWS_AS(c->recv<int>(), std::logic_error);
    CHECK_THROWS_AS(c->recv_bytes(), std::logic_error);
    CHECK_THROWS_AS(c->recv_bytes_into(buf), std::logic_error);
    CHECK_THROWS_AS(c->recv_bytes_into(buf, 1), std::logic_error);
    CHECK_THROWS_AS(c->poll(), std::logic_error);
    CHECK_THROWS_AS(c->poll(1s), std::logic_error);
    CHECK_THROWS_AS(c->fileno(), std::logic_error);
  }
  // The other end sees the close as end of stream.
  CHECK_THROWS_AS(b.recv_bytes(), procpool::EOFError);
}

TEST_CASE("connection: a moved-from connection is closed and the moved-to one works") {
  auto [a, b] = procpool::Pipe();
  procpool::Connection moved(std::move(a));
  CHECK(a.closed());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  CHECK_FALSE(moved.closed());
  moved.send(5);
  CHECK(b.recv<int>() == 5);

  procpool::Connection assigned;
  assigned = std::move(moved);
  CHECK(moved.closed());  // NOLINT(bugprone-use-after-move)
  assigned.send(6);
  CHECK(b.recv<int>() == 6);
}

TEST_CASE("connection: fileno is an open close-on-exec socket usable with poll") {
  auto [a, b] = procpool::Pipe();
  int fa = a.fileno(), fb = b.fileno();
  CHECK(fa >= 0);
  CHECK(fb >= 0);
  CHECK(fa != fb);
  struct stat st {};
  REQUIRE(::fstat(fb, &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((::fcntl(fa, F_GETFD) & FD_CLOEXEC) != 0);
  CHECK((::fcntl(fb, F_GETFD) & FD_CLOEXEC) != 0);

  pollfd p{fb, POLLIN, 0};
  CHECK(::poll(&p, 1, 0) == 0);
  a.send_bytes(to_bytes("ready"));
  CHECK(::poll(&p, 1, 0) == 1);
  CHECK((p.revents & POLLIN) != 0);
  CHECK(to_string(b.recv_bytes()) == "ready");
}

// ---------------------------------------------------------------------------------------------
// Directions

TEST_CASE("connection: Pipe(false) receives on the first end and sends on the second") {
  auto [r, w] = procpool::Pipe(false);
  CHECK(r.readable());
  CHECK_FALSE(r.writable());
  CHECK_FALSE(w.readable());
  CHECK(w.writable());

  w.send(std::string("one way"));
  w.send_bytes(to_bytes("bytes"));
  CHECK(r.recv<std::string>() == "one way");
  CHECK(to_string(r.recv_bytes()) == "bytes");

  std::byte buf[8];
  CHECK_THROWS_AS(r.send(1), std::logic_error);
  CHECK_THROWS_AS(r.send_bytes(to_bytes("x")), std::logic_error);
  CHECK_THROWS_AS(w.recv<int>(), std::logic_error);
  CHECK_THROWS_AS(w.recv_bytes(), std::logic_error);
  CHECK_THROWS_AS(w.recv_bytes_into(buf), std::logic_error);
  CHECK_THROWS_AS(w.poll(), std::logic_error);
  CHECK_FALSE(r.poll());  // the failed calls sent nothing

  // Not only the wrapper refuses: the socket itself cannot send from the receiving end.
  errno = 0;
  CHECK(::send(r.fileno(), "x", 1, MSG_NOSIGNAL) == -1);
  CHECK(errno == EPIPE);
}

TEST_CASE("connection: Pipe() is duplex by default") {
  auto [a, b] = procpool::Pipe();
  CHECK(a.readable());
  CHECK(a.writable());
  CHECK(b.readable());
  CHECK(b.writable());
  a.send(1);
  b.send(2);
  CHECK(b.recv<int>() == 1);
  CHECK(a.recv<int>() == 2);
}

// ---------------------------------------------------------------------------------------------
// Dead peers and signals

TEST_CASE("connection: writing to a dead peer throws and never raises SIGPIPE") {
  // Run in a helper process whose SIGPIPE disposition is the default (the test runner may have
  // inherited SIG_IGN): if procpool let SIGPIPE through, the helper would die of it.
  auto is_broken_pipe_error = [](auto&& send) {
    try {
      send();
      return false;
    } catch (const procpool::EOFError&) {
      return true;
    } catch (const std::system_error& e) {
      return e.code() == std::errc::broken_pipe;
    }
  };
  {
    Child helper([&] {
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      sigemptyset(&dfl.sa_mask);
      if (::sigaction(SIGPIPE, &dfl, nullptr) != 0) return 1;
      sigset_t pipe_only;
      sigemptyset(&pipe_only);
      sigaddset(&pipe_only, SIGPIPE);
      ::sigprocmask(SIG_UNBLOCK, &pipe_only, nullptr);

      // The peer closed in this process.
      auto [a, b] = procpool::Pipe();
      b.close();
      if (!is_broken_pipe_error([&] { a.send_bytes(to_bytes("x")); })) return 2;
      if (!is_broken_pipe_error([&] { a.send(std::string("x")); })) return 3;
      if (!is_broken_pipe_error([&] { a.send_bytes({}); })) return 4;

      // The peer was a process that exited.
      auto [c, d] = procpool::Pipe();
      Child peer([&] { return 0; });
      d.close();
      if (peer.join() != 0) return 5;
      if (!is_broken_pipe_error([&] { c.send(std::vector<int>(1000, 1)); })) return 6;

      // The disposition and the mask were left alone, and no SIGPIPE is pending.
      struct sigaction now {};
      ::sigaction(SIGPIPE, nullptr, &now);
      if (now.sa_handler != SIG_DFL) return 7;
      sigset_t mask, pending;
      ::sigprocmask(SIG_BLOCK, nullptr, &mask);
      if (sigismember(&mask, SIGPIPE)) return 8;
      ::sigpending(&pending);
      if (sigismember(&pending, SIGPIPE)) return 9;
      return 0;
    });
    CHECK(helper.join() == 0);  // 1000 + 13 would mean killed by SIGPIPE
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: sending leaves this process's SIGPIPE disposition unchanged") {
  struct sigaction before {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &before) == 0);
  auto [a, b] = procpool::Pipe();
  b.close();
  bool threw = false;
  try {
    a.send(std::string("nobody listens"));
  } catch (const procpool::EOFError&) {
    threw = true;
  } catch (const std::system_error& e) {
    threw = e.code() == std::errc::broken_pipe;
  }
  CHECK(threw);
  struct sigaction after {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &after) == 0);
  CHECK(after.sa_handler == before.sa_handler);
  CHECK(after.sa_flags == before.sa_flags);
}

TEST_CASE("connection: a peer that exits while a large send is blocked makes the send throw") {
  {
    Child helper([&] {
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      sigemptyset(&dfl.sa_mask);
      ::sigaction(SIGPIPE, &dfl, nullptr);
      auto [a, b] = procpool::Pipe();
      pid_t sender = ::getpid();
      // The peer exits once the sender is blocked on a full socket buffer.
      Child peer([&] {
        a.close();
        return wait_until_sleeping(sender) ? 0 : 1;
      });
      b.close();
      try {
        a.send_bytes(pattern(64 << 20, 9));
        return 10;
      } catch (const procpool::EOFError&) {
      } catch (const std::system_error& e) {
        if (e.code() != std::errc::broken_pipe) return 11;
      }
      return peer.join() == 0 ? 0 : 12;
    });
    CHECK(helper.join() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: a signal handler firing during a blocked recv is not an error") {
  constexpr int signals = 20;
  {
    InterruptingSignal sig;
    auto [parent_end, child_end] = procpool::Pipe();
    pid_t parent = ::getpid();
    Child child([&] {
      parent_end.close();
      if (!sig.interrupt(parent, signals)) return 1;
      child_end.send(std::string("after the signals"));
      return 0;
    });
    child_end.close();
    CHECK(parent_end.recv<std::string>() == "after the signals");
    CHECK(static_cast<int>(g_signals_handled) == signals);
    CHECK(child.join() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: a signal handler firing during a blocked send is not an error") {
  constexpr int signals = 20;
  constexpr std::size_t size = 16 << 20;  // far more than the socket buffers hold
  {
    InterruptingSignal sig;
    auto [parent_end, child_end] = procpool::Pipe();
    pid_t parent = ::getpid();
    Child child([&] {
      parent_end.close();
      if (!sig.interrupt(parent, signals)) return 1;
      std::vector<std::byte> m = child_end.recv_bytes();
      if (m.size() != size || !matches_pattern(m, 11)) return 2;
      if (to_string(child_end.recv_bytes()) != "second") return 3;
      return 0;
    });
    child_end.close();
    parent_end.send_bytes(pattern(size, 11));
    parent_end.send_bytes(to_bytes("second"));
    CHECK(static_cast<int>(g_signals_handled) == signals);
    CHECK(child.join() == 0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("connection: a signal handler firing during a blocked poll does not cut it short") {
  constexpr int signals = 10;
  {
    InterruptingSignal sig;
    auto [parent_end, child_end] = procpool::Pipe();
    pid_t parent = ::getpid();
    Child child([&] {
      parent_end.close();
      if (!sig.interrupt(parent, signals)) return 1;
      child_end.send(7);
      return 0;
    });
    child_end.close();
    REQUIRE(parent_end.poll(30s));  // interrupted poll is resumed, and sees the message
    CHECK(static_cast<int>(g_signals_handled) == signals);
    CHECK(parent_end.recv<int>() == 7);
    CHECK(child.join() == 0);
  }
  CHECK(no_child_processes());
}
