//! Running `api/*.js` handlers. Each HTTP thread keeps one boa context per app (a few
//! apps at most), built lazily and thrown away when the app is redeployed or a run was
//! interrupted, so a warm request costs one function call, not a parse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use boa_engine::{Context, JsValue};

use super::util::{HttpError, Reply};
use crate::js::{self, Host, Interrupt, LogSink, Reason, RunError};
use crate::services::Services;

/// How long one handler call may run before it is stopped with a 504.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

/// Apps whose contexts one HTTP thread keeps warm; the least recently used goes first.
const MAX_WARM_APPS: usize = 8;

struct AppContext {
    version: i64,
    ctx: Context,
    /// The runner of each loaded handler file, by path (see `js::load_entry`).
    modules: HashMap<String, JsValue>,
    last_used: u64,
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

/// Per-thread cache of warm handler contexts and of app versions.
pub struct HandlerCache {
    /// When this thread started running user JS ([`mono_ms`]; 0 = not running), read
    /// by the HTTP watchdog.
    js_since: Arc<AtomicI64>,
    apps: HashMap<String, AppContext>,
    clock: u64,
    /// App versions as last read from the store (None: no such app), valid while
    /// `Services::app_generation` still equals `generation`.
    versions: HashMap<String, Option<i64>>,
    generation: u64,
}

/// The request as handed to a handler (`request` in JS).
pub struct HandlerRequest {
    pub method: String,
    pub path: String,
    pub query: serde_json::Map<String, serde_json::Value>,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub body: serde_json::Value,
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
            apps: HashMap::new(),
            clock: 0,
            versions: HashMap::new(),
            generation: 0,
        }
    }

    /// Forgets every warm context and version.
    pub fn clear(&mut self) {
        self.apps.clear();
        self.versions.clear();
    }

    /// The deployed version of `app`, or None when no such app exists. Reads the store
    /// only after a deploy or removal happened since the last read.
    pub fn app_version(
        &mut self,
        services: &Services,
        app: &str,
    ) -> Result<Option<i64>, HttpError> {
        let generation = services
            .app_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        if generation != self.generation {
            // An app may have been removed and deployed again at the same version
            // number: drop warm contexts too, not just the versions.
            self.versions.clear();
            self.apps.clear();
            self.generation = generation;
        }
        if let Some(v) = self.versions.get(app) {
            return Ok(*v);
        }
        let v = services.store.get_app(app)?.map(|i| i.version);
        if self.versions.len() > 1024 {
            self.versions.clear();
        }
        self.versions.insert(app.to_string(), v);
        Ok(v)
    }

    /// Whether `file` of `app` at `version` is already loaded (its source is not needed).
    pub fn is_loaded(&self, app: &str, version: i64, file: &str) -> bool {
        self.apps
            .get(app)
            .is_some_and(|a| a.version == version && a.modules.contains_key(file))
    }

    /// Runs handler file `file` of `app` (at `version`) for `request`. `source` may be
    /// empty when [`is_loaded`](Self::is_loaded) said so.
    pub fn run(
        &mut self,
        services: &Arc<Services>,
        app: &str,
        version: i64,
        file: &str,
        source: &str,
        request: HandlerRequest,
    ) -> Result<Reply, HttpError> {
        self.clock += 1;
        let interrupt = Interrupt::new(Some(HANDLER_TIMEOUT));
        let host = Host {
            app: Arc::from(app),
            services: services.clone(),
            interrupt: interrupt.clone(),
            job: None,
            sink: LogSink::Server,
        };
        let stale = self.apps.get(app).is_some_and(|a| a.version != version);
        if stale {
            self.apps.remove(app);
        }
        if !self.apps.contains_key(app) {
            if self.apps.len() >= MAX_WARM_APPS {
                let oldest = self
                    .apps
                    .iter()
                    .min_by_key(|(_, a)| a.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.apps.remove(&k);
                }
            }
            let ctx = js::new_context(host.clone()).map_err(|e| run_error(e, app))?;
            self.apps.insert(
                app.to_string(),
                AppContext {
                    version,
                    ctx,
                    modules: HashMap::new(),
                    last_used: 0,
                },
            );
        }
        let Some(entry) = self.apps.get_mut(app) else {
            return Err(HttpError::internal("handler context vanished"));
        };
        entry.last_used = self.clock;
        entry.ctx.insert_data(host);
        let busy = Busy::start(&self.js_since);
        let result = call_handler(entry, file, source, request, &interrupt);
        drop(busy);
        if let Err(RunError::Interrupted(_)) = &result {
            // The interrupted run left frames behind: this context cannot be reused.
            self.apps.remove(app);
        }
        match result {
            Ok(reply) => Ok(reply),
            Err(e) => Err(run_error(e, app)),
        }
    }
}

fn call_handler(
    entry: &mut AppContext,
    file: &str,
    source: &str,
    request: HandlerRequest,
    interrupt: &Interrupt,
) -> Result<Reply, RunError> {
    let ctx = &mut entry.ctx;
    let exports = match entry.modules.get(file) {
        Some(e) => e.clone(),
        None => {
            let e = js::load_entry(ctx, file, source, js::Kind::Handler, interrupt)?;
            entry.modules.insert(file.to_string(), e.clone());
            e
        }
    };
    let req = serde_json::json!({
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": request.headers,
        "body": request.body,
    });
    let arg = js::from_json(&req, ctx)?;
    let out = js::call(ctx, &exports, &[arg], interrupt)?;
    to_reply(&out, ctx)
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
        RunError::Interrupted(r) => HttpError::internal(format!("the handler was stopped ({r:?})")),
    }
}
