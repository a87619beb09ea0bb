#pragma once
// The untyped core of Queue: a byte ring in anonymous shared memory that carries framed messages
// between any number of producer and consumer processes, and survives any of them dying at any
// instruction.
//
// Design (docs/ARCHITECTURE.md, "Queue", has the long form):
// - Producers take `write_mutex` for a whole message and consumers `read_mutex` for a whole
//   message, both robust. With one writer and one reader at a time the ring is single-producer
//   single-consumer, so positions are plain atomics and the data copy runs without a lock shared
//   by both sides.
// - Each side publishes its progress with ONE 64-bit atomic store that carries everything the
//   other side and its successors need: the tail and the count of messages begun, or the head,
//   the count of messages finished and whether a message is half read. A process that dies
//   between two stores leaves a state that is consistent by construction, so the next locker
//   (told by EOWNERDEAD) has nothing to repair.
// - A message travels as chunks (FIRST, middle, LAST). One that fits in a quarter of the ring is
//   written as one chunk once there is room for all of it; a bigger one streams through the ring
//   while the consumer drains it, so messages of any size pass through a fixed buffer. A stream
//   cut short (producer died, or its put() timed out) is discarded by the consumer: a new FIRST
//   or an ABORT chunk tells it, or, if the ring stays empty mid-message, finding write_mutex
//   free or abandoned.
// - Sleeping uses futexes on sequence words that a side bumps only when the other side announced
//   a sleeper, so the fast path makes no system call.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "../errors.hpp"
#include "posix.hpp"
#include "shared_region.hpp"

namespace procpool::detail {

inline constexpr std::size_t default_queue_buffer_bytes = std::size_t{1} << 20;
inline constexpr std::size_t min_queue_buffer_bytes = std::size_t{1} << 12;
inline constexpr std::size_t max_queue_buffer_bytes = std::size_t{1} << 30;

struct ChunkHeader {
  enum : std::uint32_t { first = 1, last = 2, abort = 4 };
  std::uint32_t len;    // data bytes following the header in this chunk
  std::uint32_t flags;  // first / last / abort
  std::uint64_t total;  // the whole message's size, in a FIRST chunk
};
static_assert(sizeof(ChunkHeader) == 16);

inline constexpr std::uint32_t count_mask = 0x7fffffffu;

// The word a producer publishes: tail position (low 32 bits, modulo 2^32) and the number of
// messages begun (31 bits, modulo 2^31).
inline std::uint64_t pack_tail(std::uint32_t tail, std::uint32_t begun) noexcept {
  return std::uint64_t{tail} | (std::uint64_t{begun & count_mask} << 32);
}
// The word a consumer publishes: head position, the number of messages finished (delivered or
// discarded) and whether the message at the head is half read.
inline std::uint64_t pack_head(std::uint32_t head, std::uint32_t done, bool in_msg) noexcept {
  return std::uint64_t{head} | (std::uint64_t{done & count_mask} << 32) |
         (std::uint64_t{in_msg} << 63);
}
inline std::uint32_t word_pos(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w); }
inline std::uint32_t word_count(std::uint64_t w) noexcept {
  return static_cast<std::uint32_t>(w >> 32) & count_mask;
}
inline bool word_in_msg(std::uint64_t w) noexcept { return (w >> 63) != 0; }

struct QueueState {
  QueueState(std::uint32_t cap, std::uint32_t max) : capacity(cap), maxsize(max) {}

  // Each side's lines are written by that side only, so producers and consumers on different
  // CPUs do not steal each other's cache lines more than the data itself requires.
  alignas(64) RobustMutex write_mutex{false};
  std::uint32_t head_seen = 0;  // producers' last look at the head: a hint, never ahead of it

  alignas(64) RobustMutex read_mutex{false};
  std::uint32_t tail_seen = 0;  // consumers' last look at the tail: a hint, never ahead of it

  alignas(64) const std::uint32_t capacity;  // a power of two
  const std::uint32_t maxsize;               // 0: no bound on the number of messages

  alignas(64) std::atomic<std::uint64_t> tail_word{0};
  std::atomic<std::uint32_t> tail_seq{0};          // futex: bumped for sleeping consumers
  std::atomic<std::uint32_t> consumers_sleeping{0};

  alignas(64) std::atomic<std::uint64_t> head_word{0};
  std::atomic<std::uint32_t> head_seq{0};          // futex: bumped for sleeping producers
  std::atomic<std::uint32_t> producers_sleeping{0};

