#!/usr/bin/env bash
# WebSocket scale: SUBS subscribers held open on one fazt server while COUNT broadcasts
# go out at RATE/s (each one HTTP POST to a handler that broadcasts it), driven by the
# shared fan-out driver (shared/bench/ws_fanout_client.js, one Node process). Samples
# the server's thread count and RSS from /proc/PID/status while the clients are
# connected and prints the peaks, per subscriber, and delivered/lost.
#
# Usage: scripts/bench_ws_scale.sh   (env: SUBS=10000 COUNT=100 RATE=10 SIZE=200;
#   FAZT_BIN=path to measure another build (e.g. the previous commit's) in the same run;
#   SKIP_BUILD=1 to reuse target/release/fazt)
# All clients come from 127.0.0.1, so the per-IP caps (HTTP and WebSocket) are raised
# for the run; nothing else is changed from the defaults.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SUBS="${SUBS:-10000}"
COUNT="${COUNT:-100}"
RATE="${RATE:-10}"
SIZE="${SIZE:-200}"
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }
export NODE_PATH="${NODE_PATH:-$HOME/.cache/steering-peers/node/node_modules}"
node -e 'require("ws")' 2>/dev/null || { echo "the ws package is missing: run ../shared/bench/peers/ws/node_ws.sh once" >&2; exit 1; }
DRIVER="$SHARED_BENCH/peers/ws/ws_fanout_client.js"
[ -f "$DRIVER" ] || DRIVER="$SHARED_BENCH/ws_fanout_client.js"

if [ -n "${FAZT_BIN:-}" ]; then FAZT="$FAZT_BIN"; else build_release; fi
install_host_shims
ulimit -n "$(ulimit -Hn)"

CAP=$((SUBS * 2 + 100))
FAZT_SERVER_ARGS=(--ws-max-per-app "$CAP" --ws-max-per-ip "$CAP"
  --max-connections "$CAP" --max-connections-per-ip "$CAP")
start_fazt
mkdir -p "$WORK/app/api"
cat >"$WORK/app/api/publish.js" <<'EOF'
module.exports = function (request) {
  fazt.realtime.broadcast('bench', request.body);
  return { ok: true };
};
EOF
deploy_app ws "$WORK/app"
status() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
idle_threads="$(status "$FAZT_PID" Threads)"
idle_rss="$(status "$FAZT_PID" VmRSS)"

# Peak threads and RSS while the driver runs (sampled every 100 ms).
: >"$WORK/samples"
(
  while kill -0 "$FAZT_PID" 2>/dev/null; do
    echo "$(status "$FAZT_PID" Threads) $(status "$FAZT_PID" VmRSS)" >>"$WORK/samples"
    sleep 0.1
  done
) &
SAMPLER=$!
note "driver: $SUBS subscribers, $COUNT broadcasts at $RATE/s"
BENCH_HOST_HEADER="ws.localhost:$FAZT_PORT" NODE_OPTIONS="--require $HOST_SHIM_JS" \
  node "$DRIVER" --name "fazt.scale$SUBS" --url "ws://127.0.0.1:$FAZT_PORT/_ws" \
  --clients "$SUBS" --subscribe '{"type":"subscribe","channel":"bench"}' --ack subscribed \
  --mode http --publish-url "http://127.0.0.1:$FAZT_PORT/api/publish" \
  --count "$COUNT" --size "$SIZE" --rate "$RATE" --timeout-s 120 \
  >"$WORK/driver.result" 2>"$WORK/driver.err" || {
    echo "driver exited $? (lost messages or a timeout); stderr:" >&2
    tail -n 5 "$WORK/driver.err" >&2
    echo "server stderr:" >&2
    tail -n 5 "$WORK/fazt0.err" >&2
  }
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
grep '^RESULT' "$WORK/driver.result" || true
# Held: the sample 1 s before the driver ended (its last receipt), once the burst of
# connection threads from the connect storm (idle ones end after 5 s) is gone.
held="$(tail -n 11 "$WORK/samples" | head -n 1)"
held_threads="${held%% *}"
held_rss="${held##* }"
peak_threads="$(awk 'BEGIN { m = 0 } $1 > m { m = $1 } END { print m }' "$WORK/samples")"
peak_rss="$(awk 'BEGIN { m = 0 } $2 > m { m = $2 } END { print m }' "$WORK/samples")"
kill -0 "$FAZT_PID" 2>/dev/null || { echo "the server died during the run" >&2; exit 1; }
hwm="$(status "$FAZT_PID" VmHWM)"
v() { result_value "$WORK/driver.result" "fazt.scale$SUBS" "$1"; }
echo
echo "== WebSocket scale: $SUBS subscribers, $COUNT broadcasts at $RATE/s ($FAZT) =="
echo "idle: threads $idle_threads, RSS $((idle_rss / 1024)) MB"
echo "held (1 s before the end): threads $held_threads, RSS $((held_rss / 1024)) MB"
echo "peak: threads $peak_threads, RSS $((peak_rss / 1024)) MB (VmHWM $((hwm / 1024)) MB)"
awk -v t="$held_threads" -v it="$idle_threads" -v r="$held_rss" -v ir="$idle_rss" -v n="$SUBS" \
  'BEGIN { printf "per subscriber held: %.3f threads, %.1f KB RSS (minus idle)\n", (t - it) / n, (r - ir) / n }'
echo "delivered $(v delivered), lost $(v lost), p50 $(v latency_p50) ms, p99 $(v latency_p99) ms, connect_all $(v connect_all) ms"
