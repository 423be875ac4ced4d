#!/usr/bin/env python3
"""YSB-lite on one server and two `drizzle worker` processes: Drizzle against
BSP on the same build, at the same offered rates and batch interval.

Prints a Markdown table (throughput, window emit latency p50/p99, batch
latency) and writes docs/img/ysb_cluster.png. Not a test: it prints figures.
Needs a release build and matplotlib.

    benches/ysb_cluster.py [--seconds 45] [--rates 1000000,4000000] [--interval 10ms]
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(bin_path, scheduling, rate, seconds, interval, group, window, header):
    cmd = [bin_path, "bench", "ysb", "--remote-workers", "2", "--scheduling", scheduling,
           "--rate", str(rate), "--seconds", str(seconds), "--batch-interval", interval,
           "--group-size", str(group), "--window-seconds", str(window)]
    if header:
        cmd.append("--header")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "RUST_LOG": "error"}).stdout.strip().splitlines()
    return out


def cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=45)
    ap.add_argument("--rates", default="1000000,4000000")
    ap.add_argument("--interval", default="10ms")
    ap.add_argument("--group-size", type=int, default=50)
    ap.add_argument("--window-seconds", type=int, default=1,
                    help="tumbling window size; 1 s gives ~40 windows per run for the percentiles")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/drizzle"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs/img/ysb_cluster.png"))
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "drizzle-server"], cwd=ROOT, check=True)
    rates = [int(r) for r in args.rates.split(",")]
    rows = []
    first = True
    for rate in rates:
        for sched in ("drizzle", "bsp"):
            lines = run(args.bin, sched, rate, args.seconds, args.interval, args.group_size,
                        args.window_seconds, first)
            if first:
                h = lines[0].replace("| offered", "| scheduling | offered").replace("|-------------:", "|-----------:|-------------:", 1)
                print(h + "\n" + lines[1].replace("|-------------:", "|-----------:|-------------:", 1))
                first = False
            line = lines[-1]
            print(f"| {sched:>10} " + line, flush=True)
            c = cells(line)
            rows.append((sched, rate, float(c[2]), float(c[4]), float(c[5])))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.2
    for i, rate in enumerate(rates):
        for j, (sched, color) in enumerate((("drizzle", "tab:blue"), ("bsp", "tab:red"))):
            r = [x for x in rows if x[0] == sched and x[1] == rate][0]
            x = i + (j - 0.5) * 2 * width
            ax.bar(x - width / 2, r[3], width, color=color, alpha=0.5, label=f"{sched} p50" if i == 0 else None)
            ax.bar(x + width / 2, r[4], width, color=color, label=f"{sched} p99" if i == 0 else None)
    ax.set_xticks(range(len(rates)))
    ax.set_xticklabels([f"{r/1e6:g}M ev/s" for r in rates])
    ax.set_ylabel("window emit latency (ms)")
    ax.set_title(f"YSB-lite ({args.window_seconds} s windows), 1 server + 2 workers, {args.interval} batches")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nplot: {os.path.relpath(args.png, ROOT)}")


if __name__ == "__main__":
    main()
