#pragma once
// What runs inside a pool worker: the shared-memory slot through which the parent sees what the
// worker is doing, the context a chunk runs in, the trampolines that run typed tasks, and the
// worker's main loop.

#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <span>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../process.hpp"
#include "../serialize.hpp"
#include "io.hpp"
#include "posix.hpp"
#include "shared_region.hpp"
#include "wire.hpp"

namespace procpool::detail {

inline std::int64_t monotonic_ns() noexcept {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

/// One per worker, in memory shared by the parent, the fork server and every worker (mapped
/// before the fork server is forked). The worker writes, the parent reads: so the parent knows
/// which item a worker was running when it died, and since when (task_timeout). The parent
/// writes cancel requests for chunks that were sent but have not started.
struct alignas(64) WorkerSlot {
  static constexpr int max_cancels = 8;
  std::atomic<std::uint64_t> chunk_id{0};        // the chunk being run, 0 between chunks
  std::atomic<std::uint32_t> item{0};            // the item of that chunk being run
  std::atomic<std::uint32_t> initialized{0};     // 1 once the initializer returned
  std::atomic<std::int64_t> item_started_ns{0};  // when that item started (timed pools only)
  std::atomic<std::uint64_t> cancelled[max_cancels];  // chunks to skip (0: free)

  void reset() noexcept {
    chunk_id.store(0);
    item.store(0);
    initialized.store(0);
    item_started_ns.store(0);
    for (auto& c : cancelled) c.store(0);
  }
  bool is_cancelled(std::uint64_t id) const noexcept {
    for (const auto& c : cancelled) {
      if (c.load() == id) return true;
    }
    return false;
  }
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::int64_t>::is_always_lock_free,
              "procpool needs lock-free 64-bit atomics to share state between processes");

enum class ItemStatus : std::uint8_t { ok = 0, error = 1, cancelled = 2 };

/// Where a worker's result messages go. The worker thread hands over whole messages; they are
/// sent at once, or held back while the next chunk is already here (so a run of tiny chunks
/// costs one send, not one per chunk). Held results never wait more than about flush_ns: a
/// flusher thread sends them if the worker thread is still busy by then.
class ResultSink {
 public:
  static constexpr std::int64_t flush_ns = 1'000'000;
  static constexpr std::size_t flush_bytes = 64 * 1024;

  explicit ResultSink(int fd) : fd_(fd) {}
  ResultSink(const ResultSink&) = delete;
  ResultSink& operator=(const ResultSink&) = delete;
  ~ResultSink() { stop(); }

  /// Sends `msgs` (complete messages) and anything held, now.
  void send_now(ByteBuffer& msgs) {
    std::lock_guard lock(mu_);
    take(msgs);
    send_held();
  }

  /// Takes `msgs` (complete messages, maybe none) at the end of a chunk. If `more_queued` (the
  /// next chunk has already arrived) they may wait, briefly, to leave with the next ones.
  void end_of_chunk(ByteBuffer& msgs, bool more_queued) {
    std::lock_guard lock(mu_);
    take(msgs);
    if (held_.empty()) return;
    std::int64_t now = monotonic_ns();
    std::int64_t since = held_since_.load(std::memory_order_relaxed);
    if (!more_queued || held_.size() >= flush_bytes || (since != 0 && now - since >= flush_ns)) {
      send_held();
      return;
    }
    if (since == 0) {
      held_since_.store(now, std::memory_order_relaxed);
      start_flusher();
      held_flag_.store(1, std::memory_order_seq_cst);
      futex_wake(&held_flag_);
    }
  }

 private:
  void take(ByteBuffer& msgs) {
    if (msgs.empty()) return;
    // Large results are not copied behind small ones: what is held leaves first.
    if (msgs.shared() && !held_.empty()) send_held();
    if (held_.empty()) {
      std::swap(held_, msgs);
    } else {
      held_.append(msgs.data(), msgs.size());
    }
    msgs.clear();
    msgs.shrink(std::size_t{1} << 20);
  }

  // mu_ held.
  void send_held() {
    held_since_.store(0, std::memory_order_relaxed);
    held_flag_.store(0, std::memory_order_relaxed);
    if (held_.empty()) return;
    if (held_.shared()) {
      // Large results stay where they were encoded: the parent maps the block, and marks it
      // free again when it has read them.
      SharedStub stub(held_.size());
      SharedBlock block = held_.take_block();
      block.head().busy.store(1, std::memory_order_release);
      try {
        send_all_with_fd(fd_, stub.bytes, sizeof stub.bytes, block.fd());
      } catch (...) {
        block.head().busy.store(0, std::memory_order_release);
        SharedBlockCache::instance().release(std::move(block));
        throw;
      }
      SharedBlockCache::instance().release(std::move(block));
      return;
    }
    std::size_t size = held_.size();
    held_.clear();
    // The bytes stay valid: clear() only resets the size, and mu_ keeps others out.
    send_all(fd_, held_.data(), size);
    held_.shrink(std::size_t{1} << 20);
  }

  void start_flusher() {
    if (flusher_.joinable()) return;
    // Started on first need, so workers that never hold results never have a second thread.
    // The worker was forked from the single-threaded fork server: creating a thread is safe.
    flusher_ = std::thread([this] { flusher_main(); });
  }

  void flusher_main() noexcept {
    for (;;) {
      if (held_flag_.load(std::memory_order_seq_cst) == 0) {
        if (stopping_.load()) return;
        futex_wait_private(&held_flag_, 0, Deadline::never());
        continue;
      }
      if (stopping_.load()) return;
      std::int64_t since = held_since_.load(std::memory_order_relaxed);
      std::int64_t left = since == 0 ? 0 : since + flush_ns - monotonic_ns();
      if (left > 0) {
        futex_wait_private(&held_flag_, 1, Deadline::after(std::chrono::nanoseconds(left)));
        continue;
      }
      std::lock_guard lock(mu_);
      std::int64_t s = held_since_.load(std::memory_order_relaxed);
      if (s != 0 && monotonic_ns() - s >= flush_ns) {
        try {
          send_held();
        } catch (...) {
          // The parent is gone; the worker thread will find out too, and exit.
          held_.clear();
        }
      }
    }
  }

  void stop() noexcept {
    if (!flusher_.joinable()) return;
    stopping_.store(true);
    held_flag_.store(2, std::memory_order_seq_cst);
    futex_wake(&held_flag_);
    flusher_.join();
  }

  static void futex_wait_private(std::atomic<std::uint32_t>* word, std::uint32_t expected,
                                 const Deadline& deadline) noexcept {
    try {
      futex_wait(word, expected, deadline);
    } catch (...) {
    }
  }

  int fd_;
  std::mutex mu_;
  ByteBuffer held_{ByteBuffer::shareable};
  std::atomic<std::int64_t> held_since_{0};
  std::atomic<std::uint32_t> held_flag_{0};  // futex: 1 while results are held
  std::atomic<bool> stopping_{false};
  std::thread flusher_;
};

/// Everything a trampoline needs to run one chunk: the callable's bytes, the items, and where
/// results go. Results are appended to one message per run of items and flushed at the end
/// of the chunk, or earlier when they pile up (size) or age (time), so that the parent gets
/// them promptly and a worker that dies loses little.
class ChunkContext {
 public:
  ChunkContext(std::uint64_t chunk_id, std::span<const std::byte> state, ReadArchive items,
               std::uint32_t count, WorkerSlot* slot, bool timed, ResultSink& sink,
               ByteBuffer& out)
      : state_(state),
        items_(items),
        count_(count),
        chunk_id_(chunk_id),
        slot_(slot),
        timed_(timed),
        sink_(sink),
        out_(out) {}

  std::uint32_t count() const noexcept { return count_; }
  ReadArchive& items() noexcept { return items_; }

  /// The callable, rebuilt from its bytes: empty types are default-constructed, trivially
  /// copyable ones copied bytewise (C++20 implicitly creates the object in the storage),
  /// Serializable ones decoded.
  template <class F>
  F& callable() {
    if constexpr (std::is_empty_v<F> && std::is_default_constructible_v<F>) {
      static F f{};
      return f;
    } else if constexpr (kind_of<F>() == Kind::user) {
      ReadArchive r(state_.data(), state_.data() + state_.size());
      auto* f = ::new (static_cast<void*>(storage_)) F();
      owned_ = [](void* p) { static_cast<F*>(p)->~F(); };
      r.get(*f);
      return *f;
    } else {
      static_assert(sizeof(F) <= sizeof(storage_) && alignof(F) <= alignof(std::max_align_t),
                    "procpool: the callable's captures are too large; pass data as arguments");
      if (state_.size() != sizeof(F)) throw ProtocolError("procpool: callable size mismatch");
      std::memcpy(storage_, state_.data(), sizeof(F));
      return *std::launder(reinterpret_cast<F*>(storage_));
    }
  }

  ~ChunkContext() {
    if (owned_) owned_(storage_);
  }

  void begin_item(std::uint32_t i) noexcept {
    if (timed_) slot_->item_started_ns.store(monotonic_ns(), std::memory_order_relaxed);
    slot_->item.store(i, std::memory_order_release);
    if (results_at_ == npos) open(i);
  }

  template <class R>
  void ok(const R& r) {
    std::size_t at = out_.size();
    out_.put(static_cast<std::uint8_t>(ItemStatus::ok));
    try {
      out_.encode(r);
    } catch (...) {
      out_.truncate(at);
      error(std::current_exception());
      return;
    }
    end_item();
  }
  /// Reports item i as not run: its chunk was cancelled before it started.
  void skip_item(std::uint32_t i) {
    if (results_at_ == npos) open(i);
    out_.put(static_cast<std::uint8_t>(ItemStatus::cancelled));
    ++in_message_;
  }
  void ok_void() {
    out_.put(static_cast<std::uint8_t>(ItemStatus::ok));
    end_item();
  }
  void error(std::exception_ptr e) noexcept {
    std::size_t at = out_.size();
    try {
      out_.put(static_cast<std::uint8_t>(ItemStatus::error));
      encode_error(out_, e);
    } catch (...) {
      // Not even the error could be written (no memory): report a bare bad_alloc.
      out_.truncate(at);
      out_.put(static_cast<std::uint8_t>(ItemStatus::error));
      out_.put(static_cast<std::uint8_t>(ErrorCode::bad_alloc));
      out_.put(std::uint8_t{0});
      out_.put(std::uint8_t{0});
    }
    end_item();
  }

  /// Writes the results gathered so far to the parent, now.
  void flush() {
    if (results_at_ == npos) return;
    close_message();
    sink_.send_now(out_);
    last_flush_ns_ = 0;
  }

  /// Ends the chunk: its results go to the sink, which may hold them briefly if the next chunk
  /// has already arrived.
  void finish(bool more_queued) {
    if (results_at_ != npos) close_message();
    sink_.end_of_chunk(out_, more_queued);
  }

 private:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);
  static constexpr std::size_t flush_bytes = ResultSink::flush_bytes;
  static constexpr std::int64_t flush_ns = ResultSink::flush_ns;

  void open(std::uint32_t first) {
    results_at_ = out_.begin_message(Msg::results);
    out_.put(chunk_id_);
    out_.put(first);
    count_at_ = out_.size();
    out_.put(std::uint32_t{0});
    in_message_ = 0;
  }
  void close_message() noexcept {
    std::memcpy(out_.data() + count_at_, &in_message_, sizeof in_message_);
    out_.finish_message(results_at_);
    results_at_ = npos;
  }
  // Results pile up within a chunk; they leave when there are many bytes of them, or when the
  // oldest is older than flush_ns. The clock is read every `stride_` items, a stride that
  // shrinks for slow items and grows for fast ones, so tiny tasks do not pay for the clock.
  void end_item() {
    ++in_message_;
    if (out_.size() >= flush_bytes) {
      flush();
      return;
    }
    if (++since_check_ < stride_) return;
    since_check_ = 0;
    std::int64_t now = monotonic_ns();
    if (last_flush_ns_ == 0) {
      last_flush_ns_ = now;
      return;
    }
    if (now - last_flush_ns_ >= flush_ns) {
      stride_ = stride_ > 1 ? stride_ / 2 : 1;
      flush();
    } else if (stride_ < 64) {
      stride_ *= 2;
    }
  }

  std::span<const std::byte> state_;
  ReadArchive items_;
  std::uint32_t count_;
  std::uint64_t chunk_id_;
  WorkerSlot* slot_;
  bool timed_;
  ResultSink& sink_;
  ByteBuffer& out_;
  std::size_t results_at_ = npos;
  std::size_t count_at_ = 0;
  std::uint32_t in_message_ = 0;
  std::uint32_t since_check_ = 0;
  std::uint32_t stride_ = 1;
  std::int64_t last_flush_ns_ = 0;
  alignas(std::max_align_t) unsigned char storage_[256];
  void (*owned_)(void*) = nullptr;
};

/// How a task's item becomes a call: f(item) for map and imap, std::apply(f, item) for
/// starmap and apply (whose arguments travel as a tuple).
enum class CallMode { single, unpack };

template <CallMode Mode, class F, class Item>
decltype(auto) call_item(F& f, Item& item) {
  if constexpr (Mode == CallMode::single) {
    return std::invoke(f, std::move(item));
  } else {
    return std::apply(f, std::move(item));
  }
}

/// The trampoline for tasks of callable F over items of type Item. Its address (through
/// function_ref) is what a chunk carries to name its code.
template <class F, class Item, CallMode Mode>
void run_chunk(ChunkContext& ctx) {
  F& f = ctx.callable<F>();
  using R = decltype(call_item<Mode>(f, std::declval<Item&>()));
  for (std::uint32_t i = 0; i < ctx.count(); ++i) {
    ctx.begin_item(i);
    try {
      Item item{};
      ctx.items().get(item);
      if constexpr (std::is_void_v<R>) {
        call_item<Mode>(f, item);
        ctx.ok_void();
      } else {
        const std::decay_t<R>& r = call_item<Mode>(f, item);
        ctx.ok(r);
      }
    } catch (...) {
      ctx.error(std::current_exception());
    }
  }
}

/// Turns exit(n) inside a task or initializer into: flush, _exit(n) (see Process).
inline void worker_exit_now(int status, void*) noexcept {
  std::fflush(nullptr);
  ::_exit(status);
}

/// Whether a whole message is already buffered at `begin`.
inline bool message_ready(const ByteBuffer& in, std::size_t begin) noexcept {
  std::size_t avail = in.size() - begin;
  if (avail < header_size) return false;
  std::uint64_t len;
  std::memcpy(&len, in.data() + begin, sizeof len);
  return avail - header_size >= len;
}

/// Reads the next whole message into `in`, and the memfds that come with `shared` stubs into
/// `fds`; false at end of stream.
inline bool read_message(int fd, ByteBuffer& in, std::size_t& begin,
                         std::deque<unique_fd>& fds) {
  for (;;) {
    std::size_t avail = in.size() - begin;
    if (avail >= header_size) {
      std::uint64_t len;
      std::memcpy(&len, in.data() + begin, sizeof len);
      if (avail - header_size >= len) return true;
    }
    if (begin > 0) {
      in.consume(begin);
      begin = 0;
    }
    std::size_t want = 64 * 1024;
    if (in.size() >= header_size) {
      std::uint64_t len;
      std::memcpy(&len, in.data(), sizeof len);
      if (len + header_size > in.size()) want = std::max<std::size_t>(want, len + header_size - in.size());
    }
    std::size_t before = in.size();
    std::byte* p = in.grow(want);
    ssize_t n = recv_with_fds(fd, p, want, 0, fds);
    if (n <= 0) {
      in.truncate(before);
      return false;
    }
    in.truncate(before + static_cast<std::size_t>(n));
  }
}

struct WorkerConfig {
  int fd;                              // the worker's end of its channel
  WorkerSlot* slot;
  const std::function<void()>* initializer;
  std::size_t max_tasks;               // 0: unlimited
  bool timed;                          // record item start times (task_timeout is set)
  std::size_t index;                   // the worker's slot, for its name
};

/// The worker's life: initializer, then chunks until told to leave or the parent goes away.
[[noreturn]] inline void worker_main(const WorkerConfig& cfg) noexcept {
  ::on_exit(worker_exit_now, nullptr);
  become_current_process("PoolWorker-" + std::to_string(cfg.index + 1));
  ByteBuffer out{ByteBuffer::shareable};
  try {
    if (cfg.initializer && *cfg.initializer) (*cfg.initializer)();
  } catch (...) {
    std::size_t at = out.begin_message(Msg::init_failed);
    encode_error(out, std::current_exception());
    out.finish_message(at);
    try {
      send_all(cfg.fd, out.data(), out.size());
    } catch (...) {
    }
    std::fflush(nullptr);
    ::_exit(3);
  }
  cfg.slot->initialized.store(1, std::memory_order_release);

  ByteBuffer in;
  std::deque<unique_fd> fds;
  ReceivedBlocks received;
  std::size_t begin = 0;
  std::size_t tasks = 0;
  int code = 0;
  ResultSink sink(cfg.fd);
  try {
    while (read_message(cfg.fd, in, begin, fds)) {
      const std::byte* msg = in.data() + begin;
      std::uint64_t len;
      std::memcpy(&len, msg, sizeof len);
      auto type = static_cast<Msg>(msg[sizeof len]);
      ReadArchive body(msg + header_size, msg + header_size + len);
      begin += header_size + static_cast<std::size_t>(len);
      if (type == Msg::exit) break;
      // A large chunk is in the shared block that came with its stub; it is read in place and
      // unmapped when the chunk is done.
      ReceivedBlocks::Lease block;
      if (type == Msg::shared) {
        std::uint64_t bytes;
        body(bytes);
        block = received.open_next(fds, bytes);
        if (block.size() < header_size) throw ProtocolError("procpool: a shared block is empty");
        msg = block.data();
        std::memcpy(&len, msg, sizeof len);
        type = static_cast<Msg>(msg[sizeof len]);
        if (len != block.size() - header_size) {
          throw ProtocolError("procpool: a shared block does not hold exactly one message");
        }
        body = ReadArchive(msg + header_size, msg + header_size + len);
      }
      if (type != Msg::chunk) throw ProtocolError("procpool: unexpected message in worker");
      std::uint64_t chunk_id = 0, fn = 0;
      std::uint32_t count = 0;
      body(chunk_id, fn);
      std::size_t state_len = body.count<std::byte>("callable state");
      std::span<const std::byte> state(body.take(state_len), state_len);
      body(count);
      ChunkContext ctx(chunk_id, state, body, count, cfg.slot, cfg.timed, sink, out);
      // Until its first item begins (the callable is decoded first), the slot must describe
      // this chunk, not the previous chunk's last item: a death now is item 0's, and its clock
      // runs from now. Stored before chunk_id (a release), so the parent never sees them stale.
      cfg.slot->item.store(0, std::memory_order_relaxed);
      if (cfg.timed) cfg.slot->item_started_ns.store(monotonic_ns(), std::memory_order_relaxed);
      // Publish the chunk before checking for its cancellation: the parent sets the flag,
      // then looks at chunk_id, so one of the two always sees the other.
      cfg.slot->chunk_id.store(chunk_id, std::memory_order_seq_cst);
      if (cfg.slot->is_cancelled(chunk_id)) {
        for (std::uint32_t i = 0; i < count; ++i) ctx.skip_item(i);
      } else {
        resolve_function_ref(fn)(ctx);
      }
      bool last_task = cfg.max_tasks && tasks + 1 >= cfg.max_tasks;
      ctx.finish(!last_task && message_ready(in, begin));
      cfg.slot->chunk_id.store(0, std::memory_order_release);
      // What tasks printed appears as their chunk ends, not when the worker exits.
      std::fflush(stdout);
      if (cfg.max_tasks && ++tasks >= cfg.max_tasks) break;
    }
    // Results held for the next chunk's company leave before the worker does.
    ByteBuffer none;
    sink.send_now(none);
  } catch (const std::exception& e) {
    report(std::string("worker failed: ") + e.what());
    code = 4;
  }
  std::fflush(nullptr);
  ::_exit(code);
}

}  // namespace procpool::detail
