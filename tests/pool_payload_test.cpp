#include <procpool/pool.hpp>
#include <procpool/process.hpp>

#include <catch2/catch.hpp>

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/children.hpp"

using test_support::no_child_processes;

// Large payloads (docs/ARCHITECTURE.md, "Large payloads"): a message of 1 MiB or more travels
// in a shared memory block whose memfd goes over the worker's channel, and blocks are reused.
// These tests check what a user could notice if that went wrong: a byte from an earlier
// message (a block reused too early), a lost or duplicated message (a stub paired with the
// wrong memfd), a descriptor leak, or a forked child writing into its parent's blocks.

namespace {

using Buffer = std::vector<std::byte>;

constexpr std::size_t MiB = std::size_t{1} << 20;

// A buffer whose every byte depends on `seed` and its position, so that a stale or shifted
// byte anywhere shows. Eight bytes at a time: under the sanitizers every access costs.
Buffer pattern(std::size_t size, std::uint32_t seed) {
  Buffer b(size);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::size_t i = 0; i < size; i += sizeof x) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(b.data() + i, &x, std::min(sizeof x, size - i));
  }
  return b;
}

// What the task returns: the argument with every byte flipped, and its size appended, so that
// a result is never the argument's bytes by accident.
Buffer transform(Buffer b) {
  std::size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, b.data() + i, sizeof w);
    w = ~w;
    std::memcpy(b.data() + i, &w, sizeof w);
  }
  for (; i < b.size(); ++i) b[i] = ~b[i];
  std::uint64_t n = b.size();
  const auto* p = reinterpret_cast<const std::byte*>(&n);
  b.insert(b.end(), p, p + sizeof n);
  return b;
}

Buffer expected_result(std::size_t size, std::uint32_t seed) {
  return transform(pattern(size, seed));
}

// Equality without Catch2 printing megabytes of bytes when it fails.
bool same(const Buffer& a, const Buffer& b) { return a == b; }

std::size_t open_descriptors(pid_t pid) {
  std::string path = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = ::opendir(path.c_str());
  if (!d) throw std::runtime_error("cannot open " + path);
  std::size_t n = 0;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n - 1;  // the directory stream's own descriptor
}

// The sizes around the threshold, and a few that are not multiples of anything.
const std::vector<std::size_t> sizes = {
    0, 1, MiB - 9, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 257 * 1024, 2 * MiB - 3, 1000};

}  // namespace

