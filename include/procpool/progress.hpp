#pragma once
/// @file progress.hpp
/// ProgressBar: a tqdm-style text progress bar, and Progress, its options. Pool and ThreadPool
/// take a Progress as the last argument of map, starmap, imap and imap_unordered:
///
/// ```cpp
/// auto squares = pool.map(square, items, procpool::Progress{.description = "squaring"});
/// // squaring:  42%|████▏     | 420/1000 [00:01<00:02, 350.2 it/s]
/// ```
///
/// The bar is drawn only when its descriptor is a terminal (or `force` is set), at most once
/// per `min_interval`, and ends with one clean final line. When it is not drawn it writes
/// nothing at all.

#include "errors.hpp"  // first: its C++20 check is the first thing a C++17 build reports

#include <sys/ioctl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <ranges>
#include <string>
#include <string_view>
#include <utility>

#include "detail/posix.hpp"

namespace procpool {

/// Options of a progress bar (designated initializers: `{.description = "loading"}`).
struct Progress {
  /// Printed before the bar, followed by ": " ("loading" gives "loading:  42%|...").
  std::string description{};
  /// The number of items; unknown shows the count, rate and elapsed time only. Pool and
  /// ThreadPool fill it from the input range when the range is sized and it is left unset.
  std::optional<std::size_t> total{};
  /// Draw even when `fd` is not a terminal: one plain line per redraw instead of `\r` redraws.
  bool force = false;
  /// Where to draw (2: stderr). The bar never closes it.
  int fd = 2;
  /// The least time between two redraws (at most ~10 a second by default).
  std::chrono::milliseconds min_interval{100};
};

namespace detail {

/// Whether a bar with these options draws anything: its descriptor is a terminal, or forced.
inline bool progress_drawn(const Progress& options) noexcept {
  return options.fd >= 0 && (options.force || ::isatty(options.fd) == 1);
}

/// Sets `options.total` to the size of `items` when it is unset and the range knows its size.
template <class Range>
void default_total(Progress& options, Range& items) {
  if constexpr (std::ranges::sized_range<Range&>) {
    if (!options.total) options.total = static_cast<std::size_t>(std::ranges::size(items));
  }
}

/// Counts the items of a map job that ended (delivered or failed), for a progress bar drawn by
/// another thread. Copies share one count.
class ItemCounter {
 public:
  void add() noexcept { n_->fetch_add(1, std::memory_order_relaxed); }
  std::size_t count() const noexcept { return n_->load(std::memory_order_relaxed); }

 private:
  std::shared_ptr<std::atomic<std::size_t>> n_ = std::make_shared<std::atomic<std::size_t>>(0);
};

/// ItemCounter's stand-in for a map without a progress bar: counts nothing, costs nothing.
struct NoItemCounter {
  void add() const noexcept {}
};

/// Display columns of UTF-8 text, counting each code point as one column.
inline std::size_t display_width(std::string_view s) noexcept {
  std::size_t w = 0;
  for (unsigned char c : s) w += (c & 0xC0) != 0x80;
  return w;
}

/// The longest prefix of `s` that is at most `columns` wide, never cutting a code point.
inline std::string_view clip_to_width(std::string_view s, std::size_t columns) noexcept {
  std::size_t w = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80 && w++ == columns) return s.substr(0, i);
  }
  return s;
}

/// "01:05" for 65 seconds, "2:03:04" from an hour on.
inline std::string format_interval(double seconds) {
  auto s = static_cast<long long>(seconds < 0 ? 0 : seconds);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", s / 60, s % 60);
  }
  return buf;
}

