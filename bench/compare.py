#!/usr/bin/env python3
"""Runs the scenarios of BENCHMARKS.md for Python and procpool, interleaved, and prints a table.

For each repetition and each scenario, in this order: Python's multiprocessing.Pool(2) (fork),
concurrent.futures.ProcessPoolExecutor(2) (fork context), procpool (the built Google Benchmark
programs: pool_bench, queue_bench, manager_bench) and the bare-kernel bound (kernel_bound_bench).
The Python side runs here, with the same work functions as the C++ side; the C++ figures come
from `<program> --benchmark_filter=... --benchmark_format=json --benchmark_repetitions=1`.
Medians of the repetitions are printed as a Markdown table (with the date, core count, CPU
model and this command in a header), then the targets of BENCHMARKS.md with whether each is met,
then the kernel's reference figures.

    python3 bench/compare.py                    # everything, medians of 3 (a few minutes)
    python3 bench/compare.py --quick            # a smoke run: a tenth of the items, 1 rep
    python3 bench/compare.py --scenarios apply_latency,map_throughput --reps 5

The programs are built first if needed (`cmake --build <build dir> --target ...`, configuring
<build dir> as a Release build if it has no CMakeCache.txt). Standard library only. Progress
goes to stderr, the tables to stdout.
"""

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = ROOT / "build" / "bench"
MY_PROGRAMS = ("pool_bench", "kernel_bound_bench")   # understand --quick
OTHER_PROGRAMS = ("queue_bench", "manager_bench")    # written elsewhere; used if present (DISCOVER)
CTX = mp.get_context("fork")

# ---------------------------------------------------------------------------------------------
# The work functions (BENCHMARKS.md), module level so that they pickle.


def ident(x):
    return x


def square(x):
    return x * x


def nbytes(buf):
    return len(buf)


def echo(buf):
    return buf


def burn(n):
    x = 88172645463325252
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
    return x


_BURN_PER_SECOND = None


def burn_steps(target):
    """n for which burn(n) takes about `target` seconds (best of three, calibrated once)."""
    global _BURN_PER_SECOND
    if _BURN_PER_SECOND is None:
        probe = 200_000
        best = min(_timed(lambda: burn(probe)) for _ in range(3))
        _BURN_PER_SECOND = probe / best
    return max(1, int(_BURN_PER_SECOND * target))


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _pipe_child(conn):
    while True:
        x = conn.recv()
        if x < 0:
            return
        conn.send(x)


def _queue_producer(q, go, n):
    q.put(-1)  # "running": the parent starts its clock after this
    go.wait()
    for i in range(n):
        q.put(i)


# ---------------------------------------------------------------------------------------------
# Sizes: BENCHMARKS.md's, or a tenth of them with --quick.


class Sizes:
    def __init__(self, quick):
        d = 10 if quick else 1
        self.apply_latency = 5_000 // d
        self.apply_async = 100_000 // d
        self.map_auto = 1_000_000 // d
        self.map_chunk1 = 100_000 // d
        self.imap = 100_000 // d
        self.burn_tasks = 16
        self.burn_seconds = 0.02 if quick else 0.1
        self.payload_count = 16
        self.payload_size = (1 if quick else 16) << 20
        self.startup_runs = 5 if quick else 20
        self.pipe = 20_000 // d
        self.queue = 200_000 // d
        self.manager = 20_000 // d


# ---------------------------------------------------------------------------------------------
# Python's side of each scenario. Each returns {row: (Pool figure, ProcessPoolExecutor figure)}.
# Pools are built and warmed up before, and shut down after, the timed region.


def _pool():
    p = CTX.Pool(2)
    p.map(ident, range(8), chunksize=1)
    return p


def _ppe():
    ex = cf.ProcessPoolExecutor(2, mp_context=CTX)
    list(ex.map(ident, range(8)))
    return ex


def _close_pool(p):
    p.close()
    p.join()


def py_apply_latency(s):
    n = s.apply_latency
    p = _pool()
    t = _timed(lambda: [p.apply(ident, (i,)) for i in range(n)])
    _close_pool(p)
    ex = _ppe()
    u = _timed(lambda: [ex.submit(ident, i).result() for i in range(n)])
    ex.shutdown()
    return {"apply_latency": (t / n * 1e6, u / n * 1e6)}


