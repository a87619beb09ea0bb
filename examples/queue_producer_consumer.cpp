// One process puts 1, 2, 3 into a Queue and another gets and prints them, ending at a sentinel:
// the producer/consumer pattern of Python's multiprocessing tutorials.
#include <procpool/procpool.hpp>

#include <functional>
#include <iostream>

constexpr int done = -1;  // the sentinel that tells the consumer to stop, like Python's None

void producer(procpool::Queue<int>& q) {
  for (int item : {1, 2, 3}) q.put(item);
  q.put(done);
}

void consumer(procpool::Queue<int>& q) {
  for (int item = q.get(); item != done; item = q.get()) {
    std::cout << "consumed " << item << std::endl;
  }
}

int main() {
  procpool::Queue<int> q;  // shared with both children by fork
  procpool::Process p(producer, std::ref(q));
  procpool::Process c(consumer, std::ref(q));
  p.start();
  c.start();
  p.join();  // put() has written into shared memory before it returns: nothing left to flush
  c.join();
  std::cout << "done\n";
}
