// EXPECT: Value<std::.*basic_string<char>.*static assertion failed: procpool::Value<T>/Array<T>: T must be trivially copyable and hold no pointer
// A std::string keeps its characters on the heap of the process that made it: its bytes in
// shared memory would point into one process's heap. Value<std::string> must be rejected with
// a message that says what to share instead.
#include <procpool/shared_memory.hpp>

#include <string>

int main() {
  procpool::Value<std::string> name(std::string("bob"));
  return static_cast<int>(name.value().size());
}
