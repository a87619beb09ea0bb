#include <procpool/shared_memory.hpp>

#include <catch2/catch.hpp>

#include <procpool/process.hpp>

#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <mutex>
#include <numeric>
#include <ranges>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#include "support/children.hpp"
#include "support/locking.hpp"

using test_support::free_for_another_thread;
using test_support::no_child_processes;

// Value and Array as CPython's test_value, test_array, test_array_from_size and
// test_getobj_getlock use them, with real child processes: what a child writes, the parent
// reads. Children are always joined before the parent reads, so no test depends on timing.

namespace {

using namespace std::chrono_literals;

constexpr auto watchdog = 30s;

// Fails the child (exit code 1, message on stderr). Catch's CHECK must not run in a child.
void expect(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("child: expected ") + what);
}

// Runs `f` in a child process and checks that it ended well.
template <class F>
void in_child(F f) {
  procpool::Process p(std::move(f));
  p.start();
  REQUIRE(p.join(watchdog));
  CHECK(p.exitcode() == 0);
}

struct Point {
  double x;
  double y;
};

// Trivially copyable but not standard-layout (data in both the base and the derived class).
struct Base {
  int id;
};
struct Tagged : Base {
  int tag;
};
static_assert(std::is_trivially_copyable_v<Tagged> && !std::is_standard_layout_v<Tagged>);

}  // namespace

// ---------------------------------------------------------------------------------------------
// Value

TEST_CASE("shared_memory: Values of several types changed in a child are seen by the parent") {
  {
    procpool::Value<int> i(4343);
    procpool::Value<double> d(3.625);
    procpool::Value<short> h(-232);
    procpool::Value<long long> q(1LL << 33);
    procpool::Value<char> c('x');
    procpool::Value<Point> pt(Point{1.5, -2.5});
    CHECK(i.value() == 4343);
    CHECK(d.value() == 3.625);
    CHECK(h.value() == -232);
    CHECK(q.value() == 1LL << 33);
    CHECK(c.value() == 'x');
    CHECK(pt.value().y == -2.5);
    in_child([&] {
      i.value() = 24234;
      d.value() = -4.25;
      h.value() = 234;
      q.value() = 1LL << 34;
      c.value() = 'y';
      pt.value() = Point{7.0, 8.0};
    });
    CHECK(i.value() == 24234);
    CHECK(d.value() == -4.25);
    CHECK(h.value() == 234);
    CHECK(q.value() == 1LL << 34);
    CHECK(c.value() == 'y');
    CHECK(pt.value().x == 7.0);
    CHECK(pt.value().y == 8.0);
  }
  CHECK(no_child_processes());
}

TEST_CASE("shared_memory: a default Value is zero and load and store go through the lock") {
  procpool::Value<double> d;
  CHECK(d.value() == 0.0);
  procpool::Value<Point> pt;
  CHECK(pt.value().x == 0.0);
  CHECK(pt.value().y == 0.0);
  procpool::Value<bool> flag;
  CHECK_FALSE(flag.value());
  d.store(2.5);
  CHECK(d.load() == 2.5);
  const procpool::Value<double>& cd = d;
  CHECK(cd.value() == 2.5);
  CHECK(cd.load() == 2.5);
}

TEST_CASE("shared_memory: a Value of a trivially copyable type that is not standard-layout works") {
  {
    procpool::Value<Tagged> v(Tagged{{1}, 2});
    CHECK(v.value().id == 1);
    CHECK(v.value().tag == 2);
    procpool::Array<Tagged> a(2);
    in_child([&] {
      v.value().tag = 20;
      a[1].id = 5;
    });
    CHECK(v.value().tag == 20);
    CHECK(a[1].id == 5);
  }
  CHECK(no_child_processes());
}

TEST_CASE("shared_memory: copies of a Value refer to the same memory and the same lock") {
  {
    procpool::Value<int> v(1);
    procpool::Value<int> copy = v;
    procpool::Value<int> direct(v);
    copy.value() = 5;
    CHECK(v.value() == 5);
    CHECK(direct.value() == 5);
    {
      std::scoped_lock lk(copy.get_lock());
      CHECK_FALSE(free_for_another_thread(v.get_lock()));
    }
    CHECK(free_for_another_thread(v.get_lock()));
    // A copy captured by value or passed as an argument to a child is still the same memory.
    procpool::Process by_capture([v]() mutable { v.value() = 6; });
    by_capture.start();
    REQUIRE(by_capture.join(watchdog));
    CHECK(by_capture.exitcode() == 0);
    CHECK(v.value() == 6);
    procpool::Process by_argument([](procpool::Value<int> arg) { arg.value() = 7; }, v);
    by_argument.start();
    REQUIRE(by_argument.join(watchdog));
    CHECK(by_argument.exitcode() == 0);
    CHECK(v.value() == 7);
  }
  CHECK(no_child_processes());
}

