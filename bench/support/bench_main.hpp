#pragma once
// The main() of the benchmark programs that take --quick: strips it (and prints it under
// --help) before Google Benchmark sees the arguments, registers the benchmarks, and runs them.

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <vector>

namespace bench_support {

inline int run_main(int argc, char** argv, const char* help, bool& quick, void (*register_all)()) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      if (std::strcmp(argv[i], "--help") == 0) std::printf("%s\n", help);
      args.push_back(argv[i]);
    }
  }
  args.push_back(nullptr);
  int n = static_cast<int>(args.size()) - 1;
  register_all();
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace bench_support
