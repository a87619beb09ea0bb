// A class derived from Process overrides run(), as `class MyProcess(Process): def run(self)`
// in the Python tutorials; three of them run at once and print their names and the time.
#include <procpool/procpool.hpp>

#include <chrono>
#include <ctime>
#include <iostream>
#include <thread>

class MyProcess : public procpool::Process {
 public:
  void run() override {
    std::time_t now = std::time(nullptr);
    std::cout << "hello " << name() << " " << std::ctime(&now);  // ctime ends with '\n'
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
};

int main() {
  MyProcess processes[3];
  for (auto& p : processes) p.start();
  for (auto& p : processes) p.join();  // about 1 s in all: the three sleep side by side
  std::cout << "end\n";
}
