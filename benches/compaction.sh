#!/usr/bin/env bash
# The tail of an open loop while every node compacts a large log: a
# one-region nines (three AZs, simulated latency off), 10 s of 16 KiB puts
# from 64 clients (about 700 MB of log per node), then an open loop of
# RATE puts/s (128-byte values) from 256 clients for 20 s, latency counted
# from each request's intended send time. Prints the open loop's row, each
# node's slowest log flushes and durable state commits, and its leader
# changes (the first election counts one).
#
#   bash benches/compaction.sh [RATE]     # RATE defaults to 10000; about 1.5 minutes
#
# Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:-10000}"
[[ $rate =~ ^[0-9]+$ ]] && (( rate > 0 && rate <= 100000 )) || { echo "RATE must be 1..100000 puts/s: $rate" >&2; exit 2; }
cargo build --release -q -p nines -p nines-bench
source benches/nines-up.sh
start_nines_alone 27301 28301 29301
eps="http://127.0.0.1:27301,http://127.0.0.1:27302,http://127.0.0.1:27303"
bench() { ./target/release/nines-bench --target nines --endpoints "$eps" "$@"; }
bench --clients 64 --keys 10000 --value-size 128 --duration 1s --warmup 0s --preload-only >/dev/null
bench --clients 64 --keys 1000 --value-size 16384 --duration 1s --warmup 0s --preload-only >/dev/null
echo "16 KiB puts, 64 clients, 10 s:" >&2
bench --clients 64 --keys 1000 --value-size 16384 --duration 10s --warmup 0s
echo "open loop at $rate puts/s, 256 clients, 20 s:" >&2
bench --clients 256 --keys 10000 --value-size 128 --duration 20s --warmup 2s --rate "$rate"
for n in 1 2 3; do
  echo "node $n (cumulative counts of the slowest buckets):"
  { curl -s --max-time 5 "http://127.0.0.1:$((28300 + n))/metrics" || true; } |
    grep -E '^nines_log_fsync_duration_seconds_(bucket|count)|^nines_state_commit_duration_seconds_(bucket|count)\{durable="true"|^nines_raft_leader_changes_seen_total' |
    grep -E 'le="(0.05|0.1|0.25|0.5)"|_count|leader_changes' || true
done
