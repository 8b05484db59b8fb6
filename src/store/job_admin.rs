//! The operator's job actions and queries: retry (a finished job runs again as a new
//! attempt), delete, the same in bulk for an app, and the console's filtered job list,
//! paged by a keyset cursor so any page costs what the first one costs.

use rusqlite::{params, OptionalExtension};

use super::jobs::{get_job, job_from_row, JOB_COLUMNS};
use super::{query_all, Result, SqlContext, Store};
use crate::job::Status;

/// What a retry did.
#[derive(Debug)]
pub enum Retried {
    /// Queued again as a new attempt; the caller hands it to the pool.
    Queued(Box<super::JobRow>),
    /// The job is still queued or running: nothing to retry.
    Live(Status),
    NotFound,
}

/// A filtered page of the job list, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub app: Option<String>,
    pub status: Option<Status>,
    pub path: Option<String>,
    /// Text the job's error contains.
    pub error_contains: Option<String>,
    /// Keyset cursor: only jobs strictly older than this `(created_at, id)`.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

/// One page and the cursor of the next one (None: this was the last page).
#[derive(Debug)]
pub struct JobPage {
    pub jobs: Vec<serde_json::Value>,
    pub next: Option<String>,
}

impl JobQuery {
    /// Parses a cursor as the API hands it out: `<created_at>-<id>`.
    pub fn parse_cursor(s: &str) -> Option<(i64, String)> {
        let (ts, id) = s.split_once('-')?;
        Some((ts.parse().ok()?, id.to_string()))
    }
}

/// `%`, `_` and `\` in a LIKE pattern match themselves.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('%');
    for ch in s.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('%');
    out
}

impl Store {
    /// Queues a finished job again: attempt + 1, progress, result, error and timings
    /// cleared; `data`, checkpoint and logs are kept (the log shows every attempt).
    pub fn retry_job(&self, id: &str) -> Result<Retried> {
        let id = id.to_string();
        self.write(false, move |c| {
            let Some(row) = get_job(c, &id)? else {
                return Ok(Retried::NotFound);
            };
            if !row.status.is_final() {
                return Ok(Retried::Live(row.status));
            }
            c.prepare_cached(
                "UPDATE worker_jobs SET status = 'queued', attempt = attempt + 1, progress = 0,
                 result = NULL, error = NULL, started_at = NULL, done_at = NULL WHERE id = ?1",
            )
            .ctx("retrying a job")?
            .execute([&id])
            .ctx("retrying a job")?;
            Ok(match get_job(c, &id)? {
                Some(row) => Retried::Queued(Box::new(row)),
                None => Retried::NotFound,
            })
        })
    }

    /// Deletes a finished job and its logs. `Ok(Err(status))`: it is still live.
    pub fn delete_job(&self, id: &str) -> Result<Option<std::result::Result<(), Status>>> {
        let id = id.to_string();
        self.write(false, move |c| {
            let status: Option<String> = c
                .prepare_cached("SELECT status FROM worker_jobs WHERE id = ?1")
                .ctx("deleting a job")?
                .query_row([&id], |r| r.get(0))
                .optional()
                .ctx("deleting a job")?;
            let Some(status) = status.and_then(|s| Status::parse(&s)) else {
                return Ok(None);
            };
            if !status.is_final() {
                return Ok(Some(Err(status)));
            }
            c.execute("DELETE FROM job_logs WHERE job_id = ?1", [&id])
                .ctx("deleting a job's logs")?;
            c.execute("DELETE FROM worker_jobs WHERE id = ?1", [&id])
                .ctx("deleting a job")?;
            Ok(Some(Ok(())))
        })
    }

    /// Retries the jobs of `app` in the final `status`, oldest first, as far as the
    /// app's queue has room below `queue_limit` (the bound spawn keeps, so a bulk retry
    /// of thousands of failures cannot flood the scheduler). Returns the rows queued
    /// and how many stay in `status` for a later retry.
    pub fn retry_jobs_of(
        &self,
        app: &str,
        status: Status,
        queue_limit: i64,
    ) -> Result<(Vec<super::JobRow>, i64)> {
        let (app, st) = (app.to_string(), status.as_str());
        self.write(false, move |c| {
            let count = |status: &str| -> Result<i64> {
                c.prepare_cached("SELECT n FROM job_counts WHERE app = ?1 AND status = ?2")
                    .ctx("counting jobs")?
                    .query_row(params![app, status], |r| r.get(0))
                    .optional()
                    .ctx("counting jobs")
                    .map(|n| n.unwrap_or(0))
            };
            let room = (queue_limit - count("queued")?).max(0);
            let ids: Vec<String> = query_all(
                c,
                "SELECT id FROM worker_jobs WHERE app = ?1 AND status = ?2
                 ORDER BY created_at, id LIMIT ?3",
                params![app, st, room],
                "listing jobs to retry",
                |r| r.get(0),
            )?;
            let mut rows = Vec::with_capacity(ids.len());
            for id in ids {
                c.prepare_cached(
                    "UPDATE worker_jobs SET status = 'queued', attempt = attempt + 1, progress = 0,
                     result = NULL, error = NULL, started_at = NULL, done_at = NULL WHERE id = ?1",
                )
                .ctx("retrying jobs")?
                .execute([&id])
                .ctx("retrying jobs")?;
                if let Some(row) = get_job(c, &id)? {
                    rows.push(row);
                }
            }
            Ok((rows, count(st)?))
        })
    }

