// A countdown in a child process checks a shared flag at every step; the parent clears the
// flag and the child stops early and exits cleanly. The tutorial's
//   def countdown(n, running):
//       while n > 0 and running.value:
//           print(f'T-minus {n}', flush=True); n -= 1; time.sleep(1)
//   running = Value('b', True); p = Process(target=countdown, args=(10, running)); p.start()
//   time.sleep(3.5); running.value = False; p.join(); print('exit code:', p.exitcode)
// Python's sleeps make the stopping point depend on the machine. Here the two processes meet on
// Events instead: the child says when it has counted three steps, and waits until the parent
// says it has cleared the flag. The output is the same every time.
#include <procpool/procpool.hpp>

#include <iostream>

void countdown(int n, procpool::Value<bool> running, procpool::Event three_done,
               procpool::Event flag_cleared) {
  int steps = 0;
  while (n > 0 && running.load()) {
    std::cout << "T-minus " << n << std::endl;
    --n;
    if (++steps == 3) {
      three_done.set();
      flag_cleared.wait();  // where Python's countdown sleeps
    }
  }
  if (n > 0) std::cout << "countdown stopped early at " << n << std::endl;
}

int main() {
  procpool::Value<bool> running(true);
  procpool::Event three_done, flag_cleared;
  procpool::Process p(countdown, 10, running, three_done, flag_cleared);
  p.start();

  three_done.wait();
  std::cout << "parent: stop the countdown" << std::endl;
  running.store(false);
  flag_cleared.set();

  p.join();  // the child leaves its loop and returns: a clean exit
  std::cout << "exit code: " << *p.exitcode() << "\n";
}
