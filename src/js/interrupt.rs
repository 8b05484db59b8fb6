//! A stop request shared between a running piece of JS and whoever may stop it (the
//! scheduler, the handler deadline, shutdown). Stopping sets a flag that the (patched)
//! engine reads at every loop back-edge, every call and after every regex match, so JS
//! stops even inside native code (revivers, getters, Proxy traps, backtracking regexes).
//! A deadline is enforced by one timer thread for all runs, since a thread stuck in
//! native code cannot notice its own deadline; `job.sleep` waits on the interrupt so a
//! cancel wakes the sleeper at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
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
    /// Read by the engine (see vendor/PATCHES.md); set by `stop`, never cleared.
    flag: Arc<AtomicBool>,
    /// Key of this run in the deadline timer (0: not registered).
    timer_id: AtomicU64,
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
    /// A run that stops itself when `timeout` passes, wherever its thread is stuck.
    pub fn new(timeout: Option<Duration>) -> Interrupt {
        Interrupt::with_heap_cap(timeout, None)
    }

    /// Like [`new`](Self::new), and also stops with [`Reason::Memory`] once `heap`
    /// (a thread's live-bytes counter) has grown by more than `cap` bytes from now.
    pub fn with_heap_cap(
        timeout: Option<Duration>,
        heap: Option<(&'static AtomicI64, i64)>,
    ) -> Interrupt {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let i = Interrupt {
            inner: Arc::new(Inner {
                reason: AtomicU8::new(0),
                flag: Arc::new(AtomicBool::new(false)),
                timer_id: AtomicU64::new(0),
                cancel_requested: AtomicBool::new(false),
                note: AtomicU64::new(0),
                deadline,
                lock: Mutex::new(()),
                wake: Condvar::new(),
            }),
        };
        let heap = heap.map(|(counter, cap)| HeapCap {
            counter,
            limit: counter.load(Ordering::Relaxed).saturating_add(cap),
            cap,
        });
        if deadline.is_some() || heap.is_some() {
            Watch::get().register(&i, deadline, heap);
        }
        i
    }

    /// The flag the engine checks; install it in the context before running.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.inner.flag.clone()
    }

    /// The run ended: its deadline and heap cap no longer need watching.
    pub fn disarm(&self) {
        self.inner.unregister();
    }

    /// Asks the JS to stop. Only the first reason is kept.
    pub fn stop(&self, reason: Reason) {
        let _ =
            self.inner
                .reason
                .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.inner.flag.store(true, Ordering::SeqCst);
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

impl Inner {
    fn unregister(&self) {
        let id = self.timer_id.swap(0, Ordering::SeqCst);
        if id != 0 {
            Watch::get().remove(id);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// Delay between a big request and the trim it asks for: the request's buffers are
/// freed after its response is written, and one trim then serves a whole burst.
const TRIM_DELAY: Duration = Duration::from_millis(200);

/// Asks for freed heap to be handed back to the OS shortly (at most one trim per
/// [`TRIM_DELAY`]), off the request's thread. glibc keeps freed memory in per-thread
/// arenas, so after a burst of big requests RSS would otherwise stay near its peak.
pub fn trim_soon() {
    Watch::get().trim_soon();
}

/// Hands free heap pages of every malloc arena back to the OS.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A run's heap limit: `counter` may not pass `limit` (= its value at start + `cap`).
#[derive(Debug, Clone, Copy)]
struct HeapCap {
    counter: &'static AtomicI64,
    limit: i64,
    cap: i64,
}

/// How often running heap caps are looked at. Memory grows at most a few hundred MB/s
/// in JS, so a handler overshoots its cap by a few MB at most.
const HEAP_POLL: Duration = Duration::from_millis(10);

/// One thread that stops every run whose deadline passed or whose heap outgrew its cap.
/// Registration is two mutex operations per run (register, remove), cheap at 20k req/s;
/// the map holds only runs in flight.
struct Watch {
    state: Mutex<WatchState>,
    wake: Condvar,
}

struct WatchState {
    runs: HashMap<u64, Watched>,
    next_id: u64,
    /// When the thread plans to wake next; a registration due earlier wakes it.
    next_wake: Option<Instant>,
    started: bool,
    /// A big request finished: hand freed heap back to the OS soon (see `trim_soon`).
    trim_at: Option<Instant>,
}

struct Watched {
    deadline: Option<Instant>,
    heap: Option<HeapCap>,
    run: Weak<Inner>,
}

impl Watch {
    fn get() -> &'static Watch {
        static WATCH: OnceLock<Watch> = OnceLock::new();
        WATCH.get_or_init(|| Watch {
            state: Mutex::new(WatchState {
                runs: HashMap::new(),
                next_id: 1,
                next_wake: None,
                started: false,
                trim_at: None,
            }),
            wake: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&'static self, i: &Interrupt, deadline: Option<Instant>, heap: Option<HeapCap>) {
        let mut st = self.lock();
        self.ensure_started(&mut st);
        let id = st.next_id;
        st.next_id += 1;
        i.inner.timer_id.store(id, Ordering::SeqCst);
        st.runs.insert(
            id,
            Watched {
                deadline,
                heap,
                run: Arc::downgrade(&i.inner),
            },
        );
        let due = match (deadline, heap) {
            (_, Some(_)) => Some(Instant::now() + HEAP_POLL),
            (d, None) => d,
        };
        if let Some(due) = due {
            if st.next_wake.is_none_or(|w| due < w) {
                self.wake.notify_one();
            }
        }
    }

    fn trim_soon(&'static self) {
        let mut st = self.lock();
        self.ensure_started(&mut st);
        if st.trim_at.is_none() {
            let at = Instant::now() + TRIM_DELAY;
            st.trim_at = Some(at);
            if st.next_wake.is_none_or(|w| at < w) {
                self.wake.notify_one();
            }
        }
    }

    fn ensure_started(&'static self, st: &mut WatchState) {
        if !st.started {
            let spawned = std::thread::Builder::new()
                .name("fazt-deadlines".into())
                .spawn(move || self.run());
            match spawned {
                Ok(_) => st.started = true,
                // Deadlines are still noticed between budget slices; only runs stuck in
                // native code go unstopped until a later registration starts the thread.
                Err(e) => log::error!("could not start the deadline thread: {e}"),
            }
        }
    }

    fn remove(&self, id: u64) {
        self.lock().runs.remove(&id);
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let mut due: Vec<(Weak<Inner>, Reason, u64)> = Vec::new();
            let mut next: Option<Instant> = None;
            st.runs.retain(|_, w| {
                if w.deadline.is_some_and(|d| d <= now) {
                    due.push((w.run.clone(), Reason::Timeout, 0));
                    return false;
                }
                if let Some(h) = w.heap {
                    let used = h.counter.load(Ordering::Relaxed);
                    if used > h.limit {
                        let grown = (used - (h.limit - h.cap)).max(0) as u64;
                        due.push((w.run.clone(), Reason::Memory, grown));
                        return false;
                    }
                    next = Some(next.map_or(now + HEAP_POLL, |n| n.min(now + HEAP_POLL)));
                }
                if let Some(d) = w.deadline {
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
                true
            });
            if let Some(at) = st.trim_at {
                if at <= now {
                    st.trim_at = None;
                    drop(st);
                    trim_heap();
                    st = self.lock();
                    continue;
                }
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            st.next_wake = next;
            if !due.is_empty() {
                // Stop outside the lock: dropping the last handle of a run takes it too.
                drop(st);
                for (run, reason, note) in due {
                    if let Some(inner) = run.upgrade() {
                        inner.timer_id.store(0, Ordering::SeqCst);
                        let i = Interrupt { inner };
                        i.stop_with_note(reason, note);
                    }
                }
                st = self.lock();
                continue;
            }
            st = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.wake
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
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
    fn deadline_sets_the_engine_flag_without_any_check() {
        // A thread stuck in native code never calls `check`: the timer must set the
        // flag on its own.
        let i = Interrupt::new(Some(Duration::from_millis(20)));
        let flag = i.flag();
        let start = Instant::now();
        while !flag.load(Ordering::SeqCst) {
            assert!(start.elapsed() < Duration::from_secs(5), "flag never set");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(i.check_flag(), Some(Reason::Timeout));
    }

    #[test]
    fn heap_cap_stops_with_memory() {
        let counter: &'static AtomicI64 = Box::leak(Box::new(AtomicI64::new(1000)));
        let i = Interrupt::with_heap_cap(None, Some((counter, 500)));
        let flag = i.flag();
        std::thread::sleep(HEAP_POLL * 3);
        assert!(!flag.load(Ordering::SeqCst), "stopped while within its cap");
        counter.store(1600, Ordering::SeqCst);
        let start = Instant::now();
        while !flag.load(Ordering::SeqCst) {
            assert!(start.elapsed() < Duration::from_secs(5), "flag never set");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(i.check(), Some(Reason::Memory));
        assert_eq!(i.note(), 600);
    }

    #[test]
    fn disarmed_runs_are_not_stopped() {
        let i = Interrupt::new(Some(Duration::from_millis(10)));
        i.disarm();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!i.flag().load(Ordering::SeqCst));
    }

    #[test]
    fn stop_sets_the_engine_flag() {
        let i = Interrupt::new(None);
        assert!(!i.flag().load(Ordering::SeqCst));
        i.stop(Reason::Cancelled);
        assert!(i.flag().load(Ordering::SeqCst));
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
