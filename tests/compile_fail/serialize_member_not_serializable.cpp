// EXPECT: type_is_not_serializable<std::mutex>.*cannot cross|cannot cross.*serializable<std::mutex>
// A serialize member that hands ar() a member which cannot cross a process boundary: the error
// names the member's type, not the enclosing one, since that is what must change.
#include <procpool/serialize.hpp>

#include <mutex>
#include <string>

struct Account {
  std::string owner;
  std::mutex lock;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(owner, lock);
  }
};

int main() {
  Account account;
  return static_cast<int>(procpool::encode(account).size());
}
