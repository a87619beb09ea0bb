// libFuzzer target for the wire codec (serialize.hpp).
//
// The first input byte chooses one of the types below; the rest is decoded as a frame of that
// type. Decoding must either throw procpool::ProtocolError or succeed; anything else (a crash,
// an out-of-bounds read, another exception, an allocation past libFuzzer's -malloc_limit_mb) is
// a finding. What decodes must encode back to exactly the input bytes: the encoding is
// canonical, one value has one encoding. Unordered containers are the exception (equal values
// may iterate in different orders), so for them the check is that the value round-trips.
//
// Types stay clear of bool and enum members inside trivially copyable structs: those are copied
// as bytes, and a byte copy cannot be validated.
//
// Seeds in corpus/codec_fuzz/ are valid frames of each type, prefixed with its selector byte.
// A frame starts with a fingerprint of the compiler's spelling of the type's name, so the seeds
// fit clang builds of exactly these types: change a type and regenerate them.
//
//   clang++-14 -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
//       tests/fuzz/codec_fuzz.cpp -o codec_fuzz
//   cp -r tests/fuzz/corpus/codec_fuzz /tmp/corpus && ./codec_fuzz -runs=1500000 /tmp/corpus

#include <procpool/serialize.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace codec_fuzz {

/// A user type with a serialize member, recursive through a vector, holding most categories.
struct Tree {
  std::int32_t value = 0;
  std::string name;
  bool flag = false;  // validated: it goes through serialize, not a byte copy
  std::optional<double> weight;
  std::set<std::int16_t> tags;
  std::map<std::string, std::int64_t> attributes;
  std::vector<Tree> children;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value, name, flag, weight, tags, attributes, children);
  }
};

/// Trivially copyable, no bool or enum, no padding: every byte pattern is a valid value.
struct Sample {
  std::int32_t id;
  std::uint16_t kind;
  char tag[2];
  double reading;
};
static_assert(std::is_trivially_copyable_v<Sample> && sizeof(Sample) == 16);

using NestedVectors = std::vector<std::vector<std::int32_t>>;
using Strings = std::vector<std::string>;
using StringMap = std::map<std::string, std::vector<std::uint16_t>>;
using Variants =
    std::vector<std::variant<std::monostate, std::int64_t, std::string, std::vector<double>>>;
using Optionals = std::tuple<std::optional<std::string>, std::optional<std::optional<std::int32_t>>,
                             std::array<std::uint8_t, 3>, std::chrono::microseconds,
                             std::vector<bool>, std::pair<char, std::string>>;
using Samples = std::vector<Sample>;
using Unordered = std::unordered_map<std::string, std::set<std::int32_t>>;

inline constexpr std::uint8_t kTypes = 8;

[[noreturn]] void finding(const char* what, std::size_t size) {
  std::fprintf(stderr, "codec_fuzz: %s (frame of %zu bytes)\n", what, size);
  std::abort();
}

/// Decodes `frame` as a T; what decodes must encode to the very same bytes.
template <class T>
void check_canonical(std::span<const std::byte> frame) {
  std::optional<T> value;
  try {
    value.emplace(procpool::decode<T>(frame));
  } catch (const procpool::ProtocolError&) {
    return;
  }
  std::vector<std::byte> again = procpool::encode(*value);
  if (again.size() != frame.size() || !std::equal(again.begin(), again.end(), frame.begin())) {
    finding("a decoded value encodes to other bytes", frame.size());
  }
}

/// Decodes `frame` as a T whose encoding may depend on iteration order; what decodes must
/// survive another round trip unchanged.
template <class T>
void check_round_trip(std::span<const std::byte> frame) {
  std::optional<T> value;
  try {
    value.emplace(procpool::decode<T>(frame));
  } catch (const procpool::ProtocolError&) {
    return;
  }
  std::vector<std::byte> again = procpool::encode(*value);
  if (again.size() != frame.size())
    finding("a decoded value encodes to another size", frame.size());
  if (procpool::decode<T>(again) != *value)
    finding("a decoded value does not round-trip", frame.size());
}

}  // namespace codec_fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace codec_fuzz;
  if (size == 0) return 0;
  std::span<const std::byte> frame(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  switch (data[0] % kTypes) {
    case 0:
      check_canonical<NestedVectors>(frame);
      break;
    case 1:
      check_canonical<Strings>(frame);
      break;
    case 2:
      check_canonical<StringMap>(frame);
      break;
    case 3:
      check_canonical<Variants>(frame);
      break;
    case 4:
      check_canonical<Optionals>(frame);
      break;
    case 5:
      check_canonical<Tree>(frame);
      break;
    case 6:
      check_canonical<Samples>(frame);
      break;
    case 7:
      check_round_trip<Unordered>(frame);
      break;
  }
  return 0;
}
