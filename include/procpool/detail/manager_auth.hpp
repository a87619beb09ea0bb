#pragma once
// The Manager's authentication: a random 32-byte key made by the Manager, a fresh 16-byte nonce
// sent by the server on every connection, and the client's answer, a keyed digest of the nonce.
//
// The digest is SipHash-2-4 with 128-bit output (Aumasson and Bernstein's PRF, implemented here
// from the paper), run twice: once under each 16-byte half of the key. SipHash is a PRF, so
// without the key an answer cannot be computed, and the nonce makes every answer good for one
// connection only: a recorded answer is worthless. The key itself never crosses the server's
// socket, so a client that reached some other listener by mistake gives nothing away.

#include <sys/random.h>

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>

#include "posix.hpp"

namespace procpool::detail {

/// The secret shared by a Manager, its server and every proxy of it.
using ManagerKey = std::array<std::byte, 32>;
/// What the server sends first on every connection: magic, then a random nonce.
inline constexpr std::string_view manager_magic = "procpool-manager-1";
inline constexpr std::size_t manager_nonce_size = 16;
inline constexpr std::size_t manager_challenge_size = manager_magic.size() + manager_nonce_size;
/// What the client answers: two 16-byte SipHash-2-4-128 digests of the challenge.
inline constexpr std::size_t manager_answer_size = 32;
using ManagerNonce = std::array<std::byte, manager_nonce_size>;
using ManagerAnswer = std::array<std::byte, manager_answer_size>;

/// Fills `out` with bytes from the kernel's CSPRNG (getrandom, blocking only until the pool is
/// seeded at boot). @throws std::system_error naming getrandom.
inline void random_bytes(std::span<std::byte> out) {
  std::size_t got = 0;
  while (got < out.size()) {
    ssize_t n = retry_eintr([&] { return ::getrandom(out.data() + got, out.size() - got, 0); });
    if (n < 0) throw_errno("getrandom");
    got += static_cast<std::size_t>(n);
  }
}

/// SipHash-2-4 with a 64-bit (out.size() == 8) or 128-bit (out.size() == 16) output, as in the
/// reference description: little-endian words, output bytes little-endian.
inline void siphash24(std::span<const std::byte, 16> key, std::span<const std::byte> msg,
                      std::span<std::byte> out) noexcept {
  auto load64 = [](const std::byte* p) noexcept {
    std::uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint8_t>(p[i]);
    return v;
  };
  auto store64 = [](std::uint64_t v, std::byte* p) noexcept {
    for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
  };
  const std::uint64_t k0 = load64(key.data());
  const std::uint64_t k1 = load64(key.data() + 8);
  std::uint64_t v0 = 0x736f6d6570736575ull ^ k0;
  std::uint64_t v1 = 0x646f72616e646f6dull ^ k1;
  std::uint64_t v2 = 0x6c7967656e657261ull ^ k0;
  std::uint64_t v3 = 0x7465646279746573ull ^ k1;
  const bool wide = out.size() == 16;
  if (wide) v1 ^= 0xee;
  auto round = [&]() noexcept {
    v0 += v1;
    v1 = std::rotl(v1, 13);
    v1 ^= v0;
    v0 = std::rotl(v0, 32);
    v2 += v3;
    v3 = std::rotl(v3, 16);
    v3 ^= v2;
    v0 += v3;
    v3 = std::rotl(v3, 21);
    v3 ^= v0;
    v2 += v1;
    v1 = std::rotl(v1, 17);
    v1 ^= v2;
    v2 = std::rotl(v2, 32);
  };
  const std::size_t len = msg.size();
  const std::size_t whole = len - len % 8;
  for (std::size_t i = 0; i < whole; i += 8) {
    std::uint64_t m = load64(msg.data() + i);
    v3 ^= m;
    round();
    round();
    v0 ^= m;
  }
  std::uint64_t b = static_cast<std::uint64_t>(len) << 56;
  for (std::size_t i = 0; i < len % 8; ++i) {
    b |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(msg[whole + i])) << (8 * i);
  }
  v3 ^= b;
  round();
  round();
  v0 ^= b;
  v2 ^= wide ? 0xee : 0xff;
  for (int i = 0; i < 4; ++i) round();
  store64(v0 ^ v1 ^ v2 ^ v3, out.data());
  if (!wide) return;
  v1 ^= 0xdd;
  for (int i = 0; i < 4; ++i) round();
  store64(v0 ^ v1 ^ v2 ^ v3, out.data() + 8);
}

/// The answer to a challenge (magic + nonce) under `key`.
inline ManagerAnswer manager_answer(const ManagerKey& key,
                                    std::span<const std::byte> challenge) noexcept {
  ManagerAnswer a{};
  std::span<const std::byte, 32> k(key);
  siphash24(k.first<16>(), challenge, std::span<std::byte>(a).first(16));
  siphash24(k.last<16>(), challenge, std::span<std::byte>(a).last(16));
  return a;
}

/// Compares in time independent of where the inputs differ, so that timing the server's
/// refusals teaches nothing about the expected answer.
inline bool constant_time_equal(std::span<const std::byte> a,
                                std::span<const std::byte> b) noexcept {
  if (a.size() != b.size()) return false;
  unsigned diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned>(a[i] ^ b[i]);
  }
  return diff == 0;
}

}  // namespace procpool::detail
