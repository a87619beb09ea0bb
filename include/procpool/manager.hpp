#pragma once
/// @file manager.hpp
/// Manager: a server process that owns shared dicts, lists, values, locks and queues, and the
/// typed proxies through which any process of the program uses them, as Python's
/// multiprocessing.Manager.
///
/// ```cpp
/// procpool::Manager manager;
/// auto counts = manager.dict<std::string, int>({{"count", 0}});
/// procpool::Pool pool(4);                       // may also have been built before the Manager
/// pool.map([](auto d) { d.update("count", [](int& c) { ++c; }); },
///          std::vector(100, counts));           // proxies travel as task arguments
/// int n = counts.get("count");                  // 100
/// ```
///
/// The server is a fork of the program, made by the Manager's constructor. Values live there as
/// encoded bytes; every proxy operation is one request and one reply over a Unix socket, and is
/// atomic. Proxies are handles: copies (in this process, in a forked Process, or decoded from a
/// task argument in a pool worker) all refer to the one object in the server, which lives until
/// the manager shuts down. Because a proxy only names its object, all of its operations are
/// const.
///
/// `update` is the atomic read-modify-write: `d.update(key, f)`, `l.update(i, f)`,
/// `v.update(f)` run `f` on the stored value inside the server, where no other request can
/// interleave, and return the new value. `f` is called as `f(value&)`: if it returns void it
/// changes the value in place; otherwise what it returns becomes the new value. It travels as
/// a pool task's callable does (a function pointer, a lambda capturing nothing or only
/// trivially copyable values, or a function object with a serialize member): its code by
/// address (the server is a fork of the program), its captures by their bytes. Captured
/// pointers and references name the server's memory, a copy of the program's as it was when the
/// Manager was built: capture values, not references. If `f` throws, the value is unchanged and
/// the exception is rethrown by `update` (the standard types as themselves, others as
/// RemoteError). `f` runs in the server, so it must be quick and must not use proxies; a crash
/// in it takes the server down.
///
/// Security: the server listens only on a Unix socket in a fresh directory made by mkdtemp (mode
/// 0700), never in the abstract namespace and never on TCP, so other users cannot connect; and
/// every connection must answer a challenge (a random nonce) with a SipHash-2-4 digest keyed
/// by the manager's 32-byte random key, which only this program's processes know (it travels
/// inside serialized proxies), so a process of the same user without the key is refused. A
/// client that sends anything malformed, or disconnects mid-request, loses its connection; the
/// server and every other client go on. A lock held by a process that dies (whose connection
/// closes) is released. The key is the trust boundary: a client that holds it is part of the
/// program, and the callable state an update carries is trusted as a pool task's is (the server
/// only refuses function references that are not update trampolines of this program).
///
/// The server is forked from the thread that constructs the Manager; like a Process child it
/// then allocates (glibc's fork() makes malloc safe in the child) but takes no lock of the
/// program. Build Managers in main() or later, not during static initialisation (update
/// trampolines register themselves then, before the server is forked).
///
/// Lifetime: shutdown() (or the destructor) stops the server and removes its socket and
/// directory; afterwards every proxy operation throws ManagerError. If the program dies, even
/// by SIGKILL, the server notices (it watches a pidfd of the program) and exits too.

#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <ranges>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/internal_fds.hpp"
#include "detail/manager_auth.hpp"
#include "detail/manager_client.hpp"
#include "detail/manager_server.hpp"
#include "detail/manager_wire.hpp"
#include "detail/posix.hpp"
#include "detail/wire.hpp"
#include "errors.hpp"
#include "process.hpp"
#include "serialize.hpp"

