#!/usr/bin/env python3
"""Measures how procpool and Python's multiprocessing.Pool scale, and plots it.

Two plots, procpool and Python's Pool (fork) on the same axes:

* docs/perf/scaling_workers.png: map throughput (map(square, 0..999,999), automatic chunk
  size) and apply latency (2,000 sequential apply(ident, i)) for 1, 2, 4 and 8 workers;
* docs/perf/payload.png: one-way throughput of map(nbytes, buffers, chunksize=1) with 2
  workers against the buffer size, 8 B to 64 MiB (8 × 4^k, then 64 MiB; about 256 MiB per
  point, 4 to 4,096 buffers), with the bare memcpy and socketpair bandwidths as reference lines.

procpool's figures come from the `scaling/` benchmarks of pool_bench (built first if needed),
the bare-kernel lines from kernel_bound_bench; Python's are measured here. Measuring needs only
the standard library; plotting needs gnuplot (Debian: `apt-get install -y gnuplot-nox`).

    python3 bench/scaling.py                 # measure, write both PNGs (a few minutes)
    python3 bench/scaling.py --quick         # a tenth of the items, 32 MiB per payload point
"""

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing compare
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the same work functions, build and run helpers)

ROOT = compare.ROOT
CTX = mp.get_context("fork")
WORKERS = (1, 2, 4, 8)


def payload_sizes():
    sizes, s = [], 8
    while s <= 32 << 20:
        sizes.append(s)
        s *= 4
    return sizes + [64 << 20]


