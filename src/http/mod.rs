//! The HTTP front: a tiny_http server (patched, see vendor/PATCHES.md) drained by a
//! fixed pool of named threads, and the limits that keep hostile clients from
//! exhausting it. Each request is routed by its Host header to the system API (bare
//! host) or to an app, and runs under `catch_unwind` so a panic is a 500, never a dead
//! thread; a thread lost anyway is replaced by the watchdog.

mod app_traffic;
mod console;
mod handlers;
mod headers;
mod static_files;
mod system;
mod util;

pub use console::start_overview;
pub use handlers::{HandlerCache, HandlerRequest};
pub use util::{HttpError, Reply};

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::services::Services;

pub use crate::js::JS_STACK_BYTES;

/// Limits on what clients may send and hold (flags in `cli.rs`, defaults in the README).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Open connections in all (503 past it) and per client IP (429 past it).
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Request line (414 past it) and all header lines of a request (431 past it).
    pub max_request_line: usize,
    pub max_header_bytes: usize,
    /// A request head must arrive within this once started (408).
    pub head_timeout: Duration,
    /// A kept-alive connection may sit idle this long between requests.
    pub idle_timeout: Duration,
    /// Longest wait for body bytes (408); bodies must also average 16 KB/s after it.
    pub body_timeout: Duration,
    /// Longest a response write may block.
    pub write_timeout: Duration,
    /// Largest body a handler receives (413, answered before reading).
    pub max_handler_body: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        let t = tiny_http::Limits::default();
        HttpLimits {
            max_connections: t.max_connections,
            max_connections_per_ip: t.max_connections_per_ip,
            max_request_line: t.max_request_line,
            max_header_bytes: t.max_header_bytes,
            head_timeout: t.head_timeout,
            idle_timeout: t.idle_timeout,
            body_timeout: t.body_timeout,
            write_timeout: t.write_timeout,
            max_handler_body: 1 << 20,
        }
    }
}

impl HttpLimits {
    fn to_tiny_http(&self) -> tiny_http::Limits {
        tiny_http::Limits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_request_line: self.max_request_line,
            max_header_bytes: self.max_header_bytes,
            head_timeout: self.head_timeout,
            idle_timeout: self.idle_timeout,
            body_timeout: self.body_timeout,
            write_timeout: self.write_timeout,
            // Handler bodies are read ahead in tiny_http's connection threads, so a
            // slow sender never holds a handler thread; deploys (larger) stream.
            prebuffer_body: self.max_handler_body,
            prebuffer_total: (64 << 20).max(self.max_handler_body),
            ..tiny_http::Limits::default()
        }
    }
}

/// Test hook, off unless this variable is set: a request for exactly this path panics
/// outside every `catch_unwind`, as a panic inside tiny_http would, killing its HTTP
/// thread, so the hostile suite can check that lost threads are replaced.
const KILL_THREAD_ENV: &str = "FAZT_TEST_KILL_HTTP_THREAD_ON_PATH";

/// A handler thread as the watchdog sees it.
struct Worker {
    handle: JoinHandle<()>,
    /// When the thread started running user JS (epoch ms), 0 when it is not.
    js_since: Arc<AtomicI64>,
    /// Set by the watchdog: the thread is replaced and must exit when it gets free.
    abandoned: Arc<AtomicBool>,
}

/// A handler whose JS is still running this long after its deadline is stuck in code
/// the interrupt cannot reach (e.g. a getter called from native code): its thread is
/// replaced so the server keeps serving.
const STUCK_AFTER_MS: i64 = handlers::HANDLER_TIMEOUT.as_millis() as i64 + 2000;

pub struct HttpServer {
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<Worker>>>,
    watchdog: Option<JoinHandle<()>>,
}

/// What every HTTP thread and the watchdog share.
struct Shared {
    server: tiny_http::Server,
    stopping: AtomicBool,
    services: Arc<Services>,
    limits: HttpLimits,
    /// Small static files by app and deploy id, shared by all HTTP threads.
    statics: static_files::StaticCache,
    /// See `KILL_THREAD_ENV`; None unless the test variable is set.
    kill_path: Option<String>,
}

/// A handler thread that served no request for this long drops its warm contexts (a
/// context costs about 1 MB; building one again costs a few ms).
const WARM_IDLE: Duration = Duration::from_secs(5);

