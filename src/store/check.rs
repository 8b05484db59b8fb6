//! Data safety outside the running store: the bounded `quick_check` at start, the full
//! `integrity_check` behind `fazt check`, whether a database was ever set up, and
//! `fazt backup` through SQLite's online backup API (safe while the server writes).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{Error, Result, SqlContext};

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// SQLite found nothing wrong.
    Ok,
    /// SQLite's findings (or why it could not read the file at all).
    Damaged(Vec<String>),
    /// The time budget ran out before the check finished (large databases).
    Unfinished,
}

/// Opens an existing database without creating it and without changing its mode.
fn open_existing(path: &Path) -> Result<Connection> {
    let what = format!("opening {}", path.display());
    if !path.exists() {
        return Err(Error::NotFound(format!("database {}", path.display())));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ctx(&what)?;
    conn.busy_timeout(Duration::from_secs(10)).ctx(&what)?;
    Ok(conn)
}

/// Runs `pragma` (a check returning rows of findings) and judges the rows; with a
/// `budget`, the check is interrupted once it has run that long.
fn run_check(path: &Path, pragma: &str, budget: Option<Duration>) -> Result<Verdict> {
    let conn = open_existing(path)?;
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let timer = budget.map(|b| {
        let handle = conn.get_interrupt_handle();
        std::thread::spawn(move || {
            if done_rx.recv_timeout(b).is_err() {
                handle.interrupt();
            }
        })
    });
    let rows = (|| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(pragma)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    })();
    let _ = done_tx.send(());
    if let Some(t) = timer {
        let _ = t.join();
    }
    Ok(match rows {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Verdict::Ok,
        Ok(rows) => Verdict::Damaged(rows),
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => {
            Verdict::Unfinished
        }
        // A file SQLite cannot even read ("file is not a database", "malformed").
        Err(e) => Verdict::Damaged(vec![e.to_string()]),
    })
}

/// SQLite's `quick_check` (structure, no index contents), stopped after `budget`: run
/// at every start, so a damaged database is refused instead of failing requests later.
pub fn quick_check(path: &Path, budget: Duration) -> Result<Verdict> {
    run_check(path, "PRAGMA quick_check(20)", Some(budget))
}

/// The full `integrity_check`, however long it takes (`fazt check`).
pub fn integrity_check(path: &Path) -> Result<Verdict> {
    run_check(path, "PRAGMA integrity_check(100)", None)
}

/// Whether `path` holds a database fazt has set up (its migrations table exists). An
/// empty or missing file is not one.
pub fn is_initialised(path: &Path) -> Result<bool> {
    if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
        return Ok(false);
    }
    let conn = open_existing(path)?;
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations')",
        [],
        |r| r.get(0),
    )
    .ctx(&format!("reading the schema of {}", path.display()))
}

/// Copies the database at `src` to `dest` with SQLite's online backup API: one step
/// inside one read transaction, so the copy is a consistent snapshot even while the
/// server keeps writing (WAL readers do not block the writer). The copy is written
/// beside `dest` (mode 0600), synced, then renamed into place. Returns its size.
pub fn backup(src: &Path, dest: &Path) -> Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let from = open_existing(src)?;
    let partial = {
        let mut name = dest.as_os_str().to_os_string();
        name.push(".partial");
        std::path::PathBuf::from(name)
    };
    let io = |what: &str, source: std::io::Error| Error::Io {
        context: format!("{what} {}", partial.display()),
        source,
    };
    let _ = std::fs::remove_file(&partial);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| io("creating", e))?;
    let result = (|| -> Result<()> {
        let mut to = Connection::open(&partial).ctx("opening the backup file")?;
        {
            let copy = rusqlite::backup::Backup::new(&from, &mut to).ctx("starting the backup")?;
            let mut tries = 0;
            loop {
                match copy.step(-1).ctx("copying the database")? {
                    rusqlite::backup::StepResult::Done => break,
                    _ if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        return Err(Error::Unavailable(
                            "the database stayed locked; the backup gave up after 5 s".into(),
                        ))
                    }
                }
            }
        }
        // One self-contained file: no WAL beside the copy.
        to.execute_batch("PRAGMA journal_mode=DELETE")
            .ctx("finishing the backup file")?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    let f = std::fs::File::open(&partial).map_err(|e| io("reopening", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    let size = f.metadata().map_err(|e| io("reading", e))?.len();
    std::fs::rename(&partial, dest).map_err(|e| io("renaming", e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_a_fresh_store_and_finds_garbage() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("fazt.db");
        assert!(!is_initialised(&db).expect("missing"));
        let store = super::super::Store::open(dir.path()).expect("open");
        store.kv_set("a", "k", "1".into(), None).expect("write");
        store.close();
        assert!(is_initialised(&db).expect("set up"));
        assert_eq!(
            quick_check(&db, Duration::from_secs(5)).expect("check"),
            Verdict::Ok
        );
        assert_eq!(integrity_check(&db).expect("check"), Verdict::Ok);
        let copy = dir.path().join("copy.db");
        assert!(backup(&db, &copy).expect("backup") > 0);
        assert_eq!(integrity_check(&copy).expect("check copy"), Verdict::Ok);
        std::fs::write(&db, vec![0xAB; 8192]).expect("garbage");
        assert!(matches!(
            quick_check(&db, Duration::from_secs(5)).expect("check"),
            Verdict::Damaged(_)
        ));
        std::fs::write(&db, b"").expect("empty");
        assert!(!is_initialised(&db).expect("empty"));
    }
}
