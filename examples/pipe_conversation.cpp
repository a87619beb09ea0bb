// A two-way conversation over a duplex Pipe: the child sends `[12, {"name": "yuan"}, "hello"]`
// (a tuple in C++), the parent prints it and answers, the child prints the answer.
#include <procpool/procpool.hpp>

#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <tuple>

using Message = std::tuple<int, std::map<std::string, std::string>, std::string>;

void f(procpool::Connection& conn) {
  conn.send(Message{12, {{"name", "yuan"}}, "hello"});
  std::cout << "response: " << conn.recv<std::string>() << "\n";
  conn.close();
}

int main() {
  auto [parent_conn, child_conn] = procpool::Pipe();
  procpool::Process p(f, std::ref(child_conn));
  p.start();

  auto [number, dict, text] = parent_conn.recv<Message>();
  std::cout << "[" << number << ", {";
  const char* sep = "";
  for (const auto& [key, value] : dict) {
    std::cout << sep << "'" << key << "': '" << value << "'";
    sep = ", ";
  }
  // Flush before answering, so this line is out before the child prints its reply.
  std::cout << "}, '" << text << "']" << std::endl;

  parent_conn.send(std::string("hello, child"));
  p.join();
}
