#include <procpool/progress.hpp>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <functional>
#include <future>
#include <initializer_list>
#include <iostream>
#include <ranges>
#include <regex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <procpool/pool.hpp>
#include <procpool/thread_pool.hpp>

#include "support/children.hpp"

using namespace std::chrono_literals;
using procpool::Progress;

namespace {

// What a child process wrote, how it ended, and how long it took from fork to end of output.
struct Captured {
  std::string bytes;
  int status = -1;
  double seconds = 0;
  bool timed_out = false;
};

// Reads `fd` until end of output (0, or EIO: a pty master whose slave is closed everywhere),
// for at most 60 s, then reaps `pid` (killing it first if it is still writing by then).
Captured collect(int fd, pid_t pid, std::chrono::steady_clock::time_point start) {
  Captured c;
  const auto deadline = start + 60s;
  char buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left <= 0ms) {
      c.timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    REQUIRE(r >= 0);
    if (r == 0) continue;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // 0 from a pipe; EIO from a pty master once the slave is gone
    c.bytes.append(buf, static_cast<std::size_t>(n));
  }
  c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  while (::waitpid(pid, &c.status, 0) < 0 && errno == EINTR) {
  }
  ::close(fd);
  return c;
}

// Empties this process's output buffers, which a child would otherwise inherit and write to its
// terminal when a Pool flushes them before forking its workers.
void flush_before_fork() {
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
}

// Runs `body` in a child whose stdin, stdout and stderr are the slave of a new pseudo-terminal
// `columns` wide, and captures what the terminal received. The child exits 0 when body returns
// true, 1 when it returns false, 2 when it throws.
Captured run_in_pty(unsigned short columns, const std::function<bool()>& body) {
  winsize ws{};
  ws.ws_col = columns;
  ws.ws_row = 24;
  int master = -1;
  flush_before_fork();
  auto start = std::chrono::steady_clock::now();
  pid_t pid = ::forkpty(&master, nullptr, nullptr, &ws);
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int code = 2;
    try {
      code = body() ? 0 : 1;
    } catch (...) {
    }
    ::_exit(code);  // not exit(): the test process's atexit handlers and buffers are not ours
  }
  return collect(master, pid, start);
}

// As run_in_pty, with stderr a pipe (and stdout /dev/null) instead of a terminal.
Captured run_with_stderr_pipe(const std::function<bool()>& body) {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  flush_before_fork();
  auto start = std::chrono::steady_clock::now();
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int code = 2;
    int null = ::open("/dev/null", O_WRONLY);
    if (null < 0 || ::dup2(null, 1) < 0 || ::dup2(fds[1], 2) < 0) ::_exit(3);
    try {
      code = body() ? 0 : 1;
    } catch (...) {
    }
    ::_exit(code);
  }
  ::close(fds[1]);  // else the read end never sees end of output
  return collect(fds[0], pid, start);
}

// A terminal screen as a person sees it once the output stopped: `\r` returns to column 0,
// `\n` moves down (the pty turned each into `\r\n`), `\x1b[K` erases to the end of the line,
// a code point takes one column, and a character past the last column wraps to the next line.
// Any other control or escape sequence is recorded in `unexpected`.
struct Screen {
  std::vector<std::vector<std::string>> rows{{}};
  std::size_t row = 0, col = 0;
  std::string unexpected;

  Screen(const std::string& bytes, std::size_t columns) {
    for (std::size_t i = 0; i < bytes.size(); ++i) {
      unsigned char c = static_cast<unsigned char>(bytes[i]);
      if (c == '\r') {
        col = 0;
      } else if (c == '\n') {
        if (++row == rows.size()) rows.emplace_back();
      } else if (c == 0x1b) {
        if (bytes.compare(i, 3, "\x1b[K") == 0) {
          if (rows[row].size() > col) rows[row].resize(col);
          i += 2;
        } else {
          unexpected += bytes.substr(i, 4);
        }
      } else if (c < 0x20) {
        unexpected += static_cast<char>(c);
      } else {
        std::size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        if (col == columns) {  // autowrap
          col = 0;
          if (++row == rows.size()) rows.emplace_back();
        }
        auto& line = rows[row];
        if (line.size() <= col) line.resize(col + 1, " ");
        line[col++] = bytes.substr(i, len);
        i += len - 1;
      }
    }
  }

