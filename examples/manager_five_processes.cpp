// Five processes share a dict and a list through a Manager: process i sets d[i] = i * i and
// appends i to the list. The dict's content is always the same; the list's order is the order
// in which the processes happened to run.
#include <procpool/manager.hpp>
#include <procpool/process.hpp>

#include <algorithm>
#include <iostream>
#include <map>
#include <vector>

void worker(procpool::DictProxy<int, int> d, procpool::ListProxy<int> l, int i) {
  d.set(i, i * i);
  l.append(i);
}

void print_list(const std::vector<int>& v) {
  std::cout << "[";
  for (std::size_t i = 0; i < v.size(); ++i) std::cout << (i ? ", " : "") << v[i];
  std::cout << "]\n";
}

int main() {
  procpool::Manager manager;
  auto d = manager.dict<int, int>();
  auto l = manager.list<int>();

  std::vector<procpool::Process> processes;
  for (int i = 0; i < 5; ++i) processes.emplace_back(worker, d, l, i);
  for (auto& p : processes) p.start();
  for (auto& p : processes) p.join();

  auto items = d.items();
  std::map<int, int> sorted(items.begin(), items.end());  // a manager dict has no order
  std::cout << "{";
  for (auto it = sorted.begin(); it != sorted.end(); ++it) {
    std::cout << (it == sorted.begin() ? "" : ", ") << it->first << ": " << it->second;
  }
  std::cout << "}\n";
  auto appended = l.snapshot();
  print_list(appended);  // in the order the processes appended
  std::sort(appended.begin(), appended.end());
  std::cout << "sorted: ";
  print_list(appended);
}
