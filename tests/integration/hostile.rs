//! The hostile-input suite: one test per attack on the HTTP front (issue 8), each named
//! after the attack. They speak raw TCP so that malformed and half-sent requests reach
//! the server exactly as an attacker would send them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::{wait_until, Server};

/// `fazt-http-*` threads of a default server: 16 handler threads and the watchdog.
const HTTP_THREADS: usize = 17;

/// Sends `bytes` on a fresh connection, half-closes it if `close_write`, and returns
/// the status line's code if a response arrived within `ms`.
fn raw_status(addr: SocketAddr, bytes: &[u8], close_write: bool, ms: u64) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(ms))).ok()?;
    // The server may answer and close before taking everything (413, 431): ignore.
    let _ = s.write_all(bytes);
    if close_write {
        let _ = s.shutdown(Shutdown::Write);
    }
    read_status(&mut s)
}

/// Reads until the end of a response head (or EOF / timeout); the status code.
fn read_status(s: &mut TcpStream) -> Option<u16> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    text.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn huge_content_length_does_not_abort() {
    let mut server = Server::start();
    let threads = HTTP_THREADS;
    // tiny_http used to allocate the declared remainder to skip the unread body: 1 TB
    // aborts where memory is not overcommitted, usize::MAX overflows at once.
    for len in [
        "1000000000000",
        "18446744073709551615",
        "9223372036854775807",
    ] {
        for _ in 0..3 {
            let req = format!(
                "POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len}\r\n\r\nabc"
            );
            raw_status(server.addr, req.as_bytes(), true, 10_000);
        }
    }
    assert!(
        wait_until(5, || server.health_within(1000) == Some(200)),
        "the server stopped answering after huge Content-Length values"
    );
    assert!(server.alive(), "the server process died");
    assert!(
        wait_until(5, || server.threads_named("fazt-http-") >= threads),
        "HTTP threads were lost: {} of {threads} left",
        server.threads_named("fazt-http-")
    );
}

#[test]
fn sixteen_silent_bodies_do_not_make_the_server_deaf() {
    let server = Server::start_with(&["--body-timeout", "1s"]);
    // More connections than HTTP threads, each declaring a body it never sends: to
    // /health (which never reads it: the drain after the answer used to wait forever)
    // and to a deploy (which reads it).
    let mut held = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        let head = if i % 2 == 0 {
            "POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\npartial"
                .to_string()
        } else {
            format!(
                "PUT /api/apps/half HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\npartial",
                server.token
            )
        };
        s.write_all(head.as_bytes()).expect("write");
        held.push(s);
    }
    assert!(
        wait_until(10, || server.health_within(2000) == Some(200)),
        "the server went deaf behind 20 silent bodies"
    );
    // The deploy whose body stopped half-way gets a 408.
    let s = &mut held[1];
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(read_status(s), Some(408));
}

#[test]
fn http2_request_lines_do_not_leak_threads() {
    let server = Server::start();
    let before = server.thread_count();
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET / HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("write");
        assert_eq!(read_status(&mut s), Some(505));
        held.push(s); // the client keeps its side open
    }
    // The server closed each connection after its 505 (read sees EOF)...
    for s in held.iter_mut() {
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(
            r.is_ok(),
            "the server kept an HTTP/2.0 connection open: {r:?}"
        );
    }
    // ...and its threads are gone with them.
    assert!(
        wait_until(10, || server.thread_count() <= before + 10),
        "threads leaked: {} before, {} after",
        before,
        server.thread_count()
    );
    assert_eq!(
        raw_status(server.addr, b"GET /health HTTP/3.0\r\n\r\n", false, 5000),
        Some(505)
    );
    assert_eq!(
        raw_status(server.addr, b"GET /health HTTX/1.1\r\n\r\n", false, 5000),
        Some(400)
    );
}

