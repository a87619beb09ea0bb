// The same tiny work done by 100 separate Processes and by pool.map over 100 items, timed:
// the Python tutorials' "Process vs Pool" benchmark. Each Process pays for a fork; a Pool
// forks its workers once and sends them the items.
#include <procpool/procpool.hpp>

#include <chrono>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <ranges>
#include <vector>

long f(long x) { return x * x; }

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int main() {
  std::cout << std::fixed << std::setprecision(3);
  auto start = std::chrono::steady_clock::now();
  std::vector<procpool::Process> processes;
  processes.reserve(100);
  for (long i = 0; i < 100; ++i) processes.emplace_back(f, i);
  for (auto& p : processes) p.start();
  for (auto& p : processes) p.join();
  std::cout << "100 processes: " << seconds_since(start) << " s\n";

  start = std::chrono::steady_clock::now();
  std::vector<long> results;
  {
    procpool::Pool pool;  // cpu_count() workers; starting them is part of the time
    results = pool.map(f, std::views::iota(0L, 100L));
  }
  std::cout << "pool.map over 100 items: " << seconds_since(start) << " s\n";
  std::cout << "sum: " << std::accumulate(results.begin(), results.end(), 0L) << "\n";
}
