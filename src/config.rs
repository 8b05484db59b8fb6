//! Server configuration: where to listen, where the data lives, and the limits.

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port`; port 0 picks a free port (tests).
    pub listen: String,
    pub data_dir: PathBuf,
    /// Threads serving HTTP requests (each may run a handler for up to 5 s).
    pub http_threads: usize,
    /// What clients may send and hold open (sizes, timeouts, connection caps).
    pub http: crate::http::HttpLimits,
    pub pool: crate::worker::Limits,
    pub realtime: crate::realtime::HubLimits,
    /// kv quota and finished-job retention.
    pub store: crate::store::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./fazt-data"),
            http_threads: 16,
            http: crate::http::HttpLimits::default(),
            pool: crate::worker::Limits::default(),
            realtime: crate::realtime::HubLimits::default(),
            store: crate::store::Limits::default(),
        }
    }
}
