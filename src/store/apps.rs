//! Apps and their files: atomic deploy (replace every file in one transaction, under a
//! deploy id that never repeats), list, remove, and file lookups for app traffic.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{now_ms, query_all, Error, Result, SqlContext, Store};

/// One file of an app, as uploaded.
#[derive(Debug, Clone)]
pub struct AppFile {
    pub path: String,
    pub content: Vec<u8>,
}

/// What `GET /api/apps` shows of an app.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppInfo {
    pub name: String,
    /// Deploys of this app since it was created (for people; restarts at 1 when an app
    /// of the same name is created again, so it never keys a cache).
    pub version: i64,
    /// The deploy id that created this app: a new app under an old name gets a new one.
    pub app_id: i64,
    /// This deployment's id, unique for the life of the database: every cache of an
    /// app's code is keyed by it.
    pub deploy_id: i64,
    pub files: i64,
    pub bytes: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Store {
    /// Replaces all files of `app` (creating it if new) in one transaction, so traffic
    /// sees either the old or the new set, never a mix. A new app (no app of that name
    /// exists) starts empty: anything left under its name (kv, jobs) is deleted in the
    /// same transaction.
    pub fn deploy_app(&self, app: &str, files: Vec<AppFile>) -> Result<AppInfo> {
        let app = app.to_string();
        self.write(true, move |c| {
            let now = now_ms();
            let total: i64 = files.iter().map(|f| f.content.len() as i64).sum();
            let count = files.len() as i64;
            c.execute(
                "INSERT INTO deploys(app, created_at) VALUES (?1, ?2)",
                params![app, now],
            )
            .ctx("taking a deploy id")?;
            let deploy_id = c.last_insert_rowid();
            // Only the newest deploy of an app is kept; AUTOINCREMENT still never
            // reuses an id.
            c.execute(
                "DELETE FROM deploys WHERE app = ?1 AND id < ?2",
                params![app, deploy_id],
            )
            .ctx("pruning old deploy ids")?;
            if get_app(c, &app)?.is_none() {
                delete_app_data(c, &app)?;
            }
            c.execute(
                "INSERT INTO apps(name, version, file_count, total_bytes, created_at, updated_at,
                                  app_id, deploy_id)
                 VALUES (?1, 1, ?2, ?3, ?4, ?4, ?5, ?5)
                 ON CONFLICT(name) DO UPDATE SET version = version + 1,
                   file_count = ?2, total_bytes = ?3, updated_at = ?4, deploy_id = ?5",
                params![app, count, total, now, deploy_id],
            )
            .ctx("recording the app")?;
            c.execute("DELETE FROM app_files WHERE app = ?1", [&app])
                .ctx("removing the previous files")?;
            {
                let mut stmt = c
                    .prepare_cached("INSERT INTO app_files(app, path, content) VALUES (?1, ?2, ?3)")
                    .ctx("preparing the file insert")?;
                for f in &files {
                    stmt.execute(params![app, f.path, f.content])
                        .ctx("storing a file")?;
                }
            }
            get_app(c, &app)?.ok_or_else(|| Error::NotFound(format!("app {app}")))
        })
    }

    pub fn list_apps(&self) -> Result<Vec<AppInfo>> {
        self.read(|c| {
            let sql = format!("{APP_COLUMNS} ORDER BY name");
            query_all(c, &sql, [], "listing apps", app_from_row)
        })
    }

    pub fn get_app(&self, app: &str) -> Result<Option<AppInfo>> {
        self.read(|c| get_app(c, app))
    }

    /// Deletes an app, its files, its kv data and its jobs in one transaction. Returns
    /// false when there was no such app.
    pub fn remove_app(&self, app: &str) -> Result<bool> {
        let app = app.to_string();
        self.write(true, move |c| {
            delete_app_data(c, &app)?;
            c.execute("DELETE FROM app_files WHERE app = ?1", [&app])
                .ctx("removing files")?;
            c.execute("DELETE FROM deploys WHERE app = ?1", [&app])
                .ctx("removing deploy ids")?;
            let n = c
                .execute("DELETE FROM apps WHERE name = ?1", [&app])
                .ctx("removing the app")?;
            Ok(n > 0)
        })
    }

    /// Whether the app has a file at `path` (without reading it).
    pub fn app_file_exists(&self, app: &str, path: &str) -> Result<bool> {
        self.read(|c| {
            c.prepare_cached("SELECT EXISTS(SELECT 1 FROM app_files WHERE app = ?1 AND path = ?2)")
                .ctx("checking a file")?
                .query_row(params![app, path], |r| r.get(0))
                .ctx("checking a file")
        })
    }

    /// One file's content, or None.
    pub fn app_file(&self, app: &str, path: &str) -> Result<Option<Vec<u8>>> {
        self.read(|c| {
            c.prepare_cached("SELECT content FROM app_files WHERE app = ?1 AND path = ?2")
                .ctx("reading a file")?
                .query_row(params![app, path], |r| r.get(0))
                .optional()
                .ctx("reading a file")
        })
    }
}