  // The rows as text, without trailing empty rows.
  std::vector<std::string> lines() const {
    std::vector<std::string> out;
    for (const auto& r : rows) {
      std::string s;
      for (const auto& cell : r) s += cell;
      out.push_back(s);
    }
    while (!out.empty() && out.back().empty()) out.pop_back();
    return out;
  }
};

std::size_t count_of(const std::string& haystack, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = haystack.find(needle); at != std::string::npos;
       at = haystack.find(needle, at + needle.size())) {
    ++n;
  }
  return n;
}

std::size_t columns_of(const std::string& s) { return procpool::detail::display_width(s); }

// std::regex sees bytes: write a multi-byte character in a group, as in "(█)+".
bool matches(const std::string& s, const char* re) { return std::regex_match(s, std::regex(re)); }

// The work of one item: it takes a little while, so that a bar has something to show.
int slow_square(int x) {
  std::this_thread::sleep_for(3ms);
  return x * x;
}

// A pool map of 200 slow items with a bar; true when the results are right.
template <class P>
bool squares_with_bar(Progress progress) {
  P pool(2);
  auto v = pool.map(slow_square, std::views::iota(0, 200), std::move(progress));
  for (int i = 0; i < 200; ++i) {
    if (v[static_cast<std::size_t>(i)] != i * i) return false;
  }
  return true;
}

// The screen a `columns`-wide terminal shows after a child that must have succeeded.
Screen screen_of(const Captured& c, std::size_t columns) {
  REQUIRE_FALSE(c.timed_out);
  REQUIRE(WIFEXITED(c.status));
  CHECK(WEXITSTATUS(c.status) == 0);
  Screen screen(c.bytes, columns);
  CHECK(screen.unexpected.empty());
  return screen;
}

// Checks that the terminal shows exactly the lines `expected` (each a regex for one line).
void check_screen(const Captured& c, std::size_t columns,
                  std::initializer_list<const char*> expected) {
  auto lines = screen_of(c, columns).lines();
  INFO(c.bytes);
  REQUIRE(lines.size() == expected.size());
  std::size_t i = 0;
  for (const char* re : expected) CHECK(matches(lines[i++], re));
}

// Checks what a terminal shows after a bar of `done` items finished: one line, the final
// state, output ending with the final newline, and a bounded number of redraws.
void check_final_terminal_line(const Captured& c, std::size_t columns, const std::string& done) {
  Screen screen = screen_of(c, columns);
  auto lines = screen.lines();
  INFO(c.bytes);
  REQUIRE(lines.size() == 1);
  CHECK(matches(
      lines[0],
      ("squares: 100%\\|(█)+\\| " + done + " \\[00:0[0-9]<00:00, [0-9.]+ it/s\\]").c_str()));
  CHECK(columns_of(lines[0]) == columns - 1);  // the bar fills the width, less the last column
  // Nothing after the final newline: the cursor is at the start of the next, empty line.
  CHECK(c.bytes.ends_with("\x1b[K\r\n"));
  CHECK(screen.row == 1);
  CHECK(screen.col == 0);
  std::size_t redraws = count_of(c.bytes, "\x1b[K");
  CHECK(redraws >= 2);  // the initial state and the final one
  CHECK(static_cast<double>(redraws) <= c.seconds * 10 + 3);
}

}  // namespace

TEST_CASE(
    "progress: a Pool map on a terminal leaves one final line with 100 percent and the rate") {
  auto c =
      run_in_pty(100, [] { return squares_with_bar<procpool::Pool>({.description = "squares"}); });
  check_final_terminal_line(c, 100, "200/200");
  CHECK(test_support::no_child_processes());
}

TEST_CASE("progress: a ThreadPool map on a terminal leaves one final line with 100 percent") {
  auto c = run_in_pty(
      72, [] { return squares_with_bar<procpool::ThreadPool>({.description = "squares"}); });
  check_final_terminal_line(c, 72, "200/200");
  CHECK(test_support::no_child_processes());
}

