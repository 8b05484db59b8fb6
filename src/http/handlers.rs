//! Running `api/*.js` handlers. Each HTTP thread keeps one boa context per app (a few
//! apps at most), built lazily, keyed by the app's deploy id (so a redeploy, or a new
//! app under an old name, never meets old code) and thrown away after an interrupted
//! run, so a warm request costs one function call, not a parse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use boa_engine::{js_string, Context, JsString, JsValue};

use super::util::{HttpError, Reply};
use crate::js::{self, Host, Interrupt, LogSink, Reason, RunError};
use crate::services::Services;

/// How long one handler call may run before it is stopped with a 504.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

/// Apps whose contexts one HTTP thread keeps warm; the least recently used goes first.
const MAX_WARM_APPS: usize = 8;

/// Heap one handler call may add on its thread before it is stopped: a handler that
/// builds a huge array must not take the server's memory with it.
pub const HANDLER_RUN_HEAP: i64 = 64 << 20;

/// Heap a warm context may keep across calls (module-level caches, leaked globals),
/// like a worker slot's warm context: past it the context is collected, and dropped if
/// that is not enough.
const MAX_WARM_BYTES: i64 = 16 << 20;

struct AppContext {
    /// The deploy id whose code this context loaded.
    deploy: i64,
    ctx: Context,
    /// The runner of each loaded handler file, by path (see `js::load_entry`).
    modules: HashMap<String, JsValue>,
    last_used: u64,
    /// Heap growth of this thread across the calls this context served.
    grown: i64,
    /// The affinity key of the Host its last request came with (see [`HandlerCache::affinity`]).
    host_key: Option<u64>,
}

/// Milliseconds on a monotonic clock (never 0), for the watchdog: wall-clock jumps
/// must not make a healthy thread look stuck.
pub(crate) fn mono_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as i64
        + 1
}

/// Marks the thread as running user JS until dropped (also when a panic unwinds).
struct Busy<'a>(&'a AtomicI64);

