// EXPECT: In instantiation of .struct procpool::task_callable_cannot_be_sent<std::function<int\(int\)> >.*error: static assertion failed: procpool: .*cannot be sent to a worker process
// A std::function owns heap state that cannot travel to a worker process: apply_async must
// reject it at compile time with a message naming the callable's type.
#include <procpool/pool.hpp>

#include <functional>

int main() {
  procpool::Pool pool(1);
  std::function<int(int)> twice = [](int x) { return 2 * x; };
  auto r = pool.apply_async(twice, 21);
  return r.get();
}
