//! The hostile-input suite: one test per attack on the HTTP front (issue 8), each named
//! after the attack. They speak raw TCP so that malformed and half-sent requests reach
//! the server exactly as an attacker would send them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::{wait_until, Server};

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
    let threads = server.threads_named("fazt-http-");
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
