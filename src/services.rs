//! The services every request and job may use, built once at start and shared.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::realtime::{Hub, Listeners};
use crate::store::Store;
use crate::worker::Pool;

/// Counters for /metrics that no single owner keeps.
#[derive(Default)]
pub struct Metrics {
    pub http_requests: AtomicU64,
    pub ws_connections: AtomicU64,
}

impl Services {
    /// Bumped after every deploy and removal, so HTTP threads can keep app versions in
    /// memory and only ask the store again when something changed.
    pub fn apps_changed(&self) {
        self.app_generation.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct Services {
    pub store: Store,
    pub pool: Pool,
    pub hub: Hub,
    /// Shared with the hub (writes) and the scheduler (idle checks).
    pub listeners: Arc<Listeners>,
    pub admin_token: String,
    pub metrics: Metrics,
    pub started: Instant,
    /// The port we listen on; the WebSocket code uses it to find its socket.
    pub listen_port: u16,
    /// See [`Services::apps_changed`].
    pub app_generation: AtomicU64,
}

impl Services {
    pub fn health(&self) -> serde_json::Value {
        let s = &self.pool.stats;
        let b = &self.pool.budget;
        serde_json::json!({
            "status": "ok",
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
        let mut out = String::new();
        let mut metric = |name: &str, help: &str, kind: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let counts = self.store.job_counts().unwrap_or_default();
        let statuses = [
            "queued",
            "running",
            "done",
            "failed",
            "cancelled",
            "stopped",
        ];
        metric(
            "fazt_jobs",
            "Jobs in the store by status.",
            "gauge",
            statuses
                .iter()
                .map(|st| {
                    let n = counts.iter().find(|(k, _)| k == st).map_or(0, |(_, n)| *n);
                    (format!("{{status=\"{st}\"}}"), n.max(0) as u64)
                })
                .collect(),
        );
        metric(
            "fazt_jobs_running",
            "Jobs running in slots.",
            "gauge",
            vec![(String::new(), s.running.load(Ordering::Relaxed) as u64)],
        );
        metric(
            "fazt_queue_depth",
            "Jobs waiting for a slot, memory or a retry delay.",
            "gauge",
            vec![(String::new(), s.queued.load(Ordering::Relaxed) as u64)],
        );
        metric(
            "fazt_daemons_running",
            "Daemon jobs running.",
            "gauge",
            vec![(String::new(), s.daemons.load(Ordering::Relaxed) as u64)],
        );
        metric(
            "fazt_jobs_started_total",
            "Job runs started since start.",
            "counter",
            vec![(
                String::new(),
                s.started_total.load(Ordering::Relaxed) as u64,
            )],
        );
        metric(
            "fazt_slots_abandoned_total",
            "Slot threads abandoned by the watchdog.",
            "counter",
            vec![(
                String::new(),
                s.abandoned_slots.load(Ordering::Relaxed) as u64,
            )],
        );
        metric(
            "fazt_memory_budget_bytes",
            "Worker memory budget.",
            "gauge",
            vec![(String::new(), b.budget_bytes)],
        );
        metric(
            "fazt_memory_reserved_bytes",
            "Memory reserved by running jobs.",
            "gauge",
            vec![(String::new(), b.reserved_bytes.load(Ordering::Relaxed))],
        );
        metric(
            "fazt_rss_bytes",
            "Resident set size of the process.",
            "gauge",
            vec![(String::new(), crate::worker::rss_bytes())],
        );
        metric(
            "fazt_http_requests_total",
            "HTTP requests handled.",
            "counter",
            vec![(
                String::new(),
                self.metrics.http_requests.load(Ordering::Relaxed),
            )],
        );
        metric(
            "fazt_ws_connections_total",
            "WebSocket connections accepted.",
            "counter",
            vec![(
                String::new(),
                self.metrics.ws_connections.load(Ordering::Relaxed),
            )],
        );
        metric(
            "fazt_ws_connections",
            "WebSocket connections open.",
            "gauge",
            vec![(String::new(), self.hub.total_connections() as u64)],
        );
        metric(
            "fazt_broadcasts_total",
            "Realtime broadcasts.",
            "counter",
            vec![(String::new(), self.hub.broadcasts.load(Ordering::Relaxed))],
        );
        metric(
            "fazt_deliveries_total",
            "Realtime messages queued to clients.",
            "counter",
            vec![(String::new(), self.hub.deliveries.load(Ordering::Relaxed))],
        );
        metric(
            "fazt_ws_slow_disconnects_total",
            "Clients dropped for falling behind.",
            "counter",
            vec![(String::new(), self.hub.dropped_slow.load(Ordering::Relaxed))],
        );
        out
    }
}
