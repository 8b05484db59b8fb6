//! The single writer thread: batches writes into transactions, keeps background writes
//! that fail for a transient reason (disk full, I/O error, locked) and retries them in
//! order with backoff, fails waited writes fast while the store cannot write, and
//! truncates the WAL after bursts and when the disk runs low. Also the test hooks that
//! simulate those faults (active only with `FAZT_TEST_HOOKS=1`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::Connection;

use super::{now_ms, Error, Result};

/// Most writes one transaction takes: enough to amortise fsync, small enough that a
/// durable caller never waits long behind a flood of log lines.
const MAX_BATCH: usize = 512;
/// How long a lone background write (job state transitions, log lines) waits for more
/// before its batch commits: short beside what a reader of job states polls at, long
/// enough that a busy pool's transitions share a commit (see `Writer::coalesce`).
const COALESCE: Duration = Duration::from_millis(2);
/// Background writes that may be shed (log lines, progress) kept at most while the store
/// cannot write; state transitions are never shed.
pub(super) const LOSSY_CAP: usize = 20_000;
/// First retry delay after a failed batch; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(20);
/// Low, so recovery is noticed soon; a failing attempt costs little (it fails at the
/// first write that needs space).
const RETRY_MAX: Duration = Duration::from_millis(250);
/// A caller waiting on a write may trigger a retry this soon after the last attempt, so
/// the first spawn after the disk frees up succeeds instead of waiting out the backoff.
const PROBE_GAP: Duration = Duration::from_millis(50);
/// A WAL at least this big is truncated at the next idle moment: SQLite's automatic
/// checkpoint (1,000 pages, ~4 MB) reuses the file but never shrinks it.
const WAL_BURST: u64 = 4 << 20;
/// Truncated even while busy: a reader kept the automatic checkpoint from resetting it.
const WAL_HUGE: u64 = 64 << 20;
/// Below this much free disk space the WAL is truncated at every idle moment.
const LOW_SPACE: u64 = 64 << 20;
/// Least time between two truncations (and between two free-space samples).
const WAL_GAP: Duration = Duration::from_secs(1);

/// What happened to one write op.
pub(super) enum OpResult {
    Ok,
    /// Failed on its own merits (constraint, bad input): rolled back alone, not retried.
    Failed,
    /// Failed because the store cannot write now: the whole batch is retried later.
    Transient(String),
}

/// A write op. Background ops may run more than once (a batch that failed transiently
/// is rolled back and run again), so they must compute their values up front.
pub(super) type WriteFn = Box<dyn FnMut(&Connection) -> OpResult + Send>;

/// Told the commit outcome of the batch that held a write, on the writer thread, once:
/// it must not block (it only sends on channels that never fill, or tries to).
pub(super) type Done = Box<dyn FnOnce(Result<()>) + Send>;

/// How a write is treated when the store cannot write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A caller waits for it (spawn, deploy, checkpoint, kv): it fails fast with
    /// [`Error::Unavailable`], and the caller decides.
    Waited,
    /// A job state transition: kept and retried, in order, until it commits.
    Transition,
    /// Progress and log lines: kept and retried like transitions, but shed past
    /// [`LOSSY_CAP`] so a job logging in a loop cannot exhaust memory.
    Lossy,
}

/// One unit of work for the writer thread.
pub(super) struct WriteReq {
    pub op: WriteFn,
    pub kind: Kind,
    /// Commit this batch with `synchronous=FULL` (checkpoints, deploys): the caller is
    /// told "done" only once the data would survive a power cut, not just a crash.
    pub durable: bool,
    /// Told the commit outcome after the batch holding `op` commits (or fails).
    pub done: Option<Done>,
}

/// The writer's condition, shared with /health and /metrics.
#[derive(Default)]
pub(super) struct Shared {
    /// When writes started failing (ms since the epoch); 0 while they succeed.
    failing_since_ms: AtomicI64,
    last_error: Mutex<String>,
    pending: AtomicUsize,
    pending_transitions: AtomicUsize,
    failed_batches: AtomicU64,
    shed_writes: AtomicU64,
    wal_truncations: AtomicU64,
    wal_bytes: AtomicU64,
    /// Free bytes on the data dir's file system; u64::MAX until first sampled.
    free_bytes: AtomicU64,
    pub hooks: TestHooks,
}

