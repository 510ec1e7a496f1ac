#!/usr/bin/env bash
# The issue-4 measurements on one machine: a 3-replica cluster with the
# scheduler-state store, TASKS tasks of about TASK_BYTES each, then
#  - p50/p99 of write transactions (10 tasks each) without and during a backup,
#  - backup time and MB/s, peak RSS of the backup client and of the serving
#    replica during the backup (sampled every 50 ms),
#  - what a backup alone (no writes) adds to the serving replica's RSS:
#    its RSS just before against its peak during the backup (run at two
#    TASKS to see that it does not grow with the state),
#  - stage + commit time of that backup,
#  - time until a restarted (SIGKILLed) follower serves again (VOTING, caught up).
#
# Usage: benches/state-backup.sh [WORKDIR]
#   REPLOG=path/to/replog  TASKS=1000000  TASK_BYTES=1000  ROUNDS=3
# Tail latencies vary a lot on a small VM, so the write latency with and
# without a backup is measured ROUNDS times, alternating, and the median
# ratio of the p99s is reported with every round's figures.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d /tmp/replog-state-bench.XXXXXX)}
R=${REPLOG:-${CARGO_TARGET_DIR:-target}/debug/replog}
TASKS=${TASKS:-1000000}
TASK_BYTES=${TASK_BYTES:-1000}
ROUNDS=${ROUNDS:-3}
P=(7601 7602 7603)
members="1=127.0.0.1:7601,2=127.0.0.1:7602,3=127.0.0.1:7603"
E=127.0.0.1:7601,127.0.0.1:7602,127.0.0.1:7603
declare -A pid
cleanup() { for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start() { # id
  local i=$1 peers=""
  for j in 1 2 3; do [ "$j" = "$i" ] || peers+="$j=127.0.0.1:${P[$((j-1))]},"; done
  "$R" replica --state --path "$W/r$i" --listen "127.0.0.1:${P[$((i-1))]}" --cluster-id bench \
    --replica-id "$i" --peers "${peers%,}" 2>>"$W/r$i.log" &
  pid[$i]=$!
}
rm -rf "$W"/r? "$W/backups" "$W/backups-alone"; mkdir -p "$W"
for i in 1 2 3; do "$R" initialize --path "$W/r$i" --cluster-id bench --replica-id "$i" --members "$members" >/dev/null; start "$i"; done
sleep 2
leader_id() {
  "$R" status --endpoint "$E" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print([r["replica_id"] for r in d if r.get("is_leader")][0])' 2>/dev/null || echo 1
}
leader_pid() { echo "${pid[$(leader_id)]}"; }
# The backups are taken from the leader alone, so that the replica whose
# memory is sampled is the one serving the snapshot.
leader_endpoint() { echo "127.0.0.1:${P[$(($(leader_id) - 1))]}"; }
peak_rss() { # pid file: samples VmRSS (kB) until the file appears
  local p=$1 stop=$2 max=0 v
  while [ ! -e "$stop" ]; do
    v=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    [ "${v:-0}" -gt "$max" ] && max=$v
    sleep 0.05
  done
  echo "$max"
}
echo "== load $TASKS tasks of ~$TASK_BYTES B"
"$R" state --endpoint "$E" load --tasks "$TASKS" --task-bytes "$TASK_BYTES" --batch 1000
du -sh "$W/r1"
echo "== a backup alone: the serving replica's RSS before and during"
lp=$(leader_pid); le=$(leader_endpoint)
sleep 2
before=$(awk '/VmRSS/ {print $2}' "/proc/$lp/status")
rm -f "$W/stop"; (peak_rss "$lp" "$W/stop" > "$W/server-rss-alone") &
/usr/bin/time -v "$R" backup --endpoint "$le" --dir "$W/backups-alone" > "$W/backup-alone.txt" 2> "$W/backup-alone-time.txt"
touch "$W/stop"; sleep 0.2
cat "$W/backup-alone.txt"
peak=$(cat "$W/server-rss-alone")
echo "serving replica (pid $lp): RSS before the backup $before kB, peak during it $peak kB, growth $((peak - before)) kB"
echo "backup client peak RSS: $(awk '/Maximum resident/ {print $6}' "$W/backup-alone-time.txt") kB"
rm -rf "$W/backups-alone"
p99_of() { sed -n 's/.*p99=\([0-9]*\)us.*/\1/p' "$1"; }
ratios=()
first=60000000
for round in $(seq "$ROUNDS"); do
  echo "== round $round: 1,200 write transactions of 10 tasks without a backup, then as many during one"
  "$R" state --endpoint "$E" load --tasks 12000 --batch 10 --first "$first" --task-bytes "$TASK_BYTES" > "$W/without.txt"
  first=$((first + 100000))
  cat "$W/without.txt"
  lp=$(leader_pid); le=$(leader_endpoint)
  rm -f "$W/stop"; (peak_rss "$lp" "$W/stop" > "$W/server-rss") &
  # The writes start just after the backup and are sized to end with it.
  /usr/bin/time -v "$R" backup --endpoint "$le" --dir "$W/backups" --max-saved 1 > "$W/backup.txt" 2> "$W/backup-time.txt" &
  backup=$!
  sleep 0.3
  "$R" state --endpoint "$E" load --tasks 12000 --batch 10 --first "$first" --task-bytes "$TASK_BYTES" > "$W/during.txt"
  first=$((first + 100000))
  echo "writes done at $(date +%s.%N)"
  wait "$backup"
  echo "backup done at $(date +%s.%N)"
  touch "$W/stop"; sleep 0.2
  cat "$W/backup.txt" "$W/during.txt"
  echo "backup client peak RSS: $(awk '/Maximum resident/ {print $6}' "$W/backup-time.txt") kB"
  echo "serving replica (pid $lp) peak RSS during the backup: $(cat "$W/server-rss") kB"
  ratio=$(python3 -c "print(f'{$(p99_of "$W/during.txt") / $(p99_of "$W/without.txt"):.2f}')")
  echo "round $round: p99 without $(p99_of "$W/without.txt") us, during $(p99_of "$W/during.txt") us: ${ratio}x"
  ratios+=("$ratio")
done
echo "p99 during / without a backup, by round: ${ratios[*]}; median $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')x"
f=$(ls "$W"/backups/scheduler-backup-* | tail -1)
ls -l "$f"
echo "== stage + commit"
s=$(date +%s.%N)
"$R" recovery --endpoint "$E" stage "$f" >/dev/null
m=$(date +%s.%N)
"$R" recovery --endpoint "$E" commit
e=$(date +%s.%N)
python3 -c "print(f'stage {$m-$s:.2f}s, commit {$e-$m:.2f}s')"
echo "== restart of a follower"
lp=$(leader_pid)
for i in 1 2 3; do [ "${pid[$i]}" != "$lp" ] && victim=$i; done
kill -9 "${pid[$victim]}"; wait "${pid[$victim]}" 2>/dev/null || true
# The first write after the commit may reach the old leader's writer, which
# fails once with STATE_REPLACED (the scheduler would reload): write again.
"$R" state --endpoint "$E" load --tasks 1000 --first 70000000 >/dev/null 2>&1 ||
  "$R" state --endpoint "$E" load --tasks 1000 --first 70000000 >/dev/null
s=$(date +%s.%N)
start "$victim"
until "$R" status --endpoint "$E" --json 2>/dev/null | VICTIM=$victim python3 -c '
import json, os, sys
d = json.load(sys.stdin)
v = [r for r in d if r.get("replica_id") == int(os.environ["VICTIM"])]
l = [r for r in d if r.get("is_leader")]
ok = v and l and v[0]["status"] == "VOTING" and v[0]["applied"] >= l[0]["commit"]
sys.exit(0 if ok else 1)' 2>/dev/null; do sleep 0.05; done
e=$(date +%s.%N)
python3 -c "print(f'replica {$victim} serves again {$e-$s:.2f}s after its restart')"
"$R" state --endpoint "$E" summary
