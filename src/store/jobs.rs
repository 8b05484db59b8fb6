//! Jobs and their logs: insert (with the uniqueKey and queue-bound rules, atomically),
//! state transitions written by the scheduler, reads for the API, and crash recovery.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::writer::Kind;
use super::{now_ms, query_all, Error, Result, SqlContext, Store};
use crate::job::{JobConfig, ListFilter, Status};

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub app: String,
    pub path: String,
    pub status: Status,
    pub config: JobConfig,
    pub data: Option<String>,
    pub progress: i64,
    pub result: Option<String>,
    pub error: Option<String>,
    pub attempt: i64,
    pub restarts: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub done_at: Option<i64>,
}

/// A job state transition for [`Store::job_transitions`], with the time it happened
/// (ms since the epoch).
#[derive(Debug, Clone)]
pub enum Transition {
    /// The job went to a slot.
    Started {
        id: String,
        attempt: i64,
        restarts: i64,
        at: i64,
    },
    /// A final state, or a return to `queued` (retries, restarts); `at` is the
    /// `done_at` of a final state. `started`: the start of this run when its
    /// [`Started`](Transition::Started) was not written yet (one write for both).
    Finished {
        id: String,
        status: Status,
        result: Option<String>,
        error: Option<String>,
        attempt: i64,
        restarts: i64,
        at: i64,
        started: Option<i64>,
    },
}

impl Transition {
    pub fn id(&self) -> &str {
        match self {
            Transition::Started { id, .. } | Transition::Finished { id, .. } => id,
        }
    }
}

