// EXPECT: Widget.*must be default-constructible
// decode builds the value and then lets its serialize member fill the fields in, so a user type
// without a default constructor cannot be decoded (a trivially copyable one can: it is bytes).
#include <procpool/serialize.hpp>

#include <string>
#include <vector>

struct Widget {
  explicit Widget(std::string n) : name(std::move(n)) {}
  std::string name;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(name);
  }
};

int main() {
  std::vector<std::byte> frame = procpool::encode(Widget("w"));
  return static_cast<int>(procpool::decode<Widget>(frame).name.size());
}