/// Faults the integration tests inject without root. Compiled in, but the endpoint that
/// sets them answers only when the server was started with `FAZT_TEST_HOOKS=1`.
#[derive(Default)]
pub(super) struct TestHooks {
    /// Every batch fails as on a full disk (in WAL mode every write appends to the WAL,
    /// so a full disk fails them all).
    pub fail_writes: AtomicBool,
    /// `PRAGMA max_page_count` for the writer (0: no limit): growing the database past
    /// it fails with SQLITE_FULL, like a full disk.
    pub max_page_count: AtomicI64,
    /// Bumped by every change, so the writer applies `max_page_count` once.
    pub version: AtomicU64,
}

/// What /health and /metrics show about the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStatus {
    /// False while writes fail: the server is degraded.
    pub writable: bool,
    /// Why writes fail, and since when (ms since the epoch).
    pub reason: Option<String>,
    pub failing_since_ms: Option<i64>,
    /// Writes kept for retry, and how many of them are job state transitions.
    pub pending_writes: usize,
    pub pending_transitions: usize,
    /// Free bytes on the data dir's file system (None: unknown).
    pub free_bytes: Option<u64>,
    pub wal_bytes: u64,
    pub failed_batches: u64,
    /// Log lines and progress updates shed while the store could not write.
    pub shed_writes: u64,
    pub wal_truncations: u64,
}

impl Shared {
    pub fn status(&self) -> StoreStatus {
        let since = self.failing_since_ms.load(Ordering::SeqCst);
        let free = self.free_bytes.load(Ordering::Relaxed);
        StoreStatus {
            writable: since == 0,
            reason: (since != 0).then(|| {
                self.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            }),
            failing_since_ms: (since != 0).then_some(since),
            pending_writes: self.pending.load(Ordering::Relaxed),
            pending_transitions: self.pending_transitions.load(Ordering::Relaxed),
            free_bytes: (free != u64::MAX).then_some(free),
            wal_bytes: self.wal_bytes.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            shed_writes: self.shed_writes.load(Ordering::Relaxed),
            wal_truncations: self.wal_truncations.load(Ordering::Relaxed),
        }
    }

    pub fn degraded(&self) -> bool {
        self.failing_since_ms.load(Ordering::SeqCst) != 0
    }

    pub fn new() -> Shared {
        Shared {
            free_bytes: AtomicU64::new(u64::MAX),
            ..Default::default()
        }
    }
}

/// Delay before retry number `failures` (1-based) of a failed batch.
pub fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    (RETRY_FIRST * factor).min(RETRY_MAX)
}

/// When the writer tries again after failed batches. A pure policy over `now`.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    failures: u32,
    last_attempt: Option<Instant>,
}

impl Backoff {
    pub fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.last_attempt = Some(now);
    }

    pub fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    pub fn failing(&self) -> bool {
        self.failures > 0
    }

    /// When the next retry is due (None: writes succeed, nothing to wait for).
    pub fn next_retry(&self) -> Option<Instant> {
        let last = self.last_attempt?;
        (self.failures > 0).then(|| last + retry_delay(self.failures))
    }

    /// Whether to try a batch now; `waited` says a caller is waiting on a write, which
    /// may probe sooner than the backoff so recovery is noticed at once.
    pub fn due(&self, now: Instant, waited: bool) -> bool {
        match (self.next_retry(), self.last_attempt) {
            (None, _) => true,
            (Some(at), Some(last)) => now >= at || (waited && now >= last + PROBE_GAP),
            (Some(at), None) => now >= at,
        }
    }
}

/// Whether to run `wal_checkpoint(TRUNCATE)` now. `idle`: nothing is queued.
pub fn should_truncate_wal(
    wal_bytes: u64,
    free_bytes: Option<u64>,
    since_last: Duration,
    idle: bool,
) -> bool {
    if wal_bytes == 0 || since_last < WAL_GAP {
        return false;
    }
    if wal_bytes >= WAL_HUGE {
        return true;
    }
    idle && (wal_bytes >= WAL_BURST || free_bytes.is_some_and(|f| f < LOW_SPACE))
}

/// Whether a SQLite error means "cannot write now" rather than "this write is wrong".
pub(super) fn transient_sqlite(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    matches!(
        e.sqlite_error_code(),
        Some(
            C::DiskFull
                | C::SystemIoFailure
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::OutOfMemory
                | C::CannotOpen
        )
    )
}

