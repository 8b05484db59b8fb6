//! The job model every layer shares: status, spawn options (`JobConfig`, priority),
//! listing filters and log-line limits. A leaf: it depends on no other module of the
//! crate, so the store can persist jobs without knowing the pool.

use serde::{Deserialize, Serialize};

/// Reservation of a job that does not say.
pub const DEFAULT_MEMORY: u64 = 32 << 20;
pub const DEFAULT_TIMEOUT_MS: u64 = 30 * 60 * 1000;
pub const DEFAULT_RETRY_DELAY_MS: u64 = 1000;
/// Log lines kept per job.
pub const LOG_KEEP: i64 = 1000;
/// Longest single log line kept (longer ones are cut).
const MAX_LOG_LINE: usize = 8 * 1024;

/// `queued → running → done | failed | cancelled | stopped`; daemons and retries go
/// back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
    /// A clean stop by idle timeout; never restarted.
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "done" => Status::Done,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            "stopped" => Status::Stopped,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }
}

/// Filter for job listings (HTTP API and `fazt.worker.list`).
#[derive(Debug, Clone)]
pub struct ListFilter {
    pub app: Option<String>,
    pub status: Option<Status>,
    pub limit: u32,
}

impl ListFilter {
    pub fn from_query(
        app: Option<&str>,
        status: Option<&str>,
        limit: Option<&str>,
    ) -> Result<ListFilter, String> {
        let status = match status {
            None | Some("") => None,
            Some(s) => Some(Status::parse(s).ok_or_else(|| {
                format!("unknown status '{s}' (use queued, running, done, failed, cancelled or stopped)")
            })?),
        };
        let limit = match limit {
            None | Some("") => 100,
            Some(l) => l
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| format!("limit must be a whole number from 1 to 1000, not '{l}'"))?,
        };
        Ok(ListFilter {
            app: app.filter(|a| !a.is_empty()).map(str::to_string),
            status,
            limit,
        })
    }
}

/// Validated spawn options, stored as the job's `config` JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobConfig {
    /// Bytes reserved from the shared budget while the job runs.
    pub memory_bytes: u64,
    /// None = no time limit.
    pub timeout_ms: Option<u64>,
    pub daemon: bool,
    /// Extra attempts after a failure (non-daemons).
    pub retry: u32,
    pub retry_delay_ms: u64,
    pub unique_key: Option<String>,
    pub idle_timeout_ms: Option<u64>,
    pub idle_channel: Option<String>,
    /// Order among the app's queued jobs; configs stored before it existed read as normal.
    #[serde(default)]
    pub priority: Priority,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            memory_bytes: DEFAULT_MEMORY,
            timeout_ms: Some(DEFAULT_TIMEOUT_MS),
            daemon: false,
            retry: 0,
            retry_delay_ms: DEFAULT_RETRY_DELAY_MS,
            unique_key: None,
            idle_timeout_ms: None,
            idle_channel: None,
            priority: Priority::Normal,
        }
    }
}

/// `priority` of a spawn: `'low' | 'normal' | 'high'`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Priority> {
        Some(match s {
            "low" => Priority::Low,
            "normal" => Priority::Normal,
            "high" => Priority::High,
            _ => return None,
        })
    }

    /// Rank in the queue policy (see `worker::queue`).
    pub(crate) fn level(self) -> u64 {
        match self {
            Priority::Low => 0,
            Priority::Normal => 1,
            Priority::High => 2,
        }
    }
}

/// `msg` cut to [`MAX_LOG_LINE`] bytes (on a character boundary) with a marker, so one
/// call cannot flood a job's log or the server log.
pub fn truncate_log_line(msg: &str) -> std::borrow::Cow<'_, str> {
    if msg.len() <= MAX_LOG_LINE {
        return std::borrow::Cow::Borrowed(msg);
    }
    let mut cut = MAX_LOG_LINE;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{} …(truncated from {} bytes)",
        &msg[..cut],
        msg.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_filter_validation() {
        assert!(ListFilter::from_query(None, Some("bogus"), None).is_err());
        assert!(ListFilter::from_query(None, None, Some("0")).is_err());
        assert!(ListFilter::from_query(None, None, Some("x")).is_err());
        let f = ListFilter::from_query(Some("a"), Some("done"), Some("5")).expect("valid");
        assert_eq!(f.limit, 5);
        assert_eq!(f.status, Some(Status::Done));
    }

    #[test]
    fn long_log_lines_are_cut_on_a_char_boundary() {
        assert_eq!(truncate_log_line("short"), "short");
        let long = "é".repeat(MAX_LOG_LINE);
        let cut = truncate_log_line(&long);
        assert!(cut.len() < MAX_LOG_LINE + 64, "{}", cut.len());
        assert!(cut.ends_with(&format!("(truncated from {} bytes)", long.len())));
    }

    #[test]
    fn status_round_trip() {
        for s in [
            Status::Queued,
            Status::Running,
            Status::Done,
            Status::Failed,
            Status::Cancelled,
            Status::Stopped,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert!(!Status::Queued.is_final());
        assert!(Status::Stopped.is_final());
    }
}
