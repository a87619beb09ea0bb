#pragma once
// Test support shared by synchronize_test.cpp and shared_memory_test.cpp.

#include <thread>

namespace test_support {

// Whether another thread of this process can take `lock` right now (it releases it at once).
template <class L>
bool free_for_another_thread(L& lock) {
  bool took = false;
  std::thread t([&] {
    took = lock.try_lock();
    if (took) lock.unlock();
  });
  t.join();
  return took;
}

}  // namespace test_support
