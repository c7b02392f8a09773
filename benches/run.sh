#!/usr/bin/env bash
# Side-by-side benchmark: a three-member etcd cluster and a three-node nines
# region (three AZs, simulated latency off) on loopback, data on the same
# disk, driven by the same load generator. Writes benches/results.md and
# the results table of benches/README.md.
#
#   bash benches/run.sh            # about 20 minutes; BENCH_DURATION=30s for longer runs
#
# Rows: puts and linearizable gets of 128-byte values at 1/16/64/256
# clients, a 90/10 mix, 16 KiB values, an open loop at 70% of etcd's put
# capacity, each with CPU time per operation and resident memory; then
# leader failover over BENCH_KILLS (20) kill -9s of each system's leader;
# last, nines' cross-region lag (two regions, `nines up`'s 40 ms one way)
# at 200 and 1,000 writes/s (etcd has no cross-region replication to compare).
# Installs etcd from Debian when it is missing. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${BENCH_DURATION:-10s}"
warmup="${BENCH_WARMUP:-2s}"
kills="${BENCH_KILLS:-20}"
if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
cargo build --release -q -p nines -p nines-bench
# The lag rows' measurement, built now rather than beside running clusters;
# its binary is run by path at the end, so editing the sources meanwhile
# changes nothing in this run.
measure_bin=$(cargo test --release -q -p nines --test measure --no-run --message-format=json | python3 -c '
import json, sys
print([a["executable"] for a in map(json.loads, sys.stdin)
       if a.get("reason") == "compiler-artifact" and a.get("executable") and a["target"]["name"] == "measure"][-1])')
source benches/nines-up.sh
work="$(mktemp -d)"
pids=()
NINES_UP_PID=""
cleanup() {
  # What this script started, and the members failover.py restarted.
  [[ -n $NINES_UP_PID ]] && pids+=("$NINES_UP_PID")
  for f in "$work"/*.pid; do [[ -f $f ]] && pids+=("$(cat "$f")"); done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  # Members failover.py restarted are not this shell's children: wait
  # (bounded) until they are gone before removing their data.
  for _ in $(seq 1 100); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  rm -rf "$work"
}
trap cleanup EXIT

# etcd: members e1..e3, clients on 23791-23793, peers on 23801-23803. Each
# member's command is kept so failover.py can restart it after a kill.
cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
  cat >"$work/etcd$i.cmd" <<EOF
exec etcd --name e$i --data-dir "$work/etcd$i" \
  --listen-client-urls http://127.0.0.1:2379$i --advertise-client-urls http://127.0.0.1:2379$i \
  --listen-peer-urls http://127.0.0.1:2380$i --initial-advertise-peer-urls http://127.0.0.1:2380$i \
  --initial-cluster "$cluster" --initial-cluster-state new --log-level error >>"$work/etcd$i.log" 2>&1
EOF
  bash "$work/etcd$i.cmd" &
  echo "$!" >"$work/etcd$i.pid"
done

start_nines "$work" 27001 28001 29001
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:23791 endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done

nines_eps="http://127.0.0.1:27001,http://127.0.0.1:27002,http://127.0.0.1:27003"
etcd_eps="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
eps() { [[ $1 == nines ]] && echo "$nines_eps" || echo "$etcd_eps"; }
# The processes of a system (read again each time: failover restarts them).
system_pids() {
  if [[ $1 == nines ]]; then
    for f in "$work"/nines/node-*/addrs.json; do python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f"; done
  else
    # The etcd process is the exec'd shell of each etcdN.cmd.
    cat "$work"/etcd[123].pid
  fi
}
cpu_seconds() { # pids...: user + system CPU seconds of them all
  local ticks=0
  for p in "$@"; do
    ticks=$(( ticks + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) ))
  done
  python3 -c "import os,sys; print(int(sys.argv[1]) / os.sysconf('SC_CLK_TCK'))" "$ticks"
}
memory_mib() { # field pids...: the sum of a /proc status field (VmRSS, VmHWM) over the pids, MiB
  local field=$1 kb=0
  shift
  for p in "$@"; do
    kb=$(( kb + $(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo $(( kb / 1024 ))
}

results="$work/results.jsonl"
# measure ROW SYSTEM CLIENTS READ_RATIO [nines-bench flags...]: one run,
# with the system's CPU time over it (warm-up included, divided by every
# operation answered) and its memory after it.
measure() {
  local row=$1 t=$2 c=$3 r=$4
  shift 4
  echo "$row: $t, $c clients" >&2
  local ps cpu0 cpu1 report
  ps=($(system_pids "$t"))
  cpu0=$(cpu_seconds "${ps[@]}")
  report=$(./target/release/nines-bench --target "$t" --endpoints "$(eps "$t")" --clients "$c" --read-ratio "$r" \
    --keys 10000 --value-size 128 --duration "$duration" --warmup "$warmup" --json "$@")
  cpu1=$(cpu_seconds "${ps[@]}")
  echo "{\"row\":\"$row\",\"cpu_s\":$(python3 -c "print($cpu1 - $cpu0)"),\"rss_mib\":$(memory_mib VmRSS "${ps[@]}"),\"report\":$report}" >>"$results"
}
preload() { # SYSTEM [nines-bench flags...]: write every key once, not measured
  ./target/release/nines-bench --target "$1" --endpoints "$(eps "$1")" --clients 64 --keys 10000 --value-size 128 \
    --duration 1s --warmup 0s --preload-only "${@:2}"
}

for c in 1 16 64 256; do
  for t in nines etcd; do measure put "$t" "$c" 0; done
done
for t in nines etcd; do preload "$t"; done
for c in 1 16 64 256; do
  for t in nines etcd; do measure get "$t" "$c" 1; done
done
for t in nines etcd; do measure "mix 90/10" "$t" 64 0.9; done
# 16 KiB values over 1,000 keys.
for c in 16 64; do
  for t in nines etcd; do measure "put 16 KiB" "$t" "$c" 0 --value-size 16384 --keys 1000; done
done
for t in nines etcd; do preload "$t" --value-size 16384 --keys 1000; done
for c in 16 64; do
  for t in nines etcd; do measure "get 16 KiB" "$t" "$c" 1 --value-size 16384 --keys 1000; done
done
# Open loop at 70% of the highest put rate etcd reached above.
rate=$(python3 - "$results" <<'PY'
import json, sys
best = max(r["report"]["ops_per_sec"] for r in map(json.loads, open(sys.argv[1]))
           if r["row"] == "put" and r["report"]["target"] == "etcd")
print(round(best * 0.7))
PY
)
for t in nines etcd; do measure "put open loop" "$t" 256 0 --rate "$rate"; done
nines_peak=$(memory_mib VmHWM $(system_pids nines))
etcd_peak=$(memory_mib VmHWM $(system_pids etcd))

# Leader failover, last: it kills and restarts members.
failover="$work/failover.jsonl"
python3 benches/failover.py --system nines --endpoints "$nines_eps" --work "$work" --kills "$kills" >>"$failover"
python3 benches/failover.py --system etcd --endpoints "$etcd_eps" --work "$work" --kills "$kills" >>"$failover"

# Cross-region lag: its own two-region cluster (crates/nines/tests/measure.rs).
lag="$work/lag.jsonl"
: >"$lag"
for rate in 200 1000; do
  echo "cross-region lag: $rate writes/s" >&2
  # Run where cargo test would run it: the package's directory.
  (cd crates/nines && NINES_LAG_RATE=$rate NINES_LAG_OUT="$lag" "$measure_bin" measure_replication_lag \
    --ignored --nocapture) >"$work/lag-$rate.log" 2>&1
done

python3 - "$results" "$failover" "$nines_peak" "$etcd_peak" "$duration" "$lag" >benches/results.md <<'PY'
import json, sys, os, datetime, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
lag = [json.loads(l) for l in open(sys.argv[6])]
failover = {f["system"]: f for f in map(json.loads, open(sys.argv[2]))}
nines_peak, etcd_peak, duration = sys.argv[3], sys.argv[4], sys.argv[5]
by = {}
order = []
for r in rows:
    rep = r["report"]
    k = (r["row"], rep["workload"]["clients"])
    if k not in order:
        order.append(k)
    by[k + (rep["target"],)] = r
labels = {"put": "put", "get": "linearizable get", "mix 90/10": "90% get / 10% put",
          "put 16 KiB": "put, 16 KiB values", "get 16 KiB": "linearizable get, 16 KiB values"}
print(f"Measured {datetime.date.today()} on {os.cpu_count()} cores, "
      f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB; "
      f"{duration} per run after a warm-up; 10,000 keys of 128-byte values unless the row says otherwise; "
      "loopback, one disk. CPU is the three members' user + system time over the run (warm-up included) "
      "per operation answered; memory is the three members' resident set after the run.\n")
print("| workload | clients | nines ops/s | etcd ops/s | nines/etcd | nines p50 / p99 ms | etcd p50 / p99 ms "
      "| CPU per op nines / etcd (µs) | memory nines / etcd (MiB) | errors nines / etcd |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (row, clients) in order:
    n, e = by[(row, clients, "nines")], by[(row, clients, "etcd")]
    nr, er = n["report"], e["report"]
    if row == "put open loop":
        label = f"put, open loop at {nr['workload']['rate']:.0f}/s (70% of etcd's best put rate)"
    else:
        label = labels[row]
    cpu = lambda x: x["cpu_s"] / max(x["report"]["ops_total"], 1) * 1e6
    print(f"| {label} | {clients} | {nr['ops_per_sec']:.0f} | {er['ops_per_sec']:.0f} | "
          f"{nr['ops_per_sec'] / er['ops_per_sec']:.2f} | {nr['p50_ms']:.2f} / {nr['p99_ms']:.2f} | "
          f"{er['p50_ms']:.2f} / {er['p99_ms']:.2f} | {cpu(n):.0f} / {cpu(e):.0f} | {n['rss_mib']} / {e['rss_mib']} | "
          f"{nr['errors']} / {er['errors']} |")
print(f"\nPeak resident memory over the runs above (sum of the three members): nines {nines_peak} MiB, "
      f"etcd {etcd_peak} MiB. Errors across all runs: {sum(r['report']['errors'] for r in rows)}.\n")
failed = [r for r in rows if r["report"]["errors"]]
if failed:
    print("The first error of each run that had any:\n")
    for r in failed:
        rep = r["report"]
        print(f"- {r['row']}, {rep['target']}, {rep['workload']['clients']} clients: {rep['errors']} errors, "
              f"first: `{rep.get('first_error') or 'not recorded'}`")
    print()
print("Leader failover: kill -9 of the leader under one writer, time to the acknowledgement of the first "
      "write sent after the kill (`benches/failover.py`):\n")
print("| system | kills | median s | worst s | every sample, s |")
print("|---|---:|---:|---:|---|")
for name in ("nines", "etcd"):
    f = failover[name]
    print(f"| {name} | {len(f['samples'])} | {f['median']:.3f} | {f['max']:.3f} | "
          f"{', '.join(f'{s:.2f}' for s in sorted(f['samples']))} |")
print("\nCross-region lag, nines only: two regions of three nodes, 40 ms one way between them (`nines up`'s "
      "simulated latency), a steady write rate in the first for 20 s. Visible: from a write's acknowledgement "
      "to its first local read in the other region (400 writes spread over the run); reported: the lag the "
      "first region reports (age of its oldest write the other has not applied), sampled every 20 ms. "
      "The benchmark's etcd and nines clusters sit idle beside it. "
      "Goal: visible p99 within one-way latency + 20 ms = 60 ms.\n")
print("| writes/s | visible p50 / p99 / max ms | reported p50 / p99 / max ms |")
print("|---:|---:|---:|")
for l in lag:
    v, r = l["visible"], l["reported"]
    print(f"| {l['rate']:,} | {v['p50_ms']:.1f} / {v['p99_ms']:.1f} / {v['max_ms']:.1f} | "
          f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} / {r['max_ms']:.0f} |")
PY
# The same table in benches/README.md, between its markers.
python3 - <<'PY'
import re
readme = open("benches/README.md").read()
table = open("benches/results.md").read().strip()
begin, end = "<!-- results: begin -->", "<!-- results: end -->"
if begin in readme and end in readme:
    readme = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{table}\n{end}", readme, flags=re.S)
    open("benches/README.md", "w").write(readme)
PY
cat benches/results.md
