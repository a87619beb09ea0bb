#pragma once
// The Manager's wire format between a proxy and the server, and the seam through which an
// atomic update names the code that the server runs.
//
// Every message, both ways, is `u64 body length | body`, over a Unix stream socket.
//   request body: u8 op | u64 object id (0 for create_*) | arguments
//   reply body:   u8 status | payload
// Stored values travel as codec frames (fingerprint + payload), so the server keeps bytes it
// never decodes and a proxy of the wrong type gets a ProtocolError naming both types. Dict keys
// travel as codec payloads (no fingerprint): the server compares keys by their bytes, and the
// codec's encoding is canonical. A "bytes" argument is a varint length then that many bytes.
// Strictly one request then one reply per connection at a time: a proxy never pipelines.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "../errors.hpp"
#include "../serialize.hpp"
#include "wire.hpp"

namespace procpool::detail {

/// The largest message (request or reply body) either side accepts: a length field above it is
/// garbage, and the connection that sent it is dropped.
inline constexpr std::uint64_t manager_max_message = std::uint64_t{1} << 30;
/// The smallest request body: op and object id.
inline constexpr std::uint64_t manager_min_request = 1 + sizeof(std::uint64_t);

enum class ManagerOp : std::uint8_t {
  create_dict = 1,   // varint n, n x (bytes key, bytes frame)      -> u64 id
  create_list = 2,   // varint n, n x bytes frame                   -> u64 id
  create_value = 3,  // bytes frame                                 -> u64 id
  create_lock = 4,   //                                             -> u64 id
  create_queue = 5,  // u64 maxsize                                 -> u64 id

  dict_set = 10,       // bytes key, bytes frame
  dict_get = 11,       // bytes key                 -> bytes frame (out_of_range if absent)
  dict_find = 12,      // bytes key                 -> u8 found [, bytes frame]
  dict_contains = 13,  // bytes key                 -> u8
  dict_erase = 14,     // bytes key                 -> u8 erased
  dict_size = 15,      //                           -> u64
  dict_items = 16,     //                           -> varint n, n x (bytes key, bytes frame)
  dict_clear = 17,     //
  dict_update = 18,    // bytes key, u8 has_initial [, bytes], u64 fn, bytes state -> bytes

  list_append = 30,    // bytes frame
  list_get = 31,       // u64 index                 -> bytes frame (out_of_range past the end)
  list_set = 32,       // u64 index, bytes frame    (out_of_range past the end)
  list_size = 33,      //                           -> u64
  list_reverse = 34,   //
  list_snapshot = 35,  //                           -> varint n, n x bytes frame
  list_clear = 36,     //
  list_update = 37,    // u64 index, u64 fn, bytes state -> bytes frame

  value_get = 50,     //                           -> bytes frame
  value_set = 51,     // bytes frame
  value_update = 52,  // u64 fn, bytes state       -> bytes frame

  lock_acquire = 60,  // i64 timeout ns (-1: forever, 0: try) -> u8 acquired
  lock_release = 61,  //                           (logic_error if not held)

  queue_put = 70,    // i64 timeout ns, bytes frame (status full on timeout)
  queue_get = 71,    // i64 timeout ns            -> bytes frame (status empty on timeout)
  queue_qsize = 72,  //                           -> u64
};

enum class ManagerStatus : std::uint8_t {
  ok = 0,
  error = 1,     // an exception, as wire.hpp's encode_error writes it
  protocol = 2,  // string: rethrown as ProtocolError
  empty = 3,     // procpool::Empty
  full = 4,      // procpool::Full
};

// ---------------------------------------------------------------------------------------------
// Spinning before sleeping. A proxy's reply and a busy client's next request usually arrive
// within microseconds; sleeping and being woken costs far more than that on each side (a wake-up
// across CPUs is tens of microseconds, hundreds on a loaded VM). So each side polls for a short
// while, yielding its CPU between polls (the peer may be waiting for that CPU), before it
// blocks. The budget doubles when polling found what it waited for and halves when it did not;
// a poll that lost its CPU to another task counts as a miss. Below a floor polling stops (a
// blocked waiter, a busy machine: there a sleeper that is woken gets the CPU sooner than a
// poller that yielded it), except for one short probe every few waits, which brings the budget
// back when polling pays again. On a single CPU polling only steals the peer's time: no budget.

class AdaptiveSpin {
 public:
  static constexpr std::int64_t max_ns = 50'000;
  static constexpr std::int64_t min_ns = 2'000;
  static constexpr std::int64_t probe_ns = 8'000;
  static constexpr unsigned probe_every = 16;

