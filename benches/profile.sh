#!/usr/bin/env bash
# Flame graphs of the put path: a one-region nines (three AZs, no simulated
# latency) under nines-bench puts from 1 and from 64 clients, the leader
# sampled by perf (cpu-clock, DWARF call graphs), folded and drawn by
# inferno. Writes benches/flamegraphs/put-1-LABEL.svg and put-64-LABEL.svg.
#
#   bash benches/profile.sh LABEL      # e.g. before / after; about 2 minutes
#
# Needs perf (Debian's linux-perf) and inferno (cargo install inferno).
# Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
label="${1:?usage: bash benches/profile.sh LABEL}"
[[ $label =~ ^[A-Za-z0-9_-]+$ ]] || { echo "LABEL must be letters, digits, - or _: $label" >&2; exit 2; }
for tool in perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (perf: apt-get install linux-perf; inferno: cargo install inferno)" >&2; exit 1; }
done
cargo build --release -q -p nines -p nines-bench
source benches/nines-up.sh
start_nines_alone 27101 28101 29101
work="$WORK"
eps="http://127.0.0.1:27101,http://127.0.0.1:27102,http://127.0.0.1:27103"
leader=$(./target/release/nines --endpoints "$eps" -w json member list | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"])')
pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$work/nines/node-$leader/addrs.json")
mkdir -p benches/flamegraphs
for clients in 1 64; do
  ./target/release/nines-bench --target nines --endpoints "$eps" --clients "$clients" --keys 10000 --value-size 128 \
    --duration 12s --warmup 1s >"$work/bench-$clients.txt" &
  bench=$!
  sleep 3
  perf record -e cpu-clock -F 199 --call-graph dwarf,16384 -p "$pid" -o "$work/perf-$clients.data" -- sleep 6 2>/dev/null
  wait "$bench"
  perf script -i "$work/perf-$clients.data" 2>/dev/null | inferno-collapse-perf >"$work/folded-$clients.txt"
  inferno-flamegraph --title "nines leader, put from $clients client(s), $label" <"$work/folded-$clients.txt" \
    >"benches/flamegraphs/put-$clients-$label.svg"
  echo "put from $clients client(s): $(tail -1 "$work/bench-$clients.txt")"
  echo "  -> benches/flamegraphs/put-$clients-$label.svg"
done
