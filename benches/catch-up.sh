#!/usr/bin/env bash
# Measures how well the leader keeps answering while a wiped follower
# catches up a large log: a 3-replica cluster on 127.0.0.1 (real replica
# processes, fsync on) writes a log of LOG_MB, one follower is killed, its
# directory wiped and the replica started again (EMPTY, then RECOVERING: the
# leader sends it the whole log), and a steady client load runs through the
# leader until the follower has caught up.
#
# The load runs in rounds of ROUND_COUNT appends of 256 B by LOAD_CLIENTS
# closed-loop clients (`replog-bench cluster --endpoint`), one round after the
# other, until the follower has applied the log written before the wipe.
# For each round it prints the generator's JSON report; at the end the
# longest gap without a completed append (`longest_gap_us`, the maximum over
# the rounds: a gap that straddles two rounds is not seen) and the worst p99.
#
# Usage: benches/catch-up.sh [WORKDIR]
#   REPLOG=path/to/replog (default: $CARGO_TARGET_DIR or target, debug/replog)
#   REPLOG_BENCH=path/to/replog-bench, the load generator (default: next to REPLOG)
#   LOG_MB=1024 (size of the log before the wipe), VALUE_SIZE=64KB (entry
#   size while writing it), LOAD_CLIENTS=4, ROUND_COUNT=2000
#   MAX_SECONDS=900 (give up waiting for the catch-up)
# The work directory holds the replicas' logs and the JSON reports; it is
# removed at the end unless KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/replog-catch-up.XXXXXX)}
REPLOG=${REPLOG:-${CARGO_TARGET_DIR:-target}/debug/replog}
REPLOG_BENCH=${REPLOG_BENCH:-$(dirname "$REPLOG")/replog-bench}
LOG_MB=${LOG_MB:-1024}
VALUE_SIZE=${VALUE_SIZE:-64KB}
LOAD_CLIENTS=${LOAD_CLIENTS:-4}
ROUND_COUNT=${ROUND_COUNT:-2000}
MAX_SECONDS=${MAX_SECONDS:-900}
PORTS=(7401 7402 7403)
[ -x "$REPLOG" ] || { echo "no replog binary at $REPLOG (cargo build -p replog-cli)" >&2; exit 1; }
[ -x "$REPLOG_BENCH" ] || { echo "no replog-bench binary at $REPLOG_BENCH (cargo build -p replog-bench)" >&2; exit 1; }
mkdir -p "$WORK"
declare -A pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT

ENDPOINTS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
members=""
for i in 1 2 3; do members+="$i=127.0.0.1:${PORTS[$((i-1))]},"; done
members=${members%,}

start_replica() { # id
  local i=$1 peers=""
  for j in 1 2 3; do [ "$j" = "$i" ] || peers+="$j=127.0.0.1:${PORTS[$((j-1))]},"; done
  "$REPLOG" replica --path "$WORK/replica-$i" --listen "127.0.0.1:${PORTS[$((i-1))]}" \
    --cluster-id bench --replica-id "$i" --peers "${peers%,}" 2>>"$WORK/replica-$i.log" &
  pids[$i]=$!
}

# One field of one replica's row in `replog status --json` (empty if unknown).
status_field() { # id field
  "$REPLOG" status --endpoint "127.0.0.1:${PORTS[$(($1-1))]}" --json 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; v=r.get(sys.argv[1]); print("" if v is None else v)' "$2" ||
    true
}

leader_id() {
  for i in 1 2 3; do
    if [ "$(status_field "$i" is_leader)" = True ]; then echo "$i"; return; fi
  done
}

for i in 1 2 3; do
  "$REPLOG" initialize --path "$WORK/replica-$i" --cluster-id bench --replica-id "$i" --members "$members" >/dev/null
  start_replica "$i"
done
for _ in $(seq 1 100); do [ -n "$(leader_id)" ] && break; sleep 0.2; done
LEADER=$(leader_id)
[ -n "$LEADER" ] || { echo "no leader after 20 s" >&2; exit 1; }

value_bytes=$(python3 -c 'import re,sys
m=re.fullmatch(r"(\d+)\s*([KMG]?)I?B?", sys.argv[1].upper()); n=int(m.group(1))
print(n*{"":1,"K":1024,"M":1024**2,"G":1024**3}[m.group(2)])' "$VALUE_SIZE")
entries=$((LOG_MB * 1024 * 1024 / value_bytes))
echo "writing $entries entries of $VALUE_SIZE ($LOG_MB MB) through leader $LEADER" >&2
"$REPLOG_BENCH" cluster --endpoint "$ENDPOINTS" --concurrency 16 --count "$entries" \
  --value-size "$VALUE_SIZE" --json >"$WORK/write.json"
cat "$WORK/write.json"

LEADER=$(leader_id)
FOLLOWER=$(( LEADER % 3 + 1 ))
TARGET=$(status_field "$LEADER" commit)
echo "killing follower $FOLLOWER, wiping its directory, starting it again (leader $LEADER, commit $TARGET)" >&2
kill "${pids[$FOLLOWER]}"; wait "${pids[$FOLLOWER]}" 2>/dev/null || true
rm -rf "$WORK/replica-$FOLLOWER"
start_replica "$FOLLOWER"
started=$(date +%s.%N)

: >"$WORK/load.jsonl"
rounds=0
caught_up=""
while :; do
  "$REPLOG_BENCH" cluster --endpoint "$ENDPOINTS" --concurrency "$LOAD_CLIENTS" --count "$ROUND_COUNT" \
    --value-size 256 --json | tr -d '\n' >>"$WORK/load.jsonl"
  echo >>"$WORK/load.jsonl"
  tail -n 1 "$WORK/load.jsonl"
  rounds=$((rounds + 1))
  applied=$(status_field "$FOLLOWER" applied)
  if [ -n "$applied" ] && [ "$applied" -ge "$TARGET" ]; then
    caught_up=$(python3 -c "import sys; print(round($(date +%s.%N) - $started, 1))")
    break
  fi
  if python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $started > $MAX_SECONDS else 1)"; then
    echo "follower $FOLLOWER did not catch up within $MAX_SECONDS s (applied ${applied:-?} of $TARGET)" >&2
    exit 1
  fi
done
[ "$(leader_id)" = "$LEADER" ] || echo "note: leadership moved during the catch-up" >&2

python3 - "$WORK/load.jsonl" "$rounds" "$caught_up" "$LOG_MB" <<'EOF'
import json, sys
# Each line is the generator's report: a list with one report per level.
rows = [json.loads(l)[0] for l in open(sys.argv[1]) if l.strip()]
gap = max(r.get("longest_gap_us", 0) for r in rows)
p99 = max(r["p99_us"] for r in rows)
ops = sum(r["count"] for r in rows) / sum(r["seconds"] for r in rows)
print(json.dumps({
    "log_mb": int(sys.argv[4]),
    "catch_up_seconds": float(sys.argv[3]),
    "rounds": int(sys.argv[2]),
    "longest_gap_ms": round(gap / 1000, 1),
    "worst_round_p99_ms": round(p99 / 1000, 2),
    "median_round_p99_ms": round(sorted(r["p99_us"] for r in rows)[len(rows) // 2] / 1000, 2),
    "appends_per_sec": round(ops),
}))
EOF
