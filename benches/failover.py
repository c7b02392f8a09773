#!/usr/bin/env python3
"""Leader failover, measured the same way for nines and etcd (run by run.sh).

A single writer (nines-bench, one client) puts keys for the whole run and
logs every acknowledgement. Each round: a second of steady writes, kill -9
of the current leader, wait for another leader, restart the killed member,
two seconds to settle. A round's failover time is from the kill to the
acknowledgement of the first write sent after it. Prints one JSON object:
{"system", "samples": [seconds...], "median", "max"}.

Every wait is bounded; the writer and the members this script restarts are
left running for run.sh's cleanup, whose pid files it updates.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROUND_WAIT_MAX = 30.0  # seconds a round may wait for a new leader


def run(cmd, **kw):
    """A command's result, or None when it did not finish within 10 s."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, **kw)
    except subprocess.TimeoutExpired:
        return None


def leader_nines(args):
    """(leader id, pid) of the nines region, or None."""
    out = run([args.nines, "--endpoints", args.endpoints, "-w", "json", "member", "list"])
    if out is None or out.returncode != 0:
        return None
    leader = json.loads(out.stdout).get("leader_id")
    if not leader:
        return None
    with open(os.path.join(args.work, "nines", f"node-{leader}", "addrs.json")) as f:
        return leader, json.load(f)["pid"]


def leader_etcd(args):
    """(leader member index, pid) of the etcd cluster, or None."""
    out = run(["etcdctl", "--endpoints", args.endpoints, "--command-timeout=1s", "-w", "json", "endpoint", "status"],
              env={**os.environ, "ETCDCTL_API": "3"})
    if out is None:
        return None
    # Members that are down make etcdctl exit non-zero; the others still print.
    try:
        statuses = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return None
    for s in statuses:
        st = s.get("Status", {})
        if st.get("leader") and st.get("header", {}).get("member_id") == st.get("leader"):
            i = int(s["Endpoint"].rsplit(":", 1)[1]) - 23790  # clients on 23791..23793
            with open(os.path.join(args.work, f"etcd{i}.pid")) as f:
                return i, int(f.read())
    return None


def restart(args, member):
    """Starts a killed member again, as run.sh started it; records its pid."""
    if args.system == "nines":
        d = os.path.join(args.work, "nines", f"node-{member}")
        log = open(os.path.join(d, "node.log"), "a")
        p = subprocess.Popen([args.nines, "node", "--config", os.path.join(d, "nines.toml")],
                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        pid_file = os.path.join(args.work, f"restarted-nines-{member}.pid")
    else:
        p = subprocess.Popen(["bash", os.path.join(args.work, f"etcd{member}.cmd")],
                             stdin=subprocess.DEVNULL)
        pid_file = os.path.join(args.work, f"etcd{member}.pid")
    with open(pid_file, "w") as f:
        f.write(str(p.pid))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=["nines", "etcd"], required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--nines", default="./target/release/nines")
    ap.add_argument("--bench", default="./target/release/nines-bench")
    args = ap.parse_args()
    if not 1 <= args.kills <= 200:
        sys.exit("--kills must be in 1..=200")
    find = leader_nines if args.system == "nines" else leader_etcd
    ack_log = os.path.join(args.work, f"acks-{args.system}.log")
    writer = subprocess.Popen(
        [args.bench, "--target", args.system, "--endpoints", args.endpoints, "--clients", "1",
         "--keys", "1000", "--duration", f"{args.kills * 10 + 30}s", "--warmup", "0s", "--ack-log", ack_log],
        stdout=subprocess.DEVNULL)
    kills = []
    try:
        for round_ in range(args.kills):
            time.sleep(1.0)
            deadline = time.time() + ROUND_WAIT_MAX
            leader = None
            while leader is None and time.time() < deadline:
                leader = find(args)
                if leader is None:
                    time.sleep(0.1)
            if leader is None:
                sys.exit(f"{args.system}: no leader before round {round_}")
            member, pid = leader
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            kills.append(killed_at)
            while time.time() < deadline:
                now = find(args)
                if now is not None and now[0] != member:
                    break
                time.sleep(0.05)
            else:
                sys.exit(f"{args.system}: no new leader within {ROUND_WAIT_MAX}s of round {round_}'s kill")
            restart(args, member)
            time.sleep(2.0)
            print(f"{args.system} failover round {round_ + 1}/{args.kills} done", file=sys.stderr)
        time.sleep(1.0)
    finally:
        writer.terminate()
        writer.wait(timeout=10)
    acks = []
    with open(ack_log) as f:
        for line in f:
            sent, acked = line.split()
            acks.append((float(sent), float(acked)))
    samples = []
    for k in kills:
        after = [acked for sent, acked in acks if sent >= k]
        if not after:
            sys.exit(f"{args.system}: no write was acknowledged after the kill at {k}")
        samples.append(min(after) - k)
    print(json.dumps({"system": args.system, "samples": samples,
                      "median": statistics.median(samples), "max": max(samples)}))


if __name__ == "__main__":
    main()
