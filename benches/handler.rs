//! Handler benches: what one `api/*.js` request costs, from a warm in-process call
//! (`HandlerCache::run_with`) to a full HTTP request against a running server, beside the
//! cost of a fresh boa context (what every request would pay without the warm cache),
//! and the JS part of a warm worker job (`job_warm`: make the `job` object, call the
//! loaded worker). Before criterion runs, a fresh fazt context and a plain boa
//! `Context::default()` are timed interleaved in the same run and their medians and
//! ratio printed side by side.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use fazt::http::{HandlerCache, HandlerRequest, Reply};
use fazt::js::{Host, Interrupt, JobHost, Kind, LogSink};
use fazt::store::AppFile;

const APP: &str = "bench";
const HANDLER_FILE: &str = "api/hello.js";
const HANDLER_SRC: &str = "module.exports = () => ({ok: true});";
const WORKER_FILE: &str = "workers/noop.js";
const WORKER_SRC: &str = "module.exports = async (job) => job.data;";

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
                    path: WORKER_FILE.into(),
                    content: WORKER_SRC.as_bytes().to_vec(),
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
    context_ratio(&host);
    // boa alone, without the fazt API and prelude: what part of the above is ours.
    g.bench_function("boa_context_default", |b| {
        b.iter(boa_engine::Context::default)
    });
    g.bench_function("new_context", |b| {
        b.iter(|| fazt::js::new_context(host.clone()).expect("context"))
    });

    // The JS of a warm worker job, as a slot runs it in its kept context: a fresh
    // `job` object, then the loaded worker's call (an async no-op returning its data).
    let job_host = Host {
        job: Some(Arc::new(JobHost {
            id: "bench-job".into(),
            attempt: 1,
            restarts: 0,
            data: Some("{\"n\":1}".into()),
        })),
        sink: LogSink::Job,
        ..host.clone()
    };
    let interrupt = Interrupt::new(None);
    let mut wctx = fazt::js::new_context(job_host).expect("job context");
    let worker = fazt::js::load_entry(&mut wctx, WORKER_FILE, WORKER_SRC, Kind::Worker, &interrupt)
        .expect("load the worker");
    let make_job = wctx
        .global_object()
        .get(boa_engine::js_string!("__fazt_make_job"), &mut wctx)
        .expect("__fazt_make_job");
    let mut job_warm = || {
        let job = fazt::js::call(&mut wctx, &make_job, &[], &interrupt).expect("job object");
        let out = fazt::js::call(&mut wctx, &worker, &[job], &interrupt).expect("run");
        assert!(out.is_object());
    };
    print_median("job_warm", 3000, &mut job_warm);
    g.bench_function("job_warm", |b| b.iter(&mut job_warm));

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
    print_median("run_cold", 300, &mut || run(&mut HandlerCache::default()));
    g.bench_function("run_cold", |b| b.iter(|| run(&mut HandlerCache::default())));

    // A warm request: the context and module are cached, one call per request.
    let mut cache = HandlerCache::default();
    print_median("run_warm", 3000, &mut || run(&mut cache));
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

/// Prints the median of `calls` single calls of `f` (after a tenth as many to warm up): one call's
/// cost with the time slices lost to other processes left out, so that runs of two
/// builds can be compared on a busy machine.
fn print_median(name: &str, calls: usize, f: &mut dyn FnMut()) {
    for _ in 0..calls / 10 {
        f();
    }
    let mut times: Vec<Duration> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "{name}: median of {calls} calls {:.2} µs",
        times[times.len() / 2].as_secs_f64() * 1e6
    );
}

/// A fresh fazt context (API installed) against a plain boa `Context::default()`,
/// interleaved build by build in the same run so machine noise hits both alike; prints
/// both medians and their ratio (issue 10, goal 4: a fazt context <= 1 ms).
fn context_ratio(host: &Host) {
    const BUILDS: usize = 300;
    let mut plain = Vec::with_capacity(BUILDS);
    let mut ours = Vec::with_capacity(BUILDS);
    for _ in 0..BUILDS {
        let t = Instant::now();
        drop(std::hint::black_box(boa_engine::Context::default()));
        plain.push(t.elapsed());
        let t = Instant::now();
        drop(std::hint::black_box(
            fazt::js::new_context(host.clone()).expect("context"),
        ));
        ours.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (p, o) = (median(&mut plain), median(&mut ours));
    println!(
        "context cost, same run, interleaved, median of {BUILDS} builds each: \
         fazt new_context {:.1} µs, plain boa Context::default {:.1} µs, ratio {:.2}x",
        o.as_secs_f64() * 1e6,
        p.as_secs_f64() * 1e6,
        o.as_secs_f64() / p.as_secs_f64()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = handler
}
criterion_main!(benches);