/// "350.2 it/s" ("35021 it/s" from a thousand on), "4.00 s/it" below one item a second,
/// "? it/s" before anything is measured.
inline std::string format_rate(std::size_t n, double seconds) {
  if (n == 0 || seconds <= 0) return "? it/s";
  double rate = static_cast<double>(n) / seconds;
  char buf[48];
  if (rate >= 1000) {
    std::snprintf(buf, sizeof buf, "%.0f it/s", rate);
  } else if (rate >= 1) {
    std::snprintf(buf, sizeof buf, "%.1f it/s", rate);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f s/it", 1 / rate);
  }
  return buf;
}

/// A bar `width` columns wide, filled to `fraction` (clamped to [0, 1]) in eighths of a column.
inline std::string format_bar(double fraction, std::size_t width) {
  static constexpr std::string_view eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
  if (!(fraction > 0)) fraction = 0;  // also NaN
  if (fraction > 1) fraction = 1;
  auto filled = static_cast<std::size_t>(fraction * static_cast<double>(width * 8));
  std::size_t full = filled / 8, part = filled % 8;
  std::string bar;
  bar.reserve(width * 3);
  for (std::size_t i = 0; i < full; ++i) bar += "█";
  bar += eighths[part];
  bar.append(width - full - (part ? 1 : 0), ' ');
  return bar;
}

/// One line of a progress bar at most `columns` wide, as tqdm draws it:
/// `desc:  42%|████▏     | 420/1000 [00:01<00:02, 350.2 it/s]`, or without a total
/// `desc: 420 it [00:01, 350.2 it/s]`. A count past the total shows above 100% with a full bar.
inline std::string format_progress_line(std::string_view description, std::size_t n,
                                        std::optional<std::size_t> total, double elapsed,
                                        std::size_t columns) {
  std::string prefix;
  if (!description.empty()) {
    prefix.append(description);
    prefix += ": ";
  }
  const std::string rate = format_rate(n, elapsed);
  std::string line;
  if (!total) {
    line = prefix + std::to_string(n) + " it [" + format_interval(elapsed) + ", " + rate + "]";
  } else {
    // An empty job is complete as soon as it starts.
    const double fraction =
        *total == 0 ? 1.0 : static_cast<double>(n) / static_cast<double>(*total);
    std::string eta = "?";
    if (n >= *total) {
      eta = format_interval(0);
    } else if (n > 0 && elapsed > 0) {
      eta = format_interval(static_cast<double>(*total - n) * elapsed / static_cast<double>(n));
    }
    // Truncated, never rounded: 99.9% must not read as done. Clamped so the cast is defined.
    char pct[32];
    std::snprintf(pct, sizeof pct, "%3lld%%",
                  static_cast<long long>(100 * fraction < 1e15 ? 100 * fraction : 1e15));
    const std::string left = prefix + pct + "|";
    const std::string right = "| " + std::to_string(n) + "/" + std::to_string(*total) + " [" +
                              format_interval(elapsed) + "<" + eta + ", " + rate + "]";
    const std::size_t used = display_width(left) + display_width(right);
    if (used < columns) {
      line = left + format_bar(fraction, columns - used) + right;
    } else {
      line = prefix + pct + " " + right.substr(2);  // no room for a bar
    }
  }
  return std::string(clip_to_width(line, columns));
}

/// Columns of the terminal behind `fd`, or 80 when it is not one.
inline std::size_t terminal_columns(int fd) noexcept {
  winsize ws{};
  if (::ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;
}

/// Writes all of `s` to `fd`; gives up silently on error, since a progress bar must never
/// fail the work it reports on.
inline void write_quietly(int fd, std::string_view s) noexcept {
  while (!s.empty()) {
    ssize_t n = retry_eintr([&] { return ::write(fd, s.data(), s.size()); });
    if (n <= 0) return;
    s.remove_prefix(static_cast<std::size_t>(n));
  }
}

}  // namespace detail

