// 100 tasks on a pool of 5, each with a callback that prints the result and the pid it runs in,
// as Python's `pool.apply_async(square, (i,), callback=show)`: every callback runs in the parent.
#include <procpool/procpool.hpp>

#include <unistd.h>

#include <iostream>
#include <vector>

int square(int x) { return x * x; }

int main() {
  const pid_t parent = ::getpid();
  std::cout << "parent pid: " << parent << "\n";

  int callbacks = 0, in_parent = 0;  // callbacks run one at a time: no lock needed
  long sum = 0;
  {
    procpool::Pool pool(5);
    std::vector<procpool::AsyncResult<int>> results;  // handles on the 100 tasks
    for (int i = 0; i < 100; ++i) {
      results.push_back(pool.apply_async(square, i).on_result([&](int result) {
        std::cout << "result " << result << ", callback in pid " << ::getpid() << "\n";
        ++callbacks;
        if (::getpid() == parent) ++in_parent;
        sum += result;
      }));
    }
    pool.close();
    pool.join();  // every callback has run when join() returns
  }
  std::cout << callbacks << " callbacks, " << in_parent << " in the parent; sum " << sum << "\n";
}
