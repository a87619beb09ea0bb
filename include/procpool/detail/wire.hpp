#pragma once
// The pool's wire format between the parent and a worker, and the one seam through which a
// task names its code.
//
// Every message on a worker channel is a header { u64 body length, u8 type } followed by the
// body. A message of shared_threshold bytes or more travels in a shared block instead: the
// channel carries a `shared` stub { u64 size } with the block's memfd attached, and the
// block holds the bytes the channel would have carried. Bodies are built with the codec's
// archives (serialize.hpp) minus the type fingerprint: both ends are the same program and the
// trampoline that decodes a chunk is the one that was instantiated for exactly these types.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../serialize.hpp"
#include "exceptions.hpp"
#include "shared_blocks.hpp"

namespace procpool::detail {

enum class Msg : std::uint8_t {
  chunk = 1,        // parent -> worker: run these items
  exit = 2,         // parent -> worker: leave after what you have
  results = 3,      // worker -> parent: results of a run of items of one chunk
  init_failed = 4,  // worker -> parent: the initializer threw
  shared = 5,       // either way: the next bytes of the stream are in the attached memfd
};

inline constexpr std::size_t header_size = sizeof(std::uint64_t) + 1;

/// A growable byte buffer that can be appended to by the codec's archives. A buffer made
/// `shareable` moves into a shared block (shared_blocks.hpp) once it needs shared_threshold
/// bytes or more, so that it can be handed to the other process instead of copied through
/// the socket.
class ByteBuffer {
 public:
  struct Shareable {};
  static constexpr Shareable shareable{};

  ByteBuffer() = default;
  explicit ByteBuffer(Shareable) noexcept : may_share_(true) {}
  ByteBuffer(ByteBuffer&& o) noexcept { swap(o); }
  ByteBuffer& operator=(ByteBuffer&& o) noexcept {
    ByteBuffer tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~ByteBuffer() {
    // Only a buffer that holds a block touches the cache (and its mutex): most never do.
    if (block_) SharedBlockCache::instance().release(std::move(block_));
  }

  void swap(ByteBuffer& o) noexcept {
    data_.swap(o.data_);
    block_.swap(o.block_);
    std::swap(size_, o.size_);
    std::swap(may_share_, o.may_share_);
  }

  std::byte* data() noexcept { return block_ ? block_.data() : data_.data(); }
  const std::byte* data() const noexcept { return block_ ? block_.data() : data_.data(); }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  void clear() noexcept { size_ = 0; }
  /// Whether the bytes live in a shared block (see take_block).
  bool shared() const noexcept { return static_cast<bool>(block_); }
  /// Grows by n bytes and returns where they start.
  std::byte* grow(std::size_t n) {
    if (size_ + n > capacity()) reserve(std::max(size_ + n, capacity() * 2));
    std::byte* p = data() + size_;
    size_ += n;
    return p;
  }
  void truncate(std::size_t n) noexcept { size_ = n; }
  /// Drops the first n bytes.
  void consume(std::size_t n) noexcept {
    if (n >= size_) {
      size_ = 0;
      return;
    }
    std::memmove(data(), data() + n, size_ - n);
    size_ -= n;
  }
  void append(const void* p, std::size_t n) {
    if (n) std::memcpy(grow(n), p, n);
  }
  template <class T>
  void put(const T& v) {
    append(&v, sizeof v);
  }
  void varint(std::uint64_t v) {
    std::byte* p = grow(varint_size(v));
    WriteArchive(p).varint(v);
  }
  /// Appends the codec's encoding of `v` (no fingerprint).
  template <class T>
  void encode(const T& v) {
    SizeArchive size;
    size.add(v);
    std::size_t at = size_;
    WriteArchive w(grow(size.size()));
    try {
      w.put(v);
    } catch (...) {
      truncate(at);
      throw;
    }
  }
  /// Starts a message; returns its position for finish_message.
  std::size_t begin_message(Msg type) {
    std::size_t at = size_;
    std::byte* p = grow(header_size);
    std::uint64_t zero = 0;
    std::memcpy(p, &zero, sizeof zero);
    p[sizeof zero] = static_cast<std::byte>(type);
    return at;
  }
  void finish_message(std::size_t at) noexcept {
    std::uint64_t len = size_ - at - header_size;
    std::memcpy(data() + at, &len, sizeof len);
  }
  /// Releases memory beyond `keep` bytes of capacity (after a huge message). A shared block
  /// goes back to the cache, to be reused by the next large message.
  void shrink(std::size_t keep) {
    if (capacity() <= keep || size_ > keep) return;
    if (block_) {
      std::vector<std::byte> heap(std::max(keep, size_));
      if (size_) std::memcpy(heap.data(), block_.data(), size_);
      SharedBlockCache::instance().release(std::move(block_));
      data_.swap(heap);
    } else {
      data_.resize(keep);
      data_.shrink_to_fit();
    }
  }
  /// The memfd of the shared block holding the bytes (-1 when they are not shared).
  int shared_fd() const noexcept { return block_.fd(); }
  /// Hands over the shared block holding the bytes; the buffer is then empty.
  SharedBlock take_block() noexcept {
    size_ = 0;
    return std::move(block_);
  }

 private:
  std::size_t capacity() const noexcept { return block_ ? block_.capacity() : data_.size(); }

  void reserve(std::size_t cap) {
    if (may_share_ && cap >= shared_threshold) {
      SharedBlock b = SharedBlockCache::instance().acquire(cap);
      if (size_) std::memcpy(b.data(), data(), size_);
      SharedBlockCache::instance().release(std::move(block_));
      block_ = std::move(b);
      std::vector<std::byte>().swap(data_);
    } else {
      data_.resize(cap);
    }
  }

  std::vector<std::byte> data_;
  SharedBlock block_;
  std::size_t size_ = 0;
  bool may_share_ = false;
};

/// The stub that stands for a message (or a run of messages) in a shared block: a `shared`
/// message whose body is the size of the bytes in the block; the block's memfd travels with
/// the stub's first byte.
struct SharedStub {
  std::byte bytes[header_size + sizeof(std::uint64_t)];

