# Sourced by run.sh, profile.sh and steady.sh (not run on its own).
#
# start_nines WORK GRPC_BASE ADMIN_BASE PEER_BASE: starts a one-region nines (three
# AZs, simulated latency off) with `nines up` in the background, its data in
# WORK/nines and its output in WORK/up.log; sets NINES_UP_PID at once (for
# the caller's cleanup) and returns once it printed its leader, or fails
# after 60 s with that output.
start_nines() {
  ./target/release/nines up --regions 1 --azs 3 --no-latency --grpc-port-base "$2" --admin-port-base "$3" \
    --peer-port-base "$4" \
    --data-dir "$1/nines" >"$1/up.log" 2>&1 &
  NINES_UP_PID=$!
  for _ in $(seq 1 600); do
    grep -q "leader: node" "$1/up.log" 2>/dev/null && return 0
    sleep 0.1
  done
  cat "$1/up.log"
  echo "nines did not start" >&2
  return 1
}

# start_nines_alone GRPC_BASE ADMIN_BASE PEER_BASE: for a script that runs
# nines alone: a work directory (WORK) removed at exit, after the nines
# started here is stopped; then start_nines in it.
start_nines_alone() {
  WORK="$(mktemp -d)"
  NINES_UP_PID=""
  trap 'stop_nines_alone' EXIT
  start_nines "$WORK" "$1" "$2" "$3"
}
stop_nines_alone() {
  [[ -n $NINES_UP_PID ]] && kill "$NINES_UP_PID" 2>/dev/null && wait "$NINES_UP_PID" 2>/dev/null
  rm -rf "$WORK"
}
