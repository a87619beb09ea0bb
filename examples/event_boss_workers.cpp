// Worker processes wait on an Event until a boss process sets it, then all go on at once:
//   def worker(event, i):
//       print(f'worker {i} waits for the boss', flush=True)
//       event.wait()
//       print(f'worker {i} starts working', flush=True)
//   def boss(event):
//       print('boss prepares the work', flush=True)
//       time.sleep(1)
//       print('boss: work is ready', flush=True)
//       event.set()
// No worker starts before the boss says the work is ready, whatever order the rest comes in.
#include <procpool/procpool.hpp>

#include <chrono>
#include <iostream>
#include <thread>
#include <vector>

// std::endl flushes each line as it is printed, as flush=True does: the lines then appear in
// the order they happened, not when each process exits.
void worker(procpool::Event event, int i) {
  std::cout << "worker " << i << " waits for the boss" << std::endl;
  event.wait();
  std::cout << "worker " << i << " starts working" << std::endl;
}

void boss(procpool::Event event) {
  std::cout << "boss prepares the work" << std::endl;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  std::cout << "boss: work is ready" << std::endl;
  event.set();  // wakes every worker waiting, and lets later waits through at once
}

int main() {
  procpool::Event event;
  std::vector<procpool::Process> processes;
  for (int i = 0; i < 3; ++i) processes.emplace_back(worker, event, i);
  processes.emplace_back(boss, event);
  for (auto& p : processes) p.start();
  for (auto& p : processes) p.join();
  std::cout << "all workers done\n";
}
