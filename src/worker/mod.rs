//! The worker system: spawn (option parsing, [`SpawnError`]), the pool (scheduler,
//! slots, memory monitor), and the `fazt.worker.*` and `job.*` host functions. The job
//! model itself (status, config, filters) is the leaf [`crate::job`].

mod budget;
mod mailbox;
mod options;
mod policy;
mod pool;
pub mod queue;
mod slot;
mod state;

pub use budget::{rss_bytes, watch_this_thread, Budget, CountingAlloc};
pub use options::{format_bytes, parse_duration, parse_memory, parse_options};
pub use pool::{backoff_delay, Limits, Pool, PoolRunner, PoolStats};
// The job model lives in the leaf `job` module (the store needs it without the pool).
pub use crate::job::{
    truncate_log_line, JobConfig, ListFilter, Priority, Status, DEFAULT_MEMORY, LOG_KEEP,
};

use std::collections::HashMap;
use std::sync::Arc;

use boa_engine::{js_string, Context, JsResult, JsString, JsValue};

use crate::apps::Run;
use crate::js::api_support::{
    failure_error, host, plain_error, sleep_for, store_error, str_arg, type_error,
};
use crate::js::Interrupt;
use crate::realtime::Listeners;
use crate::store::{JobRow, Store};

/// What the pool's scheduler and slots need from the rest of the server, on top of
/// the JS host's [`crate::js::Env`]; the composition (`services::Services`) implements
/// it, so `worker` names nothing above it.
pub trait Env: crate::js::Env {
    fn pool(&self) -> &Pool;
    /// Channel listener counts, for idle timeouts.
    fn listeners(&self) -> &Arc<Listeners>;
    /// Starts a run of `app`'s live deployment (None: no such app, or it is being
    /// removed); a removal waits for the run to end.
    fn enter_app(
        &self,
        app: &str,
        stop: Option<Interrupt>,
    ) -> crate::store::Result<Option<Run<'_, Interrupt>>>;
}

/// The handles the `fazt.worker.*` and `job.*` host functions use, put into every JS
/// context by the host's `js::Env::install`.
#[derive(Clone)]
pub struct JsEnv {
    pub store: Store,
    pub pool: Arc<Pool>,
}

fn js_env(ctx: &Context) -> JsResult<JsEnv> {
    ctx.get_data::<JsEnv>()
        .cloned()
        .ok_or_else(|| plain_error("no worker handles in this context"))
}

/// The shared memory budget jobs reserve from.
pub const MEMORY_BUDGET: u64 = 256 << 20;
/// Largest `data`, result or checkpoint (JSON text).
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// Why a spawn was refused. Callers branch on it: HTTP maps it to a status in one place
/// (`http::util`, `From<SpawnError> for HttpError`: 400, 429, 503 or 500), and
/// `fazt.worker.spawn` throws an error a handler's caller sees the same way.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Bad path or options, or no such worker file: the caller's mistake, with the
    /// reason. HTTP 400.
    #[error("{0}")]
    Invalid(String),
    /// The app already has `limit` jobs waiting: try again later. HTTP 429.
    #[error("the job queue of app '{app}' is full ({limit} jobs waiting): try again later")]
    QueueFull { app: String, limit: i64 },
    /// The store failed: HTTP 503 when it cannot write now, 500 otherwise.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

/// Why the pool did not start (or could not replace a slot).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Reading the jobs to recover or resume failed.
    #[error("{what}: {source}")]
    Store {
        what: &'static str,
        #[source]
        source: crate::store::Error,
    },
    /// A thread could not be started (the process is out of memory or threads).
    #[error("starting {what}: {source}")]
    Thread {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A slot thread ended before it reported its heap counter.
    #[error("worker slot {0} died at start")]
    SlotDied(usize),
}

/// Validates and enqueues a job of `app`. With a uniqueKey that matches a live job, the
/// live job is returned instead. Returns once the job is committed and queued.
pub fn spawn(
    store: &Store,
    pool: &Pool,
    app: &str,
    path: &str,
    opts: &serde_json::Value,
) -> Result<JobRow, SpawnError> {
    let (config, data) = parse_spawn(store, pool, app, path, opts, None)?;
    insert_checked(store, pool, app, path, &config, data)
}

