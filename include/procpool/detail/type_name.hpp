#pragma once
// Compile-time type names and fingerprints, and a process-wide table from fingerprint back to
// name so that a message of the wrong type can be reported with both types named.

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

namespace procpool::detail {

template <class T>
constexpr const char* pretty_function() noexcept {
  return __PRETTY_FUNCTION__;
}

/// The name of T as the compiler spells it ("int", "std::vector<int>"), at compile time.
/// Parsed out of __PRETTY_FUNCTION__: "... pretty_function() [with T = int]" (GCC) or
/// "... pretty_function() [T = int]" (Clang).
template <class T>
constexpr std::string_view type_name() noexcept {
  std::string_view p = pretty_function<T>();
  auto start = p.find("T = ");
  if (start == std::string_view::npos) return p;
  start += 4;
  auto end = p.rfind(']');
  return p.substr(start, end - start);
}

/// FNV-1a, 64 bit.
constexpr std::uint64_t fnv1a(std::string_view s) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

/// A 64-bit fingerprint of T, identical in every process running the same program.
/// Distinct types get distinct fingerprints (`int` vs `unsigned`, `pair` vs `tuple`).
template <class T>
inline constexpr std::uint64_t type_fingerprint = fnv1a(type_name<T>());

// The table is an intrusive, append-only list of statically allocated nodes: registration
// allocates nothing and takes no lock, so it is safe during static initialisation and in a
// forked child.
struct TypeNode {
  std::uint64_t fingerprint;
  std::string_view name;
  TypeNode* next;
};

inline std::atomic<TypeNode*>& type_table_head() noexcept {
  static std::atomic<TypeNode*> head{nullptr};
  return head;
}

inline bool register_type(TypeNode& node) noexcept {
  auto& head = type_table_head();
  node.next = head.load(std::memory_order_relaxed);
  while (!head.compare_exchange_weak(node.next, &node, std::memory_order_release,
                                     std::memory_order_relaxed)) {
  }
  return true;
}

template <class T>
struct type_registration {
  static inline TypeNode node{type_fingerprint<T>, type_name<T>(), nullptr};
  static inline const bool done = register_type(node);
};

/// Makes T's name known to name_of_fingerprint() in every process of this program. Called by
/// every encode<T> and decode<T>, so every type that is ever sent or received is known.
template <class T>
inline void note_type() noexcept {
  (void)type_registration<T>::done;
}

/// The name of the type with this fingerprint, if this program ever encodes or decodes it.
inline std::string name_of_fingerprint(std::uint64_t fp) {
  for (TypeNode* n = type_table_head().load(std::memory_order_acquire); n; n = n->next) {
    if (n->fingerprint == fp) return std::string(n->name);
  }
  char buf[40];
  static constexpr char hex[] = "0123456789abcdef";
  std::string s = "an unknown type (fingerprint 0x";
  for (int i = 15; i >= 0; --i) buf[15 - i] = hex[(fp >> (i * 4)) & 0xf];
  s.append(buf, 16);
  s += ")";
  return s;
}

}  // namespace procpool::detail
