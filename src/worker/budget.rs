//! Memory accounting. A counting global allocator charges every allocation to the
//! thread that made it and credits the free to that same owner, whichever thread frees
//! it; slot threads (jobs) each have their own counter, every other thread (HTTP,
//! connections, WebSocket sessions, the store) shares one. A monitor thread samples
//! RSS every 100 ms; the budget rule judges what jobs use against the budget, and the
//! rest of the process is tracked apart and reported as such, never charged to jobs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The system allocator plus per-owner byte counting.
pub struct CountingAlloc;

/// One counter on a cache line of its own.
#[repr(align(64))]
struct Stripe(AtomicI64);

const STRIPES: usize = 32;

/// Heap bytes of every thread that is not a slot (HTTP handlers and their contexts,
/// connection and WebSocket threads, the store): the server's own, not jobs'. Striped:
/// each such thread counts on one of these lines (handed out in turn) and a read sums
/// them, so two cores don't pass one line back and forth on every malloc and free.
static OTHER: [Stripe; STRIPES] = [const { Stripe(AtomicI64::new(0)) }; STRIPES];
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Where this thread's allocations are counted: a slot's own counter, or this
    // thread's stripe of OTHER (null until the thread's first allocation).
    static COUNTER: Cell<*const AtomicI64> = const { Cell::new(std::ptr::null()) };
}

/// The counter the calling thread's allocations are charged to.
#[inline]
fn owner() -> *const AtomicI64 {
    COUNTER
        .try_with(|c| {
            let p = c.get();
            if !p.is_null() {
                return p;
            }
            let stripe = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
            let p = &OTHER[stripe].0 as *const AtomicI64;
            c.set(p);
            p
        })
        .unwrap_or(&OTHER[0].0 as *const AtomicI64)
}

/// Every block carries its owner's counter just before the bytes handed out, so a free
/// on another thread (a log line freed by the store writer, a broadcast freed by a
/// WebSocket writer) credits the job that allocated it instead of skewing two counters.
/// The header is at least 16 bytes so the block keeps malloc's alignment.
#[inline]
fn header(layout: &Layout) -> usize {
    layout.align().max(16)
}

#[inline]
fn outer(layout: &Layout) -> Option<Layout> {
    let h = header(layout);
    Layout::from_size_align(layout.size().checked_add(h)?, h).ok()
}

/// SAFETY (for callers): `base` is a block of `outer(layout)` just allocated.
#[inline]
unsafe fn finish(base: *mut u8, layout: &Layout) -> *mut u8 {
    if base.is_null() {
        return base;
    }
    let h = header(layout);
    let owner = owner();
    // SAFETY: the block is at least `h` >= 16 bytes longer than asked, `h` is a
    // multiple of 8, so the owner slot at `p - 8` is inside it and aligned.
    unsafe {
        let p = base.add(h);
        std::ptr::write_volatile(p.sub(8) as *mut *const AtomicI64, owner);
        (*owner).fetch_add(layout.size() as i64, Ordering::Relaxed);
        p
    }
}

/// SAFETY (for callers): `ptr` came from this allocator with `layout`.
///
/// The header lies *before* the pointer handed out, outside the object the compiler was
/// told about: `__rust_alloc` is an allocator function to LLVM, so where an allocation
/// and its free were both inlined into one function, LLVM treated this read as out of
/// bounds and folded it to garbage (release builds segfaulted on every WebSocket upgrade:
/// the header read of a just-freed `String` became a stale register). `black_box` hides
/// the pointer's origin and the read is volatile, so the load is always performed; the
/// allocator's entry points are also never inlined into their callers.
#[inline(always)]
unsafe fn owner_of(ptr: *mut u8) -> *const AtomicI64 {
    let ptr = std::hint::black_box(ptr);
    // SAFETY: `finish` wrote the owner just before `ptr`, inside the block `System` gave.
    unsafe { std::ptr::read_volatile(ptr.sub(8) as *const *const AtomicI64) }
}

// SAFETY: every block comes from `System` with room for the header in front; counting
// only touches atomics that live for the rest of the process (`OTHER`, or counters
// leaked by `watch_this_thread`).
unsafe impl GlobalAlloc for CountingAlloc {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(o) = outer(&layout) else {
            return std::ptr::null_mut();
        };
        unsafe { finish(System.alloc(o), &layout) }
    }
    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let Some(o) = outer(&layout) else {
            return std::ptr::null_mut();
        };
        unsafe { finish(System.alloc_zeroed(o), &layout) }
    }
    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header(&layout);
        unsafe {
            let owner = owner_of(ptr);
            (*owner).fetch_sub(layout.size() as i64, Ordering::Relaxed);
            // `outer` succeeded for this layout when it was allocated.
            let o = Layout::from_size_align_unchecked(layout.size() + h, h);
            System.dealloc(ptr.sub(h), o);
        }
    }
    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let h = header(&layout);
        let Some(new_outer) = new_size.checked_add(h) else {
            return std::ptr::null_mut();
        };
        unsafe {
            let old_owner = owner_of(ptr);
            let o = Layout::from_size_align_unchecked(layout.size() + h, h);
            let base = System.realloc(ptr.sub(h), o, new_outer);
            if base.is_null() {
                return base;
            }
            // The block now belongs to whoever grew it (the old owner no longer holds it).
            (*old_owner).fetch_sub(layout.size() as i64, Ordering::Relaxed);
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            finish(base, &new_layout)
        }
    }
}

