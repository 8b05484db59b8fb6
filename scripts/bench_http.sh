#!/usr/bin/env bash
# HTTP throughput and latency of fazt beside a Node plain-http server measured in the
# same run, with the shared wrk driver (2 threads, 50 connections, 10 s each):
#   node.counter   Node 20 `http`, a counter JSON handler (the baseline)
#   fazt.handler   fazt app handler `module.exports = () => ({ok: true})`
#   fazt.static    fazt static file (index.html)
# Also prints fazt's resident memory (VmRSS) idle after start and idle after the load.
#
# Usage: scripts/bench_http.sh      (SKIP_BUILD=1 to reuse target/release/fazt;
#        WRK_DURATION=10s, WRK_CONNS=50, WRK_THREADS=2 are passed to the driver)
# Needs: wrk (apt-get install wrk), node, curl. Builds the release binary first
# (cargo build --release: a few minutes when not up to date).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }
build_release
install_host_shims

# --- Node baseline ------------------------------------------------------------------
cat >"$WORK/node-counter.js" <<'EOF'
'use strict';
const http = require('http');
let n = 0;
const server = http.createServer((req, res) => {
  n += 1;
  const body = JSON.stringify({ count: n });
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});
server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
EOF
start_node_baseline "$WORK/node-counter.js"

# --- fazt ---------------------------------------------------------------------------
start_fazt
sleep 1
RSS_START="$(rss_kb "$FAZT_PID")"
mkdir -p "$WORK/app/api"
echo 'module.exports = () => ({ok: true});' >"$WORK/app/api/hello.js"
printf '<!doctype html>\n<title>bench</title>\n<p>Hello from a static file.</p>\n' >"$WORK/app/index.html"
deploy_app bench "$WORK/app"
app_get bench /api/hello >/dev/null
app_get bench / >/dev/null

run() { # NAME URL [HOST]: runs the shared driver, keeps its RESULT lines.
  note "wrk: $1 $2 ${3:+(Host: $3)}"
  BENCH_HOST_HEADER="${3:-}" bash "$SHARED_BENCH/wrk_bench.sh" "$1" "$2" \
    >"$WORK/$1.result" 2>"$WORK/$1.wrk"
  grep '^RESULT' "$WORK/$1.result"
  grep -h '^WARN' "$WORK/$1.wrk" >&2 || true
}
run node.counter "http://127.0.0.1:$NODE_PORT/"
run fazt.handler "http://127.0.0.1:$FAZT_PORT/api/hello" "bench.localhost:$FAZT_PORT"
run fazt.static "http://127.0.0.1:$FAZT_PORT/" "bench.localhost:$FAZT_PORT"
sleep 2
RSS_AFTER="$(rss_kb "$FAZT_PID")"

# --- summary ------------------------------------------------------------------------
v() { result_value "$WORK/$1.result" "$1" "$2"; }
echo
echo "== HTTP, same run (wrk ${WRK_THREADS:-2} threads, ${WRK_CONNS:-50} connections, ${WRK_DURATION:-10s}) =="
printf '%-14s %12s %10s %10s %8s\n' name req/s p50_ms p99_ms non2xx
for n in node.counter fazt.handler fazt.static; do
  printf '%-14s %12s %10s %10s %8s\n' "$n" "$(v $n throughput)" "$(v $n latency_p50)" "$(v $n latency_p99)" "$(v $n non_2xx)"
done
echo "ratio fazt.handler/node req/s: $(ratio "$(v fazt.handler throughput)" "$(v node.counter throughput)")  p99: $(ratio "$(v fazt.handler latency_p99)" "$(v node.counter latency_p99)")"
echo "ratio fazt.static/node  req/s: $(ratio "$(v fazt.static throughput)" "$(v node.counter throughput)")  p99: $(ratio "$(v fazt.static latency_p99)" "$(v node.counter latency_p99)")"
echo "fazt RSS: idle after start ${RSS_START} kB, idle after the load ${RSS_AFTER} kB"
echo "reference (shared/bench/README.md): Node 20 plain http counter JSON ~43,600 req/s, p99 7.7 ms"
