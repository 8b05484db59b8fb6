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
use super::mailbox::{mailbox, Post};
use super::policy::{self, Action, Ended, Memory, Observed, Record};
use super::queue;
use super::slot::{self, Outcome, RunJob, SlotMsg};
use super::state::{Running, SlotState, State};
use super::Env;
use super::JobConfig;
use crate::js::Interrupt;
use crate::realtime::Listeners;
use crate::store::{now_ms, JobRow, Store, Transition};

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

const TICK: Duration = Duration::from_millis(10);
/// Events the scheduler takes in one go before it schedules.
const EVENT_BATCH: usize = 256;

pub use super::policy::backoff_delay;

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
    /// An operator's retry of an ended job (see `policy::retry`).
    Retry(Box<Queued>),
    Cancel {
        id: String,
        reply: Sender<()>,
    },
    Finished {
        slot: usize,
        gen: u64,
        outcome: Outcome,
        /// How long the job's function ran (its context's setup left out).
        ran: Duration,
    },
    OverBudget,
    /// The removal of this app began (see `State::removed_apps`).
    AppRemoved(String),
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
    /// Whether the job was spawned with data: for one without, dispatch only checks that
    /// its row still exists.
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
        if self
            .tx
            .send(Msg::Retry(Box::new(Queued::from_row(row))))
            .is_err()
        {
            log::warn!("job retried after the pool stopped; it runs at the next start");
        }
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
        // First, so a job of the app that arrives later has its row checked.
        let _ = self.ctl.send(Msg::AppRemoved(app.to_string()));
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
            sched
                .state
                .push_queue(Queued::from_row(row), Instant::now());
        }
        for i in 0..self.limits.slots {
            sched.add_slot(SlotThread::spawn(i, 0, &self.tx, &services)?);
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
/// A slot's thread, as the scheduler reaches it (its state is in [`State::slots`]).
struct SlotThread {
    tx: Post<SlotMsg>,
    handle: Option<JoinHandle<()>>,
    /// Live heap bytes of the slot thread (counting allocator).
    heap: &'static std::sync::atomic::AtomicI64,
}

impl SlotThread {
    fn spawn(
        index: usize,
        gen: u64,
        events: &Sender<Msg>,
        services: &Arc<dyn Env>,
    ) -> Result<SlotThread, super::StartError> {
        let (tx, rx) = mailbox::<SlotMsg>();
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
        Ok(SlotThread {
            tx,
            handle: Some(handle),
            heap,
        })
    }
}

/// The scheduler thread: takes events and control messages, asks the policy, and
/// performs the [`Action`]s it returns (slot hand-offs, store transitions, stop flags,
/// replies). Its own logic is only the plumbing around them.
struct Scheduler {
    services: Arc<dyn Env>,
    tx: Sender<Msg>,
    stats: Arc<PoolStats>,
    budget: Arc<Budget>,
    limits: Limits,
    state: State,
    /// `threads[i]` runs slot `i` of `state.slots`.
    threads: Vec<SlotThread>,
    listeners: Arc<Listeners>,
    /// The shutdown caller, answered once every run ended.
    shutdown_reply: Option<Sender<()>>,
    /// State transitions of this loop turn (starts and outcomes), sent to the store as
    /// one write at the end of the turn, or before any reply (a canceller reads the
    /// job's row once answered).
    transitions: Vec<Transition>,
    /// Starts not written yet ([`Transition::Started`]), by job id, with when they were
    /// held. A run that ends within [`HOLD_START`] is written once, its start folded
    /// into its outcome: a short job costs the store one row update, not two (each
    /// rewrites the row and its index entries).
    held: HashMap<String, (Instant, Transition)>,
}

/// How long a start may wait to be written with its run's outcome. The row shows
/// `queued` meanwhile; its `startedAt` is the dispatch time either way. No durability is
/// lost: a start is a background write, lost in a crash until its batch commits.
const HOLD_START: Duration = Duration::from_millis(5);

impl Scheduler {
    fn new(r: &PoolRunner, services: Arc<dyn Env>) -> Scheduler {
        Scheduler {
            listeners: services.listeners().clone(),
            services,
            tx: r.tx.clone(),
            stats: r.stats.clone(),
            budget: r.budget.clone(),
            limits: r.limits.clone(),
            state: State::default(),
            threads: Vec::new(),
            shutdown_reply: None,
            transitions: Vec::new(),
            held: HashMap::new(),
        }
    }

    fn add_slot(&mut self, t: SlotThread) {
        self.threads.push(t);
        self.state.slots.push(SlotState::default());
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
            self.schedule();
            self.flush_transitions(false);
            self.publish_stats();
            if self.shutdown_reply.is_some() && self.state.running().next().is_none() {
                self.shutdown_reply.take().map(|done| done.send(()));
                break;
            }
        }
        self.flush_transitions(true);
        // Dropping the slot senders ends the slot threads; join the ones still ours.
        for t in &mut self.threads {
            t.tx = mailbox().0;
        }
        for t in &mut self.threads {
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        }
    }

    fn on_msg(&mut self, msg: Msg) {
        let now = Instant::now();
        let actions = match msg {
            Msg::Enqueue(job) => policy::enqueue(&mut self.state, *job, now),
            Msg::Retry(job) => policy::retry(&mut self.state, *job, now),
            Msg::AppRemoved(app) => {
                self.state.run_time.remove(&app);
                self.state.removed_apps.insert(app, now);
                Vec::new()
            }
            Msg::Cancel { id, reply } => policy::cancel(&mut self.state, &id, Some(reply), now),
            Msg::Finished {
                slot,
                gen,
                outcome,
                ran,
            } => self.finished(slot, gen, outcome, ran, now),
            Msg::OverBudget => {
                let heaps: Vec<i64> = self.heaps();
                policy::over_budget(&mut self.state, &heaps, now)
            }
            Msg::Shutdown(done) => {
                log::info!("worker pool: shutting down");
                self.shutdown_reply = Some(done);
                policy::shutdown(&mut self.state, &self.limits, now)
            }
        };
        self.perform(actions);
    }

    fn heaps(&self) -> Vec<i64> {
        self.threads
            .iter()
            .map(|t| t.heap.load(Ordering::Relaxed))
            .collect()
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // What running jobs hold, for the monitor's budget rule: only their own
        // allocations (credited back when freed, whichever thread frees them), never
        // connections or HTTP contexts, which count apart.
        let heaps = self.heaps();
        let jobs: i64 = self
            .state
            .slots
            .iter()
            .zip(&heaps)
            .filter_map(|(s, heap)| Some((heap - s.running.as_ref()?.heap_at_start).max(0)))
            .sum();
        self.budget
            .jobs_bytes
            .store(jobs.max(0) as u64, Ordering::Relaxed);
        let observed: Vec<Observed> = self
            .state
            .slots
            .iter()
            .map(|s| match &s.running {
                Some(r) => Observed {
                    stopping: r.interrupt.check().is_some(),
                    listeners: r.idle_listeners.as_ref().map(|c| c.load(Ordering::Relaxed)),
                },
                None => Observed::default(),
            })
            .collect();
        let degraded = self.services.store().degraded();
        let actions = policy::tick(&mut self.state, &observed, degraded, &self.limits, now);
        self.perform(actions);
    }

    fn schedule(&mut self) {
        let memory = Memory {
            available: self.budget.available(),
            budget: self.budget.budget_bytes,
        };
        let actions = policy::decide(&mut self.state, memory, &self.limits, Instant::now());
        self.perform(actions);
    }

    /// Whether dispatch reads `job`'s row: for its data, or because its app's removal
    /// began and the row may be gone.
    fn checks_row(&self, job: &Queued) -> bool {
        job.has_data || self.state.removed_apps.contains_key(&job.app)
    }

    /// One read for all the starts among `actions`: each job's data (waiting jobs keep
    /// it in the store only), and whether its row still exists. None: the read failed.
    fn read_starts(&self, actions: &[Action]) -> Option<HashMap<String, Option<String>>> {
        let jobs: Vec<(&str, bool)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch { job, .. } if self.checks_row(job) => {
                    Some((job.id.as_str(), job.has_data))
                }
                _ => None,
            })
            .collect();
        if jobs.is_empty() {
            return Some(HashMap::new());
        }
        match self.services.store().jobs_data(&jobs) {
            Ok(rows) => Some(rows),
            Err(e) => {
                log::error!("cannot read the data of the jobs to start ({e}); trying again in 1 s");
                None
            }
        }
    }

    /// Performs the policy's actions in order.
    fn perform(&mut self, actions: Vec<Action>) {
        let mut rows = self.read_starts(&actions);
        for a in actions {
            match a {
                Action::Dispatch { slot, mut job } => {
                    match rows.as_mut().map(|r| r.remove(&job.id)) {
                        Some(Some(data)) => {
                            job.data = data;
                            self.dispatch(slot, job);
                        }
                        // A job whose row is gone (its app was removed after the spawn
                        // committed) never runs.
                        Some(None) if !self.checks_row(&job) => self.dispatch(slot, job),
                        Some(None) => {
                            log::info!("job {} no longer exists; not starting it", job.id)
                        }
                        // The read failed: a job without data starts anyway (its slot
                        // refuses it if its app is gone), unless its app's removal began
                        // (the name may already serve a new deployment); the others wait.
                        None if !self.checks_row(&job) => self.dispatch(slot, job),
                        None => {
                            let at = Instant::now() + policy::UNREAD_DELAY;
                            self.state.delayed.push((at, job));
                        }
                    }
                }
                Action::Record(r) => self.record(r),
                Action::Reply(tx) => {
                    self.flush_transitions(true);
                    let _ = tx.send(());
                }
                Action::RequestCancel { slot } => {
                    if let Some(r) = &self.state.slots[slot].running {
                        r.interrupt.request_cancel();
                    }
                }
                Action::Stop { slot, reason, note } => {
                    if let Some(r) = &self.state.slots[slot].running {
                        match note {
                            Some(n) => r.interrupt.stop_with_note(reason, n),
                            None => r.interrupt.stop(reason),
                        }
                    }
                }
                Action::Abandon { slot } => self.abandon(slot),
                Action::Respawn { slot } => {
                    let gen = self.state.slots[slot].gen;
                    if let Ok(t) = SlotThread::spawn(slot, gen, &self.tx, &self.services) {
                        self.threads[slot] = t;
                        self.state.slots[slot].broken = false;
                    }
                }
            }
        }
    }

    /// The slot's JS did not stop in time: fail its job, leave the thread to die on
    /// its own (boa's loop limit ends it eventually) and put a fresh thread in its place.
    fn abandon(&mut self, i: usize) {
        let gen = self.state.slots[i].gen + 1;
        let Some(r) = self.state.slots[i].running.take() else {
            return;
        };
        log::error!(
            "job {} did not stop within {:?}; abandoning its worker thread",
            r.job.id,
            self.limits.watchdog
        );
        self.stats.abandoned_slots.fetch_add(1, Ordering::Relaxed);
        let suffix = format!(
            "; the job did not stop within {:?}, so its worker thread was abandoned",
            self.limits.watchdog
        );
        let outcome = policy::abandoned(r.interrupt.check(), &r.job.config, r.interrupt.note());
        let actions = self.conclude(r, outcome, &suffix, Instant::now());
        // The slot's generation moves on before anything else runs, so a late report
        // of the old thread is ignored.
        self.state.slots[i].gen = gen;
        match SlotThread::spawn(i, gen, &self.tx, &self.services) {
            // The old thread keeps its own receiver and exits once its job ends; its
            // handle is dropped (detached) with the old one.
            Ok(t) => self.threads[i] = t,
            Err(e) => {
                // Keep the slot out of use until a later tick manages to replace it.
                log::error!("could not replace an abandoned worker slot: {e}");
                self.state.slots[i].broken = true;
            }
        }
        self.perform(actions);
    }

    /// Hands `job` (its data read) to slot `i`.
    fn dispatch(&mut self, i: usize, job: Queued) {
        let timeout = job.config.timeout_ms.map(Duration::from_millis);
        let interrupt = Interrupt::new(timeout);
        let run = RunJob {
            job: job.clone(),
            interrupt: interrupt.clone(),
        };
        if self.threads[i]
            .tx
            .send(SlotMsg::Run(Box::new(run)))
            .is_err()
        {
            // Nothing was recorded yet, so the store still says "queued", as it is.
            log::error!("worker slot {i} is gone; re-queueing job {}", job.id);
            self.state.push_queue(job, Instant::now());
            return;
        }
        self.budget
            .reserved_bytes
            .fetch_add(job.config.memory_bytes, Ordering::SeqCst);
        self.stats.started_total.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().job_waited(&job.app, &job.path, job.since.elapsed());
        // Recorded once the slot has it, held a moment for its outcome (see `held`).
        let start = Transition::Started {
            id: job.id.clone(),
            attempt: job.attempt,
            restarts: job.restarts,
            at: now_ms(),
        };
        self.held.insert(job.id.clone(), (Instant::now(), start));
        let idle_listeners = job
            .config
            .idle_channel
            .as_deref()
            .map(|ch| self.listeners.counter(&job.app, ch));
        let heap_at_start = self.threads[i].heap.load(Ordering::Relaxed);
        self.state.start(
            i,
            Running {
                idle_listeners,
                heap_at_start,
                job,
                interrupt,
                started: Instant::now(),
                stop_at: None,
                stopped_at: None,
                cancel_asked: false,
                waiters: Vec::new(),
            },
        );
    }

    fn finished(
        &mut self,
        slot: usize,
        gen: u64,
        outcome: Outcome,
        ran: Duration,
        now: Instant,
    ) -> Vec<Action> {
        let Some(s) = self.state.slots.get_mut(slot) else {
            return Vec::new();
        };
        if s.gen != gen {
            // An abandoned thread finally finished; its job was already concluded.
            return Vec::new();
        }
        let Some(r) = s.running.take() else {
            return Vec::new();
        };
        s.idle_since = Some(now);
        self.state.note_run(&r.job.app, ran);
        self.conclude(r, outcome, "", now)
    }

    /// The side effects of a run's end that are not the policy's (reservation, idle
    /// listener, metrics), then the policy's conclusion.
    fn conclude(
        &mut self,
        mut r: Running,
        outcome: Outcome,
        suffix: &str,
        now: Instant,
    ) -> Vec<Action> {
        self.budget
            .reserved_bytes
            .fetch_sub(r.job.config.memory_bytes, Ordering::SeqCst);
        if let (Some(ch), Some(counter)) = (&r.job.config.idle_channel, r.idle_listeners.take()) {
            self.listeners.release(&r.job.app, ch, counter);
        }
        crate::metrics::global().job_ran(
            &r.job.app,
            &r.job.path,
            now.saturating_duration_since(r.started),
        );
        let ended = Ended {
            store_degraded: self.services.store().degraded(),
            note: r.interrupt.note(),
            suffix,
        };
        policy::conclude(&mut self.state, r, outcome, ended, now)
    }

    fn record(&mut self, r: Record) {
        if r.status.is_final() {
            crate::metrics::global().job_outcome(&r.app, r.status.as_str());
        }
        let started = match self.held.remove(&r.id) {
            Some((_, Transition::Started { at, .. })) => Some(at),
            _ => None,
        };
        self.transitions.push(Transition::Finished {
            id: r.id,
            status: r.status,
            result: r.result,
            error: r.error,
            attempt: r.attempt,
            restarts: r.restarts,
            at: now_ms(),
            started,
        });
    }

    /// Moves held starts into this turn's transitions: those held [`HOLD_START`] or
    /// longer, or all of them (`all`: before a reply, at shutdown).
    fn release_starts(&mut self, all: bool) {
        let now = Instant::now();
        let due = self
            .held
            .extract_if(|_, (since, _)| all || now.duration_since(*since) >= HOLD_START);
        self.transitions.extend(due.map(|(_, (_, start))| start));
    }

    /// Sends this turn's transitions to the store as one write, with the starts held
    /// long enough (`all`: every start).
    fn flush_transitions(&mut self, all: bool) {
        self.release_starts(all);
        if !self.transitions.is_empty() {
            let batch = std::mem::take(&mut self.transitions);
            use crate::metrics::TransitionKind;
            let m = crate::metrics::global();
            for t in &batch {
                m.job_transition(match t {
                    Transition::Started { .. } => TransitionKind::Start,
                    Transition::Finished { started: None, .. } => TransitionKind::Outcome,
                    Transition::Finished { .. } => TransitionKind::StartAndOutcome,
                });
            }
            self.services.store().job_transitions(batch);
        }
    }

    fn publish_stats(&self) {
        let running = self.state.running().count();
        let daemons = self.state.running().filter(|r| r.job.config.daemon).count();
        self.stats.running.store(running, Ordering::Relaxed);
        self.stats
            .queued
            .store(self.state.waiting(), Ordering::Relaxed);
        self.stats.daemons.store(daemons, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::mailbox::Mailbox;

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

    /// A job of app "a" without data, committed to the store (the pool not told).
    fn committed_job(services: &Arc<dyn Env>) -> JobRow {
        let (config, data) =
            super::super::parse_options(&serde_json::Value::Null, super::super::MEMORY_BUDGET)
                .expect("options");
        match services
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
        }
    }

    #[test]
    fn a_cancel_between_commit_and_enqueue_is_not_dropped() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (mut sched, services) = scheduler(tmp.path());
        let row = committed_job(&services);
        // The spawn committed its row; the cancel overtakes its enqueue.
        let (reply, replied) = crossbeam_channel::bounded(1);
        sched.on_msg(Msg::Cancel {
            id: row.id.clone(),
            reply,
        });
        sched.on_msg(Msg::Enqueue(Box::new(Queued::from_row(&row))));
        assert!(
            sched.state.queue.is_empty(),
            "the cancelled job was queued to run"
        );
        assert!(replied.try_recv().is_ok(), "the canceller was not answered");
        services.store().flush().expect("flush");
        let after = services
            .store()
            .get_job(&row.id)
            .expect("read")
            .expect("row");
        assert_eq!(after.status, super::super::Status::Cancelled);
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

    /// A slot without a thread: the test holds its receiver and sees what is handed to it.
    fn fake_slot(sched: &mut Scheduler) -> Mailbox<SlotMsg> {
        let (tx, rx) = mailbox();
        let heap: &'static std::sync::atomic::AtomicI64 =
            Box::leak(Box::new(std::sync::atomic::AtomicI64::new(0)));
        sched.add_slot(SlotThread {
            tx,
            handle: None,
            heap,
        });
        rx
    }

    #[test]
    fn a_job_whose_row_is_gone_does_not_run() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (mut sched, services) = scheduler(tmp.path());
        let slot = fake_slot(&mut sched);
        let row = committed_job(&services);
        // Spawned without data, and its row deleted before dispatch: its app's removal
        // (which tells the pool first) began after the spawn committed.
        let mut gone = Queued::from_row(&row);
        gone.id = "deleted".into();
        assert!(!gone.has_data);
        sched.on_msg(Msg::AppRemoved("a".into()));
        sched.on_msg(Msg::Enqueue(Box::new(gone)));
        sched.schedule();
        assert!(
            slot.try_recv().is_none(),
            "a job without a row was handed to a slot"
        );
        assert!(sched.state.running().next().is_none());
        // The same job with its row runs.
        sched.on_msg(Msg::Enqueue(Box::new(Queued::from_row(&row))));
        sched.schedule();
        assert!(matches!(slot.try_recv(), Some(SlotMsg::Run(r)) if r.job.id == row.id));
        services.store().close();
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=9).map(|s| backoff_delay(s).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