/// Options and path of a spawn, checked. `known` holds the worker files this run
/// already found, so a run spawning in a loop reads each file's row once.
fn parse_spawn(
    store: &Store,
    pool: &Pool,
    app: &str,
    path: &str,
    opts: &serde_json::Value,
    known: Option<&mut Vec<String>>,
) -> Result<(JobConfig, Option<String>), SpawnError> {
    check_worker_path(path).map_err(SpawnError::Invalid)?;
    // The server's budget (`--memory-budget`), not the default: a reservation that
    // could never fit would wait for memory forever.
    let (config, data) =
        parse_options(opts, pool.limits.memory_budget).map_err(SpawnError::Invalid)?;
    let seen = known.as_ref().is_some_and(|k| k.iter().any(|p| p == path));
    if !seen {
        if !store.app_file_exists(app, path)? {
            return Err(SpawnError::Invalid(format!(
                "no worker file {path} in app '{app}'"
            )));
        }
        if let Some(k) = known {
            k.push(path.to_string());
        }
    }
    Ok((config, data))
}

/// The insert that waits for its commit, with the uniqueKey and queue-bound rules.
fn insert_checked(
    store: &Store,
    pool: &Pool,
    app: &str,
    path: &str,
    config: &JobConfig,
    data: Option<String>,
) -> Result<JobRow, SpawnError> {
    // Counted in the insert's transaction (an O(1) trigger-kept counter), behind every
    // batched insert queued before it in the writer's order.
    let check = Some(pool.limits.queue_per_app);
    let inserted = store.insert_job(new_job_id(), app, path, config, data, check)?;
    match inserted {
        crate::store::Inserted::New(row) => {
            pool.enqueue(pool::Queued::from_row(&row));
            Ok(row)
        }
        crate::store::Inserted::Existing(row) => Ok(row),
        crate::store::Inserted::QueueFull { limit } => Err(SpawnError::QueueFull {
            app: app.to_string(),
            limit,
        }),
    }
}

/// Spawns of handler runs queued for the writer and not yet committed, per app: a
/// batched spawn counts its app's uncommitted spawns with the committed queue, so
/// batching never lets an app's queue past its bound.
static IN_FLIGHT_BY_APP: std::sync::LazyLock<std::sync::Mutex<HashMap<String, i64>>> =
    std::sync::LazyLock::new(Default::default);

/// Near its bound, an app's spawns wait for their own commit (the exact, counted
/// insert); this many places below it absorb the counts' moment of staleness.
const BOUND_MARGIN: i64 = 64;

/// A run waits for its spawns once this many are uncommitted.
const BATCH_MAX: usize = 256;

/// Takes a place for one batched spawn of `app`, unless its queue may be near the
/// bound (then the spawn must take the waited, counted insert: None). The committed
/// count is the store's trigger-kept counter (O(1)), which counts a job from its
/// commit, and a place is given back only after that commit: a job is always in one
/// of the two counts (in both for a moment, never in neither).
fn reserve_in_flight(store: &Store, pool: &Pool, app: &str) -> Result<Option<()>, SpawnError> {
    let limit = pool.limits.queue_per_app;
    let committed = store.app_queue_len(app)?;
    let mut apps = IN_FLIGHT_BY_APP.lock().unwrap_or_else(|p| p.into_inner());
    let mine = apps.get(app).copied().unwrap_or(0);
    if committed + mine >= limit - BOUND_MARGIN {
        return Ok(None);
    }
    *apps.entry(app.to_string()).or_insert(0) += 1;
    Ok(Some(()))
}

/// Gives back the place [`reserve_in_flight`] took, once the spawn committed or failed.
fn release_in_flight(app: &str) {
    let mut apps = IN_FLIGHT_BY_APP.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = apps.get_mut(app) {
        *n -= 1;
        if *n <= 0 {
            apps.remove(app);
        }
    }
}

