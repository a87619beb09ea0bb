#include <procpool/serialize.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Every allocation through operator new in this program is counted while g_counting is set, so
// that a test can bound what the decoder allocates for a hostile frame. Every non-aligned form
// is replaced, so that memory from one form is never released by another's runtime (ASan checks
// that); all of them use malloc and free. noinline keeps GCC from pairing an inlined free() with
// operator new and warning about it.
namespace {
std::atomic<bool> g_counting{false};
std::atomic<std::size_t> g_allocated{0};

void* counted_malloc(std::size_t n) noexcept {
  if (g_counting.load(std::memory_order_relaxed)) {
    g_allocated.fetch_add(n, std::memory_order_relaxed);
  }
  return std::malloc(n == 0 ? 1 : n);
}
void* counted_new(std::size_t n) {
  if (void* p = counted_malloc(n)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace {

using Catch::Matchers::Contains;
using procpool::decode;
using procpool::encode;
using procpool::ProtocolError;
using procpool::Serializable;
using Frame = std::vector<std::byte>;

constexpr std::size_t kFingerprint = 8;

// ---------------------------------------------------------------------------------------------
// Types under test.

enum class Color : std::uint8_t { red, green = 7, blue = 255 };
enum Legacy { legacy_low = -1, legacy_high = 100000 };

/// Trivially copyable, no bool or enum inside: any bytes are a valid value. No padding either,
/// so that a copy the compiler makes field by field keeps every byte of the encoding.
struct Pod {
  std::int32_t id;
  std::uint16_t code;
  char tag[2];
  double weight;
  bool operator==(const Pod&) const = default;
};
static_assert(std::is_trivially_copyable_v<Pod> && sizeof(Pod) == 16);

/// Trivially copyable without a default constructor.
struct Celsius {
  explicit constexpr Celsius(double d) : degrees(d) {}
  double degrees;
  bool operator==(const Celsius&) const = default;
};
static_assert(std::is_trivially_copyable_v<Celsius> && !std::is_default_constructible_v<Celsius>);

/// C arrays held as members, of block-copyable and of structural element types.
struct WithArrays {
  std::int32_t ints[3] = {};
  std::string names[2];
  bool flags[2] = {};
  double grid[2][3] = {};
  template <class Archive>
  void serialize(Archive& ar) {
    ar(ints, names, flags, grid);
  }
  bool operator==(const WithArrays&) const = default;
};

struct Inner {
  std::string name;
  std::vector<std::int32_t> xs;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(name, xs);
  }
  bool operator==(const Inner&) const = default;
  bool operator<(const Inner& o) const { return std::tie(name, xs) < std::tie(o.name, o.xs); }
};

struct Outer {
  Inner first;
  std::map<std::string, Inner> by_name;
  std::optional<Inner> maybe;
  std::variant<std::monostate, Inner, std::int32_t> either;
  std::set<Inner> ordered;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(first, by_name, maybe, either, ordered);
  }
  bool operator==(const Outer&) const = default;
};

/// Recursive through a vector.
struct Tree {
  std::int32_t value = 0;
  std::string label;
  bool leaf = true;
  std::optional<std::int64_t> weight;
  std::vector<Tree> children;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value, label, leaf, weight, children);
  }
  bool operator==(const Tree&) const = default;
};

/// Trivially copyable, but its serialize member sends only `a`: the member must win.
struct Both {
  std::int32_t a = 0;
  std::int32_t b = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(a);
  }
};
static_assert(std::is_trivially_copyable_v<Both>);

/// A user type far larger in memory than on the wire (8 bytes per 80 000).
struct Big {
  std::array<double, 10000> values{};
  std::int64_t id = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(id);
  }
};

/// A user type one byte long on the wire and in memory.
struct Octet {
  std::uint8_t value = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value);
  }
};

/// A user type that encodes to no bytes at all.
struct Nothing {
  template <class Archive>
  void serialize(Archive&) {}
  bool operator==(const Nothing&) const = default;
};

struct StringHolder {
  std::string s;
};
struct MutexHolder {
  std::mutex m;
};
/// Holds a mutex but sends only its data: Serializable, as the serialize member says.
struct GuardedCounter {
  std::mutex m;
  std::int64_t count = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(count);
  }
};

// ---------------------------------------------------------------------------------------------
// Helpers.

template <class T>
std::string name_of() {
  return std::string(procpool::detail::type_name<T>());
}

/// Checks that `value` survives encode and decode, and that re-encoding what was decoded gives
/// the same bytes (one value, one encoding).
template <class T>
void check_round_trip(const T& value) {
  INFO("type: " << name_of<T>());
  Frame frame = encode(value);
  T back = decode<T>(frame);
  CHECK(back == value);
  CHECK(encode(back) == frame);
}

/// For unordered containers, whose iteration order (and so encoding) may differ between two
/// equal values.
template <class T>
void check_round_trip_unordered(const T& value) {
  INFO("type: " << name_of<T>());
  CHECK(decode<T>(encode(value)) == value);
}

void append_varint(Frame& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<std::byte>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<std::byte>(v));
}

void append_bytes(Frame& out, std::initializer_list<int> bytes) {
  for (int b : bytes) out.push_back(static_cast<std::byte>(b));
}

/// The first kFingerprint bytes of a frame of T: a frame with an empty payload.
template <class T>
Frame header_of() {
  Frame f = encode(T{});
  f.resize(kFingerprint);
  return f;
}

/// A frame of T whose payload starts with a count of `n`, padded with 0x01 bytes to `size`.
template <class T>
Frame frame_claiming(std::uint64_t n, std::size_t size = 64) {
  Frame f = header_of<T>();
  append_varint(f, n);
  if (f.size() < size) f.resize(size, std::byte{1});
  return f;
}