TEST_CASE("shared_memory: get_lock is an RLock that its owner may take recursively") {
  {
    procpool::Value<int> v(0);
    procpool::RLock& lock = v.get_lock();
    {
      std::scoped_lock outer(v.get_lock());
      std::scoped_lock inner(v.get_lock());
      v.store(v.load() + 1);  // load and store take the lock once more
      CHECK_FALSE(free_for_another_thread(lock));
      in_child([&] { expect(!v.get_lock().try_lock(), "the parent to hold the lock"); });
    }
    CHECK(free_for_another_thread(lock));
    CHECK(v.value() == 1);
    in_child([&] {
      expect(v.get_lock().try_lock(), "the lock to be free");
      v.get_lock().unlock();
    });
    procpool::Array<int> a(3);
    {
      std::scoped_lock lk(a.get_lock());
      CHECK(a.to_vector() == std::vector<int>{0, 0, 0});  // to_vector locks again
      CHECK_FALSE(free_for_another_thread(a.get_lock()));
    }
    CHECK(free_for_another_thread(a.get_lock()));
    CHECK_THROWS_AS(a.get_lock().release(), std::logic_error);
  }
  CHECK(no_child_processes());
}

TEST_CASE(
    "shared_memory: four children each adding 10000 to a Value under get_lock give the exact "
    "total") {
  {
    procpool::Value<long> total(0);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 4; ++i) {
      children.emplace_back([&total] {
        for (int n = 0; n < 10000; ++n) {
          std::scoped_lock lk(total.get_lock());
          long seen = total.value();  // a read-modify-write that loses updates without the lock
          total.value() = seen + 1;
        }
      });
    }
    for (auto& p : children) p.start();
    for (auto& p : children) {
      REQUIRE(p.join(watchdog));
      CHECK(p.exitcode() == 0);
    }
    CHECK(total.value() == 40000);
  }
  CHECK(no_child_processes());
}

// ---------------------------------------------------------------------------------------------
// Array

TEST_CASE("shared_memory: an Array changed in a child is seen by the parent") {
  {
    procpool::Array<int> arr(std::views::iota(0, 10));
    in_child([&arr] {
      for (std::size_t i = 1; i < arr.size(); ++i) arr[i] += arr[i - 1];  // running sums
    });
    CHECK(arr.to_vector() == std::vector<int>{0, 1, 3, 6, 10, 15, 21, 28, 36, 45});
  }
  CHECK(no_child_processes());
}

TEST_CASE("shared_memory: Array(10) is ten zeros and Array{10} one element") {
  procpool::Array<int> zeros(10);
  CHECK(zeros.size() == 10);
  CHECK(zeros.to_vector() == std::vector<int>(10, 0));
  procpool::Array<int> one{10};
  CHECK(one.size() == 1);
  CHECK(one[0] == 10);
  procpool::Array<int> filled(3, 7);
  CHECK(filled.to_vector() == std::vector<int>{7, 7, 7});
  procpool::Array<int> listed{0, 1, 2};
  CHECK(listed.to_vector() == std::vector<int>{0, 1, 2});
  procpool::Array<double> doubles(4);
  CHECK(doubles.to_vector() == std::vector<double>(4, 0.0));
  procpool::Array<int> empty(0);
  CHECK(empty.size() == 0);
  CHECK(empty.span().empty());
  CHECK(empty.begin() == empty.end());
}

TEST_CASE("shared_memory: an Array built from a vector or a range holds its elements") {
  std::vector<int> source{5, 4, 3, 2, 1};
  procpool::Array<int> from_vector(source);
  CHECK(from_vector.to_vector() == source);
  source[0] = 99;  // the Array holds its own copy
  CHECK(from_vector[0] == 5);
  procpool::Array<int> from_iota(std::views::iota(0, 10));
  CHECK(from_iota.size() == 10);
  CHECK(from_iota[9] == 9);
  procpool::Array<double> converted(std::vector<int>{1, 2});
  CHECK(converted.to_vector() == std::vector<double>{1.0, 2.0});
  procpool::Array<Point> points{Point{1, 2}, Point{3, 4}};
  CHECK(points[1].x == 3);
}

