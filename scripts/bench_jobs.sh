#!/usr/bin/env bash
# Job throughput of fazt against BullMQ (and Huey) measured in the same run, A/B/A/B.
#
# fazt, per run (a fresh server and data dir each time), N no-op jobs spread over 20
# apps (the per-app queue bound is 1,000), spawned by app handlers in batches of 100,
# PARALLEL requests at a time; figures from the store's timestamps (ms):
#  - open burst: the pool runs while the jobs are spawned (how fazt is used):
#    open_throughput_e2e = N / (last doneAt - first createdAt), bounded by the spawn
#    rate; open_burst_enq_to_start p50/p99.
#  - gated, the peers' method (they start their workers after all N are enqueued):
#    20 gate jobs hold every slot while the N jobs are spawned, then the gates open.
#    drain_rate = N / (last doneAt - first startedAt), throughput_e2e = N / (last
#    doneAt - first createdAt), backlog_enq_to_start p50/p99.
#  - paced: PROBE_JOBS jobs spawned one per request at PROBE_RATE/s with the pool idle;
#    enqueue->start p50/p99 (1 ms resolution: the store keeps ms).
#  - memory (first run only): RSS with 20 running jobs, and with 1,000 more queued jobs
#    carrying 1 KB of data each.
#  - the machine's own noise, sampled for 3 s before the paced probe: how often a
#    thread sleeping 0.2 ms woke over 1 ms late, and its p99 lateness.
# Peers: /work/shared/bench/peers/jobs/bullmq.sh (and huey.sh with PEERS="bullmq huey"),
# the same N, concurrency 20, PROBE_JOBS at PROBE_RATE. Prints every RESULT line, then
# the same-run ratios (median of the per-run ratios, with their spread).
#
# Usage: scripts/bench_jobs.sh   (env: RUNS=3 JOBS=10000 APPS=20 BATCH=100 PARALLEL=4
#                                 PROBE_JOBS=1000 PROBE_RATE=200 PEERS="bullmq"
#                                 SKIP_BUILD=1 to reuse target/release/fazt,
#                                 FAZT_BIN=path to measure another build)
# Needs: node, curl; the peers' scripts install BullMQ/Redis/Huey into their cache.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUNS="${RUNS:-3}"
JOBS="${JOBS:-10000}"
APPS="${APPS:-20}"
BATCH="${BATCH:-100}"
PARALLEL="${PARALLEL:-4}"
PROBE_JOBS="${PROBE_JOBS:-1000}"
PROBE_RATE="${PROBE_RATE:-200}"
export PROBE_RATE
PEERS="${PEERS-bullmq}"
PEER_DIR="${PEER_DIR:-$SHARED_BENCH/peers/jobs}"
PER_APP=$((JOBS / APPS))
[ $((PER_APP * APPS)) -eq "$JOBS" ] && [ $((PER_APP % BATCH)) -eq 0 ] ||
  { echo "JOBS must split evenly into APPS apps and BATCH-sized requests" >&2; exit 2; }
[ "$PER_APP" -le 1000 ] || { echo "at most 1,000 jobs per app (the queue bound)" >&2; exit 2; }
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }

# FAZT_BIN=path: measure that binary instead (say main's, for an A/B of a change).
if [ -n "${FAZT_BIN:-}" ]; then FAZT="$FAZT_BIN"; note "using $FAZT"; else build_release; fi
RESULTS="$WORK/results.txt"
: >"$RESULTS"

mkdir -p "$WORK/app/api" "$WORK/app/workers"
echo 'module.exports = function (job) { return null; };' >"$WORK/app/workers/noop.js"
echo 'module.exports = function (job) { job.sleep(Number(job.data && job.data.ms || 0)); return null; };' \
  >"$WORK/app/workers/sleep.js"
# A gate job holds its slot until the app's kv key `go` is true.
echo 'module.exports = function (job) { while (fazt.storage.kv.get("go") !== true) job.sleep(2); return null; };' \
  >"$WORK/app/workers/gate.js"