#[test]
fn oversized_header_gets_431() {
    let server = Server::start();
    let big = "x".repeat(40 << 10);
    let req = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\n\r\n");
    assert_eq!(
        raw_status(server.addr, req.as_bytes(), false, 5000),
        Some(431)
    );
    // Many small headers add up the same way.
    let many: String = (0..2000)
        .map(|i| format!("X-H{i}: 0123456789\r\n"))
        .collect();
    let req = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}\r\n");
    assert_eq!(
        raw_status(server.addr, req.as_bytes(), false, 5000),
        Some(431)
    );
    // A 64 MB header line is cut off after the limit, not buffered: the answer comes
    // while the client is still sending.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: ")
        .expect("write");
    let chunk = vec![b'a'; 64 << 10];
    for _ in 0..1024 {
        if s.write_all(&chunk).is_err() {
            break; // the server answered and closed
        }
    }
    assert_eq!(read_status(&mut s), Some(431));
    assert_eq!(server.health_within(2000), Some(200));
}

#[test]
fn oversized_request_line_gets_414() {
    let server = Server::start();
    let path = format!("/{}", "a".repeat(10 << 10));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(
        raw_status(server.addr, req.as_bytes(), false, 5000),
        Some(414)
    );
    // Just under the limit is served as usual.
    let path = format!("/{}", "a".repeat(7 << 10));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    assert_eq!(
        raw_status(server.addr, req.as_bytes(), false, 5000),
        Some(401)
    );
}

#[test]
fn slow_request_head_gets_408() {
    let server = Server::start_with(&["--head-timeout", "1s"]);
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    // One byte every 200 ms: each read is quick, the head as a whole is not.
    let mut status = None;
    for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        s.set_nonblocking(true).expect("nonblocking");
        let mut peek = [0u8; 1];
        let answered = matches!(s.peek(&mut peek), Ok(n) if n > 0);
        s.set_nonblocking(false).expect("blocking");
        if answered {
            status = read_status(&mut s);
            break;
        }
    }
    assert_eq!(status, Some(408), "a dripped head was not cut off");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn accept_loop_survives_fd_exhaustion() {
    let server = Server::start_with_env(&["--max-connections", "100000"], &[], Some(128));
    // Hold more connections than the process has descriptors for.
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(server.addr) {
            held.push(s);
        }
    }
    assert!(
        wait_until(10, || server.fd_count() >= 120),
        "the server never ran out of descriptors ({} open)",
        server.fd_count()
    );
    drop(held);
    // Once descriptors are free again, the server accepts again.
    assert!(
        wait_until(20, || server.health_within(1000) == Some(200)),
        "the server stopped accepting after running out of descriptors"
    );
}

#[test]
fn panicking_http_thread_is_replaced() {
    let server = Server::start_with_env(
        &[],
        &[("FAZT_TEST_KILL_HTTP_THREAD_ON_PATH", "/boom")],
        None,
    );
    let threads = HTTP_THREADS;
    // More panics than there are HTTP threads.
    for _ in 0..24 {
        raw_status(
            server.addr,
            b"GET /boom HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            false,
            5000,
        );
    }
    assert!(
        wait_until(10, || server.threads_named("fazt-http-") == threads),
        "HTTP threads not replaced: {} of {threads}",
        server.threads_named("fazt-http-")
    );
    assert_eq!(server.health_within(2000), Some(200));
}

#[test]
fn connection_caps_per_ip() {
    let server = Server::start_with(&["--max-connections-per-ip", "5"]);
    let held: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    // Once the server has counted them, the next one is refused (probes that come
    // earlier are served and closed, so they do not add up).
    let req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    assert!(wait_until(5, || raw_status(server.addr, req, false, 5000) == Some(429)));
    drop(held);
    assert!(wait_until(5, || raw_status(server.addr, req, false, 2000) == Some(200)));

    let server = Server::start_with(&["--max-connections", "5"]);
    let held: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    assert!(wait_until(5, || raw_status(server.addr, req, false, 5000) == Some(503)));
    drop(held);
    assert!(wait_until(5, || raw_status(server.addr, req, false, 2000) == Some(200)));
}

