//! The only module that touches rusqlite: opening the database, migrations, the single
//! batching writer thread, and the typed queries for apps, kv and jobs.

mod apps;
pub mod check;
mod jobs;
mod kv;
mod migrations;

pub use apps::{AppFile, AppInfo};
pub use jobs::{Inserted, JobRow, LogLine};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OpenFlags};

/// Errors the store reports. Callers branch on `NotFound` and `Invalid` (HTTP 404/400);
/// everything else is an internal failure.
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
    /// The writer thread is gone (the server is shutting down).
    #[error("the store is shut down")]
    Closed,
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

/// A write op; returns whether it succeeded, so a failed op's partial changes are
/// rolled back to its savepoint instead of being committed with the batch.
type WriteFn = Box<dyn FnOnce(&Connection) -> bool + Send>;

/// One unit of work for the writer thread.
struct WriteReq {
    op: WriteFn,
    /// Commit this batch with `synchronous=FULL` (checkpoints, deploys): the caller is
    /// told "done" only once the data would survive a power cut, not just a crash.
    durable: bool,
    /// Told the commit outcome after the batch holding `op` commits (or fails).
    done: Option<Sender<Result<()>>>,
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
    // Dropping the last sender ends the writer thread after it drained the queue.
    writer: Mutex<Option<Sender<WriteReq>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

/// Most writes one transaction takes: enough to amortise fsync, small enough that a
/// durable caller never waits long behind a flood of log lines.
const MAX_BATCH: usize = 512;

impl Store {
    /// Opens (creating if needed) `fazt.db` in `data_dir`, applies migrations and starts
    /// the writer thread.
    pub fn open(data_dir: &Path) -> Result<Store> {
        let path = data_dir.join("fazt.db");
        let conn = open_conn(&path, true)?;
        migrations::apply(&conn)?;
        let (tx, rx) = crossbeam_channel::bounded::<WriteReq>(4096);
        let writer_thread = std::thread::Builder::new()
            .name("fazt-store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| Error::Invalid(format!("cannot start the store writer thread: {e}")))?;
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                readers: Mutex::new(Vec::new()),
                writer: Mutex::new(Some(tx)),
                writer_thread: Mutex::new(Some(writer_thread)),
            }),
        })
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
    /// batch committed. `durable` asks for an fsync'd commit.
    pub(crate) fn write<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let (val_tx, val_rx) = crossbeam_channel::bounded(1);
        let op: WriteFn = Box::new(move |c| {
            let result = f(c);
            let ok = result.is_ok();
            let _ = val_tx.send(result);
            ok
        });
        self.sender()?
            .send(WriteReq {
                op,
                durable,
                done: Some(done_tx),
            })
            .map_err(|_| Error::Closed)?;
        let value = val_rx.recv().map_err(|_| Error::Closed)??;
        done_rx.recv().map_err(|_| Error::Closed)??;
        Ok(value)
    }

    /// Queues `f` for the writer thread without waiting (progress, logs). A failure is
    /// logged by the writer; the queue is bounded, so a flood slows the producer down.
    pub(crate) fn write_later(&self, f: impl FnOnce(&Connection) -> Result<()> + Send + 'static) {
        let op: WriteFn = Box::new(move |c| match f(c) {
            Ok(()) => true,
            Err(e) => {
                log::error!("background write failed: {e}");
                false
            }
        });
        let Ok(tx) = self.sender() else {
            log::warn!("write dropped: the store is shut down");
            return;
        };
        if tx
            .send(WriteReq {
                op,
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

fn writer_loop(conn: Connection, rx: Receiver<WriteReq>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        commit_batch(&conn, batch);
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        log::warn!("final WAL checkpoint failed: {e}");
    }
}

fn commit_batch(conn: &Connection, batch: Vec<WriteReq>) {
    let durable = batch.iter().any(|r| r.durable);
    let mut dones = Vec::with_capacity(batch.len());
    let outcome = (|| -> Result<()> {
        if durable {
            conn.execute_batch("PRAGMA synchronous=FULL")
                .ctx("raising durability")?;
        }
        conn.execute_batch("BEGIN IMMEDIATE")
            .ctx("starting a write batch")?;
        for (i, req) in batch.into_iter().enumerate() {
            // A savepoint per op: one op's failure rolls back only that op.
            let sp = format!("op{i}");
            conn.execute_batch(&format!("SAVEPOINT {sp}"))
                .ctx("opening a savepoint")?;
            let op = req.op;
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(conn)))
                .unwrap_or_else(|_| {
                    log::error!("a store write panicked; rolled back that write only");
                    false
                });
            if !ok {
                conn.execute_batch(&format!("ROLLBACK TO {sp}"))
                    .ctx("rolling back a failed write")?;
            }
            conn.execute_batch(&format!("RELEASE {sp}"))
                .ctx("releasing a savepoint")?;
            dones.extend(req.done);
        }
        conn.execute_batch("COMMIT").ctx("committing a write batch")
    })();
    if outcome.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    if durable {
        if let Err(e) = conn.execute_batch("PRAGMA synchronous=NORMAL") {
            log::warn!("could not restore synchronous=NORMAL: {e}");
        }
    }
    for done in dones {
        let _ = done.send(match &outcome {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::Invalid(format!("write batch failed: {e}"))),
        });
    }
    if let Err(e) = outcome {
        log::error!("{e}");
    }
}

/// Milliseconds since the Unix epoch; the store's unit for every timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
}
