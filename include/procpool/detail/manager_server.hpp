#pragma once
// The Manager's server: a single-threaded epoll loop, in a process forked by the Manager, that
// owns every shared object and serves any number of proxies over a Unix socket.
//
// It never blocks on one client: every client socket is non-blocking, input is buffered until a
// whole request arrived, output is buffered until the socket takes it. An operation that must
// wait (lock() while another client holds the lock, get() on an empty queue, put() on a full
// one) parks its client: no reply is sent until it can proceed or its deadline passes, and the
// loop serves everybody else meanwhile. A client that sends anything malformed (a wrong answer
// to the challenge, a length above manager_max_message, a request that does not parse, an
// unknown update function) is disconnected; so is one that disconnects, and a lock it held is
// released. The server exits when the Manager asks (a byte on the control socket) or when the
// Manager's process dies (its pidfd becomes readable), removing its socket and directory.

#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <unordered_map>
#include <variant>
#include <vector>

#include "../errors.hpp"
#include "../serialize.hpp"
#include "internal_fds.hpp"
#include "manager_auth.hpp"
#include "manager_wire.hpp"
#include "posix.hpp"
#include "wire.hpp"

namespace procpool::detail {

/// What the server process starts with; made by the Manager before the fork.
struct ManagerServerConfig {
  int listen_fd = -1;     // bound, listening, non-blocking
  int control_fd = -1;    // the server's end: any byte (or EOF) means "shut down"
  int parent_pidfd = -1;  // readable once the Manager's process has died
  std::string socket_path;
  std::string dir;
  ManagerKey key{};
};

class ManagerServer {
 public:
  explicit ManagerServer(const ManagerServerConfig& cfg) : cfg_(cfg) {}

  /// Serves until told to stop or the Manager's process dies, then removes the socket and its
  /// directory and exits. Never returns.
  [[noreturn]] void run() noexcept {
    int code = 0;
    try {
      setup();
      loop();
    } catch (const std::exception& e) {
      report(std::string("manager server failed: ") + e.what());
      code = 1;
    } catch (...) {
      report("manager server failed");
      code = 1;
    }
    cleanup_filesystem();
    ::_exit(code);
  }

 private:
  using Bytes = std::string;
  using TimePoint = Clock::time_point;

  // epoll tags below this are the server's own descriptors; clients are numbered from it.
  static constexpr std::uint64_t tag_listen = 0, tag_control = 1, tag_parent = 2;
  static constexpr std::uint64_t first_client = 16;
  static constexpr std::size_t read_chunk = 64 * 1024;
  static constexpr int reads_per_wakeup = 4;  // then let other clients have a turn
  static constexpr auto auth_timeout = std::chrono::seconds(10);

  struct Waiter {
    std::uint64_t client;
    std::uint64_t seq;  // which parked request of that client
  };
  struct DictObj {
    std::unordered_map<Bytes, Bytes> map;
  };
  struct ListObj {
    std::vector<Bytes> items;
  };
  struct ValueObj {
    Bytes frame;
  };
  struct LockObj {
    bool held = false;
    std::uint64_t holder = 0;
    std::deque<Waiter> waiters;
  };
  struct QueueObj {
    std::uint64_t maxsize = 0;
    std::deque<Bytes> items;
    std::deque<Waiter> getters, putters;
  };
  using Object = std::variant<DictObj, ListObj, ValueObj, LockObj, QueueObj>;

  enum class Park : std::uint8_t { none, lock, get, put };

  struct Client {
    unique_fd fd;
    std::uint64_t id = 0;
    bool authed = false;
    bool dead = false;
    bool want_out = false;  // EPOLLOUT is registered
    std::array<std::byte, manager_challenge_size> challenge{};
    std::vector<std::byte> in;
    std::size_t in_begin = 0, in_end = 0;
    ByteBuffer out;
    std::size_t out_sent = 0;
    Park park = Park::none;
    std::uint64_t park_obj = 0;
    std::uint64_t park_seq = 0;
    Bytes park_item;  // a parked put's item
  };

