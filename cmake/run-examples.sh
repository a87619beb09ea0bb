#!/usr/bin/env bash
# Builds every example in examples/ and runs each in turn, printing its name and its output.
# Installs what the build needs from Debian's apt first, if anything is missing.
#
#   bash cmake/run-examples.sh
#
# Builds in build/examples (Release, Ninja). Exits nonzero if any example fails: a nonzero exit,
# or output that differs from examples/expected/<name>.txt or .regex where one exists.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=cmake/install-deps.sh
source cmake/install-deps.sh

jobs="${PROCPOOL_JOBS:-2}"
build_dir="build/examples"

# The Redis loader example needs hiredis and a redis-server besides the build's packages.
procpool_install_packages "${PROCPOOL_PACKAGES_BUILD[@]}" "${PROCPOOL_PACKAGES_REDIS[@]}"

cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DPROCPOOL_BUILD_TESTS=OFF \
  -DPROCPOOL_BUILD_EXAMPLES=ON \
  -DPROCPOOL_BUILD_BENCHMARKS=OFF \
  -DPROCPOOL_BUILD_FUZZERS=OFF
cmake --build "$build_dir" -j"$jobs"
# run_examples runs them all, even after a failure, and fails at the end if any did.
cmake --build "$build_dir" --target run_examples