/// The message of the ProtocolError that `fn` throws, or a text that no expected message
/// contains when it throws nothing.
std::string protocol_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "<no ProtocolError was thrown>";
}

template <class T>
std::string decode_error(const Frame& frame) {
  return protocol_error_of([&] { (void)decode<T>(frame); });
}

struct Allocation {
  std::size_t bytes;
  bool threw_protocol_error;
};

/// What decoding `frame` as a T allocates through operator new, exception messages included.
template <class T>
Allocation allocation_decoding(const Frame& frame) {
  g_allocated.store(0);
  g_counting.store(true);
  bool threw = false;
  try {
    (void)decode<T>(frame);
  } catch (const ProtocolError&) {
    threw = true;
  }
  g_counting.store(false);
  return {g_allocated.load(), threw};
}

Tree sample_tree() {
  Tree t{1, "root", false, 42, {}};
  t.children.push_back(Tree{2, "left", true, std::nullopt, {}});
  Tree right{3, std::string("r\0ght", 5), false, -7, {}};
  right.children.push_back(Tree{4, "", true, 0, {}});
  t.children.push_back(right);
  return t;
}

Outer sample_outer() {
  Outer o;
  o.first = Inner{"first", {1, 2, 3}};
  o.by_name = {{"a", Inner{"alpha", {}}}, {"b", Inner{"beta", {-1}}}};
  o.maybe = Inner{"maybe", {7}};
  o.either = Inner{"either", {8, 9}};
  o.ordered = {Inner{"x", {}}, Inner{"y", {1}}};
  return o;
}

using StringVectorMap = std::map<std::string, std::vector<std::int32_t>>;
using OptionalVariants =
    std::vector<std::optional<std::variant<std::monostate, std::int64_t, std::string>>>;
using Mixed = std::tuple<std::string, std::set<std::int16_t>, std::array<double, 3>,
                         std::chrono::milliseconds, std::vector<bool>, std::pair<char, float>>;
using UnorderedMap = std::unordered_map<std::string, std::int32_t>;

StringVectorMap sample_map() { return {{"", {}}, {"one", {1}}, {"three", {1, 2, 3}}}; }
OptionalVariants sample_variants() {
  return {std::nullopt, std::monostate{}, std::int64_t{-5}, std::string("hello"), std::nullopt};
}
Mixed sample_mixed() {
  return {"mixed",
          {-3, 0, 9},
          {1.5, -0.0, 1e300},
          std::chrono::milliseconds(1234),
          {true, false, true},
          {'z', 2.5f}};
}
std::vector<Pod> sample_pods() {
  return {Pod{1, 9, {'a', 'b'}, 0.5}, Pod{-1, 65535, {}, -2.25}, Pod{7, 0, {'\0', 'y'}, 1e-300}};
}
UnorderedMap sample_unordered() { return {{"a", 1}, {"bb", 2}, {"ccc", 3}, {"", 0}}; }

}  // namespace

// =============================================================================================
// Round trips, one category of API.md §1 at a time.

