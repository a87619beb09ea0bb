// EXPECT: type_is_not_serializable<Holder>.*cannot cross|cannot cross.*serializable<Holder>
// A struct holding a std::mutex is neither trivially copyable and copy-constructible nor has a
// serialize member: encoding it must fail with one message that names it and says what to do.
#include <procpool/serialize.hpp>

#include <mutex>

struct Holder {
  std::mutex mutex;
  int value = 0;
};

int main() {
  Holder holder;
  return static_cast<int>(procpool::encode(holder).size());
}