def py_apply_async(s):
    n = s.apply_async
    p = _pool()

    def pool_work():
        rs = [p.apply_async(square, (i,)) for i in range(n)]
        for r in rs:
            r.get()

    t = _timed(pool_work)
    _close_pool(p)
    ex = _ppe()

    def ppe_work():
        fs = [ex.submit(square, i) for i in range(n)]
        for f in fs:
            f.result()

    u = _timed(ppe_work)
    ex.shutdown()
    return {"apply_async_throughput": (n / t, n / u)}


def py_map(s):
    n1, n2 = s.map_auto, s.map_chunk1
    auto = math.ceil(n1 / (4 * 2))  # Pool's automatic chunk size, given to the executor too
    p = _pool()
    t1 = _timed(lambda: p.map(square, range(n1)))
    t2 = _timed(lambda: p.map(square, range(n2), chunksize=1))
    _close_pool(p)
    ex = _ppe()
    u1 = _timed(lambda: list(ex.map(square, range(n1), chunksize=auto)))
    u2 = _timed(lambda: list(ex.map(square, range(n2), chunksize=1)))
    ex.shutdown()
    return {"map_throughput/auto": (n1 / t1, n1 / u1), "map_throughput/chunk1": (n2 / t2, n2 / u2)}


def py_imap(s):
    n = s.imap
    p = _pool()
    t1 = _timed(lambda: sum(p.imap_unordered(square, range(n), chunksize=1)))
    t64 = _timed(lambda: sum(p.imap_unordered(square, range(n), chunksize=64)))
    _close_pool(p)
    ex = _ppe()

    def as_completed():
        fs = [ex.submit(square, i) for i in range(n)]
        return sum(f.result() for f in cf.as_completed(fs))

    u1 = _timed(as_completed)
    ex.shutdown()
    return {"imap_unordered/chunk1": (n / t1, n / u1), "imap_unordered/chunk64": (n / t64, None)}


def py_cpu_bound(s):
    steps = burn_steps(s.burn_seconds)
    work = [steps] * s.burn_tasks
    serial = _timed(lambda: [burn(k) for k in work])
    p = _pool()
    t = _timed(lambda: p.map(burn, work, chunksize=1))
    _close_pool(p)
    ex = _ppe()
    u = _timed(lambda: list(ex.map(burn, work)))
    ex.shutdown()
    return {"cpu_bound_speedup": (serial / t, serial / u)}


def py_large_payload(s):
    bufs = [bytes([i]) * s.payload_size for i in range(s.payload_count)]
    total = s.payload_count * s.payload_size / 1e9
    p = _pool()
    t1 = _timed(lambda: p.map(nbytes, bufs, chunksize=1))
    t2 = _timed(lambda: p.map(echo, bufs, chunksize=1))
    _close_pool(p)
    ex = _ppe()
    u1 = _timed(lambda: list(ex.map(nbytes, bufs)))
    u2 = _timed(lambda: list(ex.map(echo, bufs)))
    ex.shutdown()
    del bufs
    return {"large_payload/one_way": (total / t1, total / u1),
            "large_payload/round_trip": (total / t2, total / u2)}


def py_pool_startup(s):
    def pool_once():
        p = CTX.Pool(2)
        p.apply(ident, (1,))
        p.close()
        p.join()

    def ppe_once():
        ex = cf.ProcessPoolExecutor(2, mp_context=CTX)
        ex.submit(ident, 1).result()
        ex.shutdown(wait=True)

    t = statistics.median(_timed(pool_once) for _ in range(s.startup_runs))
    u = statistics.median(_timed(ppe_once) for _ in range(s.startup_runs))
    return {"pool_startup": (t * 1e3, u * 1e3)}


def py_pipe(s):
    n = s.pipe
    a, b = CTX.Pipe()
    proc = CTX.Process(target=_pipe_child, args=(b,))
    proc.start()
    b.close()
    a.send(0)
    a.recv()

    def work():
        for i in range(1, n + 1):
            a.send(i)
            a.recv()

    t = _timed(work)
    a.send(-1)
    proc.join()
    return {"pipe_pingpong": (t / n * 1e6, None)}


def py_queue(s):
    n = s.queue
    q = CTX.Queue()
    go = CTX.Event()
    proc = CTX.Process(target=_queue_producer, args=(q, go, n))
    proc.start()
    q.get()

    def work():
        go.set()
        for _ in range(n):
            q.get()

    t = _timed(work)
    proc.join()
    return {"queue_throughput": (n / t, None)}


