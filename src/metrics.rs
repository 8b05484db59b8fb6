//! Latency histograms and per-app counters for `/metrics`, with bounded label sets: at
//! most [`MAX_APPS`] apps and [`MAX_PATHS_PER_APP`] worker paths per app get their own
//! series; the rest are counted under the label value [`OTHER`], so no client or app
//! can grow the exposition (or the server's memory) without bound.
//!
//! A leaf module: the store, the pool and the HTTP front record into the one
//! process-wide [`Registry`] (`global()`), and `Services::metrics_text` renders it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Distinct worker paths per app that get their own series; later ones count as
/// [`OTHER`]. Apps have a handful of worker files, so 32 leaves room without letting
/// an app with thousands of files multiply the series.
pub const MAX_PATHS_PER_APP: usize = 32;
/// Distinct apps with their own series; later ones count as [`OTHER`].
pub const MAX_APPS: usize = 256;
/// The label value for series past a cap.
pub const OTHER: &str = "_other";

/// Bucket upper bounds in seconds: sub-millisecond handler calls up to hour-long jobs.
pub const BUCKETS: [f64; 20] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// One histogram series: cumulative counts are computed when rendered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines; `labels` is `a="x",b="y"` or empty.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[BUCKETS.len()];
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// Series keyed by (app, second label), with the caps applied on insert.
#[derive(Debug, Default)]
struct Family<V> {
    series: BTreeMap<String, BTreeMap<String, V>>,
}

impl<V: Default> Family<V> {
    /// The series for `(app, key)`, or the capped [`OTHER`] one.
    fn entry(&mut self, app: &str, key: &str, max_keys: usize) -> &mut V {
        let app = if self.series.contains_key(app) || self.series.len() < MAX_APPS {
            app
        } else {
            OTHER
        };
        let per_app = self.series.entry(app.to_string()).or_default();
        let key = if per_app.contains_key(key) || per_app.len() < max_keys {
            key
        } else {
            OTHER
        };
        per_app.entry(key.to_string()).or_default()
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str, &V)> {
        self.series
            .iter()
            .flat_map(|(app, m)| m.iter().map(move |(k, v)| (app.as_str(), k.as_str(), v)))
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Enqueue (or re-queue) to start, per (app, worker path).
    job_wait: Family<Histogram>,
    /// Start to end of a run, per (app, worker path).
    job_run: Family<Histogram>,
    /// Handler calls per (app, ""): the second key is unused, one series per app.
    handler: Family<Histogram>,
    /// Handler responses per (app, status class "2xx".."5xx").
    handler_responses: Family<u64>,
    /// Final job outcomes per (app, status).
    outcomes: Family<u64>,
    /// `job.checkpoint` calls until durable.
    checkpoint: Histogram,
    /// One store write batch (one transaction) until committed.
    store_commit: Histogram,
}

/// All histograms and per-app counters of the process.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// Job runs by the context they ran in: [fresh, warm] (a slot's kept context of the
    /// job's app and deployment).
    contexts: [AtomicU64; 2],
    /// Handler calls by the context they ran in: [fresh, warm] (one the HTTP thread
    /// kept for the app and deployment).
    handler_contexts: [AtomicU64; 2],
    /// Job state writes sent to the store: [start, outcome, start and outcome in one].
    transitions: [AtomicU64; 3],
    /// Collections a handler thread forced after a call (a big request or run).
    handler_collections: AtomicU64,
}

/// A job state write: its start, its outcome, or both in one row write (an outcome
/// carrying its start). The order is the `kind` label's in /metrics.
#[derive(Debug, Clone, Copy)]
pub enum TransitionKind {
    Start,
    Outcome,
    StartAndOutcome,
}