#[test]
fn handler_body_over_limit_gets_413_before_reading() {
    let server = Server::start();
    server.deploy_ok(
        "sink",
        &[(
            "api/echo.js",
            "module.exports = (r) => ({ n: (r.body || '').length });",
        )],
    );
    let host = format!("sink.localhost:{}", server.port());
    // 2 MB declared, nothing sent: the answer cannot wait for the body.
    let req = format!("POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2097152\r\n\r\n");
    let started = Instant::now();
    assert_eq!(
        raw_status(server.addr, req.as_bytes(), false, 5000),
        Some(413)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // A chunked body is cut off at the limit.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let head =
        format!("POST /api/echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n");
    s.write_all(head.as_bytes()).expect("write");
    let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
    for _ in 0..20 {
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
    }
    assert_eq!(read_status(&mut s), Some(413));
    // Under the limit still works.
    let r = server.app(
        "sink",
        "POST",
        "/api/echo",
        Some(&format!("\"{}\"", "b".repeat(1000))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Opens `n` connections at once, each doing `work`, which returns the connection when
/// it was answered; returns how many were answered within `within` of the start. Every
/// connection stays open until all are done, as browsers keep theirs: a server that
/// serves a connection only once another one closes stalls here.
fn burst<H: Send + 'static>(
    n: usize,
    within: Duration,
    work: impl Fn() -> Option<H> + Send + Sync + 'static,
) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let work = std::sync::Arc::new(work);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let done = std::sync::Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (work, barrier, done) = (work.clone(), barrier.clone(), done.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let held = work();
                let ok = held.is_some() && started.elapsed() <= within;
                done.fetch_add(1, Ordering::SeqCst);
                wait_until(15, || done.load(Ordering::SeqCst) == n);
                drop(held);
                ok
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .filter(|ok| *ok)
        .count()
}

#[test]
fn burst_of_200_connections_answered_within_1s() {
    let server = Server::start();
    let addr = server.addr;
    // Earlier traffic leaves idle connection threads behind, as on a live server.
    let warm = burst(100, Duration::from_secs(5), move || {
        raw_status(
            addr,
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            false,
            5000,
        )
    });
    assert_eq!(warm, 100);
    let answered = burst(200, Duration::from_secs(1), move || {
        let mut s = TcpStream::connect(addr).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        // Keep-alive: two requests on the connection, both answered.
        let answered = (0..2).all(|_| {
            s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .is_ok()
                && read_full_response(&mut s) == Some(200)
        });
        answered.then_some(s)
    });
    assert_eq!(
        answered, 200,
        "only {answered} of 200 connections answered within 1 s"
    );
}

#[test]
fn ws_upgrade_burst_answered_within_1s() {
    let server = Server::start();
    server.deploy_ok("live", &[("index.html", "hi")]);
    let addr = server.addr;
    let answered = burst(200, Duration::from_secs(1), move || {
        crate::util::Ws::try_connect(addr, "live").ok()
    });
    assert_eq!(
        answered, 200,
        "only {answered} of 200 WebSocket upgrades within 1 s"
    );
}

/// Reads one response with a Content-Length or chunked body; its status.
fn read_full_response(s: &mut TcpStream) -> Option<u16> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            // Bodies here are plain text, so the last-chunk marker ends a chunked one.
            let chunked = head.contains("transfer-encoding: chunked");
            let complete = if chunked {
                raw[end..].ends_with(b"\r\n0\r\n\r\n")
            } else {
                raw.len() >= end + 4 + len
            };
            if complete {
                return head.lines().next()?.split_whitespace().nth(1)?.parse().ok();
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// A small deterministic generator (xorshift64*), so a failing fuzz case reproduces
/// from its seed without a new dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Cases per fuzz test: a few seconds in the normal run; `FAZT_FUZZ_CASES` for more.
fn fuzz_cases(default: usize) -> usize {
    std::env::var("FAZT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Mutates `input` 1-4 times: byte flips, inserted protocol-significant bytes,
/// deletions, duplications, truncation, huge numbers.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"\r",
        b":",
        b" ",
        b"\0",
        b"\xff",
        b"HTTP/1.1",
        b"HTTP/9.9",
        b"Content-Length: ",
        b"Transfer-Encoding: chunked\r\n",
        b"18446744073709551616",
        b"-1",
        b"ffffffffffffffff\r\n",
        b"Expect: 100-continue\r\n",
        b"Connection: upgrade\r\n",
        b"Upgrade: websocket\r\n",
        b"%00",
        b"/../..",
        b"\r\n\r\n",
    ];
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, t.iter().copied());
            }
            2 => {
                let end = (at + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(64)).min(out.len());
                let piece = out[at..end].to_vec();
                for _ in 0..rng.below(8) {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            4 => out.truncate(at),
            _ => {
                let junk: Vec<u8> = (0..rng.below(32)).map(|_| rng.next() as u8).collect();
                out.splice(at..at, junk);
            }
        }
    }
    out
}

#[test]
fn fuzzed_requests_never_kill_the_server() {
    let mut server = Server::start_with(&["--body-timeout", "1s", "--head-timeout", "1s"]);
    server.deploy_ok(
        "fz",
        &[
            ("index.html", "hi"),
            ("api/main.js", "module.exports = (r) => r.body;"),
        ],
    );
    let threads = HTTP_THREADS;
    let seeds: Vec<Vec<u8>> = vec![
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: fz.localhost\r\nConnection: keep-alive\r\n\r\nGET /x HTTP/1.1\r\nHost: fz.localhost\r\n\r\n".to_vec(),
        b"POST /api/echo HTTP/1.1\r\nHost: fz.localhost\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\":[1,2,3]}".to_vec(),
        b"POST /api/x HTTP/1.1\r\nHost: fz.localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
        b"GET /_ws HTTP/1.1\r\nHost: fz.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(),
        b"PUT /api/apps/fz2 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
    ];
    let cases = fuzz_cases(400);
    let workers = 8;
    let addr = server.addr;
    let seeds = std::sync::Arc::new(seeds);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let seeds = seeds.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
                for _ in 0..cases / workers {
                    let seed = &seeds[rng.below(seeds.len())];
                    let input = mutate(&mut rng, seed);
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                    let _ = s.write_all(&input);
                    let _ = s.shutdown(Shutdown::Write);
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("fuzz worker");
    }
    assert!(server.alive(), "the server died under fuzzed requests");
    assert_eq!(server.health_within(2000), Some(200));
    assert!(
        wait_until(10, || server.threads_named("fazt-http-") >= threads),
        "HTTP threads lost under fuzzed requests"
    );
}

#[test]
fn fuzzed_websocket_frames_never_kill_the_server() {
    let mut server = Server::start();
    server.deploy_ok("fw", &[("index.html", "hi")]);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let valid_frame = |payload: &[u8], mask: [u8; 4]| {
        let mut f = vec![0x81, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    for _ in 0..fuzz_cases(120) {
        let Ok(mut ws) = crate::util::Ws::try_connect(server.addr, "fw") else {
            continue;
        };
        let mask = [rng.next() as u8, 1, 2, 3];
        let base = valid_frame(br#"{"type":"subscribe","channel":"c"}"#, mask);
        let mut bytes = match rng.below(4) {
            0 => mutate(&mut rng, &base),
            1 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
            // Huge or reserved length fields, odd opcodes, unmasked frames.
            2 => {
                let mut f = vec![rng.next() as u8 | 0x80, 0xff];
                f.extend_from_slice(&(rng.next() | (1 << 62)).to_be_bytes());
                f.extend_from_slice(&mask);
                f
            }
            _ => {
                let mut f = base.clone();
                f[0] = rng.next() as u8;
                f[1] &= if rng.below(2) == 0 { 0x7f } else { 0xff };
                f
            }
        };
        bytes.extend(valid_frame(br#"{"type":"ping"}"#, mask));
        let s = ws.ws.get_mut();
        let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
        let _ = s.write_all(&bytes);
        let mut sink = [0u8; 1024];
        let _ = s.read(&mut sink);
    }
    assert!(
        server.alive(),
        "the server died under fuzzed WebSocket frames"
    );
    assert_eq!(server.health_within(2000), Some(200));
    let mut ws = server.ws("fw");
    ws.subscribe("after");
}

#[test]
fn websockets_do_not_count_against_http_connection_caps() {
    let server = Server::start_with(&["--max-connections-per-ip", "4"]);
    server.deploy_ok("caps", &[("index.html", "hi")]);
    // More WebSockets than the HTTP cap allows connections: once upgraded, they are
    // the hub's to cap (--ws-max-per-ip), not HTTP's.
    let mut sockets: Vec<_> = (0..8).map(|_| server.ws("caps")).collect();
    assert_eq!(server.health_within(2000), Some(200));
    sockets[7].subscribe("still-here");
}

/// Peak resident memory of the server process (VmHWM), in bytes.
fn peak_rss(server: &Server) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn endless_chunk_size_line_is_cut_off() {
    let mut server = Server::start();
    let before = peak_rss(&server);
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("write");
    // 128 MB of hex digits and no line end: the old decoder collected all of it.
    let digits = vec![b'0'; 1 << 20];
    for _ in 0..128 {
        if s.write_all(&digits).is_err() {
            break; // cut off
        }
    }
    let grown = peak_rss(&server).saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "the server buffered the size line: +{} MB",
        grown >> 20
    );
    assert!(server.alive());
    assert_eq!(server.health_within(2000), Some(200));
}

#[test]
fn silent_handler_bodies_do_not_hold_handler_threads() {
    // Default timeouts: a handler body that never arrives must not hold a handler
    // thread for the 10 s body timeout, or 16 of them make the server deaf.
    let server = Server::start();
    server.deploy_ok(
        "slow",
        &[(
            "api/echo.js",
            "module.exports = (r) => ({ n: (r.body || '').length });",
        )],
    );
    let host = format!("slow.localhost:{}", server.port());
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        let head = format!(
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n\r\npartial"
        );
        s.write_all(head.as_bytes()).expect("write");
        held.push(s);
    }
    // All of them reached a connection thread before the clock starts.
    assert!(wait_until(10, || server.threads_named("tiny-http-conn") >= 40));
    let started = Instant::now();
    assert_eq!(server.health_within(3000), Some(200));
    let r = server.app("slow", "POST", "/api/echo", Some("\"hi\""));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answers waited {:?} behind silent bodies",
        started.elapsed()
    );
}

/// Reads everything a connection sends until it closes or is quiet for `ms`.
fn read_until_quiet(s: &mut TcpStream, ms: u64) -> Vec<u8> {
    let _ = s.set_read_timeout(Some(Duration::from_millis(ms)));
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status codes of all responses in `raw`. The bodies here are JSON that never
/// holds `HTTP/1.`, and a response follows the previous body without a line break.
fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text[i..].split_whitespace().nth(1)?.parse().ok())
        .collect()
}

#[test]
fn pipelined_request_flood_does_not_make_the_server_deaf() {
    // One connection pipelines requests for a big file and never reads. tiny_http used
    // to hand every pipelined request to the handler threads at once: the first blocked
    // writing to the full socket (up to the write timeout, per write), the other 15 waited
    // for their turn to write behind it, and nobody else was served.
    let server = Server::start();
    let big = "x".repeat(512 << 10);
    server.deploy_ok("big", &[("index.html", big.as_str())]);
    let host = format!("big.localhost:{}", server.port());
    let mut flood = TcpStream::connect(server.addr).expect("connect");
    let one = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let _ = flood.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = flood.write_all(one.repeat(200).as_bytes());
    // Let the server take in as much of the flood as it will.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    assert_eq!(server.health_within(3000), Some(200));
    let r = server.app("big", "GET", "/", None);
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answers waited {:?} behind one pipelining connection",
        started.elapsed()
    );
    drop(flood);
    // Pipelining still works for a client that reads: every answer, in order.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    s.write_all(req.as_bytes()).expect("write");
    assert_eq!(
        statuses(&read_until_quiet(&mut s, 3000)),
        vec![200, 401, 200]
    );
}

#[test]
fn connection_upgrade_header_does_not_bypass_body_read_ahead() {
    // `Connection: upgrade` used to hand the handler the raw socket as the body: no
    // read-ahead, no length, so a handler thread waited on the client (10 s per
    // silence, forever for a dripping one), with or without a declared body.
    let server = Server::start();
    server.deploy_ok(
        "up",
        &[(
            "api/echo.js",
            "module.exports = (r) => ({ n: (r.body || '').length });",
        )],
    );
    let host = format!("up.localhost:{}", server.port());
    let mut held = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        let head = if i % 2 == 0 {
            format!(
                "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: x\r\nContent-Length: 100000\r\n\r\npartial"
            )
        } else {
            format!("GET /api/echo HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
        };
        s.write_all(head.as_bytes()).expect("write");
        held.push(s);
    }
    // The 20 POSTs hold their connection threads (their bodies never finish); the 20
    // GETs are answered and their threads may already be gone, so wait for the POSTs.
    assert!(wait_until(30, || server.threads_named("tiny-http-conn") >= 20));
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(server.health_within(4000), Some(200));
    let r = server.app("up", "POST", "/api/echo", Some("\"hi\""));
    assert_eq!(r.status, 200, "{}", r.text());
    // Before the fix the handler threads waited out the 10 s body timeout; 5 s leaves
    // room for a loaded CI machine.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answers waited {:?} behind upgrade requests",
        started.elapsed()
    );
}

/// Sends `req` on a fresh connection and returns the statuses of every response that
/// came back before the server closed the connection (or went quiet).
fn all_statuses(server: &Server, req: &str) -> Vec<u16> {
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(req.as_bytes()).expect("write");
    statuses(&read_until_quiet(&mut s, 1500))
}

#[test]
fn request_smuggling_with_transfer_encoding_and_content_length_is_refused() {
    // A front proxy that frames by Content-Length and a server that frames by
    // Transfer-Encoding disagree on where the next request starts. RFC 9112 §6.1: such
    // a request is an attack; answer 400 and close.
    let server = Server::start();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let chunked = format!("0\r\n\r\n{smuggled}");
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}",
        chunked.len()
    );
    assert_eq!(all_statuses(&server, &req), vec![400], "TE + CL");
    // A transfer coding other than chunked cannot be framed at all.
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
    );
    assert_eq!(all_statuses(&server, &req), vec![400], "TE identity");
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"
    );
    assert_eq!(all_statuses(&server, &req), vec![400], "TE gzip, chunked");
    assert_eq!(server.health_within(2000), Some(200));
}

