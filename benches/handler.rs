//! Handler benches: what one `api/*.js` request costs, from a warm in-process call
//! (`HandlerCache::run_with`) to a full HTTP request against a running server, beside the
//! cost of a fresh boa context (what every request would pay without the warm cache).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

use fazt::http::{HandlerCache, HandlerRequest, Reply};
use fazt::js::{Host, Interrupt, LogSink};
use fazt::store::AppFile;

const APP: &str = "bench";
const HANDLER_FILE: &str = "api/hello.js";
const HANDLER_SRC: &str = "module.exports = () => ({ok: true});";

mod common;
use common::start_server;

fn request() -> HandlerRequest {
    HandlerRequest {
        method: "GET".into(),
        path: "/api/hello".into(),
        query: serde_json::Map::new(),
        headers: serde_json::Map::new(),
        body: serde_json::Value::Null,
        body_bytes: 0,
    }
}

fn expect_ok(reply: Reply) {
    match reply {
        Reply::Full { status: 200, .. } => {}
        Reply::Full { status, body, .. } => panic!(
            "handler answered {status}: {}",
            String::from_utf8_lossy(&body)
        ),
        Reply::Upgrade => panic!("handler asked for a WebSocket upgrade"),
    }
}

/// Sends one GET and reads the response (status line, headers, Content-Length body).
/// Returns the status.
fn http_get(
    w: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    host: &str,
    path: &str,
    close: bool,
) -> u16 {
    let conn = if close { "close" } else { "keep-alive" };
    write!(
        w,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n"
    )
    .expect("send request");
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().expect("content-length");
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).expect("body");
    status
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let r = BufReader::new(s.try_clone().expect("clone socket"));
    (s, r)
}

fn handler(c: &mut Criterion) {
    let server = start_server(4);
    let services = server.handle.services.clone();
    let addr = server.handle.addr;
    let info = services
        .store
        .deploy_app(
            APP,
            vec![
                AppFile {
                    path: HANDLER_FILE.into(),
                    content: HANDLER_SRC.as_bytes().to_vec(),
                },
                AppFile {
                    path: "index.html".into(),
                    content: b"<!doctype html><title>bench</title><p>hello</p>\n".to_vec(),
                },
            ],
        )
        .expect("deploy");

    let mut g = c.benchmark_group("handler");

    // The baseline: a fresh context (fazt API and prelude installed), as a cold
    // request or a new job slot pays it.
    let host = Host {
        app: Arc::from(APP),
        services: services.clone(),
        interrupt: Interrupt::new(None),
        job: None,
        sink: LogSink::Server,
    };
    // boa alone, without the fazt API and prelude: what part of the above is ours.
    g.bench_function("boa_context_default", |b| {
        b.iter(boa_engine::Context::default)
    });
    g.bench_function("new_context", |b| {
        b.iter(|| fazt::js::new_context(host.clone()).expect("context"))
    });

    // A cold request: fresh cache, so context + module load + call.
    let run = |cache: &mut HandlerCache| {
        let interrupt = cache.new_interrupt();
        let reply = cache
            .run_with(
                &services,
                APP,
                info.deploy_id,
                HANDLER_FILE,
                HANDLER_SRC,
                request(),
                interrupt,
            )
            .expect("run");
        expect_ok(reply);
    };
    g.bench_function("run_cold", |b| b.iter(|| run(&mut HandlerCache::default())));

    // A warm request: the context and module are cached, one call per request.
    let mut cache = HandlerCache::default();
    g.bench_function("run_warm", |b| b.iter(|| run(&mut cache)));

    // Full HTTP requests to the running server over one keep-alive connection.
    let host_header = format!("{APP}.localhost:{}", addr.port());
    let (mut w, mut r) = connect(addr);
    g.bench_function("http_keepalive_handler", |b| {
        b.iter(|| {
            let st = http_get(&mut w, &mut r, &host_header, "/api/hello", false);
            assert_eq!(st, 200);
        })
    });
    g.bench_function("http_keepalive_static", |b| {
        b.iter(|| {
            let st = http_get(&mut w, &mut r, &host_header, "/", false);
            assert_eq!(st, 200);
        })
    });
    drop((w, r));

    // A fresh TCP connection per request (connect, request, close). Kept short: each
    // iteration leaves a TIME_WAIT socket behind.
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("http_fresh_connection_handler", |b| {
        b.iter(|| {
            let (mut w, mut r) = connect(addr);
            let st = http_get(&mut w, &mut r, &host_header, "/api/hello", true);
            assert_eq!(st, 200);
        })
    });
    g.finish();

    server.handle.shutdown();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = handler
}
criterion_main!(benches);