/// Free bytes for unprivileged users on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        Some((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    conn: Connection,
    rx: Receiver<WriteReq>,
    shared: Arc<Shared>,
    /// Writes received and not yet committed, in arrival order. Normally at most one
    /// batch; while the store cannot write, every background write waits here.
    queue: VecDeque<WriteReq>,
    /// How many queued writes are of each kind, kept on push and pop so the loop
    /// never scans a long queue.
    lossy: usize,
    transitions: usize,
    waited: usize,
    backoff: Backoff,
    db_path: PathBuf,
    wal_path: PathBuf,
    data_dir: PathBuf,
    last_truncate: Instant,
    last_free_sample: Option<Instant>,
    hooks_seen: u64,
    /// Runs small maintenance steps (retention) when the writer is idle; returns
    /// whether more work is left right away.
    janitor: Box<dyn FnMut(&Connection) -> bool + Send>,
    next_janitor: Instant,
    /// Wakes the checkpointer thread, which copies the WAL into the database file on its
    /// own connection (see [`Checkpointer`]).
    checkpointer: Option<Checkpointer>,
    last_checkpoint: Instant,
}

/// While writes come in, the checkpointer copies what they added to the WAL into the
/// database file this often (SQLite's automatic checkpoint did it every 1,000 pages,
/// inside a commit).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// A thread that runs passive WAL checkpoints on its own connection when the writer
/// says the WAL grew. SQLite's automatic checkpoint ran inside the commit that crossed
/// 1,000 pages, on the writer thread: every ~300 ms at 200 spawns/s a commit took 3-8 ms
/// longer (copying pages and an fsync of the database file), and a spawn waiting for
/// it with it. A passive checkpoint never blocks the writer; a WAL it could not finish
/// is the writer's truncating checkpoint's business when idle, as before.
struct Checkpointer {
    wake: crossbeam_channel::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(db_path: &Path) -> Option<Checkpointer> {
        let conn = match super::open_conn(db_path, false) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("no checkpointer connection ({e}); the writer checkpoints itself");
                return None;
            }
        };
        let (wake, rx) = crossbeam_channel::bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("fazt-store-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        log::debug!("passive WAL checkpoint failed: {e}");
                    }
                }
            });
        match thread {
            Ok(thread) => Some(Checkpointer { wake, thread }),
            Err(e) => {
                log::warn!("no checkpointer thread ({e}); the writer checkpoints itself");
                None
            }
        }
    }
}

/// Time between janitor steps when the last one found nothing left to do.
const JANITOR_PERIOD: Duration = Duration::from_secs(2);

impl Writer {
    pub fn new(
        conn: Connection,
        rx: Receiver<WriteReq>,
        shared: Arc<Shared>,
        db_path: &Path,
        janitor: Box<dyn FnMut(&Connection) -> bool + Send>,
    ) -> Writer {
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        let now = Instant::now();
        Writer {
            conn,
            rx,
            shared,
            queue: VecDeque::new(),
            lossy: 0,
            transitions: 0,
            waited: 0,
            backoff: Backoff::default(),
            db_path: db_path.to_path_buf(),
            wal_path: PathBuf::from(wal),
            data_dir: db_path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            last_truncate: now,
            last_free_sample: None,
            hooks_seen: 0,
            janitor,
            next_janitor: now + Duration::from_millis(500),
            checkpointer: None,
            last_checkpoint: now,
        }
    }

