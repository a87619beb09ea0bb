#pragma once
// A process-wide record of the descriptors procpool uses internally (pool channels, fork
// server sockets, epoll and event fds), so that a freshly forked fork server or Process child
// can close the ones that belong to other pools. Children of the program inherit every
// descriptor; without this, a worker channel held open by an unrelated child would hide the
// channel's end of stream. Lock-free, allocation-free: safe to walk right after fork().

#include <unistd.h>

#include <atomic>
#include <cstddef>

namespace procpool::detail {

class InternalFds {
 public:
  static constexpr std::size_t capacity = 4096;

  static InternalFds& instance() noexcept {
    static InternalFds table;
    return table;
  }

  /// Records fd as internal. If the table is full the fd is simply not recorded: the only
  /// cost is that children keep a copy of it.
  void add(int fd) noexcept {
    if (fd < 0) return;
    for (auto& slot : slots_) {
      int expected = -1;
      if (slot.compare_exchange_strong(expected, fd, std::memory_order_acq_rel)) return;
    }
  }

  void remove(int fd) noexcept {
    if (fd < 0) return;
    for (auto& slot : slots_) {
      int expected = fd;
      if (slot.compare_exchange_strong(expected, -1, std::memory_order_acq_rel)) return;
    }
  }

  /// In a freshly forked child: closes every recorded descriptor except those in keep.
  void close_all_in_child(const int* keep = nullptr, std::size_t nkeep = 0) noexcept {
    for (auto& slot : slots_) {
      int fd = slot.load(std::memory_order_relaxed);
      if (fd < 0) continue;
      bool kept = false;
      for (std::size_t i = 0; i < nkeep; ++i) kept = kept || keep[i] == fd;
      if (!kept) {
        ::close(fd);
        slot.store(-1, std::memory_order_relaxed);
      }
    }
  }

 private:
  InternalFds() noexcept {
    for (auto& slot : slots_) slot.store(-1, std::memory_order_relaxed);
  }
  std::atomic<int> slots_[capacity];
};

}  // namespace procpool::detail
