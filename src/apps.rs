//! Apps: the rules shared by the server and the CLI (valid names, valid file paths, the
//! deploy upload format `{"files": [{"path", "base64"}]}`), and the [`Registry`] of live
//! deployments, the one place that says which code an app name runs and which runs of
//! it are in progress.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::store::AppFile;

/// What stops a run of an app's code when the app is removed. Implemented by the JS
/// interrupt where the two meet (`services.rs`), so this module needs nothing of `js/`.
pub trait Stop: Send {
    /// Asks the run to stop (it ends at its next check).
    fn stop_run(&self);
}

/// The deployment an app name currently serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployment {
    /// Names the app's life: the same across redeploys, new after remove + deploy.
    pub app_id: i64,
    /// Names this set of files; never repeats, so every cache of code is keyed by it.
    pub deploy_id: i64,
}

impl From<&crate::store::AppInfo> for Deployment {
    fn from(i: &crate::store::AppInfo) -> Deployment {
        Deployment {
            app_id: i.app_id,
            deploy_id: i.deploy_id,
        }
    }
}

/// Why a deploy or removal was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The name is taken by an app on its way out (code of the removed app is still
    /// stopping); the caller may try again shortly.
    #[error("{0}")]
    Busy(String),
    /// The store failed while deploying or removing.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

/// Live deployments by app name, plus every run (handler call, job) in progress, so a
/// removal can stop them and wait for them before the app's data goes. Deploys and
/// removals update it after the store committed; lookups of names it does not know
/// read the store once.
pub struct Registry<S> {
    state: Mutex<State<S>>,
    /// Signalled whenever a run ends.
    ended: Condvar,
    /// Serialises deploys and removals (both rare), so a removal never interleaves with
    /// a deploy of the same name.
    admin: Mutex<()>,
    /// Bumped by every deploy and removal; per-thread caches sweep when it moved.
    changes: std::sync::atomic::AtomicU64,
}

struct State<S> {
    apps: HashMap<String, Entry<S>>,
    next_run: u64,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            state: Mutex::new(State {
                apps: HashMap::new(),
                next_run: 0,
            }),
            ended: Condvar::new(),
            admin: Mutex::new(()),
            changes: Default::default(),
        }
    }
}

struct Entry<S> {
    /// None while the app is being removed, or after, while its old runs still stop.
    live: Option<Deployment>,
    /// Runs in progress and what stops them when the app is removed (None: the pool
    /// stops it, as it does jobs).
    runs: HashMap<u64, Option<S>>,
}

/// A run of an app's code in progress; dropping it ends the run.
pub struct Run<'a, S> {
    registry: &'a Registry<S>,
    app: String,
    id: u64,
    pub deployment: Deployment,
}

impl<S> Drop for Run<'_, S> {
    fn drop(&mut self) {
        let mut st = self.registry.lock();
        if let Some(e) = st.apps.get_mut(&self.app) {
            e.runs.remove(&self.id);
            if e.live.is_none() && e.runs.is_empty() {
                st.apps.remove(&self.app);
            }
        }
        drop(st);
        self.registry.ended.notify_all();
    }
}

/// Held by a removal in progress: see [`Registry::begin_removal`].
pub struct Removal<'a> {
    _admin: MutexGuard<'a, ()>,
    app: String,
    /// What the app served before, restored if the removal fails.
    before: Option<Deployment>,
}

impl<S> Registry<S> {
    fn lock(&self) -> MutexGuard<'_, State<S>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves on every deploy and removal.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The live deployment of `app` as far as the registry already knows it (no store
    /// read): None for an unknown or departing app.
    pub fn known(&self, app: &str) -> Option<Deployment> {
        self.lock().apps.get(app).and_then(|e| e.live)
    }