namespace procpool {

class Manager;

namespace detail {
struct ManagerAccess;
}  // namespace detail

/// Instantiated only for an update callable that cannot be sent to the manager's server, so
/// that the compiler's first line names it.
template <class F>
struct update_callable_cannot_be_sent {
  static_assert(
      sizeof(F) == 0,
      "procpool: the callable named in 'update_callable_cannot_be_sent<...>' above cannot be "
      "sent to the manager's server. Use a function pointer, a lambda that captures nothing or "
      "only trivially copyable values, or a function object with a serialize member. A "
      "std::function, or a lambda capturing a std::string, std::vector or other owning object, "
      "cannot travel.");
};

namespace detail {

template <class T>
struct is_std_function_type : std::false_type {};
template <class Sig>
struct is_std_function_type<std::function<Sig>> : std::true_type {};

/// A type stored in a manager: Serializable and decodable. Fails compilation naming the type.
template <class T>
constexpr bool require_manager_value() {
  if constexpr (!require_serializable<T>()) {
    return false;
  } else {
    static_assert(std::is_default_constructible_v<T> || kind_of<T>() == Kind::bytes,
                  "procpool: a type stored in a Manager must be default-constructible (its fields "
                  "are then filled in by its serialize member) to be decoded");
    return true;
  }
}

/// True when F can be shipped to the server to update a T; fails compilation readably otherwise.
template <class F, class T>
constexpr bool require_update_callable() {
  if constexpr (is_std_function_type<F>::value ||
                !((std::is_trivially_copyable_v<F> && std::is_copy_constructible_v<F>) ||
                  (kind_of<F>() == Kind::user && std::is_default_constructible_v<F>))) {
    (void)sizeof(update_callable_cannot_be_sent<F>);
    return false;
  } else {
    static_assert(std::is_invocable_v<F&, T&>,
                  "procpool: an update callable is called as f(value&) with the stored value");
    if constexpr (std::is_invocable_v<F&, T&>) {
      using R = std::invoke_result_t<F&, T&>;
      static_assert(std::is_void_v<R> || std::is_convertible_v<R, T>,
                    "procpool: an update callable returns void (it changed the value in place) "
                    "or the new value");
    }
    return true;
  }
}

/// A timeout for the server: 0 for "do not wait", -1 for "forever", else nanoseconds (>= 1).
template <class Rep, class Period>
std::int64_t manager_timeout_ns(std::chrono::duration<Rep, Period> d) {
  if (d <= d.zero()) return 0;
  // Compared as floating point seconds, so that no cast can overflow: a century is forever.
  if (std::chrono::duration<double>(d).count() >= 100.0 * 365 * 24 * 3600) return -1;
  auto ns = std::chrono::ceil<std::chrono::nanoseconds>(d).count();
  return ns > 0 ? static_cast<std::int64_t>(ns) : 1;
}

/// What every proxy holds: where its manager is, the key, and its object's id. Serialized as
/// exactly those; the cached endpoint is this process's only.
class ProxyCore {
 public:
  ProxyCore() = default;
  ProxyCore(std::shared_ptr<ManagerEndpoint> ep, std::uint64_t id)
      : address_(ep->address()), key_(ep->key()), id_(id), ep_(std::move(ep)) {}

  template <class Archive>
  void serialize(Archive& ar) {
    ar(address_, key_, id_);
    if constexpr (std::is_same_v<Archive, ReadArchive>) ep_.reset();
  }

  /// This process's endpoint of the manager: the cached one if it is this process's (the
  /// usual case), else the registry's (in a fork, or for a proxy decoded from a message).
  std::shared_ptr<ManagerEndpoint> endpoint() const {
    if (address_.empty()) {
      throw std::logic_error("procpool: this proxy refers to no manager object");
    }
    if (ep_ && ep_->pid() == PidCache::get()) return ep_;
    return ManagerRegistry::instance().get(address_, key_);
  }

  /// One request and its reply: `build` appends the arguments, `read` decodes the payload.
  template <class Build, class Read>
  auto call(ManagerOp op, Build&& build, Read&& read) const {
    std::shared_ptr<ManagerEndpoint> ep = endpoint();
    ManagerEndpoint::Lease lease(*ep, ep->take());
    ByteBuffer& b = lease->request();
    std::size_t at = manager_begin(b);
    b.put(static_cast<std::uint8_t>(op));
    b.put(id_);
    build(b);
    manager_finish(b, at);
    ReadArchive r = lease->call();
    using R = decltype(read(r));
    if constexpr (std::is_void_v<R>) {
      read(r);
      end(r);
    } else {
      R result = read(r);
      end(r);
      return result;
    }
  }

  std::uint64_t id() const noexcept { return id_; }

 private:
  static void end(const ReadArchive& r) {
    if (r.remaining() != 0) protocol_error("corrupt manager reply: trailing bytes");
  }

  std::string address_;
  ManagerKey key_{};
  std::uint64_t id_ = 0;
  std::shared_ptr<ManagerEndpoint> ep_;
};

inline constexpr auto no_args = [](ByteBuffer&) {};
inline constexpr auto no_reply = [](ReadArchive&) {};

template <class T>
T read_frame(ReadArchive& r) {
  return decode<T>(take_bytes(r));
}
inline std::uint64_t read_u64(ReadArchive& r) {
  std::uint64_t v = 0;
  r(v);
  return v;
}
inline bool read_flag(ReadArchive& r) {
  std::uint8_t v = 0;
  r(v);
  if (v > 1) protocol_error("corrupt manager reply: bad flag");
  return v != 0;
}

}  // namespace detail

/// A dict in a manager's server (what Python's `manager.dict()` returns): keys K to values V,
/// both Serializable. Keys are compared by their encoding (equal values encode equally; note
/// that 0.0 and -0.0 are distinct keys). Every operation is atomic, blocks for one round trip
/// to the server, and throws ManagerError if the server is gone. Safe to use from several
/// threads and processes.
template <class K, class V>
class DictProxy {
  static_assert(detail::require_manager_value<K>() && detail::require_manager_value<V>());

