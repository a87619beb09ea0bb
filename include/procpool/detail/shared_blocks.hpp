#pragma once
// Large messages between the parent and a pool worker travel through shared memory instead of
// the socket: the sender writes the message into a memfd-backed block and sends only a small
// stub naming it, with the memfd attached (SCM_RIGHTS); the receiver maps the block and reads
// the message in place. A 16 MiB argument then costs one copy into the block (encoding) and
// one out of it (decoding), not four, and never waits for socket buffer space.
//
// Blocks are kept and reused. On these VMs the first touch of freshly allocated memory costs
// 2-10 µs per page (the host backs guest pages lazily), several times what copying the page
// costs, so memory that is already resident is what makes large payloads fast. Each block
// starts with a header holding a `busy` word: the sender sets it before sending, the receiver
// clears it when it is done with the block, and only a block that is not busy is reused.
//
// The cache belongs to one process: a forked child that finds it (its pid differs) drops
// every inherited entry without reusing it, since the parent still uses those blocks.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "posix.hpp"

namespace procpool::detail {

/// The header at the start of every shared block.
struct alignas(64) SharedBlockHeader {
  std::atomic<std::uint32_t> busy{0};  // 1 from send until the receiver is done
};

static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

/// Messages at least this big go through a shared block.
inline constexpr std::size_t shared_threshold = std::size_t{1} << 20;

/// One memfd-backed block, mapped read-write in the process that made it. Move-only; a
/// default-constructed block is empty.
class SharedBlock {
 public:
  static constexpr std::size_t header = sizeof(SharedBlockHeader);

  SharedBlock() = default;
  SharedBlock(SharedBlock&& o) noexcept { swap(o); }
  SharedBlock& operator=(SharedBlock&& o) noexcept {
    SharedBlock tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~SharedBlock() { destroy(); }

  /// A new block with room for at least `capacity` payload bytes. @throws std::bad_alloc.
  static SharedBlock make(std::size_t capacity) {
    long page = ::sysconf(_SC_PAGESIZE);
    std::size_t ps = page > 0 ? static_cast<std::size_t>(page) : 4096;
    std::size_t bytes = (capacity + header + ps - 1) / ps * ps;
    int fd = ::memfd_create("procpool-payload", MFD_CLOEXEC);
    if (fd < 0) throw std::bad_alloc();
    if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      ::close(fd);
      throw std::bad_alloc();
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw std::bad_alloc();
    }
    SharedBlock b;
    b.fd_ = fd;
    b.base_ = static_cast<std::byte*>(p);
    b.bytes_ = bytes;
    b.owner_ = ::getpid();
    ::new (p) SharedBlockHeader();
    return b;
  }

  explicit operator bool() const noexcept { return base_ != nullptr; }
  int fd() const noexcept { return fd_; }
  std::byte* data() const noexcept { return base_ + header; }
  std::size_t capacity() const noexcept { return bytes_ ? bytes_ - header : 0; }
  pid_t owner() const noexcept { return owner_; }
  SharedBlockHeader& head() const noexcept {
    return *std::launder(reinterpret_cast<SharedBlockHeader*>(base_));
  }

  void swap(SharedBlock& o) noexcept {
    std::swap(fd_, o.fd_);
    std::swap(base_, o.base_);
    std::swap(bytes_, o.bytes_);
    std::swap(owner_, o.owner_);
  }

 private:
  void destroy() noexcept {
    if (base_) ::munmap(base_, bytes_);
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    base_ = nullptr;
    bytes_ = 0;
  }

  int fd_ = -1;
  std::byte* base_ = nullptr;
  std::size_t bytes_ = 0;
  pid_t owner_ = 0;
};

/// The process's blocks that are not in use by a ByteBuffer: some may still be busy (sent,
/// not yet released by the receiver). Bounded: beyond max_cached_bytes the idle ones go.
class SharedBlockCache {
 public:
  static constexpr std::size_t max_cached_bytes = std::size_t{512} << 20;

  static SharedBlockCache& instance() {
    static SharedBlockCache cache;
    return cache;
  }

  /// A block with room for `capacity` bytes that nobody uses: the smallest idle one that fits,
  /// else a new one (a little larger, so that a message that grows keeps its block).
  SharedBlock acquire(std::size_t capacity) {
    {
      std::lock_guard lock(mu_);
      forget_if_forked();
      std::size_t best = blocks_.size();
      for (std::size_t i = 0; i < blocks_.size(); ++i) {
        SharedBlock& b = blocks_[i];
        if (b.capacity() < capacity || b.head().busy.load(std::memory_order_acquire) != 0) {
          continue;
        }
        if (best == blocks_.size() || b.capacity() < blocks_[best].capacity()) best = i;
      }
      if (best != blocks_.size()) {
        SharedBlock b = std::move(blocks_[best]);
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_bytes_ -= b.capacity();
        return b;
      }
    }
    return SharedBlock::make(capacity + capacity / 4);
  }

