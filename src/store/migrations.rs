//! Schema migrations: the files in `migrations/` are embedded at build time and applied
//! in order at start, each recorded in `schema_migrations` so it runs once.

use rusqlite::Connection;

use super::{Result, SqlContext};

/// `(version, name, sql)` in the order they must run.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "workers",
        include_str!("../../migrations/0002_workers.sql"),
    ),
    (
        3,
        "counters",
        include_str!("../../migrations/0003_counters.sql"),
    ),
    (
        10,
        "deploys",
        include_str!("../../migrations/0010_deploys.sql"),
    ),
    (
        20,
        "console",
        include_str!("../../migrations/0020_console.sql"),
    ),
    (
        30,
        "lean_indexes",
        include_str!("../../migrations/0030_lean_indexes.sql"),
    ),
];

pub(super) fn apply(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .ctx("creating schema_migrations")?;
    for (version, name, sql) in MIGRATIONS {
        let done: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [version],
                |r| r.get(0),
            )
            .ctx("reading schema_migrations")?;
        if done {
            continue;
        }
        let what = format!("applying migration {version:04}_{name}");
        conn.execute_batch("BEGIN IMMEDIATE").ctx(&what)?;
        let res = conn.execute_batch(sql).and_then(|_| {
            conn.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![version, name, super::now_ms()],
            )
        });
        match res {
            Ok(_) => conn.execute_batch("COMMIT").ctx(&what)?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e).ctx(&what);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_are_recorded() {
        let conn = Connection::open_in_memory().expect("in-memory db");
        apply(&conn).expect("first apply");
        apply(&conn).expect("second apply is a no-op");
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, MIGRATIONS.len() as i64);
    }

    /// Issue 10, goal 1: each index of `worker_jobs` is written on every insert and
    /// every status change of a job. An index whose columns begin another's serves no
    /// query the longer one cannot: `worker_jobs_status` and `worker_jobs_created` were
    /// such, two b-tree writes per insert and per status change for nothing.
    #[test]
    fn no_job_index_is_a_prefix_of_another() {
        let conn = Connection::open_in_memory().expect("in-memory db");
        apply(&conn).expect("migrations");
        let mut indexes: Vec<(String, Vec<String>)> = Vec::new();
        let names: Vec<(String, bool)> = conn
            .prepare("SELECT name, partial FROM pragma_index_list('worker_jobs')")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? == 1)))?
                    .collect()
            })
            .expect("index list");
        for (name, partial) in names {
            if partial {
                continue;
            }
            let cols: Vec<String> = conn
                .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                .and_then(|mut st| st.query_map([&name], |r| r.get(0))?.collect())
                .expect("index columns");
            indexes.push((name, cols));
        }
        for (a, ca) in &indexes {
            for (b, cb) in &indexes {
                assert!(
                    a == b || !cb.starts_with(ca),
                    "index {a} {ca:?} is a prefix of {b} {cb:?}"
                );
            }
        }
        // The queries the dropped ones served still search an index.
        for sql in [
            "SELECT id FROM worker_jobs WHERE status = 'queued' ORDER BY created_at, id",
            "SELECT id FROM worker_jobs WHERE status = 'running'",
            "SELECT id FROM worker_jobs WHERE created_at < 5 ORDER BY created_at",
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .and_then(|mut st| st.query_map([], |r| r.get(3))?.collect())
                .expect("query plan");
            assert!(
                plan.iter()
                    .any(|p| p.contains("USING") && p.contains("INDEX")),
                "{sql}: {plan:?}"
            );
        }
    }

    #[test]
    fn migration_versions_are_strictly_increasing() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].0 < pair[1].0);
        }
    }
}
