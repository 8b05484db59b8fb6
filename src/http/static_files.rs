//! A process-wide cache of small static files, keyed by app and deploy id (which never
//! repeats, so a cached file is never stale: a redeploy is a new key). A hit costs a
//! map lookup instead of a store read; a miss ("no such file") is cached as well, as
//! the serving rules try `about` before `about/index.html`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Files larger than this are read from the store every time.
pub const MAX_FILE_BYTES: usize = 64 << 10;

/// Bytes of file content the cache holds at most; past it nothing more is added (a
/// redeploy or removal sweeps the old deployment's entries).
pub const MAX_TOTAL_BYTES: usize = 4 << 20;

/// Entries (files and misses) at most, so a client probing random paths cannot grow
/// the map without bound.
pub const MAX_ENTRIES: usize = 4096;

/// Misses ("no such file") held at most; past it they are all forgotten at once, so a
/// client probing random paths can neither grow the cache nor fill it and lock real
/// files out of it.
pub const MAX_MISSES: usize = 1024;

/// One cached answer: the file's content, or None for "no such file".
pub type Cached = Option<Arc<[u8]>>;

#[derive(Default)]
pub struct StaticCache {
    inner: Mutex<Inner>,
    /// `Registry::changes` at the last sweep, readable without the lock: every static
    /// request asks, and almost never needs a sweep.
    swept_at: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// (app, deploy id) → path → content.
    apps: HashMap<(String, i64), HashMap<String, Cached>>,
    entries: usize,
    bytes: usize,
    misses: usize,
}

impl StaticCache {
    /// The cached answer for `path` of `app` at deploy `deploy`, if any.
    pub fn get(&self, app: &str, deploy: i64, path: &str) -> Option<Cached> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // A borrowed (String, i64) key cannot be built from &str without allocating;
        // the number of cached deployments is small, so scan for the app.
        inner
            .apps
            .iter()
            .find(|((a, d), _)| *d == deploy && a == app)
            .and_then(|(_, files)| files.get(path).cloned())
    }

    /// Remembers `content` (None: no such file) for `path` of `app` at `deploy`, when
    /// it is small and the cache has room.
    pub fn put(&self, app: &str, deploy: i64, path: &str, content: Cached) {
        let size = content.as_ref().map_or(0, |c| c.len());
        if size > MAX_FILE_BYTES {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let miss = content.is_none();
        if miss && inner.misses >= MAX_MISSES {
            for files in inner.apps.values_mut() {
                files.retain(|_, c| c.is_some());
            }
            inner.entries -= inner.misses;
            inner.misses = 0;
        }
        if inner.entries >= MAX_ENTRIES || inner.bytes + size > MAX_TOTAL_BYTES {
            return;
        }
        let files = inner.apps.entry((app.to_string(), deploy)).or_default();
        if files.insert(path.to_string(), content).is_none() {
            inner.entries += 1;
            inner.bytes += size;
            inner.misses += usize::from(miss);
        }
    }

    /// Drops the entries of deployments that are no longer live, when the registry
    /// changed since the last sweep (`changes`); `live` says an app's live deploy id.
    pub fn sweep(&self, changes: u64, live: impl Fn(&str) -> Option<i64>) {
        if self.swept_at.load(Ordering::Acquire) == changes {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if self.swept_at.swap(changes, Ordering::AcqRel) == changes {
            return;
        }
        inner
            .apps
            .retain(|(app, deploy), _| live(app) == Some(*deploy));
        let (entries, bytes, misses) =
            inner
                .apps
                .values()
                .flat_map(|f| f.values())
                .fold((0, 0, 0), |(n, b, m), c| {
                    (
                        n + 1,
                        b + c.as_ref().map_or(0, |c| c.len()),
                        m + usize::from(c.is_none()),
                    )
                });
        inner.entries = entries;
        inner.bytes = bytes;
        inner.misses = misses;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(s: &str) -> Cached {
        Some(Arc::from(s.as_bytes()))
    }

    /// Review F3: misses counted against the one entry cap let a client probing random
    /// paths fill the cache, and no app's files were cached until the next deploy.
    #[test]
    fn random_path_probes_do_not_lock_files_out_of_the_cache() {
        let c = StaticCache::default();
        for i in 0..3 * MAX_ENTRIES {
            c.put("a", 1, &format!("probe-{i}"), None);
        }
        c.put("b", 7, "index.html", file("real"));
        assert_eq!(c.get("b", 7, "index.html"), Some(file("real")));
        let inner = c.inner.lock().expect("lock");
        assert!(inner.misses <= MAX_MISSES && inner.entries <= MAX_MISSES + 1);
    }

    #[test]
    fn files_are_cached_per_deploy_and_swept_when_not_live() {
        let c = StaticCache::default();
        c.put("a", 1, "index.html", file("one"));
        c.put("a", 1, "about", None);
        assert_eq!(c.get("a", 1, "index.html"), Some(file("one")));
        assert_eq!(c.get("a", 1, "about"), Some(None));
        assert_eq!(
            c.get("a", 2, "index.html"),
            None,
            "another deploy is another key"
        );
        assert_eq!(c.get("b", 1, "index.html"), None);
        c.put("a", 2, "index.html", file("two"));
        c.sweep(1, |app| (app == "a").then_some(2));
        assert_eq!(c.get("a", 1, "index.html"), None, "the old deploy is swept");
        assert_eq!(c.get("a", 2, "index.html"), Some(file("two")));
        // The same change count does not sweep again.
        c.sweep(1, |_| None);
        assert_eq!(c.get("a", 2, "index.html"), Some(file("two")));
        c.sweep(2, |_| None);
        assert_eq!(c.get("a", 2, "index.html"), None, "a removed app is swept");
    }

    #[test]
    fn big_files_and_a_full_cache_are_not_cached() {
        let c = StaticCache::default();
        let big = vec![b'x'; MAX_FILE_BYTES + 1];
        c.put("a", 1, "big", Some(Arc::from(big.as_slice())));
        assert_eq!(c.get("a", 1, "big"), None);
        for i in 0..MAX_ENTRIES + 10 {
            c.put("a", 1, &format!("small{i}"), file("s"));
        }
        assert_eq!(c.get("a", 1, &format!("small{}", MAX_ENTRIES + 5)), None);
        assert_eq!(c.get("a", 1, "small0"), Some(file("s")));
        let chunk = vec![b'y'; MAX_FILE_BYTES];
        let c = StaticCache::default();
        for i in 0..(MAX_TOTAL_BYTES / MAX_FILE_BYTES) + 3 {
            c.put("a", 1, &format!("f{i}"), Some(Arc::from(chunk.as_slice())));
        }
        let held = (0..(MAX_TOTAL_BYTES / MAX_FILE_BYTES) + 3)
            .filter(|i| c.get("a", 1, &format!("f{i}")).is_some())
            .count();
        assert_eq!(held, MAX_TOTAL_BYTES / MAX_FILE_BYTES);
    }
}
