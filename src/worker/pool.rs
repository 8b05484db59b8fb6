//! The worker pool: one scheduler thread owns all slot and queue state; slot threads
//! run jobs and report back over a channel; a monitor thread samples RSS. Handlers and
//! the HTTP API talk to the scheduler through [`Pool`], never to slots directly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use super::budget::{self, Budget, OverrunTracker, Sample, Verdict};
use super::queue::{self, Queue};
use super::slot::{self, Outcome, RunJob, SlotMsg};
use super::Env;
use super::{JobConfig, Status};
use crate::js::{Interrupt, Reason};
use crate::realtime::Listeners;
use crate::store::{JobRow, Store};

/// Limits of the pool, all enforced by the scheduler.
#[derive(Debug, Clone)]
pub struct Limits {
    pub slots: usize,
    pub per_app_running: usize,
    pub per_app_daemons: usize,
    pub queue_per_app: i64,
    pub memory_budget: u64,
    /// How long a stopped job may take to actually stop before its slot is abandoned.
    pub watchdog: Duration,
    /// On graceful shutdown, how long running non-daemon jobs may take to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            slots: 20,
            per_app_running: 5,
            per_app_daemons: 2,
            queue_per_app: 1000,
            memory_budget: super::MEMORY_BUDGET,
            watchdog: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Cooperative part of a cancel: `job.cancelled` turns true and `job.sleep` returns at
/// once; after this grace the JS is stopped for real.
const CANCEL_GRACE: Duration = Duration::from_millis(40);
/// An idle stop is not urgent: the job gets this long to return by itself.
const IDLE_GRACE: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(10);
/// Events the scheduler takes in one go before it schedules.
const EVENT_BATCH: usize = 256;
/// Daemons: backoff 1 s, 2 s, 4 s … capped here, reset after `HEALTHY` of running.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const HEALTHY: Duration = Duration::from_secs(300);
/// How long a cancel of a job the scheduler has not seen waits for that job's enqueue
/// (which follows the spawn's commit at once) before answering the caller anyway.
const EARLY_CANCEL_REPLY: Duration = Duration::from_millis(200);
/// How long such a cancel is remembered.
const EARLY_CANCEL_KEEP: Duration = Duration::from_secs(60);

/// Delay before restart number `streak` (1-based) of a failing daemon.
pub fn backoff_delay(streak: u32) -> Duration {
    let secs = 1u64 << streak.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(BACKOFF_MAX)
}

/// Live figures for /health and /metrics, written by the scheduler only.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub running: AtomicUsize,
    pub queued: AtomicUsize,
    pub daemons: AtomicUsize,
    pub started_total: AtomicUsize,
    pub abandoned_slots: AtomicUsize,
}

pub(crate) enum Msg {
    Enqueue(Box<Queued>),
    Cancel {
        id: String,
        reply: Sender<()>,
    },
    Finished {
        slot: usize,
        gen: u64,
        outcome: Outcome,
    },
    OverBudget,
    Shutdown(Sender<()>),
}

/// A job waiting to run (or re-run).
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub id: String,
    pub app: String,
    pub path: String,
    pub config: JobConfig,
    pub data: Option<String>,
    /// Whether the job was spawned with data: one without skips the read at dispatch.
    pub has_data: bool,
    pub attempt: i64,
    pub restarts: i64,
    /// When it joined the queue, for priority aging (see `queue.rs`).
    pub since: Instant,
}

impl queue::Item for Queued {
    fn id(&self) -> &str {
        &self.id
    }
    fn app(&self) -> &str {
        &self.app
    }
    fn priority(&self) -> queue::Priority {
        self.config.priority
    }
    fn since(&self) -> Instant {
        self.since
    }
}

impl Queued {
    pub fn from_row(r: &JobRow) -> Queued {
        Queued {
            id: r.id.clone(),
            app: r.app.clone(),
            path: r.path.clone(),
            config: r.config.clone(),
            // The data stays in the store while the job waits; dispatch reads it.
            data: None,
            has_data: r.data.is_some(),
            attempt: r.attempt,
            restarts: r.restarts,
            since: Instant::now(),
        }
    }
}

/// Handle to the pool, held by [`Services`].
pub struct Pool {
    /// Events: enqueues (a flood of them, at times), slots' outcomes, the monitor.
    tx: Sender<Msg>,
    /// Control: cancels and shutdown, which no flood of events may delay.
    ctl: Sender<Msg>,
    pub stats: Arc<PoolStats>,
    pub budget: Arc<Budget>,
    pub limits: Limits,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    store: Store,
}

/// What the scheduler thread needs once services exist.
pub struct PoolRunner {
    rx: Receiver<Msg>,
    ctl_rx: Receiver<Msg>,
    tx: Sender<Msg>,
    stats: Arc<PoolStats>,
    budget: Arc<Budget>,
    limits: Limits,
    stopping: Arc<AtomicBool>,
}

impl Pool {
    /// Creates the handle; the threads start with [`PoolRunner::start`] once the
    /// services (which hold this handle) exist.
    pub fn new(limits: Limits, store: Store) -> (Pool, PoolRunner) {
        let (tx, rx) = crossbeam_channel::bounded(16 * 1024);
        let (ctl, ctl_rx) = crossbeam_channel::bounded(16 * 1024);
        let stats = Arc::new(PoolStats::default());
        let budget = Budget::new(limits.memory_budget);
        let stopping = Arc::new(AtomicBool::new(false));
        let runner = PoolRunner {
            rx,
            ctl_rx,
            tx: tx.clone(),
            stats: stats.clone(),
            budget: budget.clone(),
            limits: limits.clone(),
            stopping: stopping.clone(),
        };
        (
            Pool {
                tx,
                ctl,
                stats,
                budget,
                limits,
                threads: Mutex::new(Vec::new()),
                stopping,
                store,
            },
            runner,
        )
    }

