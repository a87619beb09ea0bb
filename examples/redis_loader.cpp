// The Redis loader: 8 processes split a text file's lines between them and write each line into
// Redis under its line number; process 0 shows a progress bar of its own lines. Then the parent
// reads every key back and checks that each line landed under its number.
//
//   redis_loader HOST PORT FILE [PREFIX]
//
// Line n of FILE, counting from 1 as editors and `sed -n 'np'` do, is stored byte for byte as
// the string value of key PREFIX:n (PREFIX defaults to redis_loader). A line is what lies
// between two '\n's: a CRLF file's '\r' stays in it, and a last line without '\n' counts.
// Process i (i = 0..7) writes the lines with n % 8 == i, over its own connection, with many
// SETs in flight at once (hiredis pipelining) and every reply checked. Before the processes
// start, the parent deletes PREFIX:1 ... PREFIX:N, so the check afterwards sees only this run's
// writes.
//
// Exit status: 0 when every line was checked; 1 when something failed (the server cannot be
// reached, it replied with an error, a process failed, a line did not land), with a message on
// stderr; 2 for a usage error.
//
// Try it on a server of your own (the keys are left there):
//   redis-server --port 6390 --save '' &
//   build/examples/examples/redis_loader 127.0.0.1 6390 README.md
//   redis-cli -p 6390 get redis_loader:1
// Its test (example.redis_loader) runs it through cmake/with-redis-server.sh, which starts a
// private redis-server on a free port and makes the input file.
#include <procpool/process.hpp>
#include <procpool/progress.hpp>
#include <procpool/shared_memory.hpp>

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

constexpr std::size_t kProcesses = 8;
// Commands sent before reading their replies: one round trip per batch instead of per line.
constexpr std::size_t kBatch = 64;

struct Options {
  std::string host;
  int port = 0;
  std::string path;
  std::string prefix = "redis_loader";
};

struct FreeReply {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, FreeReply>;

/// One connection to the server. A forked child must open its own: a connection shared across
/// fork would mix two processes' commands and replies on one socket.
class Redis {
 public:
  Redis(const std::string& host, int port) : where_(host + ":" + std::to_string(port)) {
    ctx_.reset(redisConnectWithTimeout(host.c_str(), port, timeval{5, 0}));
    if (!ctx_) throw std::runtime_error("cannot connect to " + where_ + ": out of memory");
    if (ctx_->err) throw std::runtime_error("cannot connect to " + where_ + ": " + ctx_->errstr);
    // A server that stops answering fails the run instead of hanging it.
    if (redisSetTimeout(ctx_.get(), timeval{30, 0}) != REDIS_OK) fail("cannot set a timeout");
  }

  /// Queues one command (redisAppendCommand's format: %s a C string, %b bytes and a length).
  template <class... Args>
  void append(const char* format, Args... args) {
    if (redisAppendCommand(ctx_.get(), format, args...) != REDIS_OK) fail("cannot queue a command");
  }

  /// The reply to the oldest queued command, which may be an error reply.
  Reply reply() {
    void* raw = nullptr;
    if (redisGetReply(ctx_.get(), &raw) != REDIS_OK) fail("no reply");
    return Reply(static_cast<redisReply*>(raw));
  }

  const std::string& where() const { return where_; }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error(what + " (" + where_ + "): " + ctx_->errstr);
  }

  struct Free {
    void operator()(redisContext* c) const noexcept { redisFree(c); }
  };
  std::string where_;
  std::unique_ptr<redisContext, Free> ctx_;
};

std::string key(const Options& o, std::size_t n) { return o.prefix + ":" + std::to_string(n); }

/// For each line number n in `numbers`, append(n) queues one command; kBatch at a time are
/// sent, then their replies handed to check(n, reply) in order, then done(k) is called with
/// the k lines of that batch. An error reply throws.
template <class Append, class Check, class Done>
void pipelined(Redis& redis, const std::vector<std::size_t>& numbers, Append append, Check check,
               Done done) {
  for (std::size_t first = 0; first < numbers.size(); first += kBatch) {
    const std::size_t last = std::min(numbers.size(), first + kBatch);
    for (std::size_t i = first; i < last; ++i) append(numbers[i]);
    for (std::size_t i = first; i < last; ++i) {
      Reply r = redis.reply();
      if (r->type == REDIS_REPLY_ERROR) {
        throw std::runtime_error(redis.where() + " answered the command for line " +
                                 std::to_string(numbers[i]) +
                                 " with an error: " + std::string(r->str, r->len));
      }
      check(numbers[i], std::move(r));
    }
    done(last - first);
  }
}

/// Queues `command` (one %b) with the key of line n.
void append_key_command(Redis& redis, const char* command, const Options& o, std::size_t n) {
  const std::string k = key(o, n);
  redis.append(command, k.data(), k.size());
}

/// Line numbers 1..count with n % kProcesses == residue.
std::vector<std::size_t> share(std::size_t count, std::size_t residue) {
  std::vector<std::size_t> numbers;
  for (std::size_t n = residue == 0 ? kProcesses : residue; n <= count; n += kProcesses) {
    numbers.push_back(n);
  }
  return numbers;
}