impl<'a> Busy<'a> {
    fn start(flag: &'a AtomicI64) -> Busy<'a> {
        flag.store(mono_ms(), Ordering::SeqCst);
        Busy(flag)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

/// Per-thread cache of warm handler contexts.
pub struct HandlerCache {
    /// When this thread started running user JS ([`mono_ms`]; 0 = not running), read
    /// by the HTTP watchdog.
    js_since: Arc<AtomicI64>,
    /// Live heap bytes allocated by this thread (the counting allocator's counter).
    heap: &'static AtomicI64,
    /// The thread's heap level after its last forced collection, lowered when a call
    /// starts lower: what it keeps (its warm contexts), so the excess over it is
    /// garbage, or what a request brought. None before the first call.
    kept: Option<i64>,
    apps: HashMap<String, AppContext>,
    clock: u64,
    /// `Registry::changes` at the last sweep: when it moved, contexts of removed or
    /// redeployed apps are dropped so they do not hold memory until evicted.
    seen_changes: u64,
    /// The affinity key of the request being served (`tiny_http::affinity_key` of
    /// its Host), recorded with the app's context.
    current_key: Option<u64>,
}

/// The request as handed to a handler (`request` in JS).
pub struct HandlerRequest {
    pub method: String,
    pub path: String,
    pub query: serde_json::Map<String, serde_json::Value>,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub body: serde_json::Value,
    /// Bytes of the body as received: a big one asks for a collection and a heap trim
    /// after the run (its buffers may come from another thread's allocations, so the
    /// thread's own heap counter does not always show it).
    pub body_bytes: usize,
}

impl Default for HandlerCache {
    fn default() -> Self {
        HandlerCache::new(Arc::default())
    }
}

impl HandlerCache {
    pub fn new(js_since: Arc<AtomicI64>) -> HandlerCache {
        HandlerCache {
            js_since,
            // The cache lives on (and only on) its HTTP thread: count that thread.
            heap: crate::worker::watch_this_thread(),
            kept: None,
            apps: HashMap::new(),
            clock: 0,
            seen_changes: 0,
            current_key: None,
        }
    }

    /// Forgets every warm context.
    pub fn clear(&mut self) {
        self.apps.clear();
    }

    /// Whether no context is warm.
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Drops every warm context and frees what they held: a context's objects live in
    /// this thread's collector until it runs, and freed pages stay in malloc's arenas
    /// until a trim.
    pub fn drop_all(&mut self) {
        self.apps.clear();
        boa_gc::force_collect();
        crate::js::interrupt::trim_soon();
        release_unused_stack();
    }

    /// What this thread asks of the request queue: the affinity keys of the Hosts its
    /// warm contexts served, and whether it has room for another app's context. A
    /// request then goes to a waiting thread warm for its app when there is one (with
    /// many apps, a thread that took every app's requests rebuilt contexts for most of
    /// them: it keeps 8).
    pub fn affinity(&self) -> (Vec<u64>, bool) {
        let keys = self.apps.values().filter_map(|a| a.host_key).collect();
        (keys, self.apps.len() < MAX_WARM_APPS)
    }

    /// The affinity key of the request about to be served.
    pub fn serving(&mut self, key: Option<u64>) {
        self.current_key = key;
    }

    /// Whether `file` of `app` at deploy `deploy` is already loaded (its source is not
    /// needed).
    pub fn is_loaded(&self, app: &str, deploy: i64, file: &str) -> bool {
        self.apps
            .get(app)
            .is_some_and(|a| a.deploy == deploy && a.modules.contains_key(file))
    }

    /// The interrupt of one handler run on this thread: the handler deadline, and a cap
    /// of [`HANDLER_RUN_HEAP`] on the heap this thread may add from now on.
    pub fn new_interrupt(&self) -> Interrupt {
        Interrupt::with_heap_cap(Some(HANDLER_TIMEOUT), Some((self.heap, HANDLER_RUN_HEAP)))
    }

    /// Runs handler file `file` of `app` (deploy `deploy`) for `request`, stopped by
    /// `interrupt` (from [`new_interrupt`](Self::new_interrupt); the app's removal also
    /// stops it). `source` may be empty when [`is_loaded`](Self::is_loaded) said so.
    #[allow(clippy::too_many_arguments)]
    pub fn run_with(
        &mut self,
        services: &Arc<Services>,
        app: &str,
        deploy: i64,
        file: &str,
        source: &str,
        request: HandlerRequest,
        interrupt: Interrupt,
    ) -> Result<Reply, HttpError> {
        self.clock += 1;
        let changes = services.apps.changes();
        let warm = self.apps.len();
        if changes != self.seen_changes {
            self.seen_changes = changes;
            self.apps
                .retain(|name, a| services.apps.known(name).map(|d| d.deploy_id) == Some(a.deploy));
        }
        // The heap a context made (and modules loaded) in this call adds: what the
        // thread keeps from now on, not garbage. Only when no context was dropped: a
        // dropped one is garbage of about that size, which the collection below frees.
        let mut made = 0;
        let stale = self.apps.get(app).is_some_and(|a| a.deploy != deploy);
        let mut dropped = stale || self.apps.len() < warm;
        let host = Host {
            app: Arc::from(app),
            services: services.clone(),
            interrupt: interrupt.clone(),
            job: None,
            sink: LogSink::Server,
        };
        if stale {
            self.apps.remove(app);
        }
        let fresh = !self.apps.contains_key(app);
        if fresh {
            if self.apps.len() >= MAX_WARM_APPS {
                let oldest = self
                    .apps
                    .iter()
                    .min_by_key(|(_, a)| a.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.apps.remove(&k);
                    dropped = true;
                }
            }
            let before = self.heap.load(Ordering::Relaxed);
            let ctx = js::new_context(host.clone()).map_err(|e| run_error(e, app))?;
            made = self.heap.load(Ordering::Relaxed) - before;
            self.apps.insert(
                app.to_string(),
                AppContext {
                    deploy,
                    ctx,
                    modules: HashMap::new(),
                    last_used: 0,
                    grown: 0,
                    host_key: None,
                },
            );
        }
        crate::metrics::global().handler_context(!fresh);
        let Some(entry) = self.apps.get_mut(app) else {
            return Err(HttpError::internal("handler context vanished"));
        };
        entry.last_used = self.clock;
        if self.current_key.is_some() {
            entry.host_key = self.current_key;
        }
        entry.ctx.insert_data(host);
        entry.ctx.insert_data(crate::worker::SpawnBatch::default());
        let busy = Busy::start(&self.js_since);
        let mut grown = Growth::default();
        let body_bytes = i64::try_from(request.body_bytes).unwrap_or(i64::MAX);
        // The heap at the call's start, less a context made for it (added back below
        // with the files it loads, so that it is counted once).
        let start = self.heap.load(Ordering::Relaxed) - made;
        let kept = self.kept.map_or(start, |k| k.min(start));
        let result = call_handler(
            entry, file, source, request, &interrupt, self.heap, &mut grown,
        );
        // The run's spawns are committed and queued before its response goes out.
        let spawned = crate::worker::finish_spawns(&entry.ctx);
        interrupt.disarm();
        drop(busy);
        if let Err(RunError::Interrupted(_)) = &result {
            // The interrupted run left frames behind: this context cannot be reused.
            self.apps.remove(app);
            boa_gc::force_collect();
            trim_heap();
        } else {
            self.limit_warm(app, grown.kept);
        }
        let kept = if dropped {
            kept
        } else {
            kept + made + grown.loaded
        };
        self.kept = Some(kept);
        if body_bytes > BIG_REQUEST_BYTES
            || self.heap.load(Ordering::Relaxed) - kept > collect_past(kept)
        {
            // Free the JS copies of a big request now, not at some later collection,
            // and let the freed pages go back to the OS once its buffers are dropped.
            boa_gc::force_collect();
            crate::js::interrupt::trim_soon();
            // What is left is what the thread keeps (a context made for this call too).
            self.kept = Some(self.heap.load(Ordering::Relaxed));
            crate::metrics::global().handler_collected();
        }
        match (result, spawned) {
            (Ok(reply), Ok(())) => Ok(reply),
            (Err(e), _) => Err(run_error(e, app)),
            (Ok(_), Err(e)) => Err(e.into()),
        }
    }
}

impl HandlerCache {
    /// Keeps the warm context of `app` within [`MAX_WARM_BYTES`] of growth: collect
    /// when it is over, drop it when it stays over.
    fn limit_warm(&mut self, app: &str, grown: i64) {
        let heap = self.heap;
        let Some(entry) = self.apps.get_mut(app) else {
            return;
        };
        entry.grown += grown;
        if entry.grown <= MAX_WARM_BYTES {
            return;
        }
        let pre = heap.load(Ordering::Relaxed);
        boa_gc::force_collect();
        entry.grown -= pre - heap.load(Ordering::Relaxed);
        if entry.grown > MAX_WARM_BYTES {
            log::info!(
                target: "app",
                "[{app}] the warm handler context kept {} MB; starting fresh",
                entry.grown >> 20
            );
            self.apps.remove(app);
            boa_gc::force_collect();
        }
        trim_heap();
    }
}

use crate::js::interrupt::trim_heap;

/// A request whose body, or the thread's heap over what it keeps after a call, is this
/// big has its garbage collected right after the call, and freed pages go back to the
/// OS (see `trim_soon`). What the thread keeps is measured after each forced
/// collection: it used to be the lowest level the thread had ever started a call at,
/// so once it kept warm contexts of two apps their size counted as garbage and every
/// call forced a collection, which traces every context the thread keeps (39% of the
/// handler threads' time in a 20-app spawn burst). With 1 MB here instead of 256 KB,
/// RSS after the HTTP bench's load was 49.7 MB against 40.3.
const BIG_REQUEST_BYTES: i64 = 256 << 10;

/// How much a handler thread's heap may grow past what it keeps before a call ends
/// with a collection: [`BIG_REQUEST_BYTES`], or a quarter of what it keeps when that is
/// more. A collection traces everything the thread keeps (its warm contexts, up to
/// [`MAX_WARM_APPS`]), so a fixed threshold made each byte a thread with eight warm
/// contexts allocated cost 30 bytes traced; this bounds it at four, and the garbage a
/// thread holds at a quarter of what it keeps.
fn collect_past(kept: i64) -> i64 {
    BIG_REQUEST_BYTES.max(kept / 4)
}

/// A handler call's heap growth.
#[derive(Default)]
struct Growth {
    /// What the context keeps: the modules it loaded, and what the call allocated less
    /// the reply (handed to the HTTP layer) and the request (built before, freed here).
    kept: i64,
    /// Of `kept`, the modules loaded: compiled code, kept for good.
    loaded: i64,
}

fn call_handler(
    entry: &mut AppContext,
    file: &str,
    source: &str,
    request: HandlerRequest,
    interrupt: &Interrupt,
    heap: &AtomicI64,
    grown: &mut Growth,
) -> Result<Reply, RunError> {
    // What the context keeps: the loaded module, and what the call allocated minus the
    // reply (handed to the HTTP layer) and the request (built before, freed here).
    let ctx = &mut entry.ctx;
    let exports = match entry.modules.get(file) {
        Some(e) => e.clone(),
        None => {
            let start = heap.load(Ordering::Relaxed);
            let e = js::load_entry(ctx, file, source, js::Kind::Handler, interrupt)?;
            entry.modules.insert(file.to_string(), e.clone());
            let loaded = heap.load(Ordering::Relaxed) - start;
            grown.kept += loaded;
            grown.loaded += loaded;
            e
        }
    };
    let arg = request_value(request, ctx)?;
    let start = heap.load(Ordering::Relaxed);
    let out = js::call(ctx, &exports, &[arg], interrupt)?;
    let reply = to_reply(&out, ctx)?;
    grown.kept += heap.load(Ordering::Relaxed) - start - reply_bytes(&reply);
    Ok(reply)
}

/// The handler's argument `{body, headers, method, path, query}`, built in the
/// context directly ([`js::plain_object`]): what `JsValue::from_json` made of the same
/// JSON object, keys in the order a JSON object iterates them (the sorted order),
/// without a `serde_json::Value` tree of the request in between.
fn request_value(request: HandlerRequest, ctx: &mut Context) -> Result<JsValue, RunError> {
    // Header and query values are strings (anything else converts as `from_json` does).
    fn strings(
        ctx: &mut Context,
        map: serde_json::Map<String, serde_json::Value>,
    ) -> Result<JsValue, RunError> {
        let mut props = Vec::with_capacity(map.len());
        for (k, v) in map {
            let value = match v {
                serde_json::Value::String(v) => JsValue::from(JsString::from(v.as_str())),
                other => js::from_json(&other, ctx)?,
            };
            props.push((JsString::from(k.as_str()), value));
        }
        Ok(js::plain_object(ctx, props))
    }
    let body = match &request.body {
        serde_json::Value::Null => JsValue::null(),
        serde_json::Value::String(s) => JsValue::from(JsString::from(s.as_str())),
        other => js::from_json(other, ctx)?,
    };
    let headers = strings(ctx, request.headers)?;
    let query = strings(ctx, request.query)?;
    let props = [
        (js_string!("body"), body),
        (js_string!("headers"), headers),
        (
            js_string!("method"),
            JsValue::from(JsString::from(request.method.as_str())),
        ),
        (
            js_string!("path"),
            JsValue::from(JsString::from(request.path.as_str())),
        ),
        (js_string!("query"), query),
    ];
    Ok(js::plain_object(ctx, props))
}

/// Heap held by a reply, to leave it out of the context's growth.
fn reply_bytes(reply: &Reply) -> i64 {
    match reply {
        Reply::Full {
            content_type,
            headers,
            body,
            ..
        } => {
            let headers: usize = headers
                .iter()
                .map(|(k, v)| k.capacity() + v.capacity() + std::mem::size_of::<(String, String)>())
                .sum();
            (body.capacity() + content_type.capacity() + headers) as i64
        }
        _ => 0,
    }
}

/// A returned object is a response only when `status` is an integer 100–599; anything
/// else (including a job object whose status is "running") is a 200 JSON body.
fn to_reply(out: &JsValue, ctx: &mut Context) -> Result<Reply, RunError> {
    if out.is_undefined() {
        return Ok(Reply::bytes(204, "text/plain", Vec::new()));
    }
    let json = js::to_json(out, ctx)?;
    let Some(json) = json else {
        return Ok(Reply::bytes(204, "text/plain", Vec::new()));
    };
    if let Some(status) = json
        .get("status")
        .and_then(|s| s.as_i64())
        .filter(|s| (100..=599).contains(s))
        .filter(|_| {
            json.get("status")
                .and_then(|s| s.as_f64())
                .is_some_and(|f| f.fract() == 0.0)
        })
    {
        let mut headers = Vec::new();
        if let Some(h) = json.get("headers").and_then(|h| h.as_object()) {
            for (k, v) in h {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                // A bad header is the handler's bug: a 500 naming it, never a split response.
                super::headers::check(k, &v).map_err(|e| RunError::Thrown(e.to_string()))?;
                headers.push((k.clone(), v));
            }
        }
        let (ct, body) = match json.get("body") {
            None | Some(serde_json::Value::Null) => ("text/plain; charset=utf-8", Vec::new()),
            Some(serde_json::Value::String(s)) => {
                ("text/plain; charset=utf-8", s.clone().into_bytes())
            }
            Some(other) => ("application/json", other.to_string().into_bytes()),
        };
        return Ok(Reply::Full {
            status: status as u16,
            content_type: ct.to_string(),
            headers,
            body,
        });
    }
    Ok(Reply::json(200, &json))
}

fn run_error(e: RunError, app: &str) -> HttpError {
    match e {
        RunError::Thrown(m) => {
            log::info!(target: "app", "[{app}] handler threw: {m}");
            HttpError::internal(m)
        }
        RunError::Failed(f, m) => {
            log::warn!(target: "app", "[{app}] handler failed: {m}");
            HttpError::new(super::util::failure_status(f), m)
        }
        RunError::Interrupted(Reason::Timeout) => HttpError::new(
            504,
            format!(
                "the handler did not finish within {} s and was stopped",
                HANDLER_TIMEOUT.as_secs()
            ),
        ),
        RunError::Interrupted(Reason::Shutdown) => {
            HttpError::new(503, "the server is shutting down")
        }
        RunError::Interrupted(Reason::Memory) => HttpError::internal(format!(
            "the handler allocated more than {} MB and was stopped",
            HANDLER_RUN_HEAP >> 20
        )),
        RunError::Interrupted(r) => HttpError::internal(format!("the handler was stopped ({r:?})")),
    }
}

/// Stack this thread keeps below its current frame when it gives the rest back.
const STACK_KEPT: usize = 64 << 10;

/// Gives the pages of the calling thread's stack below its current frame (less
/// [`STACK_KEPT`]) back to the OS. A handler thread's stack is `JS_STACK_BYTES` (16 MB)
/// for deep JavaScript; whatever one call touched stayed resident for the thread's
/// life (~200 KB per thread for a trivial handler, MBs after deep recursion). Nothing
/// lives below the stack pointer, so the pages are free: touched again, they come back
/// zeroed. Returns the bytes released (0 when the stack bounds are unknown).
pub fn release_unused_stack() -> usize {
    let here = 0u8;
    let sp = std::hint::black_box(&here) as *const u8 as usize;
    // SAFETY: pthread_getattr_np fills `attr` for the calling thread (destroyed after),
    // pthread_attr_getstack reads it; madvise(MADV_DONTNEED) is given a page-aligned
    // range inside this thread's own stack mapping that lies below the live frames.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return 0;
        }
        let mut low: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let got = libc::pthread_attr_getstack(&attr, &mut low, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        let page = match libc::sysconf(libc::_SC_PAGESIZE) {
            p if p > 0 => p as usize,
            _ => 4096,
        };
        let low = low as usize;
        if got != 0 || sp < low || sp >= low.saturating_add(size) {
            return 0;
        }
        // Round the low end up: the guard page below the stack may be inside `low`.
        let start = (low + page - 1) & !(page - 1);
        let end = sp.saturating_sub(STACK_KEPT) & !(page - 1);
        if end <= start {
            return 0;
        }
        if libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) != 0 {
            return 0;
        }
        end - start
    }
}

#[cfg(test)]
mod tests {
    use super::{
        collect_past, release_unused_stack, request_value, HandlerRequest, BIG_REQUEST_BYTES,
    };
    use boa_engine::{js_string, property::Attribute, Context, JsValue, Source};

