//! Memory accounting. A counting global allocator attributes every allocation to the
//! thread that made it, so each slot knows how many bytes its job holds; a monitor
//! thread samples process RSS every 100 ms and reports sustained overruns to the
//! scheduler, which stops the newest job that exceeds its reservation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The system allocator plus per-thread byte counting.
pub struct CountingAlloc;

thread_local! {
    // Where this thread's allocations are counted; null for threads nobody watches.
    static COUNTER: Cell<*const AtomicI64> = const { Cell::new(std::ptr::null()) };
}

#[inline]
fn count(delta: i64) {
    let _ = COUNTER.try_with(|c| {
        let p = c.get();
        if !p.is_null() {
            // SAFETY: `p` comes from `watch_this_thread`, which leaks the counter, so it
            // lives for the rest of the process.
            unsafe { (*p).fetch_add(delta, Ordering::Relaxed) };
        }
    });
}

// SAFETY: every call is forwarded to `System`; counting only touches an atomic.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Starts counting the calling thread's live heap bytes; returns the counter.
pub fn watch_this_thread() -> &'static AtomicI64 {
    let counter: &'static AtomicI64 = Box::leak(Box::new(AtomicI64::new(0)));
    COUNTER.with(|c| c.set(counter as *const AtomicI64));
    counter
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * if page > 0 { page as u64 } else { 4096 }
}

/// Figures shared between the scheduler (reservations), the monitor (RSS) and /health.
#[derive(Debug)]
pub struct Budget {
    pub budget_bytes: u64,
    pub reserved_bytes: AtomicU64,
    pub rss_bytes: AtomicU64,
    /// RSS when the pool started: the server's own footprint, not charged to jobs.
    pub baseline_bytes: AtomicU64,
}

impl Budget {
    pub fn new(budget_bytes: u64) -> Arc<Budget> {
        let rss = rss_bytes();
        Arc::new(Budget {
            budget_bytes,
            reserved_bytes: AtomicU64::new(0),
            rss_bytes: AtomicU64::new(rss),
            baseline_bytes: AtomicU64::new(rss),
        })
    }

    pub fn available(&self) -> u64 {
        self.budget_bytes
            .saturating_sub(self.reserved_bytes.load(Ordering::SeqCst))
    }
}

/// How the monitor judges one sample; kept apart from the thread so it is testable.
#[derive(Debug, Default)]
pub struct OverrunTracker {
    over_since: Option<Instant>,
    warned: bool,
}

/// What the monitor should do after a sample.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Fine,
    /// Crossed 80% of budget + baseline (reported once per crossing).
    Warn,
    /// Over budget + baseline for the grace period: stop a job.
    Stop,
}

pub const GRACE: Duration = Duration::from_millis(500);

impl OverrunTracker {
    pub fn sample(&mut self, rss: u64, baseline: u64, budget: u64, now: Instant) -> Verdict {
        let limit = baseline + budget;
        if rss > limit {
            let since = *self.over_since.get_or_insert(now);
            if now.duration_since(since) >= GRACE {
                // Give the stop time to take effect before judging again.
                self.over_since = Some(now);
                return Verdict::Stop;
            }
        } else {
            self.over_since = None;
        }
        if rss * 10 > limit * 8 {
            if !self.warned {
                self.warned = true;
                return Verdict::Warn;
            }
        } else {
            self.warned = false;
        }
        Verdict::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrun_needs_the_grace_period() {
        let mut t = OverrunTracker::default();
        let t0 = Instant::now();
        let (base, budget) = (100, 1000);
        assert_eq!(t.sample(500, base, budget, t0), Verdict::Fine);
        assert_eq!(t.sample(900, base, budget, t0), Verdict::Warn);
        assert_eq!(t.sample(1200, base, budget, t0), Verdict::Fine);
        assert_eq!(
            t.sample(1200, base, budget, t0 + Duration::from_millis(400)),
            Verdict::Fine
        );
        assert_eq!(
            t.sample(1200, base, budget, t0 + Duration::from_millis(500)),
            Verdict::Stop
        );
        // Dropping below resets the clock.
        assert_eq!(
            t.sample(500, base, budget, t0 + Duration::from_millis(600)),
            Verdict::Fine
        );
        assert_eq!(
            t.sample(1200, base, budget, t0 + Duration::from_millis(700)),
            Verdict::Warn
        );
        assert_eq!(
            t.sample(1200, base, budget, t0 + Duration::from_millis(1100)),
            Verdict::Fine
        );
    }

    #[test]
    fn counting_allocator_sees_this_thread() {
        let c = std::thread::spawn(|| {
            let counter = watch_this_thread();
            let before = counter.load(Ordering::Relaxed);
            let v = vec![0u8; 1 << 20];
            let during = counter.load(Ordering::Relaxed);
            drop(v);
            let after = counter.load(Ordering::Relaxed);
            (during - before, after - before)
        })
        .join()
        .expect("thread");
        assert!(c.0 >= 1 << 20, "{c:?}");
        assert!(c.1 < 1 << 20, "{c:?}");
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_bytes() > 0);
    }
}
