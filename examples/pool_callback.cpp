// Pages are "fetched" in worker processes (read from local files, standing in for
// requests.get) and a callback logs `url:<name> size:[n]` to a file, as Python's
// `pool.apply_async(fetch, (url,), callback=save)`: fetches in workers, callbacks in the parent.
#include <procpool/procpool.hpp>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <system_error>
#include <vector>

namespace fs = std::filesystem;

struct Page {  // trivially copyable, so it can be a task's result as it is
  std::size_t size = 0;
  pid_t fetched_by = 0;
};

Page fetch(const std::string& path) {  // runs in a worker
  std::ifstream in(path, std::ios::binary);
  std::string body(std::istreambuf_iterator<char>(in), {});
  return {body.size(), ::getpid()};
}

int main() {
  char tmpl[] = "/tmp/pool_callback.XXXXXX";
  if (!::mkdtemp(tmpl)) throw std::system_error(errno, std::generic_category(), "mkdtemp");
  const fs::path dir = tmpl;
  const std::vector<std::string> urls = {"python.org", "github.com", "example.com", "kernel.org"};
  for (const auto& url : urls) std::ofstream(dir / url) << "<html>" << url << "</html>\n";
  const fs::path log = dir / "sizes.txt";

  const pid_t parent = ::getpid();
  bool in_workers = true, in_parent = true;  // callbacks run one at a time: no lock needed
  procpool::Pool pool(3);
  std::vector<procpool::AsyncResult<Page>> results;  // handles on the fetches
  for (const auto& url : urls) {
    results.push_back(pool.apply_async(fetch, (dir / url).string()));
    results.back().on_result([&, url](const Page& page) {
      std::ofstream(log, std::ios::app) << "url:" << url << " size:[" << page.size << "]\n";
      in_workers = in_workers && page.fetched_by != parent;
      in_parent = in_parent && ::getpid() == parent;
    });
  }
  pool.close();
  pool.join();  // every callback has run when join() returns

  std::ifstream in(log);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  std::ranges::sort(lines);  // callbacks ran in completion order
  for (const auto& line : lines) std::cout << line << "\n";
  std::cout << "fetches ran in worker processes: " << (in_workers ? "yes" : "no") << "\n"
            << "callbacks ran in the parent: " << (in_parent ? "yes" : "no") << "\n";
  fs::remove_all(dir);
}