TEST_CASE(
    "pool payload: arguments and results from 0 bytes to 3 MiB, around the 1 MiB threshold, "
    "arrive intact in order, map after map",
    "[pool][payload]") {
  {
    procpool::Pool pool(2);
    std::vector<Buffer> args;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      args.push_back(pattern(sizes[i], static_cast<std::uint32_t>(i)));
    }
    // Several rounds, so blocks are reused (by both sides) with different contents each time.
    constexpr std::uint32_t rounds = 3;
    constexpr std::uint32_t last = (rounds - 1) * 100;  // the seed base of the last round
    for (std::uint32_t round = 0; round < rounds; ++round) {
      if (round > 0) {
        for (std::size_t i = 0; i < sizes.size(); ++i) {
          args[i] = pattern(sizes[i], round * 100 + static_cast<std::uint32_t>(i));
        }
      }
      std::vector<Buffer> back = pool.map(transform, args, 1);
      REQUIRE(back.size() == sizes.size());
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        INFO("round " << round << ", item " << i << " of " << sizes[i] << " bytes");
        CHECK(
            same(back[i], expected_result(sizes[i], round * 100 + static_cast<std::uint32_t>(i))));
      }
    }
    // Large and small arguments in one chunk, and in imap's ordered stream.
    std::vector<Buffer> chunked = pool.map(transform, args, 5);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      CHECK(same(chunked[i], expected_result(sizes[i], last + static_cast<std::uint32_t>(i))));
    }
    std::size_t i = 0;
    for (Buffer& r : pool.imap(transform, args)) {
      CHECK(same(r, expected_result(sizes[i], last + static_cast<std::uint32_t>(i))));
      ++i;
    }
    CHECK(i == sizes.size());
    // apply: arguments unpacked from a tuple, one large and one small.
    Buffer joined = pool.apply(
        [](Buffer a, Buffer b) {
          a.insert(a.end(), b.begin(), b.end());
          return a;
        },
        pattern(2 * MiB, 7), pattern(10, 8));
    Buffer want = pattern(2 * MiB, 7);
    Buffer tail = pattern(10, 8);
    want.insert(want.end(), tail.begin(), tail.end());
    CHECK(same(joined, want));
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool payload: a worker killed while it runs a large chunk fails only that item, and the "
    "large chunks queued behind it arrive intact at another worker",
    "[pool][payload]") {
  {
    procpool::Pool pool(2);
    std::vector<Buffer> args;
    for (std::uint32_t i = 0; i < 12; ++i) args.push_back(pattern(2 * MiB + i, i));
    // Item 3 kills its worker; the chunks that worker had queued go to the other one.
    auto task = [](Buffer b) {
      if (b.size() == 2 * MiB + 3) ::kill(::getpid(), SIGKILL);
      return transform(std::move(b));
    };
    auto results = pool.imap(task, args);
    std::uint32_t i = 0;
    bool lost = false;
    for (auto it = results.begin(); it != results.end(); ++it, ++i) {
      if (i == 3) {
        CHECK_THROWS_AS(*it, procpool::WorkerLostError);
        lost = true;
        continue;
      }
      INFO("item " << i);
      CHECK(same(*it, expected_result(2 * MiB + i, i)));
    }
    CHECK(i == 12);
    CHECK(lost);
    // The replacement worker handles large payloads too.
    CHECK(same(pool.apply(transform, pattern(3 * MiB, 99)), expected_result(3 * MiB, 99)));
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "pool payload: the parent's and the workers' descriptors stay bounded over many large "
    "tasks",
    "[pool][payload]") {
  {
    procpool::Pool pool(2);
    std::vector<Buffer> args;
    for (std::uint32_t i = 0; i < 4; ++i) args.push_back(pattern(2 * MiB, i));
    auto worker_fds = [](int) { return static_cast<std::uint64_t>(open_descriptors(::getpid())); };
    const Buffer want = expected_result(2 * MiB, 3);
    auto round = [&] {
      std::vector<Buffer> back = pool.map(transform, args, 1);
      REQUIRE(back.size() == args.size());
      CHECK(same(back[3], want));
    };
    for (int k = 0; k < 4; ++k) round();
    std::size_t parent_after_warmup = open_descriptors(::getpid());
    std::vector<std::uint64_t> workers_after_warmup =
        pool.map(worker_fds, std::vector<int>{0, 1}, 1);
    for (int k = 0; k < 16; ++k) round();
    std::size_t parent_after = open_descriptors(::getpid());
    std::vector<std::uint64_t> workers_after = pool.map(worker_fds, std::vector<int>{0, 1}, 1);
    // The blocks in use are reused, not replaced: at most a handful more than after warm-up
    // (which blocks happen to be free when a message needs one depends on timing).
    CHECK(parent_after <= parent_after_warmup + 4);
    for (std::size_t w = 0; w < workers_after.size(); ++w) {
      CHECK(workers_after[w] <=
            *std::max_element(workers_after_warmup.begin(), workers_after_warmup.end()) + 4);
    }
  }
  CHECK(no_child_processes());
}

TEST_CASE("pool payload: a forked child's pool never reuses the blocks its parent's pool is using",
          "[pool][payload]") {
  {
    std::vector<Buffer> args;
    for (std::uint32_t i = 0; i < 6; ++i) args.push_back(pattern(MiB + 100 * i, i));
    {
      // Fill the parent's cache: the blocks outlive this pool, idle, when the child is forked.
      // (The fork happens with no pool running, so no thread: ThreadSanitizer cannot follow a
      // fork of a multi-threaded process into a child that starts threads of its own.)
      procpool::Pool warm(2);
      REQUIRE(warm.map(transform, args, 1).size() == args.size());
    }
    procpool::Process child([] {
      procpool::Pool own(2);
      for (std::uint32_t round = 0; round < 6; ++round) {
        std::vector<Buffer> mine;
        for (std::uint32_t i = 0; i < 6; ++i) mine.push_back(pattern(MiB + 100 * i, 1000 + round));
        std::vector<Buffer> back = own.map(transform, mine, 1);
        for (std::uint32_t i = 0; i < 6; ++i) {
          if (back[i] != expected_result(MiB + 100 * i, 1000 + round))
            std::exit(10 + static_cast<int>(i));
        }
      }
    });
    test_support::KillIfRunning guard{&child};
    child.start();
    procpool::Pool pool(2);  // takes its blocks from the cache the child inherited a copy of
    for (std::uint32_t round = 0; round < 6; ++round) {
      std::vector<Buffer> back = pool.map(transform, args, 1);
      for (std::uint32_t i = 0; i < 6; ++i) {
        INFO("round " << round << ", item " << i);
        CHECK(same(back[i], expected_result(MiB + 100 * i, i)));
      }
    }
    REQUIRE(child.join(std::chrono::seconds(50)));
    CHECK(child.exitcode() == 0);
  }
  CHECK(no_child_processes());
}