def py_manager(s):
    n = s.manager
    m = CTX.Manager()
    d = m.dict()
    d[-1] = 0

    def work():
        for i in range(n):
            d[i] = i
        for i in range(n):
            d[i]

    t = _timed(work)
    m.shutdown()
    return {"manager_dict_ops": (2 * n / t, None)}


# ---------------------------------------------------------------------------------------------
# The scenarios: Python's side, procpool's benchmarks, the kernel's, and how rows are read.
#
# A row: (row id, label, unit, higher_is_better, procpool source, kernel source)
#   procpool source: (program, benchmark name, counter), or ("discover", kind) for the queue and
#   manager programs, whose benchmark names are found in their --benchmark_list_tests.
#   kernel source: (benchmark name, counter, transform) or None.

PINNED = ("kernel/socket_pingpong/pinned", "us_per_roundtrip", None)

SCENARIOS = {
    "apply_latency": (py_apply_latency, [
        ("apply_latency", "apply_latency", "µs/call", False,
         ("pool_bench", "pool/apply_latency", "us_per_call"), PINNED),
    ], ["kernel/socket_pingpong/pinned", "kernel/socket_pingpong/same_cpu",
        "kernel/socket_pingpong/unpinned", "kernel/shm_spin_pingpong/pinned"]),
    "apply_async_throughput": (py_apply_async, [
        ("apply_async_throughput", "apply_async_throughput", "tasks/s", True,
         ("pool_bench", "pool/apply_async_throughput", "tasks_per_s"),
         ("kernel/chunk1_tasks", "tasks_per_s", None)),
    ], ["kernel/chunk1_tasks"]),
    "map_throughput": (py_map, [
        ("map_throughput/auto", "map_throughput (auto)", "items/s", True,
         ("pool_bench", "pool/map_throughput/auto", "items_per_s"),
         ("kernel/processes_map", "items_per_s", None)),
        ("map_throughput/chunk1", "map_throughput (chunk 1)", "items/s", True,
         ("pool_bench", "pool/map_throughput/chunk1", "items_per_s"),
         ("kernel/chunk1_tasks", "tasks_per_s", None)),
    ], ["kernel/processes_map", "kernel/processes_map_fork", "kernel/threads_map",
        "kernel/chunk1_tasks"]),
    "imap_unordered_throughput": (py_imap, [
        ("imap_unordered/chunk1", "imap_unordered (chunk 1)", "items/s", True,
         ("pool_bench", "pool/imap_unordered_throughput/chunk1", "items_per_s"), None),
        ("imap_unordered/chunk64", "imap_unordered (chunk 64)", "items/s", True,
         ("pool_bench", "pool/imap_unordered_throughput/chunk64", "items_per_s"), None),
    ], []),
    "cpu_bound_speedup": (py_cpu_bound, [
        ("cpu_bound_speedup", "cpu_bound_speedup", "×, ideal 2", True,
         ("pool_bench", "pool/cpu_bound_speedup", "speedup"),
         ("kernel/cpu_bound_speedup", "speedup", None)),
    ], ["kernel/cpu_bound_speedup"]),
    "large_payload": (py_large_payload, [
        ("large_payload/one_way", "large_payload one way", "GB/s", True,
         ("pool_bench", "pool/large_payload/one_way", "GB_per_s"),
         ("kernel/memcpy_bandwidth", "GB_per_s", None)),
        ("large_payload/round_trip", "large_payload round trip", "GB/s", True,
         ("pool_bench", "pool/large_payload/round_trip", "GB_per_s"),
         ("kernel/memcpy_bandwidth", "GB_per_s", None)),
    ], ["kernel/memcpy_bandwidth", "kernel/socket_bandwidth"]),
    "pool_startup": (py_pool_startup, [
        ("pool_startup", "pool_startup", "ms", False,
         ("pool_bench", "pool/pool_startup", "ms"), ("kernel/fork_wait", "ms", None)),
    ], ["kernel/fork_wait"]),
    "pipe_pingpong": (py_pipe, [
        ("pipe_pingpong", "pipe_pingpong", "µs/round trip", False,
         ("pool_bench", "pipe/pingpong", "us_per_roundtrip"), PINNED),
    ], ["kernel/socket_pingpong/pinned"]),
    "queue_throughput": (py_queue, [
        ("queue_throughput", "queue_throughput", "msgs/s", True, ("discover", "queue"), None),
    ], []),
    "manager_dict_ops": (py_manager, [
        ("manager_dict_ops", "manager_dict_ops", "ops/s", True, ("discover", "manager"),
         ("kernel/socket_pingpong/pinned", "us_per_roundtrip", "per_roundtrip")),
    ], ["kernel/socket_pingpong/pinned"]),
}