/// The spawns of one HTTP handler run, batched: `fazt.worker.spawn` queues the insert
/// for the store's writer and returns the job at once; the job is queued in the pool
/// right after its commit (on the writer thread), so a handler spawning in a loop
/// costs one transaction per writer batch instead of one round trip per job. The run
/// waits for all of them before its response is sent ([`finish_spawns`]), and before
/// any `fazt.worker` call that reads jobs, so a response or a read never gets ahead of
/// a spawn's commit. A spawn that could not be stored fails the run's response even
/// when the handler caught the error a later call threw. Spawns with a uniqueKey, or
/// of an app whose queue is near its bound, wait for their own commit as before.
#[derive(Default)]
pub struct SpawnBatch {
    inner: std::cell::RefCell<BatchInner>,
}

#[derive(Default)]
struct BatchInner {
    pending: Vec<InFlight>,
    /// Worker files this run found.
    files: Vec<String>,
    /// The first spawn of the run that was not stored.
    unstored: Option<Unstored>,
}

/// Why a batched spawn was not stored, kept for the rest of the run.
#[derive(Clone)]
enum Unstored {
    QueueFull { app: String, limit: i64 },
    Store(String),
}

impl Unstored {
    fn error(&self) -> SpawnError {
        match self {
            Unstored::QueueFull { app, limit } => SpawnError::QueueFull {
                app: app.clone(),
                limit: *limit,
            },
            Unstored::Store(m) => SpawnError::Store(crate::store::Error::Unavailable(m.clone())),
        }
    }
}

struct InFlight {
    app: String,
    pending: crate::store::Pending<crate::store::Inserted>,
    /// The job for the pool, if the writer could not hand it over without waiting.
    left: Arc<std::sync::Mutex<Option<Box<pool::Queued>>>>,
    pool: Arc<Pool>,
}

impl InFlight {
    /// Waits for the commit; queues the job in the pool if the writer could not.
    fn settle(self) -> Result<(), Unstored> {
        match self.pending.wait() {
            Ok(crate::store::Inserted::QueueFull { limit }) => Err(Unstored::QueueFull {
                app: self.app,
                limit,
            }),
            Ok(_) => {
                let left = self.left.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(q) = left {
                    self.pool.enqueue(*q);
                }
                Ok(())
            }
            Err(e) => {
                // Not committed, so the writer never gave its place back.
                release_in_flight(&self.app);
                Err(Unstored::Store(e.to_string()))
            }
        }
    }
}

impl Drop for BatchInner {
    /// A run that unwound past [`finish_spawns`] (a panic) still settles its spawns
    /// when the next run replaces the batch: a committed job is never left unqueued.
    fn drop(&mut self) {
        for job in self.pending.drain(..) {
            let app = job.app.clone();
            if job.settle().is_err() {
                log::warn!("a spawn of app '{app}' was not stored");
            }
        }
    }
}

/// Waits until every spawn batched in `ctx` committed and is queued in the pool. Call
/// it when a handler run ends, whatever its outcome (its spawns stand, as they would
/// unbatched); an error means a spawn of this run was not stored (now or earlier in
/// the run: the error stays for the rest of the run).
pub fn finish_spawns(ctx: &Context) -> Result<(), SpawnError> {
    let Some(batch) = ctx.get_data::<SpawnBatch>() else {
        return Ok(());
    };
    let pending = std::mem::take(&mut batch.inner.borrow_mut().pending);
    let mut first = None;
    for job in pending {
        if let Err(u) = job.settle() {
            first.get_or_insert(u);
        }
    }
    let mut inner = batch.inner.borrow_mut();
    if inner.unstored.is_none() {
        inner.unstored = first;
    }
    inner.unstored.as_ref().map_or(Ok(()), |u| Err(u.error()))
}

