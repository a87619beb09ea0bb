// A tour of the Pool API, line for line the `with Pool(processes=4) as pool:` example of
// Python's multiprocessing docs: map, imap_unordered, apply_async(...).get(timeout), worker
// pids, and a get() that runs out of patience while the pool stays usable.
#include <procpool/procpool.hpp>

#include <unistd.h>

#include <chrono>
#include <iostream>
#include <ranges>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

int f(int x) { return x * x; }

template <class T>
void print_list(const std::vector<T>& v) {
  std::cout << "[";
  for (std::size_t i = 0; i < v.size(); ++i) std::cout << (i ? ", " : "") << v[i];
  std::cout << "]\n";
}

int main() {
  {
    procpool::Pool pool(4);  // start 4 worker processes

    print_list(pool.map(f, std::views::iota(0, 10)));  // [0, 1, 4, ..., 81]

    // The same numbers in arbitrary order.
    for (int i : pool.imap_unordered(f, std::views::iota(0, 10))) std::cout << i << "\n";

    auto res = pool.apply_async(f, 20);  // runs in only one process
    std::cout << res.get(1s) << "\n";    // 400

    auto pid = pool.apply_async(::getpid);  // the pid of the worker that ran it
    std::cout << pid.get(1s) << "\n";

    // Launching several evaluations asynchronously *may* use more processes.
    std::vector<procpool::AsyncResult<pid_t>> multiple_results;
    for (int i = 0; i < 4; ++i) multiple_results.push_back(pool.apply_async(::getpid));
    std::vector<pid_t> pids;
    for (auto& r : multiple_results) pids.push_back(r.get(1s));
    print_list(pids);

    // Make a single worker sleep for 10 s. Python waits get(timeout=1); 0.2 s shows the same
    // and keeps the example quick. The sleep never finishes: terminate() below kills it.
    auto sleeping = pool.apply_async([] { std::this_thread::sleep_for(10s); });
    try {
      sleeping.get(200ms);
    } catch (const procpool::TimeoutError&) {
      std::cout << "We lacked patience and got a procpool::TimeoutError\n";
    }
    std::cout << "For the moment, the pool remains available for more work: f(7) = "
              << pool.apply(f, 7) << "\n";

    pool.terminate();  // what leaving Python's `with` block does; ~Pool() would wait for the sleep
  }
  std::cout << "Now the pool is closed and no longer available\n";
}