  // A thrown request error that is the client's fault in a way a correct proxy never is (an
  // unknown object, a wrong kind): answered with a protocol status, the connection kept.
  struct BadObject {
    std::string message;
  };

  void setup() {
    epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_) throw_errno("epoll_create1");
    watch(cfg_.listen_fd, tag_listen, EPOLLIN);
    watch(cfg_.control_fd, tag_control, EPOLLIN);
    watch(cfg_.parent_pidfd, tag_parent, EPOLLIN);
  }

  void watch(int fd, std::uint64_t tag, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = tag;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) throw_errno("epoll_ctl");
  }

  void loop() {
    epoll_event events[64];
    for (;;) {
      int timeout = -1;
      if (!timers_.empty()) {
        auto left = std::get<0>(*timers_.begin()) - Clock::now();
        auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
        timeout = static_cast<int>(std::clamp<long long>(ms, 0, 60'000));
      }
      int n = wait_for_events(events, 64, timeout);
      for (int i = 0; i < n; ++i) {
        std::uint64_t tag = events[i].data.u64;
        if (tag == tag_control || tag == tag_parent) return;  // shutdown, or the program died
        if (tag == tag_listen) {
          accept_all();
          continue;
        }
        Client* c = find(tag);
        if (!c) continue;
        if (events[i].events & EPOLLOUT) flush(*c);
        if (!c->dead && (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))) {
          bool eof = read_some(*c);
          process(*c);
          if (eof) drop(*c);
        }
      }
      fire_timers();
      run_ready();
      reap_dead();
    }
  }

  // epoll_wait, polled for a while first (see AdaptiveSpin): a busy client's next request
  // usually comes within microseconds of its reply.
  int wait_for_events(epoll_event* events, int max, int timeout) {
    if (std::int64_t budget = spin_.budget_ns(); budget > 0 && timeout != 0) {
      std::int64_t until = AdaptiveSpin::now_ns() + budget;
      do {
        int n = ::epoll_wait(epoll_.get(), events, max, 0);
        if (n > 0) {
          spin_.hit();
          return n;
        }
        if (n < 0 && errno != EINTR) throw_errno("epoll_wait");
        ::sched_yield();  // if a client waits for this CPU, let it run now
      } while (AdaptiveSpin::now_ns() < until);
      spin_.miss();
    }
    for (;;) {
      int n = ::epoll_wait(epoll_.get(), events, max, timeout);
      if (n >= 0) return n;
      if (errno != EINTR) throw_errno("epoll_wait");
    }
  }

  Client* find(std::uint64_t id) {
    auto it = clients_.find(id);
    return it == clients_.end() || it->second->dead ? nullptr : it->second.get();
  }

  // ---------------------------------------------------------------------------------------------
  // Connections.

  void accept_all() {
    for (;;) {
      int fd = ::accept4(cfg_.listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // Out of descriptors: stop listening for a moment rather than spin on a readable
          // listening socket; the timer re-arms it.
          ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, cfg_.listen_fd, nullptr);
          timers_.emplace(Clock::now() + std::chrono::milliseconds(100), tag_listen, 0);
        }
        return;
      }
      unique_fd sock(fd);
      // The directory already keeps other users out; the credential check says so twice.
      ucred cred{};
      socklen_t len = sizeof cred;
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != ::geteuid()) {
        continue;
      }
      auto c = std::make_unique<Client>();
      c->id = next_client_++;
      std::memcpy(c->challenge.data(), manager_magic.data(), manager_magic.size());
      try {
        random_bytes(std::span<std::byte>(c->challenge).subspan(manager_magic.size()));
      } catch (const std::exception&) {
        continue;
      }
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLRDHUP;
      ev.data.u64 = c->id;
      if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) continue;
      c->fd = std::move(sock);
      c->out.append(c->challenge.data(), c->challenge.size());
      timers_.emplace(Clock::now() + auth_timeout, c->id, 0);
      Client& ref = *c;
      clients_.emplace(c->id, std::move(c));
      flush(ref);
    }
  }

  // Reads what is there (a bounded amount, for fairness). Returns true at end of stream or on
  // an error: the client is gone once its complete requests have been served.
  bool read_some(Client& c) {
    for (int round = 0; round < reads_per_wakeup; ++round) {
      if (c.in_begin == c.in_end) {
        c.in_begin = c.in_end = 0;
        if (c.in.size() > (std::size_t{1} << 20))
          std::vector<std::byte>().swap(c.in);  // after a huge request
      }
      if (c.in.size() - c.in_end < read_chunk) {
        if (c.in_begin > 0) {
          std::memmove(c.in.data(), c.in.data() + c.in_begin, c.in_end - c.in_begin);
          c.in_end -= c.in_begin;
          c.in_begin = 0;
        }
        if (c.in.size() - c.in_end < read_chunk) {
          // Geometric growth (resize past capacity doubles it), so a large request costs
          // amortised O(1) per byte.
          c.in.resize(c.in_end + read_chunk);
        }
      }
      std::size_t room = c.in.size() - c.in_end;
      ssize_t n = retry_eintr(
          [&] { return ::recv(c.fd.get(), c.in.data() + c.in_end, room, MSG_DONTWAIT); });
      if (n > 0) {
        c.in_end += static_cast<std::size_t>(n);
        // Nothing legitimate is longer than a whole request; more is a client not waiting for
        // its replies, or garbage.
        if (c.in_end - c.in_begin > manager_max_message + 2 * sizeof(std::uint64_t)) return true;
        if (static_cast<std::size_t>(n) < room) return false;
        continue;
      }
      if (n == 0) return true;
      return !(errno == EAGAIN || errno == EWOULDBLOCK);
    }
    return false;
  }

  // Serves the complete requests buffered for `c`, in order, until it is parked or its reply
  // could not be sent in full.
  void process(Client& c) {
    while (!c.dead && c.park == Park::none && c.out.empty()) {
      std::size_t avail = c.in_end - c.in_begin;
      const std::byte* p = c.in.data() + c.in_begin;
      if (!c.authed) {
        if (avail < manager_answer_size) return;
        ManagerAnswer expected = manager_answer(cfg_.key, c.challenge);
        if (!constant_time_equal(expected, std::span<const std::byte>(p, manager_answer_size))) {
          drop(c);
          return;
        }
        c.authed = true;
        c.in_begin += manager_answer_size;
        c.out.put(std::uint8_t{1});
        flush(c);
        continue;
      }
      if (avail < sizeof(std::uint64_t)) return;
      std::uint64_t len;
      std::memcpy(&len, p, sizeof len);
      if (len < manager_min_request || len > manager_max_message) {
        drop(c);
        return;
      }
      // Not all there yet. The buffer grows with the bytes that actually arrive (read_some), so
      // a length field alone never makes the server allocate.
      if (avail - sizeof len < len) return;
      std::span<const std::byte> body(p + sizeof len, static_cast<std::size_t>(len));
      c.in_begin += sizeof len + static_cast<std::size_t>(len);
      handle(c, body);
      if (!c.dead) flush(c);
    }
  }

  void flush(Client& c) {
    if (c.dead) return;
    while (c.out_sent < c.out.size()) {
      ssize_t n = retry_eintr([&] {
        return ::send(c.fd.get(), c.out.data() + c.out_sent, c.out.size() - c.out_sent,
                      MSG_NOSIGNAL | MSG_DONTWAIT);
      });
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          set_want_out(c, true);
          return;
        }
        drop(c);
        return;
      }
      c.out_sent += static_cast<std::size_t>(n);
    }
    c.out.clear();
    c.out_sent = 0;
    c.out.shrink(std::size_t{1} << 20);
    if (c.want_out) {
      set_want_out(c, false);
      ready_.push_back(c.id);  // requests may have waited behind that reply
    }
  }

  void set_want_out(Client& c, bool on) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0u);
    ev.data.u64 = c.id;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, c.fd.get(), &ev) != 0) {
      drop(c);
      return;
    }
    c.want_out = on;
  }

  // Disconnects a client now; its memory goes at the end of the loop iteration (callers up the
  // stack may still hold a reference). A lock it held is released to the next waiter.
  void drop(Client& c) {
    if (c.dead) return;
    c.dead = true;
    c.park = Park::none;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.fd.get(), nullptr);
    c.fd.reset();
    dead_.push_back(c.id);
    for (std::uint64_t id : lock_ids_) {
      auto& lock = std::get<LockObj>(objects_.at(id));
      if (lock.held && lock.holder == c.id) {
        lock.held = false;
        grant_lock(lock);
      }
    }
  }

  void reap_dead() {
    for (std::uint64_t id : dead_) clients_.erase(id);
    dead_.clear();
  }

  void run_ready() {
    while (!ready_.empty()) {
      std::vector<std::uint64_t> now;
      now.swap(ready_);
      for (std::uint64_t id : now) {
        if (Client* c = find(id)) process(*c);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Parking and timers.

  void park(Client& c, Park kind, std::uint64_t obj, std::int64_t timeout_ns,
            std::deque<Waiter>& waiters) {
    c.park = kind;
    c.park_obj = obj;
    c.park_seq = ++park_seq_;
    waiters.push_back({c.id, c.park_seq});
    // Negative, or beyond a century (where the clock arithmetic could overflow): forever.
    if (timeout_ns > 0 && timeout_ns < std::int64_t{100} * 365 * 24 * 3600 * 1'000'000'000) {
      timers_.emplace(Clock::now() + std::chrono::nanoseconds(timeout_ns), c.id, c.park_seq);
    }
  }

  // The client behind a waiter entry if it is still parked for exactly that request (entries of
  // clients that left or timed out stay in the queues and are skipped here).
  Client* parked(const Waiter& w, Park kind, std::uint64_t obj) {
    Client* c = find(w.client);
    if (!c || c->park != kind || c->park_obj != obj || c->park_seq != w.seq) return nullptr;
    return c;
  }

  void unpark(Client& c) {
    c.park = Park::none;
    c.park_item.clear();
    c.park_item.shrink_to_fit();
    ready_.push_back(c.id);
  }

  void fire_timers() {
    auto now = Clock::now();
    while (!timers_.empty() && std::get<0>(*timers_.begin()) <= now) {
      auto [at, id, seq] = *timers_.begin();
      timers_.erase(timers_.begin());
      if (id == tag_listen) {
        watch(cfg_.listen_fd, tag_listen, EPOLLIN);
        continue;
      }
      Client* c = find(id);
      if (!c) continue;
      if (seq == 0) {
        if (!c->authed) drop(*c);  // never answered the challenge
        continue;
      }
      if (c->park == Park::none || c->park_seq != seq) continue;
      Park kind = c->park;
      unpark(*c);
      if (kind == Park::lock) {
        std::size_t at2 = reply_begin(*c, ManagerStatus::ok);
        c->out.put(std::uint8_t{0});
        reply_end(*c, at2);
      } else {
        reply_status(*c, kind == Park::get ? ManagerStatus::empty : ManagerStatus::full);
      }
      flush(*c);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Replies.

  std::size_t reply_begin(Client& c, ManagerStatus s) {
    std::size_t at = manager_begin(c.out);
    c.out.put(static_cast<std::uint8_t>(s));
    return at;
  }
  void reply_end(Client& c, std::size_t at) { manager_finish(c.out, at); }
  void reply_status(Client& c, ManagerStatus s) { reply_end(c, reply_begin(c, s)); }
  void reply_bytes(Client& c, std::string_view bytes) {
    std::size_t at = reply_begin(c, ManagerStatus::ok);
    put_bytes(c.out, bytes);
    reply_end(c, at);
  }
  template <class T>
  void reply_value(Client& c, const T& v) {
    std::size_t at = reply_begin(c, ManagerStatus::ok);
    c.out.put(v);
    reply_end(c, at);
  }
  void reply_error(Client& c, std::exception_ptr e) {
    std::size_t at = c.out.size();
    try {
      std::rethrow_exception(e);
    } catch (const ProtocolError& pe) {
      std::size_t r = reply_begin(c, ManagerStatus::protocol);
      c.out.encode(std::string(pe.what()));
      reply_end(c, r);
      return;
    } catch (...) {
    }
    try {
      std::size_t r = reply_begin(c, ManagerStatus::error);
      encode_error(c.out, e);
      reply_end(c, r);
    } catch (...) {
      c.out.truncate(at);
      drop(c);
    }
  }
  template <class E>
  void reply_exception(Client& c, const E& e) {
    reply_error(c, std::make_exception_ptr(e));
  }

  // ---------------------------------------------------------------------------------------------
  // Requests.

  template <class Obj>
  Obj& object(std::uint64_t id, const char* what) {
    auto it = objects_.find(id);
    if (it == objects_.end() || !std::holds_alternative<Obj>(it->second)) {
      throw BadObject{std::string("procpool: the manager has no ") + what + " with id " +
                      std::to_string(id)};
    }
    return std::get<Obj>(it->second);
  }

  static std::int64_t read_i64(ReadArchive& r) {
    std::int64_t v = 0;
    r(v);
    return v;
  }
  static std::uint64_t read_u64(ReadArchive& r) {
    std::uint64_t v = 0;
    r(v);
    return v;
  }
  static Bytes read_bytes(ReadArchive& r) { return Bytes(as_view(take_bytes(r))); }

  static void expect_end(const ReadArchive& r) {
    if (r.remaining() != 0) protocol_error("corrupt manager request: trailing bytes");
  }

  std::uint64_t add_object(Object obj) {
    std::uint64_t id = next_object_++;
    bool is_lock = std::holds_alternative<LockObj>(obj);
    objects_.emplace(id, std::move(obj));
    if (is_lock) lock_ids_.push_back(id);
    return id;
  }

  void handle(Client& c, std::span<const std::byte> body) {
    try {
      ReadArchive r(body.data(), body.data() + body.size());
      std::uint8_t op = 0;
      std::uint64_t id = 0;
      r(op, id);
      dispatch(c, static_cast<ManagerOp>(op), id, r);
    } catch (const BadObject& b) {
      std::size_t at = reply_begin(c, ManagerStatus::protocol);
      c.out.encode(b.message);
      reply_end(c, at);
    } catch (...) {
      // A request that does not parse, or one we could not even answer (out of memory): the
      // connection is beyond repair. Its bytes are not trusted any further.
      drop(c);
    }
  }

  void dispatch(Client& c, ManagerOp op, std::uint64_t id, ReadArchive& r) {
    switch (op) {
      case ManagerOp::create_dict: {
        DictObj d;
        std::size_t n = r.count<std::pair<char, char>>("a dict's entries");
        for (std::size_t i = 0; i < n; ++i) {
          Bytes k = read_bytes(r);
          d.map.insert_or_assign(std::move(k), read_bytes(r));
        }
        expect_end(r);
        reply_value(c, add_object(std::move(d)));
        return;
      }
      case ManagerOp::create_list: {
        ListObj l;
        std::size_t n = r.count<char>("a list's items");
        l.items.reserve(n);
        for (std::size_t i = 0; i < n; ++i) l.items.push_back(read_bytes(r));
        expect_end(r);
        reply_value(c, add_object(std::move(l)));
        return;
      }
      case ManagerOp::create_value: {
        ValueObj v{read_bytes(r)};
        expect_end(r);
        reply_value(c, add_object(std::move(v)));
        return;
      }
      case ManagerOp::create_lock:
        expect_end(r);
        reply_value(c, add_object(LockObj{}));
        return;
      case ManagerOp::create_queue: {
        QueueObj q;
        q.maxsize = read_u64(r);
        expect_end(r);
        reply_value(c, add_object(std::move(q)));
        return;
      }

      case ManagerOp::dict_set: {
        auto& d = object<DictObj>(id, "dict");
        Bytes k = read_bytes(r);
        Bytes v = read_bytes(r);
        expect_end(r);
        d.map.insert_or_assign(std::move(k), std::move(v));
        reply_status(c, ManagerStatus::ok);
        return;
      }
      case ManagerOp::dict_get:
      case ManagerOp::dict_find:
      case ManagerOp::dict_contains:
      case ManagerOp::dict_erase: {
        auto& d = object<DictObj>(id, "dict");
        std::string_view k = as_view(take_bytes(r));
        expect_end(r);
        // Heterogeneous lookup needs C++20 transparent hashing on the map; a key copy is cheap
        // next to the round trip.
        auto it = d.map.find(Bytes(k));
        if (op == ManagerOp::dict_get) {
          if (it == d.map.end()) {
            reply_exception(c, std::out_of_range("procpool: key not found in the manager's dict"));
          } else {
            reply_bytes(c, it->second);
          }
        } else if (op == ManagerOp::dict_find) {
          std::size_t at = reply_begin(c, ManagerStatus::ok);
          c.out.put(std::uint8_t{it != d.map.end()});
          if (it != d.map.end()) put_bytes(c.out, it->second);
          reply_end(c, at);
        } else if (op == ManagerOp::dict_contains) {
          reply_value(c, std::uint8_t{it != d.map.end()});
        } else {
          bool found = it != d.map.end();
          if (found) d.map.erase(it);
          reply_value(c, std::uint8_t{found});
        }
        return;
      }
      case ManagerOp::dict_size:
        expect_end(r);
        reply_value(c, std::uint64_t{object<DictObj>(id, "dict").map.size()});
        return;
      case ManagerOp::dict_items: {
        auto& d = object<DictObj>(id, "dict");
        expect_end(r);
        std::size_t at = reply_begin(c, ManagerStatus::ok);
        c.out.varint(d.map.size());
        for (const auto& [k, v] : d.map) {
          put_bytes(c.out, k);
          put_bytes(c.out, v);
        }
        reply_end(c, at);
        return;
      }
      case ManagerOp::dict_clear:
        expect_end(r);
        object<DictObj>(id, "dict").map.clear();
        reply_status(c, ManagerStatus::ok);
        return;
      case ManagerOp::dict_update: {
        auto& d = object<DictObj>(id, "dict");
        Bytes k = read_bytes(r);
        std::uint8_t has_initial = 0;
        r(has_initial);
        if (has_initial > 1) protocol_error("corrupt manager request: bad flag");
        std::optional<std::span<const std::byte>> initial;
        if (has_initial) initial = take_bytes(r);
        auto it = d.map.find(k);
        if (it == d.map.end() && !initial) {
          (void)update_call(r);  // parse it all, so that garbage is still refused as garbage
          reply_exception(c, std::out_of_range("procpool: key not found in the manager's dict"));
          return;
        }
        std::span<const std::byte> current = it != d.map.end() ? as_span(it->second) : *initial;
        run_update(c, r, current, [&](Bytes&& frame) -> const Bytes& {
          return d.map.insert_or_assign(std::move(k), std::move(frame)).first->second;
        });
        return;
      }

      case ManagerOp::list_append: {
        auto& l = object<ListObj>(id, "list");
        Bytes v = read_bytes(r);
        expect_end(r);
        l.items.push_back(std::move(v));
        reply_status(c, ManagerStatus::ok);
        return;
      }
      case ManagerOp::list_get:
      case ManagerOp::list_set:
      case ManagerOp::list_update: {
        auto& l = object<ListObj>(id, "list");
        std::uint64_t i = read_u64(r);
        if (i >= l.items.size()) {
          if (op == ManagerOp::list_set) (void)take_bytes(r);
          if (op == ManagerOp::list_update) (void)update_call(r);
          expect_end(r);
          reply_exception(c, std::out_of_range("procpool: index " + std::to_string(i) +
                                               " is past the end of the manager's list of " +
                                               std::to_string(l.items.size())));
          return;
        }
        auto at = static_cast<std::size_t>(i);
        if (op == ManagerOp::list_get) {
          expect_end(r);
          reply_bytes(c, l.items[at]);
        } else if (op == ManagerOp::list_set) {
          Bytes v = read_bytes(r);
          expect_end(r);
          l.items[at] = std::move(v);
          reply_status(c, ManagerStatus::ok);
        } else {
          run_update(c, r, as_span(l.items[at]), [&](Bytes&& frame) -> const Bytes& {
            l.items[at] = std::move(frame);
            return l.items[at];
          });
        }
        return;
      }
      case ManagerOp::list_size:
        expect_end(r);
        reply_value(c, std::uint64_t{object<ListObj>(id, "list").items.size()});
        return;
      case ManagerOp::list_reverse: {
        auto& l = object<ListObj>(id, "list");
        expect_end(r);
        std::reverse(l.items.begin(), l.items.end());
        reply_status(c, ManagerStatus::ok);
        return;
      }
      case ManagerOp::list_snapshot: {
        auto& l = object<ListObj>(id, "list");
        expect_end(r);
        std::size_t at = reply_begin(c, ManagerStatus::ok);
        c.out.varint(l.items.size());
        for (const auto& v : l.items) put_bytes(c.out, v);
        reply_end(c, at);
        return;
      }
      case ManagerOp::list_clear:
        expect_end(r);
        object<ListObj>(id, "list").items.clear();
        reply_status(c, ManagerStatus::ok);
        return;

      case ManagerOp::value_get:
        expect_end(r);
        reply_bytes(c, object<ValueObj>(id, "value").frame);
        return;
      case ManagerOp::value_set: {
        auto& v = object<ValueObj>(id, "value");
        Bytes f = read_bytes(r);
        expect_end(r);
        v.frame = std::move(f);
        reply_status(c, ManagerStatus::ok);
        return;
      }
      case ManagerOp::value_update: {
        auto& v = object<ValueObj>(id, "value");
        run_update(c, r, as_span(v.frame), [&](Bytes&& frame) -> const Bytes& {
          v.frame = std::move(frame);
          return v.frame;
        });
        return;
      }

      case ManagerOp::lock_acquire: {
        auto& l = object<LockObj>(id, "lock");
        std::int64_t timeout = read_i64(r);
        expect_end(r);
        if (!l.held) {
          l.held = true;
          l.holder = c.id;
          reply_value(c, std::uint8_t{1});
        } else if (timeout == 0) {
          reply_value(c, std::uint8_t{0});
        } else {
          park(c, Park::lock, id, timeout, l.waiters);
        }
        return;
      }
      case ManagerOp::lock_release: {
        auto& l = object<LockObj>(id, "lock");
        expect_end(r);
        if (!l.held) {
          reply_exception(c, std::logic_error("procpool: release of an unlocked manager lock"));
          return;
        }
        l.held = false;
        reply_status(c, ManagerStatus::ok);
        grant_lock(l);
        return;
      }

      case ManagerOp::queue_put: {
        auto& q = object<QueueObj>(id, "queue");
        std::int64_t timeout = read_i64(r);
        Bytes item = read_bytes(r);
        expect_end(r);
        // A parked getter means the queue is empty: the item goes straight to it.
        while (!q.getters.empty()) {
          Waiter w = q.getters.front();
          q.getters.pop_front();
          if (Client* g = parked(w, Park::get, id)) {
            unpark(*g);
            reply_bytes(*g, item);
            flush(*g);
            reply_status(c, ManagerStatus::ok);
            return;
          }
        }
        if (q.maxsize == 0 || q.items.size() < q.maxsize) {
          q.items.push_back(std::move(item));
          reply_status(c, ManagerStatus::ok);
        } else if (timeout == 0) {
          reply_status(c, ManagerStatus::full);
        } else {
          park(c, Park::put, id, timeout, q.putters);
          c.park_item = std::move(item);
        }
        return;
      }
      case ManagerOp::queue_get: {
        auto& q = object<QueueObj>(id, "queue");
        std::int64_t timeout = read_i64(r);
        expect_end(r);
        if (!q.items.empty()) {
          reply_bytes(c, q.items.front());
          q.items.pop_front();
          // Room now: the longest-waiting parked put goes in.
          while (!q.putters.empty() && (q.maxsize == 0 || q.items.size() < q.maxsize)) {
            Waiter w = q.putters.front();
            q.putters.pop_front();
            if (Client* p = parked(w, Park::put, id)) {
              q.items.push_back(std::move(p->park_item));
              unpark(*p);
              reply_status(*p, ManagerStatus::ok);
              flush(*p);
            }
          }
        } else if (timeout == 0) {
          reply_status(c, ManagerStatus::empty);
        } else {
          park(c, Park::get, id, timeout, q.getters);
        }
        return;
      }
      case ManagerOp::queue_qsize:
        expect_end(r);
        reply_value(c, std::uint64_t{object<QueueObj>(id, "queue").items.size()});
        return;
    }
    protocol_error("corrupt manager request: unknown operation " +
                   std::to_string(static_cast<unsigned>(op)));
  }

  // The longest-waiting client still parked on the lock gets it.
  void grant_lock(LockObj& l) {
    while (!l.held && !l.waiters.empty()) {
      Waiter w = l.waiters.front();
      l.waiters.pop_front();
      Client* c = find(w.client);
      if (!c || c->park != Park::lock || c->park_seq != w.seq) continue;
      l.held = true;
      l.holder = c->id;
      unpark(*c);
      reply_value(*c, std::uint8_t{1});
      flush(*c);
    }
  }

  struct UpdateCall {
    ManagerUpdateFn fn;
    std::span<const std::byte> state;
  };
  // Reads the function reference and the callable's state; an unregistered reference is
  // garbage (never called).
  static UpdateCall update_call(ReadArchive& r) {
    std::uint64_t ref = read_u64(r);
    std::span<const std::byte> state = take_bytes(r);
    expect_end(r);
    ManagerUpdateFn fn = find_update_fn(ref);
    if (!fn) protocol_error("corrupt manager request: unknown update function");
    return {fn, state};
  }

  // Runs an update on `current`; on success stores the new frame through `store` and replies
  // with it, on failure (the callable threw, or the stored value is not of the type the
  // callable expects) replies with the error and leaves the value as it was.
  template <class Store>
  void run_update(Client& c, ReadArchive& r, std::span<const std::byte> current, Store&& store) {
    UpdateCall call = update_call(r);
    ManagerUpdate u{call.state, current, {}};
    try {
      call.fn(u);
    } catch (...) {
      reply_error(c, std::current_exception());
      return;
    }
    reply_bytes(c, store(std::move(u.result)));
  }

  void cleanup_filesystem() noexcept {
    // The Manager removes these too after reaping us; whoever is first wins, the other gets
    // ENOENT. When the program died, only we are left to do it.
    if (!cfg_.socket_path.empty()) ::unlink(cfg_.socket_path.c_str());
    if (!cfg_.dir.empty()) ::rmdir(cfg_.dir.c_str());
  }

  ManagerServerConfig cfg_;
  unique_fd epoll_;
  AdaptiveSpin spin_;
  std::unordered_map<std::uint64_t, std::unique_ptr<Client>> clients_;
  std::unordered_map<std::uint64_t, Object> objects_;
  std::vector<std::uint64_t> lock_ids_;
  std::set<std::tuple<TimePoint, std::uint64_t, std::uint64_t>> timers_;  // (when, client, seq)
  std::vector<std::uint64_t> ready_;  // clients whose buffered requests may proceed
  std::vector<std::uint64_t> dead_;   // dropped clients, erased at the end of the iteration
  std::uint64_t next_client_ = first_client;
  std::uint64_t next_object_ = 1;
  std::uint64_t park_seq_ = 0;
};

}  // namespace procpool::detail