  // JoinableQueue: messages settled by task_done() or discarded (31 bits, modulo 2^31).
  alignas(64) std::atomic<std::uint32_t> settled{0};
  std::atomic<std::uint32_t> settled_seq{0};
  std::atomic<std::uint32_t> joiners_sleeping{0};

  // The ring follows the state, 64-byte aligned.
  std::byte* ring() noexcept { return reinterpret_cast<std::byte*>(this) + ring_offset(); }
  static constexpr std::size_t ring_offset() noexcept { return (sizeof(QueueState) + 63) & ~std::size_t{63}; }
};

inline std::uint32_t pad8(std::uint64_t n) noexcept {
  return static_cast<std::uint32_t>((n + 7) & ~std::uint64_t{7});
}

/// A multi-producer multi-consumer queue of byte messages in shared memory.
/// Copies are handles to the same queue. Safe to use from many threads and processes at once.
class ShmQueue {
 public:
  ShmQueue(std::size_t maxsize, std::size_t buffer_bytes) {
    if (maxsize > count_mask / 2) {
      throw std::invalid_argument("procpool::Queue: maxsize " + std::to_string(maxsize) +
                                  " is too large (at most 2^30-1)");
    }
    if (buffer_bytes < min_queue_buffer_bytes || buffer_bytes > max_queue_buffer_bytes) {
      throw std::invalid_argument("procpool::Queue: buffer_bytes must be between 4 KiB and 1 GiB");
    }
    std::size_t cap = min_queue_buffer_bytes;
    while (cap < buffer_bytes) cap <<= 1;
    state_ = make_shared_object<QueueState>(QueueState::ring_offset() + cap,
                                            static_cast<std::uint32_t>(cap),
                                            static_cast<std::uint32_t>(maxsize));
  }

  std::size_t maxsize() const noexcept { return state_->maxsize; }
  std::size_t buffer_bytes() const noexcept { return state_->capacity; }

  /// Messages put (begun) and not yet taken or discarded.
  std::size_t size() const noexcept {
    // done first: it never passes begun, so begun read later is at least as large, and the
    // difference cannot wrap around to ~2^31 when a message is put and taken between the loads.
    std::uint32_t done = word_count(state_->head_word.load(std::memory_order_acquire));
    std::uint32_t begun = word_count(state_->tail_word.load(std::memory_order_acquire));
    return (begun - done) & count_mask;
  }

  /// Appends one message. Returns false (nothing written) if the deadline passed before there was
  /// room; a stream already begun is aborted then, and its consumer discards it.
  bool put(std::span<const std::byte> msg, const Deadline& deadline) {
    auto& s = *state_;
    switch (s.write_mutex.lock(deadline)) {
      case LockResult::acquired:
        break;
      case LockResult::owner_died:
        // A producer died mid-put. Its words are consistent; a half-written stream is closed
        // now (our FIRST chunk may have to wait for the maxsize slot the stream holds).
        s.write_mutex.make_consistent();
        abort_dead_writers_stream();
        break;
      case LockResult::deadlock:
        throw std::logic_error("procpool::Queue: put() re-entered from the same thread");
      default:
        return false;
    }
    struct Unlock {
      QueueState& s;
      ~Unlock() { s.write_mutex.unlock(); }
    } unlock{s};

    if (s.maxsize != 0 && !wait_for_slot(deadline)) return false;

    const std::uint32_t cap = s.capacity;
    const std::uint64_t total = msg.size();
    const std::uint64_t whole = sizeof(ChunkHeader) + pad8(total);
    if (whole <= cap / 4) {
      if (!wait_for_space(static_cast<std::uint32_t>(whole), deadline)) return false;
      write_chunk(msg.data(), static_cast<std::uint32_t>(total),
                  ChunkHeader::first | ChunkHeader::last, total, 1);
      return true;
    }
    // Stream. Always leave room for an ABORT header, so a timed-out stream can be closed.
    const std::uint32_t reserve = sizeof(ChunkHeader);
    const std::uint32_t min_chunk = cap / 8;
    std::uint64_t off = 0;
    bool first = true;
    while (first || off < total) {
      std::uint64_t remaining = total - off;
      std::uint32_t want = static_cast<std::uint32_t>(
          sizeof(ChunkHeader) + std::min<std::uint64_t>(pad8(remaining), min_chunk));
      if (!wait_for_space(want + reserve, deadline)) {
        if (!first) {
          // total 1 marks a withdrawn message: the same store uncounts it (begun - 1), so a
          // put() that threw Full leaves qsize() and JoinableQueue::join() as they were.
          write_chunk(nullptr, 0, ChunkHeader::abort, 1, count_mask);
          wake_joiners();  // unfinished() may have dropped to zero
        }
        return false;
      }
      std::uint32_t space = free_space() - reserve - static_cast<std::uint32_t>(sizeof(ChunkHeader));
      space &= ~std::uint32_t{7};
      std::uint32_t len = static_cast<std::uint32_t>(std::min<std::uint64_t>(remaining, space));
      std::uint32_t flags = (first ? ChunkHeader::first : 0u) |
                            (off + len == total ? ChunkHeader::last : 0u);
      write_chunk(msg.data() + off, len, flags, total, first ? 1u : 0u);
      off += len;
      first = false;
    }
    return true;
  }

