// Squares 1..7 on a pool of 5 workers with map(), results in input order: the first Pool
// example of Python's docs, `with Pool(5) as p: print(p.map(f, [1, 2, 3]))`.
#include <procpool/procpool.hpp>

#include <iostream>
#include <vector>

int f(int x) { return x * x; }

int main() {
  procpool::Pool p(5);
  std::vector<int> squares = p.map(f, std::vector{1, 2, 3, 4, 5, 6, 7});

  std::cout << "[";
  for (std::size_t i = 0; i < squares.size(); ++i) std::cout << (i ? ", " : "") << squares[i];
  std::cout << "]\n";
}