impl JobRow {
    /// The job object users see in JS and over HTTP.
    pub fn to_json(&self) -> serde_json::Value {
        let parse = |s: &Option<String>| -> serde_json::Value {
            s.as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        serde_json::json!({
            "id": self.id,
            "app": self.app,
            "path": self.path,
            "status": self.status.as_str(),
            "progress": self.progress,
            "attempt": self.attempt,
            "restarts": self.restarts,
            "daemon": self.config.daemon,
            "data": parse(&self.data),
            "result": parse(&self.result),
            "error": self.error,
            "createdAt": self.created_at,
            "startedAt": self.started_at,
            "doneAt": self.done_at,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    pub id: i64,
    pub ts: i64,
    pub level: String,
    pub msg: String,
}

/// What `insert_job` did.
pub enum Inserted {
    New(JobRow),
    /// A live job with the same uniqueKey already existed; it is returned instead.
    Existing(JobRow),
    /// Nothing was inserted: the app already has `limit` jobs waiting. An outcome, not
    /// an error, so the caller can answer "try again later" (429) rather than "invalid".
    QueueFull {
        limit: i64,
    },
}

/// Jobs by status for /metrics, from trigger-kept counters: the cost does not grow
/// with the jobs table.
pub(super) const JOB_COUNTS_SQL: &str = "SELECT status, SUM(n) FROM job_counts GROUP BY status";

pub(super) const JOB_COLUMNS: &str =
    "SELECT id, app, path, status, config, data, progress, result, error,
    attempt, restarts, created_at, started_at, done_at FROM worker_jobs";

pub(super) fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let status: String = r.get(3)?;
    let config: String = r.get(4)?;
    Ok(JobRow {
        id: r.get(0)?,
        app: r.get(1)?,
        path: r.get(2)?,
        status: Status::parse(&status).unwrap_or(Status::Failed),
        config: serde_json::from_str(&config).unwrap_or_default(),
        data: r.get(5)?,
        progress: r.get(6)?,
        result: r.get(7)?,
        error: r.get(8)?,
        attempt: r.get(9)?,
        restarts: r.get(10)?,
        created_at: r.get(11)?,
        started_at: r.get(12)?,
        done_at: r.get(13)?,
    })
}

/// A new queued job as `insert` stores it (its `created_at` fixed now, so a retried
/// write keeps it).
fn new_row(id: String, app: &str, path: &str, config: &JobConfig, data: Option<String>) -> JobRow {
    JobRow {
        id,
        app: app.to_string(),
        path: path.to_string(),
        status: Status::Queued,
        config: config.clone(),
        data,
        progress: 0,
        result: None,
        error: None,
        attempt: 1,
        restarts: 0,
        created_at: now_ms(),
        started_at: None,
        done_at: None,
    }
}

/// Inserts `row` (see [`Store::insert_job`]); the stored row is `row` itself, as the
/// table's defaults agree with [`new_row`].
fn insert(c: &Connection, row: JobRow, queue_limit: Option<i64>) -> Result<Inserted> {
    if let Some(key) = &row.config.unique_key {
        let existing: Option<String> = c
            .prepare_cached(
                "SELECT id FROM worker_jobs WHERE app = ?1 AND unique_key = ?2
                 AND status IN ('queued', 'running') LIMIT 1",
            )
            .ctx("checking uniqueKey")?
            .query_row(params![row.app, key], |r| r.get(0))
            .optional()
            .ctx("checking uniqueKey")?;
        if let Some(eid) = existing {
            let found = get_job(c, &eid)?.ok_or_else(|| Error::NotFound(format!("job {eid}")))?;
            return Ok(Inserted::Existing(found));
        }
    }
    if let Some(limit) = queue_limit {
        // The trigger-kept counter: O(1), not a count over the app's queue.
        let queued: i64 = c
            .prepare_cached("SELECT n FROM job_counts WHERE app = ?1 AND status = 'queued'")
            .ctx("counting the queue")?
            .query_row([&row.app], |r| r.get(0))
            .optional()
            .ctx("counting the queue")?
            .unwrap_or(0);
        if queued >= limit {
            return Ok(Inserted::QueueFull { limit });
        }
    }
    let cfg = serde_json::to_string(&row.config)
        .map_err(|e| Error::Internal(format!("encoding job config: {e}")))?;
    c.prepare_cached(
        "INSERT INTO worker_jobs(id, app, path, status, config, data, unique_key, created_at)
         VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7)",
    )
    .ctx("inserting a job")?
    .execute(params![
        row.id,
        row.app,
        row.path,
        cfg,
        row.data,
        row.config.unique_key,
        row.created_at
    ])
    .ctx("inserting a job")?;
    Ok(Inserted::New(row))
}

pub(super) fn get_job(c: &Connection, id: &str) -> Result<Option<JobRow>> {
    c.prepare_cached(&format!("{JOB_COLUMNS} WHERE id = ?1"))
        .ctx("reading a job")?
        .query_row([id], job_from_row)
        .optional()
        .ctx("reading a job")
}

/// SET clauses of a write from a running job (parameters ?3 attempt, ?4 restarts, ?5
/// now): a row still `queued` for this very run becomes `running`, started now (the
/// scheduler's own start write follows with the dispatch time). SQLite evaluates every
/// SET expression on the old row, so both see the old status.
const MARK_RUNNING: &str =
    "started_at = CASE WHEN status = 'queued' AND attempt = ?3 AND restarts = ?4 \
     THEN ?5 ELSE started_at END, \
     status = CASE WHEN status = 'queued' AND attempt = ?3 AND restarts = ?4 \
     THEN 'running' ELSE status END";

impl Store {
    /// Inserts a queued job, unless a live job of the app has the same uniqueKey (then
    /// that one is returned) or the app's queue is full (then [`Inserted::QueueFull`]). With
    /// `queue_limit` None the count is skipped: the caller knows the queue is far from it.
    pub fn insert_job(
        &self,
        id: String,
        app: &str,
        path: &str,
        config: &JobConfig,
        data: Option<String>,
        queue_limit: Option<i64>,
    ) -> Result<Inserted> {
        self.insert_job_begin(id, app, path, config, data, queue_limit, |_| {})?
            .1
            .wait()
    }

    /// [`insert_job`](Self::insert_job) without waiting: queues the insert and returns
    /// at once the job as it will be stored (what a batched spawn answers, so the caller
    /// gives no uniqueKey: a match would return another job), and its
    /// [`Pending`](super::Pending) outcome. `then` runs on the writer thread right after
    /// the commit (see [`Store::write_begin`]).
    #[allow(clippy::too_many_arguments)]
    pub fn insert_job_begin(
        &self,
        id: String,
        app: &str,
        path: &str,
        config: &JobConfig,
        data: Option<String>,
        queue_limit: Option<i64>,
        then: impl FnOnce(&mut Inserted) + Send + 'static,
    ) -> Result<(JobRow, super::Pending<Inserted>)> {
        let row = new_row(id, app, path, config, data);
        let stored = row.clone();
        let pending = self.write_begin(false, move |c| insert(c, stored, queue_limit), then)?;
        Ok((row, pending))
    }

    /// How many committed jobs of `app` are queued (the trigger-kept counter: O(1)).
    pub fn app_queue_len(&self, app: &str) -> Result<i64> {
        self.read(|c| {
            c.prepare_cached("SELECT n FROM job_counts WHERE app = ?1 AND status = 'queued'")
                .ctx("counting the queue")?
                .query_row([app], |r| r.get(0))
                .optional()
                .ctx("counting the queue")
                .map(|n| n.unwrap_or(0))
        })
    }

    /// Ids of an app's queued and running jobs.
    pub fn live_job_ids(&self, app: &str) -> Result<Vec<String>> {
        self.read(|c| {
            query_all(
                c,
                "SELECT id FROM worker_jobs WHERE app = ?1 AND status IN ('queued', 'running')",
                [app],
                "listing live jobs",
                |r| r.get(0),
            )
        })
    }

    /// A job's `data` (None: no such job), read when the job starts: waiting jobs do
    /// not keep it in memory.
    pub fn job_data(&self, id: &str) -> Result<Option<Option<String>>> {
        self.read(|c| {
            c.prepare_cached("SELECT data FROM worker_jobs WHERE id = ?1")
                .ctx("reading job data")?
                .query_row([id], |r| r.get::<_, Option<String>>(0))
                .optional()
                .ctx("reading job data")
        })
    }

    /// The data of each job of `jobs` (id, spawned with data) that still has a row, in
    /// one read (a scheduling pass's starts); a job without a row is missing from the
    /// map. A job spawned without data costs only a look-up in the id index.
    pub fn jobs_data(
        &self,
        jobs: &[(&str, bool)],
    ) -> Result<std::collections::HashMap<String, Option<String>>> {
        self.read(|c| {
            let mut with_data = c
                .prepare_cached("SELECT data FROM worker_jobs WHERE id = ?1")
                .ctx("reading job data")?;
            let mut exists = c
                .prepare_cached("SELECT 1 FROM worker_jobs WHERE id = ?1")
                .ctx("reading job data")?;
            let mut out = std::collections::HashMap::with_capacity(jobs.len());
            for &(id, has_data) in jobs {
                let data = if has_data {
                    with_data.query_row([id], |r| r.get::<_, Option<String>>(0))
                } else {
                    exists.query_row([id], |_| Ok(None))
                };
                if let Some(data) = data.optional().ctx("reading job data")? {
                    out.insert(id.to_string(), data);
                }
            }
            Ok(out)
        })
    }

    pub fn get_job(&self, id: &str) -> Result<Option<JobRow>> {
        self.read(|c| get_job(c, id))
    }

    pub fn list_jobs(&self, f: &ListFilter) -> Result<Vec<serde_json::Value>> {
        self.read(|c| {
            let mut sql = format!("{JOB_COLUMNS} WHERE 1=1");
            let mut args: Vec<String> = Vec::new();
            if let Some(app) = &f.app {
                args.push(app.clone());
                sql.push_str(&format!(" AND app = ?{}", args.len()));
            }
            if let Some(st) = f.status {
                args.push(st.as_str().to_string());
                sql.push_str(&format!(" AND status = ?{}", args.len()));
            }
            sql.push_str(&format!(
                " ORDER BY created_at DESC, id DESC LIMIT {}",
                f.limit
            ));
            let rows = query_all(
                c,
                &sql,
                rusqlite::params_from_iter(args.iter()),
                "listing jobs",
                job_from_row,
            )?;
            Ok(rows.iter().map(JobRow::to_json).collect())
        })
    }

    /// Queued jobs in creation order (the scheduler loads these at start).
    pub fn queued_jobs(&self) -> Result<Vec<JobRow>> {
        self.read(|c| {
            let sql = format!("{JOB_COLUMNS} WHERE status = 'queued' ORDER BY created_at, id");
            query_all(c, &sql, [], "loading queued jobs", job_from_row)
        })
    }

    /// At start: jobs left `running` by a dead process. Daemons go back to `queued`
    /// (they resume from their checkpoint); other jobs are retried if attempts remain,
    /// else failed with "interrupted by server restart". Returns how many were touched.
    pub fn recover_interrupted(&self) -> Result<usize> {
        self.write(true, |c| {
            let sql = format!("{JOB_COLUMNS} WHERE status = 'running'");
            let rows = query_all(c, &sql, [], "finding interrupted jobs", job_from_row)?;
            let now = now_ms();
            for j in &rows {
                if j.config.daemon {
                    c.execute(
                        "UPDATE worker_jobs SET status = 'queued', restarts = restarts + 1 WHERE id = ?1",
                        [&j.id],
                    )
                    .ctx("re-queueing a daemon")?;
                } else if j.attempt <= j.config.retry as i64 {
                    c.execute(
                        "UPDATE worker_jobs SET status = 'queued', attempt = attempt + 1,
                         error = 'interrupted by server restart' WHERE id = ?1",
                        [&j.id],
                    )
                    .ctx("re-queueing a job")?;
                } else {
                    c.execute(
                        "UPDATE worker_jobs SET status = 'failed', done_at = ?2,
                         error = 'interrupted by server restart' WHERE id = ?1",
                        params![j.id, now],
                    )
                    .ctx("failing an interrupted job")?;
                }
            }
            Ok(rows.len())
        })
    }

    /// Marks a job running (queued by the scheduler, not waited for).
    pub fn job_started(&self, id: &str, attempt: i64, restarts: i64) {
        let id = id.to_string();
        let now = now_ms();
        self.write_later(Kind::Transition, move |c| {
            c.prepare_cached(
                "UPDATE worker_jobs SET status = 'running', started_at = ?2, attempt = ?3,
                 restarts = ?4, done_at = NULL WHERE id = ?1",
            )
            .ctx("marking a job running")?
            .execute(params![id, now, attempt, restarts])
            .ctx("marking a job running")?;
            Ok(())
        });
    }

    /// Records a final state (or a return to `queued` for retries and restarts).
    pub fn job_finished(
        &self,
        id: &str,
        status: Status,
        result: Option<String>,
        error: Option<String>,
        attempt: i64,
        restarts: i64,
    ) {
        let id = id.to_string();
        let done_at = status.is_final().then(now_ms);
        self.write_later(Kind::Transition, move |c| {
            let progress_done = status == Status::Done;
            c.prepare_cached(
                "UPDATE worker_jobs SET status = ?2, result = ?3, error = ?4, done_at = ?5,
                 attempt = ?6, restarts = ?7,
                 progress = CASE WHEN ?8 THEN 100 ELSE progress END WHERE id = ?1",
            )
            .ctx("recording a job outcome")?
            .execute(params![
                id,
                status.as_str(),
                result,
                error,
                done_at,
                attempt,
                restarts,
                progress_done
            ])
            .ctx("recording a job outcome")?;
            Ok(())
        });
    }

    /// Records a batch of state transitions (one scheduling pass's starts and outcomes)
    /// as one write: one queue entry and one savepoint instead of one per job. Each
    /// transition is its own statement, so one failing on its own merits is rolled back
    /// alone (and logged); a transient failure retries the whole batch, in order.
    pub fn job_transitions(&self, batch: Vec<Transition>) {
        if batch.is_empty() {
            return;
        }
        self.write_later(Kind::Transition, move |c| {
            for t in &batch {
                let res = match t {
                    Transition::Started {
                        id,
                        attempt,
                        restarts,
                        at,
                    } => c
                        .prepare_cached(
                            "UPDATE worker_jobs SET status = 'running', started_at = ?2,
                             attempt = ?3, restarts = ?4, done_at = NULL WHERE id = ?1",
                        )
                        .and_then(|mut st| st.execute(params![id, at, attempt, restarts]))
                        .ctx("marking a job running"),
                    Transition::Finished {
                        id,
                        status,
                        result,
                        error,
                        attempt,
                        restarts,
                        at,
                        started,
                    } => c
                        .prepare_cached(
                            "UPDATE worker_jobs SET status = ?2, result = ?3, error = ?4,
                             done_at = ?5, attempt = ?6, restarts = ?7,
                             progress = CASE WHEN ?8 THEN 100 ELSE progress END,
                             started_at = COALESCE(?9, started_at) WHERE id = ?1",
                        )
                        .and_then(|mut st| {
                            st.execute(params![
                                id,
                                status.as_str(),
                                result,
                                error,
                                status.is_final().then_some(*at),
                                attempt,
                                restarts,
                                *status == Status::Done,
                                started
                            ])
                        })
                        .ctx("recording a job outcome"),
                };
                match res {
                    Ok(_) => {}
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => log::error!("job transition of {} failed: {e}", t.id()),
                }
            }
            Ok(())
        });
    }

    /// Records a run's progress. A run's start is written by the scheduler, a moment
    /// later for a short run (folded into its outcome): the first progress of a run
    /// whose row is still `queued` marks it running, so nobody sees progress on a job
    /// shown as queued. `run` is the run's (attempt, restarts): a late write of an
    /// earlier, abandoned run never marks a later one running.
    pub fn job_progress(&self, id: &str, progress: i64, run: (i64, i64)) {
        let id = id.to_string();
        let now = now_ms();
        self.write_later(Kind::Lossy, move |c| {
            c.prepare_cached(&format!(
                "UPDATE worker_jobs SET progress = ?2, {MARK_RUNNING} WHERE id = ?1"
            ))
            .ctx("recording progress")?
            .execute(params![id, progress, run.0, run.1, now])
            .ctx("recording progress")?;
            Ok(())
        });
    }

    /// Appends a log line and trims the job's log to the newest `keep` lines.
    pub fn job_log(&self, id: &str, level: &str, msg: String, keep: i64) {
        let (id, level) = (id.to_string(), level.to_string());
        let ts = now_ms();
        self.write_later(Kind::Lossy, move |c| {
            c.prepare_cached(
                "INSERT INTO job_logs(job_id, ts, level, msg) VALUES (?1, ?2, ?3, ?4)",
            )
            .ctx("appending a log line")?
            .execute(params![id, ts, level, msg])
            .ctx("appending a log line")?;
            c.prepare_cached(
                "DELETE FROM job_logs WHERE job_id = ?1 AND id <= (
                   SELECT id FROM job_logs WHERE job_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )
            .ctx("trimming the log")?
            .execute(params![id, keep])
            .ctx("trimming the log")?;
            Ok(())
        });
    }

    /// Log lines with id > `after`, oldest first.
    pub fn job_logs(&self, id: &str, after: i64) -> Result<Vec<LogLine>> {
        self.read(|c| {
            query_all(
                c,
                "SELECT id, ts, level, msg FROM job_logs WHERE job_id = ?1 AND id > ?2
                 ORDER BY id LIMIT 1000",
                params![id, after],
                "reading logs",
                |r| {
                    Ok(LogLine {
                        id: r.get(0)?,
                        ts: r.get(1)?,
                        level: r.get(2)?,
                        msg: r.get(3)?,
                    })
                },
            )
        })
    }

    /// Saves a checkpoint and returns once it is durably committed. Like progress, it
    /// marks a run whose start is not written yet running (see [`Store::job_progress`]).
    pub fn save_checkpoint(&self, id: &str, value: String, run: (i64, i64)) -> Result<()> {
        let id = id.to_string();
        let started = std::time::Instant::now();
        let now = now_ms();
        let saved = self.write(true, move |c| {
            c.prepare_cached(&format!(
                "UPDATE worker_jobs SET checkpoint = ?2, {MARK_RUNNING} WHERE id = ?1"
            ))
            .ctx("saving a checkpoint")?
            .execute(params![id, value, run.0, run.1, now])
            .ctx("saving a checkpoint")?;
            Ok(())
        });
        if saved.is_ok() {
            crate::metrics::global().checkpoint_saved(started.elapsed());
        }
        saved
    }

    pub fn checkpoint(&self, id: &str) -> Result<Option<String>> {
        self.read(|c| {
            c.prepare_cached("SELECT checkpoint FROM worker_jobs WHERE id = ?1")
                .ctx("reading a checkpoint")?
                .query_row([id], |r| r.get::<_, Option<String>>(0))
                .optional()
                .ctx("reading a checkpoint")
                .map(Option::flatten)
        })
    }

    /// Counts of jobs by status, for /metrics.
    pub fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            query_all(c, JOB_COUNTS_SQL, [], "counting jobs", |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
    }
}
