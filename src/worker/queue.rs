//! Queue order: which queued job is offered a free slot first. A pure function of the
//! queue and `now`, so the rules test in microseconds. Apps keep their FIFO turns
//! among each other; inside one app, higher `priority` goes first, and waiting ages a
//! job upwards so `low` is never starved.

use std::time::{Duration, Instant};

pub use crate::job::Priority;

/// Each this long a job waits counts as one priority level more. A `low` job queued
/// at `t` therefore goes before every `high` job of its app queued at
/// `t + 2 * AGING_STEP` or later (equal ranks go by arrival), and before every `normal`
/// one queued at `t + AGING_STEP` or later: it can be passed only by the jobs that
/// arrived within 20 s after it, a bounded number, so it always gets its turn.
pub const AGING_STEP: Duration = Duration::from_secs(10);

/// One queued job as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Waiting<'a> {
    /// Arrival number: lower came first.
    pub seq: u64,
    pub app: &'a str,
    pub priority: Priority,
    /// When it was queued (or re-queued, for retries and daemon restarts).
    pub since: Instant,
}

/// Priority level plus one per [`AGING_STEP`] waited.
fn rank(w: &Waiting<'_>, now: Instant) -> u64 {
    let waited = now.saturating_duration_since(w.since);
    w.priority.level() + (waited.as_millis() / AGING_STEP.as_millis()) as u64
}

/// The arrival numbers of `queue` (given in arrival order) in the order jobs should be
/// offered free slots. Every position an app held in the FIFO stays that app's; the
/// app's own jobs fill its positions by rank (highest first), then arrival. So
/// priorities reorder an app's jobs among themselves and never let one app overtake
/// another.
pub fn order(queue: &[Waiting<'_>], now: Instant) -> Vec<u64> {
    if queue.iter().all(|w| w.priority == Priority::Normal) {
        // Equal priorities age alike: plain FIFO.
        return queue.iter().map(|w| w.seq).collect();
    }
    let mut by_app: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for (i, w) in queue.iter().enumerate() {
        by_app.entry(w.app).or_default().push(i);
    }
    let mut out = vec![0u64; queue.len()];
    for positions in by_app.values() {
        let mut jobs: Vec<&Waiting<'_>> = positions.iter().map(|&i| &queue[i]).collect();
        jobs.sort_by_key(|w| (std::cmp::Reverse(rank(w, now)), w.seq));
        for (&pos, w) in positions.iter().zip(jobs) {
            out[pos] = w.seq;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, app: &str, priority: Priority, since: Instant) -> Waiting<'_> {
        Waiting {
            seq,
            app,
            priority,
            since,
        }
    }

    #[test]
    fn all_normal_is_fifo() {
        let t = Instant::now();
        let q = [
            w(1, "a", Priority::Normal, t),
            w(2, "b", Priority::Normal, t),
            w(3, "a", Priority::Normal, t),
        ];
        assert_eq!(order(&q, t), vec![1, 2, 3]);
    }

    #[test]
    fn higher_priority_of_an_app_goes_first() {
        let t = Instant::now();
        let q = [
            w(1, "a", Priority::Low, t),
            w(2, "a", Priority::Normal, t),
            w(3, "a", Priority::High, t),
            w(4, "a", Priority::Normal, t),
        ];
        assert_eq!(order(&q, t), vec![3, 2, 4, 1]);
    }

    #[test]
    fn priorities_never_let_one_app_overtake_another() {
        let t = Instant::now();
        let q = [
            w(1, "a", Priority::Low, t),
            w(2, "b", Priority::Normal, t),
            w(3, "a", Priority::High, t),
            w(4, "b", Priority::High, t),
        ];
        // Positions 1 and 3 stay app a's, 2 and 4 app b's.
        assert_eq!(order(&q, t), vec![3, 4, 1, 2]);
    }

    #[test]
    fn low_ages_past_newer_high_jobs() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(100);
        let low = w(1, "a", Priority::Low, t0);
        // Queued within 2 aging steps of the low job: may still go first.
        let soon = w(2, "a", Priority::High, t0 + Duration::from_secs(5));
        assert_eq!(order(&[low, soon], now), vec![2, 1]);
        // Queued later than that: behind it, however many keep coming.
        let later: Vec<Waiting<'_>> = (0..50)
            .map(|i| {
                w(
                    10 + i,
                    "a",
                    Priority::High,
                    t0 + Duration::from_secs(20 + i),
                )
            })
            .collect();
        let mut q = vec![low];
        q.extend(later);
        assert_eq!(order(&q, now)[0], 1);
    }

    #[test]
    fn equal_rank_keeps_arrival_order() {
        let t0 = Instant::now();
        // A low job that waited one step ranks as a fresh normal one; it came first.
        let q = [
            w(1, "a", Priority::Low, t0),
            w(2, "a", Priority::Normal, t0 + AGING_STEP),
        ];
        assert_eq!(order(&q, t0 + AGING_STEP), vec![1, 2]);
    }

    #[test]
    fn a_clock_behind_since_counts_as_no_wait() {
        let t = Instant::now();
        let q = [
            w(1, "a", Priority::Low, t + Duration::from_secs(5)),
            w(2, "a", Priority::High, t),
        ];
        assert_eq!(order(&q, t), vec![2, 1]);
    }

    #[test]
    fn parse_and_serde_names() {
        assert_eq!(Priority::parse("high"), Some(Priority::High));
        assert_eq!(Priority::parse("HIGH"), None);
        assert_eq!(Priority::default(), Priority::Normal);
        assert_eq!(
            serde_json::to_string(&Priority::Low).unwrap_or_default(),
            "\"low\""
        );
    }
}