#[test]
fn request_smuggling_with_ambiguous_content_length_is_refused() {
    // An unparsable Content-Length used to mean "no body", so the body was read as the
    // next request; `+5` parsed as 5; of two different lengths the first won.
    let server = Server::start();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    for (name, cl) in [
        ("not a number", "Content-Length: 5x\r\n"),
        ("signed", "Content-Length: +5\r\n"),
        ("list", "Content-Length: 5, 5\r\n"),
        (
            "two different",
            "Content-Length: 5\r\nContent-Length: 0\r\n",
        ),
        ("negative", "Content-Length: -1\r\n"),
    ] {
        let req = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{cl}\r\nhello{smuggled}");
        assert_eq!(all_statuses(&server, &req), vec![400], "{name}");
    }
    // Repeating the same length is legal (RFC 9110 §8.6) and works.
    let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    assert_eq!(all_statuses(&server, req), vec![200]);
}

#[test]
fn keep_alive_responses_do_not_wait_for_delayed_acks() {
    // Issue 10: headers and body went out in two writes on a socket without
    // TCP_NODELAY, so Nagle held the body until the client's delayed ACK (~40 ms) of
    // the headers. This client never sets TCP_QUICKACK, as browsers and Node's agent
    // don't.
    let server = Server::start();
    // A small page (one write) and one larger than a single write takes.
    let small = "p".repeat(4000);
    let large = "q".repeat(200 << 10);
    server.deploy_ok(
        "ka",
        &[
            ("index.html", small.as_str()),
            ("large.html", large.as_str()),
        ],
    );
    let host = format!("ka.localhost:{}", server.port());
    for (path, n) in [("/", 50), ("/large.html", 20)] {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        // A first request warms the handler path (store reads, caches).
        s.write_all(req.as_bytes()).expect("write");
        assert_eq!(read_full_response(&mut s), Some(200));
        let started = Instant::now();
        for _ in 0..n {
            s.write_all(req.as_bytes()).expect("write");
            assert_eq!(read_full_response(&mut s), Some(200));
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{n} keep-alive requests for {path} took {took:?} (about 40 ms each means delayed ACKs)"
        );
    }
}

