#!/usr/bin/env bash
# Stops the etcd cluster that start-cluster.sh started in DIR.
#
#   benches/etcd/stop-cluster.sh DIR
#
# Sends SIGTERM to the pids stored in DIR (only those that still are an etcd
# started on DIR's data directories), waits up to 10 s, then SIGKILLs what
# is left, and removes the pid files. Data and logs stay in DIR until the
# next start-cluster.sh. Stopping a stopped cluster does nothing.

set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 1; }
[ -d "$1" ] || exit 0
DIR=$(cd "$1" && pwd)

pids=()
for pidf in "$DIR"/m?.pid; do
    [ -f "$pidf" ] || continue
    name=$(basename "$pidf" .pid)
    pid=$(cat "$pidf")
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] &&
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--data-dir $DIR/$name.etcd "; then
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    fi
    rm -f "$pidf"
done

for _ in $(seq 100); do
    alive=()
    for pid in "${pids[@]}"; do
        [ -e "/proc/$pid" ] && alive+=("$pid")
    done
    [ ${#alive[@]} -eq 0 ] && break
    sleep 0.1
done
for pid in "${alive[@]}"; do
    echo "stop-cluster: pid $pid did not stop after 10s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
done
[ ${#pids[@]} -eq 0 ] || echo "stop-cluster: stopped ${#pids[@]} member(s) of $DIR" >&2