/// What process i runs: SETs its share of the lines, counting each OK in written[i].
void load_share(const Options& o, const std::vector<std::string>& lines, std::size_t i,
                procpool::Array<std::size_t> written) {
  Redis redis(o.host, o.port);
  const std::vector<std::size_t> mine = share(lines.size(), i);
  std::optional<procpool::ProgressBar> bar;
  if (i == 0) bar.emplace(procpool::Progress{.description = "process 0", .total = mine.size()});
  pipelined(
      redis, mine,
      [&](std::size_t n) {
        const std::string k = key(o, n);
        const std::string& line = lines[n - 1];
        redis.append("SET %b %b", k.data(), k.size(), line.data(), line.size());
      },
      [&](std::size_t n, Reply r) {
        if (r->type != REDIS_REPLY_STATUS || std::string_view(r->str, r->len) != "OK") {
          throw std::runtime_error("SET " + key(o, n) + " did not answer OK");
        }
        ++written[i];
      },
      [&](std::size_t k) {
        if (bar) bar->update(k);
      });
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (in.bad()) throw std::runtime_error("cannot read " + path);
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    lines.emplace_back(text, start, end - start);
    start = end + 1;
  }
  return lines;
}

/// The line numbers 1..count.
std::vector<std::size_t> all_lines(std::size_t count) {
  std::vector<std::size_t> numbers(count);
  for (std::size_t n = 1; n <= count; ++n) numbers[n - 1] = n;
  return numbers;
}

void no_progress(std::size_t) {}

/// Reads every key back; returns how many lines are missing or differ, naming the first few.
std::size_t check_lines(Redis& redis, const Options& o, const std::vector<std::string>& lines) {
  std::size_t bad = 0;
  auto compare = [&](std::size_t n, Reply r) {
    std::string problem;
    if (r->type == REDIS_REPLY_NIL) {
      problem = "is missing";
    } else if (r->type != REDIS_REPLY_STRING) {
      problem = "is not a string";
    } else if (std::string_view(r->str, r->len) != lines[n - 1]) {
      problem = "holds " + std::to_string(r->len) + " bytes that are not line " +
                std::to_string(n) + " (" + std::to_string(lines[n - 1].size()) + " bytes)";
    }
    if (!problem.empty() && ++bad <= 5) {
      std::cerr << "redis_loader: " << key(o, n) << ' ' << problem << '\n';
    }
  };
  pipelined(
      redis, all_lines(lines.size()),
      [&](std::size_t n) { append_key_command(redis, "GET %b", o, n); }, compare, no_progress);
  return bad;
}

int usage() {
  std::cerr << "usage: redis_loader HOST PORT FILE [PREFIX]\n"
               "  Writes line n of FILE into the Redis server at HOST:PORT as key PREFIX:n\n"
               "  (PREFIX defaults to redis_loader), with 8 processes, then checks every line.\n";
  return 2;
}

int run(const Options& o) {
  const std::vector<std::string> lines = read_lines(o.path);
  std::size_t bytes = 0;
  for (const auto& line : lines) bytes += line.size();
  {
    // Connecting here first also reports an unreachable server once, not from 8 processes.
    // This connection is closed before the fork: the children open their own.
    Redis redis(o.host, o.port);
    pipelined(
        redis, all_lines(lines.size()),
        [&](std::size_t n) { append_key_command(redis, "DEL %b", o, n); },
        [](std::size_t, Reply) {}, no_progress);
  }

  procpool::Array<std::size_t> written(kProcesses);  // shared: before the processes
  std::vector<procpool::Process> processes;
  for (std::size_t i = 0; i < kProcesses; ++i) {
    // The lambda captures the lines by reference: the children get them by fork, not by copy.
    processes.emplace_back([&o, &lines, i, written] { load_share(o, lines, i, written); });
    processes.back().set_name("loader-" + std::to_string(i));
  }
  for (auto& p : processes) p.start();
  bool failed = false;
  for (std::size_t i = 0; i < kProcesses; ++i) {
    processes[i].join();
    if (const int code = *processes[i].exitcode(); code < 0) {
      std::cerr << "redis_loader: process " << i << " was killed by signal " << -code << '\n';
      failed = true;
    } else if (code != 0) {
      std::cerr << "redis_loader: process " << i << " failed with exit code " << code << '\n';
      failed = true;
    }
  }
  if (failed) {
    std::cerr << "redis_loader: not every line was written\n";
    return 1;
  }
  for (std::size_t i = 0; i < kProcesses; ++i) {
    std::cout << "process " << i << " wrote " << written[i] << " lines\n";
  }
  std::cout << "loaded " << lines.size() << " lines (" << bytes << " bytes) with " << kProcesses
            << " processes\n";

  Redis redis(o.host, o.port);
  if (const std::size_t bad = check_lines(redis, o, lines); bad != 0) {
    std::cerr << "redis_loader: " << bad << " of " << lines.size()
              << " lines did not land under their number\n";
    return 1;
  }
  std::cout << "all " << lines.size() << " lines checked\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) return usage();
  Options o;
  o.host = argv[1];
  const std::string_view port = argv[2];
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), o.port);
  if (ec != std::errc{} || end != port.data() + port.size() || o.port < 1 || o.port > 65535) {
    std::cerr << "redis_loader: '" << port << "' is not a port number (1-65535)\n";
    return usage();
  }
  o.path = argv[3];
  if (argc == 5) o.prefix = argv[4];
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::cerr << "redis_loader: " << e.what() << '\n';
    return 1;
  }
}