echo 'module.exports = function () { fazt.storage.kv.set("go", true); return { ok: true }; };' \
  >"$WORK/app/api/go.js"
cat >"$WORK/app/api/spawn.js" <<'EOF'
// Spawns `n` jobs (1 MB reservations, so all 20 slots can run at once); `ms`: sleep
// jobs of that length; `kb`: a payload of that many KB; `gate`: gate jobs.
module.exports = function (request) {
  const q = request.query;
  const n = Number(q.n || 0);
  const opts = { memory: '1MB' };
  let path = q.gate ? 'workers/gate.js' : 'workers/noop.js';
  if (q.ms) { path = 'workers/sleep.js'; opts.data = { ms: Number(q.ms) }; }
  if (q.kb) opts.data = Object.assign(opts.data || {}, { pad: 'x'.repeat(1024 * Number(q.kb) - 16) });
  for (let i = 0; i < n; i++) fazt.worker.spawn(path, opts);
  return { spawned: n };
};
EOF

# wait_done APP COUNT OUT: polls the system API until COUNT jobs of APP are done.
wait_done() {
  local a=$1 want=$2 out=$3 deadline=$(($(date +%s) + 300)) n
  while :; do
    api "/api/jobs?app=$a&limit=1000" >"$out"
    n="$(node -e 'const j=JSON.parse(require("fs").readFileSync(process.argv[1]));
      const bad=j.filter(x=>["failed","cancelled","stopped"].includes(x.status));
      if (bad.length) { console.error(JSON.stringify(bad[0])); process.exit(3); }
      console.log(j.filter(x=>x.status==="done").length)' "$out")"
    [ "$n" -ge "$want" ] && return
    [ "$(date +%s)" -lt "$deadline" ] || { echo "app $a: only $n of $want jobs done after 300 s" >&2; exit 1; }
    sleep 0.2
  done
}

stop_fazt() {
  kill -INT "$FAZT_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$FAZT_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$FAZT_PID" 2>/dev/null || true
  wait "$FAZT_PID" 2>/dev/null || true
  rm -rf "$FAZT_DATA"
}

# health_field EXPR: a field of /health.workers.
health_workers() { curl -sS "http://$FAZT_ADDR/health" | node -e \
  'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).workers[process.argv[1]]))' "$1"; }

# spawn_all FILE: one request per line (an app name) to /api/spawn?n=$BATCH, PARALLEL
# at a time over keep-alive connections from one Node process (as the peers' clients
# hold one Redis connection; a curl process per request capped the rate at ~3,000
# jobs/s on this machine, whatever the server did).
spawn_all() {
  node - "$FAZT_ADDR" "$FAZT_PORT" "$BATCH" "$PARALLEL" "$1" <<'EOF'
const http = require('http');
const fs = require('fs');
const [addr, port, batch, parallel, file] = process.argv.slice(2);
const [hostname, listen] = addr.split(':');
const apps = fs.readFileSync(file, 'utf8').split('\n').filter(Boolean);
const agent = new http.Agent({ keepAlive: true, maxSockets: Number(parallel) });
const get = (app) => new Promise((res, rej) => {
  const r = http.get({ hostname, port: listen, path: `/api/spawn?n=${batch}`,
    headers: { host: `${app}.localhost:${port}` }, agent }, (resp) => {
    let body = '';
    resp.on('data', (d) => { body += d; });
    resp.on('end', () => resp.statusCode === 200 ? res() : rej(new Error(`HTTP ${resp.statusCode}: ${body}`)));
  });
  r.on('error', rej);
});
(async () => {
  let next = 0;
  const lane = async () => { while (next < apps.length) await get(apps[next++]); };
  await Promise.all(Array.from({ length: Number(parallel) }, lane));
  agent.destroy();
})().catch((e) => { console.error(e); process.exit(1); });
EOF
}