    fn push(&mut self, req: WriteReq) {
        match req.kind {
            Kind::Lossy if self.lossy >= LOSSY_CAP => {
                self.shared.shed_writes.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Kind::Lossy => self.lossy += 1,
            Kind::Transition => self.transitions += 1,
            Kind::Waited => self.waited += 1,
        }
        self.queue.push_back(req);
    }

    fn pop(&mut self) -> Option<WriteReq> {
        let req = self.queue.pop_front()?;
        match req.kind {
            Kind::Lossy => self.lossy -= 1,
            Kind::Transition => self.transitions -= 1,
            Kind::Waited => self.waited -= 1,
        }
        Some(req)
    }

    fn publish(&self) {
        self.shared
            .pending
            .store(self.queue.len(), Ordering::Relaxed);
        self.shared
            .pending_transitions
            .store(self.transitions, Ordering::Relaxed);
    }

    pub fn run(mut self) {
        self.checkpointer = Checkpointer::start(&self.db_path);
        if self.checkpointer.is_some() {
            if let Err(e) = self.conn.execute_batch("PRAGMA wal_autocheckpoint=0;") {
                log::warn!("could not move WAL checkpoints off the writer: {e}");
            }
        }
        loop {
            // Wait for work: forever while all is written, until the next retry while
            // writes are pending, and until the next janitor step while idle.
            let fresh = self.queue.is_empty();
            if fresh {
                let wait = self.next_janitor.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(wait) {
                    Ok(r) => self.push(r),
                    Err(RecvTimeoutError::Timeout) => {
                        self.janitor_step();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else if let Some(at) = self.backoff.next_retry() {
                if !self.backoff.due(Instant::now(), self.has_waited()) {
                    match self.rx.recv_deadline(at) {
                        Ok(r) => self.push(r),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            // While writes fail, keep draining so producers (the scheduler above all)
            // never block on the channel; otherwise take at most a batch.
            if fresh {
                self.coalesce();
            }
            while self.backoff.failing() || self.queue.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(r) => self.push(r),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if !self.backoff.due(now, self.has_waited()) {
                if self.has_waited() {
                    self.fail_waited();
                }
                self.publish();
                continue;
            }
            self.commit_next();
            self.publish();
            self.maintain();
        }
        self.drain_at_shutdown();
        if let Some(c) = self.checkpointer.take() {
            drop(c.wake);
            let _ = c.thread.join();
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            log::warn!("final WAL checkpoint failed: {e}");
        }
    }

    /// The first write after an idle moment is a background one (a scheduler turn's
    /// transitions, a log line): wait up to [`COALESCE`] for company before committing.
    /// A commit writes every page it touched once, so the transitions of many turns in
    /// one commit cost little more than one turn's; a write someone waits for ends the
    /// wait at once, so spawns, deploys, checkpoints and flushes never wait here.
    fn coalesce(&mut self) {
        if self.backoff.failing() {
            return;
        }
        let until = Instant::now() + COALESCE;
        while !self.has_waited() && self.queue.len() < MAX_BATCH {
            match self.rx.recv_deadline(until) {
                Ok(r) => self.push(r),
                Err(_) => break,
            }
        }
    }

    fn has_waited(&self) -> bool {
        self.waited > 0
    }

    /// Answers every waiting caller with "cannot write now"; background writes stay.
    fn fail_waited(&mut self) {
        let reason = self.reason();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut waiting = Vec::new();
        for req in self.queue.drain(..) {
            if req.kind == Kind::Waited {
                waiting.extend(req.done);
            } else {
                kept.push_back(req);
            }
        }
        self.queue = kept;
        self.waited = 0;
        self.publish();
        for done in waiting {
            done(Err(Error::Unavailable(reason.clone())));
        }
    }

    fn reason(&self) -> String {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Commits the oldest batch; on a transient failure puts its background writes back
    /// in front, in order, and fails its waited writes.
    fn commit_next(&mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH.min(self.queue.len()));
        while batch.len() < MAX_BATCH {
            match self.pop() {
                Some(r) => batch.push(r),
                None => break,
            }
        }
        if batch.is_empty() {
            return;
        }
        self.apply_hooks();
        let retried = self.backoff.failing();
        let started = Instant::now();
        match commit_batch(&self.conn, &mut batch, &self.shared.hooks) {
            Ok(()) => {
                crate::metrics::global().store_committed(started.elapsed());
                // Counts first: /health must not say "ok" beside stale pending figures.
                self.publish();
                if retried {
                    let since = self.shared.failing_since_ms.swap(0, Ordering::SeqCst);
                    log::info!(
                        "store: writes succeed again after {} ms; {} pending write(s) left",
                        now_ms() - since,
                        self.queue.len()
                    );
                    // Space just came back: give the WAL's share of it back too.
                    self.truncate_wal();
                }
                self.backoff.succeeded();
                self.publish();
                for req in batch {
                    if let Some(done) = req.done {
                        done(Ok(()));
                    }
                }
            }
            Err(reason) => {
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                if !self.backoff.failing() {
                    log::error!(
                        "store: a write batch failed ({reason}); keeping {} background write(s) and retrying with backoff",
                        batch.iter().filter(|r| r.kind != Kind::Waited).count()
                    );
                    let _ = self.shared.failing_since_ms.compare_exchange(
                        0,
                        now_ms().max(1),
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
                *self
                    .shared
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = reason.clone();
                self.backoff.failed(Instant::now());
                let mut waiting = Vec::new();
                for req in batch.into_iter().rev() {
                    match req.kind {
                        Kind::Waited => waiting.extend(req.done),
                        Kind::Lossy => {
                            self.lossy += 1;
                            self.queue.push_front(req);
                        }
                        Kind::Transition => {
                            self.transitions += 1;
                            self.queue.push_front(req);
                        }
                    }
                }
                // Callers learn of the failure only once /health can show it.
                self.publish();
                for done in waiting {
                    done(Err(Error::Unavailable(reason.clone())));
                }
                // A full disk may be the WAL's doing: try to give its space back.
                if self.last_truncate.elapsed() >= WAL_GAP {
                    self.truncate_wal();
                }
            }
        }
    }

    fn apply_hooks(&mut self) {
        let hooks = &self.shared.hooks;
        let v = hooks.version.load(Ordering::SeqCst);
        if v == self.hooks_seen {
            return;
        }
        self.hooks_seen = v;
        let n = hooks.max_page_count.load(Ordering::SeqCst);
        let n = if n <= 0 { 1_073_741_823 } else { n };
        if let Err(e) = self
            .conn
            .query_row(&format!("PRAGMA max_page_count = {n}"), [], |r| {
                r.get::<_, i64>(0)
            })
        {
            log::warn!("test hook: setting max_page_count failed: {e}");
        }
    }

    /// Samples the WAL size and free space, and truncates the WAL when the policy says.
    fn maintain(&mut self) {
        let now = Instant::now();
        let wal = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len());
        self.shared.wal_bytes.store(wal, Ordering::Relaxed);
        if now.duration_since(self.last_checkpoint) >= CHECKPOINT_EVERY {
            if let Some(c) = &self.checkpointer {
                self.last_checkpoint = now;
                // Full: a wake-up is already pending.
                let _ = c.wake.try_send(());
            }
        }
        if self
            .last_free_sample
            .is_none_or(|t| now.duration_since(t) >= WAL_GAP)
        {
            self.last_free_sample = Some(now);
            if let Some(f) = free_bytes(&self.data_dir) {
                self.shared.free_bytes.store(f, Ordering::Relaxed);
            }
        }
        let free = self.shared.free_bytes.load(Ordering::Relaxed);
        let idle = self.queue.is_empty() && self.rx.is_empty();
        if should_truncate_wal(
            wal,
            (free != u64::MAX).then_some(free),
            now.duration_since(self.last_truncate),
            idle,
        ) {
            self.truncate_wal();
        }
    }

    fn truncate_wal(&mut self) {
        self.last_truncate = Instant::now();
        // A truncating checkpoint waits for readers; never hold up writes long for it.
        let _ = self.conn.busy_timeout(Duration::from_millis(100));
        let res = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
        let _ = self.conn.busy_timeout(Duration::from_secs(10));
        match res {
            // The first column is 1 when readers kept the checkpoint from finishing.
            Ok(0) => {
                self.shared.wal_truncations.fetch_add(1, Ordering::Relaxed);
                let wal = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len());
                self.shared.wal_bytes.store(wal, Ordering::Relaxed);
            }
            Ok(_) => log::debug!("WAL checkpoint could not finish: readers were active"),
            Err(e) => log::debug!("WAL checkpoint failed: {e}"),
        }
    }

    fn janitor_step(&mut self) {
        if self.backoff.failing() {
            self.next_janitor = Instant::now() + JANITOR_PERIOD;
            return;
        }
        let more = (self.janitor)(&self.conn);
        // More left: come back soon, but only when no other write is waiting, so
        // pruning never holds up the writes users wait for.
        self.next_janitor = Instant::now()
            + if more {
                Duration::from_millis(20)
            } else {
                JANITOR_PERIOD
            };
        self.maintain();
    }

    /// The channel is closed: try to commit what is pending for a few seconds.
    fn drain_at_shutdown(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.queue.is_empty() && Instant::now() < deadline {
            if !self.backoff.due(Instant::now(), false) {
                if let Some(at) = self.backoff.next_retry() {
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                }
                continue;
            }
            self.commit_next();
        }
        if !self.queue.is_empty() {
            log::error!(
                "store: {} write(s) could not be committed before shutdown ({})",
                self.queue.len(),
                self.reason()
            );
        }
        self.publish();
    }
}

/// Runs `batch` in one transaction, each op in its own savepoint so an op that fails on
/// its own merits is rolled back alone. Returns the reason when the batch as a whole
/// could not commit (everything rolled back).
fn commit_batch(
    conn: &Connection,
    batch: &mut [WriteReq],
    hooks: &TestHooks,
) -> std::result::Result<(), String> {
    let durable = batch.iter().any(|r| r.durable);
    let sql = |c: &Connection, s: &str| c.execute_batch(s).map_err(|e| e.to_string());
    let outcome = (|| -> std::result::Result<(), String> {
        if hooks.fail_writes.load(Ordering::SeqCst) {
            return Err("database or disk is full (simulated by FAZT_TEST_HOOKS)".into());
        }
        if durable {
            sql(conn, "PRAGMA synchronous=FULL")?;
        }
        sql(conn, "BEGIN IMMEDIATE")?;
        // One savepoint name for every op (each is released before the next begins),
        // so its three statements are prepared once, not parsed per op.
        let cached = |c: &Connection, s: &str| {
            c.prepare_cached(s)
                .and_then(|mut st| st.execute([]))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for req in batch.iter_mut() {
            cached(conn, "SAVEPOINT op")?;
            let op = &mut req.op;
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(conn)))
                .unwrap_or_else(|_| {
                    log::error!("a store write panicked; rolled back that write only");
                    OpResult::Failed
                });
            match res {
                OpResult::Ok => {}
                OpResult::Failed => cached(conn, "ROLLBACK TO op")?,
                OpResult::Transient(reason) => return Err(reason),
            }
            cached(conn, "RELEASE op")?;
        }
        sql(conn, "COMMIT")
    })();
    if outcome.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    if durable {
        if let Err(e) = conn.execute_batch("PRAGMA synchronous=NORMAL") {
            log::warn!("could not restore synchronous=NORMAL: {e}");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let ms: Vec<u128> = (1..=8).map(|n| retry_delay(n).as_millis()).collect();
        assert_eq!(ms, vec![20, 40, 80, 160, 250, 250, 250, 250]);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn backoff_waits_then_allows_a_retry() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.due(t0, false), "healthy: always due");
        b.failed(t0);
        assert!(!b.due(t0 + Duration::from_millis(10), false));
        assert!(b.due(t0 + Duration::from_millis(20), false));
        b.failed(t0 + Duration::from_millis(20));
        assert_eq!(b.next_retry(), Some(t0 + Duration::from_millis(60)));
        b.succeeded();
        assert!(!b.failing());
        assert_eq!(b.next_retry(), None);
    }

    #[test]
    fn a_waiting_caller_probes_before_the_backoff_ends() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.failed(t0);
        }
        let soon = t0 + Duration::from_millis(60);
        assert!(
            !b.due(soon, false),
            "background writes wait out the backoff"
        );
        assert!(b.due(soon, true), "a waited write probes after PROBE_GAP");
        assert!(!b.due(t0 + Duration::from_millis(10), true));
    }

    #[test]
    fn wal_truncation_policy() {
        let s = Duration::from_secs(2);
        assert!(
            !should_truncate_wal(0, Some(1), s, true),
            "nothing to give back"
        );
        assert!(
            should_truncate_wal(WAL_BURST, None, s, true),
            "after a burst"
        );
        assert!(
            !should_truncate_wal(WAL_BURST, None, s, false),
            "not while busy"
        );
        assert!(
            should_truncate_wal(WAL_HUGE, None, s, false),
            "huge: even busy"
        );
        assert!(
            !should_truncate_wal(WAL_HUGE, None, Duration::from_millis(10), true),
            "rate-limited"
        );
        assert!(
            should_truncate_wal(4096, Some(LOW_SPACE - 1), s, true),
            "low disk"
        );
        assert!(!should_truncate_wal(4096, Some(LOW_SPACE * 4), s, true));
    }

    #[test]
    fn full_and_io_errors_are_transient_constraint_errors_are_not() {
        let c = Connection::open_in_memory().expect("db");
        c.execute_batch("CREATE TABLE t(x INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
            .expect("schema");
        let dup = c
            .execute("INSERT INTO t VALUES (1)", [])
            .expect_err("duplicate");
        assert!(!transient_sqlite(&dup));
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(transient_sqlite(&full));
        let io = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_WRITE),
            None,
        );
        assert!(transient_sqlite(&io));
    }
}