# Kernel reference figures printed below the main table: name -> (label, counter, unit).
KERNEL_REFERENCE = {
    "kernel/socket_pingpong/pinned": ("socketpair round trip, two CPUs (pinned)", "us_per_roundtrip", "µs"),
    "kernel/socket_pingpong/same_cpu": ("socketpair round trip, one CPU", "us_per_roundtrip", "µs"),
    "kernel/socket_pingpong/unpinned": ("socketpair round trip, unpinned", "us_per_roundtrip", "µs"),
    "kernel/shm_spin_pingpong/pinned": ("shared-memory spin round trip, two CPUs", "us_per_roundtrip", "µs"),
    "kernel/chunk1_tasks": ("fork+socketpair chunk-1 tasks, one child, window 256", "tasks_per_s", "tasks/s"),
    "kernel/processes_map": ("two processes square 1 M int64 in shared memory (children kept)", "items_per_s", "items/s"),
    "kernel/processes_map_fork": ("the same, forking both children per map", "items_per_s", "items/s"),
    "kernel/threads_map": ("two threads square 1 M int64", "items_per_s", "items/s"),
    "kernel/memcpy_bandwidth": ("memcpy, 16 MiB", "GB_per_s", "GB/s"),
    "kernel/socket_bandwidth": ("16 MiB through a socketpair", "GB_per_s", "GB/s"),
    "kernel/fork_wait": ("fork + _exit + waitpid", "ms", "ms"),
    "kernel/cpu_bound_speedup": ("16 × burn, two forked children vs serial", "speedup", "×"),
}

# ---------------------------------------------------------------------------------------------
# Building and running the C++ programs.


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def configure_command(build_dir):
    return ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release", "-DPROCPOOL_BUILD_TESTS=OFF",
            "-DPROCPOOL_BUILD_EXAMPLES=OFF", "-DPROCPOOL_BUILD_BENCHMARKS=ON"]


def build(build_dir, programs):
    """Configures (if needed) and builds each program; returns the ones that built."""
    if not (build_dir / "CMakeCache.txt").exists():
        cmd = configure_command(build_dir)
        if shutil.which("ninja") is None:
            cmd = [c for c in cmd if c not in ("-G", "Ninja")]
        log("configuring:", shlex.join(cmd))
        if subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr).returncode != 0:
            sys.exit(f"compare.py: configuring failed; run it yourself:\n  {shlex.join(cmd)}")
    built = []
    for prog in programs:
        cmd = ["cmake", "--build", str(build_dir), "-j2", "--target", prog]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            built.append(prog)
        else:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            log(f"building {prog} failed ({shlex.join(cmd)}):\n{tail}")
    return built


def program_path(build_dir, prog):
    return build_dir / "bench" / prog


def normalise(name):
    """Google Benchmark's reported name without /iterations:N, /real_time and the like."""
    parts = [p for p in name.split("/")
             if not re.fullmatch(r"(real_time|manual_time|process_time|iterations:\d+|"
                                 r"min_time:[\d.]+|repeats:\d+|threads:\d+)", p)]
    return "/".join(parts)


def list_benchmarks(path):
    r = subprocess.run([str(path), "--benchmark_list_tests=true"], capture_output=True, text=True,
                       timeout=60)
    return [normalise(line.strip()) for line in r.stdout.splitlines() if line.strip()]


def understands_quick(prog):
    """Whether bench/<prog>.cpp takes --quick (ours do; the others may)."""
    if prog in MY_PROGRAMS:
        return True
    try:
        return '"--quick"' in (ROOT / "bench" / f"{prog}.cpp").read_text()
    except OSError:
        return False


