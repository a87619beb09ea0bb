// Ten processes print while holding one Lock, so their lines never interleave: Python's
//   def f(l, i):
//       l.acquire()
//       try: print('hello world', i)
//       finally: l.release()
//   lock = Lock()
//   for num in range(10): Process(target=f, args=(lock, num)).start()
// The lines come out in whatever order the processes get the lock.
#include <procpool/procpool.hpp>

#include <iostream>
#include <mutex>
#include <vector>

void f(procpool::Lock l, int i) {  // a copy of a Lock is the same lock
  std::scoped_lock guard(l);  // released even if printing throws, like try/finally
  std::cout << "hello world " << i << std::endl;  // flushed while the lock is held
}

int main() {
  procpool::Lock lock;  // made before the processes, which inherit it
  std::vector<procpool::Process> processes;
  for (int num = 0; num < 10; ++num) processes.emplace_back(f, lock, num);
  for (auto& p : processes) p.start();
  for (auto& p : processes) p.join();  // Python joins non-daemon processes at exit
}
