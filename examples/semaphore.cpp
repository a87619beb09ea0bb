// Ten processes share a Semaphore(5), so at most five do their work at the same time: the
// tutorial's
//   def task(semaphore, number):
//       with semaphore:
//           value = random(); sleep(value)
//           print(f'Process {number} got {value}', flush=True)
//   semaphore = Semaphore(5)
//   processes = [Process(target=task, args=(semaphore, i)) for i in range(10)]
// Each process also counts, in shared memory, how many are inside with it; the parent prints
// the most it saw, which the semaphore keeps at 5 or fewer.
#include <procpool/procpool.hpp>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

struct Occupancy {  // trivially copyable, so it can live in a Value
  int inside = 0;
  int most = 0;
};

void task(procpool::Semaphore semaphore, procpool::Value<Occupancy> occupancy, int number) {
  std::scoped_lock slot(semaphore);  // `with semaphore:` (acquire now, release at the end)
  int now;
  {
    std::scoped_lock lk(occupancy.get_lock());
    now = ++occupancy.value().inside;
    occupancy.value().most = std::max(occupancy.value().most, now);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50 + 25 * (number % 4)));  // the work
  std::cout << "process " << number << " worked with " << now << " inside" << std::endl;
  std::scoped_lock lk(occupancy.get_lock());
  --occupancy.value().inside;
}

int main() {
  procpool::Semaphore semaphore(5);
  procpool::Value<Occupancy> occupancy;
  std::vector<procpool::Process> processes;
  for (int i = 0; i < 10; ++i) processes.emplace_back(task, semaphore, occupancy, i);
  for (auto& p : processes) p.start();
  for (auto& p : processes) p.join();
  std::cout << "at most " << occupancy.value().most << " were inside at once (limit 5)\n";
}
