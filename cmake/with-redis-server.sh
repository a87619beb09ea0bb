#!/usr/bin/env bash
# Runs the Redis loader example (examples/redis_loader.cpp) against a private redis-server, as
# its test example.redis_loader and the run_examples target do:
#
#   bash cmake/with-redis-server.sh <path to the redis_loader program>
#
# 1. Makes a temporary directory (mktemp -d) for the server's files and the input file.
# 2. Picks a free port on 127.0.0.1 (python3 binds port 0 and prints the port it got) and starts
#    `redis-server --bind 127.0.0.1 --port P` in the foreground of a background job, without
#    persistence. If another program takes the port first, that server exits and the script
#    tries another port, 5 times at most.
# 3. Waits until the server answers, at most 20 s, asking it for its process id so that a
#    stranger's server on the same port is never taken for ours.
# 4. Writes an input of 1500 lines: empty ones, unicode, tabs, trailing spaces, a '\r' at the
#    end, printf-like percent signs, long lines and one line of 1 MiB.
# 5. Runs `<program> 127.0.0.1 P <file>` (at most 60 s) and exits with its status.
# Whatever happens (failure, Ctrl-C, SIGTERM), the server is stopped and waited for, and the
# directory removed. The program's stdout is this script's stdout; the script talks on stderr.
# Needs redis-server and redis-cli (Debian's redis-server) and python3:
# `bash cmake/install-deps.sh redis-server python3`.
set -euo pipefail

say() { echo "with-redis-server.sh: $*" >&2; }

if (($# != 1)); then
  say "usage: bash cmake/with-redis-server.sh <path to the redis_loader program>"
  exit 2
fi
program="$1"
if [[ ! -x $program ]]; then
  say "$program is not an executable program"
  exit 1
fi
for tool in redis-server redis-cli python3 timeout; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    say "$tool not found; install it: bash cmake/install-deps.sh redis-server python3"
    exit 1
  fi
done

tmp=""
server_pid=""
# shellcheck disable=SC2317  # reached through the EXIT trap only
cleanup() {
  local status=$?
  if [[ -n $server_pid ]]; then
    # SIGTERM makes redis shut down cleanly (with --save "" it writes nothing); wait reaps it,
    # so no server outlives the script.
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    say "redis-server (pid $server_pid) stopped"
  fi
  if [[ -n $tmp ]]; then
    rm -rf -- "$tmp"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tmp="$(mktemp -d "${TMPDIR:-/tmp}/procpool-redis.XXXXXX")"

# Starts a server on a port that was free a moment ago. Returns 1 if the server exits before
# answering (most likely someone took the port in between).
start_server() {
  port="$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --daemonize no \
    --dir "$tmp" --logfile "" >"$tmp/redis.log" 2>&1 &
  server_pid=$!
  local deadline=$((SECONDS + 20)) info
  while ((SECONDS < deadline)); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      wait "$server_pid" 2>/dev/null || true
      server_pid=""
      return 1
    fi
    info="$(redis-cli -h 127.0.0.1 -p "$port" info server 2>/dev/null)" || info=""
    if [[ $info == *"process_id:$server_pid"$'\r'* ]]; then
      return 0
    fi
    # Polling, with the 20 s bound above: redis-server has no other way to say it is ready.
    sleep 0.05
  done
  say "redis-server (pid $server_pid) did not answer on 127.0.0.1:$port within 20 s; its log:"
  cat "$tmp/redis.log" >&2
  exit 1
}

started=0
for _ in 1 2 3 4 5; do
  if start_server; then
    started=1
    break
  fi
done
if ((started == 0)); then
  say "redis-server could not start on 5 ports in a row; its last log:"
  cat "$tmp/redis.log" >&2
  exit 1
fi
say "$(redis-server --version | cut -d' ' -f1-3) listening on 127.0.0.1:$port (pid $server_pid)"

input="$tmp/lines.txt"
python3 - "$input" <<'EOF'
import sys

lines = []
for n in range(1, 1501):
    kind = n % 10
    if n == 777:
        lines.append("a line of 1 MiB: " + "x" * (1 << 20))
    elif kind == 0:
        lines.append("")
    elif kind == 1:
        lines.append(f"line {n}: plain ASCII text")
    elif kind == 2:
        lines.append(f"línea {n}: ünïcödé — 日本語 — Ελληνικά — 🚀✨")
    elif kind == 3:
        lines.append(f"\tline {n}\twith tabs and trailing spaces   ")
    elif kind == 4:
        lines.append(f"line {n}: " + "long " * (n * 7 % 3000))
    elif kind == 5:
        lines.append(f"line {n} ends with a carriage return\r")
    elif kind == 6:
        lines.append(f"line {n}: \"quotes\" 'apostrophes' \\backslash %s %b %d %%")
    elif kind == 7:
        lines.append(" ")
    else:
        lines.append(f"line {n}")
with open(sys.argv[1], "w", encoding="utf-8", newline="") as f:
    f.write("\n".join(lines) + "\n")
EOF
say "input: $input, $(wc -l <"$input") lines, $(wc -c <"$input") bytes"

status=0
timeout --kill-after=5 60 "$program" 127.0.0.1 "$port" "$input" || status=$?
if ((status == 124 || status == 137)); then
  say "$program did not finish within 60 s"
fi
exit "$status"