/// A batched spawn: queues the insert and returns the job as it will be stored. The
/// caller took the app's in-flight place ([`reserve_in_flight`]).
fn spawn_batched(
    w: &JsEnv,
    batch: &SpawnBatch,
    app: &str,
    path: &str,
    config: JobConfig,
    data: Option<String>,
) -> Result<JobRow, SpawnError> {
    let left = Arc::new(std::sync::Mutex::new(None));
    let handed = left.clone();
    let pool = w.pool.clone();
    let owner = app.to_string();
    let begun = w.store.insert_job_begin(
        new_job_id(),
        app,
        path,
        &config,
        data,
        // Counted in the insert's transaction too: the bound holds whatever the
        // estimate said.
        Some(w.pool.limits.queue_per_app),
        move |inserted: &mut crate::store::Inserted| {
            // Committed (or refused): the store's count covers the job from now on.
            release_in_flight(&owner);
            let crate::store::Inserted::New(row) = inserted else {
                return;
            };
            // On the writer thread, which must never wait on the scheduler: a full
            // event queue leaves the job to the run's `finish_spawns`.
            if let Err(q) = pool.try_enqueue(Box::new(pool::Queued::from_row(row))) {
                *handed.lock().unwrap_or_else(|p| p.into_inner()) = Some(q);
            }
        },
    );
    let (row, pending) = match begun {
        Ok(b) => b,
        Err(e) => {
            release_in_flight(app);
            return Err(e.into());
        }
    };
    batch.inner.borrow_mut().pending.push(InFlight {
        app: app.to_string(),
        pending,
        left,
        pool: w.pool.clone(),
    });
    Ok(row)
}

/// `workers/<...>.js`, with no `..`, absolute or odd segments.
pub fn check_worker_path(path: &str) -> Result<(), String> {
    crate::apps::check_path(path)?;
    if !path.starts_with("workers/") || !path.ends_with(".js") {
        return Err(format!(
            "path '{path}' must name a .js file under workers/ (e.g. 'workers/sync.js')"
        ));
    }
    Ok(())
}

/// Time-ordered, unguessable job ids: 12 hex digits of milliseconds, 8 random bytes.
pub fn new_job_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let rnd = random8();
    let mut id = format!("{:012x}", crate::store::now_ms());
    for b in rnd {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 15)]));
    }
    id
}

/// Eight bytes from the OS's random source, fetched 512 at a time per thread: a
/// handler spawning in a loop made one `getrandom` system call per job.
fn random8() -> [u8; 8] {
    use std::cell::RefCell;
    const POOL: usize = 512;
    thread_local! {
        static POOLED: RefCell<(usize, [u8; POOL])> = const { RefCell::new((POOL, [0; POOL])) };
    }
    let pooled = POOLED.with(|p| {
        let mut p = p.borrow_mut();
        if p.0 + 8 > POOL {
            getrandom::fill(&mut p.1).ok()?;
            p.0 = 0;
        }
        let at = p.0;
        p.0 += 8;
        let mut out = [0u8; 8];
        out.copy_from_slice(&p.1[at..at + 8]);
        // Used bytes are not kept around.
        p.1[at..at + 8].fill(0);
        Some(out)
    });
    pooled.unwrap_or_else(|| {
        // Without an entropy source fall back to a process-wide counter mixed with time.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (n ^ crate::store::now_ms() as u64).to_le_bytes()
    })
}

type Native = fn(&JsValue, &[JsValue], &mut Context) -> JsResult<JsValue>;

pub(crate) fn js_natives() -> Vec<(&'static str, Native, usize)> {
    vec![
        ("workerSpawn", worker_spawn, 2),
        ("workerGet", worker_get, 1),
        ("workerList", worker_list, 1),
        ("workerCancel", worker_cancel, 1),
        ("workerWait", worker_wait, 2),
    ]
}

pub(crate) fn job_natives() -> Vec<(&'static str, Native, usize)> {
    vec![
        ("jobProgress", job_progress, 1),
        ("jobCheckpoint", job_checkpoint, 1),
        ("jobGetCheckpoint", job_get_checkpoint, 0),
        ("jobCancelled", job_cancelled, 0),
        ("jobSleep", job_sleep, 1),
        ("jobInfo", job_info, 0),
    ]
}