 public:
  using key_type = K;     ///< the key type
  using mapped_type = V;  ///< the value type

  /// A proxy of nothing, to be assigned or decoded into; its operations throw std::logic_error.
  DictProxy() = default;

  /// d[key] = value.
  void set(const K& key, const V& value) const {
    core_.call(
        detail::ManagerOp::dict_set,
        [&](detail::ByteBuffer& b) {
          detail::put_payload(b, key);
          detail::put_frame(b, value);
        },
        detail::no_reply);
  }
  /// d[key]. @throws std::out_of_range if the key is absent.
  V get(const K& key) const {
    return core_.call(
        detail::ManagerOp::dict_get, [&](detail::ByteBuffer& b) { detail::put_payload(b, key); },
        [](detail::ReadArchive& r) { return detail::read_frame<V>(r); });
  }
  /// d.get(key, default_value): the value, or default_value if the key is absent.
  V get(const K& key, const V& default_value) const {
    return core_.call(
        detail::ManagerOp::dict_find, [&](detail::ByteBuffer& b) { detail::put_payload(b, key); },
        [&](detail::ReadArchive& r) {
          return detail::read_flag(r) ? detail::read_frame<V>(r) : default_value;
        });
  }
  /// key in d.
  bool contains(const K& key) const {
    return core_.call(
        detail::ManagerOp::dict_contains,
        [&](detail::ByteBuffer& b) { detail::put_payload(b, key); }, detail::read_flag);
  }
  /// Removes the key; true if it was there.
  bool erase(const K& key) const {
    return core_.call(
        detail::ManagerOp::dict_erase, [&](detail::ByteBuffer& b) { detail::put_payload(b, key); },
        detail::read_flag);
  }
  /// len(d).
  std::size_t size() const {
    return core_.call(detail::ManagerOp::dict_size, detail::no_args, detail::read_u64);
  }
  /// A snapshot of every (key, value) pair, in no particular order.
  std::vector<std::pair<K, V>> items() const {
    return core_.call(detail::ManagerOp::dict_items, detail::no_args, [](detail::ReadArchive& r) {
      std::size_t n = r.count<std::pair<char, char>>("a manager dict's items");
      std::vector<std::pair<K, V>> out;
      out.reserve(r.reservable<std::pair<K, V>>(n));
      for (std::size_t i = 0; i < n; ++i) {
        K k = detail::decode_payload<K>(detail::take_bytes(r));
        V v = detail::read_frame<V>(r);
        out.emplace_back(std::move(k), std::move(v));
      }
      return out;
    });
  }
  /// Removes every key.
  void clear() const {
    core_.call(detail::ManagerOp::dict_clear, detail::no_args, detail::no_reply);
  }

  /// Atomically replaces d[key] by f applied to it, in the server, and returns the new value
  /// (see the file comment for what f may be). @throws std::out_of_range if the key is absent
  /// (f is not called); what f threw, with the value unchanged.
  template <class F>
  V update(const K& key, F f) const {
    return update_impl(key, nullptr, f);
  }
  /// Atomically replaces d[key] by f applied to it, starting from `initial` if the key is
  /// absent (d[key] = f(d.get(key, initial))), and returns the new value.
  template <class F>
  V update(const K& key, const V& initial, F f) const {
    return update_impl(key, &initial, f);
  }

  /// Encodes or decodes the proxy (its manager's address and key, and the object's id).
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  friend class Manager;
  explicit DictProxy(detail::ProxyCore core) : core_(std::move(core)) {}

  template <class F>
  V update_impl(const K& key, const V* initial, const F& f) const {
    if constexpr (!detail::require_update_callable<F, V>()) {
      return V{};
    } else {
      return core_.call(
          detail::ManagerOp::dict_update,
          [&](detail::ByteBuffer& b) {
            detail::put_payload(b, key);
            b.put(std::uint8_t{initial != nullptr});
            if (initial) detail::put_frame(b, *initial);
            b.put(detail::update_ref<V, F>());
            detail::put_callable_state(b, f);
          },
          [](detail::ReadArchive& r) { return detail::read_frame<V>(r); });
    }
  }

