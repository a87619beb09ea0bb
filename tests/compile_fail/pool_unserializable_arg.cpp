// EXPECT: In instantiation of .struct procpool::type_is_not_serializable<Guarded>.*error: static assertion failed: procpool: .*cannot cross a process boundary
// A task argument must be Serializable: a struct holding a std::mutex is neither copyable nor
// has a serialize member, so apply_async must reject it with a message naming the type.
#include <procpool/pool.hpp>

#include <mutex>

struct Guarded {
  std::mutex mutex;
  int value = 0;
};

int main() {
  procpool::Pool pool(1);
  Guarded g;
  auto r = pool.apply_async([](const Guarded& x) { return x.value; }, g);
  return r.get();
}
