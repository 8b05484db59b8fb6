# Shared helpers for the bench_*.sh scripts (sourced, not run). They build the release
# binary, start `fazt server` on a free loopback port in a temp data dir, deploy apps,
# and clean everything up on exit. Everything talks to 127.0.0.1 only.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
FAZT="$ROOT/target/release/fazt"
WORK="$(mktemp -d /tmp/fazt-bench.XXXXXX)"
PIDS=()

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    # SIGINT first: fazt shuts down gracefully on Ctrl-C.
    kill -INT "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

note() { echo "# $*" >&2; }

# Builds target/release/fazt once per run (a clean release build takes a few minutes;
# an up-to-date one is a no-op). SKIP_BUILD=1 uses the binary as it is.
build_release() {
  if [ "${SKIP_BUILD:-0}" = 1 ] && [ -x "$FAZT" ]; then
    note "SKIP_BUILD=1: using $FAZT as it is"
    return
  fi
  note "cargo build --release (a clean build takes a few minutes; up to date: seconds)"
  (cd "$ROOT" && cargo build --release --bin fazt >&2)
}

# start_fazt [BINARY]: starts fazt (default $FAZT) on 127.0.0.1:0 with a fresh data
# dir. Sets FAZT_PID, FAZT_ADDR, FAZT_PORT, FAZT_DATA, FAZT_TOKEN.
start_fazt() {
  local bin="${1:-$FAZT}" n=0
  while [ -e "$WORK/fazt$n.out" ]; do n=$((n + 1)); done
  FAZT_DATA="$WORK/fazt-data$n"
  # FAZT_SERVER_ARGS (an array, optional): extra `fazt server` flags.
  "$bin" --data-dir "$FAZT_DATA" server --listen 127.0.0.1:0 \
    ${FAZT_SERVER_ARGS[@]+"${FAZT_SERVER_ARGS[@]}"} \
    >"$WORK/fazt$n.out" 2>"$WORK/fazt$n.err" &
  FAZT_PID=$!
  PIDS+=("$FAZT_PID")
  FAZT_ADDR=""
  for _ in $(seq 1 300); do
    FAZT_ADDR="$(sed -n 's|^fazt listening on http://||p' "$WORK/fazt$n.out" | head -n1)"
    [ -n "$FAZT_ADDR" ] && break
    kill -0 "$FAZT_PID" 2>/dev/null || { cat "$WORK/fazt$n.err" >&2; echo "fazt exited at start" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$FAZT_ADDR" ] || { cat "$WORK/fazt$n.err" >&2; echo "fazt did not print its address" >&2; exit 1; }
  FAZT_PORT="${FAZT_ADDR##*:}"
  FAZT_TOKEN="$(cat "$FAZT_DATA/admin.token")"
  note "fazt pid $FAZT_PID on http://$FAZT_ADDR (data dir $FAZT_DATA)"
}

# deploy_app NAME DIR: uploads DIR as app NAME with the fazt CLI.
deploy_app() {
  "$FAZT" --server "http://$FAZT_ADDR" --data-dir "$FAZT_DATA" app deploy "$2" --name "$1" >/dev/null
}

# api PATH [curl args...]: the system API with the admin token.
api() {
  local path=$1; shift
  curl -sS --fail-with-body -H "Authorization: Bearer $FAZT_TOKEN" "$@" "http://$FAZT_ADDR$path"
}

# app_get APP PATH [curl args...]: app traffic (routing is by Host header).
app_get() {
  local app=$1 path=$2; shift 2
  curl -sS --fail-with-body -H "Host: $app.localhost:$FAZT_PORT" "$@" "http://$FAZT_ADDR$path"
}

# Runs a Node baseline server (a script that prints "listening <port>") in the
# background and sets NODE_PORT once it listens.
start_node_baseline() {
  start_listening NODE_PORT node "$1"
}

# start_listening VAR CMD...: runs CMD (which prints "listening <port>") in the
# background and sets VAR to the port once it listens, and VAR_PID to its pid.
start_listening() {
  local var=$1 port="" out
  shift
  out="$WORK/$var.out"
  "$@" >"$out" 2>&1 &
  PIDS+=("$!")
  printf -v "${var}_PID" '%s' "$!"
  for _ in $(seq 1 100); do
    port="$(sed -n 's/^listening //p' "$out")"
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || { cat "$out" >&2; echo "$* did not start" >&2; exit 1; }
  printf -v "$var" '%s' "$port"
}

# median: the median of the numbers on stdin (one a line), or nothing.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

# spread: "min–max" of the numbers on stdin.
spread() { sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR) printf "%s-%s", lo, hi }'; }

# rss_kb PID: resident set size in kB.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# The shared drivers take loopback URLs only and set no Host header, but fazt routes
# app traffic by Host. These shims add one header and change nothing else:
# - a `wrk` first on PATH that adds `-H "Host: $BENCH_HOST_HEADER"` when it is set;
# - a Node preload (NODE_OPTIONS=--require) that sets the Host header of outgoing
#   http.request calls (the `ws` client uses them) and routes fetch() through
#   http.request with a keep-alive agent (undici's fetch drops a Host header).
install_host_shims() {
  local real_wrk
  real_wrk="$(command -v wrk)"
  mkdir -p "$WORK/bin"
  cat >"$WORK/bin/wrk" <<EOF
#!/usr/bin/env bash
if [ -n "\${BENCH_HOST_HEADER:-}" ]; then exec "$real_wrk" -H "Host: \$BENCH_HOST_HEADER" "\$@"; fi
exec "$real_wrk" "\$@"
EOF
  chmod +x "$WORK/bin/wrk"
  PATH="$WORK/bin:$PATH"
  HOST_SHIM_JS="$WORK/host-shim.js"
  cat >"$HOST_SHIM_JS" <<'EOF'
'use strict';
const http = require('http');
const host = process.env.BENCH_HOST_HEADER;
if (host) {
  const request = http.request;
  http.request = function (...args) {
    const opts = args.find((a) => a && typeof a === 'object' && !(a instanceof URL));
    if (opts) opts.headers = Object.assign({}, opts.headers, { host });
    return request.apply(this, args);
  };
  const agent = new http.Agent({ keepAlive: true });
  globalThis.fetch = (url, init = {}) => new Promise((resolve, reject) => {
    const req = http.request(url, { method: init.method || 'GET', headers: Object.assign({}, init.headers), agent }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const buf = Buffer.concat(chunks);
        resolve({
          ok: res.statusCode >= 200 && res.statusCode < 300,
          status: res.statusCode,
          arrayBuffer: async () => buf,
          text: async () => buf.toString(),
        });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(init.body);
  });
}
EOF
}

# result_value FILE NAME METRIC: the value of one RESULT line of a shared driver.
result_value() {
  awk -v n="$2" -v m="$3" '$1 == "RESULT" && $2 == "name=" n && $3 == "metric=" m { sub("value=", "", $4); print $4 }' "$1"
}

# ratio A B: A/B with two decimals, or n/a.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
