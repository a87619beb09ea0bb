#!/usr/bin/env bash
# Builds procpool and runs its tests the way CI does (.ci/run calls this script).
# Installs what the stages need from Debian's apt first, if anything is missing.
#
#   bash cmake/run-tests.sh                  # every stage
#   bash cmake/run-tests.sh --quick          # only the release stage
#   bash cmake/run-tests.sh --stage asan     # one stage (repeat --stage for several)
#
# Stages, each in its own build directory:
#   release  build/ci-release  RelWithDebInfo; tests, examples, benchmarks; ctest
#   asan     build/ci-asan     -fsanitize=address,undefined; tests and examples; ctest
#   tsan     build/ci-tsan     -fsanitize=thread; only tests/*_test.cpp whose file name matches
#                              PROCPOOL_TSAN_FILTER (default: pool); skipped if none does
#   fuzz     build/ci-fuzz     clang++-14 libFuzzer targets from tests/fuzz/*_fuzz.cpp, each run
#                              for PROCPOOL_FUZZ_SECONDS (default 60); skipped if there are none
#   docs     build/ci-docs     the API reference (the `docs` target, Doxygen); any Doxygen warning,
#                              such as an undocumented public declaration, fails it
#
# Every selected stage runs even when an earlier one failed. At the end the script prints one
# line per stage and then `total: N passed, M failed` (ctest's counts summed; each fuzzer and the
# docs build count as one test, and a stage that fails to configure or build counts as one
# failure). It exits nonzero if anything failed.
#
# Environment: PROCPOOL_JOBS (build and ctest parallelism, default 2), PROCPOOL_FUZZ_SECONDS,
# PROCPOOL_TSAN_FILTER, PROCPOOL_SKIP_APT=1 (never call apt), and ASAN_OPTIONS, UBSAN_OPTIONS,
# TSAN_OPTIONS (appended to this script's, so they win).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=cmake/install-deps.sh
source cmake/install-deps.sh

jobs="${PROCPOOL_JOBS:-2}"
fuzz_seconds="${PROCPOOL_FUZZ_SECONDS:-60}"
tsan_filter="${PROCPOOL_TSAN_FILTER:-pool}"
all_stages=(release asan tsan fuzz docs)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