#[test]
fn slow_readers_of_big_responses_do_not_hold_handler_threads() {
    // Clients that ask for a big file and never read it: each handler thread used to
    // write the response itself and block on the full socket until the write timeout
    // (30 s, per write: a client reading a little now and then held it for good). On
    // loopback the socket buffers take a few MB, hence 8 MB.
    let server = Server::start();
    let big = "b".repeat(8 << 20);
    server.deploy_ok("dl", &[("big.txt", big.as_str()), ("index.html", "hi")]);
    let host = format!("dl.localhost:{}", server.port());
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        let req = format!("GET /big.txt HTTP/1.1\r\nHost: {host}\r\n\r\n");
        s.write_all(req.as_bytes()).expect("write");
        held.push(s);
    }
    // Let the server take up every one of them.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    assert_eq!(server.health_within(3000), Some(200));
    let r = server.app("dl", "GET", "/", None);
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answers waited {:?} behind clients that do not read",
        started.elapsed()
    );
    // Once they read, each gets a whole answer: the file, or a 503 when the memory
    // for answers waiting on slow readers (64 MB) was spent.
    let mut got = Vec::new();
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        got.push(read_full_response(&mut s));
    }
    assert!(
        got.iter().all(|g| matches!(g, Some(200) | Some(503))),
        "{got:?}"
    );
    assert!(got.contains(&Some(200)), "{got:?}");
}