    pub(crate) fn enqueue(&self, job: Queued) {
        if self.tx.send(Msg::Enqueue(Box::new(job))).is_err() {
            log::warn!("job enqueued after the pool stopped; it runs at the next start");
        }
    }

    /// [`enqueue`](Self::enqueue) that never waits: a full event queue hands the job
    /// back (the store's writer calls this and must not wait on the scheduler).
    pub(crate) fn try_enqueue(&self, job: Box<Queued>) -> Result<(), Box<Queued>> {
        match self.tx.try_send(Msg::Enqueue(job)) {
            Err(crossbeam_channel::TrySendError::Full(Msg::Enqueue(job))) => Err(job),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                log::warn!("job enqueued after the pool stopped; it runs at the next start");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Queues a job the store put back to `queued` (an operator's retry).
    pub fn enqueue_row(&self, row: &JobRow) {
        self.enqueue(Queued::from_row(row));
    }

    /// Cancels job `id`. With `app`, only a job of that app is visible. Returns the job
    /// as it is after the cancel took effect (None: no such job).
    pub fn cancel(&self, app: Option<&str>, id: &str) -> crate::store::Result<Option<JobRow>> {
        self.cancel_within(app, id, self.limits.watchdog + Duration::from_secs(3))
    }

    /// Like [`cancel`](Self::cancel), waiting at most `wait` for the job to stop (JS
    /// callers must not outwait their own deadline and watchdog).
    pub fn cancel_within(
        &self,
        app: Option<&str>,
        id: &str,
        wait: Duration,
    ) -> crate::store::Result<Option<JobRow>> {
        let Some(job) = self.store.get_job(id)? else {
            return Ok(None);
        };
        if app.is_some_and(|a| a != job.app) {
            return Ok(None);
        }
        if job.status.is_final() {
            return Ok(Some(job));
        }
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        if self
            .ctl
            .send(Msg::Cancel {
                id: id.to_string(),
                reply: reply_tx,
            })
            .is_ok()
        {
            // The scheduler answers once the job stopped (or the watchdog gave up).
            let _ = reply_rx.recv_timeout(wait);
        }
        self.store.flush()?;
        self.store.get_job(id)
    }

    /// Cancels every live job of an app and waits (bounded) until they stopped, so
    /// nothing of the app keeps running or writing once it is removed.
    pub fn cancel_app(&self, app: &str) -> crate::store::Result<()> {
        let mut replies = Vec::new();
        for id in self.store.live_job_ids(app)? {
            let (reply, rx) = crossbeam_channel::bounded(1);
            if self.ctl.send(Msg::Cancel { id, reply }).is_ok() {
                replies.push(rx);
            }
        }
        let deadline = Instant::now() + self.limits.watchdog + Duration::from_secs(3);
        for rx in replies {
            let _ = rx.recv_deadline(deadline);
        }
        self.store.flush()
    }

    /// Stops the pool: no new starts, daemons stopped (kept restorable), other running
    /// jobs given the shutdown grace, then every thread joined.
    pub fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.ctl.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl PoolRunner {
    /// Recovers jobs a dead process left running, loads the queue and starts the
    /// scheduler, slot and monitor threads.
    pub fn start(self, services: Arc<dyn Env>) -> Result<(), super::StartError> {
        use super::StartError;
        let recovered =
            services
                .store()
                .recover_interrupted()
                .map_err(|source| StartError::Store {
                    what: "recovering jobs interrupted by the last shutdown",
                    source,
                })?;
        if recovered > 0 {
            log::info!("recovered {recovered} job(s) left running by the previous process");
        }
        let queued = services
            .store()
            .queued_jobs()
            .map_err(|source| StartError::Store {
                what: "loading queued jobs",
                source,
            })?;
        let mut threads = Vec::new();
        let mut sched = Scheduler::new(&self, services.clone());
        for row in &queued {
            sched.push_queue(Queued::from_row(row));
        }
        for i in 0..self.limits.slots {
            sched.slots.push(Slot::spawn(i, 0, &self.tx, &services)?);
        }
        let monitor = {
            let tx = self.tx.clone();
            let budget = self.budget.clone();
            let stopping = self.stopping.clone();
            std::thread::Builder::new()
                .name("fazt-memory-monitor".into())
                .spawn(move || monitor_loop(&tx, &budget, &stopping))
                .map_err(|source| StartError::Thread {
                    what: "the memory monitor".into(),
                    source,
                })?
        };
        threads.push(monitor);
        let (rx, ctl_rx) = (self.rx, self.ctl_rx);
        let scheduler = std::thread::Builder::new()
            .name("fazt-scheduler".into())
            .spawn(move || sched.run(&rx, &ctl_rx))
            .map_err(|source| StartError::Thread {
                what: "the scheduler".into(),
                source,
            })?;
        threads.push(scheduler);
        services
            .pool()
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(threads);
        Ok(())
    }
}

fn monitor_loop(tx: &Sender<Msg>, budget: &Budget, stopping: &AtomicBool) {
    let mut tracker = OverrunTracker::default();
    while !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let rss = budget::rss_bytes();
        let jobs = budget.jobs_bytes.load(Ordering::Relaxed);
        budget.rss_bytes.store(rss, Ordering::Relaxed);
        budget
            .other_bytes
            .store(rss.saturating_sub(jobs), Ordering::Relaxed);
        let baseline = budget.baseline_bytes.load(Ordering::Relaxed);
        let sample = Sample {
            rss,
            jobs,
            baseline,
        };
        match tracker.sample(sample, budget.budget_bytes, Instant::now()) {
            Verdict::Fine => {}
            Verdict::Warn => log::warn!(
                "memory: jobs use {} MB, above 80% of their {} MB budget (RSS {} MB)",
                jobs >> 20,
                budget.budget_bytes >> 20,
                rss >> 20
            ),
            Verdict::NotJobs => {
                // Often freed memory the allocator kept (a runaway handler that was
                // stopped, connections that closed): hand it back to the system.
                // SAFETY: malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
                log::info!(
                    "memory: RSS {} MB is over the {} MB job budget + {} MB baseline, but not \
                     through jobs: jobs use {} MB; the other {} MB (connections, HTTP handlers \
                     and their contexts, warm job contexts; {} MB of it heap outside the \
                     slots) counts apart and stops no job",
                    rss >> 20,
                    budget.budget_bytes >> 20,
                    baseline >> 20,
                    jobs >> 20,
                    rss.saturating_sub(jobs) >> 20,
                    budget::other_heap_bytes() >> 20
                );
            }
            Verdict::Stop => {
                if tx.send(Msg::OverBudget).is_err() {
                    return;
                }
            }
        }
    }
}

/// A slot as the scheduler sees it.
struct Slot {
    gen: u64,
    tx: Sender<SlotMsg>,
    handle: Option<JoinHandle<()>>,
    /// Live heap bytes of the slot thread (counting allocator).
    heap: &'static std::sync::atomic::AtomicI64,
    running: Option<Running>,
    /// Its thread was abandoned and no replacement could be started yet.
    broken: bool,
    /// The app whose context the slot keeps warm (the last one it ran): dispatch
    /// prefers such a slot, since a fresh context costs milliseconds.
    warm_app: Option<String>,
}

struct Running {
    job: Queued,
    interrupt: Interrupt,
    started: Instant,
    heap_at_start: i64,
    /// Hard stop due at this instant (cancel grace), with the reason.
    stop_at: Option<(Instant, Reason)>,
    /// When the hard stop was sent; the watchdog counts from here.
    stopped_at: Option<Instant>,
    /// Callers waiting for this job to stop.
    waiters: Vec<Sender<()>>,
    /// Listener counter of the job's idle channel, fetched once at dispatch so the
    /// per-tick idle check is a plain atomic load.
    idle_listeners: Option<Arc<AtomicUsize>>,
}

impl Slot {
    fn is_free(&self) -> bool {
        self.running.is_none() && !self.broken
    }

    fn spawn(
        index: usize,
        gen: u64,
        events: &Sender<Msg>,
        services: &Arc<dyn Env>,
    ) -> Result<Slot, super::StartError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (heap_tx, heap_rx) = crossbeam_channel::bounded(1);
        let events = events.clone();
        let services = services.clone();
        let handle = std::thread::Builder::new()
            .name(format!("fazt-slot-{index}"))
            .stack_size(crate::js::JS_STACK_BYTES)
            .spawn(move || {
                let heap = budget::watch_this_thread();
                let _ = heap_tx.send(heap);
                slot::run(index, gen, &rx, &events, &services, heap);
            })
            .map_err(|source| super::StartError::Thread {
                what: format!("worker slot {index}"),
                source,
            })?;
        let heap = heap_rx
            .recv()
            .map_err(|_| super::StartError::SlotDied(index))?;
        Ok(Slot {
            gen,
            tx,
            handle: Some(handle),
            heap,
            running: None,
            broken: false,
            warm_app: None,
        })
    }
}

/// One scheduling pass as the queue's [`queue::Judge`]: limits, memory, and the class
/// of each app (nothing running first, then a free slot warm for it, then the rest).
struct Pass<'a> {
    apps: &'a HashMap<String, AppCounts>,
    limits: &'a Limits,
    available: u64,
    budget_bytes: u64,
    /// Reservations of jobs that never end on their own (daemons, no timeout).
    pinned: u64,
    reserved_now: u64,
    /// Starts decided in this pass, per app: (jobs, daemons).
    pending: HashMap<String, (usize, usize)>,
    /// Free slots warm for each app, less the ones this pass gave that app.
    warm_free: HashMap<String, usize>,
}

impl queue::Judge<Queued> for Pass<'_> {
    fn class(&self, app: &str) -> u8 {
        let running = self.apps.get(app).map_or(0, |c| c.running);
        let pending = self.pending.get(app).map_or(0, |p| p.0);
        if running + pending == 0 {
            0
        } else if self.warm_free.get(app).is_some_and(|&n| n > pending) {
            1
        } else {
            2
        }
    }

