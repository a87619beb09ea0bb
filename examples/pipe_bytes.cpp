// Raw bytes through a Pipe: send_bytes/recv_bytes, then recv_bytes_into an int array at a
// byte offset, as the Python docs' `arr = array.array('i', [0] * 10); b.recv_bytes_into(arr)`.
#include <procpool/procpool.hpp>

#include <array>
#include <cstddef>
#include <iostream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

int main() {
  auto [a, b] = procpool::Pipe();
  procpool::Process p([&a] {
    std::string_view thanks = "thank you";
    a.send_bytes(std::as_bytes(std::span(thanks)));
    std::array<int, 5> arr1 = {0, 1, 2, 3, 4};
    a.send_bytes(std::as_bytes(std::span(arr1)));
  });
  p.start();

  std::vector<std::byte> msg = b.recv_bytes();
  std::cout << std::string(reinterpret_cast<const char*>(msg.data()), msg.size()) << "\n";

  std::array<int, 10> arr2{};            // ten zeros
  std::size_t offset = 2 * sizeof(int);  // in bytes, as in Python
  std::size_t count = b.recv_bytes_into(std::as_writable_bytes(std::span(arr2)), offset);
  std::cout << "received " << count << " bytes:";
  for (int x : arr2) std::cout << " " << x;
  std::cout << "\n";
  p.join();
}
