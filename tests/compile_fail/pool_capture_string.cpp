// EXPECT: In instantiation of .struct procpool::task_callable_cannot_be_sent<main\(\)::<lambda\(int\)> >.*error: static assertion failed: procpool: .*cannot be sent.*capturing a std::string
// A lambda that captures a std::string by value owns heap memory: its bytes are not the
// string, so it cannot be sent to a worker. The error must say to pass the data as arguments.
#include <procpool/pool.hpp>

#include <string>

int main() {
  procpool::Pool pool(1);
  std::string prefix = "item ";
  auto r = pool.apply_async([prefix](int x) { return prefix + std::to_string(x); }, 1);
  return static_cast<int>(r.get().size());
}