    fn judge(&mut self, job: &Queued) -> queue::Verdict {
        use queue::Verdict;
        let counts = self.apps.get(&job.app);
        let running = counts.map_or(0, |c| c.running);
        let daemons = counts.map_or(0, |c| c.daemons);
        let (p_jobs, p_daemons) = self
            .pending
            .get(job.app.as_str())
            .copied()
            .unwrap_or((0, 0));
        if running + p_jobs >= self.limits.per_app_running {
            return Verdict::SkipApp;
        }
        if job.config.daemon && daemons + p_daemons >= self.limits.per_app_daemons {
            return Verdict::SkipJob;
        }
        if job.config.memory_bytes > self.available.saturating_sub(self.reserved_now) {
            if job.config.memory_bytes > self.budget_bytes.saturating_sub(self.pinned) {
                // Jobs that never end on their own hold too much for this one to fit
                // before they stop: let others pass rather than stall every app.
                return Verdict::SkipJob;
            }
            // FIFO on memory: nobody overtakes a job that waits for memory, so a big
            // job is never starved by a stream of small ones.
            return Verdict::Stop;
        }
        self.reserved_now += job.config.memory_bytes;
        let e = match self.pending.get_mut(job.app.as_str()) {
            Some(e) => e,
            None => self.pending.entry(job.app.clone()).or_insert((0, 0)),
        };
        e.0 += 1;
        e.1 += usize::from(job.config.daemon);
        Verdict::Start
    }
}