def run_benchmarks(path, names, quick, min_time, notes):
    """Runs the named benchmarks of one program once; returns {name: json entry}."""
    if not names:
        return {}
    regex = "^(" + "|".join(re.escape(n) for n in names) + r")(/|$)"
    cmd = [str(path), f"--benchmark_filter={regex}", "--benchmark_format=json",
           "--benchmark_repetitions=1", f"--benchmark_min_time={min_time}"]
    if quick and understands_quick(path.name):
        cmd.append("--quick")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        notes.add(f"{path.name}: timed out running {regex}")
        return {}
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        notes.add(f"{path.name} exited with {r.returncode} and no JSON for {regex}: "
                  + " ".join(r.stderr.strip().splitlines()[-3:]))
        return {}
    out = {}
    for b in data.get("benchmarks", []):
        if b.get("run_type", "iteration") != "iteration":
            continue
        name = normalise(b["name"])
        if b.get("error_occurred"):
            notes.add(f"{path.name} {name}: {b.get('error_message')}")
            continue
        out[name] = b
    return out


STANDARD_KEYS = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads",
                 "iterations", "real_time", "cpu_time", "time_unit", "family_index",
                 "per_family_instance_index", "error_occurred", "error_message", "label",
                 "aggregate_name", "aggregate_unit", "n"}


def rate_of(entry):
    """The per-second figure of a benchmark written elsewhere: a counter named like
    msgs_per_s / ops_per_s / items_per_second, else None."""
    keys = [k for k in entry if k not in STANDARD_KEYS and isinstance(entry[k], (int, float))]
    for pattern in (r"(msgs?|messages|ops|operations)_?(per_?s(ec(ond)?)?|/s)$",
                    r"per_?s(ec(ond)?)?$|/s$", r"items_per_second"):
        for k in keys:
            if re.search(pattern, k, re.I):
                return entry[k], k
    return None, None


DISCOVER = {
    # kind: (program, preferred name patterns in order)
    # A whole path component or a BM_ family name, so that queue_throughput does not also pick
    # queue_throughput_2x2.
    "queue": ("queue_bench", [r"(^|/|_)queue_throughput(/|$)", r"(^|/)queue[^/]*/throughput(/|$)"]),
    "manager": ("manager_bench", [r"(^|/|_)manager_dict_ops(/|$)",
                                  r"(^|/)dict_ops/one_client(/|$)", r"(^|/|_)dict_ops(/|$)",
                                  r"(^|/|_)dict_(set|get)s?(/|$)"]),
}


def discover(kind, build_dir, available, notes):
    """The benchmark names to read for a discovered row (several are combined)."""
    prog, patterns = DISCOVER[kind]
    if prog not in available:
        return prog, []  # main() has said why
    names = list_benchmarks(program_path(build_dir, prog))
    for pat in patterns:
        hits = [n for n in names if re.search(pat, n, re.I)]
        if hits:
            return prog, hits
    notes.add(f"{kind}: no benchmark of {prog} matches {patterns} (it has: {', '.join(names)})")
    return prog, []


# ---------------------------------------------------------------------------------------------
# Formatting.


def si(v):
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def fmt(v, unit, with_unit=False):
    """A figure for a table cell: rates with an SI prefix, the unit only if asked."""
    if v is None:
        return "—"
    if unit.startswith("×"):
        return f"{v:.2f}×"
    if unit.endswith("/s") and unit != "GB/s":
        return si(v) + (" " + unit if with_unit else "")
    return f"{v:.3g}" + (" " + unit if with_unit else "")


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:.3g}×"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_describe():
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "") if rev else "unknown"
    except OSError:
        return "unknown"