/// A TCP connection to `addr` from the loopback address `from` (any 127.x.y.z is
/// local on Linux), so one test can play clients at different addresses.
fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = addr else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; it is handed to
    // TcpStream (which closes it) right after creation, so every path closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*to.ip(), to.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

#[test]
fn read_ahead_budget_hog_does_not_starve_other_clients() {
    // Handler bodies are read ahead within 64 MB shared by all clients. One address
    // declaring 1 MB bodies on 80 connections and sending them slowly took all of it:
    // everyone else's body waited up to the body timeout (10 s) for room, then went
    // to a handler thread to be read as it came.
    let server = Server::start();
    server.deploy_ok(
        "hog",
        &[(
            "api/echo.js",
            "module.exports = (r) => ({ n: (r.body || '').length });",
        )],
    );
    let host = format!("hog.localhost:{}", server.port());
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..80 {
        let mut s = connect_from(attacker, server.addr).expect("connect from 127.0.0.2");
        let head = format!(
            "POST /api/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1048576\r\n\r\npartial"
        );
        s.write_all(head.as_bytes()).expect("write");
        held.push(s);
    }
    assert!(wait_until(10, || server.threads_named("tiny-http-conn") >= 80));
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let body = format!("\"{}\"", "c".repeat(100 << 10));
    let r = server.app("hog", "POST", "/api/echo", Some(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a 100 KB body waited {:?} behind one address's read-ahead",
        started.elapsed()
    );
}
