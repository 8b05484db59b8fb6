//! The ceiling of fazt's HTTP stack: our vendored tiny_http with the limits fazt uses
//! (tiny_http's defaults are fazt's: `fazt::http::HttpLimits::to_tiny_http`) and the
//! same number of request threads (16), answering `{"ok":true}` without any routing,
//! store or JavaScript. `scripts/bench_http.sh` runs it beside fazt and Node so the
//! handler's figure can be read against what the HTTP layer alone allows.
//!
//! Usage: `cargo run --release --manifest-path benches/http_ceiling/Cargo.toml
//! [THREADS]`; prints `listening PORT` once it listens on 127.0.0.1.

use std::net::TcpListener;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let threads: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 16,
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = Arc::new(tiny_http::Server::from_listener_with_limits(
        listener,
        None,
        tiny_http::Limits::default(),
    )?);
    println!("listening {port}");
    let content_type =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
            .map_err(|()| "bad header")?;
    let mut handles = Vec::new();
    for i in 0..threads {
        let (server, content_type) = (server.clone(), content_type.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("hello-{i}"))
                .spawn(move || {
                    while let Ok(req) = server.recv() {
                        let resp = tiny_http::Response::from_data(&b"{\"ok\":true}"[..])
                            .with_header(content_type.clone());
                        let _ = req.respond(resp);
                    }
                })?,
        );
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