def payload_count(size, quick):
    total = (32 << 20) if quick else (256 << 20)
    return max(4, min(512 if quick else 4096, total // size))


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def python_side(quick, log):
    n_map = 100_000 if quick else 1_000_000
    n_apply = 200 if quick else 2_000
    out = {"map": {}, "apply": {}, "payload": {}}
    for w in WORKERS:
        p = CTX.Pool(w)
        p.map(compare.ident, range(4 * w), chunksize=1)
        out["map"][w] = n_map / timed(lambda: p.map(compare.square, range(n_map)))
        out["apply"][w] = timed(lambda: [p.apply(compare.ident, (i,)) for i in range(n_apply)]) \
            / n_apply * 1e6
        p.close()
        p.join()
        log(f"  Python Pool({w}): {out['map'][w] / 1e6:.3g} M items/s, "
            f"{out['apply'][w]:.3g} µs/apply")
    p = CTX.Pool(2)
    p.map(compare.ident, range(8), chunksize=1)
    for size in payload_sizes():
        count = payload_count(size, quick)
        bufs = [bytes([i % 256]) * size for i in range(count)]
        t = timed(lambda: p.map(compare.nbytes, bufs, chunksize=1))
        out["payload"][size] = count * size / t / 1e9
        del bufs
        log(f"  Python Pool(2) payload {size} B x {count}: {out['payload'][size]:.3g} GB/s")
    p.close()
    p.join()
    return out


def procpool_side(build_dir, quick, min_time, notes):
    res = compare.run_benchmarks(compare.program_path(build_dir, "pool_bench"), ["scaling"],
                                 quick, min_time, notes)
    out = {"map": {}, "apply": {}, "payload": {}}
    for name, e in res.items():
        key = name.split("/")
        if key[1] == "map_throughput":
            out["map"][int(key[2].split(":")[1])] = e["items_per_s"]
        elif key[1] == "apply_latency":
            out["apply"][int(key[2].split(":")[1])] = e["us_per_call"]
        elif key[1] == "payload":
            out["payload"][int(key[2].split(":")[1])] = e["GB_per_s"]
    kern = compare.run_benchmarks(compare.program_path(build_dir, "kernel_bound_bench"),
                                  ["kernel/memcpy_bandwidth", "kernel/socket_bandwidth"],
                                  quick, min_time, notes)
    out["memcpy"] = kern.get("kernel/memcpy_bandwidth", {}).get("GB_per_s")
    out["socket"] = kern.get("kernel/socket_bandwidth", {}).get("GB_per_s")
    return out


def ints(d):
    """A figures dict read back from JSON, with its int keys restored."""
    return {k: ({int(x): y for x, y in v.items()} if isinstance(v, dict) else v)
            for k, v in d.items()}


def median_of(runs, path):
    """Median across repetitions of runs[i][path[0]][path[1]]..."""
    vals = []
    for r in runs:
        v = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
            if v is None:
                break
        if v is not None:
            vals.append(v)
    vals.sort()
    if not vals:
        return None
    m = len(vals) // 2
    return vals[m] if len(vals) % 2 else (vals[m - 1] + vals[m]) / 2


def plot(pp, py, out_dir, subtitle, gnuplot, quick):
    n_map = '100,000' if quick else '1,000,000'
    n_apply = '200' if quick else '2,000'
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "workers.dat", "w") as f:
            f.write("# workers procpool_items_per_s python_items_per_s procpool_us python_us\n")
            for w in WORKERS:
                vals = [pp["map"].get(w), py["map"].get(w), pp["apply"].get(w), py["apply"].get(w)]
                f.write(f"{w} " + " ".join("NaN" if v is None else repr(v) for v in vals) + "\n")
        with open(tmp / "payload.dat", "w") as f:
            f.write("# bytes procpool_GB_per_s python_GB_per_s\n")
            for s in payload_sizes():
                vals = [pp["payload"].get(s), py["payload"].get(s)]
                f.write(f"{s} " + " ".join("NaN" if v is None else repr(v) for v in vals) + "\n")
        refs = ""
        if pp.get("memcpy"):
            refs += (f", {pp['memcpy']!r} with lines dt 2 lc rgb '#888888' "
                     f"title sprintf('memcpy (bare), %.2g GB/s', {pp['memcpy']!r})")
        if pp.get("socket"):
            refs += (f", {pp['socket']!r} with lines dt 3 lc rgb '#444444' "
                     f"title sprintf('socketpair (bare), %.2g GB/s', {pp['socket']!r})")
        script = f"""
set terminal pngcairo size 1200,520 font 'DejaVu Sans,11'
set output '{out_dir / 'scaling_workers.png'}'
set datafile missing 'NaN'
set multiplot layout 1,2 title "procpool vs Python multiprocessing.Pool: workers\\n{{/*0.8 {subtitle}}}"
set grid
set key bottom right
set xlabel 'workers'
set xtics ('1' 1, '2' 2, '4' 4, '8' 8)
set logscale x 2
set xrange [0.8:10]
set logscale y
set format y '%.0s%c'
set ylabel 'items/s'
set title 'map(square, {n_map} items), automatic chunk size'
plot '{tmp / 'workers.dat'}' using 1:2 with linespoints lw 2 pt 7 title 'procpool', \\
     '' using 1:3 with linespoints lw 2 pt 5 title 'Python Pool'
set ylabel 'µs per call'
set format y '%g'
set title '{n_apply} sequential apply(ident, i)'
plot '{tmp / 'workers.dat'}' using 1:4 with linespoints lw 2 pt 7 title 'procpool', \\
     '' using 1:5 with linespoints lw 2 pt 5 title 'Python Pool'
unset multiplot

set output '{out_dir / 'payload.png'}'
set terminal pngcairo size 900,560 font 'DejaVu Sans,11'
set title "One-way payload throughput: map(nbytes, buffers, chunksize=1), 2 workers\\n{{/*0.8 {subtitle}}}"
set key bottom right
set xlabel 'buffer size'
set logscale x 2
set xrange [4:128*1024*1024]
set xtics ('8 B' 8, '128 B' 128, '2 KiB' 2048, '32 KiB' 32768, '512 KiB' 524288, '8 MiB' 8388608, '64 MiB' 67108864)
set logscale y
set ylabel 'GB/s of payload (10^9 bytes/s)'
set format y '%g'
plot '{tmp / 'payload.dat'}' using 1:2 with linespoints lw 2 pt 7 title 'procpool', \\
     '' using 1:3 with linespoints lw 2 pt 5 title 'Python Pool'{refs}
"""
        (tmp / "plot.gp").write_text(script)
        r = subprocess.run([gnuplot, str(tmp / "plot.gp")], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("scaling.py: gnuplot failed:\n" + r.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=str(compare.DEFAULT_BUILD_DIR),
                    help="CMake build directory holding bench/pool_bench (default: %(default)s; "
                         "configured as a Release build if it has no CMakeCache.txt)")
    ap.add_argument("--no-build", action="store_true",
                    help="do not run cmake; use the programs already in --build-dir")
    ap.add_argument("--quick", action="store_true",
                    help="a tenth of the items, 32 MiB per payload point: a smoke run")
    ap.add_argument("--reps", type=int, default=1,
                    help="repetitions (procpool then Python each time); medians are plotted "
                         "(default %(default)s)")
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="--benchmark_min_time for pool_bench, in seconds (default %(default)s)")
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "perf"),
                    help="where the PNGs go (default: %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="also write the measured figures to FILE")
    ap.add_argument("--from-json", metavar="FILE",
                    help="measure nothing: plot the figures a previous --json run wrote to FILE")
    args = ap.parse_args()

    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        sys.exit("scaling.py: gnuplot is needed for the plots; on Debian: "
                 "apt-get install -y gnuplot-nox")
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        plot(*(ints(saved[k]) for k in ("procpool", "python")), Path(args.out_dir),
             saved["subtitle"], gnuplot, saved.get("quick", False))
        print(f"wrote {Path(args.out_dir) / 'scaling_workers.png'} and "
              f"{Path(args.out_dir) / 'payload.png'} from {args.from_json}")
        return
    build_dir = Path(args.build_dir).resolve()
    notes = set()
    if args.no_build:
        built = [p for p in compare.MY_PROGRAMS if compare.program_path(build_dir, p).exists()]
    else:
        built = compare.build(build_dir, list(compare.MY_PROGRAMS))
    if "pool_bench" not in built or "kernel_bound_bench" not in built:
        sys.exit(f"scaling.py: pool_bench / kernel_bound_bench missing in {build_dir}; build "
                 f"them with:\n  {shlex.join(compare.configure_command(build_dir))}\n  "
                 f"cmake --build {build_dir} --target pool_bench kernel_bound_bench")

    started = time.time()
    pp_runs, py_runs = [], []
    for rep in range(args.reps):
        compare.log(f"[rep {rep + 1}/{args.reps}] procpool (pool_bench scaling/) ...")
        pp_runs.append(procpool_side(build_dir, args.quick, args.min_time, notes))
        compare.log(f"[rep {rep + 1}/{args.reps}] Python Pool ...")
        py_runs.append(python_side(args.quick, compare.log))
    pp = {"map": {w: median_of(pp_runs, ["map", w]) for w in WORKERS},
          "apply": {w: median_of(pp_runs, ["apply", w]) for w in WORKERS},
          "payload": {s: median_of(pp_runs, ["payload", s]) for s in payload_sizes()},
          "memcpy": median_of(pp_runs, ["memcpy"]), "socket": median_of(pp_runs, ["socket"])}
    py = {"map": {w: median_of(py_runs, ["map", w]) for w in WORKERS},
          "apply": {w: median_of(py_runs, ["apply", w]) for w in WORKERS},
          "payload": {s: median_of(py_runs, ["payload", s]) for s in payload_sizes()}}
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d")
    subtitle = (f"{date}, {os.cpu_count()} cores ({compare.cpu_model()}), "
                f"medians of {args.reps}{', QUICK' if args.quick else ''}; "
                f"python3 bench/scaling.py{' --quick' if args.quick else ''}")
    out_dir = Path(args.out_dir)
    plot(pp, py, out_dir, subtitle, gnuplot, args.quick)

    # The figures, as a table, on stdout.
    print(f"workers | procpool map items/s | Pool map items/s | procpool apply µs | Pool apply µs")
    for w in WORKERS:
        print(f"{w} | {compare.fmt(pp['map'][w], 'items/s')} | {compare.fmt(py['map'][w], 'items/s')} | "
              f"{compare.fmt(pp['apply'][w], 'µs')} | {compare.fmt(py['apply'][w], 'µs')}")
    print(f"\npayload bytes | procpool GB/s | Pool GB/s")
    for s in payload_sizes():
        print(f"{s} | {compare.fmt(pp['payload'][s], 'GB/s')} | {compare.fmt(py['payload'][s], 'GB/s')}")
    print(f"\nbare memcpy {compare.fmt(pp['memcpy'], 'GB/s', True)}, "
          f"socketpair {compare.fmt(pp['socket'], 'GB/s', True)}")
    for n in sorted(notes):
        print("note:", n)
    print(f"\nwrote {out_dir / 'scaling_workers.png'} and {out_dir / 'payload.png'} "
          f"in {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"procpool": pp, "python": py, "subtitle": subtitle,
                                               "quick": args.quick}, indent=1))


if __name__ == "__main__":
    main()