const APP_COLUMNS: &str = "SELECT name, version, file_count, total_bytes, created_at, updated_at,
     app_id, deploy_id FROM apps";

/// Everything an app owns besides its files: kv data and jobs with their logs.
fn delete_app_data(c: &rusqlite::Connection, app: &str) -> Result<()> {
    c.execute("DELETE FROM kv WHERE app = ?1", [app])
        .ctx("removing kv data")?;
    c.execute(
        "DELETE FROM job_logs WHERE job_id IN (SELECT id FROM worker_jobs WHERE app = ?1)",
        [app],
    )
    .ctx("removing job logs")?;
    c.execute("DELETE FROM worker_jobs WHERE app = ?1", [app])
        .ctx("removing jobs")?;
    Ok(())
}

fn app_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AppInfo> {
    Ok(AppInfo {
        name: r.get(0)?,
        version: r.get(1)?,
        files: r.get(2)?,
        bytes: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        app_id: r.get(6)?,
        deploy_id: r.get(7)?,
    })
}

fn get_app(c: &rusqlite::Connection, app: &str) -> Result<Option<AppInfo>> {
    c.prepare_cached(&format!("{APP_COLUMNS} WHERE name = ?1"))
        .ctx("reading an app")?
        .query_row([app], app_from_row)
        .optional()
        .ctx("reading an app")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<AppFile> {
        vec![AppFile {
            path: "index.html".into(),
            content: b"hi".to_vec(),
        }]
    }

    #[test]
    fn deploy_ids_never_repeat_and_a_new_app_starts_empty() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let first = store.deploy_app("a", files()).expect("deploy");
        let second = store.deploy_app("a", files()).expect("redeploy");
        assert!(second.deploy_id > first.deploy_id);
        assert_eq!(second.app_id, first.app_id, "a redeploy is the same app");
        assert_eq!(second.version, 2);
        assert!(store.remove_app("a").expect("remove"));
        // A write that arrives after the removal (a run that outlived it) ...
        store
            .kv_set("a", "late", "1".into(), None)
            .expect("late write");
        let third = store.deploy_app("a", files()).expect("new app");
        assert!(third.deploy_id > second.deploy_id, "ids are not reused");
        assert_ne!(third.app_id, first.app_id, "a new app under the old name");
        assert_eq!(third.version, 1);
        // ... is not inherited by the new app.
        assert_eq!(store.kv_get("a", "late").expect("read"), None);
        store.close();
    }

    #[test]
    fn migration_gives_existing_apps_deploy_ids() {
        let c = rusqlite::Connection::open_in_memory().expect("db");
        c.execute_batch(include_str!("../../migrations/0001_init.sql"))
            .expect("0001");
        c.execute_batch(include_str!("../../migrations/0002_workers.sql"))
            .expect("0002");
        c.execute_batch("INSERT INTO apps VALUES ('a', 3, 0, 0, 1, 2), ('b', 1, 0, 0, 1, 2);")
            .expect("old apps");
        c.execute_batch(include_str!("../../migrations/0010_deploys.sql"))
            .expect("0010");
        let a = get_app(&c, "a").expect("read").expect("a");
        let b = get_app(&c, "b").expect("read").expect("b");
        assert!(a.deploy_id > 0 && b.deploy_id > 0);
        assert_ne!(a.deploy_id, b.deploy_id);
        assert_eq!(a.app_id, a.deploy_id);
        assert_eq!(a.version, 3);
    }
}