  /// Takes back a block (busy or not). A block made by another process (inherited through
  /// fork) is only unmapped: its owner still uses it.
  void release(SharedBlock b) noexcept {
    if (!b) return;
    if (b.owner() != ::getpid()) return;  // ~SharedBlock unmaps our copy
    std::lock_guard lock(mu_);
    forget_if_forked();
    try {
      blocks_.push_back(std::move(b));
    } catch (...) {
      return;  // no memory for the list: the block goes
    }
    cached_bytes_ += blocks_.back().capacity();
    // Over budget: drop idle blocks, oldest first. Busy ones stay (their receiver still reads).
    for (std::size_t i = 0; i < blocks_.size() && cached_bytes_ > max_cached_bytes;) {
      if (blocks_[i].head().busy.load(std::memory_order_acquire) == 0) {
        cached_bytes_ -= blocks_[i].capacity();
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
  }

 private:
  SharedBlockCache() = default;

  // mu_ held. After a fork the child owns none of the inherited blocks.
  void forget_if_forked() noexcept {
    pid_t self = ::getpid();
    if (self == pid_) return;
    pid_ = self;
    blocks_.clear();
    cached_bytes_ = 0;
  }

  std::mutex mu_;
  std::vector<SharedBlock> blocks_;
  std::size_t cached_bytes_ = 0;
  pid_t pid_ = ::getpid();
};

/// The blocks a process has received from the other side of one channel, kept mapped. On
/// these VMs what costs is not the memory but a new mapping of it (every page of a fresh
/// mapping faults once more in the host), and the sender reuses its blocks: so the receiver
/// maps each block once and reuses the mapping while the sender reuses the block. Blocks are
/// told apart by their inode, which cannot be reused while the mapping keeps the inode alive.
/// Mappings beyond max_mapped_bytes are dropped, least recently used first.
class ReceivedBlocks {
 public:
  static constexpr std::size_t max_mapped_bytes = std::size_t{512} << 20;

  /// A received block being read: releasing it (or destroying it) tells the sender that it
  /// may reuse the block.
  class Lease {
   public:
    Lease() = default;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease(Lease&& o) noexcept
        : head_(std::exchange(o.head_, nullptr)), data_(o.data_), size_(o.size_) {}
    Lease& operator=(Lease&& o) noexcept {
      if (this != &o) {
        release();
        head_ = std::exchange(o.head_, nullptr);
        data_ = o.data_;
        size_ = o.size_;
      }
      return *this;
    }
    ~Lease() { release(); }

    const std::byte* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    void release() noexcept {
      if (head_) head_->busy.store(0, std::memory_order_release);
      head_ = nullptr;
    }

   private:
    friend class ReceivedBlocks;
    Lease(SharedBlockHeader* head, const std::byte* data, std::size_t size) noexcept
        : head_(head), data_(data), size_(size) {}
    SharedBlockHeader* head_ = nullptr;
    const std::byte* data_ = nullptr;
    std::size_t size_ = 0;
  };

  ReceivedBlocks() = default;
  ReceivedBlocks(const ReceivedBlocks&) = delete;
  ReceivedBlocks& operator=(const ReceivedBlocks&) = delete;
  ~ReceivedBlocks() { clear(); }

  /// The first `size` payload bytes of the block behind fd (the fd is closed: the mapping is
  /// what stays). @throws ProtocolError if fd is not a block that large.
  Lease open(int fd, std::size_t size) {
    struct stat st {};
    bool ok = fd >= 0 && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
              static_cast<std::uint64_t>(st.st_size) >= size &&
              static_cast<std::uint64_t>(st.st_size) - size >= SharedBlock::header;
    if (!ok) {
      if (fd >= 0) ::close(fd);
      throw ProtocolError("procpool: a shared block is missing or smaller than its message");
    }
    ++clock_;
    for (Entry& e : entries_) {
      if (e.dev == st.st_dev && e.ino == st.st_ino && e.bytes >= size + SharedBlock::header) {
        ::close(fd);
        e.last_use = clock_;
        return lease(e, size);
      }
    }
    auto bytes = static_cast<std::size_t>(st.st_size);
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) throw ProtocolError("procpool: cannot map a shared block");
    // The inode of a block mapped here before and since grown cannot be the same inode (blocks
    // never grow), but drop any stale entry for it all the same.
    forget(st.st_dev, st.st_ino);
    entries_.push_back(Entry{st.st_dev, st.st_ino, static_cast<std::byte*>(p), bytes, clock_});
    mapped_ += bytes;
    trim();
    return lease(entries_.back(), size);
  }

  /// open() for the next `shared` stub of a channel: its memfd is the oldest of those received
  /// (`fds`, in arrival order). @throws ProtocolError if none arrived.
  Lease open_next(std::deque<unique_fd>& fds, std::size_t size) {
    if (fds.empty()) throw ProtocolError("procpool: a shared block came without its memfd");
    int fd = fds.front().release();
    fds.pop_front();
    return open(fd, size);
  }

  void clear() noexcept {
    for (Entry& e : entries_) ::munmap(e.base, e.bytes);
    entries_.clear();
    mapped_ = 0;
  }

 private:
  struct Entry {
    dev_t dev;
    ino_t ino;
    std::byte* base;
    std::size_t bytes;
    std::uint64_t last_use;
  };

  static Lease lease(Entry& e, std::size_t size) noexcept {
    auto* head = std::launder(reinterpret_cast<SharedBlockHeader*>(e.base));
    return Lease(head, e.base + SharedBlock::header, size);
  }

  void forget(dev_t dev, ino_t ino) noexcept {
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      if (entries_[i].dev == dev && entries_[i].ino == ino) {
        drop(i);
        return;
      }
    }
  }

  void drop(std::size_t i) noexcept {
    ::munmap(entries_[i].base, entries_[i].bytes);
    mapped_ -= entries_[i].bytes;
    entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
  }

  // Drops least recently used mappings, never the one just used, while over budget.
  void trim() noexcept {
    while (mapped_ > max_mapped_bytes && entries_.size() > 1) {
      std::size_t oldest = 0;
      for (std::size_t i = 1; i < entries_.size(); ++i) {
        if (entries_[i].last_use < entries_[oldest].last_use) oldest = i;
      }
      if (entries_[oldest].last_use == clock_) return;
      drop(oldest);
    }
  }

  std::vector<Entry> entries_;
  std::size_t mapped_ = 0;
  std::uint64_t clock_ = 0;
};

}  // namespace procpool::detail
