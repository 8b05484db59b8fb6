//! The only module that touches rusqlite: opening the database, migrations, the single
//! batching writer thread (which keeps and retries writes the disk refused, see
//! `writer.rs`), retention, and the typed queries for apps, kv and jobs.

mod apps;
pub mod check;
mod job_admin;
mod jobs;
mod kv;
mod migrations;
mod retention;
mod writer;

pub use apps::{AppFile, AppInfo};
pub use job_admin::{JobPage, JobQuery, Retried};
pub use jobs::{Inserted, JobRow, LogLine, Transition};
pub use writer::{retry_delay, should_truncate_wal, Backoff, StoreStatus};

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use rusqlite::{Connection, OpenFlags};

use writer::{Kind, OpResult, WriteFn, WriteReq};

/// Errors the store reports. Callers branch on `NotFound` and `Invalid` (HTTP 404/400)
/// and `Unavailable` (503); everything else is an internal failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The row the caller asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The caller's input breaks a rule the store enforces (size, shape).
    #[error("{0}")]
    Invalid(String),
    /// SQLite failed; the string says what we were doing.
    #[error("{context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    /// A file or thread operation failed (creating a backup file, starting the writer
    /// thread); the string says what we were doing. Not the caller's fault: HTTP 500.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A bug: the store could not encode its own data. HTTP 500.
    #[error("internal store error: {0}")]
    Internal(String),
    /// The writer thread is gone (the server is shutting down).
    #[error("the store is shut down")]
    Closed,
    /// The store cannot write now (disk full, I/O error, database locked); the write was
    /// not made. Transient: HTTP 503, try again later.
    #[error("the server cannot store data right now ({0}); try again later")]
    Unavailable(String),
}

impl Error {
    /// Whether the failure says "cannot write now" (retry later) rather than "this
    /// write is wrong".
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Sqlite { source, .. } => writer::transient_sqlite(source),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description of what was being done to a rusqlite error.
pub(crate) trait SqlContext<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|source| Error::Sqlite {
            context: what.to_string(),
            source,
        })
    }
}

/// Runs a query and collects every row through `map`; `what` names it in errors.
pub(crate) fn query_all<T, P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    params: P,
    what: &str,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = c.prepare_cached(sql).ctx(what)?;
    let rows = stmt
        .query_map(params, map)
        .ctx(what)?
        .collect::<rusqlite::Result<Vec<T>>>()
        .ctx(what);
    rows
}

/// Handle to the database. Cheap to clone; reads use a small pool of connections, and
/// all writes go through one writer thread that batches them into transactions.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    /// The writer's condition (degraded, pending, free space) and the test hooks.
    shared: Arc<writer::Shared>,
    limits: Limits,
    /// Whether `FAZT_TEST_HOOKS=1` was set at start (see [`Store::set_test_hooks`]).
    test_hooks: bool,
    // Dropping the last sender ends the writer thread after it drained the queue.
    writer: Mutex<Option<Sender<WriteReq>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

/// Quotas and retention the store enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of keys and values one app may keep in kv.
    pub kv_bytes_per_app: u64,
    /// Finished jobs kept per app (the newest); older ones are pruned.
    pub jobs_keep_per_app: u64,
    /// Finished jobs older than this (ms since they ended) are pruned.
    pub jobs_max_age_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            kv_bytes_per_app: 64 << 20,
            jobs_keep_per_app: 1000,
            jobs_max_age_ms: 7 * 86_400_000,
        }
    }
}

/// Fault injection for tests, set over a hidden admin endpoint that exists only when
/// the server was started with `FAZT_TEST_HOOKS=1`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestHooks {
    /// Every write batch fails as on a full disk.
    pub fail_writes: Option<bool>,
    /// Writer connection's `PRAGMA max_page_count` (0 lifts it): past it the database
    /// cannot grow, as on a full disk. A value below the current size means "full now".
    pub max_page_count: Option<i64>,
}

/// Writes queued for the writer thread at most; producers wait past it.
const WRITE_QUEUE: usize = 4096;
/// Places of that queue log and progress lines never take (see `write_later`).
const RESERVED: usize = 512;

impl Store {
    /// Opens (creating if needed) `fazt.db` in `data_dir` with the default limits.
    pub fn open(data_dir: &Path) -> Result<Store> {
        Store::open_with(data_dir, Limits::default())
    }

