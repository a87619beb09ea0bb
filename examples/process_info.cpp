// Parent and child each print who they are: the `info(title)` example of Python's
// multiprocessing docs (name, parent pid and pid, as os.getppid() / os.getpid()).
#include <procpool/procpool.hpp>

#include <unistd.h>

#include <iostream>
#include <string>

void info(const std::string& title) {
  std::cout << title << "\n"
            << "module name: main\n"  // Python prints __name__; in C++ everything starts at main
            << "process name: " << procpool::current_process().name() << "\n"
            << "parent process: " << ::getppid() << "\n"
            << "process id: " << ::getpid() << "\n";
}

void f(const std::string& name) {
  info("function f");
  std::cout << "hello " << name << "\n";
}

int main() {
  info("main line");
  procpool::Process p(f, std::string("bob"));
  p.start();
  p.join();
}
