// A child writes shared memory that the parent then reads: Python's
//   num = Value('d', 0.0); arr = Array('i', range(10))
//   p = Process(target=f, args=(num, arr)); p.start(); p.join()
//   print(num.value); print(arr[:])
// Value and Array live in memory shared with every child forked after they were made; passing
// them to the child hands over a copy that refers to the same memory, as in Python.
#include <procpool/procpool.hpp>

#include <iomanip>
#include <iostream>
#include <ranges>

void f(procpool::Value<double> n, procpool::Array<int> a) {
  n.value() = 3.1415927;
  for (int& x : a) x = -x;
}

int main() {
  procpool::Value<double> num(0.0);
  procpool::Array<int> arr(std::views::iota(0, 10));

  procpool::Process p(f, num, arr);
  p.start();
  p.join();

  std::cout << std::setprecision(8) << num.value() << "\n";
  std::cout << "[";
  for (std::size_t i = 0; i < arr.size(); ++i) std::cout << (i ? ", " : "") << arr[i];
  std::cout << "]\n";
}
