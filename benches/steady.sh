#!/usr/bin/env bash
# A long loaded run with no election allowed: a one-region nines (three
# AZs, simulated latency off) under 256 closed-loop put clients for
# STEADY_DURATION (10m), both cores busy; then every node's
# nines_raft_leader_changes_seen_total and term. Fails when any node saw a
# leader change after the first election.
#
#   bash benches/steady.sh          # about 11 minutes; STEADY_DURATION=2m for a shorter run
#
# Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${STEADY_DURATION:-10m}"
[[ $duration =~ ^[0-9]+[sm]$ ]] || { echo "STEADY_DURATION must be like 90s or 10m: $duration" >&2; exit 2; }
cargo build --release -q -p nines -p nines-bench
source benches/nines-up.sh
start_nines_alone 27201 28201 29201
work="$WORK"
eps="http://127.0.0.1:27201,http://127.0.0.1:27202,http://127.0.0.1:27203"
metric() { # NODE NAME: the value of a metric on a node's admin port
  { curl -s --max-time 5 "http://127.0.0.1:$((28200 + $1))/metrics" || true; } | awk -v m="$2" '$1 == m {print $2}'
}
# Each node's count once it reports one (the daemon samples Raft's
# metrics about once a second after it starts).
before=()
terms=()
for n in 1 2 3; do
  count=""
  for _ in $(seq 1 100); do
    count=$(metric "$n" nines_raft_leader_changes_seen_total)
    [[ -n $count ]] && break
    sleep 0.1
  done
  [[ -n $count ]] || { echo "node $n reports no nines_raft_leader_changes_seen_total" >&2; exit 1; }
  before+=("$count")
  terms+=("$(metric "$n" nines_raft_term)")
done
echo "256 put clients for $duration; leader changes seen at the start: ${before[*]}" >&2
./target/release/nines-bench --target nines --endpoints "$eps" --clients 256 --keys 10000 --value-size 128 \
  --duration "$duration" --warmup 0s
# The nodes sample Raft's metrics about once a second: the last second's
# changes show after it.
sleep 1.5
changed=0
for n in 1 2 3; do
  after=$(metric "$n" nines_raft_leader_changes_seen_total)
  term=$(metric "$n" nines_raft_term)
  echo "node $n: leader changes seen ${before[$((n - 1))]} -> $after, term ${terms[$((n - 1))]} -> $term"
  [[ $after == "${before[$((n - 1))]}" && $term == "${terms[$((n - 1))]}" ]] || changed=1
done
if (( changed )); then
  echo "a leader changed under load" >&2
  exit 1
fi
echo "no leader change in $duration"
