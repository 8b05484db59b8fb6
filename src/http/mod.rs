//! The HTTP front: a tiny_http server drained by a fixed pool of named threads. Each
//! request is routed by its Host header to the system API (bare host) or to an app, and
//! runs under `catch_unwind` so a panic is a 500, never a dead thread.

mod app_traffic;
mod handlers;
mod system;
mod util;

pub use handlers::{HandlerCache, HandlerRequest};
pub use util::{HttpError, Reply};

/// A JSON error response (for code that answers a raw request itself).
pub fn error_reply(status: u16, msg: &str) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    util::error_response(status, msg)
}

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::services::Services;

/// Stack for threads that run user JS: boa recurses on the native stack for calls made
/// from native code, so the 2 MB default is too tight for deep but legal programs.
pub const JS_STACK_BYTES: usize = 16 << 20;

pub struct HttpServer {
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(
        listener: TcpListener,
        threads: usize,
        services: Arc<Services>,
    ) -> anyhow::Result<HttpServer> {
        use anyhow::Context as _;
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| anyhow::anyhow!("starting the HTTP server: {e}"))?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let server = server.clone();
            let stopping = stopping.clone();
            let services = services.clone();
            let h = std::thread::Builder::new()
                .name(format!("fazt-http-{i}"))
                .stack_size(JS_STACK_BYTES)
                .spawn(move || serve(&server, &stopping, &services))
                .context("spawning an HTTP thread")?;
            handles.push(h);
        }
        Ok(HttpServer {
            server,
            stopping,
            threads: handles,
        })
    }

    /// Stops taking new requests, lets in-flight ones finish, and joins the threads.
    pub fn shutdown(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, stopping: &AtomicBool, services: &Arc<Services>) {
    let mut cache = HandlerCache::default();
    while !stopping.load(Ordering::SeqCst) {
        let req = match server.recv() {
            Ok(r) => r,
            Err(e) => {
                if !stopping.load(Ordering::SeqCst) {
                    log::warn!("accepting a request failed: {e}");
                }
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            let _ = req.respond(util::error_response(503, "the server is shutting down"));
            break;
        }
        services
            .metrics
            .http_requests
            .fetch_add(1, Ordering::Relaxed);
        handle(req, services, &mut cache);
    }
}

fn handle(mut req: tiny_http::Request, services: &Arc<Services>, cache: &mut HandlerCache) {
    let host = util::header(&req, "host").unwrap_or_default();
    let route = util::route_host(&host);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &route {
        util::Route::System => system::handle(&mut req, services),
        util::Route::App(app) => app_traffic::handle(&mut req, app, services, cache),
    }));
    let reply = match outcome {
        Ok(Ok(Reply::Upgrade)) => return app_traffic::upgrade(req, route, services),
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => Reply::from(e),
        Err(_) => {
            // A panic may have left a cached context half-updated: drop them all.
            *cache = HandlerCache::default();
            log::error!("a request handler panicked: {} {}", req.method(), req.url());
            Reply::from(HttpError::internal(
                "internal error while handling the request",
            ))
        }
    };
    if let Err(e) = req.respond(reply.into_response()) {
        log::debug!("writing a response failed: {e}");
    }
}
