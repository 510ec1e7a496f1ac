#!/usr/bin/env bash
# Measures replog and etcd with the same closed-loop load generator, in one
# run on one machine: a 3-replica replog cluster and a 3-member etcd cluster
# on 127.0.0.1, fsync on, 256 B values, 1, 64 and 1000 concurrent clients.
#
# Usage: benches/compare-etcd.sh [WORKDIR]   (--help prints this)
#   REPLOG=path/to/replog (default: target/debug/replog, built by tools/run-demo)
#   REPLOG_BENCH=path/to/replog-bench, the load generator (default: next to
#   REPLOG; cargo build -p replog-bench)
#   COUNTS="2000 20000 50000" (operations per concurrency level 1, 64, 1000)
#   ROUNDS=3 (each round runs every level against replog and etcd; which of
#   the two goes first alternates between rounds)
#   LEVELS="1 64 1000" (the concurrency levels to run, a subset of these)
# Prints one JSON report per run and, at the end, a Markdown table of the
# medians over the rounds (benches/report-row.py).
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/replog-vs-etcd.XXXXXX)}
REPLOG=${REPLOG:-${CARGO_TARGET_DIR:-target}/debug/replog}
REPLOG_BENCH=${REPLOG_BENCH:-$(dirname "$REPLOG")/replog-bench}
read -r N1 N64 N1000 <<<"${COUNTS:-2000 20000 50000}"
PORTS=(7301 7302 7303)
[ -x "$REPLOG" ] || { echo "no replog binary at $REPLOG (run tools/run-demo or cargo build)" >&2; exit 1; }
[ -x "$REPLOG_BENCH" ] || { echo "no replog-bench binary at $REPLOG_BENCH (cargo build -p replog-bench)" >&2; exit 1; }
mkdir -p "$WORK"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  benches/etcd/stop-cluster.sh "$WORK/etcd" >/dev/null 2>&1 || true
}
trap cleanup EXIT

members=""
for i in 1 2 3; do members+="$i=127.0.0.1:${PORTS[$((i-1))]},"; done
members=${members%,}
for i in 1 2 3; do
  rm -rf "$WORK/replica-$i"
  "$REPLOG" initialize --path "$WORK/replica-$i" --cluster-id bench --replica-id "$i" --members "$members" >/dev/null
  peers=""
  for j in 1 2 3; do [ "$j" = "$i" ] || peers+="$j=127.0.0.1:${PORTS[$((j-1))]},"; done
  "$REPLOG" replica --path "$WORK/replica-$i" --listen "127.0.0.1:${PORTS[$((i-1))]}" \
    --cluster-id bench --replica-id "$i" --peers "${peers%,}" 2>"$WORK/replica-$i.log" &
  pids+=($!)
done
ENDPOINTS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
ETCD=$(benches/etcd/start-cluster.sh "$WORK/etcd")
sleep 2

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
one() { # system clients count
  local r
  if [ "$1" = replog ]; then
    r=$("$REPLOG_BENCH" cluster --endpoint "$ENDPOINTS" --concurrency "$2" --count "$3" --value-size 256 --json)
  else
    r=$("$REPLOG_BENCH" cluster --etcd "$ETCD" --concurrency "$2" --count "$3" --value-size 256 --json)
  fi
  echo "$r"
  printf '%s\t%s\t%s\n' "$1" "$2" "$(echo "$r" | tr -d '\n')" >>"$RESULTS"
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  if [ $((round % 2)) = 1 ]; then systems="replog etcd"; else systems="etcd replog"; fi
  for c in ${LEVELS:-1 64 1000}; do
    case $c in
      1) n=$N1 ;; 64) n=$N64 ;; 1000) n=$N1000 ;;
      *) echo "LEVELS: $c is not one of 1, 64, 1000" >&2; exit 1 ;;
    esac
    for s in $systems; do one "$s" "$c" "$n"; done
  done
done
etcd_version=$(etcd --version 2>/dev/null | head -1 || true)
echo
echo "replog: $("$REPLOG" --version); $etcd_version; $(nproc) cores; ${ROUNDS:-3} rounds"
python3 benches/report-row.py "$RESULTS"
