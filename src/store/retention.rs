//! Retention of finished jobs: those older than the age limit, and those past the
//! per-app count, are deleted with their logs in small steps the writer runs only when
//! nothing else waits, so pruning never holds up a write someone waits for.

use rusqlite::{params, Connection};

use super::{now_ms, query_all, Limits, Result, SqlContext};

/// Most jobs one step deletes: a step is a short transaction.
pub(super) const PRUNE_BATCH: usize = 200;

const FINAL: &str = "('done', 'failed', 'cancelled', 'stopped')";

/// The writer's idle-time task: one prune step; true when more is left to prune.
pub(super) fn janitor(limits: Limits) -> Box<dyn FnMut(&Connection) -> bool + Send> {
    Box::new(move |c| match prune_step(c, &limits, now_ms()) {
        Ok(n) => n == PRUNE_BATCH,
        Err(e) => {
            log::warn!("pruning finished jobs failed (tried again later): {e}");
            false
        }
    })
}

/// Deletes up to [`PRUNE_BATCH`] finished jobs past retention at `now` (ms) with their
/// logs, in one transaction. Returns how many were deleted.
pub(super) fn prune_step(c: &Connection, limits: &Limits, now: i64) -> Result<usize> {
    let cutoff = now.saturating_sub(limits.jobs_max_age_ms.min(i64::MAX as u64) as i64);
    let mut ids: Vec<String> = query_all(
        c,
        &format!(
            "SELECT id FROM worker_jobs WHERE done_at IS NOT NULL AND done_at < ?1
             AND status IN {FINAL} ORDER BY done_at LIMIT ?2"
        ),
        params![cutoff, PRUNE_BATCH as i64],
        "finding expired jobs",
        |r| r.get(0),
    )?;
    if ids.len() < PRUNE_BATCH {
        // Apps keeping more finished jobs than allowed; the counters make this cheap.
        let keep = limits.jobs_keep_per_app.min(i64::MAX as u64) as i64;
        let over: Vec<(String, i64)> = query_all(
            c,
            &format!(
                "SELECT app, SUM(n) FROM job_counts WHERE status IN {FINAL}
                 GROUP BY app HAVING SUM(n) > ?1"
            ),
            [keep],
            "counting finished jobs",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        for (app, n) in over {
            let room = PRUNE_BATCH - ids.len();
            if room == 0 {
                break;
            }
            let take = ((n - keep) as usize).min(room);
            let oldest: Vec<String> = query_all(
                c,
                &format!(
                    "SELECT id FROM worker_jobs WHERE app = ?1 AND done_at IS NOT NULL
                     AND status IN {FINAL} ORDER BY done_at, id LIMIT ?2"
                ),
                params![app, take as i64],
                "finding the oldest finished jobs",
                |r| r.get(0),
            )?;
            for id in oldest {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    }
    if ids.is_empty() {
        return Ok(0);
    }
    c.execute_batch("BEGIN IMMEDIATE").ctx("starting a prune")?;
    let res = (|| -> Result<()> {
        let mut logs = c
            .prepare_cached("DELETE FROM job_logs WHERE job_id = ?1")
            .ctx("pruning job logs")?;
        let mut jobs = c
            .prepare_cached("DELETE FROM worker_jobs WHERE id = ?1")
            .ctx("pruning jobs")?;
        for id in &ids {
            logs.execute([id]).ctx("pruning job logs")?;
            jobs.execute([id]).ctx("pruning jobs")?;
        }
        Ok(())
    })();
    match res.and_then(|_| c.execute_batch("COMMIT").ctx("committing a prune")) {
        Ok(()) => {
            log::debug!("pruned {} finished job(s)", ids.len());
            Ok(ids.len())
        }
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}