run_fazt() {
  local run=$1
  start_fazt
  local apps=() a
  for i in $(seq 1 "$APPS"); do apps+=("jobs$i"); deploy_app "jobs$i" "$WORK/app"; done
  deploy_app paced "$WORK/app"
  : >"$WORK/requests"
  for _ in $(seq 1 $((PER_APP / BATCH))); do
    for a in "${apps[@]}"; do echo "$a" >>"$WORK/requests"; done
  done
  note "fazt run $run: spawning $JOBS jobs: $(wc -l <"$WORK/requests") requests of $BATCH over $APPS apps, $PARALLEL at a time"
  spawn_all "$WORK/requests"
  for a in "${apps[@]}"; do wait_done "$a" "$PER_APP" "$WORK/jobs-$a.json"; done

  # Gated, the peers' method: every slot held by a gate job (4 apps x 5), all N jobs
  # spawned, then the gates open and the pool drains the backlog.
  local gapps=()
  for i in $(seq 1 "$APPS"); do gapps+=("gated$i"); deploy_app "gated$i" "$WORK/app"; done
  for i in 1 2 3 4; do deploy_app "gate$i" "$WORK/app"; app_get "gate$i" "/api/spawn?n=5&gate=1" -o /dev/null; done
  for _ in $(seq 1 100); do [ "$(health_workers running)" = 20 ] && break; sleep 0.1; done
  sed 's/^jobs/gated/' "$WORK/requests" >"$WORK/requests-gated"
  note "fazt run $run: gated, $JOBS jobs spawned behind 20 gate jobs, then the gates open"
  spawn_all "$WORK/requests-gated"
  for i in 1 2 3 4; do app_get "gate$i" /api/go -o /dev/null; done
  for a in "${gapps[@]}"; do wait_done "$a" "$PER_APP" "$WORK/jobs-$a.json"; done

  note "fazt run $run: paced, $PROBE_JOBS jobs at $PROBE_RATE/s"
  sleep 0.5
  machine_hiccups "$run"
  node - "$FAZT_ADDR" "paced.localhost:$FAZT_PORT" "$PROBE_JOBS" "$PROBE_RATE" <<'EOF'
const http = require('http');
const [addr, host, m, rate] = process.argv.slice(2);
const [hostname, port] = addr.split(':');
const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
const get = () => new Promise((res, rej) => {
  const r = http.get({ hostname, port, path: '/api/spawn?n=1', headers: { host }, agent }, (resp) => {
    resp.resume(); resp.on('end', () => resp.statusCode === 200 ? res() : rej(new Error(`HTTP ${resp.statusCode}`)));
  });
  r.on('error', rej);
});
(async () => {
  const t0 = Date.now(); const pending = [];
  for (let i = 0; i < Number(m); i++) {
    const d = t0 + (i * 1000) / Number(rate) - Date.now();
    if (d > 0) await new Promise((r) => setTimeout(r, d));
    pending.push(get());
  }
  await Promise.all(pending); agent.destroy();
})().catch((e) => { console.error(e); process.exit(1); });
EOF
  wait_done paced "$PROBE_JOBS" "$WORK/jobs-paced.json"

  node - "$WORK" "$run" "$PROBE_RATE" "${apps[@]}" >>"$RESULTS" <<'EOF'
const fs = require('fs');
const [work, run, rate, ...apps] = process.argv.slice(2);
const load = (names) => names.flatMap((a) => JSON.parse(fs.readFileSync(`${work}/jobs-${a}.json`)));
const open = load(apps);
const rows = load(apps.map((a) => a.replace(/^jobs/, 'gated')));
const paced = JSON.parse(fs.readFileSync(`${work}/jobs-paced.json`));
const pct = (xs, p) => xs[Math.min(xs.length - 1, Math.max(0, Math.ceil((p / 100) * xs.length) - 1))];
const waits = (rs) => rs.map((r) => r.startedAt - r.createdAt).sort((a, b) => a - b);
const created = Math.min(...rows.map((r) => r.createdAt));
const started = Math.min(...rows.map((r) => r.startedAt));
const done = Math.max(...rows.map((r) => r.doneAt));
const spawned = Math.max(...rows.map((r) => r.createdAt));
const w = waits(rows), pw = waits(paced), ow = waits(open);
const oCreated = Math.min(...open.map((r) => r.createdAt));
const oDone = Math.max(...open.map((r) => r.doneAt));
const oSpawned = Math.max(...open.map((r) => r.createdAt));
const out = [
  ['open_enqueue_rate', open.length / ((oSpawned - oCreated) / 1000), 'jobs/s'],
  ['open_throughput_e2e', open.length / ((oDone - oCreated) / 1000), 'jobs/s'],
  ['open_burst_enq_to_start_p50', pct(ow, 50), 'ms'],
  ['open_burst_enq_to_start_p99', pct(ow, 99), 'ms'],
  ['enqueue_rate', rows.length / ((spawned - created) / 1000), 'jobs/s'],
  ['drain_rate', rows.length / ((done - started) / 1000), 'jobs/s'],
  ['backlog_enq_to_start_p50', pct(w, 50), 'ms'],
  ['backlog_enq_to_start_p99', pct(w, 99), 'ms'],
  [`paced${rate}_enq_to_start_p50`, pct(pw, 50), 'ms'],
  [`paced${rate}_enq_to_start_p99`, pct(pw, 99), 'ms'],
  ['throughput_e2e', rows.length / ((done - created) / 1000), 'jobs/s'],
];
for (const [m, v, u] of out) console.log(`RESULT run=${run} name=jobs.fazt metric=${m} value=${Number(v.toPrecision(6))} unit=${u}`);
EOF
  grep "run=$run name=jobs.fazt" "$RESULTS" >&2

  if [ "$run" = 1 ]; then
    # Memory: 20 running jobs (4 apps at their limit of 5), then 1,000 queued jobs of
    # 1 KB data each behind them (all slots busy).
    local idle_kb run_kb queued_kb
    idle_kb="$(rss_kb "$FAZT_PID")"
    for i in 1 2 3 4; do app_get "jobs$i" "/api/spawn?n=5&ms=20000" -o /dev/null; done
    for _ in $(seq 1 100); do [ "$(health_workers running)" = 20 ] && break; sleep 0.1; done
    [ "$(health_workers running)" = 20 ] || { echo "20 jobs did not start" >&2; exit 1; }
    sleep 1
    run_kb="$(rss_kb "$FAZT_PID")"
    for _ in $(seq 1 10); do app_get paced "/api/spawn?n=100&kb=1" -o /dev/null; done
    [ "$(health_workers queued)" -ge 1000 ] || { echo "1,000 jobs are not queued" >&2; exit 1; }
    sleep 1
    queued_kb="$(rss_kb "$FAZT_PID")"
    {
      echo "RESULT run=1 name=jobs.fazt metric=rss_after_runs value=$((idle_kb / 1024)) unit=MB"
      echo "RESULT run=1 name=jobs.fazt metric=rss_20_running value=$((run_kb / 1024)) unit=MB"
      echo "RESULT run=1 name=jobs.fazt metric=rss_20_running_1000_queued_1kb value=$((queued_kb / 1024)) unit=MB"
    } | tee -a "$RESULTS" >&2
  fi
  stop_fazt
}

