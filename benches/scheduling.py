#!/usr/bin/env python3
"""Scheduling overhead per micro-batch (the Drizzle paper's micro-benchmark).

A two-stage query (GROUP BY over a shuffle) on tiny input, micro-batches
triggered back to back, on 1, 2, 4 and 8 `drizzle worker` processes, for
BSP, group scheduling only (G = 10, 50, 100: one launch per group, but the
coordinator still starts every batch's reduce tasks after a barrier), and
group scheduling with pre-scheduled shuffles (Drizzle, G = 10, 50, 100).

Prints a Markdown table and writes docs/img/scheduling.png. Not a test:
it prints figures. Needs a release build and matplotlib (pip install matplotlib).

    benches/scheduling.py [--seconds 5] [--workers 1,2,4,8]
    benches/scheduling.py --workers 4 --stages 1,2,3,4   # against plan depth
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PNG = os.path.join(ROOT, "docs/img/scheduling.png")

CONFIGS = [("bsp", 1)] + [("group", g) for g in (10, 50, 100)] + [("drizzle", g) for g in (10, 50, 100)]


HEADER = ("| stages | workers | scheduling | G     | ms / batch  | batches/s | coord. µs / batch | launches / batch   |\n"
          "|-------:|--------:|-----------:|------:|------------:|----------:|------------------:|-------------------:|")


def pyplot():
    """matplotlib's pyplot for writing PNGs, or None (with a note) without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib missing: no plot written", file=sys.stderr)
        return None


def run(bin_path, workers, scheduling, group, seconds, stages=2):
    out = subprocess.run(
        [bin_path, "bench", "sched", "--remote-workers", str(workers), "--scheduling", scheduling,
         "--group-size", str(group), "--seconds", str(seconds), "--stages", str(stages)],
        check=True, capture_output=True, text=True, env={**os.environ, "RUST_LOG": "error"},
    ).stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in out.strip("|").split("|")]
    return out, float(cells[4]), float(cells[6])


def depth_sweep(args):
    """Coordinator time per micro-batch against plan depth (1 to 4 stages) at
    a fixed worker count, BSP against Drizzle."""
    configs = [("bsp", 1), ("drizzle", 10), ("drizzle", 100)]
    stages = [int(s) for s in args.stages.split(",")]
    workers = int(args.workers.split(",")[-1])
    print(HEADER)
    coord = {}
    for st in stages:
        for sched, g in configs:
            line, _, c = run(args.bin, workers, sched, g, args.seconds, st)
            print(line, flush=True)
            coord[(sched, g, st)] = c
    print()
    print("| stages | BSP coord. µs | Drizzle G=10 | Drizzle G=100 | G=10 / BSP | G=100 / BSP |")
    print("|-------:|--------------:|-------------:|--------------:|-----------:|------------:|")
    for st in stages:
        b, d10, d100 = coord[("bsp", 1, st)], coord[("drizzle", 10, st)], coord[("drizzle", 100, st)]
        print(f"| {st:>6} | {b:>13.1f} | {d10:>12.1f} | {d100:>13.1f} | {d10 / b:>10.3f} | {d100 / b:>11.3f} |")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (sched, g), style in zip(configs, ["o-", "^-", "s-"]):
        label = "BSP" if sched == "bsp" else f"Drizzle, G={g}"
        ax.plot(stages, [coord[(sched, g, st)] for st in stages], style, label=label)
    ax.set_yscale("log")
    ax.set_xticks(stages)
    ax.set_xlabel("stages in the plan")
    ax.set_ylabel("coordinator µs per micro-batch (log)")
    ax.set_title(f"Coordination per micro-batch against plan depth, {workers} workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = args.png if args.png != DEFAULT_PNG else os.path.join(ROOT, "docs/img/scheduling_depth.png")
    fig.savefig(png, dpi=120)
    print(f"\nplot: {os.path.relpath(png, ROOT)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/drizzle"))
    ap.add_argument("--png", default=DEFAULT_PNG)
    ap.add_argument("--stages", default=None,
                    help="sweep plan depth instead (e.g. 1,2,3,4) at the last --workers count")
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "drizzle-server"], cwd=ROOT, check=True)
    if args.stages:
        depth_sweep(args)
        return
    workers = [int(w) for w in args.workers.split(",")]
    header = None
    results = {}
    for w in workers:
        for sched, g in CONFIGS:
            line, ms, coord = run(args.bin, w, sched, g, args.seconds)
            if header is None:
                header = True
                print(HEADER)
            print(line, flush=True)
            results[(sched, g, w)] = ms
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"bsp": "o-", "group": "s--", "drizzle": "^-"}
    for sched, g in CONFIGS:
        ys = [results[(sched, g, w)] for w in workers]
        label = "BSP (G=1)" if sched == "bsp" else (
            f"group scheduling only, G={g}" if sched == "group" else f"Drizzle (group + pre-scheduling), G={g}")
        ax.plot(workers, ys, styles[sched], label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(workers)
    ax.set_xticklabels([str(w) for w in workers])
    ax.set_xlabel("worker processes")
    ax.set_ylabel("time per micro-batch (ms, log)")
    ax.set_title("Scheduling overhead: two-stage query, tiny input")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nplot: {os.path.relpath(args.png, ROOT)}")


if __name__ == "__main__":
    main()