def compiler(build_dir):
    cache = build_dir / "CMakeCache.txt"
    try:
        for line in cache.read_text().splitlines():
            if line.startswith("CMAKE_CXX_COMPILER:"):
                path = line.split("=", 1)[1]
                return subprocess.run([path, "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        pass
    return "unknown"


# ---------------------------------------------------------------------------------------------
# Targets (BENCHMARKS.md): per row, a list of (what, value, ok) computed from the medians.


def targets(row, pool, ppe, pp, kern):
    def check(what, value, ok, shown):
        return (what, shown, None if value is None else ok)

    def r(a, b):
        return None if a is None or b is None or b == 0 else a / b

    out = []
    if row == "apply_latency":
        x = r(pp, kern)
        out.append(check("≤ 1.0 × pinned bare round trip", x, x is not None and x <= 1.0, ratio(pp, kern)))
        y = r(pool, pp)
        out.append(check("≥ 5 × faster than Pool", y, y is not None and y >= 5, ratio(pool, pp)))
    elif row == "apply_async_throughput":
        out.append(check("≥ 0.5 M tasks/s", pp, pp is not None and pp >= 0.5e6, fmt(pp, "tasks/s", True)))
        y = r(pp, pool)
        out.append(check("≥ 20 × Pool", y, y is not None and y >= 20, ratio(pp, pool)))
        z = r(pp, kern)
        out.append(check("≥ 40 % of bare chunk 1", z, z is not None and z >= 0.4, ratio(pp, kern)))
    elif row == "map_throughput/auto":
        out.append(check("≥ 60 M items/s", pp, pp is not None and pp >= 60e6, fmt(pp, "items/s", True)))
        y = r(pp, pool)
        out.append(check("≥ 10 × Pool", y, y is not None and y >= 10, ratio(pp, pool)))
        z = r(pp, kern)
        out.append(check("≥ 50 % of bare processes", z, z is not None and z >= 0.5, ratio(pp, kern)))
    elif row in ("map_throughput/chunk1", "imap_unordered/chunk1"):
        y = r(pp, pool)
        out.append(check("≥ 20 × Pool", y, y is not None and y >= 20, ratio(pp, pool)))
    elif row == "cpu_bound_speedup":
        out.append(check("≥ 1.95 ×", pp, pp is not None and pp >= 1.95, fmt(pp, "×")))
    elif row == "large_payload/one_way":
        out.append(check("≥ 3 GB/s", pp, pp is not None and pp >= 3, fmt(pp, "GB/s", True)))
        y = r(pp, pool)
        out.append(check("≥ 8 × Pool", y, y is not None and y >= 8, ratio(pp, pool)))
        z = r(pp, kern)
        out.append(check("≥ 45 % of memcpy", z, z is not None and z >= 0.45, ratio(pp, kern)))
    elif row == "large_payload/round_trip":
        out.append(check("≥ 1.5 GB/s", pp, pp is not None and pp >= 1.5, fmt(pp, "GB/s", True)))
    elif row == "pool_startup":
        out.append(check("≤ 2 ms", pp, pp is not None and pp <= 2, fmt(pp, "ms", True)))
        y = r(pool, pp)
        out.append(check("≥ 6 × faster than Pool", y, y is not None and y >= 6, ratio(pool, pp)))
    elif row == "pipe_pingpong":
        x = r(pp, kern)
        out.append(check("≤ 1.0 × pinned bare round trip", x, x is not None and x <= 1.0, ratio(pp, kern)))
    elif row == "queue_throughput":
        out.append(check("≥ 2 M msgs/s", pp, pp is not None and pp >= 2e6, fmt(pp, "msgs/s", True)))
        y = r(pp, pool)
        out.append(check("≥ 13 × Python's Queue", y, y is not None and y >= 13, ratio(pp, pool)))
    elif row == "manager_dict_ops":
        x = r(pp, kern)
        out.append(check("≥ 0.8 ops per pinned bare round trip", x, x is not None and x >= 0.8,
                         ratio(pp, kern)))
        y = r(pp, pool)
        out.append(check("≥ 2 × Python's Manager", y, y is not None and y >= 2, ratio(pp, pool)))
    return out


# ---------------------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Scenarios: " + ", ".join(SCENARIOS) + ". Figures are medians of --reps "
               "repetitions; every repetition runs each scenario on every side before the next "
               "scenario, so the sides share the machine's state.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD_DIR),
                    help="CMake build directory holding bench/pool_bench etc. (default: "
                         "%(default)s; configured as a Release build if it has no "
                         "CMakeCache.txt). build/ci-release from cmake/run-tests.sh works too.")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions; the median is reported (default 3, 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: a tenth of the items of every scenario (1 MiB payloads, "
                         "0.02 s burns), 1 repetition unless --reps; under 2 minutes")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated scenarios to run (default: all): " + ", ".join(SCENARIOS))
    ap.add_argument("--no-build", action="store_true",
                    help="do not run cmake; use the programs already in --build-dir")
    ap.add_argument("--min-time", type=float, default=None,
                    help="--benchmark_min_time for the C++ programs, in seconds (default 0.2, "
                         "0.01 with --quick): a fast scenario is repeated within one run until "
                         "this much time has passed and its figure averaged")
    ap.add_argument("--json", metavar="FILE",
                    help="also write every raw figure (each repetition) to FILE as JSON")
    a = ap.parse_args()
    a.reps = a.reps or (1 if a.quick else 3)
    a.min_time = a.min_time if a.min_time is not None else (0.01 if a.quick else 0.2)
    unknown = [s for s in a.scenarios.split(",") if s and s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    a.scenarios = [s for s in SCENARIOS if s in a.scenarios.split(",")]
    return a


def main():
    args = parse_args()
    build_dir = Path(args.build_dir)
    if not build_dir.is_absolute():
        build_dir = (Path.cwd() / build_dir).resolve()
    sizes = Sizes(args.quick)
    notes = set()
    started = time.time()
    load_before = os.getloadavg()

    # The queue and manager programs only for their scenarios.
    others = [DISCOVER[row[4][1]][0] for scen in args.scenarios for row in SCENARIOS[scen][1]
              if row[4][0] == "discover"]
    wanted = list(MY_PROGRAMS) + [p for p in others if (ROOT / "bench" / f"{p}.cpp").exists()]
    if args.no_build:
        available = [p for p in wanted if program_path(build_dir, p).exists()]
    else:
        available = build(build_dir, wanted)
    for p in MY_PROGRAMS:
        if p not in available:
            sys.exit(f"compare.py: {program_path(build_dir, p)} is missing. Build it with:\n  "
                     f"{shlex.join(configure_command(build_dir))}\n  "
                     f"cmake --build {build_dir} --target {' '.join(MY_PROGRAMS)}")
    for p in others:
        if p not in available:
            why = ("it did not build" if (ROOT / "bench" / f"{p}.cpp").exists()
                   else f"bench/{p}.cpp does not exist yet")
            notes.add(f"{p}: not available ({why}); its scenario has no procpool figure")

    # raw[row][side] = [figure per repetition]; kraw[kernel benchmark] = [figure per repetition]
    raw = {}
    kraw = {}
    discovered = {}
    for rep in range(args.reps):
        for scen in args.scenarios:
            py_fn, rows, kernel_names = SCENARIOS[scen]
            log(f"[rep {rep + 1}/{args.reps}] {scen}: Python ...")
            try:
                py = py_fn(sizes)
            except Exception as e:  # a Python-side failure must not lose the other sides
                notes.add(f"{scen}: Python side failed: {type(e).__name__}: {e}")
                py = {}
            # procpool: one run of the program for all of this scenario's rows
            log(f"[rep {rep + 1}/{args.reps}] {scen}: procpool ...")
            by_prog = {}
            for row in rows:
                src = row[4]
                if src[0] == "discover":
                    if row[0] not in discovered:
                        discovered[row[0]] = discover(src[1], build_dir, available, notes)
                    prog, names = discovered[row[0]]
                    by_prog.setdefault(prog, []).extend(names)
                else:
                    by_prog.setdefault(src[0], []).append(src[1])
            results = {}
            for prog, names in by_prog.items():
                if prog in available and names:
                    results.update(run_benchmarks(program_path(build_dir, prog), names,
                                                  args.quick, args.min_time, notes))
            log(f"[rep {rep + 1}/{args.reps}] {scen}: kernel ...")
            kres = run_benchmarks(program_path(build_dir, "kernel_bound_bench"), kernel_names,
                                  args.quick, args.min_time, notes)
            for name in kernel_names:
                if name in kres:
                    counter = KERNEL_REFERENCE[name][1]
                    kraw.setdefault(name, []).append(kres[name].get(counter))
            for row_id, _label, _unit, _up, src, ksrc in rows:
                pool_fig, ppe_fig = py.get(row_id, (None, None))
                if src[0] == "discover":
                    _prog, names = discovered[row_id]
                    rates = []
                    for n in names:
                        if n in results:
                            v, key = rate_of(results[n])
                            if v is None:
                                notes.add(f"{row_id}: {n} has no per-second counter")
                            else:
                                rates.append(v)
                                notes.add(f"{row_id}: procpool figure from {_prog} {n} [{key}]")
                    # Several benchmarks of equal op counts (e.g. sets, then gets): ops/s of all.
                    pp_fig = len(rates) / sum(1 / v for v in rates) if rates and all(rates) else None
                else:
                    entry = results.get(src[1])
                    pp_fig = entry.get(src[2]) if entry else None
                kern_fig = None
                if ksrc and ksrc[0] in kres:
                    kern_fig = kres[ksrc[0]].get(ksrc[1])
                    if ksrc[2] == "per_roundtrip" and kern_fig:
                        kern_fig = 1e6 / kern_fig  # one op per round trip: ops/s
                r = raw.setdefault(row_id, {"pool": [], "ppe": [], "procpool": [], "kernel": []})
                r["pool"].append(pool_fig)
                r["ppe"].append(ppe_fig)
                r["procpool"].append(pp_fig)
                r["kernel"].append(kern_fig)

    elapsed = time.time() - started
    load_after = os.getloadavg()

    # ----- output
    cmd = shlex.join(["python3", os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    print(f"## procpool vs Python multiprocessing vs the bare kernel\n")
    print(f"* date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"* machine: {cores} cores ({usable} usable), {cpu_model()}, Linux "
          f"{platform.release()}, Python {platform.python_version()}, {compiler(build_dir)}")
    shown_dir = os.path.relpath(build_dir, ROOT) if build_dir.is_relative_to(ROOT) else build_dir
    print(f"* procpool: {git_describe()}; programs in {shown_dir}")
    print(f"* command: `{cmd}`")
    print(f"* medians of {args.reps} repetition(s), sides interleaved per scenario"
          f"{'; QUICK: a tenth of the items' if args.quick else ''}; run took {elapsed:.0f} s; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    print("↑: higher is better, ↓: lower is better. Ratios are procpool's figure divided by the "
          "other's (for ↓ rows, below 1 means procpool is faster). The Pool column holds "
          "Python's multiprocessing figure for Pipe, Queue and Manager.\n")
    print("| scenario | Pool | ProcessPoolExecutor | procpool | kernel bound "
          "| procpool ÷ Pool | procpool ÷ PPE | procpool ÷ kernel |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians = {}
    for scen in args.scenarios:
        for row_id, label, unit, up, _src, _k in SCENARIOS[scen][1]:
            r = raw.get(row_id)
            if not r:
                continue
            m = {side: median(v) for side, v in r.items()}
            medians[row_id] = m
            arrow = "↑" if up else "↓"
            print(f"| {label} ({unit} {arrow}) | {fmt(m['pool'], unit)} | {fmt(m['ppe'], unit)} | "
                  f"{fmt(m['procpool'], unit)} | {fmt(m['kernel'], unit)} | "
                  f"{ratio(m['procpool'], m['pool'])} | {ratio(m['procpool'], m['ppe'])} | "
                  f"{ratio(m['procpool'], m['kernel'])} |")
    print()
    print("Kernel bounds: apply_latency, pipe_pingpong: socketpair round trip between two "
          "processes pinned to two CPUs; manager_dict_ops: one such round trip per op; "
          "apply_async, map chunk 1: bare fork+socketpair chunk-1 tasks; map auto: two "
          "processes over shared memory; large_payload: memcpy; pool_startup: fork+wait; "
          "cpu_bound: two forked children.\n")

    print("### Targets (BENCHMARKS.md)\n")
    print("| scenario | target | measured | met |")
    print("| --- | --- | ---: | --- |")
    missed = 0
    for scen in args.scenarios:
        for row_id, label, *_ in SCENARIOS[scen][1]:
            m = medians.get(row_id)
            if not m:
                continue
            for what, shown, ok in targets(row_id, m["pool"], m["ppe"], m["procpool"], m["kernel"]):
                verdict = "—" if ok is None else ("yes" if ok else "**no**")
                missed += ok is False
                print(f"| {label} | {what} | {shown} | {verdict} |")
    print()

    if kraw:
        print("### Kernel reference figures (same run)\n")
        print("Medians over every run of each measurement (a bound used by several scenarios "
              "runs once per scenario and repetition).\n")
        print("| bare-kernel measurement | median |")
        print("| --- | ---: |")
        for name, (label, _counter, unit) in KERNEL_REFERENCE.items():
            if name in kraw:
                print(f"| {label} | {fmt(median(kraw[name]), unit, True)} |")
        print()

    if notes:
        print("### Notes\n")
        for n in sorted(notes):
            print(f"* {n}")
        print()

    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "rows": raw, "kernel": kraw,
                                               "medians": medians}, indent=1))
    log(f"done in {elapsed:.0f} s; {missed} target(s) missed")


if __name__ == "__main__":
    main()