    /// Deletes every job of `app` in the final `status` with its logs; returns how many.
    pub fn delete_jobs_of(&self, app: &str, status: Status) -> Result<usize> {
        let (app, st) = (app.to_string(), status.as_str());
        self.write(false, move |c| {
            c.execute(
                "DELETE FROM job_logs WHERE job_id IN
                 (SELECT id FROM worker_jobs WHERE app = ?1 AND status = ?2)",
                params![app, st],
            )
            .ctx("deleting jobs' logs")?;
            c.execute(
                "DELETE FROM worker_jobs WHERE app = ?1 AND status = ?2",
                params![app, st],
            )
            .ctx("deleting jobs")
        })
    }

    /// Jobs per (app, status), from the trigger-kept counters (no scan).
    pub fn job_counts_by_app(&self) -> Result<Vec<(String, String, i64)>> {
        self.read(|c| {
            query_all(
                c,
                "SELECT app, status, n FROM job_counts WHERE n > 0 ORDER BY app, status",
                [],
                "counting jobs per app",
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
    }

    /// Live daemons (queued or running), oldest first, at most `limit`.
    pub fn live_daemons(&self, limit: u32) -> Result<Vec<serde_json::Value>> {
        self.read(|c| {
            let sql = format!(
                "{JOB_COLUMNS} WHERE status IN ('queued', 'running')
                 AND json_extract(config, '$.daemon') = 1 ORDER BY created_at LIMIT {limit}"
            );
            let rows = query_all(c, &sql, [], "listing daemons", job_from_row)?;
            Ok(rows.iter().map(super::JobRow::to_json).collect())
        })
    }

    /// A page of jobs matching `q`, newest first, and the next page's cursor.
    pub fn query_jobs(&self, q: &JobQuery) -> Result<JobPage> {
        self.read(|c| {
            let mut sql = format!("{JOB_COLUMNS} WHERE 1=1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let mut arg = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
                args.push(v);
                sql.push_str(&clause.replace("?N", &format!("?{}", args.len())));
            };
            if let Some(app) = &q.app {
                arg(&mut sql, " AND app = ?N", app.clone().into());
            }
            if let Some(st) = q.status {
                arg(&mut sql, " AND status = ?N", st.as_str().to_string().into());
            }
            if let Some(path) = &q.path {
                arg(&mut sql, " AND path = ?N", path.clone().into());
            }
            if let Some(text) = &q.error_contains {
                arg(
                    &mut sql,
                    " AND error LIKE ?N ESCAPE '\\'",
                    like_escape(text).into(),
                );
            }
            if let Some((ts, id)) = &q.before {
                arg(&mut sql, " AND (created_at < ?N", (*ts).into());
                arg(&mut sql, " OR (created_at = ?N", (*ts).into());
                arg(&mut sql, " AND id < ?N))", id.clone().into());
            }
            // One row more than asked tells whether a next page exists.
            sql.push_str(&format!(
                " ORDER BY created_at DESC, id DESC LIMIT {}",
                q.limit + 1
            ));
            let mut rows = query_all(
                c,
                &sql,
                rusqlite::params_from_iter(args.iter()),
                "listing jobs",
                job_from_row,
            )?;
            let more = rows.len() > q.limit as usize;
            rows.truncate(q.limit as usize);
            let next = more
                .then(|| rows.last().map(|r| format!("{}-{}", r.created_at, r.id)))
                .flatten();
            Ok(JobPage {
                jobs: rows.iter().map(super::JobRow::to_json).collect(),
                next,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_match_literally() {
        assert_eq!(like_escape("50%_off\\"), "%50\\%\\_off\\\\%");
    }

    /// A bulk retry of many failures keeps the app's queue bound, as spawn does; the
    /// rest stay failed for a later retry.
    #[test]
    fn bulk_retry_stays_within_the_queue_bound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let cfg = crate::job::JobConfig::default();
        for n in 0..5 {
            store
                .insert_job(format!("j{n}"), "a", "workers/w.js", &cfg, None, None)
                .expect("insert");
        }
        store
            .write(false, |c| {
                c.execute("UPDATE worker_jobs SET status = 'failed'", [])
                    .ctx("failing jobs")
            })
            .expect("fail them");
        let (rows, left) = store.retry_jobs_of("a", Status::Failed, 3).expect("retry");
        assert_eq!((rows.len(), left), (3, 2));
        assert!(rows
            .iter()
            .all(|r| r.status == Status::Queued && r.attempt == 2));
        let (rows, left) = store.retry_jobs_of("a", Status::Failed, 3).expect("retry");
        assert_eq!(
            (rows.len(), left),
            (0, 2),
            "the queue is full: nothing more"
        );
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(
            JobQuery::parse_cursor("1700000000000-j-abc"),
            Some((1_700_000_000_000, "j-abc".to_string()))
        );
        assert_eq!(JobQuery::parse_cursor("x-1"), None);
        assert_eq!(JobQuery::parse_cursor("17"), None);
    }
}