/// Abandoned handler threads still alive. Each may spin on a core until boa's loop
/// limit ends it, so their number is capped: past the cap a stuck thread is left in
/// place (the pool serves with one thread less) instead of adding another spinner.
static ABANDONED_LIVE: AtomicUsize = AtomicUsize::new(0);

/// Why the HTTP server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// tiny_http refused the listener.
    #[error("starting the HTTP server: {0}")]
    Server(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A thread could not be started (the process is out of memory or threads).
    #[error("starting {what}: {source}")]
    Thread {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl HttpServer {
    pub fn start(
        listener: TcpListener,
        threads: usize,
        limits: HttpLimits,
        services: Arc<Services>,
    ) -> Result<HttpServer, StartError> {
        let server =
            tiny_http::Server::from_listener_with_limits(listener, None, limits.to_tiny_http())
                .map_err(StartError::Server)?;
        let shared = Arc::new(Shared {
            server,
            stopping: AtomicBool::new(false),
            services,
            limits,
            statics: static_files::StaticCache::default(),
            kill_path: std::env::var(KILL_THREAD_ENV).ok(),
        });
        // Cached static files are answered on the connection's own thread (no hand-off
        // to a handler thread). Weak: the server holds the answer, which must not keep
        // the server alive.
        let weak = Arc::downgrade(&shared);
        let answer = move |req: &tiny_http::Request| {
            let shared = weak.upgrade()?;
            if shared.stopping.load(Ordering::SeqCst)
                || shared.kill_path.as_deref() == Some(req.url())
            {
                return None;
            }
            app_traffic::answer_cached_static(req, &shared.services, &shared.statics)
        };
        if shared.server.answer_locally(Box::new(answer)).is_err() {
            log::error!("the static answer was installed twice; keeping the first");
        }
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            workers.push(spawn_worker(i, &shared)?);
        }
        let workers = Arc::new(Mutex::new(workers));
        let watchdog = {
            let (shared, workers) = (shared.clone(), workers.clone());
            std::thread::Builder::new()
                .name("fazt-http-watchdog".into())
                .spawn(move || watch(&shared, &workers, threads))
                .map_err(|source| StartError::Thread {
                    what: "the HTTP watchdog".into(),
                    source,
                })?
        };
        Ok(HttpServer {
            shared,
            workers,
            watchdog: Some(watchdog),
        })
    }

    /// Stops taking new requests, lets in-flight ones finish, and joins the threads
    /// (not the abandoned ones: they may never finish).
    pub fn shutdown(mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        // Extra wake-ups are harmless; too few would leave a thread in recv().
        for _ in 0..workers.len() + ABANDONED_LIVE.load(Ordering::SeqCst) + 1 {
            self.shared.server.unblock();
        }
        // In-flight requests may finish; a thread stuck in user JS is not waited for.
        let deadline = std::time::Instant::now() + handlers::HANDLER_TIMEOUT * 2;
        for w in workers {
            while !w.handle.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if w.handle.is_finished() {
                let _ = w.handle.join();
            } else {
                log::warn!("an HTTP thread is still busy at shutdown; not waiting for it");
            }
        }
    }
}

fn spawn_worker(i: usize, shared: &Arc<Shared>) -> Result<Worker, StartError> {
    let js_since = Arc::new(AtomicI64::new(0));
    let abandoned = Arc::new(AtomicBool::new(false));
    let shared = shared.clone();
    let (js, gone) = (js_since.clone(), abandoned.clone());
    let handle = std::thread::Builder::new()
        .name(format!("fazt-http-{i}"))
        .stack_size(JS_STACK_BYTES)
        .spawn(move || serve(&shared, js, &gone))
        .map_err(|source| StartError::Thread {
            what: format!("HTTP thread {i}"),
            source,
        })?;
    Ok(Worker {
        handle,
        js_since,
        abandoned,
    })
}

fn watch(shared: &Arc<Shared>, workers: &Mutex<Vec<Worker>>, max_abandoned: usize) {
    let mut next_name = workers.lock().map(|w| w.len()).unwrap_or(0);
    while !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = handlers::mono_ms();
        let mut workers = workers.lock().unwrap_or_else(|p| p.into_inner());
        let mut replacements = Vec::new();
        // A thread that ended while the server runs was lost to a panic outside the
        // per-request catch_unwind: replace it, or the pool shrinks for good.
        let before = workers.len();
        workers.retain(|w| !w.handle.is_finished());
        for _ in workers.len()..before {
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            match spawn_worker(next_name, shared) {
                Ok(new) => {
                    log::error!("an HTTP thread was lost to a panic; replaced it");
                    replacements.push(new);
                    next_name += 1;
                }
                Err(e) => log::error!("could not replace a lost HTTP thread: {e}"),
            }
        }
        for w in workers.iter() {
            let since = w.js_since.load(Ordering::SeqCst);
            if since == 0 || now - since <= STUCK_AFTER_MS || w.abandoned.load(Ordering::SeqCst) {
                continue;
            }
            if ABANDONED_LIVE.load(Ordering::SeqCst) >= max_abandoned {
                continue; // Capped: see ABANDONED_LIVE.
            }
            // Replace first, so a failed spawn never shrinks the pool.
            match spawn_worker(next_name, shared) {
                Ok(new) => {
                    log::error!(
                        "an HTTP thread is stuck in user JS {} ms past its deadline; replaced it",
                        now - since - handlers::HANDLER_TIMEOUT.as_millis() as i64
                    );
                    ABANDONED_LIVE.fetch_add(1, Ordering::SeqCst);
                    w.abandoned.store(true, Ordering::SeqCst);
                    shared
                        .services
                        .metrics
                        .http_threads_abandoned
                        .fetch_add(1, Ordering::Relaxed);
                    replacements.push(new);
                    next_name += 1;
                }
                Err(e) => log::error!("could not replace a stuck HTTP thread: {e}"),
            }
        }
        // Abandoned threads are forgotten (detached); their replacements take over.
        workers.retain(|w| !w.abandoned.load(Ordering::SeqCst));
        workers.extend(replacements);
    }
}

