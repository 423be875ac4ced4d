#!/usr/bin/env bash
# YSB-lite sweep: offered rates × batch intervals, one process per run (so peak
# RSS is per run). Prints a Markdown table. Uses a release build.
#   benches/ysb.sh [seconds] [rates...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-45}
shift || true
rates=${*:-"100000 1000000 5000000 10000000 20000000"}
cargo build --release -q -p drizzle-server
bin=target/release/drizzle
first=1
for interval in 10ms 100ms; do
  for rate in $rates; do
    if [ $first = 1 ]; then
      $bin bench ysb --rate "$rate" --seconds "$seconds" --batch-interval "$interval" --header
      first=0
    else
      $bin bench ysb --rate "$rate" --seconds "$seconds" --batch-interval "$interval"
    fi
  done
done