TEST_CASE(
    "serialize: arithmetic values round-trip, including bool, char and floating-point edges") {
  check_round_trip(true);
  check_round_trip(false);
  check_round_trip('\0');
  check_round_trip('\xff');
  check_round_trip(static_cast<signed char>(-128));
  check_round_trip(static_cast<unsigned char>(255));
  check_round_trip(L'\x10FFFF');
  check_round_trip(u8'x');
  check_round_trip(u'\xffff');
  check_round_trip(U'\x10FFFF');
  check_round_trip(std::numeric_limits<std::int8_t>::min());
  check_round_trip(std::numeric_limits<std::int16_t>::min());
  check_round_trip(std::numeric_limits<std::int32_t>::min());
  check_round_trip(std::numeric_limits<std::int64_t>::min());
  check_round_trip(std::numeric_limits<std::int64_t>::max());
  check_round_trip(std::numeric_limits<std::uint64_t>::max());
  check_round_trip(std::numeric_limits<std::uint32_t>::max());
  // x87 long double has six padding bytes that a copy through a register does not keep, so
  // compare values only.
  for (long double x :
       {std::numeric_limits<long double>::max(), std::numeric_limits<long double>::lowest(),
        std::numeric_limits<long double>::denorm_min(), -0.0L}) {
    CHECK(decode<long double>(encode(x)) == x);
  }

  // Floating point: compare bit patterns, so that -0.0 and NaN payloads count.
  auto same_bits = [](auto x) {
    using F = decltype(x);
    using Bits = std::conditional_t<sizeof(F) == 4, std::uint32_t, std::uint64_t>;
    F back = decode<F>(encode(x));
    return std::bit_cast<Bits>(back) == std::bit_cast<Bits>(x);
  };
  for (float f : {0.0f, -0.0f, 1.0f / 3, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                  std::numeric_limits<float>::signaling_NaN(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::lowest(), std::numeric_limits<float>::epsilon()}) {
    CHECK(same_bits(f));
  }
  for (double d :
       {0.0, -0.0, 0.1, std::numeric_limits<double>::infinity(),
        -std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN(),
        -std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::denorm_min(),
        std::numeric_limits<double>::max(), std::numeric_limits<double>::lowest()}) {
    CHECK(same_bits(d));
  }
  CHECK(same_bits(std::bit_cast<double>(std::uint64_t{0x7ff8dead'beef0001})));  // NaN payload
  CHECK(std::isnan(decode<long double>(encode(std::numeric_limits<long double>::quiet_NaN()))));
}

TEST_CASE("serialize: enums and std::byte round-trip as their values") {
  check_round_trip(Color::red);
  check_round_trip(Color::green);
  check_round_trip(Color::blue);
  check_round_trip(legacy_low);
  check_round_trip(legacy_high);
  check_round_trip(std::byte{0});
  check_round_trip(std::byte{0xff});
  check_round_trip(std::vector<std::byte>{std::byte{0}, std::byte{0x80}, std::byte{0xff}});
  check_round_trip(std::vector<Color>{Color::blue, Color::red});
  CHECK(encode(Color::blue).size() == kFingerprint + 1);
  CHECK(encode(legacy_high).size() == kFingerprint + sizeof(Legacy));
}

TEST_CASE("serialize: strings round-trip, including the empty string and embedded NULs") {
  check_round_trip(std::string());
  check_round_trip(std::string("hello"));
  check_round_trip(std::string("\0", 1));
  check_round_trip(std::string("a\0b\0\0c", 6));
  check_round_trip(std::string(127, 'x'));  // the longest length of a one-byte varint
  check_round_trip(std::string(128, 'y'));  // the shortest of a two-byte one
  check_round_trip(std::string(100000, '\0'));
  std::string every_byte;
  for (int c = 0; c < 256; ++c) every_byte.push_back(static_cast<char>(c));
  check_round_trip(every_byte);
  CHECK(decode<std::string>(encode(std::string("a\0b", 3))).size() == 3);
}

TEST_CASE("serialize: vectors round-trip, including vector<bool> and vectors of strings") {
  check_round_trip(std::vector<std::int32_t>{});
  check_round_trip(std::vector<std::int32_t>{1, -2, 3});
  check_round_trip(std::vector<double>{0.5, -1e308});
  check_round_trip(std::vector<std::uint8_t>(1000, 0xab));
  check_round_trip(std::vector<bool>{});
  check_round_trip(std::vector<bool>{true});
  check_round_trip(std::vector<bool>{false, true, true, false, true});
  std::vector<bool> many(1001);
  for (std::size_t i = 0; i < many.size(); ++i) many[i] = (i * 7) % 3 == 0;
  check_round_trip(many);
  check_round_trip(std::vector<std::string>{});
  check_round_trip(
      std::vector<std::string>{"", "a", std::string("\0\0", 2), std::string(300, 'z')});
  check_round_trip(std::vector<std::vector<std::int32_t>>{{}, {1}, {2, 3}});
  check_round_trip(std::vector<std::vector<std::string>>{{"a"}, {}, {"b", "c"}});
}

TEST_CASE("serialize: std::array and C arrays held as struct members round-trip") {
  check_round_trip(std::array<std::int32_t, 4>{1, 2, 3, 4});
  check_round_trip(std::array<std::int32_t, 0>{});
  check_round_trip(std::array<std::string, 3>{"x", "", "zz"});
  check_round_trip(std::array<bool, 3>{true, false, true});
  check_round_trip(std::array<std::array<std::int16_t, 2>, 2>{{{1, 2}, {3, 4}}});

  WithArrays w;
  w.ints[0] = 1;
  w.ints[2] = -3;
  w.names[0] = "first";
  w.names[1] = std::string("sec\0nd", 6);
  w.flags[1] = true;
  w.grid[1][2] = 6.5;
  check_round_trip(w);

  // A C array on its own encodes as its bytes, as the std::array of the same elements does.
  std::int32_t c_array[3] = {7, 8, 9};
  CHECK(encode(c_array).size() == kFingerprint + sizeof c_array);
}

TEST_CASE("serialize: pairs and tuples round-trip, including the empty tuple") {
  check_round_trip(std::pair<std::int32_t, std::string>{-1, "one"});
  check_round_trip(std::tuple<>{});
  check_round_trip(std::tuple<std::int32_t, std::string, double, bool>{1, "two", 3.0, true});
  check_round_trip(std::tuple<std::tuple<>, std::pair<char, std::tuple<std::string>>>{
      {}, {'c', std::tuple<std::string>{"nested"}}});
  check_round_trip(std::vector<std::pair<std::string, std::int32_t>>{{"a", 1}, {"b", 2}});
}

TEST_CASE("serialize: optionals and variants round-trip, including empty and monostate") {
  check_round_trip(std::optional<std::int32_t>{});
  check_round_trip(std::optional<std::int32_t>{0});
  check_round_trip(std::optional<std::string>{"present"});
  check_round_trip(std::optional<std::optional<std::int32_t>>{});
  check_round_trip(std::optional<std::optional<std::int32_t>>{std::optional<std::int32_t>{}});
  check_round_trip(std::optional<std::optional<std::int32_t>>{5});

  using V = std::variant<std::monostate, std::int32_t, std::string, std::vector<double>>;
  check_round_trip(V{});
  check_round_trip(V{7});
  check_round_trip(V{std::string("text")});
  check_round_trip(V{std::vector<double>{1.0, 2.0}});
  // The index travels, not just the value: two alternatives of one type stay apart.
  using Twice = std::variant<std::int32_t, std::int32_t>;
  CHECK(decode<Twice>(encode(Twice{std::in_place_index<1>, 3})).index() == 1);
  CHECK(decode<Twice>(encode(Twice{std::in_place_index<0>, 3})).index() == 0);
  check_round_trip(std::monostate{});
}

TEST_CASE("serialize: ordered and unordered maps and sets round-trip") {
  check_round_trip(std::map<std::string, std::int32_t>{});
  check_round_trip(std::map<std::string, std::int32_t>{{"b", 2}, {"a", 1}, {"", 0}});
  check_round_trip(std::map<std::int32_t, std::vector<std::string>>{{-1, {"x"}}, {5, {}}});
  check_round_trip(std::map<std::string, std::map<std::string, std::int32_t>>{
      {"outer", {{"inner", 1}}}, {"empty", {}}});
  check_round_trip(std::map<std::int32_t, std::int32_t, std::greater<>>{{1, 1}, {2, 2}, {3, 3}});
  check_round_trip(std::set<std::string>{});
  check_round_trip(std::set<std::string>{"pear", "apple", ""});
  check_round_trip(std::set<std::int64_t>{std::numeric_limits<std::int64_t>::min(), 0, 1});
  check_round_trip_unordered(std::unordered_map<std::string, std::vector<std::int32_t>>{});
  check_round_trip_unordered(
      std::unordered_map<std::string, std::vector<std::int32_t>>{{"a", {1}}, {"b", {}}, {"", {2}}});
  check_round_trip_unordered(std::unordered_set<std::int64_t>{});
  std::unordered_set<std::int64_t> many;
  for (std::int64_t i = 0; i < 1000; ++i) many.insert(i * i - 500);
  check_round_trip_unordered(many);
  check_round_trip_unordered(std::unordered_set<std::string>{"x", "y", ""});
}

TEST_CASE("serialize: chrono durations round-trip with their count and unit") {
  check_round_trip(std::chrono::nanoseconds::min());
  check_round_trip(std::chrono::nanoseconds::max());
  check_round_trip(std::chrono::milliseconds(-1500));
  check_round_trip(std::chrono::hours(24));
  check_round_trip(std::chrono::duration<double>(1.5));
  check_round_trip(std::chrono::duration<std::int16_t, std::ratio<7, 3>>(-9));
  CHECK(encode(std::chrono::seconds(1)).size() == kFingerprint + sizeof(std::chrono::seconds::rep));
  // The unit is part of the type: a second is never read back as a millisecond.
  CHECK_THROWS_AS(decode<std::chrono::milliseconds>(encode(std::chrono::seconds(1))),
                  ProtocolError);
}

TEST_CASE("serialize: trivially copyable structs round-trip as their bytes") {
  Pod p{42, 7, {'t', 'g'}, 2.5};
  check_round_trip(p);
  CHECK(encode(p).size() == kFingerprint + sizeof(Pod));
  check_round_trip(sample_pods());
  CHECK(encode(sample_pods()).size() == kFingerprint + 1 + 3 * sizeof(Pod));
  check_round_trip(std::array<Pod, 2>{Pod{1, 1, {'a'}, 1.0}, Pod{2, 2, {'b'}, 2.0}});
}

TEST_CASE("serialize: a trivially copyable type without a default constructor round-trips") {
  check_round_trip(Celsius{-40.0});
  CHECK(encode(Celsius{1.0}).size() == kFingerprint + sizeof(Celsius));
}

// Once a compile error deep inside std::vector::resize and std::optional::emplace: the concept
// said yes, the decoder needed a default constructor.
TEST_CASE(
    "serialize: containers of a trivially copyable type without a default constructor "
    "round-trip") {
  check_round_trip(std::vector<Celsius>{Celsius{1.0}, Celsius{-273.15}});
  check_round_trip(std::vector<Celsius>{});
  check_round_trip(std::optional<Celsius>{Celsius{36.6}});
  check_round_trip(std::optional<Celsius>{});
  check_round_trip(std::variant<std::int32_t, Celsius>{Celsius{100.0}});
  check_round_trip(std::map<std::int32_t, Celsius>{{1, Celsius{1.0}}, {2, Celsius{2.0}}});
}

TEST_CASE("serialize: user types with a serialize member round-trip, nested and recursive") {
  check_round_trip(Inner{"inner", {1, 2}});
  check_round_trip(Outer{});
  check_round_trip(sample_outer());
  check_round_trip(Tree{});
  check_round_trip(sample_tree());
  check_round_trip(std::vector<Tree>{sample_tree(), Tree{}, sample_tree()});
  check_round_trip(std::vector<Nothing>(10));
  check_round_trip(std::optional<Outer>{sample_outer()});
}

TEST_CASE("serialize: a serialize member wins over a byte copy for a trivially copyable type") {
  Both value{1, 7};
  Frame frame = encode(value);
  CHECK(frame.size() == kFingerprint + sizeof(std::int32_t));
  CHECK(frame.size() != kFingerprint + sizeof(Both));
  Both back = decode<Both>(frame);
  CHECK(back.a == 1);
  CHECK(back.b == 0);  // not sent: the serialize member says so
}

// =============================================================================================
// The Serializable concept.

// Accepted: every category of API.md §1.
static_assert(Serializable<bool> && Serializable<char> && Serializable<std::int64_t>);
static_assert(Serializable<double> && Serializable<long double>);
static_assert(Serializable<Color> && Serializable<Legacy> && Serializable<std::byte>);
static_assert(Serializable<std::string> && Serializable<std::vector<bool>>);
static_assert(Serializable<std::vector<std::string>> && Serializable<std::array<Pod, 3>>);
static_assert(Serializable<std::pair<std::int32_t, std::string>> && Serializable<std::tuple<>>);
static_assert(Serializable<std::optional<std::string>>);
static_assert(Serializable<std::variant<std::monostate, std::int32_t>>);
static_assert(Serializable<std::map<std::string, std::vector<std::int32_t>>>);
static_assert(Serializable<std::unordered_map<std::int32_t, std::string>>);
static_assert(Serializable<std::set<std::string>> && Serializable<std::unordered_set<int>>);
static_assert(Serializable<std::chrono::seconds> && Serializable<std::chrono::duration<double>>);
static_assert(Serializable<std::int32_t[3]> && Serializable<std::string[2][2]>);
static_assert(Serializable<Pod> && Serializable<Celsius> && Serializable<WithArrays>);
static_assert(Serializable<Tree> && Serializable<Outer> && Serializable<Both>);
static_assert(Serializable<GuardedCounter>);  // its serialize member says what crosses
// The concept looks through the const and reference that a function template deduces for its
// argument: `send(x)` with an lvalue `x` asks about Serializable<X&>, which is Serializable<X>.
static_assert(Serializable<const std::string&> && Serializable<std::int32_t&>);

// Refused.
static_assert(!Serializable<std::mutex>);
static_assert(!Serializable<MutexHolder>);
static_assert(!Serializable<std::function<void()>>);
static_assert(!Serializable<StringHolder>);  // not trivially copyable, no serialize member
static_assert(!Serializable<std::unique_ptr<int>>);
static_assert(!Serializable<std::thread>);
static_assert(!Serializable<void>);
// A reference held inside a value cannot be rebuilt in another process.
static_assert(!Serializable<std::tuple<int&>>);
static_assert(!Serializable<std::pair<const std::string&, int>>);
// One bad part spoils the whole.
static_assert(!Serializable<std::vector<std::unique_ptr<int>>>);
static_assert(!Serializable<std::optional<std::function<void()>>>);
static_assert(!Serializable<std::map<std::int32_t, std::function<void()>>>);
static_assert(!Serializable<std::map<StringHolder, std::int32_t>>);
static_assert(!Serializable<std::set<std::unique_ptr<int>>>);
static_assert(!Serializable<std::variant<std::int32_t, StringHolder>>);
static_assert(!Serializable<std::tuple<std::int32_t, std::string, std::mutex>>);
static_assert(!Serializable<std::array<std::function<void()>, 2>>);
static_assert(!Serializable<StringHolder[2]>);

TEST_CASE("serialize: the Serializable concept accepts the listed types and refuses the rest") {
  // The static_asserts above are the test; this case records that they compiled.
  SUCCEED();
}

// =============================================================================================
// Type fingerprints.

TEST_CASE("serialize: a frame decoded as another type of the same size throws naming both") {
  auto check_mismatch = [](auto sent_value, auto expected_tag) {
    using Sent = decltype(sent_value);
    using Expected = typename decltype(expected_tag)::type;
    std::string what = decode_error<Expected>(encode(sent_value));
    INFO(what);
    CHECK_THAT(what, Contains("expected a message of " + name_of<Expected>()));
    CHECK_THAT(what, Contains("got a message of " + name_of<Sent>()));
  };
  check_mismatch(std::int32_t{-1}, std::type_identity<std::uint32_t>{});
  check_mismatch(std::tuple<std::int32_t, std::int32_t>{1, 2},
                 std::type_identity<std::pair<std::int32_t, std::int32_t>>{});
  check_mismatch(std::vector<std::int32_t>{1, 2}, std::type_identity<std::vector<long>>{});
  check_mismatch(std::int64_t{1}, std::type_identity<double>{});
  check_mismatch(Celsius{1.0}, std::type_identity<double>{});
  check_mismatch(std::string("abc"), std::type_identity<std::vector<char>>{});
}

TEST_CASE("serialize: a frame of a type this program never encodes names its fingerprint") {
  Frame frame = encode(std::int32_t{1});
  frame[0] ^= std::byte{0x5a};
  CHECK_THAT(decode_error<std::int32_t>(frame), Contains("unknown type (fingerprint 0x"));
}

TEST_CASE("serialize: a frame shorter than a fingerprint throws ProtocolError") {
  Frame frame = encode(std::uint8_t{1});
  for (std::size_t n = 0; n < kFingerprint; ++n) {
    CHECK_THROWS_AS(decode<std::uint8_t>(Frame(frame.begin(), frame.begin() + n)), ProtocolError);
  }
  CHECK_THROWS_AS(decode<std::tuple<>>(std::span<const std::byte>{}), ProtocolError);
}

// =============================================================================================
// The decoder is total: any bytes either decode or throw ProtocolError.

namespace {

/// Decodes every strict prefix of `frame` as a T; each must throw ProtocolError.
template <class T>
void check_every_truncation_throws(const Frame& frame) {
  INFO("type: " << name_of<T>() << ", frame of " << frame.size() << " bytes");
  REQUIRE(frame.size() > kFingerprint + 4);
  std::size_t rejected = 0;
  for (std::size_t n = 0; n < frame.size(); ++n) {
    Frame prefix(frame.begin(), frame.begin() + static_cast<std::ptrdiff_t>(n));
    try {
      (void)decode<T>(prefix);
      FAIL_CHECK("a frame truncated to " << n << " bytes decoded");
    } catch (const ProtocolError&) {
      ++rejected;
    }
  }
  CHECK(rejected == frame.size());
  CHECK_NOTHROW(decode<T>(frame));
}

/// Flips random bits and bytes of `frame` many times; every result must decode or throw
/// ProtocolError, and what decodes must encode back to the very same bytes (canonical).
template <class T>
void check_random_flips(const Frame& frame, std::uint64_t seed, bool canonical = true) {
  INFO("type: " << name_of<T>() << ", seed " << seed);
  std::mt19937_64 rng(seed);
  std::size_t decoded = 0;
  std::size_t rejected = 0;
  for (int iteration = 0; iteration < 3000; ++iteration) {
    Frame m = frame;
    int flips = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < flips; ++i) {
      // Mostly the payload: a flipped fingerprint is rejected at once and teaches little.
      std::size_t at =
          rng() % 16 == 0 ? rng() % m.size() : kFingerprint + rng() % (m.size() - kFingerprint);
      if (rng() % 2) {
        m[at] ^= static_cast<std::byte>(1u << (rng() % 8));
      } else {
        m[at] = static_cast<std::byte>(rng());
      }
    }
    switch (rng() % 8) {
      case 0:
        m.resize(kFingerprint + rng() % (m.size() - kFingerprint + 1));
        break;
      case 1:
        m.push_back(static_cast<std::byte>(rng()));
        break;
      default:
        break;
    }
    try {
      T value = decode<T>(m);
      ++decoded;
      if (canonical && encode(value) != m) {
        FAIL_CHECK("iteration " << iteration << ": a decoded value encodes to other bytes");
      } else if (!canonical && !(decode<T>(encode(value)) == value)) {
        FAIL_CHECK("iteration " << iteration << ": a decoded value does not round-trip");
      }
    } catch (const ProtocolError&) {
      ++rejected;
    }
  }
  CHECK(decoded + rejected == 3000);
  CHECK(rejected > 0);
}

}  // namespace

TEST_CASE("serialize: a frame truncated at every byte offset throws ProtocolError") {
  check_every_truncation_throws<Tree>(encode(sample_tree()));
  check_every_truncation_throws<Outer>(encode(sample_outer()));
  check_every_truncation_throws<StringVectorMap>(encode(sample_map()));
  check_every_truncation_throws<OptionalVariants>(encode(sample_variants()));
  check_every_truncation_throws<Mixed>(encode(sample_mixed()));
  check_every_truncation_throws<std::vector<Pod>>(encode(sample_pods()));
  check_every_truncation_throws<UnorderedMap>(encode(sample_unordered()));
  check_every_truncation_throws<WithArrays>(encode(WithArrays{{1, 2, 3}, {"a", "b"}, {true}, {}}));
}

TEST_CASE("serialize: bytes after a whole value throw ProtocolError") {
  auto check_trailing = [](const auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    INFO("type: " << name_of<T>());
    Frame frame = encode(value);
    frame.push_back(std::byte{0});
    CHECK_THAT(decode_error<T>(frame), Contains("1 unexpected bytes"));
    frame.insert(frame.end(), 100, std::byte{0xff});
    CHECK_THAT(decode_error<T>(frame), Contains("101 unexpected bytes"));
  };
  check_trailing(std::int32_t{1});
  check_trailing(std::string("abc"));
  check_trailing(std::tuple<>{});
  check_trailing(sample_tree());
  check_trailing(sample_map());
  check_trailing(Celsius{2.0});
}

TEST_CASE("serialize: thousands of random byte flips either decode or throw ProtocolError") {
  check_random_flips<Tree>(encode(sample_tree()), 1);
  check_random_flips<Outer>(encode(sample_outer()), 2);
  check_random_flips<StringVectorMap>(encode(sample_map()), 3);
  check_random_flips<OptionalVariants>(encode(sample_variants()), 4);
  check_random_flips<Mixed>(encode(sample_mixed()), 5);
  check_random_flips<std::vector<Pod>>(encode(sample_pods()), 6);
  check_random_flips<UnorderedMap>(encode(sample_unordered()), 7, /*canonical=*/false);
}

// =============================================================================================
// Hostile lengths, tags and varints.

TEST_CASE("serialize: a vector of 2^60 claimed elements is rejected without allocating") {
  Frame frame = frame_claiming<std::vector<std::int32_t>>(std::uint64_t{1} << 60);
  Allocation a = allocation_decoding<std::vector<std::int32_t>>(frame);
  CHECK(a.threw_protocol_error);
  CHECK(a.bytes < 4096);  // the error message, nothing for the elements
  CHECK_THAT(decode_error<std::vector<std::int32_t>>(frame),
             Contains("claims 1152921504606846976"));

  Frame trees = frame_claiming<std::vector<Tree>>(std::uint64_t{1} << 60);
  Allocation b = allocation_decoding<std::vector<Tree>>(trees);
  CHECK(b.threw_protocol_error);
  CHECK(b.bytes < 4096);
}

TEST_CASE("serialize: a string longer than its frame is rejected") {
  Frame frame = header_of<std::string>();
  append_varint(frame, 1000);
  append_bytes(frame, {'a', 'b', 'c'});
  CHECK_THAT(decode_error<std::string>(frame), Contains("a string claims 1000"));
  Frame one_over = encode(std::string("abc"));
  one_over[kFingerprint] = std::byte{4};
  CHECK_THROWS_AS(decode<std::string>(one_over), ProtocolError);
}

TEST_CASE("serialize: a map or set claiming a huge count is rejected") {
  CHECK_THAT((decode_error<std::map<std::int32_t, std::int32_t>>(
                 frame_claiming<std::map<std::int32_t, std::int32_t>>(std::uint64_t{1} << 50))),
             Contains("a map claims"));
  CHECK_THAT(decode_error<UnorderedMap>(frame_claiming<UnorderedMap>(~std::uint64_t{0})),
             Contains("a map claims"));
  CHECK_THAT(decode_error<std::set<std::string>>(
                 frame_claiming<std::set<std::string>>(std::uint64_t{1} << 40)),
             Contains("a set claims"));
}

TEST_CASE("serialize: nested vectors claiming huge counts are rejected") {
  using Nested = std::vector<std::vector<std::vector<std::int32_t>>>;
  Frame frame = header_of<Nested>();
  append_varint(frame, 3);                       // three middle vectors...
  append_varint(frame, std::uint64_t{1} << 62);  // ...the first claiming 2^62 inner ones
  frame.resize(64, std::byte{0});
  Allocation a = allocation_decoding<Nested>(frame);
  CHECK(a.threw_protocol_error);
  CHECK(a.bytes < 64 * 1024);

  Frame inner_huge = header_of<Nested>();
  append_bytes(inner_huge, {1, 1});                   // one middle vector of one inner vector...
  append_varint(inner_huge, std::uint64_t{1} << 40);  // ...claiming 2^40 ints
  inner_huge.resize(64, std::byte{0});
  CHECK_THAT(decode_error<Nested>(inner_huge), Contains("a vector claims 1099511627776"));
}

TEST_CASE("serialize: a corrupt count never makes the decoder allocate 1 MiB for 64 bytes") {
  constexpr std::uint64_t claim = std::uint64_t{1} << 40;
  constexpr std::size_t limit = 1 << 20;
  auto check = [&](auto tag) {
    using T = typename decltype(tag)::type;
    INFO("type: " << name_of<T>());
    Allocation a = allocation_decoding<T>(frame_claiming<T>(claim));
    CHECK(a.threw_protocol_error);
    CHECK(a.bytes < limit);
  };
  check(std::type_identity<std::string>{});
  check(std::type_identity<std::vector<std::int32_t>>{});
  check(std::type_identity<std::vector<bool>>{});
  check(std::type_identity<std::vector<std::string>>{});
  check(std::type_identity<std::vector<std::vector<std::int32_t>>>{});
  check(std::type_identity<std::vector<Tree>>{});
  check(std::type_identity<std::vector<Big>>{});
  check(std::type_identity<std::vector<Nothing>>{});
  check(std::type_identity<std::vector<std::tuple<>>>{});
  check(std::type_identity<std::vector<std::monostate>>{});
  check(std::type_identity<std::vector<Pod>>{});
  check(std::type_identity<std::map<std::int32_t, std::int32_t>>{});
  check(std::type_identity<std::map<std::string, Tree>>{});
  check(std::type_identity<UnorderedMap>{});
  check(std::type_identity<std::set<std::int32_t>>{});
  check(std::type_identity<std::unordered_set<std::string>>{});
}

// Once an 80 MB reservation for a 1 KiB frame: room was reserved for one element per byte left,
// each element as large as the type (80 KB here), not as its encoding (8 bytes).
TEST_CASE("serialize: a corrupt count of large user-type elements reserves little memory") {
  Frame frame = frame_claiming<std::vector<Big>>((std::uint64_t{1} << 24) - 1, 1024);
  Allocation a = allocation_decoding<std::vector<Big>>(frame);
  CHECK(a.threw_protocol_error);
  CHECK(a.bytes < (1 << 20));
  // A real vector of them still decodes.
  std::vector<Big> bigs(3);
  bigs[2].id = 9;
  CHECK(decode<std::vector<Big>>(encode(bigs))[2].id == 9);
}

// Once 335 MB decoded from a 41-byte frame: the limit on elements that take no bytes was per
// container, so nesting such containers multiplied it.
TEST_CASE(
    "serialize: nested containers of elements taking no bytes cannot allocate without bound") {
  using Nested = std::vector<std::vector<std::monostate>>;
  Frame frame = header_of<Nested>();
  append_varint(frame, 64);
  for (int i = 0; i < 64; ++i) append_varint(frame, std::uint64_t{1} << 22);
  Allocation a = allocation_decoding<Nested>(frame);
  CHECK(a.threw_protocol_error);
  CHECK(a.bytes < (std::size_t{64} << 20));
  CHECK_THAT(decode_error<Nested>(frame), Contains("that take no bytes"));

  // A legitimate vector of such elements still decodes.
  CHECK(decode<std::vector<Nothing>>(encode(std::vector<Nothing>(100000))).size() == 100000);
}

// Once refused: every container of user-type elements was capped at 2^24 elements, even when
// each element took bytes, because the cap for elements that might take none applied to all.
TEST_CASE("serialize: a vector of more than 2^24 user-type elements round-trips") {
  std::vector<Octet> octets((std::size_t{1} << 24) + 1);
  octets.back().value = 7;
  std::vector<Octet> back = decode<std::vector<Octet>>(encode(octets));
  REQUIRE(back.size() == octets.size());
  CHECK(back.back().value == 7);
}

// Once a stack overflow: a 500 KB frame of trees nested 100 000 deep crashed the decoder.
TEST_CASE("serialize: user types nested deeper than the limit are rejected, not a stack overflow") {
  auto nested_frame = [](std::size_t depth) {
    // Tree{value, label, leaf, weight, children}: each level has one child, the last none.
    Frame f = header_of<Tree>();
    for (std::size_t i = 0; i <= depth; ++i) {
      append_bytes(f, {0, 0, 0, 0, /*label*/ 0, /*leaf*/ 1, /*weight*/ 0});
      append_varint(f, i < depth ? 1 : 0);
    }
    return f;
  };
  constexpr std::size_t limit = procpool::detail::max_nesting_depth;
  CHECK_NOTHROW(decode<Tree>(nested_frame(limit - 1)));
  CHECK_THAT(decode_error<Tree>(nested_frame(limit)), Contains("nest more than"));
  CHECK_THROWS_AS(decode<Tree>(nested_frame(100000)), ProtocolError);
}

TEST_CASE("serialize: a bool byte other than 0 or 1 is rejected") {
  Frame frame = encode(true);
  frame[kFingerprint] = std::byte{2};
  CHECK_THAT(decode_error<bool>(frame), Contains("a bool holds 2"));
  Frame vec = encode(std::vector<bool>{true, false});
  vec.back() = std::byte{0xff};
  CHECK_THROWS_AS(decode<std::vector<bool>>(vec), ProtocolError);
  Frame tree = encode(Tree{});
  tree[kFingerprint + 4 + 1] = std::byte{2};  // after value and the empty label: leaf
  CHECK_THAT(decode_error<Tree>(tree), Contains("a bool holds 2"));
}

TEST_CASE("serialize: an optional tag other than 0 or 1 is rejected") {
  Frame frame = encode(std::optional<std::int32_t>{});
  frame[kFingerprint] = std::byte{2};
  CHECK_THAT(decode_error<std::optional<std::int32_t>>(frame), Contains("an optional has tag 2"));
}

TEST_CASE("serialize: a variant index out of range is rejected") {
  using V = std::variant<std::monostate, std::int32_t>;
  Frame frame = encode(V{});
  frame[kFingerprint] = std::byte{2};
  CHECK_THAT(decode_error<V>(frame), Contains("a variant of 2 alternatives has index 2"));
  Frame huge = header_of<V>();
  append_varint(huge, ~std::uint64_t{0});
  CHECK_THROWS_AS(decode<V>(huge), ProtocolError);
}

TEST_CASE("serialize: overlong and non-minimal varints are rejected") {
  Frame eleven = header_of<std::string>();
  append_bytes(eleven, {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01});
  CHECK_THAT(decode_error<std::string>(eleven), Contains("overflows 64 bits"));
  Frame tenth_too_big = header_of<std::string>();
  append_bytes(tenth_too_big, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02});
  CHECK_THAT(decode_error<std::string>(tenth_too_big), Contains("overflows 64 bits"));
  Frame padded_zero = header_of<std::string>();
  append_bytes(padded_zero, {0x80, 0x00});  // 0 in two bytes: one value, one encoding
  CHECK_THAT(decode_error<std::string>(padded_zero), Contains("redundant trailing byte"));
  Frame unterminated = header_of<std::vector<std::int32_t>>();
  append_bytes(unterminated, {0x81, 0x81});
  CHECK_THROWS_AS(decode<std::vector<std::int32_t>>(unterminated), ProtocolError);
  // 2^64 - 1 in ten bytes is a valid varint; it fails only as a count.
  Frame max = header_of<std::string>();
  append_varint(max, ~std::uint64_t{0});
  CHECK_THAT(decode_error<std::string>(max), Contains("claims 18446744073709551615"));
}

TEST_CASE("serialize: a repeated map key or set element is rejected") {
  using M = std::map<std::int32_t, std::int32_t>;
  Frame map = header_of<M>();
  append_bytes(map, {2, 1, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 0, 20, 0, 0, 0});
  CHECK_THAT(decode_error<M>(map), Contains("a map repeats a key"));

  using U = std::unordered_map<std::int32_t, std::int32_t>;
  Frame umap = header_of<U>();
  append_bytes(umap, {2, 1, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 0, 20, 0, 0, 0});
  CHECK_THAT(decode_error<U>(umap), Contains("a map repeats a key"));

  Frame set = encode(std::set<std::string>{"a", "b"});
  set.back() = std::byte{'a'};
  CHECK_THAT(decode_error<std::set<std::string>>(set), Contains("a set repeats an element"));

  using US = std::unordered_set<std::string>;
  Frame uset = header_of<US>();
  append_bytes(uset, {2, 1, 'x', 1, 'x'});
  CHECK_THAT(decode_error<US>(uset), Contains("a set repeats an element"));
}

// Once accepted: a std::map frame with its keys out of order decoded, then encoded to other
// bytes, so one value had many encodings.
TEST_CASE("serialize: a map or set whose keys are out of order is rejected") {
  using M = std::map<std::int32_t, std::int32_t>;
  Frame map = header_of<M>();
  append_bytes(map, {2, 2, 0, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0, 10, 0, 0, 0});
  CHECK_THAT(decode_error<M>(map), Contains("a map's keys are out of order"));

  Frame set = header_of<std::set<std::string>>();
  append_bytes(set, {2, 1, 'b', 1, 'a'});
  CHECK_THAT(decode_error<std::set<std::string>>(set),
             Contains("a set's elements are out of order"));

  // "In order" is the container's own order.
  using Descending = std::set<std::int32_t, std::greater<>>;
  Frame descending = encode(Descending{1, 2, 3});
  CHECK(decode<Descending>(descending) == Descending{1, 2, 3});
  std::swap(descending[kFingerprint + 1], descending[kFingerprint + 5]);  // 3 and 2
  CHECK_THROWS_AS(decode<Descending>(descending), ProtocolError);
}

// =============================================================================================
// The encoding is compact.

TEST_CASE("serialize: frames are compact: a fingerprint and then the bare value") {
  CHECK(encode(std::uint8_t{7}).size() == 9);
  CHECK(encode(true).size() == 9);
  CHECK(encode(std::int64_t{-1}).size() == 16);
  CHECK(encode(std::tuple<>{}).size() == 8);
  CHECK(encode(std::monostate{}).size() == 8);
  CHECK(encode(std::optional<std::int32_t>{}).size() == 9);
  CHECK(encode(std::optional<std::int32_t>{1}).size() == 13);
  CHECK(encode(std::string("abc")).size() == 12);
  CHECK(encode(std::string(127, 'x')).size() == 8 + 1 + 127);
  CHECK(encode(std::string(128, 'x')).size() == 8 + 2 + 128);
  CHECK(encode(std::vector<std::int32_t>{1, 2, 3}).size() == 8 + 1 + 12);
  CHECK(encode(std::vector<bool>{true, false, true}).size() == 8 + 1 + 3);
  CHECK(encode(std::pair<std::uint8_t, std::uint16_t>{1, 2}).size() == 8 + 3);
  CHECK(encode(std::variant<std::monostate, std::uint8_t>{std::uint8_t{1}}).size() == 8 + 2);
  CHECK(encode(std::map<std::uint8_t, std::uint8_t>{{1, 2}, {3, 4}}).size() == 8 + 1 + 4);
  Frame frame = encode(std::uint8_t{0xab});
  CHECK(frame.back() == std::byte{0xab});
}
