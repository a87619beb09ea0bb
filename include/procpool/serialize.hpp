#pragma once
/// @file serialize.hpp
/// The wire codec: what may cross a process boundary (the Serializable concept) and how it is
/// encoded (`encode`) and decoded (`decode`).
///
/// A message is a frame: an 8-byte fingerprint of the encoded type, then the value. Numbers
/// travel as their native bytes (every process is this program on this machine), lengths and
/// counts as LEB128 varints, containers element by element, and contiguous runs of plain
/// numbers or trivially copyable structs as one block copy.
///
/// Decoding trusts nothing: every read is bounds-checked, every length is checked against the
/// bytes that are actually left before anything is allocated for it, and a frame of another
/// type, a truncated frame, trailing bytes or an invalid tag throw ProtocolError.
///
/// ```cpp
/// struct Point { int x; std::string label;
///                template <class Archive> void serialize(Archive& ar) { ar(x, label); } };
/// std::vector<std::byte> frame = procpool::encode(Point{1, "a"});
/// Point p = procpool::decode<Point>(frame);
/// ```

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "detail/type_name.hpp"
#include "errors.hpp"

namespace procpool {

namespace detail {

class SizeArchive;

template <class T, template <class...> class Tmpl>
struct is_specialization : std::false_type {};
template <template <class...> class Tmpl, class... Args>
struct is_specialization<Tmpl<Args...>, Tmpl> : std::true_type {};

template <class T>
struct is_std_array : std::false_type {};
template <class T, std::size_t N>
struct is_std_array<std::array<T, N>> : std::true_type {};

template <class T>
struct is_duration : std::false_type {};
template <class Rep, class Period>
struct is_duration<std::chrono::duration<Rep, Period>> : std::true_type {};

/// A user type with a cereal-style `template <class Archive> void serialize(Archive&)` member.
template <class T>
concept HasSerializeMember = requires(T& t, SizeArchive& ar) { t.serialize(ar); };

template <class T>
concept IsString = std::is_same_v<T, std::string>;

template <class T>
concept IsMapLike = is_specialization<T, std::map>::value ||
                    is_specialization<T, std::unordered_map>::value;
template <class T>
concept IsSetLike = is_specialization<T, std::set>::value ||
                    is_specialization<T, std::unordered_set>::value;

// What kind of encoding a type gets. Order matters: a serialize member wins over everything,
// standard types get structural encodings, and only then does trivially-copyable mean bytes.
enum class Kind {
  none,
  user,
  boolean,
  scalar,   // arithmetic, enum, std::byte: native bytes
  string,
  vector,
  std_array,
  c_array,
  tuple,    // std::pair and std::tuple
  optional,
  variant,
  monostate,
  map,
  set,
  duration,
  bytes,    // any other trivially copyable, copy-constructible type: its object bytes
};

template <class T>
constexpr Kind kind_of() {
  if constexpr (std::is_reference_v<T> || std::is_void_v<T> || std::is_function_v<T>) {
    return Kind::none;
  } else if constexpr (std::is_array_v<T>) {
    return std::extent_v<T> > 0 ? Kind::c_array : Kind::none;
  } else if constexpr (std::is_const_v<T> || std::is_volatile_v<T>) {
    return Kind::none;
  } else if constexpr (HasSerializeMember<T>) {
    return Kind::user;
  } else if constexpr (std::is_same_v<T, bool>) {
    return Kind::boolean;
  } else if constexpr (std::is_arithmetic_v<T> || std::is_enum_v<T>) {
    return Kind::scalar;
  } else if constexpr (IsString<T>) {
    return Kind::string;
  } else if constexpr (is_specialization<T, std::vector>::value) {
    return Kind::vector;
  } else if constexpr (is_std_array<T>::value) {
    return Kind::std_array;
  } else if constexpr (is_specialization<T, std::pair>::value ||
                       is_specialization<T, std::tuple>::value) {
    return Kind::tuple;
  } else if constexpr (is_specialization<T, std::optional>::value) {
    return Kind::optional;
  } else if constexpr (is_specialization<T, std::variant>::value) {
    return Kind::variant;
  } else if constexpr (std::is_same_v<T, std::monostate>) {
    return Kind::monostate;
  } else if constexpr (IsMapLike<T>) {
    return Kind::map;
  } else if constexpr (IsSetLike<T>) {
    return Kind::set;
  } else if constexpr (is_duration<T>::value) {
    return Kind::duration;
  } else if constexpr (std::is_trivially_copyable_v<T> && std::is_copy_constructible_v<T>) {
    return Kind::bytes;
  } else {
    return Kind::none;
  }
}

template <class T>
struct serializable;

template <class... Ts>
constexpr bool all_serializable() {
  return (serializable<Ts>::value && ...);
}

template <class T>
struct serializable {
  static constexpr bool value = [] {
    constexpr Kind k = kind_of<T>();
    if constexpr (k == Kind::none) {
      return false;
    } else if constexpr (k == Kind::vector || k == Kind::optional || k == Kind::set) {
      return serializable<typename T::value_type>::value;
    } else if constexpr (k == Kind::std_array) {
      return serializable<typename T::value_type>::value;
    } else if constexpr (k == Kind::c_array) {
      return serializable<std::remove_extent_t<T>>::value;
    } else if constexpr (k == Kind::map) {
      return serializable<typename T::key_type>::value &&
             serializable<typename T::mapped_type>::value;
    } else if constexpr (k == Kind::tuple || k == Kind::variant) {
      return []<template <class...> class Tmpl, class... Ts>(std::type_identity<Tmpl<Ts...>>) {
        return all_serializable<Ts...>();
      }(std::type_identity<T>{});
    } else if constexpr (k == Kind::duration) {
      return std::is_arithmetic_v<typename T::rep>;
    } else {
      return true;
    }
  }();
};

}  // namespace detail

/// A type whose values can cross a process boundary (what Python pickles): task arguments and
/// results, Pipe and Queue messages, Manager values. These are arithmetic types, enums,
/// std::byte, std::string, std::vector, std::array, std::pair, std::tuple, std::optional,
/// std::variant, std::map, std::unordered_map, std::set, std::unordered_set,
/// std::chrono::duration and C arrays of Serializable types; any trivially copyable,
/// copy-constructible type (its bytes are copied); and any type with a member
/// `template <class Archive> void serialize(Archive& ar) { ar(a, b, c); }`, which wins over a
/// byte copy. Sending anything else is a compile error that names the type.
template <class T>
concept Serializable = detail::serializable<std::remove_cvref_t<T>>::value;

/// Instantiated only for a type that is not Serializable, so that the compiler's first line
/// names the type ("In instantiation of 'struct procpool::type_is_not_serializable<Foo>'").
template <class T>
struct type_is_not_serializable {
  static_assert(
      sizeof(T) == 0,
      "procpool: the type named in 'type_is_not_serializable<...>' above cannot cross a process "
      "boundary. Give it a member `template <class Archive> void serialize(Archive& ar) { "
      "ar(field1, field2); }`, make it trivially copyable, or use a supported standard type "
      "(arithmetic, std::string, std::vector, std::map, std::optional, std::variant, ...).");
};

namespace detail {

/// Fails compilation with a readable message when T is not Serializable.
template <class T>
constexpr bool require_serializable() {
  if constexpr (!Serializable<T>) {
    (void)sizeof(type_is_not_serializable<std::remove_cvref_t<T>>);
    return false;
  } else {
    return true;
  }
}

[[noreturn]] inline void protocol_error(const std::string& what) {
  throw ProtocolError("procpool: " + what);
}

inline constexpr std::size_t varint_size(std::uint64_t v) noexcept {
  std::size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

/// True when T's encoding is exactly its object representation, so runs of T can be copied
/// as one block.
template <class T>
constexpr bool is_block_copyable() {
  constexpr Kind k = kind_of<T>();
  if constexpr (k == Kind::scalar || k == Kind::bytes) {
    return true;
  } else if constexpr (k == Kind::std_array) {
    return is_block_copyable<typename T::value_type>() &&
           sizeof(T) == sizeof(typename T::value_type) * std::tuple_size_v<T>;
  } else if constexpr (k == Kind::c_array) {
    return is_block_copyable<std::remove_extent_t<T>>();
  } else {
    return false;
  }
}

/// The fewest bytes any value of T encodes to. 0 means "possibly nothing" (an empty user
/// struct, std::tuple<>): such elements cannot bound a count by the bytes left, so the elements
/// that do take no bytes are paid for from a frame-wide budget (max_empty_element_bytes).
template <class T>
constexpr std::size_t min_wire_size() {
  constexpr Kind k = kind_of<T>();
  if constexpr (k == Kind::scalar || k == Kind::bytes) {
    return sizeof(T);
  } else if constexpr (k == Kind::boolean || k == Kind::string || k == Kind::vector ||
                       k == Kind::optional || k == Kind::variant || k == Kind::map ||
                       k == Kind::set) {
    return 1;
  } else if constexpr (k == Kind::std_array) {
    return min_wire_size<typename T::value_type>() * std::tuple_size_v<T>;
  } else if constexpr (k == Kind::c_array) {
    return min_wire_size<std::remove_extent_t<T>>() * std::extent_v<T>;
  } else if constexpr (k == Kind::tuple) {
    return []<template <class...> class Tmpl, class... Ts>(std::type_identity<Tmpl<Ts...>>) {
      return (std::size_t{0} + ... + min_wire_size<Ts>());
    }(std::type_identity<T>{});
  } else if constexpr (k == Kind::duration) {
    return sizeof(typename T::rep);
  } else {
    return 0;  // user types: unknown; monostate: nothing
  }
}

/// The memory (sum of sizeof) that all the container elements of one frame that encode to no
/// bytes may take: a budget for the whole frame, not per container, so that nesting such
/// containers cannot multiply it.
inline constexpr std::size_t max_empty_element_bytes = std::size_t{1} << 24;

/// How deeply user types may nest in a frame. Only user types can recurse (a tree holding a
/// vector of trees), and each level costs the decoder stack; a corrupt frame must not be able
/// to overflow it.
inline constexpr std::size_t max_nesting_depth = 1000;

// ---------------------------------------------------------------------------------------------
// Archives. A user's serialize(ar) calls ar(fields...); the same member serves all three.

/// Counts the bytes a value encodes to.
class SizeArchive {
 public:
  template <class... Ts>
  void operator()(const Ts&... values) {
    (add(values), ...);
  }
  std::size_t size() const noexcept { return size_; }

  template <class T>
  void add(const T& v);

 private:
  std::size_t size_ = 0;
};

/// Writes into a buffer that SizeArchive sized exactly.
class WriteArchive {
 public:
  explicit WriteArchive(std::byte* out) noexcept : p_(out) {}
  template <class... Ts>
  void operator()(const Ts&... values) {
    (put(values), ...);
  }
  std::byte* position() const noexcept { return p_; }

  template <class T>
  void put(const T& v);

  void raw(const void* data, std::size_t n) noexcept {
    if (n) std::memcpy(p_, data, n);
    p_ += n;
  }
  void varint(std::uint64_t v) noexcept {
    while (v >= 0x80) {
      *p_++ = static_cast<std::byte>(v | 0x80);
      v >>= 7;
    }
    *p_++ = static_cast<std::byte>(v);
  }

 private:
  std::byte* p_;
};

/// Reads from an untrusted buffer; every read is checked against the end.
class ReadArchive {
 public:
  ReadArchive(const std::byte* begin, const std::byte* end) noexcept
      : begin_(begin), p_(begin), end_(end) {}
  template <class... Ts>
  void operator()(Ts&... values) {
    (get(values), ...);
  }

  template <class T>
  void get(T& v);
  /// Reads a T into a new object; also for a trivially copyable T without a default constructor.
  template <class T>
  T make();

  std::size_t remaining() const noexcept { return static_cast<std::size_t>(end_ - p_); }
  std::size_t offset() const noexcept { return static_cast<std::size_t>(p_ - begin_); }

  void raw(void* out, std::size_t n) {
    need(n);
    if (n) std::memcpy(out, p_, n);
    p_ += n;
  }
  const std::byte* take(std::size_t n) {
    need(n);
    const std::byte* r = p_;
    p_ += n;
    return r;
  }
  std::uint64_t varint() {
    std::uint64_t v = 0;
    for (unsigned shift = 0;; shift += 7) {
      if (p_ == end_) truncated(1);
      auto b = static_cast<std::uint8_t>(*p_++);
      if (shift == 63 && b > 1) fail("a varint overflows 64 bits");
      v |= std::uint64_t{b & 0x7fu} << shift;
      if (!(b & 0x80)) {
        if (b == 0 && shift != 0) fail("a varint has a redundant trailing byte");
        return v;
      }
      if (shift == 63) fail("a varint overflows 64 bits");
    }
  }
  /// Reads a count of elements of T and checks it against the bytes left (and, for elements
  /// that may take no bytes, the budget left for them), so that a corrupt count can never make
  /// the decoder allocate more than the frame could hold.
  template <class T>
  std::size_t count(std::string_view what) {
    std::uint64_t n = varint();
    constexpr std::size_t min = min_wire_size<T>();
    if (min > 0 ? n > remaining() / min : n > remaining() + empty_element_bytes_left_ / sizeof(T)) {
      fail(std::string(what) + " claims " + std::to_string(n) + " elements of " +
           std::string(type_name<T>()) + " but only " + std::to_string(remaining()) +
           " bytes are left" +
           (min > 0 ? std::string()
                    : " (and room for " + std::to_string(empty_element_bytes_left_ / sizeof(T)) +
                          " more that take no bytes)"));
    }
    return static_cast<std::size_t>(n);
  }
  /// How many of `n` claimed elements of E to reserve room for: no more than the bytes left
  /// could hold, and no more memory than about the bytes left, so that a corrupt count costs
  /// little even when E is much larger than its encoding. Larger vectors grow as they fill.
  template <class E>
  std::size_t reservable(std::size_t n) const noexcept {
    constexpr std::size_t min = std::max(min_wire_size<E>(), std::size_t{1});
    return std::min(std::min(n, remaining() / min),
                    std::max(remaining(), std::size_t{4096}) / sizeof(E));
  }
  /// Called after reading one element of type E that began at offset `before`: an element
  /// that took no bytes is paid for from the frame's budget for such elements.
  template <class E>
  void element_read(std::size_t before) {
    if constexpr (min_wire_size<E>() == 0) {
      if (offset() == before) {
        constexpr std::size_t cost = sizeof(E);
        if (empty_element_bytes_left_ < cost) {
          fail("the containers hold more elements of " + std::string(type_name<E>()) +
               " that take no bytes than a message may (" +
               std::to_string(max_empty_element_bytes) + " bytes of them in all)");
        }
        empty_element_bytes_left_ -= cost;
      }
    }
  }
  [[noreturn]] void fail(const std::string& why) const {
    protocol_error("corrupt message: " + why + " (at byte " + std::to_string(offset()) + ")");
  }

 private:
  void need(std::size_t n) const {
    if (n > remaining()) truncated(n);
  }
  [[noreturn]] void truncated(std::size_t n) const {
    protocol_error("truncated message: needed " + std::to_string(n) + " more bytes at byte " +
                   std::to_string(offset()) + ", " + std::to_string(remaining()) + " left");
  }

  const std::byte* begin_;
  const std::byte* p_;
  const std::byte* end_;
  std::size_t empty_element_bytes_left_ = max_empty_element_bytes;
  std::size_t depth_ = 0;  // user types being read, one inside the other
};

template <class T>
void SizeArchive::add(const T& v) {
  constexpr Kind k = kind_of<T>();
  if constexpr (!require_serializable<T>()) {
  } else if constexpr (k == Kind::user) {
    const_cast<T&>(v).serialize(*this);
  } else if constexpr (k == Kind::boolean) {
    size_ += 1;
  } else if constexpr (k == Kind::scalar || k == Kind::bytes) {
    size_ += sizeof(T);
  } else if constexpr (k == Kind::string) {
    size_ += varint_size(v.size()) + v.size();
  } else if constexpr (k == Kind::vector) {
    using E = typename T::value_type;
    size_ += varint_size(v.size());
    if constexpr (is_block_copyable<E>()) {
      size_ += v.size() * sizeof(E);
    } else {
      for (const auto& e : v) add(static_cast<const E&>(e));
    }
  } else if constexpr (k == Kind::std_array || k == Kind::c_array) {
    if constexpr (is_block_copyable<T>()) {
      size_ += sizeof(T);
    } else {
      for (const auto& e : v) add(e);
    }
  } else if constexpr (k == Kind::tuple) {
    std::apply([&](const auto&... es) { (add(es), ...); }, v);
  } else if constexpr (k == Kind::optional) {
    size_ += 1;
    if (v) add(*v);
  } else if constexpr (k == Kind::variant) {
    size_ += varint_size(v.index());
    if (!v.valueless_by_exception()) std::visit([&](const auto& a) { add(a); }, v);
  } else if constexpr (k == Kind::monostate) {
  } else if constexpr (k == Kind::map) {
    size_ += varint_size(v.size());
    for (const auto& [key, value] : v) {
      add(key);
      add(value);
    }
  } else if constexpr (k == Kind::set) {
    size_ += varint_size(v.size());
    for (const auto& e : v) add(e);
  } else if constexpr (k == Kind::duration) {
    size_ += sizeof(typename T::rep);
  }
}

template <class T>
void WriteArchive::put(const T& v) {
  constexpr Kind k = kind_of<T>();
  if constexpr (!require_serializable<T>()) {
  } else if constexpr (k == Kind::user) {
    const_cast<T&>(v).serialize(*this);
  } else if constexpr (k == Kind::boolean) {
    *p_++ = v ? std::byte{1} : std::byte{0};
  } else if constexpr (k == Kind::scalar || k == Kind::bytes) {
    raw(std::addressof(v), sizeof(T));
  } else if constexpr (k == Kind::string) {
    varint(v.size());
    raw(v.data(), v.size());
  } else if constexpr (k == Kind::vector) {
    using E = typename T::value_type;
    varint(v.size());
    if constexpr (is_block_copyable<E>()) {
      raw(v.data(), v.size() * sizeof(E));
    } else {
      for (const auto& e : v) put(static_cast<const E&>(e));
    }
  } else if constexpr (k == Kind::std_array || k == Kind::c_array) {
    if constexpr (is_block_copyable<T>()) {
      raw(std::addressof(v), sizeof(T));
    } else {
      for (const auto& e : v) put(e);
    }
  } else if constexpr (k == Kind::tuple) {
    std::apply([&](const auto&... es) { (put(es), ...); }, v);
  } else if constexpr (k == Kind::optional) {
    *p_++ = v ? std::byte{1} : std::byte{0};
    if (v) put(*v);
  } else if constexpr (k == Kind::variant) {
    varint(v.index());
    if (!v.valueless_by_exception()) std::visit([&](const auto& a) { put(a); }, v);
  } else if constexpr (k == Kind::monostate) {
  } else if constexpr (k == Kind::map) {
    varint(v.size());
    for (const auto& [key, value] : v) {
      put(key);
      put(value);
    }
  } else if constexpr (k == Kind::set) {
    varint(v.size());
    for (const auto& e : v) put(e);
  } else if constexpr (k == Kind::duration) {
    typename T::rep r = v.count();
    raw(&r, sizeof r);
  }
}

template <class T>
void require_decodable() {
  static_assert(std::is_default_constructible_v<T> || kind_of<T>() == Kind::bytes,
                "procpool: a type decoded from a message must be default-constructible (its "
                "fields are then filled in by its serialize member).");
}

template <class Variant, std::size_t... Is>
void emplace_variant(ReadArchive& ar, Variant& v, std::size_t index, std::index_sequence<Is...>) {
  using Fn = void (*)(ReadArchive&, Variant&);
  static constexpr Fn table[] = {+[](ReadArchive& a, Variant& out) {
    using Alt = std::variant_alternative_t<Is, Variant>;
    out.template emplace<Is>(a.make<Alt>());
  }...};
  table[index](ar, v);
}

template <class T>
T ReadArchive::make() {
  if constexpr (std::is_default_constructible_v<T>) {
    T value{};
    get(value);
    return value;
  } else if constexpr (kind_of<T>() == Kind::bytes) {
    // bit_cast needs no constructor, and T is trivially copyable.
    std::array<std::byte, sizeof(T)> bytes;
    raw(bytes.data(), bytes.size());
    return std::bit_cast<T>(bytes);
  } else {
    require_decodable<T>();  // fails, saying why; nothing else here may fail first
    throw ProtocolError("unreachable");
  }
}

template <class T>
void ReadArchive::get(T& v) {
  constexpr Kind k = kind_of<T>();
  if constexpr (!require_serializable<T>()) {
  } else if constexpr (k == Kind::user) {
    if (++depth_ > max_nesting_depth) {
      fail("user types nest more than " + std::to_string(max_nesting_depth) + " deep");
    }
    v.serialize(*this);
    --depth_;
  } else if constexpr (k == Kind::boolean) {
    auto b = static_cast<std::uint8_t>(*take(1));
    if (b > 1) fail("a bool holds " + std::to_string(b));
    v = b != 0;
  } else if constexpr (k == Kind::scalar || k == Kind::bytes) {
    raw(std::addressof(v), sizeof(T));
  } else if constexpr (k == Kind::string) {
    std::size_t n = count<char>("a string");
    const std::byte* p = take(n);
    v.assign(reinterpret_cast<const char*>(p), n);
  } else if constexpr (k == Kind::vector) {
    using E = typename T::value_type;
    std::size_t n = count<E>("a vector");
    v.clear();
    if constexpr (is_block_copyable<E>() && std::is_default_constructible_v<E>) {
      const std::byte* p = take(n * sizeof(E));
      v.resize(n);
      if (n) std::memcpy(v.data(), p, n * sizeof(E));
    } else {
      v.reserve(reservable<E>(n));
      for (std::size_t i = 0; i < n; ++i) {
        std::size_t before = offset();
        v.push_back(make<E>());
        element_read<E>(before);
      }
    }
  } else if constexpr (k == Kind::std_array || k == Kind::c_array) {
    if constexpr (is_block_copyable<T>()) {
      raw(std::addressof(v), sizeof(T));
    } else {
      for (auto& e : v) get(e);
    }
  } else if constexpr (k == Kind::tuple) {
    std::apply([&](auto&... es) { (get(es), ...); }, v);
  } else if constexpr (k == Kind::optional) {
    using E = typename T::value_type;
    auto tag = static_cast<std::uint8_t>(*take(1));
    if (tag > 1) fail("an optional has tag " + std::to_string(tag));
    if (!tag) {
      v.reset();
    } else if constexpr (std::is_default_constructible_v<E>) {
      v.emplace();
      get(*v);
    } else {
      v.emplace(make<E>());
    }
  } else if constexpr (k == Kind::variant) {
    std::uint64_t index = varint();
    constexpr std::size_t alternatives = std::variant_size_v<T>;
    if (index >= alternatives) {
      fail("a variant of " + std::to_string(alternatives) + " alternatives has index " +
           std::to_string(index));
    }
    emplace_variant(*this, v, static_cast<std::size_t>(index),
                    std::make_index_sequence<alternatives>{});
  } else if constexpr (k == Kind::monostate) {
  } else if constexpr (k == Kind::map) {
    using K = typename T::key_type;
    using V = typename T::mapped_type;
    constexpr std::size_t min = min_wire_size<K>() + min_wire_size<V>();
    std::size_t n = count<std::pair<K, V>>("a map");
    v.clear();
    if constexpr (requires { v.reserve(n); }) v.reserve(std::min(n, remaining() / (min ? min : 1)));
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t before = offset();
      K key = make<K>();
      V value = make<V>();
      element_read<std::pair<K, V>>(before);
      if constexpr (is_specialization<T, std::map>::value) {
        // encode writes a map in its order; accepting any other would give one value many
        // encodings.
        if (!v.empty() && !v.key_comp()(v.rbegin()->first, key)) {
          fail(v.key_comp()(key, v.rbegin()->first) ? "a map's keys are out of order"
                                                    : "a map repeats a key");
        }
        v.emplace_hint(v.end(), std::move(key), std::move(value));
      } else if (!v.emplace(std::move(key), std::move(value)).second) {
        fail("a map repeats a key");
      }
    }
  } else if constexpr (k == Kind::set) {
    using E = typename T::value_type;
    std::size_t n = count<E>("a set");
    v.clear();
    if constexpr (requires { v.reserve(n); }) v.reserve(std::min(n, remaining()));
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t before = offset();
      E e = make<E>();
      element_read<E>(before);
      if constexpr (is_specialization<T, std::set>::value) {
        // As for std::map: one order, so one encoding.
        if (!v.empty() && !v.key_comp()(*v.rbegin(), e)) {
          fail(v.key_comp()(e, *v.rbegin()) ? "a set's elements are out of order"
                                            : "a set repeats an element");
        }
        v.emplace_hint(v.end(), std::move(e));
      } else if (!v.insert(std::move(e)).second) {
        fail("a set repeats an element");
      }
    }
  } else if constexpr (k == Kind::duration) {
    typename T::rep r{};
    raw(&r, sizeof r);
    v = T(r);
  }
}

inline constexpr std::size_t fingerprint_size = sizeof(std::uint64_t);

/// The bytes `value` encodes to, without the frame's fingerprint.
template <class T>
std::size_t encoded_payload_size(const T& value) {
  SizeArchive size;
  size.add(value);
  return size.size();
}

/// Writes the frame for `value` (fingerprint, then payload) at `out`, which must have room for
/// fingerprint_size + encoded_payload_size(value) bytes. Returns the end of what it wrote.
template <class T>
std::byte* encode_frame_into(const T& value, std::byte* out) {
  note_type<T>();
  std::uint64_t fp = type_fingerprint<T>;
  std::memcpy(out, &fp, sizeof fp);
  WriteArchive w(out + fingerprint_size);
  w.put(value);
  return w.position();
}

/// Checks that `frame` holds a T and returns a reader positioned at its payload.
template <class T>
ReadArchive open_frame(std::span<const std::byte> frame) {
  note_type<T>();
  if (frame.size() < fingerprint_size) {
    protocol_error("truncated message: " + std::to_string(frame.size()) +
                   " bytes cannot hold a message of " + std::string(type_name<T>()));
  }
  std::uint64_t fp;
  std::memcpy(&fp, frame.data(), sizeof fp);
  if (fp != type_fingerprint<T>) {
    protocol_error("type mismatch: expected a message of " + std::string(type_name<T>()) +
                   ", got a message of " + name_of_fingerprint(fp));
  }
  return ReadArchive(frame.data() + fingerprint_size, frame.data() + frame.size());
}

/// Rejects bytes left over after a whole value was read.
template <class T>
void close_frame(const ReadArchive& r) {
  if (r.remaining() != 0) {
    protocol_error("corrupt message: " + std::to_string(r.remaining()) +
                   " unexpected bytes after a message of " + std::string(type_name<T>()));
  }
}

}  // namespace detail