/// Starts counting the calling thread's allocations on a counter of its own (slot
/// threads); returns the counter.
pub fn watch_this_thread() -> &'static AtomicI64 {
    let counter: &'static AtomicI64 = Box::leak(Box::new(AtomicI64::new(0)));
    COUNTER.with(|c| c.set(counter as *const AtomicI64));
    counter
}

/// Live heap bytes allocated by threads that are not slots (see [`OTHER`]).
pub fn other_heap_bytes() -> u64 {
    let sum: i64 = OTHER.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
    sum.max(0) as u64
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

/// Figures shared between the scheduler (reservations, what jobs use), the monitor
/// (RSS, the rest) and /health.
#[derive(Debug)]
pub struct Budget {
    pub budget_bytes: u64,
    pub reserved_bytes: AtomicU64,
    pub rss_bytes: AtomicU64,
    /// RSS when the pool started: the server's own footprint, not charged to jobs.
    pub baseline_bytes: AtomicU64,
    /// Heap the running jobs hold beyond what their slots held when they started
    /// (published by the scheduler every tick): what the budget rule judges.
    pub jobs_bytes: AtomicU64,
    /// RSS not held by running jobs: connections, HTTP handlers and their contexts,
    /// warm job contexts, allocator slack (published by the monitor).
    pub other_bytes: AtomicU64,
}

impl Budget {
    pub fn new(budget_bytes: u64) -> Arc<Budget> {
        let rss = rss_bytes();
        Arc::new(Budget {
            budget_bytes,
            reserved_bytes: AtomicU64::new(0),
            rss_bytes: AtomicU64::new(rss),
            baseline_bytes: AtomicU64::new(rss),
            jobs_bytes: AtomicU64::new(0),
            other_bytes: AtomicU64::new(rss),
        })
    }

    pub fn available(&self) -> u64 {
        self.budget_bytes
            .saturating_sub(self.reserved_bytes.load(Ordering::SeqCst))
    }
}

/// One monitor sample.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub rss: u64,
    /// What running jobs hold (see [`Budget::jobs_bytes`]).
    pub jobs: u64,
    /// RSS when the pool started.
    pub baseline: u64,
}

/// How the monitor judges samples; kept apart from the thread so it is testable.
#[derive(Debug, Default)]
pub struct OverrunTracker {
    over_since: Option<Instant>,
    warned: bool,
    /// The process is over baseline + budget while jobs are not: reported once per
    /// crossing, as memory that is not jobs'.
    others_noted: bool,
}

/// What the monitor should do after a sample.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Fine,
    /// Jobs crossed 80% of the budget (reported once per crossing).
    Warn,
    /// Jobs held more than the budget for the grace period: stop a job.
    Stop,
    /// The process grew past baseline + budget, but not through jobs (connections,
    /// HTTP contexts): say so once per crossing, and stop nothing.
    NotJobs,
}

pub const GRACE: Duration = Duration::from_millis(500);

impl OverrunTracker {
    /// Judges one sample: jobs against the budget, the rest of the process apart.
    pub fn sample(&mut self, s: Sample, budget: u64, now: Instant) -> Verdict {
        if s.jobs > budget {
            let since = *self.over_since.get_or_insert(now);
            if now.duration_since(since) >= GRACE {
                // Give the stop time to take effect before judging again.
                self.over_since = Some(now);
                return Verdict::Stop;
            }
        } else {
            self.over_since = None;
        }
        if s.jobs * 10 > budget * 8 {
            if !self.warned {
                self.warned = true;
                return Verdict::Warn;
            }
        } else {
            self.warned = false;
        }
        if s.rss > s.baseline + budget && s.jobs <= budget {
            if !self.others_noted {
                self.others_noted = true;
                return Verdict::NotJobs;
            }
        } else if s.rss <= s.baseline + budget {
            self.others_noted = false;
        }
        Verdict::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rss: u64, jobs: u64) -> Sample {
        Sample {
            rss,
            jobs,
            baseline: 100,
        }
    }