  detail::ProxyCore core_;
};

/// A list in a manager's server, of Serializable T (what Python's `manager.list()` returns).
/// Every operation is atomic, blocks for one round trip to the server, and throws ManagerError
/// if the server is gone.
template <class T>
class ListProxy {
  static_assert(detail::require_manager_value<T>());

 public:
  using value_type = T;  ///< the stored type

  /// A proxy of nothing, to be assigned or decoded into; its operations throw std::logic_error.
  ListProxy() = default;

  /// l.append(value).
  void append(const T& value) const {
    core_.call(
        detail::ManagerOp::list_append, [&](detail::ByteBuffer& b) { detail::put_frame(b, value); },
        detail::no_reply);
  }
  /// l[i]. @throws std::out_of_range if i >= size().
  T get(std::size_t i) const {
    return core_.call(
        detail::ManagerOp::list_get, [&](detail::ByteBuffer& b) { b.put(std::uint64_t{i}); },
        [](detail::ReadArchive& r) { return detail::read_frame<T>(r); });
  }
  /// l[i] = value. @throws std::out_of_range if i >= size().
  void set(std::size_t i, const T& value) const {
    core_.call(
        detail::ManagerOp::list_set,
        [&](detail::ByteBuffer& b) {
          b.put(std::uint64_t{i});
          detail::put_frame(b, value);
        },
        detail::no_reply);
  }
  /// len(l).
  std::size_t size() const {
    return core_.call(detail::ManagerOp::list_size, detail::no_args, detail::read_u64);
  }
  /// Reverses the list in place.
  void reverse() const {
    core_.call(detail::ManagerOp::list_reverse, detail::no_args, detail::no_reply);
  }
  /// A copy of the whole list.
  std::vector<T> snapshot() const {
    return core_.call(detail::ManagerOp::list_snapshot, detail::no_args,
                      [](detail::ReadArchive& r) {
                        std::size_t n = r.count<char>("a manager list's items");
                        std::vector<T> out;
                        out.reserve(r.reservable<T>(n));
                        for (std::size_t i = 0; i < n; ++i) out.push_back(detail::read_frame<T>(r));
                        return out;
                      });
  }
  /// Removes every item.
  void clear() const {
    core_.call(detail::ManagerOp::list_clear, detail::no_args, detail::no_reply);
  }

  /// Atomically replaces l[i] by f applied to it, in the server, and returns the new value.
  /// @throws std::out_of_range if i >= size() (f is not called); what f threw.
  template <class F>
  T update(std::size_t i, F f) const {
    if constexpr (!detail::require_update_callable<F, T>()) {
      return T{};
    } else {
      return core_.call(
          detail::ManagerOp::list_update,
          [&](detail::ByteBuffer& b) {
            b.put(std::uint64_t{i});
            b.put(detail::update_ref<T, F>());
            detail::put_callable_state(b, f);
          },
          [](detail::ReadArchive& r) { return detail::read_frame<T>(r); });
    }
  }

  /// Encodes or decodes the proxy.
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  friend class Manager;
  explicit ListProxy(detail::ProxyCore core) : core_(std::move(core)) {}
  detail::ProxyCore core_;
};

/// One value of Serializable T in a manager's server (what Python's `manager.Value()` returns).
/// Every operation is atomic, blocks for one round trip, and throws ManagerError if the server
/// is gone.
template <class T>
class ValueProxy {
  static_assert(detail::require_manager_value<T>());

 public:
  using value_type = T;  ///< the stored type

  /// A proxy of nothing, to be assigned or decoded into; its operations throw std::logic_error.
  ValueProxy() = default;

  /// The value.
  T get() const {
    return core_.call(detail::ManagerOp::value_get, detail::no_args,
                      [](detail::ReadArchive& r) { return detail::read_frame<T>(r); });
  }
  /// Replaces the value.
  void set(const T& value) const {
    core_.call(
        detail::ManagerOp::value_set, [&](detail::ByteBuffer& b) { detail::put_frame(b, value); },
        detail::no_reply);
  }
  /// Atomically replaces the value by f applied to it, in the server, and returns the new
  /// value: `v.update([](int& x) { ++x; })`. @throws what f threw (the value is unchanged).
  template <class F>
  T update(F f) const {
    if constexpr (!detail::require_update_callable<F, T>()) {
      return T{};
    } else {
      return core_.call(
          detail::ManagerOp::value_update,
          [&](detail::ByteBuffer& b) {
            b.put(detail::update_ref<T, F>());
            detail::put_callable_state(b, f);
          },
          [](detail::ReadArchive& r) { return detail::read_frame<T>(r); });
    }
  }