/// The process-wide registry (one server per process).
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl Registry {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding the lock leaves only counters behind: keep using them.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn job_waited(&self, app: &str, path: &str, d: Duration) {
        self.with(|i| i.job_wait.entry(app, path, MAX_PATHS_PER_APP).observe(d));
    }

    pub fn job_ran(&self, app: &str, path: &str, d: Duration) {
        self.with(|i| i.job_run.entry(app, path, MAX_PATHS_PER_APP).observe(d));
    }

    /// A job reached a final status (`done`, `failed`, `cancelled`, `stopped`).
    pub fn job_outcome(&self, app: &str, status: &str) {
        self.with(|i| *i.outcomes.entry(app, status, 8) += 1);
    }

    /// A handler call of `app` answered `status` after `d`.
    pub fn handler_called(&self, app: &str, status: u16, d: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.with(|i| {
            i.handler.entry(app, "", 1).observe(d);
            *i.handler_responses.entry(app, class, 8) += 1;
        });
    }

    /// A job run started in a fresh JS context (`warm`: false) or in the one its slot
    /// kept for the app.
    pub fn job_context(&self, warm: bool) {
        self.contexts[usize::from(warm)].fetch_add(1, Ordering::Relaxed);
    }

    /// A handler call ran in a fresh JS context (`warm`: false) or in one its HTTP
    /// thread kept for the app.
    pub fn handler_context(&self, warm: bool) {
        self.handler_contexts[usize::from(warm)].fetch_add(1, Ordering::Relaxed);
    }

    /// The scheduler sent a job state write to the store.
    pub fn job_transition(&self, kind: TransitionKind) {
        self.transitions[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A handler thread collected its garbage right after a call.
    pub fn handler_collected(&self) {
        self.handler_collections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn checkpoint_saved(&self, d: Duration) {
        self.with(|i| i.checkpoint.observe(d));
    }

    pub fn store_committed(&self, d: Duration) {
        self.with(|i| i.store_commit.observe(d));
    }

    /// Drops a removed app's series, so a removed app's labels do not linger.
    pub fn forget_app(&self, app: &str) {
        self.with(|i| {
            i.job_wait.series.remove(app);
            i.job_run.series.remove(app);
            i.handler.series.remove(app);
            i.handler_responses.series.remove(app);
            i.outcomes.series.remove(app);
        });
    }

    /// Handler calls and 5xx answers of `app` since start (for the apps view).
    pub fn handler_counts(&self, app: &str) -> (u64, u64) {
        self.with(|i| {
            let Some(m) = i.handler_responses.series.get(app) else {
                return (0, 0);
            };
            (m.values().sum(), m.get("5xx").copied().unwrap_or(0))
        })
    }

    /// Jobs that ended `done` and `failed` since start, over all apps (the console's
    /// throughput chart takes per-minute differences).
    pub fn outcome_totals(&self) -> (u64, u64) {
        self.with(|i| {
            let sum = |st: &str| {
                i.outcomes
                    .series
                    .values()
                    .filter_map(|m| m.get(st))
                    .sum::<u64>()
            };
            (sum("done"), sum("failed"))
        })
    }

    /// The Prometheus text exposition of every series here.
    pub fn render(&self, out: &mut String) {
        self.with(|i| {
            let head = |out: &mut String, name: &str, help: &str, kind: &str| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            };
            let hists = [
                (
                    "fazt_job_wait_seconds",
                    "Time from enqueue (or re-queue) to start, per app and worker path.",
                    &i.job_wait,
                    "path",
                ),
                (
                    "fazt_job_run_seconds",
                    "Run time of job attempts, per app and worker path.",
                    &i.job_run,
                    "path",
                ),
                (
                    "fazt_handler_seconds",
                    "HTTP handler latency per app.",
                    &i.handler,
                    "",
                ),
            ];
            for (name, help, family, key_label) in hists {
                head(out, name, help, "histogram");
                for (app, key, h) in family.iter() {
                    let mut labels = format!("app=\"{}\"", escape(app));
                    if !key_label.is_empty() {
                        let _ = write!(labels, ",{key_label}=\"{}\"", escape(key));
                    }
                    h.render(out, name, &labels);
                }
            }
            let counters = [
                (
                    "fazt_job_outcomes_total",
                    "Jobs that reached a final status, per app and status.",
                    &i.outcomes,
                    "status",
                ),
                (
                    "fazt_handler_responses_total",
                    "HTTP handler responses per app and status class.",
                    &i.handler_responses,
                    "code",
                ),
            ];
            for (name, help, family, key_label) in counters {
                head(out, name, help, "counter");
                for (app, key, n) in family.iter() {
                    let _ = writeln!(
                        out,
                        "{name}{{app=\"{}\",{key_label}=\"{}\"}} {n}",
                        escape(app),
                        escape(key)
                    );
                }
            }
            head(
                out,
                "fazt_checkpoint_seconds",
                "job.checkpoint latency until durable.",
                "histogram",
            );
            i.checkpoint.render(out, "fazt_checkpoint_seconds", "");
            head(
                out,
                "fazt_store_commit_seconds",
                "Store write batch (one transaction) commit latency.",
                "histogram",
            );
            i.store_commit.render(out, "fazt_store_commit_seconds", "");
            let counters: [(&str, &str, &[&str], &[AtomicU64]); 3] = [
                (
                    "fazt_job_contexts_total",
                    "Job runs by JS context: fresh, or warm (kept by the slot for the app).",
                    &["fresh", "warm"],
                    &self.contexts,
                ),
                (
                    "fazt_handler_contexts_total",
                    "Handler calls by JS context: fresh, or warm (kept by the HTTP thread \
                     for the app).",
                    &["fresh", "warm"],
                    &self.handler_contexts,
                ),
                (
                    "fazt_job_transitions_total",
                    "Job state writes sent to the store: a start, an outcome, or both in \
                     one (a run that ended within 5 ms of its start).",
                    &["start", "outcome", "start_and_outcome"],
                    &self.transitions,
                ),
            ];
            for (name, help, kinds, values) in counters {
                head(out, name, help, "counter");
                for (kind, n) in kinds.iter().zip(values) {
                    let n = n.load(Ordering::Relaxed);
                    let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {n}");
                }
            }
            head(
                out,
                "fazt_handler_collections_total",
                "Garbage collections a handler thread forced right after a call (a big \
                 request body, or 256 KB of heap over what the thread keeps).",
                "counter",
            );
            let _ = writeln!(
                out,
                "fazt_handler_collections_total {}",
                self.handler_collections.load(Ordering::Relaxed)
            );
        });
    }
}

/// Escapes a label value as the text format asks (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inf_counts_all() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(7200));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"3600\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn every_sample_follows_its_own_family_header() {
        // The text format groups a family's samples under its TYPE line; the counter
        // families added beside the histograms once printed their samples under another
        // family's header.
        let r = Registry::default();
        r.job_ran("a", "workers/w.js", Duration::from_millis(1));
        r.job_context(true);
        r.handler_context(false);
        r.handler_collected();
        let mut out = String::new();
        r.render(&mut out);
        let mut family = "";
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or("");
            } else if !line.starts_with('#') {
                assert!(
                    !family.is_empty() && line.starts_with(family),
                    "{line} under family {family}"
                );
            }
        }
        assert!(
            out.contains("fazt_job_contexts_total{kind=\"warm\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("fazt_handler_collections_total 1\n"), "{out}");
        assert!(
            out.contains("fazt_handler_contexts_total{kind=\"fresh\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn paths_per_app_are_capped() {
        let r = Registry::default();
        for n in 0..MAX_PATHS_PER_APP + 10 {
            r.job_ran("a", &format!("workers/w{n}.js"), Duration::from_millis(1));
        }
        let paths = r.with(|i| i.job_run.series["a"].len());
        assert_eq!(paths, MAX_PATHS_PER_APP + 1);
        let other = r.with(|i| i.job_run.series["a"][OTHER].count());
        assert_eq!(other, 10);
    }

    #[test]
    fn apps_are_capped_and_forgotten() {
        let r = Registry::default();
        for n in 0..MAX_APPS + 3 {
            r.job_outcome(&format!("app{n}"), "done");
        }
        assert_eq!(r.with(|i| i.outcomes.series.len()), MAX_APPS + 1);
        r.forget_app("app0");
        assert_eq!(r.with(|i| i.outcomes.series.len()), MAX_APPS);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
