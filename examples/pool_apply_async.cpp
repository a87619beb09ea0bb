// The pool_apply example with apply_async: all 10 tasks are submitted at once and run side by
// side, then close(), join() and get() on every result, as Python's
// `results = [pool.apply_async(square, (i,)) for i in range(10)]` ... `[r.get() for r in results]`.
#include <procpool/procpool.hpp>

#include <unistd.h>

#include <chrono>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

int square(int n) {
  // Seeded in the task: a generator created before the fork would give every worker the same
  // "random" numbers.
  std::mt19937 rng(std::random_device{}());
  int ms = std::uniform_int_distribution(1, 20)(rng);
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  std::cout << "worker " << ::getpid() << " squared " << n << " after " << ms << " ms"
            << std::endl;  // flush now: a worker's output is otherwise flushed when it exits
  return n * n;
}

int main() {
  procpool::Pool pool(3);
  std::vector<procpool::AsyncResult<int>> results;
  for (int i = 0; i < 10; ++i) results.push_back(pool.apply_async(square, i));  // returns at once
  pool.close();  // no more tasks: the workers exit once they have run these
  pool.join();

  std::cout << "[";
  for (std::size_t i = 0; i < results.size(); ++i) {
    std::cout << (i ? ", " : "") << results[i].get();  // in submission order
  }
  std::cout << "]\n";
}