  /// Encodes or decodes the proxy.
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  friend class Manager;
  explicit ValueProxy(detail::ProxyCore core) : core_(std::move(core)) {}
  detail::ProxyCore core_;
};

/// A lock in a manager's server, usable with std::scoped_lock / std::unique_lock from any
/// process. It is not owned by a thread: any holder of a proxy may unlock it (as Python's
/// manager Lock). While a call waits for the lock, the waiting happens in the server (the
/// server serves everyone else meanwhile) and only the calling thread blocks. If the process
/// that acquired it dies (its connection to the server closes) the server releases it and the
/// next waiter gets it; the threads of one process share that process's connections, so a
/// thread that exits holding the lock leaves it held, as with any lock.
class LockProxy {
 public:
  /// A proxy of nothing, to be assigned or decoded into; its operations throw std::logic_error.
  LockProxy() = default;

  /// Acquires the lock, blocking until it is free. @throws ManagerError if the server is gone.
  void lock() const { (void)acquire_ns(-1); }
  /// Acquires the lock if it is free; never waits. @throws ManagerError.
  bool try_lock() const { return acquire_ns(0); }
  /// Acquires the lock, waiting at most `timeout` (negative means zero). True if acquired.
  /// @throws ManagerError.
  template <class Rep, class Period>
  bool acquire(std::chrono::duration<Rep, Period> timeout) const {
    return acquire_ns(detail::manager_timeout_ns(timeout));
  }
  /// Releases the lock. @throws std::logic_error if it is not locked; ManagerError.
  void unlock() const {
    core_.call(detail::ManagerOp::lock_release, detail::no_args, detail::no_reply);
  }

  /// Encodes or decodes the proxy.
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_);
  }

 private:
  friend class Manager;
  explicit LockProxy(detail::ProxyCore core) : core_(std::move(core)) {}

  bool acquire_ns(std::int64_t ns) const {
    return core_.call(
        detail::ManagerOp::lock_acquire, [&](detail::ByteBuffer& b) { b.put(ns); },
        detail::read_flag);
  }

  detail::ProxyCore core_;
};

/// A FIFO queue of Serializable T in a manager's server, with Queue<T>'s interface (what
/// Python's `manager.Queue()` returns). Waiting (get on an empty queue, put on a full one)
/// happens in the server; only the calling thread blocks. Every operation throws ManagerError
/// if the server is gone.
template <class T>
class QueueProxy {
  static_assert(detail::require_manager_value<T>());

 public:
  using value_type = T;  ///< the stored type

  /// A proxy of nothing, to be assigned or decoded into; its operations throw std::logic_error.
  QueueProxy() = default;

  /// Appends an item, blocking while the queue is full.
  /// @throws std::logic_error after close() in this process; whatever encoding the item threw
  /// (the queue is then unchanged).
  void put(const T& item) const { put_ns(item, -1); }
  /// Appends an item, waiting at most `timeout` for room. @throws Full when the time ran out.
  template <class Rep, class Period>
  void put(const T& item, std::chrono::duration<Rep, Period> timeout) const {
    put_ns(item, detail::manager_timeout_ns(timeout));
  }
  /// Appends an item if there is room. @throws Full if there is none.
  void put_nowait(const T& item) const { put_ns(item, 0); }

  /// Removes and returns the oldest item, blocking while the queue is empty.
  T get() const { return get_ns(-1); }
  /// Removes and returns the oldest item, waiting at most `timeout`. @throws Empty when the
  /// time ran out.
  template <class Rep, class Period>
  T get(std::chrono::duration<Rep, Period> timeout) const {
    return get_ns(detail::manager_timeout_ns(timeout));
  }
  /// Removes and returns the oldest item if there is one. @throws Empty if there is none.
  T get_nowait() const { return get_ns(0); }

  /// The number of items in the queue (at the moment the server answered).
  std::size_t qsize() const {
    return core_.call(detail::ManagerOp::queue_qsize, detail::no_args, detail::read_u64);
  }
  /// Whether the queue was empty when the server answered.
  bool empty() const { return qsize() == 0; }
  /// Whether the queue was full when the server answered (never for an unbounded queue).
  bool full() const { return maxsize_ != 0 && qsize() >= maxsize_; }
  /// The queue's capacity; 0 means unbounded.
  std::size_t maxsize() const noexcept { return static_cast<std::size_t>(maxsize_); }

  /// Declares that this process puts no more items: a later put() from this process (through
  /// any proxy of this queue) throws std::logic_error. Other processes are not affected.
  void close() const { core_.endpoint()->close_queue(core_.id()); }

  /// Encodes or decodes the proxy.
  template <class Archive>
  void serialize(Archive& ar) {
    ar(core_, maxsize_);
  }

 private:
  friend class Manager;
  QueueProxy(detail::ProxyCore core, std::uint64_t maxsize)
      : core_(std::move(core)), maxsize_(maxsize) {}

