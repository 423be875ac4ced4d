#!/usr/bin/env python3
"""The adaptive group size under changing load: `drizzle bench adaptive`
runs a windowed aggregate with `group_size = 'auto'` on the server plus
`drizzle worker` processes while the benchmark feeds the stream at a rate
that changes by phases (low, high, low). Plots the offered rate, the group
size G, the coordination share and the batch latency against time, and
prints the per-phase summary.

Not a test: it prints figures and writes docs/img/adaptive.png.
Needs matplotlib (pip install matplotlib) and a release build of `drizzle`.

    benches/adaptive.py [--bin target/release/drizzle] [--interval 10ms]
                        [--phases 10s@20000,10s@1000000,15s@20000] [--workers 3]
"""
import argparse
import csv
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "drizzle"))
    ap.add_argument("--interval", default="10ms")
    ap.add_argument("--phases", default="10s@20000,10s@1000000,15s@20000")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "adaptive.png"))
    args = ap.parse_args()
    timeline = os.path.join(tempfile.mkdtemp(), "adaptive.csv")
    cmd = [args.bin, "bench", "adaptive", "--remote-workers", str(args.workers),
           "--batch-interval", args.interval, "--phases", args.phases,
           "--timeline", timeline]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "RUST_LOG": "error"}).stdout.strip()
    print(f"{args.interval} batches, {args.workers} workers, phases {args.phases}:\n  "
          + out.replace(" | ", "\n  "))
    rows = list(csv.DictReader(open(timeline)))
    t = [float(r["seconds"]) for r in rows]
    col = lambda name: [float(r[name]) for r in rows]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(9, 8), sharex=True)
    axes[0].step(t, [x / 1e6 for x in col("offered_rows_per_s")], where="post", label="offered")
    axes[0].plot(t, [x / 1e6 for x in col("rows_in_per_s")], ".", markersize=2, label="read")
    axes[0].set_ylabel("M rows/s")
    axes[0].legend()
    axes[0].set_title(f"Adaptive group size, {args.interval} batches, server + {args.workers} workers")
    axes[1].step(t, col("group_size"), where="post")
    axes[1].set_ylabel("group size G")
    axes[2].plot(t, [100 * x for x in col("coordination_share")], ".", markersize=2)
    axes[2].axhline(5, color="gray", linestyle="--", linewidth=0.8, label="upper bound 5%")
    axes[2].axhline(2, color="gray", linestyle=":", linewidth=0.8, label="lower bound 2%")
    axes[2].set_ylabel("coordination, %")
    axes[2].legend(fontsize=8)
    axes[3].plot(t, col("batch_p50_ms"), ".", markersize=2)
    axes[3].set_yscale("log")
    axes[3].set_ylabel("batch p50, ms")
    axes[3].set_xlabel("seconds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
