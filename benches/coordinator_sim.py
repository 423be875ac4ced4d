#!/usr/bin/env python3
"""The coordinator beyond this machine: coordinator CPU per micro-batch with
16 to 1,024 virtual workers (`drizzle bench sim`), a three-stage plan,
Drizzle (G = 10, 100) against BSP.

Virtual workers speak the cluster protocol from one thread of this process
and complete every task at once, so the figures are the real coordinator's
own cost: launches, barriers (BSP), task outputs, group reports and
heartbeats. Prints a Markdown table and writes docs/img/coordinator_sim.png.
Not a test: it prints figures. Needs a release build; matplotlib for the plot.

    benches/coordinator_sim.py [--workers 16,64,256,1024] [--bsp-max 256] [--seconds 4]
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(bin_path, workers, scheduling, group, seconds, stages):
    out = subprocess.run(
        [bin_path, "bench", "sim", "--remote-workers", str(workers), "--scheduling", scheduling,
         "--group-size", str(group), "--seconds", str(seconds), "--stages", str(stages)],
        check=True, capture_output=True, text=True, env={**os.environ, "RUST_LOG": "error"},
    ).stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in out.strip("|").split("|")]
    return out, float(cells[5])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="16,64,256,1024")
    ap.add_argument("--bsp-max", type=int, default=256,
                    help="largest worker count BSP runs at (its barriers grow quadratically)")
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/drizzle"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs/img/coordinator_sim.png"))
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "drizzle-server"], cwd=ROOT, check=True)
    workers = [int(w) for w in args.workers.split(",")]
    configs = [("drizzle", 10), ("drizzle", 100), ("bsp", 1)]
    print("| stages | workers | scheduling | G     | batches/s | coord. CPU µs / batch | coord. µs / batch | launches / batch   |")
    print("|-------:|--------:|-----------:|------:|----------:|-----------------:|------------------:|-------------------:|")
    cpu = {}
    for w in workers:
        for sched, g in configs:
            if sched == "bsp" and w > args.bsp_max:
                continue
            line, c = run(args.bin, w, sched, g, args.seconds, args.stages)
            print(line, flush=True)
            cpu[(sched, g, w)] = c
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (sched, g), style in zip(configs, ["^-", "s-", "o-"]):
        xs = [w for w in workers if (sched, g, w) in cpu]
        label = "BSP" if sched == "bsp" else f"Drizzle, G={g}"
        ax.plot(xs, [cpu[(sched, g, w)] / 1000 for w in xs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(workers)
    ax.set_xticklabels([str(w) for w in workers])
    ax.set_xlabel("virtual workers")
    ax.set_ylabel("coordinator CPU per micro-batch (ms, log)")
    ax.set_title(f"Coordinator cost, {args.stages}-stage plan, virtual workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nplot: {os.path.relpath(args.png, ROOT)}")


if __name__ == "__main__":
    main()