    /// Starts a run of `app`'s current deployment (None: no such app, or it is being
    /// removed). `stop` is interrupted if the app is removed meanwhile. `load` reads
    /// the app from the store when the registry does not know the name yet.
    pub fn enter<E>(
        &self,
        app: &str,
        stop: Option<S>,
        load: impl Fn() -> Result<Option<Deployment>, E>,
    ) -> Result<Option<Run<'_, S>>, E> {
        loop {
            {
                let mut st = self.lock();
                if st.apps.contains_key(app) {
                    st.next_run += 1;
                    let id = st.next_run;
                    let Some(e) = st.apps.get_mut(app) else {
                        return Ok(None);
                    };
                    let Some(deployment) = e.live else {
                        return Ok(None);
                    };
                    e.runs.insert(id, stop);
                    return Ok(Some(Run {
                        registry: self,
                        app: app.to_string(),
                        id,
                        deployment,
                    }));
                }
            }
            // Unknown name: read the store, and remember the answer only if no deploy
            // or removal happened meanwhile (it could be stale then: read again).
            let before = self.changes();
            let loaded = load()?;
            let mut st = self.lock();
            if self.changes() != before || st.apps.contains_key(app) {
                continue;
            }
            let Some(live) = loaded else {
                return Ok(None);
            };
            st.apps.insert(
                app.to_string(),
                Entry {
                    live: Some(live),
                    runs: HashMap::new(),
                },
            );
        }
    }

    /// Records a deploy: `store_deploy` commits it and returns the new deployment,
    /// which from then on is what the name serves. Refused while code of a removed
    /// app of that name is still stopping.
    pub fn deploy<T>(
        &self,
        app: &str,
        store_deploy: impl FnOnce() -> Result<(T, Deployment), crate::store::Error>,
    ) -> Result<T, AppError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.lock().apps.get(app) {
            if e.live.is_none() {
                return Err(AppError::Busy(format!(
                    "app '{app}' was just removed and {} run(s) of its code are still \
                     stopping; try again in a few seconds",
                    e.runs.len()
                )));
            }
        }
        let (out, deployment) = store_deploy()?;
        self.lock()
            .apps
            .entry(app.to_string())
            .or_insert_with(|| Entry {
                live: None,
                runs: HashMap::new(),
            })
            .live = Some(deployment);
        self.changed();
        Ok(out)
    }

    /// First step of removing `app`: from now on no run of it starts, and every
    /// handler run in progress is stopped. Hold the returned guard through the rest of
    /// the removal and give it to [`end_removal`](Self::end_removal).
    pub fn begin_removal(&self, app: &str) -> Removal<'_>
    where
        S: Stop,
    {
        let admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = self.lock();
        let e = st.apps.entry(app.to_string()).or_insert_with(|| Entry {
            live: None,
            runs: HashMap::new(),
        });
        let before = e.live.take();
        for stop in e.runs.values().flatten() {
            stop.stop_run();
        }
        drop(st);
        self.changed();
        Removal {
            _admin: admin,
            app: app.to_string(),
            before,
        }
    }

    /// Waits until no run of `app` is in progress or `deadline` passes; returns how
    /// many are left.
    pub fn wait_idle(&self, app: &str, deadline: Instant) -> usize {
        let mut st = self.lock();
        loop {
            let left = st.apps.get(app).map_or(0, |e| e.runs.len());
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            st = self
                .ended
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Ends a removal. `removed` says whether the store deleted the app; if not (it
    /// failed), the app serves what it served before.
    pub fn end_removal(&self, removal: Removal<'_>, removed: bool) {
        let mut st = self.lock();
        if let Some(e) = st.apps.get_mut(&removal.app) {
            if !removed {
                e.live = removal.before;
            }
            if e.live.is_none() && e.runs.is_empty() {
                st.apps.remove(&removal.app);
            }
        }
        drop(st);
        self.changed();
    }
}

/// Largest deploy upload (the encoded request body).
pub const MAX_UPLOAD_BYTES: usize = 50 << 20;
/// Most files one app may have.
pub const MAX_FILES: usize = 10_000;
/// Longest file path inside an app.
pub const MAX_PATH_BYTES: usize = 512;

/// `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`
pub fn check_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !b.is_empty()
        && b.len() <= 63
        && ok_char(&b[0])
        && ok_char(&b[b.len() - 1])
        && b.iter().all(|c| ok_char(c) || *c == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid app name '{name}': use 1-63 lower-case letters, digits and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// A file path inside an app: relative, `/`-separated, no `.`/`..`/empty segments,
/// no backslashes or control characters.
pub fn check_path(path: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid file path '{path}': {why}"));
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("too long");
    }
    if path.starts_with('/') || path.contains(':') && path.chars().nth(1) == Some(':') {
        return bad("absolute paths are not allowed");
    }
    if path.contains('\\') {
        return bad("use '/' as the separator");
    }
    if path.chars().any(|c| c.is_control()) {
        return bad("control characters are not allowed");
    }
    for seg in path.split('/') {
        match seg {
            "" => return bad("empty path segment"),
            "." | ".." => return bad("'.' and '..' are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Upload {
    pub files: Vec<UploadFile>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UploadFile {
    pub path: String,
    pub base64: String,
}

/// Parses and validates a deploy upload into files ready to store.
pub fn parse_upload(body: &[u8]) -> Result<Vec<AppFile>, String> {
    let upload: Upload = serde_json::from_slice(body).map_err(|e| {
        format!("malformed deploy body (expected {{\"files\":[{{\"path\",\"base64\"}}]}}): {e}")
    })?;
    if upload.files.len() > MAX_FILES {
        return Err(format!(
            "too many files: {} (the limit is {MAX_FILES})",
            upload.files.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::with_capacity(upload.files.len());
    for f in upload.files {
        check_path(&f.path)?;
        if !seen.insert(f.path.clone()) {
            return Err(format!("duplicate file path '{}'", f.path));
        }
        let content = base64::engine::general_purpose::STANDARD
            .decode(f.base64.as_bytes())
            .map_err(|e| format!("file '{}' is not valid base64: {e}", f.path))?;
        files.push(AppFile {
            path: f.path,
            content,
        });
    }
    Ok(files)
}

/// Encodes files for upload (used by the CLI and tests).
pub fn encode_upload(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let upload = Upload {
        files: files
            .iter()
            .map(|(p, c)| UploadFile {
                path: p.clone(),
                base64: base64::engine::general_purpose::STANDARD.encode(c),
            })
            .collect(),
    };
    serde_json::to_vec(&upload).unwrap_or_default()
}

/// Reads every file below `dir` (skipping dot-files and dot-directories) for upload.
pub fn read_dir_files(dir: &std::path::Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .map_err(std::io::Error::other)?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, std::fs::read(&path)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop flag standing in for the JS interrupt.
    #[derive(Clone, Default)]
    struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Stop for Flag {
        fn stop_run(&self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Flag {
        fn stopped(&self) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn dep(app_id: i64, deploy_id: i64) -> Deployment {
        Deployment { app_id, deploy_id }
    }

    fn none() -> Result<Option<Deployment>, ()> {
        Ok(None)
    }

    #[test]
    fn registry_follows_deploys_and_removals() {
        let r = Registry::<Flag>::default();
        assert!(r.enter("a", None, none).expect("enter").is_none());
        r.deploy("a", || Ok(((), dep(1, 1)))).expect("deploy");
        let run = r.enter("a", None, none).expect("enter").expect("live");
        assert_eq!(run.deployment, dep(1, 1));
        drop(run);
        r.deploy("a", || Ok(((), dep(1, 2)))).expect("redeploy");
        assert_eq!(r.known("a"), Some(dep(1, 2)));
        let removal = r.begin_removal("a");
        assert!(r
            .enter("a", None, || Ok::<_, ()>(Some(dep(1, 2))))
            .expect("enter")
            .is_none());
        r.end_removal(removal, true);
        assert_eq!(r.known("a"), None);
        // Unknown again: the store decides.
        let run = r
            .enter("a", None, || Ok::<_, ()>(Some(dep(3, 3))))
            .expect("enter");
        assert_eq!(run.map(|r| r.deployment), Some(dep(3, 3)));
    }

    #[test]
    fn removal_stops_runs_and_waits_for_them() {
        let r = Registry::<Flag>::default();
        r.deploy("a", || Ok(((), dep(1, 1)))).expect("deploy");
        let stop = Flag::default();
        let run = r
            .enter("a", Some(stop.clone()), none)
            .expect("enter")
            .expect("live");
        let removal = r.begin_removal("a");
        assert!(stop.stopped());
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert_eq!(r.wait_idle("a", soon), 1, "the run has not ended yet");
        r.end_removal(removal, true);
        // Its code is still running: the name cannot be taken yet.
        let busy = r.deploy("a", || Ok(((), dep(2, 2))));
        assert!(matches!(busy, Err(AppError::Busy(_))), "{busy:?}");
        drop(run);
        r.deploy("a", || Ok(((), dep(2, 2)))).expect("free again");
        assert_eq!(r.known("a"), Some(dep(2, 2)));
    }

    #[test]
    fn a_failed_removal_keeps_the_app() {
        let r = Registry::<Flag>::default();
        r.deploy("a", || Ok(((), dep(1, 1)))).expect("deploy");
        let removal = r.begin_removal("a");
        r.end_removal(removal, false);
        assert_eq!(r.known("a"), Some(dep(1, 1)));
    }

    #[test]
    fn names() {
        for ok in ["a", "mall", "my-app-2", "0", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Mall",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "../x",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        for ok in ["index.html", "api/main.js", "a/b/c.txt", "..hidden", "a..b"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a\\b",
            "./a",
            "C:/x",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upload_round_trip_and_errors() {
        let body = encode_upload(&[("index.html".into(), b"hi".to_vec())]);
        let files = parse_upload(&body).expect("valid upload");
        assert_eq!(files[0].content, b"hi");
        assert!(parse_upload(b"{").is_err());
        let dup = encode_upload(&[("a".into(), vec![]), ("a".into(), vec![])]);
        assert!(parse_upload(&dup).unwrap_err().contains("duplicate"));
        let trav = encode_upload(&[("../a".into(), vec![])]);
        assert!(parse_upload(&trav).is_err());
    }
}
