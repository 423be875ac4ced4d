#!/usr/bin/env bash
# Nexmark on the embedded engine: throughput over a backlog of events for
# every query Drizzle runs, then live latency for the windowed ones.
# Usage: benches/nexmark.sh [events] (default 10,000,000). Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-10000000}
cargo build --release -q -p drizzle-server
BIN=target/release/drizzle
QUERIES="q0 q1 q2 q3 q4 q5 q7 q8 q9 q10 q11 q12 q13 q14 q15 q16 q17 q18 q19 q20 q21 q22"
first=--header
for q in $QUERIES; do
  $BIN bench nexmark --query "$q" --events "$EVENTS" --batch-interval 100ms $first
  first=
done
echo
first=--header
for q in q5 q7 q8; do
  $BIN bench nexmark --query "$q" --rate 1000000 --seconds 30 --batch-interval 10ms $first
  first=
done