  explicit SharedStub(std::uint64_t size) noexcept {
    std::uint64_t len = sizeof(std::uint64_t);
    std::memcpy(bytes, &len, sizeof len);
    bytes[sizeof len] = static_cast<std::byte>(Msg::shared);
    std::memcpy(bytes + header_size, &size, sizeof size);
  }
};

// ---------------------------------------------------------------------------------------------
// Errors across the boundary: a code for the types rebuilt as themselves, else RemoteError.

enum class ErrorCode : std::uint8_t {
  remote = 0,
  runtime_error,
  logic_error,
  invalid_argument,
  out_of_range,
  domain_error,
  length_error,
  range_error,
  overflow_error,
  underflow_error,
  bad_alloc,
};

/// Appends an exception: [code][type name][message].
inline void encode_error(ByteBuffer& out, std::exception_ptr e) {
  ErrorCode code = ErrorCode::remote;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    const std::type_info& t = typeid(ex);
    if (t == typeid(std::runtime_error)) code = ErrorCode::runtime_error;
    else if (t == typeid(std::logic_error)) code = ErrorCode::logic_error;
    else if (t == typeid(std::invalid_argument)) code = ErrorCode::invalid_argument;
    else if (t == typeid(std::out_of_range)) code = ErrorCode::out_of_range;
    else if (t == typeid(std::domain_error)) code = ErrorCode::domain_error;
    else if (t == typeid(std::length_error)) code = ErrorCode::length_error;
    else if (t == typeid(std::range_error)) code = ErrorCode::range_error;
    else if (t == typeid(std::overflow_error)) code = ErrorCode::overflow_error;
    else if (t == typeid(std::underflow_error)) code = ErrorCode::underflow_error;
    else if (t == typeid(std::bad_alloc)) code = ErrorCode::bad_alloc;
  } catch (...) {
  }
  ExceptionText text = describe_exception(e);
  out.put(static_cast<std::uint8_t>(code));
  out.encode(text.type_name);
  out.encode(text.message);
}

/// Reads an exception written by encode_error and rebuilds it.
inline std::exception_ptr decode_error(ReadArchive& in) {
  std::uint8_t code = 0;
  std::string type_name, message;
  in(code, type_name, message);
  switch (static_cast<ErrorCode>(code)) {
    case ErrorCode::runtime_error: return std::make_exception_ptr(std::runtime_error(message));
    case ErrorCode::logic_error: return std::make_exception_ptr(std::logic_error(message));
    case ErrorCode::invalid_argument:
      return std::make_exception_ptr(std::invalid_argument(message));
    case ErrorCode::out_of_range: return std::make_exception_ptr(std::out_of_range(message));
    case ErrorCode::domain_error: return std::make_exception_ptr(std::domain_error(message));
    case ErrorCode::length_error: return std::make_exception_ptr(std::length_error(message));
    case ErrorCode::range_error: return std::make_exception_ptr(std::range_error(message));
    case ErrorCode::overflow_error: return std::make_exception_ptr(std::overflow_error(message));
    case ErrorCode::underflow_error:
      return std::make_exception_ptr(std::underflow_error(message));
    case ErrorCode::bad_alloc: return std::make_exception_ptr(std::bad_alloc());
    case ErrorCode::remote: return std::make_exception_ptr(RemoteError(type_name, message));
  }
  in.fail("unknown error code " + std::to_string(code));
}

// ---------------------------------------------------------------------------------------------
// The task seam. A chunk names the code that runs it by a FunctionRef. Today every worker is a
// fork of this program, so the reference is the function's offset from an anchor function in
// the same binary. Workers in other address spaces (MPI ranks of the same executable, loaded
// at another base) resolve the same offset against their own anchor. Nothing else in the pool
// knows how code is named.

class ChunkContext;
using ChunkFn = void (*)(ChunkContext&);

inline void function_anchor() {}

inline std::uint64_t function_ref(ChunkFn fn) noexcept {
  return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(fn) -
                                    reinterpret_cast<std::uintptr_t>(&function_anchor));
}

inline ChunkFn resolve_function_ref(std::uint64_t ref) noexcept {
  return reinterpret_cast<ChunkFn>(reinterpret_cast<std::uintptr_t>(&function_anchor) +
                                   static_cast<std::uintptr_t>(ref));
}

}  // namespace procpool::detail
