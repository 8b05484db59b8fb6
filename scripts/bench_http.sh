#!/usr/bin/env bash
# HTTP throughput and latency of fazt beside a Node plain-http server and beside the
# ceiling of fazt's own HTTP stack, all in the same run, with the shared wrk driver
# (2 threads, 50 connections, 10 s each):
#   node.counter   Node 20 `http`, a counter JSON handler (the baseline)
#   ceiling.hello  benches/http_ceiling: our vendored tiny_http with fazt's limits
#                  and 16 request threads answering {"ok":true}, nothing else (the
#                  most the handler path could reach on this stack)
#   fazt.handler   fazt app handler `module.exports = () => ({ok: true})`
#   fazt.static    fazt static file (index.html)
# The four run interleaved, ROUNDS times (default 3); the summary gives each one's
# median and the median (and spread) of the per-round ratios. Also prints fazt's
# resident memory (VmRSS) idle after start, and 2 s and 10 s after the load.
#
# Usage: scripts/bench_http.sh      (SKIP_BUILD=1 to reuse the release binaries;
#        ROUNDS=3; WRK_DURATION=10s, WRK_CONNS=50, WRK_THREADS=2 go to the driver;
#        FAZT_BASELINE=path/to/other/fazt adds base.handler and base.static, the same
#        app on that binary, to every round: an A/B in one run)
# Needs: wrk (apt-get install wrk), node, curl. Builds the release binaries first
# (cargo build --release: a few minutes when not up to date).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }
build_release
# The ceiling is its own small package (benches/http_ceiling), built in seconds.
CEILING_TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/ceiling"
CEILING="$CEILING_TARGET/release/http_ceiling"
if [ "${SKIP_BUILD:-0}" != 1 ] || [ ! -x "$CEILING" ]; then
  CARGO_TARGET_DIR="$CEILING_TARGET" cargo build --release \
    --manifest-path "$ROOT/benches/http_ceiling/Cargo.toml" >&2
fi
install_host_shims
ROUNDS="${ROUNDS:-3}"

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

# --- the ceiling: bare tiny_http ----------------------------------------------------
start_listening CEILING_PORT "$CEILING"

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
FAZT_MAIN_PID=$FAZT_PID FAZT_MAIN_PORT=$FAZT_PORT
if [ -n "${FAZT_BASELINE:-}" ]; then
  # A/B in the same run: the same app on another fazt binary (e.g. main's build).
  start_fazt "$FAZT_BASELINE"
  deploy_app bench "$WORK/app"
  app_get bench /api/hello >/dev/null
  app_get bench / >/dev/null
  BASE_PORT=$FAZT_PORT BASE_PID=$FAZT_PID
  FAZT_PID=$FAZT_MAIN_PID FAZT_PORT=$FAZT_MAIN_PORT
fi

run() { # NAME ROUND URL [HOST]: runs the shared driver, keeps its RESULT lines.
  note "wrk round $2: $1 $3 ${4:+(Host: $4)}"
  BENCH_HOST_HEADER="${4:-}" bash "$SHARED_BENCH/wrk_bench.sh" "$1" "$3" \
    >"$WORK/$1.$2.result" 2>"$WORK/$1.$2.wrk"
  grep '^RESULT' "$WORK/$1.$2.result" >&2
  grep -h '^WARN' "$WORK/$1.$2.wrk" >&2 || true
}
NAMES=(node.counter ceiling.hello fazt.handler fazt.static)
[ -n "${FAZT_BASELINE:-}" ] && NAMES+=(base.handler base.static)
for r in $(seq 1 "$ROUNDS"); do
  run node.counter "$r" "http://127.0.0.1:$NODE_PORT/"
  run ceiling.hello "$r" "http://127.0.0.1:$CEILING_PORT/"
  run fazt.handler "$r" "http://127.0.0.1:$FAZT_PORT/api/hello" "bench.localhost:$FAZT_PORT"
  run fazt.static "$r" "http://127.0.0.1:$FAZT_PORT/" "bench.localhost:$FAZT_PORT"
  if [ -n "${FAZT_BASELINE:-}" ]; then
    run base.handler "$r" "http://127.0.0.1:$BASE_PORT/api/hello" "bench.localhost:$BASE_PORT"
    run base.static "$r" "http://127.0.0.1:$BASE_PORT/" "bench.localhost:$BASE_PORT"
  fi
done
sleep 2
RSS_AFTER="$(rss_kb "$FAZT_PID")"
[ -n "${FAZT_BASELINE:-}" ] && RSS_BASE="$(rss_kb "$BASE_PID")"
# HTTP threads left idle drop their warm contexts after 5 s (src/http/mod.rs WARM_IDLE).
sleep 8
RSS_SETTLED="$(rss_kb "$FAZT_PID")"
[ -n "${FAZT_BASELINE:-}" ] && RSS_BASE_SETTLED="$(rss_kb "$BASE_PID")"

# --- summary ------------------------------------------------------------------------
v() { result_value "$WORK/$1.$3.result" "$1" "$2"; }            # NAME METRIC ROUND
med() { for r in $(seq 1 "$ROUNDS"); do v "$1" "$2" "$r"; done | median; }
# ratios A B METRIC: the per-round ratios A/B, one a line.
ratios() { for r in $(seq 1 "$ROUNDS"); do ratio "$(v "$1" "$3" "$r")" "$(v "$2" "$3" "$r")"; echo; done; }
rline() { # LABEL A B: req/s and p99 ratios, median (spread) over the rounds.
  printf '%-28s req/s %s (%s)   p99 %s (%s)\n' "$1" \
    "$(ratios "$2" "$3" throughput | median)" "$(ratios "$2" "$3" throughput | spread)" \
    "$(ratios "$2" "$3" latency_p99 | median)" "$(ratios "$2" "$3" latency_p99 | spread)"
}
echo
echo "== HTTP, same run (wrk ${WRK_THREADS:-2} threads, ${WRK_CONNS:-50} connections, ${WRK_DURATION:-10s}, $ROUNDS interleaved rounds, medians) =="
printf '%-14s %12s %10s %10s %8s\n' name req/s p50_ms p99_ms non2xx
for n in "${NAMES[@]}"; do
  printf '%-14s %12s %10s %10s %8s\n' "$n" "$(med $n throughput)" "$(med $n latency_p50)" \
    "$(med $n latency_p99)" "$(med $n non_2xx)"
done
echo "ratios, median of the per-round ratios (spread):"
rline "fazt.handler / node" fazt.handler node.counter
rline "fazt.static / node" fazt.static node.counter
rline "ceiling.hello / node" ceiling.hello node.counter
rline "fazt.handler / ceiling" fazt.handler ceiling.hello
rline "fazt.static / ceiling" fazt.static ceiling.hello
if [ -n "${FAZT_BASELINE:-}" ]; then
  rline "fazt.handler / base.handler" fazt.handler base.handler
  rline "fazt.static / base.static" fazt.static base.static
  rline "base.handler / node" base.handler node.counter
  rline "base.static / node" base.static node.counter
  echo "baseline ($FAZT_BASELINE) RSS idle after the load: ${RSS_BASE} kB 2 s after, ${RSS_BASE_SETTLED} kB 10 s after"
fi
echo "fazt RSS: idle after start ${RSS_START} kB, idle after the load ${RSS_AFTER} kB 2 s after, ${RSS_SETTLED} kB 10 s after"
echo "reference (shared/bench/README.md): Node 20 plain http counter JSON ~43,600 req/s, p99 7.7 ms"