    /// What `2 * STRIPES` threads holding 1 MB each add to the sum of the stripes.
    fn held_by_threads_on_every_stripe() -> u64 {
        let before = other_heap_bytes();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let hold_rx = Arc::new(std::sync::Mutex::new(hold_rx));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let threads: Vec<_> = (0..2 * STRIPES)
            .map(|_| {
                let (hold_rx, ready_tx) = (hold_rx.clone(), ready_tx.clone());
                std::thread::spawn(move || {
                    let block = vec![1u8; 1 << 20];
                    let _ = ready_tx.send(());
                    let _ = hold_rx.lock().map(|rx| rx.recv());
                    drop(block);
                })
            })
            .collect();
        for _ in 0..2 * STRIPES {
            ready_rx.recv().expect("thread ready");
        }
        let held = other_heap_bytes().saturating_sub(before);
        drop(hold_tx);
        for t in threads {
            t.join().expect("thread");
        }
        held
    }

    #[test]
    fn heap_of_threads_on_any_stripe_is_summed() {
        // Other tests of this process allocate and free meanwhile (a test that frees
        // 10 MB it took before `before` hides 10 MB): a margin, and three tries, of
        // which one must see every thread's block. A stripe left out of the sum loses
        // its threads' megabytes in every try.
        let want = (2 * STRIPES as u64 - 8) << 20;
        let tries: Vec<u64> = (0..3).map(|_| held_by_threads_on_every_stripe()).collect();
        assert!(
            tries.iter().any(|&h| h >= want),
            "held {tries:?}, want {want}"
        );
    }

    #[test]
    fn overrun_needs_the_grace_period() {
        let mut t = OverrunTracker::default();
        let t0 = Instant::now();
        let budget = 1000;
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(t.sample(s(500, 400), budget, t0), Verdict::Fine);
        assert_eq!(t.sample(s(900, 850), budget, t0), Verdict::Warn);
        assert_eq!(t.sample(s(1200, 1050), budget, t0), Verdict::Fine);
        assert_eq!(t.sample(s(1200, 1050), budget, ms(400)), Verdict::Fine);
        assert_eq!(t.sample(s(1200, 1050), budget, ms(500)), Verdict::Stop);
        // Dropping below resets the clock.
        assert_eq!(t.sample(s(500, 400), budget, ms(600)), Verdict::Fine);
        assert_eq!(t.sample(s(1200, 1050), budget, ms(700)), Verdict::Warn);
        assert_eq!(t.sample(s(1200, 1050), budget, ms(1100)), Verdict::Fine);
    }

    #[test]
    fn memory_that_is_not_jobs_never_stops_a_job() {
        let mut t = OverrunTracker::default();
        let t0 = Instant::now();
        let budget = 1000;
        // 1,000 WebSocket clients: the process is far over baseline + budget, jobs
        // hold nothing. Said once, never a stop however long it lasts.
        assert_eq!(t.sample(s(5000, 0), budget, t0), Verdict::NotJobs);
        for n in 1..50 {
            let v = t.sample(s(5000, 0), budget, t0 + Duration::from_millis(100 * n));
            assert_eq!(v, Verdict::Fine, "sample {n}");
        }
        // Back under, then over again: said again.
        assert_eq!(t.sample(s(900, 0), budget, t0), Verdict::Fine);
        assert_eq!(t.sample(s(5000, 0), budget, t0), Verdict::NotJobs);
    }

    #[test]
    fn a_free_on_another_thread_credits_the_allocating_thread() {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (counter, before) = std::thread::spawn(move || {
            let counter = watch_this_thread();
            let before = counter.load(Ordering::Relaxed);
            // Handed to another thread, as a log line goes to the store writer.
            tx.send(vec![7u8; 4 << 20]).expect("send");
            (counter, before)
        })
        .join()
        .expect("thread");
        let freer = std::thread::spawn(move || {
            let other = watch_this_thread();
            let v = rx.recv().expect("recv");
            let at = other.load(Ordering::Relaxed);
            drop(v);
            (at, other.load(Ordering::Relaxed))
        })
        .join()
        .expect("thread");
        let left = counter.load(Ordering::Relaxed) - before;
        assert!(
            left < 1 << 20,
            "the allocating job still holds {left} bytes"
        );
        assert!(
            (freer.0 - freer.1).abs() < 1 << 20,
            "the freeing thread was credited: {freer:?}"
        );
    }

    #[test]
    fn realloc_keeps_the_count_and_the_bytes() {
        std::thread::spawn(|| {
            let counter = watch_this_thread();
            let before = counter.load(Ordering::Relaxed);
            let mut v: Vec<u64> = Vec::with_capacity(4);
            for i in 0..100_000u64 {
                v.push(i);
            }
            assert!(v.iter().enumerate().all(|(i, x)| *x == i as u64));
            let held = counter.load(Ordering::Relaxed) - before;
            assert!(held >= 800_000, "{held}");
            drop(v);
            let left = counter.load(Ordering::Relaxed) - before;
            assert!(left < 64 << 10, "{left}");
        })
        .join()
        .expect("thread");
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
