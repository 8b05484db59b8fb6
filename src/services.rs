//! The services every request and job may use, built once at start and shared.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apps::{AppError, Deployment, Registry, Run};
use crate::store::{AppFile, AppInfo};

use crate::realtime::{Hub, Listeners};
use crate::store::Store;
use crate::worker::Pool;

/// Counters for /metrics that no single owner keeps.
#[derive(Default)]
pub struct Metrics {
    pub http_requests: AtomicU64,
    pub ws_connections: AtomicU64,
    /// HTTP threads replaced because user JS kept them past the handler deadline.
    pub http_threads_abandoned: AtomicU64,
}

/// Removing an app cancels its running handlers.
impl crate::apps::Stop for crate::js::Interrupt {
    fn stop_run(&self) {
        self.stop(crate::js::Reason::Cancelled);
    }
}

impl crate::js::Env for Services {
    fn store(&self) -> &Store {
        &self.store
    }

    fn natives(&self) -> &crate::js::Natives {
        &self.natives
    }

    fn install(&self, ctx: &mut boa_engine::Context) {
        ctx.insert_data(crate::worker::JsEnv {
            store: self.store.clone(),
            pool: self.pool.clone(),
        });
        ctx.insert_data(crate::realtime::JsEnv {
            hub: self.hub.clone(),
            listeners: self.listeners.clone(),
        });
    }
}

impl crate::worker::Env for Services {
    fn pool(&self) -> &Pool {
        &self.pool
    }

    fn listeners(&self) -> &Arc<Listeners> {
        &self.listeners
    }

    fn enter_app(
        &self,
        app: &str,
        stop: Option<crate::js::Interrupt>,
    ) -> crate::store::Result<Option<Run<'_, crate::js::Interrupt>>> {
        Services::enter_app(self, app, stop)
    }
}

impl crate::realtime::Env for Services {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    fn app_live(&self, app: &str) -> bool {
        matches!(self.enter_app(app, None), Ok(Some(_)))
    }

    fn ws_connected(&self) {
        self.metrics.ws_connections.fetch_add(1, Ordering::Relaxed);
    }
}

impl Services {
    /// Starts a run of `app`'s live deployment (None: no such app, or it is being
    /// removed). Hold the run while its code executes: a removal stops `stop` and
    /// waits for the run to end before the app's data goes.
    pub fn enter_app(
        &self,
        app: &str,
        stop: Option<crate::js::Interrupt>,
    ) -> crate::store::Result<Option<Run<'_, crate::js::Interrupt>>> {
        self.apps.enter(app, stop, || {
            Ok(self.store.get_app(app)?.as_ref().map(Deployment::from))
        })
    }

    /// Deploys `files` as `app` under a new deploy id; every cache of the app's code
    /// is keyed by that id, so the next request or job runs the new code.
    pub fn deploy_app(&self, app: &str, files: Vec<AppFile>) -> Result<AppInfo, AppError> {
        self.apps.deploy(app, || {
            let info = self.store.deploy_app(app, files)?;
            let deployment = Deployment::from(&info);
            Ok((info, deployment))
        })
    }

    /// Removes `app` and everything it owns, in this one place: no new run starts,
    /// running handlers are stopped, WebSocket sessions closed, jobs cancelled; once
    /// its runs ended (bounded wait), its files, kv data and jobs are deleted in one
    /// transaction. A run that outlives the wait keeps the name from being deployed
    /// again until it ends, and a new app under the name starts empty regardless, so
    /// no write of the old app reaches the new one. Returns false for no such app.
    pub fn remove_app(&self, app: &str) -> Result<bool, AppError> {
        let removal = self.apps.begin_removal(app);
        self.hub.close_app(app);
        let cancelled = self.pool.cancel_app(app);
        let deadline = Instant::now() + self.pool.limits.watchdog + Duration::from_secs(3);
        let left = self.apps.wait_idle(app, deadline);
        if left > 0 {
            log::warn!(
                "app {app}: {left} run(s) still going after the removal wait; removing anyway"
            );
        }
        // Once no run is left (and none can start), a second cancel catches jobs that
        // the stopping runs spawned after the first one listed the app's jobs.
        let removed = cancelled
            .and_then(|()| self.pool.cancel_app(app))
            .and_then(|()| self.store.remove_app(app));
        self.apps.end_removal(removal, removed.is_ok());
        if removed.is_ok() {
            crate::metrics::global().forget_app(app);
        }
        // A WebSocket that joined after the close above sees the app gone in its own
        // check (see `realtime::accept`).
        Ok(removed?)
    }
}