#[derive(Default)]
struct AppCounts {
    running: usize,
    daemons: usize,
}

struct Scheduler {
    services: Arc<dyn Env>,
    tx: Sender<Msg>,
    stats: Arc<PoolStats>,
    budget: Arc<Budget>,
    limits: Limits,
    slots: Vec<Slot>,
    /// Runnable jobs: per-app queues, apps taking turns (see `queue.rs`).
    queue: Queue<Queued>,
    /// Jobs waiting out a retry delay or a daemon backoff.
    delayed: Vec<(Instant, Queued)>,
    /// Daemons that failed while the store could not write: most likely the store's
    /// doing (a checkpoint threw), so they wait for it instead of burning backoff.
    held: Vec<Queued>,
    apps: HashMap<String, AppCounts>,
    /// Consecutive failures of each daemon, for the backoff.
    streaks: HashMap<String, u32>,
    /// When each idle-watched daemon's channel was last seen with a listener.
    idle_seen: HashMap<String, Instant>,
    listeners: Arc<Listeners>,
    shutting_down: Option<(Instant, Sender<()>)>,
    /// Cancels of jobs the scheduler has not seen: a spawn commits its row before it
    /// enqueues, so a cancel can overtake the job. Its enqueue then finds the cancel
    /// here instead of running. Kept for [`EARLY_CANCEL_KEEP`].
    early_cancels: HashMap<String, EarlyCancel>,
}

/// A cancel that arrived before its job (see `Scheduler::early_cancels`).
struct EarlyCancel {
    at: Instant,
    /// The caller, answered when the job arrives, or after [`EARLY_CANCEL_REPLY`] (the
    /// job was not in flight but had already ended).
    reply: Option<Sender<()>>,
}

impl Scheduler {
    fn new(r: &PoolRunner, services: Arc<dyn Env>) -> Scheduler {
        Scheduler {
            listeners: services.listeners().clone(),
            services,
            tx: r.tx.clone(),
            stats: r.stats.clone(),
            budget: r.budget.clone(),
            limits: r.limits.clone(),
            slots: Vec::new(),
            queue: Queue::default(),
            delayed: Vec::new(),
            held: Vec::new(),
            apps: HashMap::new(),
            streaks: HashMap::new(),
            idle_seen: HashMap::new(),
            shutting_down: None,
            early_cancels: HashMap::new(),
        }
    }

    fn push_queue(&mut self, mut job: Queued) {
        // Up to 1 MB per job and 1,000 jobs per app: waiting jobs keep their data in
        // the store, not here; dispatch reads it back.
        job.data = None;
        job.since = Instant::now();
        self.queue.push(job);
    }

