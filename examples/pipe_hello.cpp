// A child sends a greeting through a Pipe and the parent prints it: Python's
// `parent_conn, child_conn = Pipe()` / `Process(target=f, args=(child_conn,))` example.
#include <procpool/procpool.hpp>

#include <functional>
#include <iostream>
#include <string>

void f(procpool::Connection& conn) {
  conn.send("hello from " + procpool::current_process().name());
  conn.close();
}

int main() {
  auto [parent_conn, child_conn] = procpool::Pipe();
  procpool::Process p(f, std::ref(child_conn));  // the child inherits the pipe by fork
  p.start();
  child_conn.close();  // only the child uses this end now
  std::cout << parent_conn.recv<std::string>() << "\n";
  p.join();
}
