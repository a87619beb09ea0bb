// EXPECT: vector<std::function<void ?\(\)>.*cannot cross|cannot cross.*vector<std::function<void
// A std::function holds code and state that only exist in this process; a container of them is
// refused as a whole, and the message names the type that was asked for.
#include <procpool/serialize.hpp>

#include <functional>
#include <vector>

int main() {
  std::vector<std::function<void()>> callbacks{[] {}};
  return static_cast<int>(procpool::encode(callbacks).size());
}
