#!/usr/bin/env bash
# Server CPU per job (user+sys from /proc, in total and for the store writer and the
# scheduler threads) and wall time, A/B interleaved: CPU time per job moves less than
# throughput on a machine other work shares, so it shows what a change costs per job.
#
# Per run, a fresh server (data dir, 20 + 20 + 4 apps):
#  - open: 10,000 no-op jobs spawned over 20 apps (batches of 100, 4 requests at a time)
#    while the pool runs, until every job ended;
#  - drain: 10,000 jobs spawned behind 20 gate jobs holding every slot, then the gates
#    open; measured from the opening until every job ended.
# Prints a RESULT line per run, then per metric the medians and the median of the
# per-round ratios B/A with their spread.
#
# Usage: scripts/bench_jobs_cpu.sh BIN_A BIN_B   (env: ROUNDS=4)
# Needs: node, curl, bc.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ $# -eq 2 ] || { echo "usage: $0 BIN_A BIN_B" >&2; exit 2; }
ROUNDS="${ROUNDS:-4}"
RESULTS="$WORK/results.txt"
: >"$RESULTS"

mkdir -p "$WORK/app/api" "$WORK/app/workers"
echo 'module.exports = function (job) { return null; };' >"$WORK/app/workers/noop.js"
echo 'module.exports = function (job) { while (fazt.storage.kv.get("go") !== true) job.sleep(2); return null; };' \
  >"$WORK/app/workers/gate.js"
echo 'module.exports = function () { fazt.storage.kv.set("go", true); return { ok: true }; };' \
  >"$WORK/app/api/go.js"
cat >"$WORK/app/api/spawn.js" <<'JS'
module.exports = function (request) {
  const q = request.query; const n = Number(q.n || 0);
  const path = q.gate ? 'workers/gate.js' : 'workers/noop.js';
  for (let i = 0; i < n; i++) fazt.worker.spawn(path, { memory: '1MB' });
  return { spawned: n };
};
JS

HZ="$(getconf CLK_TCK)"
# ticks [THREAD_PREFIX]: CPU ticks of the server (or of its threads so named).
ticks() {
  if [ -z "${1:-}" ]; then awk '{print $14+$15}' "/proc/$FAZT_PID/stat"; return; fi
  local t s=0
  for t in /proc/"$FAZT_PID"/task/*; do
    grep -q "^$1" "$t/comm" 2>/dev/null && s=$((s + $(awk '{print $14+$15}' "$t/stat")))
  done
  echo "$s"
}
idle() {
  while [ "$(curl -sS "http://$FAZT_ADDR/health" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const w=JSON.parse(s).workers;console.log(w.queued+w.running)})')" != 0 ]; do
    sleep 0.05
  done
}
spawn_all() {
  xargs -P 4 -I{} sh -c 'curl -sS --fail-with-body -o /dev/null -H "Host: {}.localhost:$FAZT_PORT" "http://$FAZT_ADDR/api/spawn?n=100"' <"$1"
}
# per_job A B: microseconds of CPU per job between tick counts A and B.
per_job() { echo "($2 - $1) * 1000000 / $HZ / 10000" | bc; }

run() {
  local name=$1 bin=$2
  start_fazt "$bin"
  export FAZT_ADDR FAZT_PORT
  : >"$WORK/open"; : >"$WORK/gated"
  for i in $(seq 1 20); do
    deploy_app "o$i" "$WORK/app"; deploy_app "g$i" "$WORK/app"
    for _ in 1 2 3 4 5; do echo "o$i" >>"$WORK/open"; echo "g$i" >>"$WORK/gated"; done
  done
  for i in 1 2 3 4; do deploy_app "gate$i" "$WORK/app"; done
  local c0 w0 s0 t0 c1 w1 s1 t1 c2 w2 s2 t2 c3 w3 s3 t3
  c0=$(ticks); w0=$(ticks fazt-store-w); s0=$(ticks fazt-sched); t0=$(date +%s.%N)
  spawn_all "$WORK/open"
  idle
  c1=$(ticks); w1=$(ticks fazt-store-w); s1=$(ticks fazt-sched); t1=$(date +%s.%N)
  for i in 1 2 3 4; do app_get "gate$i" "/api/spawn?n=5&gate=1" -o /dev/null; done
  sleep 0.5
  spawn_all "$WORK/gated"
  sleep 0.5
  c2=$(ticks); w2=$(ticks fazt-store-w); s2=$(ticks fazt-sched); t2=$(date +%s.%N)
  for i in 1 2 3 4; do app_get "gate$i" /api/go -o /dev/null; done
  idle
  c3=$(ticks); w3=$(ticks fazt-store-w); s3=$(ticks fazt-sched); t3=$(date +%s.%N)
  echo "RESULT $name open_cpu_us_per_job $(per_job "$c0" "$c1") open_writer_cpu_us_per_job $(per_job "$w0" "$w1") open_sched_cpu_us_per_job $(per_job "$s0" "$s1") open_wall_s $(echo "$t1 - $t0" | bc) drain_cpu_us_per_job $(per_job "$c2" "$c3") drain_writer_cpu_us_per_job $(per_job "$w2" "$w3") drain_sched_cpu_us_per_job $(per_job "$s2" "$s3") drain_wall_s $(echo "$t3 - $t2" | bc)" |
    tee -a "$RESULTS" >&2
  kill -INT "$FAZT_PID"; wait "$FAZT_PID" 2>/dev/null || true
}

for r in $(seq 1 "$ROUNDS"); do
  run A "$1"
  run B "$2"
done

python3 - "$RESULTS" <<'PY'
import statistics as st, sys
rows = [l.split()[1:] for l in open(sys.argv[1]) if l.startswith('RESULT')]
runs = {'A': [], 'B': []}
for r in rows:
    runs[r[0]].append({r[i]: float(r[i + 1]) for i in range(1, len(r) - 1, 2)})
n = min(len(runs['A']), len(runs['B']))
print(f"\n== CPU per job, {n} rounds A/B interleaved: medians, and B/A per round: median (min..max) ==")
for k in runs['A'][0]:
    a = [x[k] for x in runs['A'][:n]]; b = [x[k] for x in runs['B'][:n]]
    rs = [y / x for x, y in zip(a, b) if x]
    print(f"{k:28} A {st.median(a):9.2f}  B {st.median(b):9.2f}  B/A {st.median(rs):.2f} ({min(rs):.2f}..{max(rs):.2f})")
PY
