#!/usr/bin/env bash
# WebSocket fan-out of fazt beside a minimal Node + ws server measured in the same run,
# with the shared driver (shared/bench/ws_fanout_client.js), 100 subscribers:
#   1. server-generated broadcasts (driver mode `trigger`): COUNT messages of SIZE chars
#      as fast as the server makes them. In fazt a worker waits until the driver's
#      control connection is open (that is when the driver sends its trigger frame,
#      which fazt itself ignores) and broadcasts; Node generates them on the frame.
#   2. paced 500 msg/s (driver mode `http`, --rate 500): each message is one HTTP POST
#      that a handler (fazt) or a request listener (Node) broadcasts.
# Prints deliveries/s and p50/p99 latency (send to receipt) for both, and fazt/Node.
# The shared peer script (shared/bench/peers/ws/node_ws.sh: Node 20 + ws 8.23, its own
# server, modes `server` and `paced`, where the driver publishes over WebSocket at
# RATE/s) runs in the same script run too, and fazt's figures are also given as ratios
# against it.
# fazt's worker stamps messages with Date.now() (whole ms), Node with fractional ms.
#
# Usage: scripts/bench_ws.sh       (env: CLIENTS=100 COUNT=1000 SIZE=200 PACED=2500
#                                   RATE=500; SKIP_BUILD=1 to reuse target/release/fazt)
# Needs: node, curl, the `ws` package (installed into /tmp/wsdrv if missing). Builds the
# release binary first (cargo build --release: a few minutes when not up to date).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CLIENTS="${CLIENTS:-100}"
COUNT="${COUNT:-1000}"
SIZE="${SIZE:-200}"
PACED="${PACED:-2500}"
RATE="${RATE:-500}"
command -v node >/dev/null || { echo "node is missing" >&2; exit 1; }
export NODE_PATH="${NODE_PATH:-/tmp/wsdrv/node_modules}"
if ! node -e 'require("ws")' 2>/dev/null; then
  note "installing ws into /tmp/wsdrv"
  npm install --silent --prefix /tmp/wsdrv ws >&2
  export NODE_PATH=/tmp/wsdrv/node_modules
fi
DRIVER="$SHARED_BENCH/peers/ws/ws_fanout_client.js"
[ -f "$DRIVER" ] || DRIVER="$SHARED_BENCH/ws_fanout_client.js"
PEER_WS="$SHARED_BENCH/peers/ws/node_ws.sh"

build_release
install_host_shims

# --- Node + ws baseline -------------------------------------------------------------
cat >"$WORK/node-ws.js" <<'EOF'
'use strict';
// Minimal hub: the fazt protocol's subscribe/subscribed and message envelope, a
// `bench` frame that generates messages, and POST /publish that broadcasts its body.
const http = require('http');
const { performance } = require('perf_hooks');
const { WebSocketServer, WebSocket } = require('ws');
const subs = new Set();
const envelope = (data) => JSON.stringify({ type: 'message', channel: 'bench', data, timestamp: Date.now() });
const send = (text) => { for (const c of subs) if (c.readyState === WebSocket.OPEN) c.send(text); };
const server = http.createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/publish') { res.writeHead(404); res.end(); return; }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let v = Buffer.concat(chunks).toString();
    try { v = JSON.parse(v); } catch (e) { /* a plain string */ }
    send(envelope(v));
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end('{"ok":true}');
  });
});
const wss = new WebSocketServer({ server, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (raw) => {
    let m; try { m = JSON.parse(raw); } catch (e) { return; }
    if (m.type === 'subscribe') { subs.add(ws); ws.send(JSON.stringify({ type: 'subscribed', channel: m.channel })); }
    if (m.type === 'bench') {
      for (let i = 0; i < m.count; i++) {
        const head = `B|${i}|${(performance.timeOrigin + performance.now()).toFixed(3)}|`;
        send(envelope(head + 'x'.repeat(Math.max(0, m.size - head.length))));
      }
    }
  });
  ws.on('close', () => subs.delete(ws));
});
server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
EOF
start_node_baseline "$WORK/node-ws.js"

# --- fazt ---------------------------------------------------------------------------
start_fazt
mkdir -p "$WORK/app/api" "$WORK/app/workers"
cat >"$WORK/app/workers/fanout.js" <<'EOF'
// Waits until `clients` subscribers and the driver's control connection are open, then
// broadcasts `count` marked messages of `size` chars on channel "bench".
module.exports = function (job) {
  const d = job.data;
  const deadline = Date.now() + 60000;
  while (fazt.realtime.count() < d.clients + 1) {
    if (Date.now() > deadline) throw new Error('the driver did not connect within 60 s');
    job.sleep(2);
  }
  for (let i = 0; i < d.count; i++) {
    const head = 'B|' + i + '|' + Date.now() + '|';
    fazt.realtime.broadcast('bench', head + 'x'.repeat(Math.max(0, d.size - head.length)));
  }
  return { sent: d.count };
};
EOF
cat >"$WORK/app/api/start.js" <<'EOF'
module.exports = function (request) {
  const q = request.query;
  return fazt.worker.spawn('workers/fanout.js', {
    data: { clients: Number(q.clients), count: Number(q.count), size: Number(q.size) },
    memory: '16MB',
    timeout: '5m',
  });
};
EOF
cat >"$WORK/app/api/publish.js" <<'EOF'
module.exports = function (request) {
  fazt.realtime.broadcast('bench', request.body);
  return { ok: true };
};
EOF
deploy_app ws "$WORK/app"
FAZT_HOST="ws.localhost:$FAZT_PORT"