/// The job object users see in JS: what `JsValue::from_json(&row.to_json())` made (same
/// keys in the same order, serde_json's sorted one, same values), built directly,
/// without a `serde_json` tree of the row and a key string allocated per property (a
/// handler spawning 100 jobs built 100 of each).
fn job_value(row: &JobRow, ctx: &mut Context) -> JsResult<JsValue> {
    // Numbers as `from_json` makes them: an integer when it fits in i32, else a double.
    let int = |n: i64| i32::try_from(n).map_or_else(|_| JsValue::new(n as f64), JsValue::new);
    let opt_int = |n: Option<i64>| n.map_or_else(JsValue::null, int);
    let text = |s: &str| JsValue::from(JsString::from(s));
    let parsed = |s: &Option<String>, ctx: &mut Context| -> JsResult<JsValue> {
        match s
            .as_deref()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        {
            Some(v) => JsValue::from_json(&v, ctx),
            None => Ok(JsValue::null()),
        }
    };
    let props = [
        (js_string!("app"), text(&row.app)),
        (js_string!("attempt"), int(row.attempt)),
        (js_string!("createdAt"), int(row.created_at)),
        (js_string!("daemon"), JsValue::new(row.config.daemon)),
        (js_string!("data"), parsed(&row.data, ctx)?),
        (js_string!("doneAt"), opt_int(row.done_at)),
        (
            js_string!("error"),
            row.error.as_deref().map_or_else(JsValue::null, text),
        ),
        (js_string!("id"), text(&row.id)),
        (js_string!("path"), text(&row.path)),
        (js_string!("progress"), int(row.progress)),
        (js_string!("restarts"), int(row.restarts)),
        (js_string!("result"), parsed(&row.result, ctx)?),
        (js_string!("startedAt"), opt_int(row.started_at)),
        (js_string!("status"), text(row.status.as_str())),
    ];
    Ok(crate::js::plain_object(ctx, props))
}

fn worker_spawn(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    let path = str_arg(args, 0, "fazt.worker.spawn: path")?;
    let opts = match args.get(1) {
        None => serde_json::Value::Null,
        Some(v) if v.is_undefined() || v.is_null() => serde_json::Value::Null,
        Some(v) if v.is_object() && !v.is_callable() => {
            v.to_json(ctx)?.unwrap_or(serde_json::Value::Null)
        }
        Some(_) => return Err(type_error("fazt.worker.spawn: options must be an object")),
    };
    let w = js_env(ctx)?;
    match spawn_in(ctx, &w, &host.app, &path, &opts) {
        Ok(row) => job_value(&row, ctx),
        Err(e @ SpawnError::Invalid(_)) => Err(plain_error(format!("fazt.worker.spawn: {e}"))),
        Err(e @ SpawnError::QueueFull { .. }) => Err(failure_error(
            crate::js::Failure::Busy,
            format!("fazt.worker.spawn: {e}"),
        )),
        Err(SpawnError::Store(e)) => Err(store_error(e)),
    }
}

/// `spawn`, batched when the context is a handler run's (see [`SpawnBatch`]).
fn spawn_in(
    ctx: &Context,
    w: &JsEnv,
    app: &str,
    path: &str,
    opts: &serde_json::Value,
) -> Result<JobRow, SpawnError> {
    let Some(batch) = ctx.get_data::<SpawnBatch>() else {
        return spawn(&w.store, &w.pool, app, path, opts);
    };
    let (config, data) = {
        let mut inner = batch.inner.borrow_mut();
        parse_spawn(&w.store, &w.pool, app, path, opts, Some(&mut inner.files))?
    };
    let reserved = match config.unique_key {
        Some(_) => None,
        None => reserve_in_flight(&w.store, &w.pool, app)?,
    };
    if reserved.is_none() {
        // The rules read the app's jobs: the batch goes first, in order.
        finish_spawns(ctx)?;
        return insert_checked(&w.store, &w.pool, app, path, &config, data);
    }
    let row = spawn_batched(w, batch, app, path, config, data)?;
    if batch.inner.borrow().pending.len() >= BATCH_MAX {
        finish_spawns(ctx)?;
    }
    Ok(row)
}