# machine_hiccups RUN: the machine's own scheduling noise, sampled for 3 s before the
# paced probe with nothing else running: a thread that sleeps 0.2 ms in a loop, how
# often it woke more than 1 ms late (per second) and its p99 lateness. A paced p99 of a
# few ms is within this noise when the machine shows hiccups of that size every second
# (the store keeps ms, so the paced figures cannot resolve less anyway).
machine_hiccups() {
  node - "$1" >>"$RESULTS" <<'EOF'
const run = process.argv[2];
// A synchronous sleep: Atomics.wait on a private buffer (no event-loop timer slack).
const cell = new Int32Array(new SharedArrayBuffer(4));
const late = [];
const t0 = process.hrtime.bigint();
while (process.hrtime.bigint() - t0 < 3_000_000_000n) {
  const a = process.hrtime.bigint();
  Atomics.wait(cell, 0, 0, 0.2);
  late.push(Number(process.hrtime.bigint() - a) / 1e6 - 0.2);
}
late.sort((x, y) => x - y);
const over = late.filter((x) => x > 1).length / 3;
const p99 = late[Math.min(late.length - 1, Math.ceil(0.99 * late.length) - 1)];
console.log(`RESULT run=${run} name=jobs.fazt metric=machine_hiccups_over_1ms value=${over.toFixed(1)} unit=per_s`);
console.log(`RESULT run=${run} name=jobs.fazt metric=machine_sleep_lateness_p99 value=${p99.toFixed(3)} unit=ms`);
EOF
  grep "run=$1 name=jobs.fazt metric=machine" "$RESULTS" >&2
}

