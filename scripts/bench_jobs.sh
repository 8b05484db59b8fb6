#!/usr/bin/env bash
# End-to-end job throughput of a running fazt: apps whose handler spawns no-op jobs in
# batches, 10,000 jobs spread over 20 apps (the per-app queue bound is 1,000), timed
# from the first job's createdAt to the last job's doneAt. Prints jobs/s and
# enqueue-to-start p50/p99 (startedAt - createdAt; the store keeps ms, so 1 ms steps),
# beside the shared reference figures and a same-run baseline: raw SQLite single-row
# commits/s (WAL, synchronous=NORMAL, what fazt's store uses) from Python's sqlite3.
#
# Usage: scripts/bench_jobs.sh     (env: JOBS=10000 APPS=20 BATCH=100 PARALLEL=4;
#                                   SKIP_BUILD=1 to reuse target/release/fazt)
# Needs: node, curl; python3 for the baseline. Builds the release binary first
# (cargo build --release: a few minutes when not up to date).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

JOBS="${JOBS:-10000}"
APPS="${APPS:-20}"
BATCH="${BATCH:-100}"
PARALLEL="${PARALLEL:-4}"
PER_APP=$((JOBS / APPS))
[ $((PER_APP * APPS)) -eq "$JOBS" ] && [ $((PER_APP % BATCH)) -eq 0 ] ||
  { echo "JOBS must split evenly into APPS apps and BATCH-sized requests" >&2; exit 2; }
[ "$PER_APP" -le 1000 ] || { echo "at most 1,000 jobs per app (the queue bound)" >&2; exit 2; }
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }

build_release
start_fazt

mkdir -p "$WORK/app/api" "$WORK/app/workers"
echo 'module.exports = function (job) { return null; };' >"$WORK/app/workers/noop.js"
cat >"$WORK/app/api/spawn.js" <<'EOF'
// Spawns `n` no-op jobs (1 MB reservations, so all 20 slots can run at once).
module.exports = function (request) {
  const n = Number(request.query.n || 0);
  for (let i = 0; i < n; i++) fazt.worker.spawn('workers/noop.js', { memory: '1MB' });
  return { spawned: n };
};
EOF
apps=()
for i in $(seq 1 "$APPS"); do
  apps+=("jobs$i")
  deploy_app "jobs$i" "$WORK/app"
done

# One line per request: app. Requests interleave the apps and run PARALLEL at a time.
: >"$WORK/requests"
for _ in $(seq 1 $((PER_APP / BATCH))); do
  for a in "${apps[@]}"; do echo "$a" >>"$WORK/requests"; done
done
note "spawning $JOBS jobs: $(wc -l <"$WORK/requests") requests of $BATCH over $APPS apps, $PARALLEL at a time"
export FAZT_ADDR FAZT_PORT BATCH
t0="$(date +%s%N)"
xargs -P "$PARALLEL" -I{} sh -c \
  'curl -sS --fail-with-body -o /dev/null -H "Host: {}.localhost:$FAZT_PORT" "http://$FAZT_ADDR/api/spawn?n=$BATCH"' \
  <"$WORK/requests"
t_spawned="$(date +%s%N)"

# Wait until every app lists all its jobs as done (polls the system API).
deadline=$(($(date +%s) + 300))
for a in "${apps[@]}"; do
  while :; do
    api "/api/jobs?app=$a&limit=1000" >"$WORK/jobs-$a.json"
    done_n="$(node -e 'const j=JSON.parse(require("fs").readFileSync(process.argv[1]));
      const bad=j.filter(x=>["failed","cancelled","stopped"].includes(x.status));
      if (bad.length) { console.error(JSON.stringify(bad[0])); process.exit(3); }
      console.log(j.filter(x=>x.status==="done").length)' "$WORK/jobs-$a.json")"
    [ "$done_n" -ge "$PER_APP" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { echo "app $a: only $done_n of $PER_APP jobs done after 300 s" >&2; exit 1; }
    sleep 0.2
  done
done
t_seen="$(date +%s%N)"

# Same-run baseline: raw single-row commits into a WAL database like fazt's.
BASE_RATE=""
if command -v python3 >/dev/null; then
  BASE_RATE="$(python3 - "$WORK/baseline.db" "$JOBS" <<'EOF'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=NORMAL")
db.execute("CREATE TABLE jobs(id TEXT PRIMARY KEY, app TEXT, status TEXT, created_at INTEGER)")
n = int(sys.argv[2]); t = time.perf_counter()
for i in range(n):
    db.execute("INSERT INTO jobs VALUES (?, 'a', 'queued', ?)", (f"job{i:08d}", i))
print(f"{n / (time.perf_counter() - t):.0f}")
EOF
)"
fi

# --- summary ------------------------------------------------------------------------
node - "$WORK" "$JOBS" "$t0" "$t_spawned" "$t_seen" "${BASE_RATE:-}" "${apps[@]}" <<'EOF'
const fs = require('fs');
const [work, jobs, t0, tSpawned, tSeen, base, ...apps] = process.argv.slice(2);
const rows = apps.flatMap((a) => JSON.parse(fs.readFileSync(`${work}/jobs-${a}.json`)));
const created = Math.min(...rows.map((r) => r.createdAt));
const done = Math.max(...rows.map((r) => r.doneAt));
const waits = rows.map((r) => r.startedAt - r.createdAt).sort((a, b) => a - b);
const pct = (p) => waits[Math.min(waits.length - 1, Math.max(0, Math.ceil((p / 100) * waits.length) - 1))];
const e2e = rows.length / ((done - created) / 1000);
const wall = (Number(tSeen) - Number(t0)) / 1e9;
const enq = rows.length / ((Number(tSpawned) - Number(t0)) / 1e9);
console.log(`\n== Jobs, same run: ${rows.length} no-op jobs over ${apps.length} apps ==`);
console.log(`fazt end to end (first createdAt -> last doneAt): ${e2e.toFixed(0)} jobs/s (${((done - created) / 1000).toFixed(2)} s)`);
console.log(`fazt enqueue-to-start: p50 ${pct(50)} ms, p99 ${pct(99)} ms, max ${waits[waits.length - 1]} ms (1 ms resolution)`);
console.log(`fazt enqueue rate through the handlers: ${enq.toFixed(0)} jobs/s; script wall time to all seen done: ${wall.toFixed(2)} s`);
if (base) {
  console.log(`baseline, same run: raw SQLite single-row commits (WAL, synchronous=NORMAL, Python sqlite3): ${base}/s`);
  console.log(`  fazt writes each job 3 times (insert, running, done): unbatched that caps at ~${(base / 3).toFixed(0)} jobs/s`);
}
console.log('reference (shared/bench/README.md): BullMQ + Redis ~2,400 jobs/s end to end (enqueue-to-start p99 2.3 ms); Huey + SQLite ~1,200 jobs/s');
console.log(`ratio fazt/BullMQ: ${(e2e / 2400).toFixed(2)}  fazt/Huey: ${(e2e / 1200).toFixed(2)}`);
EOF
