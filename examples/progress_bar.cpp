// Progress bars, as tqdm's process_map gives Python: map and imap_unordered take a
// procpool::Progress as their last argument and draw a bar on stderr while they run, and a
// ProgressBar counts anything else. The bars appear only when stderr is a terminal (run this
// in one to see them); the results printed on stdout are the same either way.
#include <procpool/procpool.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ranges>
#include <thread>
#include <vector>

// Stands for a task that takes a while.
long slow_square(long x) {
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return x * x;
}

bool is_prime(long n) {
  if (n < 2) return false;
  for (long d = 2; d * d <= n; ++d) {
    if (n % d == 0) return false;
  }
  return true;
}

int main() {
  procpool::Pool pool(2);

  // map: the bar advances as results arrive; its total is the size of the input.
  std::vector<long> squares = pool.map(slow_square, std::views::iota(0L, 300L),
                                       procpool::Progress{.description = "squares"});
  long sum = 0;
  for (long s : squares) sum += s;
  std::printf("sum of squares below 300: %ld\n", sum);

  // imap_unordered: the bar advances as this loop takes the results, in chunks of 2000.
  long primes = 0;
  for (bool p : pool.imap_unordered(is_prime, std::views::iota(0L, 2'000'000L), 2000,
                                    procpool::Progress{.description = "primes"})) {
    primes += p;
  }
  std::printf("primes below 2000000: %ld\n", primes);

  // A ProgressBar of its own, here over results that finish in any order.
  std::vector<procpool::AsyncResult<long>> results;
  for (long x = 0; x < 100; ++x) results.push_back(pool.apply_async(slow_square, x));
  procpool::ProgressBar bar({.description = "tasks", .total = results.size()});
  long largest = 0;
  for (auto& r : procpool::as_completed(results)) {
    largest = std::max(largest, r.get());
    bar.update();
  }
  bar.close();  // the final line; the destructor would write it too
  std::printf("largest square: %ld\n", largest);
}