  void put_ns(const T& item, std::int64_t ns) const {
    if (core_.endpoint()->queue_closed(core_.id())) {
      throw std::logic_error("procpool: put on a queue this process has closed");
    }
    core_.call(
        detail::ManagerOp::queue_put,
        [&](detail::ByteBuffer& b) {
          b.put(ns);
          detail::put_frame(b, item);
        },
        detail::no_reply);
  }
  T get_ns(std::int64_t ns) const {
    return core_.call(
        detail::ManagerOp::queue_get, [&](detail::ByteBuffer& b) { b.put(ns); },
        [](detail::ReadArchive& r) { return detail::read_frame<T>(r); });
  }

  detail::ProxyCore core_;
  std::uint64_t maxsize_ = 0;
};

namespace detail {

/// Everything a Manager owns, in the process that made it.
struct ManagerState {
  std::mutex mutex;  // serializes shutdown()
  pid_t owner = ::getpid();
  std::string dir;
  std::string socket_path;
  ManagerKey key{};
  pid_t server_pid = -1;
  unique_fd server_pidfd;
  unique_fd control;  // the Manager's end: one byte asks the server to exit
  std::shared_ptr<ManagerEndpoint> endpoint;
  bool stopped = false;

  ~ManagerState() {
    for (int fd : {server_pidfd.get(), control.get()}) InternalFds::instance().remove(fd);
  }
};

/// Makes a fresh private directory for the socket: mkdtemp creates it with mode 0700, so only
/// this user can reach what is inside. Under $TMPDIR when that leaves room for the socket's
/// name in a sockaddr_un, else under /tmp.
inline std::string make_private_dir() {
  std::string base = "/tmp";
  if (const char* t = std::getenv("TMPDIR"); t && t[0] == '/' && std::string(t).size() < 60) {
    base = t;
    while (base.size() > 1 && base.back() == '/') base.pop_back();
  }
  std::string templ = base + "/procpool-manager-XXXXXX";
  if (!::mkdtemp(templ.data())) throw_errno("mkdtemp");
  return templ;
}

inline unsigned next_manager_number() noexcept {
  static std::atomic<unsigned> n{0};
  return ++n;
}

/// The server process's life after fork(). Never returns.
[[noreturn]] inline void manager_server_child(ManagerServerConfig& cfg, int manager_end,
                                              unsigned number) noexcept {
  ::close(manager_end);
  // exit() from an update callable must not run the program's exit handlers here.
  ::on_exit(exit_child_now, nullptr);
  // Ctrl-C goes to the whole process group; it is the program's to handle, and the server
  // dies with the program anyway.
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  ::sigaction(SIGINT, &ign, nullptr);
  // Pools' channels and other managers' connections of the program are not ours to hold open.
  int keep[3] = {cfg.listen_fd, cfg.control_fd, cfg.parent_pidfd};
  InternalFds::instance().close_all_in_child(keep, 3);
  try {
    become_current_process("SyncManager-" + std::to_string(number));
  } catch (...) {
  }
  ManagerServer server(cfg);
  server.run();
}

}  // namespace detail

