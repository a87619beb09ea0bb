// 100 processes each take one from a counter kept in a Manager's dict; the parent prints what
// is left. First as the Python tutorial does it, reading and writing the count under a manager
// lock; then with the manager's atomic update, which runs the decrement inside the server and
// needs no lock at all.
#include <procpool/manager.hpp>
#include <procpool/process.hpp>

#include <iostream>
#include <mutex>
#include <string>
#include <vector>

using Counter = procpool::DictProxy<std::string, int>;

// Starts n processes running `target` and waits for all of them.
template <class F>
void run_processes(int n, F target) {
  std::vector<procpool::Process> processes;
  for (int i = 0; i < n; ++i) processes.emplace_back(target);
  for (auto& p : processes) p.start();
  for (auto& p : processes) p.join();
}

int main() {
  procpool::Manager manager;
  Counter d = manager.dict<std::string, int>({{"count", 100}});

  // With a lock: get and set are each atomic, but "get, then set" is not; the lock makes it so.
  procpool::LockProxy lock = manager.lock();
  run_processes(100, [d, lock] {
    std::scoped_lock guard(lock);
    d.set("count", d.get("count") - 1);
  });
  std::cout << "with a lock: {'count': " << d.get("count") << "}\n";

  // With update: the function runs in the server, where no other request can interleave.
  d.set("count", 100);
  run_processes(100, [d] { d.update("count", [](int& count) { --count; }); });
  std::cout << "with update: {'count': " << d.get("count") << "}\n";
}