    fn run(mut self, rx: &Receiver<Msg>, ctl: &Receiver<Msg>) {
        let ticker = crossbeam_channel::tick(TICK);
        loop {
            select! {
                recv(ctl) -> msg => match msg {
                    Ok(m) => self.on_msg(m),
                    Err(_) => break,
                },
                recv(rx) -> msg => match msg {
                    Ok(m) => self.on_msg(m),
                    Err(_) => break,
                },
                recv(ticker) -> _ => self.on_tick(),
            }
            // Take what else is waiting (control before every event) and schedule
            // once for all of it: one pass per batch, not per message.
            for _ in 0..EVENT_BATCH {
                while let Ok(m) = ctl.try_recv() {
                    self.on_msg(m);
                }
                match rx.try_recv() {
                    Ok(m) => self.on_msg(m),
                    Err(_) => break,
                }
            }
            if self.shutting_down.is_none() {
                self.schedule();
            }
            self.publish_stats();
            if let Some((_, done)) = &self.shutting_down {
                if self.slots.iter().all(|s| s.running.is_none()) {
                    let _ = done.send(());
                    break;
                }
            }
        }
        // Dropping the slot senders ends the slot threads; join the ones still ours.
        for s in &mut self.slots {
            let (tx, _) = crossbeam_channel::bounded(1);
            s.tx = tx;
        }
        for s in &mut self.slots {
            if let Some(h) = s.handle.take() {
                let _ = h.join();
            }
        }
    }

    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Enqueue(job) => match self.early_cancels.remove(&job.id) {
                Some(early) => {
                    log::info!("job {} was cancelled before it reached the queue", job.id);
                    self.record(&job, Status::Cancelled, None, Some("cancelled".into()));
                    early.reply.map(|r| r.send(()));
                }
                None => self.push_queue(*job),
            },
            Msg::Cancel { id, reply } => self.cancel(&id, Some(reply)),
            Msg::Finished { slot, gen, outcome } => self.finished(slot, gen, outcome),
            Msg::OverBudget => self.over_budget(),
            Msg::Shutdown(done) => {
                log::info!("worker pool: shutting down");
                let now = Instant::now();
                for s in &mut self.slots {
                    if let Some(r) = &mut s.running {
                        if r.job.config.daemon {
                            r.interrupt.stop(Reason::Shutdown);
                            r.stopped_at = Some(now);
                        } else if r.stop_at.is_none() {
                            r.stop_at = Some((now + self.limits.shutdown_grace, Reason::Shutdown));
                        }
                    }
                }
                self.shutting_down = Some((now, done));
            }
        }
    }

    fn cancel(&mut self, id: &str, reply: Option<Sender<()>>) {
        if let Some(job) = self.queue.remove(id) {
            self.record(&job, Status::Cancelled, None, Some("cancelled".into()));
            reply.map(|r| r.send(()));
            return;
        }
        if let Some(pos) = self.held.iter().position(|j| j.id == id) {
            let job = self.held.remove(pos);
            self.record(&job, Status::Cancelled, None, Some("cancelled".into()));
            reply.map(|r| r.send(()));
            return;
        }
        if let Some(pos) = self.delayed.iter().position(|(_, j)| j.id == id) {
            let (_, job) = self.delayed.remove(pos);
            self.streaks.remove(&job.id);
            self.record(&job, Status::Cancelled, None, Some("cancelled".into()));
            reply.map(|r| r.send(()));
            return;
        }
        let now = Instant::now();
        for s in &mut self.slots {
            if let Some(r) = &mut s.running {
                if r.job.id == id {
                    r.interrupt.request_cancel();
                    if r.stop_at.is_none_or(|(at, _)| at > now + CANCEL_GRACE) {
                        r.stop_at = Some((now + CANCEL_GRACE, Reason::Cancelled));
                    }
                    r.waiters.extend(reply);
                    return;
                }
            }
        }
        // Not ours: already finished, or committed by a spawn that has not enqueued
        // it yet. Remember the cancel so the job never runs if it is still coming.
        self.early_cancels.insert(
            id.to_string(),
            EarlyCancel {
                at: Instant::now(),
                reply,
            },
        );
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // What running jobs hold, for the monitor's budget rule: only their own
        // allocations (credited back when freed, whichever thread frees them), never
        // connections or HTTP contexts, which count apart.
        let jobs: i64 = self
            .slots
            .iter()
            .filter_map(|s| {
                let r = s.running.as_ref()?;
                Some((s.heap.load(Ordering::Relaxed) - r.heap_at_start).max(0))
            })
            .sum();
        self.budget
            .jobs_bytes
            .store(jobs.max(0) as u64, Ordering::Relaxed);
        // Due retries and restarts go back to the queue in their original order.
        let mut due = Vec::new();
        self.delayed.retain(|(at, job)| {
            if *at <= now {
                due.push(job.clone());
                false
            } else {
                true
            }
        });
        for job in due {
            self.push_queue(job);
        }
        self.early_cancels.retain(|_, e| {
            if now.duration_since(e.at) >= EARLY_CANCEL_REPLY {
                e.reply.take().map(|r| r.send(()));
            }
            now.duration_since(e.at) < EARLY_CANCEL_KEEP
        });
        if !self.held.is_empty() && !self.services.store().degraded() {
            for job in std::mem::take(&mut self.held) {
                self.push_queue(job);
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].broken {
                let gen = self.slots[i].gen;
                if let Ok(s) = Slot::spawn(i, gen, &self.tx, &self.services) {
                    self.slots[i] = s;
                }
                continue;
            }
            let Some(r) = &mut self.slots[i].running else {
                continue;
            };
            if let Some((at, reason)) = r.stop_at {
                if at <= now && r.stopped_at.is_none() {
                    r.interrupt.stop(reason);
                    r.stopped_at = Some(now);
                }
            }
            if r.stopped_at.is_none() && r.interrupt.check().is_some() {
                // The deadline passed: the JS stops itself; start the watchdog.
                r.stopped_at = Some(now);
            }
            if let (Some(ch), Some(counter)) = (&r.job.config.idle_channel, &r.idle_listeners) {
                let idle_ms = r.job.config.idle_timeout_ms.unwrap_or(u64::MAX);
                let listeners = counter.load(Ordering::Relaxed);
                let seen = self.idle_seen.entry(r.job.id.clone()).or_insert(now);
                if listeners > 0 {
                    *seen = now;
                } else if now.duration_since(*seen) >= Duration::from_millis(idle_ms)
                    && r.stop_at.is_none()
                    && r.stopped_at.is_none()
                {
                    log::info!(
                        "job {} stopping: channel '{ch}' had no listener for {}",
                        r.job.id,
                        super::options::format_ms(idle_ms)
                    );
                    // Like a cancel, but with time to wind down: `job.cancelled` turns
                    // true and sleeps end; the hard stop follows after the grace.
                    r.interrupt.request_cancel();
                    r.stop_at = Some((now + IDLE_GRACE, Reason::Idle));
                }
            }
            if let Some(at) = r.stopped_at {
                if now.duration_since(at) >= self.limits.watchdog {
                    self.abandon(i);
                }
            }
        }
    }

    /// The slot's JS did not stop in time: fail its job, leave the thread to die on
    /// its own (boa's loop limit ends it eventually) and put a fresh thread in its place.
    fn abandon(&mut self, i: usize) {
        let gen = self.slots[i].gen + 1;
        let Some(r) = self.slots[i].running.take() else {
            return;
        };
        log::error!(
            "job {} did not stop within {:?}; abandoning its worker thread",
            r.job.id,
            self.limits.watchdog
        );
        self.stats.abandoned_slots.fetch_add(1, Ordering::Relaxed);
        let reason = r.interrupt.check().unwrap_or(Reason::Cancelled);
        let suffix = format!(
            "; the job did not stop within {:?}, so its worker thread was abandoned",
            self.limits.watchdog
        );
        // The old thread may still be running it: never retry or restart such a job,
        // or each attempt could strand another spinning thread.
        let outcome = match reason {
            Reason::Timeout | Reason::Memory => Outcome::Fatal(stop_message(
                reason,
                &r.job.config,
                Some(r.interrupt.note()),
            )),
            other => Outcome::Interrupted(other),
        };
        self.conclude(r, outcome, &suffix);
        match Slot::spawn(i, gen, &self.tx, &self.services) {
            // The old thread keeps its own receiver and exits once its job ends; its
            // handle is dropped (detached) with the old slot.
            Ok(s) => self.slots[i] = s,
            Err(e) => {
                // Keep the slot out of use until a later tick manages to replace it.
                log::error!("could not replace an abandoned worker slot: {e}");
                self.slots[i].gen = gen;
                self.slots[i].broken = true;
            }
        }
    }

    fn over_budget(&mut self) {
        // The newest running job that holds more than it reserved.
        let victim = self
            .slots
            .iter_mut()
            .filter_map(|s| {
                let heap = s.heap.load(Ordering::Relaxed);
                s.running.as_mut().map(|r| (heap, r))
            })
            .filter(|(heap, r)| {
                r.stopped_at.is_none()
                    && (*heap - r.heap_at_start).max(0) as u64 > r.job.config.memory_bytes
            })
            .max_by_key(|(_, r)| r.started);
        match victim {
            Some((heap, r)) => {
                let used = (heap - r.heap_at_start).max(0) as u64;
                log::warn!(
                    "memory over budget: stopping job {} ({} used, {} reserved)",
                    r.job.id,
                    super::options::format_bytes(used),
                    super::options::format_bytes(r.job.config.memory_bytes)
                );
                r.interrupt.stop_with_note(Reason::Memory, used);
                r.stopped_at = Some(Instant::now());
            }
            None => {
                // Jobs hold more than the budget although none holds more than its
                // reservation: the ones that did are already stopping.
                log::debug!("memory over budget: the jobs past their reservations are stopping");
            }
        }
    }

    fn schedule(&mut self) {
        let free = self.slots.iter().filter(|s| s.is_free()).count();
        if free == 0 || self.queue.is_empty() {
            return;
        }
        let pinned: u64 = self
            .slots
            .iter()
            .filter_map(|s| s.running.as_ref())
            .filter(|r| r.job.config.daemon || r.job.config.timeout_ms.is_none())
            .map(|r| r.job.config.memory_bytes)
            .sum();
        let mut warm_free: HashMap<String, usize> = HashMap::new();
        for s in self.slots.iter().filter(|s| s.is_free()) {
            if let Some(app) = &s.warm_app {
                *warm_free.entry(app.clone()).or_default() += 1;
            }
        }
        let mut pass = Pass {
            apps: &self.apps,
            limits: &self.limits,
            available: self.budget.available(),
            budget_bytes: self.budget.budget_bytes,
            pinned,
            reserved_now: 0,
            pending: HashMap::new(),
            warm_free,
        };
        let start = self.queue.pick(free, Instant::now(), &mut pass);
        // Jobs with a free slot warm for their app first, so the others' dispatch does
        // not take those slots.
        let (warm, rest): (Vec<Queued>, Vec<Queued>) = start.into_iter().partition(|j| {
            self.slots
                .iter()
                .any(|s| s.is_free() && s.warm_app.as_deref() == Some(j.app.as_str()))
        });
        for job in warm.into_iter().chain(rest) {
            self.dispatch(job);
        }
    }

    fn dispatch(&mut self, job: Queued) {
        let warm = self
            .slots
            .iter()
            .position(|s| s.is_free() && s.warm_app.as_deref() == Some(job.app.as_str()));
        let cold = || {
            self.slots
                .iter()
                .position(|s| s.is_free() && s.warm_app.is_none())
        };
        let Some(i) = warm
            .or_else(cold)
            .or_else(|| self.slots.iter().position(Slot::is_free))
        else {
            self.push_queue(job);
            return;
        };
        let mut job = job;
        let data = if job.has_data {
            self.services.store().job_data(&job.id)
        } else {
            Ok(Some(None))
        };
        match data {
            Ok(Some(data)) => job.data = data,
            Ok(None) => {
                // Its row is gone (the app was removed while the job waited).
                log::info!("job {} no longer exists; not starting it", job.id);
                return;
            }
            Err(e) => {
                log::error!(
                    "cannot read the data of job {} ({e}); trying again in 1 s",
                    job.id
                );
                job.data = None;
                self.delayed
                    .push((Instant::now() + Duration::from_secs(1), job));
                return;
            }
        }
        let timeout = job.config.timeout_ms.map(Duration::from_millis);
        let interrupt = Interrupt::new(timeout);
        let counts = self.apps.entry(job.app.clone()).or_default();
        counts.running += 1;
        if job.config.daemon {
            counts.daemons += 1;
        }
        self.budget
            .reserved_bytes
            .fetch_add(job.config.memory_bytes, Ordering::SeqCst);
        self.stats.started_total.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().job_waited(&job.app, &job.path, job.since.elapsed());
        let slot = &mut self.slots[i];
        let run = RunJob {
            job: job.clone(),
            interrupt: interrupt.clone(),
        };
        if slot.tx.send(SlotMsg::Run(Box::new(run))).is_err() {
            // Nothing was recorded yet, so the store still says "queued", as it is.
            log::error!("worker slot {i} is gone; re-queueing job {}", job.id);
            self.release(&job);
            self.push_queue(job);
            return;
        }
        // Recorded once the slot has it; the store writes it in order with the outcome.
        self.services
            .store()
            .job_started(&job.id, job.attempt, job.restarts);
        let idle_listeners = job
            .config
            .idle_channel
            .as_deref()
            .map(|ch| self.listeners.counter(&job.app, ch));
        let slot = &mut self.slots[i];
        slot.warm_app = Some(job.app.clone());
        slot.running = Some(Running {
            idle_listeners,
            heap_at_start: slot.heap.load(Ordering::Relaxed),
            job,
            interrupt,
            started: Instant::now(),
            stop_at: None,
            stopped_at: None,
            waiters: Vec::new(),
        });
    }

    fn release(&mut self, job: &Queued) {
        if let Some(c) = self.apps.get_mut(&job.app) {
            c.running = c.running.saturating_sub(1);
            if job.config.daemon {
                c.daemons = c.daemons.saturating_sub(1);
            }
        }
        self.budget
            .reserved_bytes
            .fetch_sub(job.config.memory_bytes, Ordering::SeqCst);
    }

    fn finished(&mut self, slot: usize, gen: u64, outcome: Outcome) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.gen != gen {
            return; // An abandoned thread finally finished; its job was already concluded.
        }
        let Some(r) = s.running.take() else {
            return;
        };
        self.conclude(r, outcome, "");
    }

    /// Records how a run ended and what happens next (retry, restart, restore). Used
    /// for runs that reported back and for abandoned ones alike; `suffix` is appended
    /// to the error text.
    fn conclude(&mut self, mut r: Running, outcome: Outcome, suffix: &str) {
        self.release(&r.job);
        self.idle_seen.remove(&r.job.id);
        if let (Some(ch), Some(counter)) = (&r.job.config.idle_channel, r.idle_listeners.take()) {
            self.listeners.release(&r.job.app, ch, counter);
        }
        let ran_for = r.started.elapsed();
        crate::metrics::global().job_ran(&r.job.app, &r.job.path, ran_for);
        let job = r.job;
        let shutting_down = self.shutting_down.is_some();
        // A stop that was asked for decides the status, whatever the code did in its
        // grace period (returned, threw, or ran into its timeout).
        let asked = match r.stop_at {
            Some((_, Reason::Idle)) => Some(Reason::Idle),
            _ if r.interrupt.cancel_requested() => Some(Reason::Cancelled),
            _ => None,
        };
        let outcome = match (asked, outcome) {
            (Some(reason), Outcome::Failed(_)) => Outcome::Interrupted(reason),
            (
                Some(reason),
                Outcome::Interrupted(Reason::Timeout | Reason::Memory | Reason::Shutdown),
            ) => Outcome::Interrupted(reason),
            (_, other) => other,
        };
        let with = |m: String| format!("{m}{suffix}");
        match outcome {
            Outcome::Done(result) => {
                self.streaks.remove(&job.id);
                match asked {
                    Some(Reason::Idle) => self.record(
                        &job,
                        Status::Stopped,
                        result,
                        Some(idle_message(&job.config)),
                    ),
                    Some(_) => {
                        self.record(&job, Status::Cancelled, result, Some("cancelled".into()))
                    }
                    None => self.record(&job, Status::Done, result, None),
                }
            }
            Outcome::Interrupted(Reason::Cancelled) => {
                self.streaks.remove(&job.id);
                self.record(
                    &job,
                    Status::Cancelled,
                    None,
                    Some(with("cancelled".into())),
                );
            }
            Outcome::Interrupted(Reason::Idle) => {
                self.streaks.remove(&job.id);
                let msg = with(idle_message(&job.config));
                self.record(&job, Status::Stopped, None, Some(msg));
            }
            Outcome::Interrupted(Reason::Shutdown) if job.config.daemon => {
                // Restorable: the next start resumes it from its checkpoint.
                self.record(&job, Status::Queued, None, None);
            }
            Outcome::Interrupted(reason) => {
                let error = with(stop_message(reason, &job.config, Some(r.interrupt.note())));
                self.failed(job, error, ran_for, shutting_down);
            }
            Outcome::Fatal(error) => {
                self.streaks.remove(&job.id);
                self.record(&job, Status::Failed, None, Some(with(error)));
            }
            Outcome::Failed(error) => self.failed(job, with(error), ran_for, shutting_down),
        }
        for w in r.waiters {
            let _ = w.send(());
        }
    }

    fn failed(&mut self, mut job: Queued, error: String, ran_for: Duration, shutting_down: bool) {
        // A job that waits again keeps its data in the store only.
        job.data = None;
        if job.config.daemon && shutting_down {
            // Still a daemon: it stays queued in the store and restarts after the restart.
            job.restarts += 1;
            self.record(&job, Status::Queued, None, Some(error));
            return;
        }
        if job.config.daemon && self.services.store().degraded() {
            log::warn!(
                "daemon {} failed while the store cannot write ({error}); restarting once writes succeed, without backoff",
                job.id
            );
            job.restarts += 1;
            self.record(&job, Status::Queued, None, Some(error));
            job.data = None;
            self.held.push(job);
            return;
        }
        if job.config.daemon {
            let streak = self.streaks.entry(job.id.clone()).or_insert(0);
            if ran_for >= HEALTHY {
                *streak = 0;
            }
            *streak += 1;
            let delay = backoff_delay(*streak);
            log::warn!(
                "daemon {} failed ({error}); restarting in {:?}",
                job.id,
                delay
            );
            job.restarts += 1;
            self.record(&job, Status::Queued, None, Some(error));
            self.delayed.push((Instant::now() + delay, job));
            return;
        }
        if !job.config.daemon && job.attempt <= job.config.retry as i64 {
            job.attempt += 1;
            self.record(&job, Status::Queued, None, Some(error));
            if shutting_down {
                return; // Still queued in the store: it runs after the restart.
            }
            let delay = Duration::from_millis(job.config.retry_delay_ms);
            self.delayed.push((Instant::now() + delay, job));
            return;
        }
        self.record(&job, Status::Failed, None, Some(error));
    }

    fn record(&self, job: &Queued, status: Status, result: Option<String>, error: Option<String>) {
        if status.is_final() {
            crate::metrics::global().job_outcome(&job.app, status.as_str());
        }
        self.services.store().job_finished(
            &job.id,
            status,
            result,
            error,
            job.attempt,
            job.restarts,
        );
    }

    fn publish_stats(&self) {
        let running = self.slots.iter().filter(|s| s.running.is_some()).count();
        let daemons = self
            .slots
            .iter()
            .filter_map(|s| s.running.as_ref())
            .filter(|r| r.job.config.daemon)
            .count();
        self.stats.running.store(running, Ordering::Relaxed);
        self.stats.queued.store(
            self.queue.len() + self.delayed.len() + self.held.len(),
            Ordering::Relaxed,
        );
        self.stats.daemons.store(daemons, Ordering::Relaxed);
    }
}