    /// Opens (creating if needed) `fazt.db` in `data_dir`, applies migrations and starts
    /// the writer thread.
    pub fn open_with(data_dir: &Path, limits: Limits) -> Result<Store> {
        let path = data_dir.join("fazt.db");
        let conn = open_conn(&path, true)?;
        migrations::apply(&conn)?;
        let (tx, rx) = crossbeam_channel::bounded::<WriteReq>(WRITE_QUEUE);
        let shared = Arc::new(writer::Shared::new());
        let janitor = retention::janitor(limits.clone());
        let w = writer::Writer::new(conn, rx, shared.clone(), &path, janitor);
        let writer_thread = std::thread::Builder::new()
            .name("fazt-store-writer".into())
            .spawn(move || w.run())
            .map_err(|source| Error::Io {
                context: "starting the store writer thread".into(),
                source,
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                readers: Mutex::new(Vec::new()),
                shared,
                limits,
                test_hooks: std::env::var("FAZT_TEST_HOOKS").is_ok_and(|v| v == "1"),
                writer: Mutex::new(Some(tx)),
                writer_thread: Mutex::new(Some(writer_thread)),
            }),
        })
    }

    /// The writer's condition, for /health and /metrics.
    pub fn status(&self) -> StoreStatus {
        self.inner.shared.status()
    }

    /// True while writes fail (disk full, I/O errors): waited writes are refused with
    /// [`Error::Unavailable`] and background writes wait for a retry.
    pub fn degraded(&self) -> bool {
        self.inner.shared.degraded()
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Whether the test hooks may be used (`FAZT_TEST_HOOKS=1` at start).
    pub fn test_hooks_enabled(&self) -> bool {
        self.inner.test_hooks
    }

    /// Sets test faults. Test-only: refused unless `FAZT_TEST_HOOKS=1` was set at start.
    pub fn set_test_hooks(&self, h: &TestHooks) -> Result<()> {
        if !self.inner.test_hooks {
            return Err(Error::NotFound("test hooks".into()));
        }
        let hooks = &self.inner.shared.hooks;
        if let Some(f) = h.fail_writes {
            hooks.fail_writes.store(f, Ordering::SeqCst);
        }
        if let Some(n) = h.max_page_count {
            hooks.max_page_count.store(n, Ordering::SeqCst);
            hooks.version.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    #[cfg(test)]
    fn set_full_for_test(&self, max_page_count: i64) {
        let hooks = &self.inner.shared.hooks;
        hooks.max_page_count.store(max_page_count, Ordering::SeqCst);
        hooks.version.fetch_add(1, Ordering::SeqCst);
    }

    /// Runs `f` on a read connection from the pool.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = {
            let mut pool = self.inner.readers.lock().unwrap_or_else(|p| p.into_inner());
            pool.pop()
        };
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&self.inner.path, false)?,
        };
        let out = f(&conn);
        let mut pool = self.inner.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 32 {
            pool.push(conn);
        }
        out
    }

    fn sender(&self) -> Result<Sender<WriteReq>> {
        let guard = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or(Error::Closed)
    }

    /// Runs `f` on the writer thread inside a batch transaction and waits until that
    /// batch committed. `durable` asks for an fsync'd commit. While the store cannot
    /// write this fails fast with [`Error::Unavailable`]; nothing is retried for the
    /// caller, who was told it failed.
    pub(crate) fn write<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_begin(durable, f, |_| {})?.wait()
    }

    /// [`write`](Self::write) without waiting: queues `f` and returns at once; the
    /// returned [`Pending`] says the outcome once the batch holding `f` committed (or
    /// failed). `then` runs on the writer thread right after a commit that kept `f`'s
    /// value, before the caller is told: it must not block.
    pub(crate) fn write_begin<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        then: impl FnOnce(&mut T) + Send + 'static,
    ) -> Result<Pending<T>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        // The op's value waits here for the batch's outcome.
        let slot: Arc<Mutex<Option<Result<T>>>> = Arc::new(Mutex::new(None));
        let kept = slot.clone();
        let mut f = Some(f);
        let op: WriteFn = Box::new(move |c| {
            // A waited write runs at most once: a failed batch fails it, never retries it.
            let Some(f) = f.take() else {
                return OpResult::Failed;
            };
            let (value, result) = match f(c) {
                Ok(v) => (Ok(v), OpResult::Ok),
                Err(e) if e.is_transient() => return OpResult::Transient(e.to_string()),
                Err(e) => (Err(e), OpResult::Failed),
            };
            *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
            result
        });
        let done: writer::Done = Box::new(move |outcome| {
            let value = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            let out = match (outcome, value) {
                (Ok(()), Some(Ok(mut v))) => {
                    then(&mut v);
                    Ok(v)
                }
                (Ok(()), Some(Err(e))) => Err(e),
                // The op never ran (a batch failed before it): the store is closing.
                (Ok(()), None) => Err(Error::Closed),
                (Err(e), _) => Err(e),
            };
            let _ = tx.send(out);
        });
        self.sender()?
            .send(WriteReq {
                op,
                kind: Kind::Waited,
                durable,
                done: Some(done),
            })
            .map_err(|_| Error::Closed)?;
        Ok(Pending { rx })
    }

    /// Queues `f` for the writer thread without waiting. `kind` says whether it is a
    /// state transition (kept until it commits) or a log/progress line (shed past a
    /// bound while the store cannot write). `f` may run more than once (a batch that
    /// failed for lack of space is retried), so it must not compute values that should
    /// stay fixed, such as timestamps.
    fn write_later(
        &self,
        kind: Kind,
        mut f: impl FnMut(&Connection) -> Result<()> + Send + 'static,
    ) {
        let op: WriteFn = Box::new(move |c| match f(c) {
            Ok(()) => OpResult::Ok,
            Err(e) if e.is_transient() => OpResult::Transient(e.to_string()),
            Err(e) => {
                log::error!("background write failed: {e}");
                OpResult::Failed
            }
        });
        let Ok(tx) = self.sender() else {
            log::warn!("write dropped: the store is shut down");
            return;
        };
        if kind == Kind::Lossy {
            // Log and progress lines wait while the queue is nearly full, leaving the
            // last RESERVED places to state transitions and waited writes: the
            // scheduler records starts and outcomes, and must never wait behind a job
            // that logs in a loop (cancels, timeouts and the watchdog would wait too).
            while tx.len() + RESERVED >= WRITE_QUEUE {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if tx
            .send(WriteReq {
                op,
                kind,
                durable: false,
                done: None,
            })
            .is_err()
        {
            log::warn!("write dropped: the store is shut down");
        }
    }

    /// Waits until everything queued so far is committed.
    pub fn flush(&self) -> Result<()> {
        self.write(false, |_| Ok(()))
    }

    /// Drains the write queue, stops the writer thread and joins it.
    pub fn close(&self) {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let handle = self
            .inner
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.inner
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// What SQLite keeps in memory of a statement journal before it spills to a temp file.
/// Every write of a writer batch runs in its own savepoint, whose undo pages go to that
/// journal: with SQLite's default (64 KB) a batch of a few hundred inserts made
/// thousands of `pwrite` calls to a temp file (21% of a spawn burst's CPU). A batch's
/// journal stays within a few MB; one big write (a deploy, an app's removal, a kv purge)
/// still spills past this, so it never costs memory the size of its data.
const STATEMENT_JOURNAL_SPILL: i32 = 16 << 20;

/// Process-wide SQLite settings; call before the first connection opens (later it is a
/// no-op that says so in the log).
pub fn configure_sqlite() {
    // SAFETY: sqlite3_config is called with an int argument as this option expects;
    // before SQLite initialises it only sets a global, after it returns SQLITE_MISUSE.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_config(
            rusqlite::ffi::SQLITE_CONFIG_STMTJRNL_SPILL,
            STATEMENT_JOURNAL_SPILL as std::ffi::c_int,
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        log::debug!("SQLite was initialised already; statement journals spill at its default");
    }
    // SAFETY: the callback has the signature SQLITE_CONFIG_LOG expects and touches no
    // SQLite state; the context pointer is unused (null).
    let rc = unsafe {
        rusqlite::ffi::sqlite3_config(
            rusqlite::ffi::SQLITE_CONFIG_LOG,
            sqlite_log
                as unsafe extern "C" fn(
                    *mut std::ffi::c_void,
                    std::ffi::c_int,
                    *const std::ffi::c_char,
                ),
            std::ptr::null_mut::<std::ffi::c_void>(),
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        log::debug!("SQLite was initialised already; its own error log is not forwarded");
    }
}

/// SQLite's own error log (which statement aborted and why, which file operation
/// failed with which errno), forwarded to the server's log: the error a caller sees
/// names only the code. Expected conditions (constraint checks, schema changes, busy
/// retries, notices) go to debug; errors to warn, at most 20 lines per 10 s (a write
/// retried for hours on a full disk must not fill the log).
unsafe extern "C" fn sqlite_log(
    _: *mut std::ffi::c_void,
    code: std::ffi::c_int,
    msg: *const std::ffi::c_char,
) {
    use rusqlite::ffi;
    use std::sync::atomic::AtomicU64;
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static IN_WINDOW: AtomicU64 = AtomicU64::new(0);
    let msg = if msg.is_null() {
        std::borrow::Cow::Borrowed("")
    } else {
        // SAFETY: SQLite passes a NUL-terminated string valid for this call.
        unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy()
    };
    let expected = matches!(
        code & 0xff,
        ffi::SQLITE_CONSTRAINT
            | ffi::SQLITE_SCHEMA
            | ffi::SQLITE_BUSY
            | ffi::SQLITE_LOCKED
            | ffi::SQLITE_NOTICE
            | ffi::SQLITE_WARNING
    );
    if expected {
        log::debug!("sqlite ({code}): {msg}");
        return;
    }
    let window = (now_ms() / 10_000) as u64;
    if WINDOW.swap(window, Ordering::Relaxed) != window {
        IN_WINDOW.store(0, Ordering::Relaxed);
    }
    if IN_WINDOW.fetch_add(1, Ordering::Relaxed) < 20 {
        log::warn!("sqlite ({code}): {msg}");
    }
}

fn open_conn(path: &Path, create: bool) -> Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let what = format!("opening database {}", path.display());
    let conn = Connection::open_with_flags(path, flags).ctx(&what)?;
    conn.busy_timeout(Duration::from_secs(10)).ctx(&what)?;
    // Reading the header proves the file is a database, so a corrupt file fails here
    // with a clear message instead of at the first query.
    conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
        .ctx(&format!(
            "{} is not a readable SQLite database",
            path.display()
        ))?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
    )
    .ctx(&what)?;
    Ok(conn)
}

/// Milliseconds since the Unix epoch; the store's unit for every timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A write queued by [`Store::write_begin`]: its value once the batch committed.
#[must_use = "a pending write says whether it committed only when waited for"]
pub struct Pending<T> {
    rx: crossbeam_channel::Receiver<Result<T>>,
}

impl<T> Pending<T> {
    /// Waits until the write's batch committed (or failed).
    pub fn wait(self) -> Result<T> {
        self.rx.recv().map_err(|_| Error::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_write_is_rolled_back_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let failed = store.write(false, |c| {
            c.execute(
                "INSERT INTO kv(app, key, value) VALUES ('a', 'half', '1')",
                [],
            )
            .ctx("insert")?;
            Err::<(), _>(Error::Invalid("refused after a partial change".into()))
        });
        assert!(failed.is_err());
        store
            .kv_set("a", "whole", "2".into(), None)
            .expect("a later write");
        assert_eq!(
            store.kv_get("a", "half").expect("read"),
            None,
            "rolled back"
        );
        assert_eq!(
            store.kv_get("a", "whole").expect("read").as_deref(),
            Some("2")
        );
        store.close();
    }

    use crate::job::{JobConfig, Status};
    #[test]
    fn the_scheduler_never_blocks_behind_a_job_logging_in_a_loop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        // Hold the writer inside a write, as a slow fsync would.
        let (release, held) = crossbeam_channel::bounded::<()>(1);
        let (entered, inside) = crossbeam_channel::bounded::<()>(1);
        let stalled = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.write(false, move |_| {
                    let _ = entered.send(());
                    let _ = held.recv();
                    Ok(())
                })
            })
        };
        inside.recv().expect("the writer took the stalling write");
        // A job logs in a loop, faster than the writer (here: stalled) keeps up.
        let logger = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..2 * WRITE_QUEUE {
                    store.job_log("j", "info", format!("line {i}"), 1000);
                }
            })
        };
        let tx = store.sender().expect("sender");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tx.len() + RESERVED < WRITE_QUEUE && !logger.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never filled"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let the logger take every place it can.
        std::thread::sleep(Duration::from_millis(50));
        // The scheduler records a start: it must not wait for the writer.
        let (done_tx, done) = crossbeam_channel::bounded::<()>(1);
        let scheduler = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.job_started("j", 1, 0);
                let _ = done_tx.send(());
            })
        };
        let waited = done.recv_timeout(Duration::from_secs(2));
        // Our handle on the queue would keep the writer from ever seeing the close.
        drop(tx);
        drop(release);
        logger.join().expect("logger");
        scheduler.join().expect("scheduler");
        stalled.join().expect("stalled").expect("write");
        assert!(
            waited.is_ok(),
            "the scheduler's write waited behind the job's log lines"
        );
        store.close();
    }

    fn new_job(store: &Store, app: &str) -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = format!("job-{}", N.fetch_add(1, Ordering::Relaxed));
        store
            .insert_job(
                id.clone(),
                app,
                "workers/w.js",
                &JobConfig::default(),
                None,
                None,
            )
            .expect("insert a job");
        id
    }

    fn status_of(store: &Store, id: &str) -> Status {
        store.get_job(id).expect("read").expect("job exists").status
    }

    /// Flushes until a flush succeeds (the writer retries with backoff) or 5 s pass.
    fn flush_until_ok(store: &Store) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.flush().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "writes never recovered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn status_writes_failing_for_lack_of_space_are_retried_not_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let id = new_job(&store, "a");
        store.job_started(&id, 1, 0);
        store.flush().expect("healthy flush");
        let hooks = &store.inner.shared.hooks;
        hooks.fail_writes.store(true, Ordering::SeqCst);
        store.job_finished(&id, Status::Done, Some("1".into()), None, 1, 0);
        let err = store.flush().expect_err("a waited write fails fast");
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        assert!(store.degraded());
        let st = store.status();
        assert_eq!(st.pending_transitions, 1, "{st:?}");
        assert!(
            st.reason.as_deref().unwrap_or("").contains("full"),
            "{st:?}"
        );
        assert_eq!(status_of(&store, &id), Status::Running, "not written yet");
        let kv = store.kv_set("a", "k", "1".into(), None);
        assert!(matches!(kv, Err(Error::Unavailable(_))), "{kv:?}");
        hooks.fail_writes.store(false, Ordering::SeqCst);
        flush_until_ok(&store);
        assert_eq!(
            status_of(&store, &id),
            Status::Done,
            "the kept write committed"
        );
        assert!(!store.degraded());
        assert_eq!(store.status().pending_writes, 0);
        store.close();
    }

    #[test]
    fn a_log_flood_is_shed_while_the_store_cannot_write_but_transitions_are_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let id = new_job(&store, "a");
        store.flush().expect("flush");
        store
            .inner
            .shared
            .hooks
            .fail_writes
            .store(true, Ordering::SeqCst);
        store.job_started(&id, 1, 0);
        for i in 0..(writer::LOSSY_CAP + 5000) {
            store.job_log(&id, "info", format!("line {i}"), 1000);
        }
        store.job_finished(&id, Status::Done, None, None, 1, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.status().pending_transitions < 2 {
            assert!(std::time::Instant::now() < deadline, "{:?}", store.status());
            std::thread::sleep(Duration::from_millis(5));
        }
        let st = store.status();
        assert_eq!(st.shed_writes, 5000, "{st:?}");
        assert_eq!(st.pending_writes, writer::LOSSY_CAP + 2, "{st:?}");
        store
            .inner
            .shared
            .hooks
            .fail_writes
            .store(false, Ordering::SeqCst);
        flush_until_ok(&store);
        assert_eq!(status_of(&store, &id), Status::Done);
        assert_eq!(
            store.job_logs(&id, 0).expect("logs").len(),
            1000,
            "newest kept"
        );
        store.close();
    }

    #[test]
    fn a_full_database_keeps_transitions_in_order_and_converges() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let ids: Vec<String> = (0..5).map(|_| new_job(&store, "a")).collect();
        store.flush().expect("flush");
        // Full: the database may not grow by one page.
        store.set_full_for_test(1);
        for id in &ids {
            store.job_started(id, 1, 0);
            // Log lines need new pages: these fail with SQLITE_FULL.
            store.job_log(id, "info", "x".repeat(8000), 1000);
            store.job_finished(id, Status::Failed, None, Some("boom".into()), 1, 0);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !store.degraded() {
            assert!(std::time::Instant::now() < deadline, "never degraded");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(store.status().reason.unwrap_or_default().contains("full"));
        assert!(matches!(
            store.insert_job(
                "x".into(),
                "a",
                "workers/w.js",
                &JobConfig::default(),
                None,
                None
            ),
            Err(Error::Unavailable(_))
        ));
        store.set_full_for_test(0);
        flush_until_ok(&store);
        for id in &ids {
            assert_eq!(
                status_of(&store, id),
                Status::Failed,
                "started, then failed: in order"
            );
            assert_eq!(store.job_logs(id, 0).expect("logs").len(), 1);
        }
        store.close();
    }

    #[test]
    fn metrics_job_counts_do_not_scan_the_jobs_table() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let steps = |store: &Store| -> i32 {
            store
                .read(|c| {
                    let mut st = c.prepare(jobs::JOB_COUNTS_SQL).ctx("prepare")?;
                    let n = st.query_map([], |_| Ok(())).ctx("run")?.count();
                    assert_eq!(n, 1, "one status so far");
                    Ok(st.get_status(rusqlite::StatementStatus::VmStep))
                })
                .expect("count")
        };
        for _ in 0..10 {
            new_job(&store, "a");
        }
        let small = steps(&store);
        store
            .write(false, |c| {
                c.execute_batch(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
                     INSERT INTO worker_jobs(id, app, path, status, config, created_at)
                     SELECT 'bulk' || i, 'a', 'workers/w.js', 'queued', '{}', i FROM n",
                )
                .ctx("bulk insert")
            })
            .expect("bulk");
        assert_eq!(steps(&store), small, "same work for 10 and 5,010 jobs");
        let counts = store.job_counts().expect("counts");
        assert_eq!(counts, vec![("queued".to_string(), 5010)]);
        store.close();
    }

    #[test]
    fn finished_jobs_are_pruned_by_count_and_age_in_small_steps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let mut finished = Vec::new();
        for _ in 0..300 {
            let id = new_job(&store, "a");
            store.job_finished(&id, Status::Done, None, None, 1, 0);
            finished.push(id);
        }
        let live = new_job(&store, "a");
        let b = new_job(&store, "b");
        store.job_finished(&b, Status::Done, None, None, 1, 0);
        store.flush().expect("flush");
        // Distinct end times, so "newest" is well defined (many end in the same ms).
        let ends: Vec<(String, i64)> = finished
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), now_ms() - 1000 + i as i64))
            .collect();
        store
            .write(false, move |c| {
                for (id, at) in &ends {
                    c.execute(
                        "UPDATE worker_jobs SET done_at = ?2 WHERE id = ?1",
                        rusqlite::params![id, at],
                    )
                    .ctx("setting end times")?;
                }
                Ok(())
            })
            .expect("end times");
        let limits = Limits {
            kv_bytes_per_app: 1 << 20,
            jobs_keep_per_app: 10,
            jobs_max_age_ms: 3_600_000,
        };
        // The writer runs steps on its own connection; a second one does the same here.
        let conn = open_conn(&dir.path().join("fazt.db"), false).expect("second connection");
        let run = |now: i64| retention::prune_step(&conn, &limits, now).expect("prune");
        assert_eq!(run(now_ms()), retention::PRUNE_BATCH, "a step is bounded");
        assert_eq!(run(now_ms()), 90);
        assert_eq!(run(now_ms()), 0);
        assert!(
            store.get_job(&finished[0]).expect("read").is_none(),
            "oldest gone"
        );
        assert!(
            store.get_job(&finished[299]).expect("read").is_some(),
            "newest kept"
        );
        assert!(store.get_job(&live).expect("read").is_some(), "queued kept");
        assert!(
            store.get_job(&b).expect("read").is_some(),
            "other app under its limit"
        );
        // Two hours later everything finished is past the age limit.
        assert_eq!(run(now_ms() + 7_200_000), 11);
        assert!(store.get_job(&live).expect("read").is_some());
        store.close();
    }
}
