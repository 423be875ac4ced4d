#!/usr/bin/env python3
"""Recovery timeline: YSB-lite on the server plus 3 `drizzle worker`
processes; one worker is killed with SIGKILL mid-run. Runs the same scenario
with both recovery modes:

* lost-work (the default): the survivors keep their partitions, state and
  retained map outputs; only the dead worker's partitions are restored from
  the last checkpoint, on the survivors, and replay the batches since;
* rollback: every partition of the query restarts from the last checkpoint.

Plots per-batch latency (emit minus trigger) and the adaptive group size
against time since the kill for both, and prints what `drizzle bench
recovery` reports for each: steady state, peak after the kill, time until
latency is back within 1.5x of steady state.

Not a test: it prints figures and writes docs/img/recovery.png.
Needs matplotlib (pip install matplotlib) and a release build of `drizzle`.

    benches/recovery.py [--bin target/release/drizzle] [--rate 1000000]
                        [--interval 10ms] [--kill-after 10] [--seconds 10]
"""
import argparse
import csv
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["lost-work", "rollback"]


def run(args, mode):
    timeline = os.path.join(tempfile.mkdtemp(), f"timeline-{mode}.csv")
    cmd = [args.bin, "bench", "recovery", "--remote-workers", str(args.workers),
           "--rate", str(int(args.rate)), "--batch-interval", args.interval,
           "--group-size", "0", "--window-seconds", "1", "--recovery", mode,
           "--kill-after", str(args.kill_after), "--seconds", str(args.seconds),
           "--timeline", timeline]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "RUST_LOG": "error"}).stdout.strip()
    print(f"{mode:>9}: rate {int(args.rate)} ev/s, {args.interval} batches, "
          f"{args.workers} workers, kill after {args.kill_after} s: {out}", flush=True)
    rows = list(csv.DictReader(open(timeline)))
    return ([float(r["seconds_since_kill"]) for r in rows],
            [float(r["batch_latency_ms"]) for r in rows],
            [int(r["group_size"]) for r in rows])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "drizzle"))
    ap.add_argument("--rate", type=float, default=1000000)
    ap.add_argument("--interval", default="10ms")
    ap.add_argument("--kill-after", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "recovery.png"))
    args = ap.parse_args()
    runs = {mode: run(args, mode) for mode in MODES}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    for mode, (t, lat, _) in runs.items():
        ax1.plot(t, lat, ".", markersize=2.5, label=f"{mode} recovery")
    ax1.axvline(0, color="red", linestyle="--", label="worker killed (SIGKILL)")
    ax1.set_yscale("log")
    ax1.set_ylabel("batch latency, ms (emit - trigger)")
    ax1.set_title(f"YSB-lite, {int(args.rate):,} ev/s, {args.interval} batches, "
                  f"server + {args.workers} workers: recovery timeline")
    ax1.legend(markerscale=4)
    for mode, (t, _, g) in runs.items():
        ax2.step(t, g, where="post", label=mode)
    ax2.axvline(0, color="red", linestyle="--")
    ax2.set_ylabel("group size G (auto)")
    ax2.set_xlabel("seconds since the kill")
    ax2.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
