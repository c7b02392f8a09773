#!/usr/bin/env bash
# Side-by-side benchmark: a three-member etcd cluster and a three-node nines
# region (three AZs, simulated latency off) on loopback, data on the same
# disk, driven by the same load generator. Writes benches/results.md.
#
#   bash benches/run.sh            # about 4 minutes; BENCH_DURATION=30s for longer runs
#
# Installs etcd from Debian when it is missing. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${BENCH_DURATION:-10s}"
warmup="${BENCH_WARMUP:-2s}"
if ! command -v etcd >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
cargo build --release -q -p nines -p nines-bench
work="$(mktemp -d)"
pids=()
etcd_pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# etcd: members e1..e3, clients on 23791-23793, peers on 23801-23803.
cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$work/etcd$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --log-level error >"$work/etcd$i.log" 2>&1 &
  pids+=("$!")
  etcd_pids+=("$!")
done

# nines: one region, three AZs, no simulated latency.
./target/release/nines up --regions 1 --azs 3 --no-latency --grpc-port-base 27001 --admin-port-base 28001 \
  --data-dir "$work/nines" >"$work/up.log" 2>&1 &
pids+=("$!")
for _ in $(seq 1 600); do
  grep -q "leader: node" "$work/up.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "leader: node" "$work/up.log" || { cat "$work/up.log"; echo "nines did not start" >&2; exit 1; }
nines_pids=($(grep -E 'http://127.0.0.1:2700[1-3]' "$work/up.log" | awk '{print $NF}'))
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:23791 endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done

nines_eps="http://127.0.0.1:27001,http://127.0.0.1:27002,http://127.0.0.1:27003"
etcd_eps="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
bench() { # target endpoints clients read_ratio [--preload]
  ./target/release/nines-bench --target "$1" --endpoints "$2" --clients "$3" --read-ratio "$4" \
    --keys 10000 --value-size 128 --duration "$duration" --warmup "$warmup" --json "${@:5}"
}
peak_rss_mib() { # pids...: the largest VmHWM among them, in MiB
  local max=0
  for p in "$@"; do
    local kb
    kb=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    (( kb > max )) && max=$kb
  done
  echo $(( max / 1024 ))
}

results="$work/results.jsonl"
for c in 1 16 64 256; do
  for t in nines etcd; do
    eps=$([[ $t == nines ]] && echo "$nines_eps" || echo "$etcd_eps")
    echo "put $t $c clients" >&2
    echo "{\"row\":\"put\",\"report\":$(bench $t "$eps" $c 0)}" >>"$results"
  done
done
nines_mib=$(peak_rss_mib "${nines_pids[@]}")
etcd_mib=$(peak_rss_mib "${etcd_pids[@]}")
first=1
for c in 1 16 64 256; do
  for t in nines etcd; do
    eps=$([[ $t == nines ]] && echo "$nines_eps" || echo "$etcd_eps")
    extra=()
    [[ $first == 1 ]] && extra=(--preload)
    echo "get $t $c clients" >&2
    echo "{\"row\":\"get\",\"report\":$(bench $t "$eps" $c 1 "${extra[@]}")}" >>"$results"
  done
  first=0
done
for t in nines etcd; do
  eps=$([[ $t == nines ]] && echo "$nines_eps" || echo "$etcd_eps")
  echo "mix $t 64 clients" >&2
  echo "{\"row\":\"mix 90/10\",\"report\":$(bench $t "$eps" 64 0.9)}" >>"$results"
done

python3 - "$results" "$nines_mib" "$etcd_mib" "$duration" >benches/results.md <<'PY'
import json, sys, os, datetime
rows = [json.loads(l) for l in open(sys.argv[1])]
nines_mib, etcd_mib, duration = sys.argv[2], sys.argv[3], sys.argv[4]
by = {}
for r in rows:
    rep = r["report"]
    by[(r["row"], rep["workload"]["clients"], rep["target"])] = rep
print(f"Measured {datetime.date.today()} on {os.cpu_count()} cores, "
      f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB; "
      f"{duration} per run after a warm-up; 10,000 keys, 128-byte values; loopback, one disk.\n")
print("| workload | clients | nines ops/s | etcd ops/s | nines/etcd | nines p50 / p99 ms | etcd p50 / p99 ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
for (row, clients, target) in sorted({(k[0], k[1], None) for k in by}, key=lambda k: (["put", "get", "mix 90/10"].index(k[0]), k[1])):
    n, e = by[(row, clients, "nines")], by[(row, clients, "etcd")]
    label = {"put": "put", "get": "linearizable get", "mix 90/10": "90% get / 10% put"}[row]
    print(f"| {label} | {clients} | {n['ops_per_sec']:.0f} | {e['ops_per_sec']:.0f} | {n['ops_per_sec']/e['ops_per_sec']:.2f} | "
          f"{n['p50_ms']:.2f} / {n['p99_ms']:.2f} | {e['p50_ms']:.2f} / {e['p99_ms']:.2f} |")
print(f"\nPeak resident memory after the 256-client put run (largest member): nines {nines_mib} MiB, etcd {etcd_mib} MiB.")
errors = sum(r["report"]["errors"] for r in rows)
print(f"Errors across all runs: {errors}.")
PY
cat benches/results.md
