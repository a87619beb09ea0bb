#pragma once
/// @file shared_memory.hpp
/// Value<T> and Array<T>: plain data in memory shared with child processes (Python's
/// multiprocessing.Value and multiprocessing.Array).
///
/// Both are shared by inheritance: create them before the Process or Pool that uses them. A
/// child that writes them changes the one copy every process sees. Copies of a Value or Array
/// are handles to the same memory. Each carries a recursive lock, get_lock(), as in Python;
/// single reads and writes of the data are not made atomic by it: hold the lock for
/// read-modify-write sequences such as `v.value() += 1`.

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <ranges>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/shared_region.hpp"
#include "detail/type_name.hpp"
#include "synchronize.hpp"

namespace procpool {

namespace detail {
template <class T>
constexpr bool shareable_as_memory() {
  static_assert(std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> &&
                    !std::is_member_pointer_v<T>,
                "procpool::Value<T>/Array<T>: T must be trivially copyable and hold no pointer, "
                "because every process reads and writes its bytes in place in shared memory; "
                "store indexes or fixed-size arrays instead of pointers, std::string or "
                "std::vector (or share them through a Queue, a Pipe or a Manager)");
  return std::is_trivially_copyable_v<T>;
}
}  // namespace detail

/// One T in shared memory, with a recursive lock (Python's multiprocessing.Value).
///
/// ```
/// procpool::Value<double> v(0.0);
/// procpool::Process p([&v] { std::scoped_lock lk(v.get_lock()); v.value() = 3.14; });
/// ```
template <class T>
class Value {
  static_assert(detail::shareable_as_memory<T>());

 public:
  /// A shared T holding `init` (zero by default). @throws std::system_error if mmap fails.
  explicit Value(const T& init = T{}) : value_(make_slot(init)) {}

  /// The shared value, to read or assign in place.
  T& value() noexcept { return value_->v; }
  /// The shared value, read-only.
  const T& value() const noexcept { return value_->v; }
  /// A copy of the value read under the lock.
  T load() const {
    std::scoped_lock lk(lock_);
    return value_->v;
  }
  /// Writes the value under the lock.
  void store(const T& v) {
    std::scoped_lock lk(lock_);
    value_->v = v;
  }
  /// The recursive lock that goes with this value.
  RLock& get_lock() const noexcept { return lock_; }

 private:
  struct Slot {
    explicit Slot(const T& init) : v(init) {}
    T v;
  };

  // Not make_shared_object, which insists on standard layout: any trivially copyable T (one
  // with a base class holding data, say) is fine in place in shared memory.
  static std::shared_ptr<Slot> make_slot(const T& init) {
    auto region = detail::map_shared(sizeof(Slot));
    Slot* slot = ::new (region.get()) Slot(init);
    return std::shared_ptr<Slot>(std::move(region), slot);
  }
  std::shared_ptr<Slot> value_;
  mutable RLock lock_;
};

/// A fixed-size array of T in shared memory, with a recursive lock (Python's
/// multiprocessing.Array). Sizes and braces behave as with std::vector: `Array<int> a(10)` is
/// ten zeros and `Array<int> a{10}` one element. The size is fixed at construction. Every
/// constructor throws std::length_error if the elements would take more than 1 TiB, and
/// std::system_error if mmap fails.
template <class T>
class Array {
  static_assert(detail::shareable_as_memory<T>());

 public:
  /// The element type.
  using value_type = T;
  /// An iterator over the shared elements: a plain pointer into the shared memory.
  using iterator = T*;
  /// A read-only iterator over the shared elements.
  using const_iterator = const T*;

  /// `n` zero-initialised elements (Python's `Array('i', 10)`).
  explicit Array(std::size_t n) : Array(n, T{}) {}
  /// `n` copies of `value`.
  Array(std::size_t n, const T& value) : Array(allocate(n)) { std::fill_n(data_, n, value); }
  /// The given elements (Python's `Array('i', [1, 2, 3])`).
  Array(std::initializer_list<T> values) : Array(std::span<const T>(values.begin(), values.size())) {}
  /// The elements of a sized range, for example a std::vector or std::views::iota(0, 10).
  template <std::ranges::sized_range R>
    requires(!std::is_integral_v<std::remove_cvref_t<R>> &&
             !std::is_same_v<std::remove_cvref_t<R>, Array> &&  // copies share, not clone
             std::is_convertible_v<std::ranges::range_reference_t<R>, T>)
  explicit Array(R&& values) : Array(allocate(static_cast<std::size_t>(std::ranges::size(values)))) {
    std::size_t i = 0;
    for (auto&& v : values) data_[i++] = static_cast<T>(v);
  }

  /// Element `i`, unchecked.
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  /// Element `i`, read-only, unchecked.
  const T& operator[](std::size_t i) const noexcept { return data_[i]; }
  /// Element `i`. @throws std::out_of_range past the end.
  T& at(std::size_t i) {
    check(i);
    return data_[i];
  }
  /// Element `i`, read-only. @throws std::out_of_range past the end.
  const T& at(std::size_t i) const {
    check(i);
    return data_[i];
  }
  /// The number of elements.
  std::size_t size() const noexcept { return size_; }
  /// The elements, as a span over the shared memory.
  std::span<T> span() noexcept { return {data_, size_}; }
  /// The elements, read-only, as a span over the shared memory.
  std::span<const T> span() const noexcept { return {data_, size_}; }
  /// A pointer to the first element in the shared memory.
  T* data() noexcept { return data_; }
  /// A read-only pointer to the first element in the shared memory.
  const T* data() const noexcept { return data_; }
  /// An iterator on the first element, for range-for and the standard algorithms (takes no
  /// lock).
  iterator begin() noexcept { return data_; }
  /// The iterator one past the last element.
  iterator end() noexcept { return data_ + size_; }
  /// A read-only iterator on the first element.
  const_iterator begin() const noexcept { return data_; }
  /// The read-only iterator one past the last element.
  const_iterator end() const noexcept { return data_ + size_; }
  /// A copy of the elements read under the lock.
  std::vector<T> to_vector() const {
    std::scoped_lock lk(lock_);
    return std::vector<T>(data_, data_ + size_);
  }
  /// The recursive lock that goes with this array.
  RLock& get_lock() const noexcept { return lock_; }

 private:
  struct Mapping {
    std::shared_ptr<void> region;
    std::size_t size;
  };

  static Mapping allocate(std::size_t n) {
    if (n > (std::size_t{1} << 40) / sizeof(T)) {
      throw std::length_error("procpool::Array: " + std::to_string(n) + " elements of " +
                              std::string(detail::type_name<T>()) + " is too large");
    }
    return Mapping{detail::map_shared(n * sizeof(T)), n};
  }

  explicit Array(Mapping m)
      : region_(std::move(m.region)), data_(static_cast<T*>(region_.get())), size_(m.size) {
    // The zeroed pages become T objects; T is trivially copyable, so assignment is valid on them.
    std::uninitialized_value_construct_n(data_, size_);
  }
  explicit Array(std::span<const T> values) : Array(allocate(values.size())) {
    std::copy(values.begin(), values.end(), data_);
  }

  void check(std::size_t i) const {
    if (i >= size_) {
      throw std::out_of_range("procpool::Array: index " + std::to_string(i) +
                              " is out of range for size " + std::to_string(size_));
    }
  }

  std::shared_ptr<void> region_;
  T* data_;
  std::size_t size_;
  mutable RLock lock_;
};

}  // namespace procpool