    #[test]
    fn the_collection_threshold_grows_with_what_a_thread_keeps() {
        const MB: i64 = 1 << 20;
        // One warm context (~0.35 MB): 256 KB, as before.
        assert_eq!(collect_past(0), BIG_REQUEST_BYTES);
        assert_eq!(collect_past(MB / 2), BIG_REQUEST_BYTES);
        // Eight (~3 MB): a quarter of it, so a collection traces at most four bytes
        // kept per byte of garbage.
        assert_eq!(collect_past(3 * MB), 3 * MB / 4);
    }

    /// The request object built in the context is what the JSON conversion made of
    /// the same request: same keys in the same order, same values, plain objects.
    #[test]
    fn request_object_is_what_the_json_conversion_made() {
        let map = |pairs: &[(&str, serde_json::Value)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<serde_json::Map<_, _>>()
        };
        let s = |v: &str| serde_json::Value::String(v.into());
        let bodies = [
            serde_json::Value::Null,
            s("plain text"),
            serde_json::json!({"z": 1, "a": [1, 2.5, "x", null, {"k": true}]}),
            serde_json::json!(12),
        ];
        for body in bodies {
            let request = HandlerRequest {
                method: "POST".into(),
                path: "/api/x/y".into(),
                query: map(&[("q", s("1")), ("a", s("é"))]),
                headers: map(&[("x-b", s("2")), ("content-type", s("application/json"))]),
                body: body.clone(),
                body_bytes: 0,
            };
            let json = serde_json::json!({
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "headers": request.headers,
                "body": request.body,
            });
            let mut ctx = Context::default();
            let direct = request_value(request, &mut ctx).expect("request object");
            let converted = JsValue::from_json(&json, &mut ctx).expect("from_json");
            for (name, v) in [("direct", direct), ("converted", converted)] {
                ctx.register_global_property(js_string!(name), v, Attribute::all())
                    .expect("global");
            }
            let same = ctx
                .eval(Source::from_bytes(
                    "JSON.stringify(direct) === JSON.stringify(converted) \
                     && Object.getPrototypeOf(direct.headers) === Object.prototype \
                     && Object.getOwnPropertyDescriptor(direct, 'path').writable \
                     && Object.keys(direct).join() === 'body,headers,method,path,query'",
                ))
                .expect("eval");
            assert_eq!(same, JsValue::from(true), "body {body}");
        }
    }

