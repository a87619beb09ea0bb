// Python's Manager example: a child process fills a shared dict and reverses a shared list;
// the parent prints both. Python's dict here mixes key and value types ({1: '1', '2': 2,
// 0.25: None}); in C++ the key and the value are variants.
#include <procpool/manager.hpp>
#include <procpool/process.hpp>

#include <algorithm>
#include <iostream>
#include <ranges>
#include <string>
#include <variant>
#include <vector>

using Key = std::variant<int, std::string, double>;
using Value = std::variant<std::string, int, std::monostate>;  // monostate plays None

void f(procpool::DictProxy<Key, Value> d, procpool::ListProxy<int> l) {
  d.set(1, std::string("1"));
  d.set(std::string("2"), 2);
  d.set(0.25, std::monostate{});
  l.reverse();
}

// Python's repr of our values: strings quoted, monostate as None.
struct Repr {
  std::ostream& out;
  void operator()(int x) const { out << x; }
  void operator()(double x) const { out << x; }
  void operator()(const std::string& s) const { out << '\'' << s << '\''; }
  void operator()(std::monostate) const { out << "None"; }
};

int main() {
  procpool::Manager manager;
  auto d = manager.dict<Key, Value>();
  auto l = manager.list<int>(std::views::iota(0, 10));

  procpool::Process p(f, d, l);
  p.start();
  p.join();

  // A manager dict has no order; sorting by key (int, then string, then double) gives the
  // order Python shows.
  auto items = d.items();
  std::sort(items.begin(), items.end());
  std::cout << "{";
  for (std::size_t i = 0; i < items.size(); ++i) {
    std::cout << (i ? ", " : "");
    std::visit(Repr{std::cout}, items[i].first);
    std::cout << ": ";
    std::visit(Repr{std::cout}, items[i].second);
  }
  std::cout << "}\n[";
  auto values = l.snapshot();
  for (std::size_t i = 0; i < values.size(); ++i) std::cout << (i ? ", " : "") << values[i];
  std::cout << "]\n";
}