/// A text progress bar, like tqdm: "loading:  42%|████▏     | 420/1000 [00:01<00:02, 350.2 it/s]"
///
/// On a terminal each redraw returns to the start of the line (`\r`), writes the line and
/// clears the rest (`\x1b[K`); the width follows the terminal (TIOCGWINSZ) at every redraw.
/// When forced onto something else (a pipe, a file) each redraw is one plain line. The first
/// state is drawn by the constructor, later ones at most once per `min_interval`, and close()
/// draws the final state followed by a newline. When not drawing (see drawing()), nothing is
/// ever written and update() costs one atomic addition.
///
/// Thread safety: update(), set_total(), count() and close() may be called from any thread.
class ProgressBar {
 public:
  /// Starts the clock and draws the initial state (when drawing()).
  explicit ProgressBar(Progress options = {})
      : options_(std::move(options)),
        drawing_(detail::progress_drawn(options_)),
        tty_(drawing_ && ::isatty(options_.fd) == 1),
        total_(options_.total ? *options_.total : kUnknown) {
    if (!drawing_) return;
    std::lock_guard lock(mutex_);
    draw_locked(detail::Clock::now(), false);
  }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;
  /// Calls close(); a failure to draw is ignored.
  ~ProgressBar() {
    try {
      close();
    } catch (...) {
      // Only allocation can fail here; a missing final line is not worth terminating for.
    }
  }

  /// Counts `n` more items done, and redraws if `min_interval` passed since the last redraw.
  void update(std::size_t n = 1) {
    count_.fetch_add(n, std::memory_order_relaxed);
    if (!drawing_) return;
    const auto now = detail::Clock::now();
    if (now.time_since_epoch().count() < next_draw_.load(std::memory_order_relaxed)) return;
    // Another thread drawing right now will show this count, or the next redraw will.
    std::unique_lock lock(mutex_, std::try_to_lock);
    if (!lock || closed_ || now.time_since_epoch().count() < next_draw_.load()) return;
    draw_locked(now, false);
  }

  /// Sets (or changes) the total, shown from the next redraw on.
  void set_total(std::size_t total) { total_.store(total, std::memory_order_relaxed); }

  /// Draws the final state and a newline, once; later calls do nothing, and later update()s
  /// only count. Called by the destructor.
  void close() {
    if (!drawing_) return;
    std::lock_guard lock(mutex_);
    if (closed_) return;
    closed_ = true;
    draw_locked(detail::Clock::now(), true);
  }

  /// The items counted so far.
  std::size_t count() const { return count_.load(std::memory_order_relaxed); }

  /// The total, if known.
  std::optional<std::size_t> total() const {
    std::size_t t = total_.load(std::memory_order_relaxed);
    return t == kUnknown ? std::nullopt : std::optional<std::size_t>(t);
  }

  /// Whether this bar writes at all: false when `fd` is not a terminal and `force` is unset.
  bool drawing() const { return drawing_; }

 private:
  static constexpr std::size_t kUnknown = static_cast<std::size_t>(-1);

  void draw_locked(detail::Clock::time_point now, bool final) {
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    // One column short of the edge: writing the last column leaves the cursor pending a
    // wrap, and the `\x1b[K` after it would erase that column.
    const std::size_t columns = detail::terminal_columns(options_.fd) - 1;
    std::string out;
    if (tty_) out += '\r';
    out += detail::format_progress_line(options_.description, count(), total(), elapsed, columns);
    if (tty_) out += "\x1b[K";
    if (final || !tty_) out += '\n';
    detail::write_quietly(options_.fd, out);
    next_draw_.store((now + options_.min_interval).time_since_epoch().count());
  }

  Progress options_;
  bool drawing_;
  bool tty_;
  detail::Clock::time_point start_ = detail::Clock::now();
  std::atomic<std::size_t> count_{0};
  std::atomic<std::size_t> total_;
  // Clock ticks of the earliest next redraw; read without the mutex by update().
  std::atomic<detail::Clock::rep> next_draw_{0};
  std::mutex mutex_;
  bool closed_ = false;  // guarded by mutex_
};

}  // namespace procpool