  /// Takes the next whole message, calling `consume(span)` on its bytes while they are still in
  /// the ring when possible (no copy), else on a reassembled copy. Returns false if the deadline
  /// passed before a message began. Once a message has begun it is read to its end: its
  /// producer is alive and writing, or found dead and the message discarded.
  /// If `consume` throws, the message is still taken, and the exception propagates.
  template <class Consume>
  bool get(const Deadline& deadline, Consume&& consume) {
    auto& s = *state_;
    switch (s.read_mutex.lock(deadline)) {
      case LockResult::acquired:
        break;
      case LockResult::owner_died:
        // A consumer died mid-get; head_word says whether it left a half-read message, which the
        // loop below then discards.
        s.read_mutex.make_consistent();
        break;
      case LockResult::deadlock:
        throw std::logic_error("procpool::Queue: get() re-entered from the same thread");
      default:
        return false;
    }
    struct Unlock {
      QueueState& s;
      ~Unlock() { s.read_mutex.unlock(); }
    } unlock{s};

    const std::uint32_t cap = s.capacity;
    std::byte* ring = s.ring();
    std::vector<std::byte> assembled;
    bool mine = false;  // the message at the head was begun by this call (else: discard it)

    for (;;) {
      std::uint64_t hw = s.head_word.load(std::memory_order_relaxed);
      std::uint32_t head = word_pos(hw);
      std::uint32_t done = word_count(hw);
      bool in_msg = word_in_msg(hw);

      // The last look at the tail may already show this chunk; else look again (and wait).
      if (s.tail_seen == head) {
        s.tail_seen = word_pos(s.tail_word.load(std::memory_order_acquire));
        if (s.tail_seen == head) {
          if (!wait_for_data(head, in_msg, deadline)) return false;
          continue;
        }
      }

      ChunkHeader h;
      copy_out(ring, cap, head, &h, sizeof h);
      if (h.len > cap || (h.flags & ~std::uint32_t{7}) != 0) {
        throw ProtocolError("procpool::Queue: corrupt chunk header in shared memory (len " +
                            std::to_string(h.len) + ", flags " + std::to_string(h.flags) + ")");
      }
      std::uint32_t next = head + static_cast<std::uint32_t>(sizeof h) + pad8(h.len);

      if (h.flags & ChunkHeader::abort) {
        // A dead producer's stream (total 0) was counted and is finished here; a withdrawn one
        // (total 1, put() timed out) was uncounted by its producer.
        bool counted = in_msg && h.total == 0;
        publish_head(next, counted ? done + 1 : done, false);
        settle_discarded(counted ? 1 : 0);
        assembled.clear();
        mine = false;
        continue;
      }
      if (h.flags & ChunkHeader::first) {
        if (in_msg) {
          // The message before this one never got its LAST chunk: its producer died.
          ++done;
          settle_discarded(1);
        }
        mine = true;
        in_msg = true;
        assembled.clear();
        std::uint32_t data = head + static_cast<std::uint32_t>(sizeof h);
        if ((h.flags & ChunkHeader::last) && h.len == h.total) {
          std::uint32_t at = data & (cap - 1);
          if (at + h.len <= cap) {
            // The common case: a whole message, contiguous in the ring. Hand it out in place and
            // free it afterwards, so a throwing consume still takes it.
            struct Release {
              ShmQueue& q;
              std::uint32_t next, done;
              ~Release() { q.publish_head(next, done + 1, false); }
            } release{*this, next, done};
            consume(std::span<const std::byte>(ring + at, h.len));
            return true;
          }
        }
        if (h.total > std::uint64_t{1} << 40) {
          throw ProtocolError("procpool::Queue: message of " + std::to_string(h.total) +
                              " bytes in shared memory is implausibly large");
        }
        // Grows with the data actually read, never from the length field alone.
        assembled.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(h.total, cap)));
      }
      if (mine) {
        std::size_t old = assembled.size();
        if (old + h.len > h.total && (h.flags & ChunkHeader::first)) {
          throw ProtocolError("procpool::Queue: chunk longer than its message");
        }
        assembled.resize(old + h.len);
        copy_out(ring, cap, head + static_cast<std::uint32_t>(sizeof h), assembled.data() + old,
                 h.len);
      }
      if (h.flags & ChunkHeader::last) {
        publish_head(next, done + 1, false);
        if (!mine) {
          settle_discarded(1);
          continue;  // the tail of a message whose consumer died
        }
        consume(std::span<const std::byte>(assembled.data(), assembled.size()));
        return true;
      }
      publish_head(next, done, true);
    }
  }

  /// JoinableQueue: marks one message as processed.
  /// @throws std::logic_error if called more often than messages were put.
  void task_done() {
    auto& s = *state_;
    std::uint32_t settled = s.settled.load();
    for (;;) {
      std::uint32_t begun = word_count(s.tail_word.load(std::memory_order_acquire));
      if (((begun - settled) & count_mask) == 0) {
        throw std::logic_error("procpool::JoinableQueue: task_done() called more times than "
                               "there were items put");
      }
      if (s.settled.compare_exchange_weak(settled, (settled + 1) & count_mask)) break;
    }
    wake_joiners();
  }

  /// JoinableQueue: messages put and not yet settled by task_done() (or discarded).
  std::size_t unfinished() const noexcept {
    // settled first, as in size(): it never passes begun.
    std::uint32_t settled = state_->settled.load(std::memory_order_acquire);
    std::uint32_t begun = word_count(state_->tail_word.load(std::memory_order_acquire));
    return (begun - settled) & count_mask;
  }

  /// JoinableQueue: waits until every message put has been settled. False on timeout.
  bool join(const Deadline& deadline) {
    auto& s = *state_;
    return sleep_until(s.settled_seq, s.joiners_sleeping, [&] { return unfinished() == 0; },
                       deadline);
  }

 private:
  // Producers only (write_mutex held). Looks at the consumers' head only when the last look
  // does not show enough room, so a producer running ahead does not pull the consumers' cache
  // line over on every message.
  std::uint32_t free_space(std::uint32_t wanted = 0) const noexcept {
    auto& s = *state_;
    std::uint32_t tail = word_pos(s.tail_word.load(std::memory_order_relaxed));
    std::uint32_t room = s.capacity - (tail - s.head_seen);
    if (room >= wanted && wanted != 0) return room;
    s.head_seen = word_pos(s.head_word.load(std::memory_order_acquire));
    return s.capacity - (tail - s.head_seen);
  }

  static void copy_in(std::byte* ring, std::uint32_t cap, std::uint32_t pos, const void* src,
                      std::size_t n) noexcept {
    std::uint32_t at = pos & (cap - 1);
    std::size_t first = std::min<std::size_t>(n, cap - at);
    if (first) std::memcpy(ring + at, src, first);
    if (n > first) std::memcpy(ring, static_cast<const std::byte*>(src) + first, n - first);
  }
  static void copy_out(const std::byte* ring, std::uint32_t cap, std::uint32_t pos, void* dst,
                       std::size_t n) noexcept {
    std::uint32_t at = pos & (cap - 1);
    std::size_t first = std::min<std::size_t>(n, cap - at);
    if (first) std::memcpy(dst, ring + at, first);
    if (n > first) std::memcpy(static_cast<std::byte*>(dst) + first, ring, n - first);
  }

  // Caller holds write_mutex and has made sure the chunk fits.
  void write_chunk(const std::byte* data, std::uint32_t len, std::uint32_t flags,
                   std::uint64_t total, std::uint32_t count_delta) noexcept {
    auto& s = *state_;
    std::uint64_t tw = s.tail_word.load(std::memory_order_relaxed);
    std::uint32_t tail = word_pos(tw);
    ChunkHeader h{len, flags, total};
    copy_in(s.ring(), s.capacity, tail, &h, sizeof h);
    if (len) copy_in(s.ring(), s.capacity, tail + static_cast<std::uint32_t>(sizeof h), data, len);
    std::uint32_t next = tail + static_cast<std::uint32_t>(sizeof h) + pad8(len);
    // One store publishes the chunk and, for a FIRST chunk, counts the message (count_delta 1;
    // count_mask, i.e. -1 modulo 2^31, uncounts a withdrawn one).
    s.tail_word.store(pack_tail(next, word_count(tw) + count_delta),
                      std::memory_order_seq_cst);
    if (s.consumers_sleeping.load(std::memory_order_seq_cst) != 0) {
      s.tail_seq.fetch_add(1, std::memory_order_seq_cst);
      futex_wake(&s.tail_seq);
    }
  }

  void publish_head(std::uint32_t head, std::uint32_t done, bool in_msg) noexcept {
    auto& s = *state_;
    s.head_word.store(pack_head(head, done, in_msg), std::memory_order_seq_cst);
    if (s.producers_sleeping.load(std::memory_order_seq_cst) != 0) {
      s.head_seq.fetch_add(1, std::memory_order_seq_cst);
      futex_wake(&s.head_seq);
    }
  }

  void settle_discarded(std::uint32_t n) noexcept {
    if (n == 0) return;
    state_->settled.fetch_add(n, std::memory_order_seq_cst);
    wake_joiners();
  }
  void wake_joiners() noexcept {
    auto& s = *state_;
    s.settled_seq.fetch_add(1, std::memory_order_seq_cst);
    if (s.joiners_sleeping.load(std::memory_order_seq_cst) != 0) futex_wake(&s.settled_seq);
  }

  // Sleeps on head_seq until `ready()`; false when the deadline passes first.
  template <class Ready>
  bool wait_for_consumers(Ready&& ready, const Deadline& deadline) {
    auto& s = *state_;
    if (spin_until(ready, 500)) return true;
    return sleep_until(s.head_seq, s.producers_sleeping, ready, deadline);
  }

  bool wait_for_slot(const Deadline& deadline) {
    return wait_for_consumers([this] { return size() < state_->maxsize; }, deadline);
  }
  bool wait_for_space(std::uint32_t bytes, const Deadline& deadline) {
    return wait_for_consumers([this, bytes] { return free_space(bytes) >= bytes; }, deadline);
  }

  // Waits until the tail moves past `head`. Returns false if the deadline passed with nothing
  // begun. In the middle of a message the deadline no longer applies, but the producer's
  // liveness is checked every 100 ms: a stream whose producer is gone is discarded here.
  bool wait_for_data(std::uint32_t head, bool in_msg, const Deadline& deadline) {
    auto& s = *state_;
    auto ready = [&] { return word_pos(s.tail_word.load(std::memory_order_acquire)) != head; };
    if (spin_until(ready, 500)) return true;
    if (!in_msg) return sleep_until(s.tail_seq, s.consumers_sleeping, ready, deadline);
    for (;;) {
      auto slice = Deadline::after(std::chrono::milliseconds(100));
      if (sleep_until(s.tail_seq, s.consumers_sleeping, ready, slice)) return true;
      if (abandon_orphaned_stream(head)) return true;  // the caller's loop sees the new state
    }
  }

  // Holding write_mutex after its owner died: closes with an ABORT chunk a stream that owner left
  // half written, so consumers discard it whoever holds write_mutex next (a producer waiting
  // for the maxsize slot that stream holds would otherwise block the consumer's check for an
  // orphaned stream forever). Every stream chunk leaves room for an ABORT; with less room the
  // last chunk written ended a message, and an ABORT outside a message is skipped.
  void abort_dead_writers_stream() noexcept {
    if (free_space() >= sizeof(ChunkHeader)) write_chunk(nullptr, 0, ChunkHeader::abort, 0, 0);
  }

  // Mid-message with an empty ring: if no producer holds write_mutex (it is free, or its holder
  // died), the message will never be finished. Returns true after discarding it.
  bool abandon_orphaned_stream(std::uint32_t head) {
    auto& s = *state_;
    LockResult r = s.write_mutex.try_lock();
    if (r == LockResult::busy || r == LockResult::deadlock) return false;
    if (r == LockResult::owner_died) {
      s.write_mutex.make_consistent();
      abort_dead_writers_stream();
    }
    bool orphaned = word_pos(s.tail_word.load(std::memory_order_acquire)) == head;
    if (orphaned) {
      std::uint64_t hw = s.head_word.load(std::memory_order_relaxed);
      publish_head(head, word_count(hw) + 1, false);
      settle_discarded(1);
    }
    s.write_mutex.unlock();
    return true;
  }

  std::shared_ptr<QueueState> state_;
};

}  // namespace procpool::detail