/// The composition of the lower modules' handles: it implements the narrow `Env`
/// traits `js`, `worker` and `realtime` reach the rest of the server by.
pub struct Services {
    pub store: Store,
    /// Shared with the `fazt.worker.*` host functions (see `js::Env::install`).
    pub pool: Arc<Pool>,
    /// Shared with the `fazt.realtime.*` host functions.
    pub hub: Arc<Hub>,
    /// Shared with the hub (writes) and the scheduler (idle checks).
    pub listeners: Arc<Listeners>,
    pub admin_token: String,
    pub metrics: Metrics,
    pub started: Instant,
    /// The port we listen on; the WebSocket code uses it to find its socket.

    /// Live deployments and runs in progress: see [`Registry`].
    pub apps: Registry<crate::js::Interrupt>,
    /// Host functions of the worker and realtime modules, wired in by `app::start`.
    pub natives: crate::js::Natives,
}

impl Services {
    pub fn health(&self) -> serde_json::Value {
        let s = &self.pool.stats;
        let b = &self.pool.budget;
        let store = self.store.status();
        // Degraded: writes fail (disk full, I/O errors). Reads still answer; status
        // changes wait in memory and are written, in order, once writes succeed again.
        let reason = (!store.writable).then(|| {
            format!(
                "the store cannot write since {} ({}); {} job state transition(s) and {} other write(s) pending",
                store.failing_since_ms.map(format_utc_ms).unwrap_or_default(),
                store.reason.as_deref().unwrap_or("unknown error"),
                store.pending_transitions,
                store.pending_writes.saturating_sub(store.pending_transitions)
            )
        });
        serde_json::json!({
            "status": if store.writable { "ok" } else { "degraded" },
            "reason": reason,
            "store": store,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "workers": {
                "running": s.running.load(Ordering::Relaxed),
                "queued": s.queued.load(Ordering::Relaxed),
                "daemons": s.daemons.load(Ordering::Relaxed),
                "slots_total": self.pool.limits.slots,
                "memory": {
                    "budget_bytes": b.budget_bytes,
                    "reserved_bytes": b.reserved_bytes.load(Ordering::Relaxed),
                    "rss_bytes": crate::worker::rss_bytes(),
                }
            }
        })
    }