  /// How long to poll before blocking, in nanoseconds (0: do not poll).
  std::int64_t budget_ns() noexcept {
    if (!enabled()) return 0;
    if (budget_ > 0) return budget_;
    // Polling stopped paying (a busy machine, or a peer that is slow to answer); try again now
    // and then, so that the budget comes back when the situation does.
    return ++waits_ % probe_every == 0 ? probe_ns : 0;
  }
  /// The wait ended while polling.
  void hit() noexcept { budget_ = std::clamp(budget_ * 2, probe_ns, max_ns); }
  /// Polling ran out (or this process lost its CPU meanwhile) and the caller blocks.
  void miss() noexcept { budget_ = budget_ / 2 < min_ns ? 0 : budget_ / 2; }

  static std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

 private:
  static bool enabled() noexcept {
    static const bool multi_cpu = [] {
      cpu_set_t set;
      CPU_ZERO(&set);
      return ::sched_getaffinity(0, sizeof set, &set) != 0 || CPU_COUNT(&set) > 1;
    }();
    return multi_cpu;
  }

  std::int64_t budget_ = max_ns;
  unsigned waits_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Building messages.

/// Starts a message in `b` (a u64 length placeholder); returns its position for finish_message.
inline std::size_t manager_begin(ByteBuffer& b) {
  std::size_t at = b.size();
  b.put(std::uint64_t{0});
  return at;
}
inline void manager_finish(ByteBuffer& b, std::size_t at) noexcept {
  std::uint64_t len = b.size() - at - sizeof(std::uint64_t);
  std::memcpy(b.data() + at, &len, sizeof len);
}
inline void put_bytes(ByteBuffer& b, std::span<const std::byte> bytes) {
  b.varint(bytes.size());
  b.append(bytes.data(), bytes.size());
}
inline void put_bytes(ByteBuffer& b, std::string_view bytes) {
  put_bytes(b, std::as_bytes(std::span<const char>(bytes.data(), bytes.size())));
}
/// Appends `v` as a bytes argument holding its codec frame.
template <class T>
void put_frame(ByteBuffer& b, const T& v) {
  std::size_t size = fingerprint_size + encoded_payload_size(v);
  b.varint(size);
  std::size_t at = b.size();
  try {
    encode_frame_into(v, b.grow(size));
  } catch (...) {
    b.truncate(at);
    throw;
  }
}
/// Appends `v` as a bytes argument holding its codec payload (no fingerprint): dict keys.
template <class T>
void put_payload(ByteBuffer& b, const T& v) {
  b.varint(encoded_payload_size(v));
  b.encode(v);
}

// ---------------------------------------------------------------------------------------------
// Reading messages. Every read is bounded by the message, which is bounded by
// manager_max_message.

/// Reads a bytes argument.
inline std::span<const std::byte> take_bytes(ReadArchive& r) {
  std::size_t n = r.count<std::byte>("a manager message field");
  return {r.take(n), n};
}
inline std::string_view as_view(std::span<const std::byte> s) noexcept {
  return {reinterpret_cast<const char*>(s.data()), s.size()};
}
inline std::span<const std::byte> as_span(std::string_view s) noexcept {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}
/// Decodes a codec payload (as put_payload wrote it) as a T.
template <class T>
T decode_payload(std::span<const std::byte> bytes) {
  note_type<T>();
  ReadArchive r(bytes.data(), bytes.data() + bytes.size());
  T v = r.make<T>();
  close_frame<T>(r);
  return v;
}

// ---------------------------------------------------------------------------------------------
// The update seam. An update request names its trampoline (run_update<T, F>, one per value type
// and callable type) by its offset from the anchor the pool uses (wire.hpp's function_anchor),
// and carries the callable's state as the pool carries a task's. The server is a fork of the
// program, so the code is there. Unlike a pool worker, the server serves many clients and must
// survive a hostile one: it calls a reference only if it is one of the trampolines this program
// registered (every instantiation registers itself during static initialisation, before the
// server is forked), so a forged reference is refused instead of jumped to.

/// What a trampoline works on: the callable's bytes, the stored frame, and the new frame.
struct ManagerUpdate {
  std::span<const std::byte> state;
  std::span<const std::byte> current;
  std::string result;
};
using ManagerUpdateFn = void (*)(ManagerUpdate&);

inline std::uint64_t update_fn_ref(ManagerUpdateFn fn) noexcept {
  return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(fn) -
                                    reinterpret_cast<std::uintptr_t>(&function_anchor));
}
inline ManagerUpdateFn resolve_update_fn_ref(std::uint64_t ref) noexcept {
  return reinterpret_cast<ManagerUpdateFn>(reinterpret_cast<std::uintptr_t>(&function_anchor) +
                                           static_cast<std::uintptr_t>(ref));
}

// An intrusive, append-only list of statically allocated nodes, as the codec's type table:
// registering allocates nothing and takes no lock.
struct UpdateFnNode {
  ManagerUpdateFn fn;
  UpdateFnNode* next;
};
inline std::atomic<UpdateFnNode*>& update_fn_head() noexcept {
  static std::atomic<UpdateFnNode*> head{nullptr};
  return head;
}
inline bool register_update_fn(UpdateFnNode& node) noexcept {
  auto& head = update_fn_head();
  node.next = head.load(std::memory_order_relaxed);
  while (!head.compare_exchange_weak(node.next, &node, std::memory_order_release,
                                     std::memory_order_relaxed)) {
  }
  return true;
}
/// The registered trampoline with this reference, or nullptr: never a forged address.
inline ManagerUpdateFn find_update_fn(std::uint64_t ref) noexcept {
  for (UpdateFnNode* n = update_fn_head().load(std::memory_order_acquire); n; n = n->next) {
    if (update_fn_ref(n->fn) == ref) return n->fn;
  }
  return nullptr;
}

/// Writes `value`'s codec frame into `out`.
template <class T>
void frame_into_string(const T& value, std::string& out) {
  out.resize(fingerprint_size + encoded_payload_size(value));
  encode_frame_into(value, reinterpret_cast<std::byte*>(out.data()));
}

/// Calls the update callable on `value`: f(value) changes it in place when f returns void;
/// otherwise what f returns becomes the new value.
template <class T, class F>
void apply_update(F& f, T& value) {
  if constexpr (std::is_void_v<std::invoke_result_t<F&, T&>>) {
    std::invoke(f, value);
  } else {
    value = static_cast<T>(std::invoke(f, value));
  }
}

/// The trampoline for updates of a T by a callable F. Runs in the server.
template <class T, class F>
void run_update(ManagerUpdate& u) {
  T value = decode<T>(u.current);
  if constexpr (std::is_empty_v<F> && std::is_default_constructible_v<F>) {
    F f{};
    apply_update<T>(f, value);
  } else if constexpr (kind_of<F>() == Kind::user) {
    F f = decode_payload<F>(u.state);
    apply_update<T>(f, value);
  } else {
    if (u.state.size() != sizeof(F)) {
      throw ProtocolError("procpool: manager update: callable state of " +
                          std::to_string(u.state.size()) + " bytes, expected " +
                          std::to_string(sizeof(F)));
    }
    // The callable is trivially copyable: its bytes are the object (C++20 creates it
    // implicitly in the storage).
    alignas(F) unsigned char storage[sizeof(F)];
    std::memcpy(storage, u.state.data(), sizeof(F));
    apply_update<T>(*std::launder(reinterpret_cast<F*>(storage)), value);
  }
  frame_into_string(value, u.result);
}

template <class T, class F>
struct update_fn_registration {
  static inline UpdateFnNode node{&run_update<T, F>, nullptr};
  static inline const bool done = register_update_fn(node);
};

/// The reference an update of a T by an F carries; instantiating it registers the trampoline.
template <class T, class F>
std::uint64_t update_ref() noexcept {
  (void)update_fn_registration<T, F>::done;
  return update_fn_ref(&run_update<T, F>);
}

/// Appends the callable's state: nothing for an empty type, its codec payload when it has a
/// serialize member, else its bytes (it is trivially copyable).
template <class F>
void put_callable_state(ByteBuffer& b, const F& f) {
  if constexpr (std::is_empty_v<F> && std::is_default_constructible_v<F>) {
    b.varint(0);
  } else if constexpr (kind_of<F>() == Kind::user) {
    put_payload(b, f);
  } else {
    b.varint(sizeof(F));
    b.append(std::addressof(f), sizeof(F));
  }
}

}  // namespace procpool::detail