stages=()
while (($# > 0)); do
  case "$1" in
    --quick) stages+=(release) ;;
    --stage)
      if (($# < 2)); then
        echo "run-tests.sh: --stage needs a name: ${all_stages[*]}" >&2
        exit 2
      fi
      stages+=("$2")
      shift
      ;;
    --stage=*) stages+=("${1#--stage=}") ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "run-tests.sh: unknown argument: $1" >&2
      usage >&2
      exit 2
      ;;
  esac
  shift
done
if ((${#stages[@]} == 0)); then
  stages=("${all_stages[@]}")
fi
for stage in "${stages[@]}"; do
  if [[ " ${all_stages[*]} " != *" $stage "* ]]; then
    echo "run-tests.sh: unknown stage '$stage'; stages are: ${all_stages[*]}" >&2
    exit 2
  fi
done

# ---------------------------------------------------------------------------------------------
# Results. Each stage function sets these, and never exits: failures are recorded, not raised.
stage_status=""  # passed, failed or skipped
stage_passed=0
stage_failed=0
stage_note=""
summary_lines=()
total_passed=0
total_failed=0

banner() {
  printf '\n==================== %s ====================\n' "$*"
}

stage_fail() {  # <note>: the stage could not get as far as running its tests
  stage_status=failed
  stage_failed=$((stage_failed + 1))
  stage_note="$1"
}

# Configures and builds <build dir> with the given cmake arguments. Returns nonzero only when
# configuring fails: after a failed build (one failure) the tests that did build still run.
configure_and_build() {
  local dir="$1"
  shift
  if ! cmake -S . -B "$dir" -G Ninja "$@"; then
    stage_fail "configure failed"
    return 1
  fi
  # -k 0: build every target that can be built, so one broken file hides no other results.
  if ! cmake --build "$dir" -j"$jobs" -- -k 0; then
    stage_fail "build failed"
  fi
}

# Runs ctest in <build dir> and adds its counts to the stage's.
run_ctest() {
  local dir="$1" log="$1/ctest-output.log" rc=0
  ctest --test-dir "$dir" -j"$jobs" --output-on-failure --no-tests=error --timeout 600 \
    </dev/null 2>&1 | tee "$log" || rc=$?
  local line total failed
  line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1) ||
    line=""
  if [[ $line =~ ([0-9]+)\ tests?\ failed\ out\ of\ ([0-9]+) ]]; then
    failed="${BASH_REMATCH[1]}"
    total="${BASH_REMATCH[2]}"
    stage_passed=$((stage_passed + total - failed))
    stage_failed=$((stage_failed + failed))
  else
    failed=0
  fi
  if ((rc != 0 && failed == 0)); then
    # ctest failed without a count (no tests found, a crash): that is one failure.
    stage_failed=$((stage_failed + 1))
    stage_note="${stage_note:+$stage_note; }ctest exited with status $rc"
  fi
  if ((stage_failed > 0)); then
    stage_status=failed
  else
    stage_status=passed
  fi
}

# ---------------------------------------------------------------------------------------------
# The stages.
sanitizer_build_args=(
  # Debug keeps asserts on; -O1 keeps the sanitized tests quick and their stacks readable.
  # -g1 (line tables only) still gives file:line in every report, and compiles the template-heavy
  # tests about a third faster than -g (pool_test.cpp under ASan: 3.5 min instead of 5.6).
  -DCMAKE_BUILD_TYPE=Debug
  "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1"
  -DPROCPOOL_BUILD_BENCHMARKS=OFF
  -DPROCPOOL_BUILD_FUZZERS=OFF
)

stage_release() {
  configure_and_build build/ci-release \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG" \
    -DPROCPOOL_BUILD_TESTS=ON -DPROCPOOL_BUILD_EXAMPLES=ON -DPROCPOOL_BUILD_BENCHMARKS=ON \
    -DPROCPOOL_BUILD_FUZZERS=OFF -DPROCPOOL_SANITIZE= -DPROCPOOL_TEST_FILTER= || return 0
  run_ctest build/ci-release
}

stage_asan() {
  # The examples run in the release stage; building them again with sanitizers would cost about
  # two of the 20 minutes the whole run may take, for code the unit tests already cover.
  configure_and_build build/ci-asan "${sanitizer_build_args[@]}" \
    -DPROCPOOL_BUILD_TESTS=ON -DPROCPOOL_BUILD_EXAMPLES=OFF \
    -DPROCPOOL_SANITIZE=address,undefined -DPROCPOOL_TEST_FILTER= || return 0
  ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:print_stacktrace=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    run_ctest build/ci-asan
}

stage_tsan() {
  local matching
  matching=$(find tests -maxdepth 1 -name '*_test.cpp' -printf '%f\n' | grep -E -- "$tsan_filter") ||
    matching=""
  if [[ -z $matching ]]; then
    stage_status=skipped
    stage_note="no tests/*_test.cpp matches '$tsan_filter'"
    return 0
  fi
  echo "tsan: test files matching '$tsan_filter': ${matching//$'\n'/ }"
  configure_and_build build/ci-tsan "${sanitizer_build_args[@]}" \
    -DPROCPOOL_BUILD_TESTS=ON -DPROCPOOL_BUILD_EXAMPLES=OFF \
    -DPROCPOOL_SANITIZE=thread "-DPROCPOOL_TEST_FILTER=$tsan_filter" || return 0
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/tsan.supp${TSAN_OPTIONS:+:$TSAN_OPTIONS}" \
    run_ctest build/ci-tsan
}

stage_fuzz() {
  local sources=()
  mapfile -t sources < <(find tests/fuzz -maxdepth 1 -name '*_fuzz.cpp' 2>/dev/null | sort)
  if ((${#sources[@]} == 0)); then
    stage_status=skipped
    stage_note="no tests/fuzz/*_fuzz.cpp"
    return 0
  fi
  if ! command -v clang++-14 >/dev/null 2>&1; then
    stage_fail "clang++-14 not found"
    return 0
  fi
  local dir=build/ci-fuzz
  configure_and_build "$dir" "${sanitizer_build_args[@]}" \
    -DCMAKE_CXX_COMPILER=clang++-14 -DPROCPOOL_BUILD_FUZZERS=ON \
    -DPROCPOOL_BUILD_TESTS=OFF -DPROCPOOL_BUILD_EXAMPLES=OFF || return 0

  local source name corpus artifacts log rc
  for source in "${sources[@]}"; do
    name="$(basename "$source" .cpp)"
    corpus="$dir/corpus/$name"
    artifacts="$dir/artifacts/$name"
    log="$dir/logs/$name.log"
    mkdir -p "$corpus" "$artifacts" "$dir/logs"
    # Seeds from tests/fuzz/corpus/<name>/ (or <name> without _fuzz); new inputs stay in the
    # build directory, never in the source tree.
    local seeds
    for seeds in "tests/fuzz/corpus/$name" "tests/fuzz/corpus/${name%_fuzz}"; do
      if [[ -d $seeds ]]; then
        cp -R "$seeds/." "$corpus/"
      fi
    done
    if [[ ! -x $dir/fuzz/$name ]]; then
      echo "fuzz: $name was not built (counted with the build failure)"
      continue
    fi
    echo "fuzz: $name for ${fuzz_seconds}s (log: $log)"
    rc=0
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
      "$dir/fuzz/$name" -max_total_time="$fuzz_seconds" -timeout=30 -rss_limit_mb=4096 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" </dev/null >"$log" 2>&1 ||
      rc=$?
    if ((rc == 0)); then
      stage_passed=$((stage_passed + 1))
      tail -n 3 "$log"
    else
      stage_failed=$((stage_failed + 1))
      echo "fuzz: $name FAILED (exit status $rc); the end of its log:"
      tail -n 80 "$log"
      echo "fuzz: inputs that reproduce it are in $artifacts/ (run: $dir/fuzz/$name <file>)"
    fi
  done
  if ((stage_failed > 0)); then
    stage_status=failed
  else
    stage_status=passed
  fi
}

stage_docs() {
  local dir=build/ci-docs
  configure_and_build "$dir" -DPROCPOOL_BUILD_DOCS=ON -DPROCPOOL_BUILD_TESTS=OFF \
    -DPROCPOOL_BUILD_EXAMPLES=OFF -DPROCPOOL_BUILD_BENCHMARKS=OFF -DPROCPOOL_BUILD_FUZZERS=OFF ||
    return 0
  # CMake defines the target only when it finds Doxygen 1.9 or later.
  if ! ninja -C "$dir" -t query docs >/dev/null 2>&1; then
    stage_fail "no docs target: Doxygen 1.9 or later not found"
    return 0
  fi
  if cmake --build "$dir" --target docs; then
    stage_passed=$((stage_passed + 1))
    echo "docs: the API reference is in $dir/docs/html/index.html"
  else
    stage_failed=$((stage_failed + 1))
    stage_note="Doxygen warnings"
  fi
  if ((stage_failed > 0)); then stage_status=failed; else stage_status=passed; fi
}

# ---------------------------------------------------------------------------------------------
packages=("${PROCPOOL_PACKAGES_BUILD[@]}")
for stage in "${stages[@]}"; do
  case "$stage" in
    # release runs the examples, among them the Redis loader (hiredis and a redis-server).
    release) packages+=("${PROCPOOL_PACKAGES_TEST[@]}" "${PROCPOOL_PACKAGES_REDIS[@]}") ;;
    asan | tsan) packages+=("${PROCPOOL_PACKAGES_TEST[@]}") ;;
    fuzz) packages+=("${PROCPOOL_PACKAGES_FUZZ[@]}") ;;
    docs) packages+=("${PROCPOOL_PACKAGES_DOCS[@]}") ;;
  esac
done
if ! procpool_install_packages "${packages[@]}"; then
  echo "run-tests.sh: installing packages failed; trying the stages anyway" >&2
  summary_lines+=("$(printf '%-8s %-8s %s' deps failed 'apt-get could not install the packages')")
  total_failed=$((total_failed + 1))
fi

banner "toolchain"
c++ --version 2>/dev/null | head -n 1 || true
cmake --version | head -n 1
echo "ninja $(ninja --version 2>/dev/null || echo missing)"

for stage in "${stages[@]}"; do
  banner "stage $stage"
  stage_status=""
  stage_passed=0
  stage_failed=0
  stage_note=""
  started=$SECONDS
  "stage_$stage"
  elapsed=$((SECONDS - started))
  total_passed=$((total_passed + stage_passed))
  total_failed=$((total_failed + stage_failed))
  if [[ $stage_status == skipped ]]; then
    detail="$stage_note"
  else
    detail="$stage_passed passed, $stage_failed failed${stage_note:+ ($stage_note)}"
  fi
  summary_lines+=("$(printf '%-8s %-8s %-40s %dm%02ds' "$stage" "$stage_status" "$detail" \
    $((elapsed / 60)) $((elapsed % 60)))")
done

banner "summary"
printf '%s\n' "${summary_lines[@]}"
echo "total: $total_passed passed, $total_failed failed"
if ((total_failed > 0)); then
  exit 1
fi