run_peer() {
  local peer=$1 run=$2
  note "$peer run $run"
  JOBS="$JOBS" CONCURRENCY=20 PROBE_JOBS="$PROBE_JOBS" PROBE_RATE="$PROBE_RATE" \
    bash "$PEER_DIR/$peer.sh" 2>"$WORK/$peer-$run.err" | sed "s/^RESULT /RESULT run=$run /" |
    grep '^RESULT' | tee -a "$RESULTS" >&2 ||
    { tail -20 "$WORK/$peer-$run.err" >&2; echo "$peer failed" >&2; exit 1; }
}

for run in $(seq 1 "$RUNS"); do
  run_fazt "$run"
  for p in $PEERS; do run_peer "$p" "$run"; done
done

node - "$RESULTS" <<'EOF'
const fs = require('fs');
const lines = fs.readFileSync(process.argv[2], 'utf8').trim().split('\n');
const v = {}; // v[name][metric][run] = value
for (const l of lines) {
  const m = /run=(\d+) name=(\S+) metric=(\S+) value=(\S+)/.exec(l);
  if (!m) continue;
  ((v[m[2]] ||= {})[m[3]] ||= {})[m[1]] = Number(m[4]);
}
const fz = v['jobs.fazt'];
const med = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
const f = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3));
console.log(`\n== Jobs, same run (${Object.keys(fz.throughput_e2e).length} runs, A/B interleaved): median (min..max) ==`);
for (const [name, metrics] of Object.entries(v)) {
  for (const [metric, runs] of Object.entries(metrics)) {
    const xs = Object.values(runs);
    console.log(`${name.padEnd(28)} ${metric.padEnd(34)} ${f(med(xs)).padStart(8)}  (${f(Math.min(...xs))}..${f(Math.max(...xs))})`);
  }
}
const pairs = [
  ['drain_rate', 'drain_rate', 'drain rate vs drain rate (higher is better)', false],
  ['throughput_e2e', 'throughput_e2e', 'end to end vs end to end (higher is better)', false],
  ['open_throughput_e2e', 'drain_rate', 'fazt open e2e vs peer drain rate (goal 1)', false],
  ['open_burst_enq_to_start_p99', 'backlog_enq_to_start_p99', 'open-burst enq->start p99 vs backlog p99', true],
  [`paced${process.env.PROBE_RATE || 200}_enq_to_start_p99`, `paced${process.env.PROBE_RATE || 200}_enq_to_start_p99`, 'paced p99 vs paced p99 (lower is better)', true],
  ['backlog_enq_to_start_p99', 'backlog_enq_to_start_p99', 'gated backlog p99 vs backlog p99 (lower is better)', true],
];
console.log('\n== Ratios fazt / peer, per run then median (min..max) ==');
for (const [peer, metrics] of Object.entries(v)) {
  if (peer === 'jobs.fazt') continue;
  for (const [fm, pm, what] of pairs) {
    const rs = Object.keys(fz[fm] || {}).filter((r) => metrics[pm] && r in metrics[pm])
      .map((r) => fz[fm][r] / Math.max(metrics[pm][r], 1e-9));
    if (!rs.length) continue;
    console.log(`${peer.padEnd(28)} ${what.padEnd(54)} ${med(rs).toFixed(2)}x  (${Math.min(...rs).toFixed(2)}..${Math.max(...rs).toFixed(2)})`);
  }
}
console.log('(fazt timestamps have 1 ms resolution: a paced p99 of 1 ms means "within the same or next ms")');
EOF