/// Makes the run's batched spawns visible before a call that reads jobs.
fn settle(ctx: &Context) -> JsResult<()> {
    finish_spawns(ctx).map_err(|e| match e {
        SpawnError::Store(e) => store_error(e),
        e @ SpawnError::QueueFull { .. } => {
            failure_error(crate::js::Failure::Busy, format!("fazt.worker.spawn: {e}"))
        }
        e => plain_error(format!("fazt.worker.spawn: {e}")),
    })
}

fn worker_get(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    settle(ctx)?;
    let id = str_arg(args, 0, "fazt.worker.get: id")?;
    match host.services.store().get_job(&id).map_err(store_error)? {
        // Another app's job reads as not found.
        Some(row) if *row.app == *host.app => job_value(&row, ctx),
        _ => Ok(JsValue::null()),
    }
}

fn worker_list(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    settle(ctx)?;
    let filter = match args.first() {
        Some(v) if v.is_object() => v.to_json(ctx)?.unwrap_or(serde_json::Value::Null),
        _ => serde_json::Value::Null,
    };
    let mut status = None;
    let mut limit = None;
    if let Some(obj) = filter.as_object() {
        for (k, v) in obj {
            match k.as_str() {
                "status" => {
                    status = Some(
                        v.as_str()
                            .ok_or_else(|| type_error("fazt.worker.list: status must be a string"))?
                            .to_string(),
                    )
                }
                "limit" => {
                    limit = Some(v.as_u64().map(|n| n.to_string()).ok_or_else(|| {
                        type_error("fazt.worker.list: limit must be a whole number")
                    })?)
                }
                other => {
                    return Err(type_error(format!(
                        "fazt.worker.list: unknown filter '{other}' (known: status, limit)"
                    )))
                }
            }
        }
    }
    let f = ListFilter::from_query(Some(&host.app), status.as_deref(), limit.as_deref())
        .map_err(|e| plain_error(format!("fazt.worker.list: {e}")))?;
    let rows = host.services.store().list_jobs(&f).map_err(store_error)?;
    JsValue::from_json(&serde_json::Value::Array(rows), ctx)
}

fn worker_cancel(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    settle(ctx)?;
    let id = str_arg(args, 0, "fazt.worker.cancel: id")?;
    if host.job.as_ref().is_some_and(|j| j.id == id) {
        return Err(plain_error(
            "fazt.worker.cancel: a job cannot cancel itself; return instead",
        ));
    }
    // Waits for the stop at most 1 s, well inside the caller's own watchdog; a job
    // still stopping after that is returned as it is then.
    match js_env(ctx)?
        .pool
        .cancel_within(Some(&host.app), &id, std::time::Duration::from_secs(1))
        .map_err(store_error)?
    {
        Some(row) => job_value(&row, ctx),
        None => Ok(JsValue::null()),
    }
}

/// How long `fazt.worker.wait` waits when not told (upstream's default).
const WAIT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(300);

