// Runs a function in a child process with an argument: the first program of Python's
// multiprocessing docs, `Process(target=f, args=('bob',))`, then start() and join().
#include <procpool/procpool.hpp>

#include <iostream>
#include <string>

void f(const std::string& name) { std::cout << "hello " << name << "\n"; }

int main() {
  procpool::Process p(f, std::string("bob"));
  p.start();
  p.join();
}