TEST_CASE("progress: starmap and imap on a terminal count every item") {
  auto c = run_in_pty(90, [] {
    procpool::Pool pool(2);
    std::vector<std::tuple<int, int>> pairs;
    for (int i = 0; i < 50; ++i) pairs.emplace_back(i, i);
    auto sums = pool.starmap([](int a, int b) { return a + b; }, pairs, 4,
                             Progress{.description = "squares"});
    long total = 0;
    for (int x :
         pool.imap(slow_square, std::views::iota(0, 50), Progress{.description = "squares"})) {
      total += x;
    }
    return sums.size() == 50 && total == 40425;
  });
  check_screen(
      c, 90, {"squares: 100%\\|(█)+\\| 50/50 \\[.*\\]", "squares: 100%\\|(█)+\\| 50/50 \\[.*\\]"});
}

TEST_CASE("progress: a ThreadPool imap_unordered on a terminal closes its bar at the end") {
  auto c = run_in_pty(80, [] {
    procpool::ThreadPool pool(2);
    long total = 0;
    auto stream = pool.imap_unordered(slow_square, std::views::iota(0, 40), 2,
                                      Progress{.description = "squares"});
    for (int x : stream) total += x;
    // The bar closed when the stream ran out, not when it is destroyed after this write.
    ::write(2, "after\n", 6);
    return total == 20540;
  });
  check_screen(c, 80,
               {"squares: 100%\\|(█)+\\| 40/40 \\[00:0[0-9]<00:00, [0-9.]+ it/s\\]", "after"});
}

TEST_CASE("progress: an unknown total shows the count, elapsed time and rate") {
  auto c = run_in_pty(80, [] {
    procpool::Pool pool(2);
    auto below_100 = std::views::iota(0) | std::views::take_while([](int x) { return x < 100; });
    std::size_t n = 0;
    for (int x : pool.imap(slow_square, below_100, Progress{.description = "count"})) n += x >= 0;
    return n == 100;
  });
  check_screen(c, 80, {"count: 100 it \\[00:0[0-9], [0-9.]+ it/s\\]"});
  CHECK(c.bytes.ends_with("\x1b[K\r\n"));
}

TEST_CASE("progress: a map whose item throws still leaves a clean final line") {
  auto c = run_in_pty(80, [] {
    procpool::Pool pool(2);
    try {
      pool.map(
          [](int x) {
            if (x == 7) throw std::runtime_error("seven");
            return x;
          },
          std::views::iota(0, 20), 1, Progress{.description = "squares"});
    } catch (const std::runtime_error& e) {
      ::write(2, "caught\n", 7);
      return std::string(e.what()).find("seven") != std::string::npos;
    }
    return false;
  });
  // Every item ended (one failed), so the bar is complete; the error comes after its line.
  check_screen(c, 80, {"squares: 100%\\|(█)+\\| 20/20 \\[.*\\]", "caught"});
}

TEST_CASE("progress: an imap whose item throws in the loop still leaves a clean final line") {
  auto c = run_in_pty(80, [] {
    procpool::ThreadPool pool(2);
    try {
      for (int x : pool.imap(
               [](int x) {
                 if (x == 7) throw std::runtime_error("seven");
                 return x;
               },
               std::views::iota(0, 20), Progress{.description = "items"})) {
        (void)x;
      }
    } catch (const std::runtime_error&) {
      ::write(2, "caught\n", 7);
      return true;
    }
    return false;
  });
  // Items 0 to 7 were taken; the stream was destroyed by the exception leaving the loop.
  check_screen(
      c, 80,
      {"items:  40%\\|(█)+(▏|▎|▍|▌|▋|▊|▉)? *\\| 8/20 \\[00:0[0-9]<[0-9:?]+, [0-9.? ]+it/s\\]",
       "caught"});
}

TEST_CASE("progress: imap_unordered consumed in part then destroyed closes its bar") {
  auto c = run_in_pty(80, [] {
    procpool::Pool pool(2);
    {
      auto stream = pool.imap_unordered(slow_square, std::views::iota(0, 1000),
                                        Progress{.description = "part"});
      for (int i = 0; i < 10; ++i) {
        if (!stream.next()) return false;
      }
    }
    ::write(2, "after\n", 6);
    return true;
  });
  check_screen(c, 80,
               {"part:   1%\\|(▏|▎|▍|▌|▋|▊|▉)? *\\| 10/1000 \\[00:0[0-9]<[0-9:]+, [0-9.]+ it/s\\]",
                "after"});
}

