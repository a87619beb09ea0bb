// A pool of 3 workers runs 10 tasks one at a time with the blocking apply(), as Python's
// `[pool.apply(square, (i,)) for i in range(10)]`: only 3 distinct worker pids ever appear.
#include <procpool/procpool.hpp>

#include <unistd.h>

#include <chrono>
#include <iostream>
#include <thread>
#include <vector>

int square(int n) {
  // std::endl flushes: a worker's output is otherwise flushed only when the worker exits.
  std::cout << "worker " << ::getpid() << " squares " << n << std::endl;
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return n * n;
}

int main() {
  procpool::Pool pool(3);
  std::vector<int> results;
  for (int i = 0; i < 10; ++i) results.push_back(pool.apply(square, i));  // waits for each

  std::cout << "[";
  for (std::size_t i = 0; i < results.size(); ++i) std::cout << (i ? ", " : "") << results[i];
  std::cout << "]\n";
}
