#!/usr/bin/env bash
# Starts a local 3-member etcd cluster for the replog-vs-etcd benchmark.
#
#   benches/etcd/start-cluster.sh DIR
#
# Installs Debian's etcd-server and etcd-client with apt-get when `etcd` is
# missing (as root, or with sudo). The members listen on 127.0.0.1, keep
# their data, logs and pid files under DIR and fsync as etcd does by
# default. Waits until all three report healthy, then prints the client URLs
# on stdout as one comma-separated line (everything else goes to stderr):
#
#   URLS=$(benches/etcd/start-cluster.sh /tmp/etcd-bench)
#   replog-bench cluster --etcd "$URLS" --concurrency 64 --count 20000
#   benches/etcd/stop-cluster.sh /tmp/etcd-bench
#
# If DIR already holds a running, healthy cluster it only prints its URLs.
# Otherwise it stops what is left of an earlier one, wipes the members' data
# directories and starts a fresh cluster. On failure it stops what it
# started and shows the end of the members' logs.
#
# Environment (defaults in brackets):
#   ETCD_BENCH_HOST          listen address [127.0.0.1]
#   ETCD_BENCH_CLIENT_PORTS  three client ports [23791,23792,23793]
#   ETCD_BENCH_PEER_PORTS    three peer ports [23801,23802,23803]
#   ETCD_BENCH_START_TIMEOUT seconds to wait for health [60]
#   ETCD_BENCH_EXTRA_FLAGS   more flags for every member, e.g. --snapshot-count=50000

set -euo pipefail

die() { echo "start-cluster: $*" >&2; exit 1; }
log() { echo "start-cluster: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 DIR"
DIR=$1
HOST=${ETCD_BENCH_HOST:-127.0.0.1}
IFS=, read -r -a CPORTS <<<"${ETCD_BENCH_CLIENT_PORTS:-23791,23792,23793}"
IFS=, read -r -a PPORTS <<<"${ETCD_BENCH_PEER_PORTS:-23801,23802,23803}"
TIMEOUT=${ETCD_BENCH_START_TIMEOUT:-60}
read -r -a EXTRA <<<"${ETCD_BENCH_EXTRA_FLAGS:-}"
[ ${#CPORTS[@]} -eq 3 ] && [ ${#PPORTS[@]} -eq 3 ] ||
    die "ETCD_BENCH_CLIENT_PORTS and ETCD_BENCH_PEER_PORTS need three ports each"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

install_etcd() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "etcd is missing and installing it needs root or sudo"
        sudo=(sudo)
    fi
    log "etcd is missing: installing Debian's etcd-server and etcd-client"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -q etcd-server etcd-client >&2; then
        log "apt-get install failed: updating the package lists and trying again"
        "${sudo[@]}" apt-get update -q >&2
        "${sudo[@]}" apt-get install -y -q etcd-server etcd-client >&2
    fi
}

command -v etcd >/dev/null && command -v etcdctl >/dev/null || install_etcd
command -v etcd >/dev/null || die "etcd is still missing after the install"
command -v etcdctl >/dev/null || die "etcdctl is still missing after the install"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

CLIENT_URLS=() PEER_URLS=() CLUSTER=""
for i in 0 1 2; do
    CLIENT_URLS+=("http://$HOST:${CPORTS[$i]}")
    PEER_URLS+=("http://$HOST:${PPORTS[$i]}")
    CLUSTER+="${CLUSTER:+,}m$((i + 1))=${PEER_URLS[$i]}"
done
ENDPOINTS=$(IFS=,; echo "${CLIENT_URLS[*]}")

healthy() { ETCDCTL_API=3 etcdctl --endpoints="$ENDPOINTS" --dial-timeout=2s --command-timeout=3s endpoint health >/dev/null 2>&1; }

# Is member N (1..3) of this DIR running? (its pid file names a live etcd
# started on this DIR's data directory)
member_alive() {
    local pidf="$DIR/m$1.pid" pid
    [ -f "$pidf" ] || return 1
    pid=$(cat "$pidf")
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--data-dir $DIR/m$1.etcd " || return 1
}

if member_alive 1 && member_alive 2 && member_alive 3 && healthy; then
    log "a healthy cluster is already running in $DIR"
    echo "$ENDPOINTS"
    exit 0
fi

# Leftovers of an earlier cluster in DIR: stop them first.
if ls "$DIR"/m?.pid >/dev/null 2>&1; then
    log "stopping what is left of an earlier cluster in $DIR"
    "$HERE/stop-cluster.sh" "$DIR"
fi

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
for p in "${CPORTS[@]}" "${PPORTS[@]}"; do
    if port_busy "$p"; then
        die "port $HOST:$p is already in use (set ETCD_BENCH_CLIENT_PORTS / ETCD_BENCH_PEER_PORTS)"
    fi
done

STARTED=()
ok=0
cleanup() {
    [ "$ok" -eq 1 ] && return
    log "failed: stopping the members started so far"
    for i in 1 2 3; do
        if [ -f "$DIR/m$i.log" ]; then
            echo "---- $DIR/m$i.log: errors, then its last lines" >&2
            grep -iE 'error|fatal|panic|flag provided' "$DIR/m$i.log" | tail -n 5 >&2 || true
            tail -n 8 "$DIR/m$i.log" >&2 || true
        fi
    done
    "$HERE/stop-cluster.sh" "$DIR" || true
}
trap cleanup EXIT

for i in 1 2 3; do
    rm -rf "$DIR/m$i.etcd"
    # setsid: the members outlive this script and the caller's terminal.
    # No --unsafe-no-fsync: etcd fsyncs its WAL before acknowledging a write.
    setsid etcd \
        --name "m$i" \
        --data-dir "$DIR/m$i.etcd" \
        --listen-client-urls "${CLIENT_URLS[$((i - 1))]}" \
        --advertise-client-urls "${CLIENT_URLS[$((i - 1))]}" \
        --listen-peer-urls "${PEER_URLS[$((i - 1))]}" \
        --initial-advertise-peer-urls "${PEER_URLS[$((i - 1))]}" \
        --initial-cluster "$CLUSTER" \
        --initial-cluster-token "replog-bench-$$" \
        --initial-cluster-state new \
        --logger zap --log-outputs stderr \
        "${EXTRA[@]}" \
        </dev/null >"$DIR/m$i.log" 2>&1 &
    echo $! >"$DIR/m$i.pid"
    STARTED+=($!)
done

deadline=$((SECONDS + TIMEOUT))
until healthy; do
    for i in 1 2 3; do
        member_alive "$i" || die "member m$i exited (log: $DIR/m$i.log)"
    done
    [ $SECONDS -lt $deadline ] || die "the cluster was not healthy after ${TIMEOUT}s"
    sleep 0.5
done

ok=1
log "3 members healthy (etcd $(etcd --version | sed -n 's/^etcd Version: //p')), pids ${STARTED[*]}, data and logs in $DIR"
echo "$ENDPOINTS"
