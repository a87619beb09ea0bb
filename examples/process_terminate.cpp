// Stops a child that would sleep for 1000 s: Python's `p.terminate()` example, where
// is_alive() goes from True to False and `p.exitcode == -signal.SIGTERM`.
#include <procpool/procpool.hpp>

#include <chrono>
#include <csignal>
#include <iostream>
#include <thread>

int main() {
  auto [ready_r, ready_w] = procpool::Pipe(/*duplex=*/false);
  procpool::Process p([&ready_w] {
    ready_w.send(true);  // tell the parent we are running
    std::this_thread::sleep_for(std::chrono::seconds(1000));
  });
  std::cout << std::boolalpha << "before start, alive: " << p.is_alive() << "\n";
  p.start();
  ready_r.recv<bool>();
  std::cout << "started, alive: " << p.is_alive() << "\n";

  p.terminate();
  p.join();  // Python sleeps 0.1 s here; join() waits exactly as long as needed
  std::cout << "terminated, alive: " << p.is_alive() << "\n";
  std::cout << "exitcode: " << *p.exitcode() << "\n";
  std::cout << "exitcode == -SIGTERM: " << (p.exitcode() == -SIGTERM) << "\n";
}