    /// Touches about `depth` × 64 KB of stack below the caller.
    #[inline(never)]
    fn dig(depth: usize) -> u8 {
        let mut block = [0u8; 64 << 10];
        std::hint::black_box(&mut block)[depth % 1000] = depth as u8;
        let below = if depth == 0 { 0 } else { dig(depth - 1) };
        std::hint::black_box(&block)[depth % 1000].wrapping_add(below)
    }

    /// Resident pages among `len` bytes from `start` (page-aligned).
    fn resident(start: usize, len: usize) -> usize {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: mincore only reports on the range; `vec` has one byte per page.
        let r = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn a_deep_call_leaves_no_resident_stack_after_the_release() {
        std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(|| {
                dig(64); // ~4 MB touched
                let here = 0u8;
                let sp = std::hint::black_box(&here) as *const u8 as usize & !4095;
                let (below, len) = (sp - (6 << 20), 5 << 20);
                let before = resident(below, len);
                let released = release_unused_stack();
                let after = resident(below, len);
                assert!(before > 512, "the deep call touched only {before} pages");
                assert!(released >= 4 << 20, "released {released} bytes");
                assert_eq!(after, 0, "{after} of {before} pages still resident");
                // The stack still works, down to the same depth.
                dig(64);
            })
            .expect("thread")
            .join()
            .expect("the thread ran");
    }
}