fn serve(shared: &Shared, js_since: Arc<AtomicI64>, abandoned: &AtomicBool) {
    let services = &shared.services;
    let stopping = &shared.stopping;
    let mut cache = HandlerCache::new(js_since);
    while !stopping.load(Ordering::SeqCst) && !abandoned.load(Ordering::SeqCst) {
        // Requests go to a waiting thread warm for their app (by Host), else to one
        // with room for another app's context, else to the thread that waited last
        // (tiny_http's queue is a stack), so after a burst most threads wait long: one
        // that served nothing for `WARM_IDLE` drops its warm contexts, and their memory
        // goes back to the OS.
        let timeout = (!cache.is_empty()).then_some(WARM_IDLE);
        let (keys, room) = cache.affinity();
        let next = shared.server.recv_for(timeout, keys, room);
        let req = match next {
            Ok(Some(r)) => r,
            Ok(None) => {
                cache.drop_all();
                continue;
            }
            Err(e) => {
                if !stopping.load(Ordering::SeqCst) {
                    log::warn!("accepting a request failed: {e}");
                }
                continue;
            }
        };
        cache.serving(req.affinity_key());
        if shared.kill_path.as_deref() == Some(req.url()) {
            panic!("{KILL_THREAD_ENV}: killing this HTTP thread on purpose");
        }
        if stopping.load(Ordering::SeqCst) {
            let _ = req.respond(util::error_response(503, "the server is shutting down"));
            break;
        }
        services
            .metrics
            .http_requests
            .fetch_add(1, Ordering::Relaxed);
        // Everything a request does, the upgrade and the response write included, runs
        // under catch_unwind: a panic there costs that request, not the thread.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle(req, shared, &mut cache)
        }));
        if outcome.is_err() {
            cache.clear();
            log::error!("an HTTP request panicked outside its handler; the thread goes on");
        }
    }
    if abandoned.load(Ordering::SeqCst) {
        ABANDONED_LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn handle(mut req: tiny_http::Request, shared: &Shared, cache: &mut HandlerCache) {
    let services = &shared.services;
    let host = util::header(&req, "host").unwrap_or_default();
    let route = util::route_host(&host);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &route {
        util::Route::System => system::handle(&mut req, services),
        util::Route::App(app) => app_traffic::handle(&mut req, app, shared, cache),
    }));
    let reply = match outcome {
        Ok(Ok(Reply::Upgrade)) => return app_traffic::upgrade(req, route, services),
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => Reply::from(e),
        Err(_) => {
            // A panic may have left a cached context half-updated: drop them all.
            cache.clear();
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
