//! A stop request shared between a running piece of JS and whoever may stop it (the
//! scheduler, the handler deadline, shutdown). The JS run loop checks it between budget
//! slices; `job.sleep` waits on it so a cancel wakes the sleeper at once.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why JS was stopped. The order is irrelevant; the first reason set wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// `fazt.worker.cancel`, the HTTP API or the CLI asked for it.
    Cancelled = 1,
    /// The job's or handler's time limit passed.
    Timeout = 2,
    /// The memory monitor picked this job while the server was over its budget.
    Memory = 3,
    /// The server is shutting down.
    Shutdown = 4,
    /// A daemon's idle channel had no listener for its idle timeout.
    Idle = 5,
}

impl Reason {
    fn from_u8(v: u8) -> Option<Reason> {
        Some(match v {
            1 => Reason::Cancelled,
            2 => Reason::Timeout,
            3 => Reason::Memory,
            4 => Reason::Shutdown,
            5 => Reason::Idle,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Interrupt {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reason: AtomicU8,
    /// A cancel was asked for: `job.cancelled` reads true and sleeps end, before the
    /// hard stop that follows a short grace.
    cancel_requested: AtomicBool,
    /// A figure that explains the stop (bytes used, for memory stops).
    note: AtomicU64,
    /// Fixed when the run starts; checked on every poll so a timeout needs no other thread.
    deadline: Option<Instant>,
    // Sleepers wait here; `stop` notifies them.
    lock: Mutex<()>,
    wake: Condvar,
}

impl Interrupt {
    pub fn new(timeout: Option<Duration>) -> Interrupt {
        Interrupt {
            inner: Arc::new(Inner {
                reason: AtomicU8::new(0),
                cancel_requested: AtomicBool::new(false),
                note: AtomicU64::new(0),
                deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
                lock: Mutex::new(()),
                wake: Condvar::new(),
            }),
        }
    }

    /// Asks the JS to stop. Only the first reason is kept.
    pub fn stop(&self, reason: Reason) {
        let _ =
            self.inner
                .reason
                .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        let _guard = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.wake.notify_all();
    }

    /// Marks the run as cancelled without stopping it yet, and wakes sleepers.
    pub fn request_cancel(&self) {
        self.inner.cancel_requested.store(true, Ordering::SeqCst);
        let _guard = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.wake.notify_all();
    }

    pub fn cancel_requested(&self) -> bool {
        self.inner.cancel_requested.load(Ordering::SeqCst)
            || self.check_flag() == Some(Reason::Cancelled)
    }

    /// Like `stop`, recording a figure for the error message.
    pub fn stop_with_note(&self, reason: Reason, note: u64) {
        self.inner.note.store(note, Ordering::SeqCst);
        self.stop(reason);
    }

    pub fn note(&self) -> u64 {
        self.inner.note.load(Ordering::SeqCst)
    }

    /// The reason to stop now, if any (including a passed deadline).
    pub fn check(&self) -> Option<Reason> {
        if let Some(r) = Reason::from_u8(self.inner.reason.load(Ordering::Relaxed)) {
            return Some(r);
        }
        match self.inner.deadline {
            Some(d) if Instant::now() >= d => {
                self.stop(Reason::Timeout);
                self.check_flag()
            }
            _ => None,
        }
    }

    fn check_flag(&self) -> Option<Reason> {
        Reason::from_u8(self.inner.reason.load(Ordering::SeqCst))
    }

    /// Sleeps for `dur` or until stopped, cancelled, or the deadline passes, whichever
    /// comes first. Returns the stop reason if woken by one; a cancel request ends the
    /// sleep early without a reason, so cooperative code can check `job.cancelled`.
    pub fn sleep(&self, dur: Duration) -> Option<Reason> {
        let end = Instant::now() + dur;
        let end = match self.inner.deadline {
            Some(d) if d < end => d,
            _ => end,
        };
        let mut guard = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Only the flag while the lock is held: `check` may `stop`, which takes
            // the lock too. A passed deadline is seen below, since `end` is at or
            // before it.
            if let Some(r) = self.check_flag() {
                return Some(r);
            }
            if self.inner.cancel_requested.load(Ordering::SeqCst) {
                return None;
            }
            let now = Instant::now();
            if now >= end {
                drop(guard);
                return self.check();
            }
            guard = self
                .inner
                .wake
                .wait_timeout(guard, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let i = Interrupt::new(None);
        assert_eq!(i.check(), None);
        i.stop(Reason::Cancelled);
        i.stop(Reason::Timeout);
        assert_eq!(i.check(), Some(Reason::Cancelled));
    }

    #[test]
    fn deadline_reads_as_timeout() {
        let i = Interrupt::new(Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(i.check(), Some(Reason::Timeout));
    }

    #[test]
    fn sleep_past_the_deadline_returns_timeout_instead_of_deadlocking() {
        // The sleeper itself notices the deadline (nobody else stops it): before, its
        // `check` called `stop` while holding the lock `stop` takes, and hung.
        let i = Interrupt::new(Some(Duration::from_millis(20)));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(i.sleep(Duration::from_secs(30)));
        });
        let r = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(r, Ok(Some(Reason::Timeout)));
    }

    #[test]
    fn sleep_wakes_on_stop() {
        let i = Interrupt::new(None);
        let j = i.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let r = j.sleep(Duration::from_secs(30));
            (r, start.elapsed())
        });
        // Poll until the sleeper is parked would need a hook; stopping early is fine
        // too, since sleep checks the flag before waiting.
        i.stop(Reason::Cancelled);
        let (r, took) = t.join().expect("sleeper thread");
        assert_eq!(r, Some(Reason::Cancelled));
        assert!(took < Duration::from_secs(5), "sleep took {took:?}");
    }
}
