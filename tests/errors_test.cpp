#include <procpool/errors.hpp>

#include <catch2/catch.hpp>

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

template <class E>
constexpr bool is_procpool_error =
    std::conjunction_v<std::is_base_of<procpool::Error, E>, std::is_base_of<std::runtime_error, E>>;

static_assert(std::is_base_of_v<std::runtime_error, procpool::Error>);
static_assert(is_procpool_error<procpool::TimeoutError>);
static_assert(is_procpool_error<procpool::TaskTimeoutError>);
static_assert(is_procpool_error<procpool::WorkerLostError>);
static_assert(is_procpool_error<procpool::PoolNotRunningError>);
static_assert(is_procpool_error<procpool::PoolTerminatedError>);
static_assert(is_procpool_error<procpool::CancelledError>);
static_assert(is_procpool_error<procpool::RemoteError>);
static_assert(is_procpool_error<procpool::ProtocolError>);
static_assert(is_procpool_error<procpool::EOFError>);
static_assert(is_procpool_error<procpool::BufferTooShortError>);
static_assert(is_procpool_error<procpool::Empty>);
static_assert(is_procpool_error<procpool::Full>);
static_assert(is_procpool_error<procpool::BrokenBarrierError>);
static_assert(is_procpool_error<procpool::OwnerDiedError>);

// Throws `e` and reports whether `catch (const procpool::Error&)` and
// `catch (const std::runtime_error&)` both catch it with its message intact.
template <class E>
void require_caught_as_error(const E& e, const std::string& what) {
  try {
    throw e;
  } catch (const procpool::Error& caught) {
    CHECK(std::string(caught.what()) == what);
  }
  try {
    throw e;
  } catch (const std::runtime_error& caught) {
    CHECK(std::string(caught.what()) == what);
  }
}

}  // namespace

TEST_CASE("errors: every error derives from procpool::Error and std::runtime_error") {
  require_caught_as_error(procpool::Error("base"), "base");
  require_caught_as_error(procpool::TimeoutError("t"), "t");
  require_caught_as_error(procpool::TaskTimeoutError("tt"), "tt");
  require_caught_as_error(procpool::WorkerLostError(1, 9, std::nullopt, "lost"), "lost");
  require_caught_as_error(procpool::PoolNotRunningError("nr"), "nr");
  require_caught_as_error(procpool::PoolTerminatedError("pt"), "pt");
  require_caught_as_error(procpool::CancelledError("c"), "c");
  require_caught_as_error(procpool::RemoteError("int", "r"), "r");
  require_caught_as_error(procpool::ProtocolError("p"), "p");
  require_caught_as_error(procpool::EOFError("eof"), "eof");
  require_caught_as_error(procpool::BufferTooShortError({}, "short"), "short");
  require_caught_as_error(procpool::Empty("e"), "e");
  require_caught_as_error(procpool::Full("f"), "f");
  require_caught_as_error(procpool::BrokenBarrierError("b"), "b");
  require_caught_as_error(procpool::OwnerDiedError("o"), "o");
}

TEST_CASE("errors: TimeoutError and the queue errors have a default message") {
  CHECK_FALSE(std::string(procpool::TimeoutError().what()).empty());
  CHECK_FALSE(std::string(procpool::Empty().what()).empty());
  CHECK_FALSE(std::string(procpool::Full().what()).empty());
}

TEST_CASE("errors: WorkerLostError carries the pid and the signal or the exit status") {
  SECTION("killed by a signal") {
    procpool::WorkerLostError e(1234, 9, std::nullopt,
                                "worker 1234 died: killed by signal 9 (SIGKILL)");
    CHECK(e.pid() == 1234);
    REQUIRE(e.signal().has_value());
    CHECK(*e.signal() == 9);
    CHECK_FALSE(e.exit_status().has_value());
    CHECK(std::string(e.what()) == "worker 1234 died: killed by signal 9 (SIGKILL)");
  }
  SECTION("exited") {
    procpool::WorkerLostError e(77, std::nullopt, 3, "worker 77 died: exited with status 3");
    CHECK(e.pid() == 77);
    CHECK_FALSE(e.signal().has_value());
    REQUIRE(e.exit_status().has_value());
    CHECK(*e.exit_status() == 3);
  }
  SECTION("the accessors survive a copy, as when rethrown") {
    procpool::WorkerLostError original(5, 15, std::nullopt, "lost");
    try {
      throw original;
    } catch (const procpool::Error& e) {
      const auto* lost = dynamic_cast<const procpool::WorkerLostError*>(&e);
      REQUIRE(lost != nullptr);
      CHECK(lost->pid() == 5);
      CHECK(lost->signal() == std::optional<int>(15));
    }
  }
}

TEST_CASE("errors: BufferTooShortError::message() holds the whole message") {
  std::vector<std::byte> whole;
  for (int i = 0; i < 1000; ++i) whole.push_back(static_cast<std::byte>(i * 7));
  procpool::BufferTooShortError e(whole, "does not fit");
  CHECK(e.message() == whole);
  CHECK(std::string(e.what()) == "does not fit");

  procpool::BufferTooShortError empty({}, "empty");
  CHECK(empty.message().empty());

  try {
    throw e;
  } catch (const procpool::Error& caught) {
    const auto* too_short = dynamic_cast<const procpool::BufferTooShortError*>(&caught);
    REQUIRE(too_short != nullptr);
    CHECK(too_short->message() == whole);
  }
}

TEST_CASE("errors: RemoteError::type_name() is the remote type and what() its message") {
  procpool::RemoteError e("std::system_error", "procpool: kill: No such process");
  CHECK(e.type_name() == "std::system_error");
  CHECK(std::string(e.what()) == "procpool: kill: No such process");

  procpool::RemoteError thrown_int("int", "an exception of type int");
  CHECK(thrown_int.type_name() == "int");
}
