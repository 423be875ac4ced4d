#!/usr/bin/env python3
"""The coordinator beyond this machine: coordinator cost per micro-batch with
16 to 1,024 virtual workers, a three-stage plan, Drizzle (G = 10, 100)
against BSP.

Default (`drizzle bench sim`): the real coordinator, its gRPC endpoint and
the cluster protocol; virtual workers speak it from one thread of this
process and complete every task at once, so the figures are the
coordinator's own CPU: launches, barriers (BSP), task outputs, group
reports and heartbeats. Writes docs/img/coordinator_sim.png.

`--machine` (`drizzle bench machine`): the coordinator's decisions alone,
the same state machine (`QueryMachine`) driven on one thread with no
network, every launch encoded as it would be sent. Writes
docs/img/coordinator_machine.png.

Prints a Markdown table. Not a test: it prints figures. Needs a release
build; matplotlib for the plot.

    benches/coordinator_sim.py [--machine] [--workers 16,64,256,1024] [--bsp-max N] [--seconds 4]
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIM_HEADER = (
    "| stages | workers | scheduling | G     | batches/s | coord. CPU µs / batch | coord. µs / batch | launches / batch   |\n"
    "|-------:|--------:|-----------:|------:|----------:|-----------------:|------------------:|-------------------:|"
)
MACHINE_HEADER = (
    "| stages | workers | scheduling | G     | batches | µs / batch     | launches / batch | launch KiB / batch |\n"
    "|-------:|--------:|-----------:|------:|--------:|---------------:|-----------------:|-------------------:|"
)


def run(args, workers, scheduling, group):
    """One line of `drizzle bench sim|machine`, and its cost column (µs)."""
    cmd = [args.bin, "bench", "machine" if args.machine else "sim",
           "--remote-workers", str(workers), "--scheduling", scheduling,
           "--group-size", str(group), "--stages", str(args.stages)]
    if not args.machine:
        cmd += ["--seconds", str(args.seconds)]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "RUST_LOG": "error"},
    ).stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in out.strip("|").split("|")]
    return out, float(cells[5])


def plot(args, workers, configs, cost, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written", file=sys.stderr)
        return
    scale = 1 if args.machine else 1000
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (sched, g), style in zip(configs, ["^-", "s-", "o-"]):
        xs = [w for w in workers if (sched, g, w) in cost]
        label = "BSP" if sched == "bsp" else f"Drizzle, G={g}"
        ax.plot(xs, [cost[(sched, g, w)] / scale for w in xs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(workers)
    ax.set_xticklabels([str(w) for w in workers])
    ax.set_xlabel("virtual workers")
    if args.machine:
        ax.set_ylabel("coordinator decisions per micro-batch (µs, log)")
        ax.set_title(f"The coordinator's state machine, {args.stages}-stage plan, no network")
    else:
        ax.set_ylabel("coordinator CPU per micro-batch (ms, log)")
        ax.set_title(f"Coordinator cost, {args.stages}-stage plan, virtual workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nplot: {os.path.relpath(png, ROOT)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--machine", action="store_true",
                    help="the coordinator's decisions alone (no network)")
    ap.add_argument("--workers", default=None,
                    help="default: 16,64,256,1024 (with --machine: 16,64,128,256,1024)")
    ap.add_argument("--bsp-max", type=int, default=None,
                    help="largest worker count BSP runs at (default: 256; with --machine: 1024)")
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/drizzle"))
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    workers = args.workers or ("16,64,128,256,1024" if args.machine else "16,64,256,1024")
    bsp_max = args.bsp_max or (1024 if args.machine else 256)
    png = args.png or os.path.join(
        ROOT, "docs/img", "coordinator_machine.png" if args.machine else "coordinator_sim.png")
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "drizzle-server"], cwd=ROOT, check=True)
    workers = [int(w) for w in workers.split(",")]
    configs = [("drizzle", 10), ("drizzle", 100), ("bsp", 1)]
    print(MACHINE_HEADER if args.machine else SIM_HEADER)
    cost = {}
    for w in workers:
        for sched, g in configs:
            if sched == "bsp" and w > bsp_max:
                continue
            line, c = run(args, w, sched, g)
            print(line, flush=True)
            cost[(sched, g, w)] = c
    plot(args, workers, configs, cost, png)


if __name__ == "__main__":
    main()