/// `fazt.worker.wait(id, {timeout})`: the job once it ended. It polls the store,
/// sleeping on the run's interrupt: a cancel of the waiting job wakes it, and a
/// handler's deadline bounds it (the handler then ends with its usual 504).
fn worker_wait(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let host = host(ctx)?;
    settle(ctx)?;
    let id = str_arg(args, 0, "fazt.worker.wait: id")?;
    let mut timeout = WAIT_DEFAULT;
    if let Some(opts) = args.get(1).filter(|v| !v.is_undefined() && !v.is_null()) {
        if !opts.is_object() || opts.is_callable() {
            return Err(type_error("fazt.worker.wait: options must be an object"));
        }
        let opts = opts.to_json(ctx)?.unwrap_or(serde_json::Value::Null);
        for (k, v) in opts.as_object().into_iter().flatten() {
            match (k.as_str(), v) {
                ("timeout", serde_json::Value::String(s)) => {
                    timeout = std::time::Duration::from_millis(
                        parse_duration(s).map_err(|e| type_error(format!("fazt.worker.wait: {e}")))?,
                    )
                }
                ("timeout", serde_json::Value::Number(n)) => {
                    timeout = n
                        .as_f64()
                        .filter(|ms| ms.is_finite() && *ms >= 0.0 && *ms <= 1e12)
                        .map(|ms| std::time::Duration::from_millis(ms as u64))
                        .ok_or_else(|| {
                            type_error("fazt.worker.wait: timeout must be 0 or more milliseconds")
                        })?
                }
                ("timeout", _) => {
                    return Err(type_error(
                        "fazt.worker.wait: timeout must be a duration such as '30s' or a number of milliseconds",
                    ))
                }
                (other, _) => {
                    return Err(type_error(format!(
                        "fazt.worker.wait: unknown option '{other}' (known: timeout)"
                    )))
                }
            }
        }
    }
    if host.job.as_ref().is_some_and(|j| j.id == id) {
        return Err(plain_error(
            "fazt.worker.wait: a job cannot wait for itself",
        ));
    }
    let started = std::time::Instant::now();
    let mut poll = std::time::Duration::from_millis(5);
    loop {
        let row = host.services.store().get_job(&id).map_err(store_error)?;
        let row = match row {
            // Another app's job reads as not found.
            Some(row) if *row.app == *host.app => row,
            _ => {
                return Err(plain_error(format!(
                    "fazt.worker.wait: no job '{id}' in this app"
                )))
            }
        };
        if row.status.is_final() {
            return job_value(&row, ctx);
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(plain_error(format!(
                "fazt.worker.wait: job {id} is still {} after {}",
                row.status.as_str(),
                options::format_ms(timeout.as_millis() as u64)
            )));
        }
        // Returns early with an uncatchable error when this run is stopped.
        sleep_for(&host, poll.min(left).as_millis() as f64)?;
        if host.interrupt.cancel_requested() {
            return Err(plain_error(format!(
                "fazt.worker.wait: this job was cancelled while waiting for job {id}"
            )));
        }
        poll = (poll * 2).min(std::time::Duration::from_millis(100));
    }
}

fn job_host(ctx: &Context) -> JsResult<(crate::js::Host, Arc<crate::js::JobHost>)> {
    let h = host(ctx)?;
    let job = h
        .job
        .clone()
        .ok_or_else(|| plain_error("job API used outside a worker"))?;
    Ok((h, job))
}

/// `[id, attempt, data JSON text or null]` of the job running in this context now.
fn job_info(_: &JsValue, _: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let (_, job) = job_host(ctx)?;
    let data = match &job.data {
        Some(d) => JsValue::from(JsString::from(d.as_str())),
        None => JsValue::null(),
    };
    let values = [
        JsValue::from(JsString::from(job.id.as_str())),
        JsValue::from(job.attempt as f64),
        data,
    ];
    Ok(boa_engine::object::builtins::JsArray::from_iter(values, ctx).into())
}

fn job_progress(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let (h, job) = job_host(ctx)?;
    let n = args
        .first()
        .and_then(|v| v.as_number())
        .filter(|n| n.is_finite() && (0.0..=100.0).contains(n))
        .ok_or_else(|| type_error("job.progress: give a number from 0 to 100"))?;
    h.services
        .store()
        .job_progress(&job.id, n.round() as i64, (job.attempt, job.restarts));
    Ok(JsValue::undefined())
}

fn job_checkpoint(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let (h, job) = job_host(ctx)?;
    let value = str_arg(args, 0, "job.checkpoint: value")?;
    if value.len() > MAX_JSON_BYTES {
        return Err(boa_engine::JsNativeError::range()
            .with_message(format!(
                "job.checkpoint: the checkpoint is {} bytes of JSON; the limit is 1 MB",
                value.len()
            ))
            .into());
    }
    h.services
        .store()
        .save_checkpoint(&job.id, value, (job.attempt, job.restarts))
        .map_err(store_error)?;
    Ok(JsValue::undefined())
}