TEST_CASE("progress: a narrow terminal gets a line that never wraps") {
  auto c = run_in_pty(
      30, [] { return squares_with_bar<procpool::ThreadPool>({.description = "squares"}); });
  auto lines = screen_of(c, 30).lines();
  INFO(c.bytes);
  REQUIRE(lines.size() == 1);
  CHECK(columns_of(lines[0]) <= 29);
  CHECK(lines[0].starts_with("squares: 100% 200/200 [00:0"));
}

TEST_CASE("progress: stderr on a pipe gets no bytes at all unless forced") {
  auto c = run_with_stderr_pipe([] {
    return squares_with_bar<procpool::Pool>({.description = "squares"}) &&
           squares_with_bar<procpool::ThreadPool>({.description = "squares"});
  });
  REQUIRE_FALSE(c.timed_out);
  CHECK(WEXITSTATUS(c.status) == 0);
  CHECK(c.bytes.empty());
  CHECK(test_support::no_child_processes());
}

TEST_CASE("progress: a forced bar on a pipe writes plain lines, rate-limited") {
  auto c = run_with_stderr_pipe(
      [] { return squares_with_bar<procpool::Pool>({.description = "squares", .force = true}); });
  REQUIRE_FALSE(c.timed_out);
  CHECK(WEXITSTATUS(c.status) == 0);
  INFO(c.bytes);
  CHECK(c.bytes.find('\r') == std::string::npos);
  CHECK(c.bytes.find('\x1b') == std::string::npos);
  REQUIRE(c.bytes.ends_with("\n"));
  std::vector<std::string> lines;
  for (auto part : std::views::split(c.bytes, '\n')) lines.emplace_back(part.begin(), part.end());
  lines.pop_back();  // after the final newline
  REQUIRE(lines.size() >= 2);
  CHECK(static_cast<double>(lines.size()) <= c.seconds * 10 + 3);
  CHECK(matches(lines.front(), "squares:   0%\\| +\\| 0/200 \\[00:00<\\?, \\? it/s\\]"));
  CHECK(
      matches(lines.back(), "squares: 100%\\|(█)+\\| 200/200 \\[00:0[0-9]<00:00, [0-9.]+ it/s\\]"));
  for (const auto& l : lines) CHECK(columns_of(l) == 79);  // 80 columns when there is no terminal
}

TEST_CASE("progress: a slow item still moves the elapsed clock while map waits") {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  procpool::detail::unique_fd r(fds[0]), w(fds[1]);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  procpool::ThreadPool pool(1);
  std::vector<int> result;
  std::thread caller([&] {
    result = pool.map(
        [released](int x) {
          released.wait();
          return x;
        },
        std::vector<int>{5},
        Progress{.description = "slow", .force = true, .fd = w.get(), .min_interval = 20ms});
  });
  // A failed REQUIRE below must not leave the item waiting and the caller unjoined.
  struct Finish {
    std::promise<void>& release;
    std::thread& caller;
    bool released = false;
    void operator()() {
      if (!std::exchange(released, true)) release.set_value();
      if (caller.joinable()) caller.join();
    }
    ~Finish() { (*this)(); }
  } finish{release, caller};
  // Wait for three redraws of the unfinished bar: the caller redraws while nothing arrives.
  std::string seen;
  char buf[512];
  while (count_of(seen, "\n") < 3) {
    REQUIRE(procpool::detail::wait_readable(r.get(), procpool::detail::Deadline::after(30s)));
    ssize_t n = ::read(r.get(), buf, sizeof buf);
    REQUIRE(n > 0);
    seen.append(buf, static_cast<std::size_t>(n));
  }
  finish();
  REQUIRE(result == std::vector<int>{5});
  w.reset();
  for (ssize_t n; (n = ::read(r.get(), buf, sizeof buf)) > 0;)
    seen.append(buf, static_cast<std::size_t>(n));
  INFO(seen);
  std::vector<std::string> lines;
  for (auto part : std::views::split(seen, '\n')) lines.emplace_back(part.begin(), part.end());
  lines.pop_back();
  REQUIRE(lines.size() >= 4);
  for (std::size_t i = 0; i + 1 < lines.size(); ++i) {
    CHECK(matches(lines[i], "slow:   0%\\| +\\| 0/1 \\[00:0[0-9]<\\?, \\? it/s\\]"));
  }
  CHECK(
      matches(lines.back(), "slow: 100%\\|(█)+\\| 1/1 \\[00:0[0-9]<00:00, [0-9.]+ (it/s|s/it)\\]"));
}

