// A child puts `[42, None, 'hello']` into a Queue and the parent gets and prints it: Python's
// `q = Queue()` / `Process(target=f, args=(q,))` / `print(q.get())` example. The Python list
// becomes a tuple, and None an empty std::optional.
#include <procpool/procpool.hpp>

#include <iostream>
#include <optional>
#include <string>
#include <tuple>

using Item = std::tuple<int, std::optional<int>, std::string>;

int main() {
  procpool::Queue<Item> q;  // created before the Process, which inherits it by fork
  procpool::Process p([&q] { q.put(Item{42, std::nullopt, "hello"}); });
  p.start();

  auto [number, maybe, text] = q.get();  // waits until the child has put it
  std::cout << "[" << number << ", " << (maybe ? std::to_string(*maybe) : "None") << ", '"
            << text << "']\n";
  p.join();
}