fn job_get_checkpoint(_: &JsValue, _: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let (h, job) = job_host(ctx)?;
    match h
        .services
        .store()
        .checkpoint(&job.id)
        .map_err(store_error)?
    {
        Some(s) => Ok(JsString::from(s.as_str()).into()),
        None => Ok(JsValue::null()),
    }
}

fn job_cancelled(_: &JsValue, _: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let h = ctx
        .get_data::<crate::js::Host>()
        .cloned()
        .ok_or_else(|| plain_error("no host in this context"))?;
    Ok(h.interrupt.cancel_requested().into())
}

fn job_sleep(_: &JsValue, args: &[JsValue], ctx: &mut Context) -> JsResult<JsValue> {
    let (h, _) = job_host(ctx)?;
    let ms = args
        .first()
        .and_then(|v| v.as_number())
        .ok_or_else(|| type_error("job.sleep: ms must be a number"))?;
    sleep_for(&h, ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The job object built in the context is what the JSON conversion of the row made:
    /// the same JSON text (keys, order, values), for a new job and a finished one with
    /// data, a result, an error, big timestamps and a non-integer in its data.
    #[test]
    fn job_object_is_what_the_json_conversion_made() {
        let new = JobRow {
            id: "jb_1".into(),
            app: "shop".into(),
            path: "workers/a.js".into(),
            status: crate::job::Status::Queued,
            config: JobConfig::default(),
            data: None,
            progress: 0,
            result: None,
            error: None,
            attempt: 1,
            restarts: 0,
            created_at: 1_795_000_000_123,
            started_at: None,
            done_at: None,
        };
        let done = JobRow {
            status: crate::job::Status::Failed,
            config: JobConfig {
                daemon: true,
                ..JobConfig::default()
            },
            data: Some(r#"{"z":[1,2.5,"x",null],"a":{"k":true}}"#.into()),
            progress: 100,
            result: Some("42".into()),
            error: Some("boom".into()),
            attempt: 3,
            restarts: 2,
            started_at: Some(1_795_000_000_200),
            done_at: Some(1_795_000_000_300),
            ..new.clone()
        };
        let mut ctx = Context::default();
        for row in [new, done] {
            let built = job_value(&row, &mut ctx).expect("built");
            let converted = JsValue::from_json(&row.to_json(), &mut ctx).expect("converted");
            let text = |v: &JsValue, ctx: &mut Context| {
                v.to_json(ctx)
                    .expect("to_json")
                    .expect("a value")
                    .to_string()
            };
            // Key order as JSON.stringify sees it, and each value.
            let stringify = |v: JsValue, ctx: &mut Context| {
                let json = ctx
                    .global_object()
                    .get(js_string!("JSON"), ctx)
                    .expect("JSON");
                let f = json
                    .as_object()
                    .expect("object")
                    .get(js_string!("stringify"), ctx)
                    .expect("stringify");
                f.as_callable()
                    .expect("callable")
                    .call(&JsValue::undefined(), &[v], ctx)
                    .expect("called")
                    .to_string(ctx)
                    .expect("string")
                    .to_std_string_escaped()
            };
            assert_eq!(text(&built, &mut ctx), text(&converted, &mut ctx));
            assert_eq!(stringify(built, &mut ctx), stringify(converted, &mut ctx));
        }
    }

    #[test]
    fn worker_paths() {
        assert!(check_worker_path("workers/a.js").is_ok());
        assert!(check_worker_path("workers/sub/a.js").is_ok());
        for bad in [
            "api/a.js",
            "workers/../api/a.js",
            "/workers/a.js",
            "workers/a.ts",
            "workers//a.js",
            "a.js",
        ] {
            assert!(check_worker_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_ids_are_unique_and_ordered() {
        let a = new_job_id();
        let b = new_job_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 28);
        // Across more than one pool of random bytes: all distinct, lowercase hex, and
        // ordered by their millisecond prefix.
        let ids: Vec<String> = (0..1000).map(|_| new_job_id()).collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for w in ids.windows(2) {
            assert!(w[0][..12] <= w[1][..12], "{} then {}", w[0], w[1]);
        }
        assert!(ids.iter().all(|i| i.len() == 28
            && i.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))));
    }
}