fn idle_message(config: &JobConfig) -> String {
    format!(
        "stopped: channel '{}' had no listener for {}",
        config.idle_channel.as_deref().unwrap_or(""),
        super::options::format_ms(config.idle_timeout_ms.unwrap_or(0))
    )
}

/// The error text for a job stopped by the host.
fn stop_message(reason: Reason, config: &JobConfig, note: Option<u64>) -> String {
    use super::options::{format_bytes, format_ms};
    match reason {
        Reason::Timeout => format!(
            "timed out after {}",
            config.timeout_ms.map(format_ms).unwrap_or_else(|| "its time limit".into())
        ),
        Reason::Memory => format!(
            "stopped: used {}, more than its {} reservation, while the server was over its memory budget",
            format_bytes(note.unwrap_or(0)),
            format_bytes(config.memory_bytes)
        ),
        Reason::Cancelled => "cancelled".into(),
        Reason::Shutdown => "interrupted by server shutdown".into(),
        Reason::Idle => "stopped: idle".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handles a scheduler reaches, without the HTTP side of the server.
    struct TestEnv {
        store: Store,
        pool: Pool,
        listeners: Arc<Listeners>,
        apps: crate::apps::Registry<Interrupt>,
        natives: crate::js::Natives,
    }

    impl crate::js::Env for TestEnv {
        fn store(&self) -> &Store {
            &self.store
        }
        fn natives(&self) -> &crate::js::Natives {
            &self.natives
        }
        fn install(&self, _: &mut boa_engine::Context) {}
    }

    impl Env for TestEnv {
        fn pool(&self) -> &Pool {
            &self.pool
        }
        fn listeners(&self) -> &Arc<Listeners> {
            &self.listeners
        }
        fn enter_app(
            &self,
            app: &str,
            stop: Option<Interrupt>,
        ) -> crate::store::Result<Option<crate::apps::Run<'_, Interrupt>>> {
            self.apps.enter(app, stop, || {
                Ok(self
                    .store
                    .get_app(app)?
                    .as_ref()
                    .map(crate::apps::Deployment::from))
            })
        }
    }

    /// A scheduler over a store in a temp dir, with no threads running: tests feed it
    /// messages in the order a race would.
    fn scheduler(dir: &std::path::Path) -> (Scheduler, Arc<dyn Env>) {
        let store = Store::open(dir).expect("store");
        let listeners = Arc::new(Listeners::default());
        let (pool, runner) = Pool::new(Limits::default(), store.clone());
        let services: Arc<dyn Env> = Arc::new(TestEnv {
            store,
            pool,
            listeners,
            apps: Default::default(),
            natives: Default::default(),
        });
        (Scheduler::new(&runner, services.clone()), services)
    }

    #[test]
    fn a_cancel_between_commit_and_enqueue_is_not_dropped() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (mut sched, services) = scheduler(tmp.path());
        let (config, data) =
            super::super::parse_options(&serde_json::Value::Null, super::super::MEMORY_BUDGET)
                .expect("options");
        let row = match services
            .store()
            .insert_job(
                super::super::new_job_id(),
                "a",
                "workers/w.js",
                &config,
                data,
                None,
            )
            .expect("insert")
        {
            crate::store::Inserted::New(row) | crate::store::Inserted::Existing(row) => row,
            crate::store::Inserted::QueueFull { .. } => panic!("an empty queue is full"),
        };
        // The spawn committed its row; the cancel overtakes its enqueue.
        let (reply, replied) = crossbeam_channel::bounded(1);
        sched.on_msg(Msg::Cancel {
            id: row.id.clone(),
            reply,
        });
        sched.on_msg(Msg::Enqueue(Box::new(Queued::from_row(&row))));
        assert!(
            sched.queue.is_empty(),
            "the cancelled job was queued to run"
        );
        assert!(replied.try_recv().is_ok(), "the canceller was not answered");
        services.store().flush().expect("flush");
        let after = services
            .store()
            .get_job(&row.id)
            .expect("read")
            .expect("row");
        assert_eq!(after.status, Status::Cancelled);
        services.store().close();
    }

    #[test]
    fn a_cancel_of_an_ended_job_answers_within_the_reply_wait() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (mut sched, services) = scheduler(tmp.path());
        let (reply, replied) = crossbeam_channel::bounded(1);
        sched.on_msg(Msg::Cancel {
            id: "gone".into(),
            reply,
        });
        assert!(
            replied.try_recv().is_err(),
            "answered before the job could arrive"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while replied.try_recv().is_err() {
            assert!(Instant::now() < deadline, "never answered");
            std::thread::sleep(Duration::from_millis(20));
            sched.on_tick();
        }
        services.store().close();
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=9).map(|s| backoff_delay(s).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