/// Encodes `value` into a self-describing frame (type fingerprint + value).
/// @throws std::bad_alloc; a user serialize() member may throw too.
template <class T>
std::vector<std::byte> encode(const T& value) {
  if constexpr (!detail::require_serializable<T>()) {
    return {};
  } else {
    using U = std::remove_cvref_t<T>;
    const U& v = value;
    std::vector<std::byte> out(detail::fingerprint_size + detail::encoded_payload_size(v));
    detail::encode_frame_into(v, out.data());
    return out;
  }
}

/// Decodes a frame made by encode<T>.
/// @throws ProtocolError if the frame holds another type (both are named), is truncated,
/// has trailing bytes or holds an invalid value.
template <class T>
T decode(std::span<const std::byte> frame) {
  static_assert(!std::is_array_v<T>,
                "procpool: a C array cannot be returned by value; decode a std::array instead");
  if constexpr (!detail::require_serializable<T>()) {
    throw ProtocolError("unreachable");
  } else {
    static_assert(std::is_same_v<T, std::remove_cvref_t<T>>,
                  "procpool: decode<T> takes a plain type, without const or reference");
    detail::ReadArchive r = detail::open_frame<T>(frame);
    T out = r.make<T>();
    detail::close_frame<T>(r);
    return out;
  }
}

}  // namespace procpool