    pub fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let s = &self.pool.stats;
        let b = &self.pool.budget;
        let hub = &self.hub;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let head = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "fazt_jobs",
            "Jobs in the store by status.",
            "gauge",
        );
        let counts = self.store.job_counts().unwrap_or_default();
        let mut lines = String::new();
        for st in [
            "queued",
            "running",
            "done",
            "failed",
            "cancelled",
            "stopped",
        ] {
            let n = counts.iter().find(|(k, _)| k == st).map_or(0, |(_, n)| *n);
            let _ = writeln!(lines, "fazt_jobs{{status=\"{st}\"}} {n}");
        }
        out.push_str(&lines);
        let singles: [(&str, &str, &str, u64); 16] = [
            (
                "fazt_jobs_running",
                "Jobs running in slots.",
                "gauge",
                s.running.load(Ordering::Relaxed) as u64,
            ),
            (
                "fazt_queue_depth",
                "Jobs waiting for a slot, memory or a retry delay.",
                "gauge",
                s.queued.load(Ordering::Relaxed) as u64,
            ),
            (
                "fazt_daemons_running",
                "Daemon jobs running.",
                "gauge",
                s.daemons.load(Ordering::Relaxed) as u64,
            ),
            (
                "fazt_jobs_started_total",
                "Job runs started since start.",
                "counter",
                s.started_total.load(Ordering::Relaxed) as u64,
            ),
            (
                "fazt_slots_abandoned_total",
                "Slot threads abandoned by the watchdog.",
                "counter",
                s.abandoned_slots.load(Ordering::Relaxed) as u64,
            ),
            (
                "fazt_memory_budget_bytes",
                "Worker memory budget.",
                "gauge",
                b.budget_bytes,
            ),
            (
                "fazt_memory_reserved_bytes",
                "Memory reserved by running jobs.",
                "gauge",
                b.reserved_bytes.load(Ordering::Relaxed),
            ),
            (
                "fazt_rss_bytes",
                "Resident set size of the process.",
                "gauge",
                crate::worker::rss_bytes(),
            ),
            (
                "fazt_http_requests_total",
                "HTTP requests handled.",
                "counter",
                load(&self.metrics.http_requests),
            ),
            (
                "fazt_http_threads_abandoned_total",
                "HTTP threads replaced because a handler could not be stopped.",
                "counter",
                load(&self.metrics.http_threads_abandoned),
            ),
            (
                "fazt_ws_connections_total",
                "WebSocket connections accepted.",
                "counter",
                load(&self.metrics.ws_connections),
            ),
            (
                "fazt_ws_connections",
                "WebSocket connections open.",
                "gauge",
                hub.total_connections() as u64,
            ),
            (
                "fazt_broadcasts_total",
                "Realtime broadcasts.",
                "counter",
                load(&hub.broadcasts),
            ),
            (
                "fazt_deliveries_total",
                "Realtime messages queued to clients.",
                "counter",
                load(&hub.deliveries),
            ),
            (
                "fazt_ws_slow_disconnects_total",
                "Clients dropped for falling behind.",
                "counter",
                load(&hub.dropped_slow),
            ),
            (
                "fazt_uptime_seconds",
                "Seconds since start.",
                "gauge",
                self.started.elapsed().as_secs(),
            ),
        ];
        for (name, help, kind, value) in singles {
            head(&mut out, name, help, kind);
            let _ = writeln!(out, "{name} {value}");
        }
        let st = self.store.status();
        let store: [(&str, &str, &str, u64); 8] = [
            (
                "fazt_store_writable",
                "1 while the store can write; 0 while degraded (disk full, I/O errors).",
                "gauge",
                st.writable as u64,
            ),
            (
                "fazt_store_pending_writes",
                "Writes kept in memory for retry because the store could not write.",
                "gauge",
                st.pending_writes as u64,
            ),
            (
                "fazt_store_pending_transitions",
                "Job state transitions waiting to be written.",
                "gauge",
                st.pending_transitions as u64,
            ),
            (
                "fazt_store_failed_batches_total",
                "Write batches that failed for a transient reason and were retried.",
                "counter",
                st.failed_batches,
            ),
            (
                "fazt_store_shed_writes_total",
                "Log lines and progress updates shed while the store could not write.",
                "counter",
                st.shed_writes,
            ),
            (
                "fazt_store_wal_truncations_total",
                "WAL checkpoints that truncated the WAL file.",
                "counter",
                st.wal_truncations,
            ),
            (
                "fazt_store_wal_bytes",
                "Size of the WAL file.",
                "gauge",
                st.wal_bytes,
            ),
            (
                "fazt_disk_free_bytes",
                "Free bytes on the data dir's file system.",
                "gauge",
                st.free_bytes.unwrap_or(0),
            ),
        ];
        for (name, help, kind, value) in store {
            head(&mut out, name, help, kind);
            let _ = writeln!(out, "{name} {value}");
        }
        crate::metrics::global().render(&mut out);
        out
    }
}

/// `2026-11-23T10:42:50Z` for a time in ms since the epoch (UTC, no dependencies).
pub fn format_utc_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::format_utc_ms;

    #[test]
    fn utc_times() {
        assert_eq!(format_utc_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc_ms(1_795_430_399_869), "2026-11-23T10:39:59Z");
    }
}
