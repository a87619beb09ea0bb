# shellcheck shell=bash
# Installs the Debian packages procpool's builds need, and only the ones that are missing.
# Sourced by cmake/run-tests.sh and cmake/run-examples.sh; can also be run on its own:
#
#   bash cmake/install-deps.sh            # everything: build, tests, fuzzers, docs, redis
#   bash cmake/install-deps.sh catch2     # just these packages
#
# Everything comes from Debian's apt. Root installs directly; anyone else through sudo.
# Set PROCPOOL_SKIP_APT=1 to never call apt (the builds then use whatever is installed).

# Packages by purpose. The scripts ask only for what the work they were given needs.
PROCPOOL_PACKAGES_BUILD=(g++ cmake ninja-build libcereal-dev)
PROCPOOL_PACKAGES_TEST=(catch2 libbenchmark-dev python3)
PROCPOOL_PACKAGES_FUZZ=(clang-14 libclang-rt-14-dev)
PROCPOOL_PACKAGES_DOCS=(doxygen)
# The Redis loader example (examples/redis_loader.cpp): hiredis, found through pkg-config, and a
# redis-server (with redis-cli) that cmake/with-redis-server.sh starts; python3 picks its port.
PROCPOOL_PACKAGES_REDIS=(libhiredis-dev redis-server pkg-config python3)

# Prints, one per line, the packages among "$@" that dpkg does not report as installed.
procpool_missing_packages() {
  local package status
  for package in "$@"; do
    # Captured rather than piped into grep -q: an early-exiting grep would make dpkg die of
    # SIGPIPE, which pipefail reports as a failure.
    status=$(dpkg -s "$package" 2>/dev/null) || status=""
    if [[ $status != *"Status: install ok installed"* ]]; then
      printf '%s\n' "$package"
    fi
  done
}

# Installs the packages among "$@" that are missing; returns nonzero if that fails.
procpool_install_packages() {
  if [[ ${PROCPOOL_SKIP_APT:-0} == 1 ]]; then
    return 0
  fi
  if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: not a Debian system; make sure these are installed: $*" >&2
    return 0
  fi

  local missing=()
  mapfile -t missing < <(procpool_missing_packages "$@")
  if ((${#missing[@]} == 0)); then
    return 0
  fi

  local sudo=()
  if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "install-deps: missing Debian packages: ${missing[*]}" >&2
      echo "install-deps: not root and no sudo; install them, or set PROCPOOL_SKIP_APT=1" >&2
      return 1
    fi
  fi

  echo "install-deps: installing missing Debian packages: ${missing[*]}"
  # Wait for another apt or dpkg (unattended upgrades, a second build) instead of failing at once.
  local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
  "${apt[@]}" update &&
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  if (($# == 0)); then
    set -- "${PROCPOOL_PACKAGES_BUILD[@]}" "${PROCPOOL_PACKAGES_TEST[@]}" \
      "${PROCPOOL_PACKAGES_FUZZ[@]}" "${PROCPOOL_PACKAGES_DOCS[@]}" \
      "${PROCPOOL_PACKAGES_REDIS[@]}"
  fi
  procpool_install_packages "$@"
fi