TEST_CASE("shared_memory: an Array's span and iterators cover the shared elements") {
  {
    procpool::Array<int> arr(5);
    std::span<int> s = arr.span();
    CHECK(s.size() == 5);
    CHECK(s.data() == arr.data());
    std::iota(s.begin(), s.end(), 1);
    CHECK(arr[4] == 5);
    CHECK(std::accumulate(arr.begin(), arr.end(), 0) == 15);
    const procpool::Array<int>& carr = arr;
    std::span<const int> cs = carr.span();
    CHECK(cs[2] == 3);
    CHECK(std::ranges::equal(carr, std::vector<int>{1, 2, 3, 4, 5}));
    in_child([&arr] {
      for (int& x : arr.span()) x *= 10;
    });
    CHECK(s[0] == 10);
    CHECK(arr.to_vector() == std::vector<int>{10, 20, 30, 40, 50});
  }
  CHECK(no_child_processes());
}

TEST_CASE("shared_memory: Array at() past the end throws std::out_of_range") {
  procpool::Array<int> arr{1, 2, 3};
  CHECK(arr.at(2) == 3);
  arr.at(0) = 9;
  CHECK(arr[0] == 9);
  CHECK_THROWS_AS(arr.at(3), std::out_of_range);
  CHECK_THROWS_WITH(arr.at(100), Catch::Contains("index 100") && Catch::Contains("size 3"));
  const procpool::Array<int>& carr = arr;
  CHECK(carr.at(1) == 2);
  CHECK_THROWS_AS(carr.at(3), std::out_of_range);
  procpool::Array<int> empty(0);
  CHECK_THROWS_AS(empty.at(0), std::out_of_range);
}

TEST_CASE("shared_memory: an Array too large to map throws std::length_error") {
  CHECK_THROWS_AS(procpool::Array<int>(std::size_t{1} << 40), std::length_error);
}

// Fixed bug: the range constructor also matched a non-const Array, so `Array b(a)` and a lambda
// capturing an Array by copy made a new, unshared array instead of a handle to the same one.
TEST_CASE(
    "shared_memory: an Array copied by direct initialization or a lambda capture shares the "
    "memory") {
  {
    procpool::Array<int> a(3);
    procpool::Array<int> direct(a);
    direct[0] = 7;
    CHECK(a[0] == 7);
    procpool::Array<int> braced{a};
    CHECK(braced.size() == 3);
    braced[1] = 8;
    CHECK(a[1] == 8);
    procpool::Array<int> copied = a;
    CHECK(copied.data() == a.data());
    std::vector<procpool::Array<int>> many;
    many.push_back(a);
    many.emplace_back(a);
    CHECK(many[1].data() == a.data());
    procpool::Process by_capture([a]() mutable { a[2] = 9; });
    by_capture.start();
    REQUIRE(by_capture.join(watchdog));
    CHECK(by_capture.exitcode() == 0);
    CHECK(a.to_vector() == std::vector<int>{7, 8, 9});
    procpool::Process by_argument([](procpool::Array<int> arg) { arg[0] = -1; }, a);
    by_argument.start();
    REQUIRE(by_argument.join(watchdog));
    CHECK(by_argument.exitcode() == 0);
    CHECK(a[0] == -1);
    // Copies share the lock too.
    {
      std::scoped_lock lk(direct.get_lock());
      CHECK_FALSE(free_for_another_thread(a.get_lock()));
    }
  }
  CHECK(no_child_processes());
}

TEST_CASE("shared_memory: children writing separate elements of an Array all land") {
  {
    procpool::Array<int> arr(8, -1);
    std::vector<procpool::Process> children;
    for (int i = 0; i < 8; ++i) {
      children.emplace_back([&arr](int k) { arr[static_cast<std::size_t>(k)] = k * k; }, i);
    }
    for (auto& p : children) p.start();
    for (auto& p : children) {
      REQUIRE(p.join(watchdog));
      CHECK(p.exitcode() == 0);
    }
    CHECK(arr.to_vector() == std::vector<int>{0, 1, 4, 9, 16, 25, 36, 49});
  }
  CHECK(no_child_processes());
}