drive() { # NAME HOST_HEADER DRIVER_ARGS...: runs the shared driver, keeps RESULT lines.
  local name=$1 host=$2; shift 2
  note "driver: $name $*"
  BENCH_HOST_HEADER="$host" NODE_OPTIONS="--require $HOST_SHIM_JS" \
    node "$DRIVER" --name "$name" --clients "$CLIENTS" \
    --subscribe '{"type":"subscribe","channel":"bench"}' --ack subscribed "$@" \
    >"$WORK/$name.result" 2>"$WORK/$name.err" || {
      echo "driver $name exited $? (lost messages or a timeout); stderr:" >&2
      tail -n 5 "$WORK/$name.err" >&2
    }
  grep '^RESULT' "$WORK/$name.result" || true
}

# 1. Server-generated broadcasts.
drive node.trigger "127.0.0.1:$NODE_PORT" --url "ws://127.0.0.1:$NODE_PORT/" \
  --mode trigger --count "$COUNT" --size "$SIZE"
JOB="$(app_get ws "/api/start?clients=$CLIENTS&count=$COUNT&size=$SIZE")"
JOB_ID="$(node -e 'console.log(JSON.parse(process.argv[1]).id)' "$JOB")"
drive fazt.trigger "$FAZT_HOST" --url "ws://127.0.0.1:$FAZT_PORT/_ws" \
  --mode trigger --count "$COUNT" --size "$SIZE"
JOB_STATUS="$(api "/api/jobs/$JOB_ID" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s);console.log(j.status+(j.error?": "+j.error:""))})')"

# 2. Paced, one HTTP publish per message.
drive node.paced "127.0.0.1:$NODE_PORT" --url "ws://127.0.0.1:$NODE_PORT/" \
  --mode http --publish-url "http://127.0.0.1:$NODE_PORT/publish" \
  --count "$PACED" --size "$SIZE" --rate "$RATE"
drive fazt.paced "$FAZT_HOST" --url "ws://127.0.0.1:$FAZT_PORT/_ws" \
  --mode http --publish-url "http://127.0.0.1:$FAZT_PORT/api/publish" \
  --count "$PACED" --size "$SIZE" --rate "$RATE"
# 3. The shared peer, Node + ws, in this run.
if [ -f "$PEER_WS" ]; then
  note "peer: $PEER_WS (MODES='server paced', PACED_RATE=$RATE)"
  CLIENTS="$CLIENTS" COUNT="$COUNT" SIZE="$SIZE" PACED_RATE="$RATE" MODES="server paced" \
    bash "$PEER_WS" >"$WORK/peer.result" 2>"$WORK/peer.err" || {
      echo "node_ws.sh exited $?; stderr:" >&2
      tail -n 5 "$WORK/peer.err" >&2
    }
  grep '^RESULT' "$WORK/peer.result" || true
fi
SLOW="$(api /metrics | awk '$1 == "fazt_ws_slow_disconnects_total" { print $2 }')"

# --- summary ------------------------------------------------------------------------
v() { result_value "$WORK/$1.result" "$1" "$2"; }
echo
echo "== WebSocket fan-out, same run: $CLIENTS subscribers, $SIZE-char messages =="
printf '%-13s %10s %6s %14s %12s %10s %10s\n' name delivered lost deliveries/s msgs/s p50_ms p99_ms
for n in node.trigger fazt.trigger node.paced fazt.paced; do
  printf '%-13s %10s %6s %14s %12s %10s %10s\n' "$n" "$(v $n delivered)" "$(v $n lost)" \
    "$(v $n deliveries_per_s)" "$(v $n broadcasts_per_s)" "$(v $n latency_p50)" "$(v $n latency_p99)"
done
echo "ratio fazt/node, server-generated: deliveries/s $(ratio "$(v fazt.trigger deliveries_per_s)" "$(v node.trigger deliveries_per_s)"), p99 $(ratio "$(v fazt.trigger latency_p99)" "$(v node.trigger latency_p99)")"
echo "ratio fazt/node, paced $RATE msg/s: p99 $(ratio "$(v fazt.paced latency_p99)" "$(v node.paced latency_p99)")"
pv() { result_value "$WORK/peer.result" "$1" "$2"; }
PEER_PACED="ws.node_ws.publish_paced$RATE"
if [ -s "$WORK/peer.result" ]; then
  echo "peer node_ws.sh: server_gen $(pv ws.node_ws.server_gen deliveries_per_s) deliveries/s (p99 $(pv ws.node_ws.server_gen latency_p99) ms, lost $(pv ws.node_ws.server_gen lost)); paced $RATE/s over WS p50 $(pv "$PEER_PACED" latency_p50) ms, p99 $(pv "$PEER_PACED" latency_p99) ms, lost $(pv "$PEER_PACED" lost)"
  echo "ratio fazt/node_ws.sh, server-generated: deliveries/s $(ratio "$(v fazt.trigger deliveries_per_s)" "$(pv ws.node_ws.server_gen deliveries_per_s)")"
  echo "ratio fazt/node_ws.sh, paced $RATE msg/s: p99 $(ratio "$(v fazt.paced latency_p99)" "$(pv "$PEER_PACED" latency_p99)") (fazt publishes by HTTP POST, the peer over WebSocket)"
fi
echo "fazt broadcaster job: $JOB_STATUS; slow-client disconnects: ${SLOW:-?}"
echo "reference (shared/bench/README.md): Node 20 + ws, 100 subscribers: ~180,000 deliveries/s, p99 21 ms; paced 500 msg/s p99 8.5 ms, 0 lost"