TEST_CASE("progress: a bar that is not drawn writes nothing and still counts") {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0);
  procpool::detail::unique_fd r(fds[0]), w(fds[1]);
  {
    procpool::ProgressBar bar({.total = 10, .fd = w.get()});
    CHECK_FALSE(bar.drawing());
    for (int i = 0; i < 12; ++i) bar.update();
    bar.set_total(20);
    CHECK(bar.count() == 12);
    CHECK(bar.total() == 20u);
  }
  char c;
  CHECK(::read(r.get(), &c, 1) == -1);
  CHECK(errno == EAGAIN);
  procpool::ProgressBar closed_fd({.force = true, .fd = -1});
  CHECK_FALSE(closed_fd.drawing());
}

// Everything a pipe holds right now (its write end stays open).
std::string drain(int fd) {
  std::string out;
  char buf[4096];
  while (procpool::detail::wait_readable(fd, procpool::detail::Deadline::after(0s))) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    REQUIRE(n > 0);
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

TEST_CASE("progress: many fast updates redraw at most once per interval and close once") {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  procpool::detail::unique_fd r(fds[0]), w(fds[1]);
  auto start = std::chrono::steady_clock::now();
  procpool::ProgressBar bar(
      {.description = "fast", .total = 200000, .force = true, .fd = w.get(), .min_interval = 50ms});
  REQUIRE(bar.drawing());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50000; ++i) bar.update();
    });
  }
  for (auto& t : threads) t.join();
  bar.close();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::string out = drain(r.get());
  INFO(out);
  std::size_t lines = count_of(out, "\n");
  CHECK(lines >= 2);
  CHECK(static_cast<double>(lines) <= seconds * 20 + 3);
  REQUIRE(out.ends_with("\n"));
  std::string last = out.substr(out.rfind('\n', out.size() - 2) + 1);
  CHECK(matches(last, "fast: 100%\\|(█)+\\| 200000/200000 \\[00:0[0-9]<00:00, [0-9]+ it/s\\]\n"));
  // Closed: neither a second close() nor a later update() writes anything.
  bar.close();
  bar.update(5);
  CHECK(bar.count() == 200005);
  CHECK(drain(r.get()).empty());
}

TEST_CASE("progress: lines for counts past the total, a zero total and slow rates") {
  using procpool::detail::format_progress_line;
  // Past the total: the percentage says so, the bar stays full, nothing is left to wait for.
  CHECK(format_progress_line("over", 21, 20, 2.0, 59) ==
        "over: 105%|████████████████| 21/20 [00:02<00:00, 10.5 it/s]");
  // Nothing to do is done.
  CHECK(format_progress_line("", 0, 0, 0.0, 40) == "100%|████████| 0/0 [00:00<00:00, ? it/s]");
  // Below one item a second the rate turns into seconds per item; hours appear when needed.
  CHECK(format_progress_line("slow", 2, 10, 8000.0, 79) ==
        "slow:  20%|██████                        | 2/10 [2:13:20<8:53:20, 4000.00 s/it]");
  CHECK(format_progress_line("n", 3, std::nullopt, 1.5, 80) == "n: 3 it [00:01, 2.0 it/s]");
  CHECK(format_progress_line("", 123456, std::nullopt, 2.0, 80) == "123456 it [00:02, 61728 it/s]");
  // Eighths of a column; 99.9 percent does not read as done.
  CHECK(format_progress_line("", 999, 1000, 1.0, 60) ==
        " 99%|██████████████████▉| 999/1000 [00:01<00:00, 999.0 it/s]");
  // Too narrow for a bar: the numbers alone, cut at the width (never inside a code point).
  CHECK(format_progress_line("ünïcode", 5, 10, 1.0, 30) == "ünïcode:  50% 5/10 [00:01<00:0");
  CHECK(procpool::detail::display_width(format_progress_line("ü", 1, 3, 1.0, 50)) == 50);
}