/// A server process owning shared objects, and the factory of proxies to them. Python's
/// multiprocessing.Manager(). Not copyable; movable. Construction, the factories and shutdown()
/// may be called from any thread, but shutdown() (and the destructor) not concurrently with the
/// factories.
class Manager {
 public:
  /// Starts the server: makes a private directory and the key, binds the socket, forks.
  /// Returns once the server accepts connections (the socket is listening before the fork).
  /// @throws std::system_error naming the call that failed.
  Manager() : s_(std::make_unique<detail::ManagerState>()) {
    detail::ManagerState& s = *s_;
    detail::random_bytes(s.key);
    s.dir = detail::make_private_dir();
    s.socket_path = s.dir + "/manager.sock";
    struct Cleanup {  // until the server owns them, the directory and socket are ours to remove
      detail::ManagerState* s;
      ~Cleanup() {
        if (!s) return;
        if (s->endpoint) detail::ManagerRegistry::instance().remove(*s->endpoint);
        ::unlink(s->socket_path.c_str());
        ::rmdir(s->dir.c_str());
      }
    } cleanup{&s};

    sockaddr_un addr;
    socklen_t addr_len = detail::manager_sockaddr(s.socket_path, addr);
    detail::unique_fd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!listener) detail::throw_errno("socket");
    if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), addr_len) != 0) {
      detail::throw_errno("bind");
    }
    // Listening before the fork: connections made as soon as the constructor returns wait in
    // the backlog until the server's loop runs, so no ready handshake is needed.
    if (::listen(listener.get(), SOMAXCONN) != 0) detail::throw_errno("listen");
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      detail::throw_errno("socketpair");
    }
    detail::unique_fd mine(sv[0]), theirs(sv[1]);
    // A pidfd of this process, opened before the fork: it becomes readable when this process
    // dies, however it dies, and there is no window in which the death could be missed (as
    // there is between fork() and prctl(PR_SET_PDEATHSIG)). PDEATHSIG is not used at all: it
    // fires when the forking *thread* exits, which would kill the server of a Manager built on
    // a short-lived thread.
    detail::unique_fd self_pidfd(detail::pidfd_open(::getpid()));
    if (!self_pidfd) detail::throw_errno("pidfd_open");

    detail::ManagerServerConfig cfg;  // allocated before the fork, used after it
    cfg.listen_fd = listener.get();
    cfg.control_fd = theirs.get();
    cfg.parent_pidfd = self_pidfd.get();
    cfg.socket_path = s.socket_path;
    cfg.dir = s.dir;
    cfg.key = s.key;
    unsigned number = detail::next_manager_number();
    // Made before the fork, so that nothing after it can fail but the pidfd.
    s.endpoint = std::make_shared<detail::ManagerEndpoint>(s.socket_path, s.key);
    detail::ManagerRegistry::instance().add(s.endpoint);  // also installs its fork handlers
    detail::flush_std_streams();  // so the server inherits no buffered output
    pid_t pid = ::fork();
    if (pid < 0) detail::throw_errno("fork");
    if (pid == 0) detail::manager_server_child(cfg, mine.get(), number);

    s.server_pid = pid;
    s.server_pidfd.reset(detail::pidfd_open(pid));
    if (!s.server_pidfd) {
      int err = errno;
      ::kill(pid, SIGKILL);  // a server we cannot track must not outlive this call
      int st;
      detail::retry_eintr([&] { return ::waitpid(pid, &st, 0); });
      errno = err;
      detail::throw_errno("pidfd_open");
    }
    s.control = std::move(mine);
    // Children forked later (Process, a pool's fork server) close these: only we may hold them.
    detail::InternalFds::instance().add(s.control.get());
    detail::InternalFds::instance().add(s.server_pidfd.get());
    cleanup.s = nullptr;  // the server removes them when it exits; shutdown() makes sure
  }

  /// shutdown(), reporting (never throwing) a failure. In a process other than the one that
  /// made the Manager (a fork's copy) it does nothing.
  ~Manager() {
    if (!s_) return;
    if (s_->owner != ::getpid()) {
      // A fork's copy: its descriptor numbers may belong to something else by now, so nothing
      // is closed or unregistered; the memory goes with the process.
      (void)s_.release();
      return;
    }
    try {
      shutdown();
    } catch (const std::exception& e) {
      detail::report(std::string("while shutting down a Manager: ") + e.what());
    }
  }

  /// Takes over the server; `other` owns nothing afterwards (its members throw
  /// std::logic_error, its destructor does nothing).
  Manager(Manager&& other) noexcept = default;
  Manager& operator=(Manager&&) = delete;       ///< one Manager, one server, for its life
  Manager(const Manager&) = delete;             ///< one Manager, one server
  Manager& operator=(const Manager&) = delete;  ///< one Manager, one server

  /// Stops the server and removes its socket and directory. Every proxy operation afterwards
  /// throws ManagerError (in other processes too: their connections see the server go).
  /// Blocks until the server has exited (it is killed if it has not within 5 s). Calling it
  /// again does nothing.
  /// @throws std::logic_error if called in a process other than the one that made the Manager.
  void shutdown() {
    if (!s_) return;
    detail::ManagerState& s = *s_;
    if (s.owner != ::getpid()) {
      throw std::logic_error("procpool: only the process that made a Manager can shut it down");
    }
    std::lock_guard lock(s.mutex);
    if (s.stopped) return;
    s.stopped = true;
    s.endpoint->shut_down();
    detail::ManagerRegistry::instance().remove(*s.endpoint);
    char bye = 'q';
    // If the server already died this fails (EPIPE, without a signal): it is gone either way.
    (void)detail::retry_eintr(
        [&] { return ::send(s.control.get(), &bye, 1, MSG_NOSIGNAL | MSG_DONTWAIT); });
    if (!detail::wait_readable(s.server_pidfd.get(),
                               detail::Deadline::after(std::chrono::seconds(5)))) {
      detail::report("the manager's server did not exit within 5 s of shutdown(); killing it");
      ::syscall(SYS_pidfd_send_signal, s.server_pidfd.get(), SIGKILL, nullptr, 0);
      detail::wait_readable(s.server_pidfd.get(), detail::Deadline::never());
    }
    int st = 0;
    // ECHILD: the program reaped it itself (waitpid(-1), SIGCHLD ignored); it is gone.
    detail::retry_eintr([&] { return ::waitpid(s.server_pid, &st, 0); });
    ::unlink(s.socket_path.c_str());
    ::rmdir(s.dir.c_str());
    detail::InternalFds::instance().remove(s.control.get());
    detail::InternalFds::instance().remove(s.server_pidfd.get());
    s.control.reset();
    s.server_pidfd.reset();
  }

  /// The path of the server's socket (inside its private directory).
  /// @throws std::logic_error on a moved-from Manager.
  std::string address() const { return state().socket_path; }
  /// The server's process id.
  /// @throws std::logic_error on a moved-from Manager.
  pid_t server_pid() const { return state().server_pid; }

  /// A new, empty dict in the server. @throws ManagerError after shutdown().
  template <class K, class V>
  DictProxy<K, V> dict() {
    return dict<K, V>(std::initializer_list<std::pair<const K, V>>{});
  }
  /// A new dict holding `init` (later pairs win over earlier ones with the same key).
  /// @throws ManagerError after shutdown().
  template <class K, class V>
  DictProxy<K, V> dict(std::initializer_list<std::pair<const K, V>> init) {
    (void)sizeof(DictProxy<K, V>);
    detail::ByteBuffer items;
    for (const auto& [k, v] : init) {
      detail::put_payload(items, k);
      detail::put_frame(items, v);
    }
    return DictProxy<K, V>(create(detail::ManagerOp::create_dict, [&](detail::ByteBuffer& b) {
      b.varint(init.size());
      b.append(items.data(), items.size());
    }));
  }

  /// A new, empty list in the server. @throws ManagerError after shutdown().
  template <class T>
  ListProxy<T> list() {
    return ListProxy<T>(
        create(detail::ManagerOp::create_list, [](detail::ByteBuffer& b) { b.varint(0); }));
  }
  /// A new list holding the items of `init`, each converted to T.
  /// @throws ManagerError after shutdown(); whatever the range or encoding threw.
  template <class T, std::ranges::input_range Range>
  ListProxy<T> list(Range&& init) {
    (void)sizeof(ListProxy<T>);
    detail::ByteBuffer items;
    std::size_t n = 0;
    for (auto&& x : init) {
      if constexpr (std::is_same_v<std::remove_cvref_t<decltype(x)>, T>) {
        detail::put_frame(items, x);
      } else {
        detail::put_frame(items, static_cast<T>(x));
      }
      ++n;
    }
    return ListProxy<T>(create(detail::ManagerOp::create_list, [&](detail::ByteBuffer& b) {
      b.varint(n);
      b.append(items.data(), items.size());
    }));
  }

  /// A new value in the server, holding `init`. @throws ManagerError after shutdown().
  template <class T>
  ValueProxy<T> value(T init) {
    (void)sizeof(ValueProxy<T>);
    return ValueProxy<T>(create(detail::ManagerOp::create_value,
                                [&](detail::ByteBuffer& b) { detail::put_frame(b, init); }));
  }

  /// A new, unlocked lock in the server. @throws ManagerError after shutdown().
  LockProxy lock() { return LockProxy(create(detail::ManagerOp::create_lock, detail::no_args)); }

  /// A new queue in the server; maxsize 0 means unbounded. @throws ManagerError after
  /// shutdown().
  template <class T>
  QueueProxy<T> queue(std::size_t maxsize = 0) {
    (void)sizeof(QueueProxy<T>);
    std::uint64_t m = maxsize;
    return QueueProxy<T>(
        create(detail::ManagerOp::create_queue, [&](detail::ByteBuffer& b) { b.put(m); }), m);
  }

 private:
  friend struct detail::ManagerAccess;

  const detail::ManagerState& state() const {
    if (!s_) throw std::logic_error("procpool: use of a moved-from Manager");
    return *s_;
  }

  template <class Build>
  detail::ProxyCore create(detail::ManagerOp op, Build&& build) {
    const detail::ManagerState& s = state();
    detail::ProxyCore factory(s.endpoint, 0);
    std::uint64_t id = factory.call(op, build, detail::read_u64);
    return detail::ProxyCore(s.endpoint, id);
  }

  std::unique_ptr<detail::ManagerState> s_;
};

namespace detail {
/// For procpool's own tests: the key, so that a test can speak the protocol by hand.
struct ManagerAccess {
  static const ManagerKey& key(const Manager& m) { return m.state().key; }
};
}  // namespace detail

}  // namespace procpool
