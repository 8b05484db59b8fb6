//! The scheduler's rules, as functions of its [`State`] and `now`: what starts on which
//! slot (per-app limits, memory reservations first come first served, warm-slot
//! preference, priorities and turns via `queue.rs`), what a run's end means (retries
//! and their delay, daemon restart backoff, restorable daemons at shutdown), and what
//! each tick stops (cancel and idle grace, deadlines, the watchdog).
//!
//! No threads, no store, no clock: every function changes only the state it is given
//! and returns the [`Action`]s for the scheduler loop (`pool.rs`) to perform, so a test
//! of a 60 s backoff takes microseconds. Shared atomics (a run's stop flag, listener
//! counts, heap counters) are sampled by the loop and passed in as plain values.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::pool::{Limits, Queued};
use super::queue;
use super::slot::Outcome;
use super::state::{AppCounts, EarlyCancel, Running, State};
use super::{JobConfig, Status};
use crate::js::Reason;

/// Cooperative part of a cancel: `job.cancelled` turns true and `job.sleep` returns at
/// once; after this grace the JS is stopped for real.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_millis(40);
/// An idle stop is not urgent: the job gets this long to return by itself.
pub(crate) const IDLE_GRACE: Duration = Duration::from_secs(1);
/// Daemons: backoff 1 s, 2 s, 4 s … capped here, reset after `HEALTHY` of running.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const HEALTHY: Duration = Duration::from_secs(300);
/// How long a cancel of a job the scheduler has not seen waits for that job's enqueue
/// (which follows the spawn's commit at once) before answering the caller anyway.
pub(crate) const EARLY_CANCEL_REPLY: Duration = Duration::from_millis(200);
/// How long such a cancel is remembered.
const EARLY_CANCEL_KEEP: Duration = Duration::from_secs(60);
/// How long a removed app's jobs have their rows checked at dispatch.
const REMOVED_APP_KEEP: Duration = Duration::from_secs(3600);
/// Delay scheduling (as Hadoop's for data locality): a job of an app that runs already,
/// finding no free slot warm for its app and none empty, waits for one of its app's
/// own slots rather than replace another app's warm context, if the app's jobs are
/// short: a fresh context costs a slot 1-2 ms of CPU (more under load), a warm run of
/// a short job tens of µs. Apps whose jobs typically run [`SHORT_RUN`] or longer take
/// another slot at once; a wait lasts at most [`SPREAD_WAIT`].
pub(crate) const SHORT_RUN: Duration = Duration::from_millis(2);
pub(crate) const SPREAD_WAIT: Duration = Duration::from_millis(20);
/// A job whose data could not be read waits this long before it is offered again.
pub(crate) const UNREAD_DELAY: Duration = Duration::from_secs(1);

/// Delay before restart number `streak` (1-based) of a failing daemon.
pub fn backoff_delay(streak: u32) -> Duration {
    let secs = 1u64 << streak.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(BACKOFF_MAX)
}

/// A side effect the scheduler loop performs for the policy.
#[derive(Debug)]
pub(crate) enum Action {
    /// Hand `job` to slot `slot` (free, chosen by [`decide`]); the loop counts it as
    /// running once the slot has it.
    Dispatch { slot: usize, job: Queued },
    /// Write a job's new state (in order with every other transition of the job).
    Record(Record),
    /// Tell a caller (cancel, shutdown) its request took effect.
    Reply(Sender<()>),
    /// Ask the run on `slot` to wind down: `job.cancelled` turns true, sleeps end.
    RequestCancel { slot: usize },
    /// Stop the run on `slot` now (its stop flag), with a note (bytes used, for memory).
    Stop {
        slot: usize,
        reason: Reason,
        note: Option<u64>,
    },
    /// The run on `slot` did not stop within the watchdog: conclude it and replace the
    /// thread.
    Abandon { slot: usize },
    /// Try again to start a thread for a slot whose thread was abandoned.
    Respawn { slot: usize },
}

/// A job state transition for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub id: String,
    pub app: String,
    pub status: Status,
    pub result: Option<String>,
    pub error: Option<String>,
    pub attempt: i64,
    pub restarts: i64,
}

impl Record {
    fn of(job: &Queued, status: Status, result: Option<String>, error: Option<String>) -> Action {
        Action::Record(Record {
            id: job.id.clone(),
            app: job.app.clone(),
            status,
            result,
            error,
            attempt: job.attempt,
            restarts: job.restarts,
        })
    }
}

/// Memory figures of one scheduling pass (from the budget's counters).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// What reservations may still take.
    pub available: u64,
    /// The whole job budget.
    pub budget: u64,
}

/// What the loop read from a slot's shared atomics for this tick.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Observed {
    /// The run's stop flag is set or its deadline passed (`Interrupt::check`).
    pub stopping: bool,
    /// Listeners on the run's idle channel, if it has one.
    pub listeners: Option<usize>,
}

/// An operator's retry of a job that had ended arrives. A cancel held for the job's id
/// (see [`cancel`]) was meant for the run that ended, not for this one: it is answered
/// and dropped, and the job is queued.
pub(crate) fn retry(state: &mut State, job: Queued, now: Instant) -> Vec<Action> {
    let stale = state.early_cancels.remove(&job.id);
    state.push_queue(job, now);
    stale
        .and_then(|e| e.reply)
        .map(Action::Reply)
        .into_iter()
        .collect()
}

/// A new job arrives.
pub(crate) fn enqueue(state: &mut State, job: Queued, now: Instant) -> Vec<Action> {
    match state.early_cancels.remove(&job.id) {
        Some(early) => {
            log::info!("job {} was cancelled before it reached the queue", job.id);
            let mut out = vec![Record::of(
                &job,
                Status::Cancelled,
                None,
                Some("cancelled".into()),
            )];
            out.extend(early.reply.map(Action::Reply));
            out
        }
        None => {
            state.push_queue(job, now);
            Vec::new()
        }
    }
}

/// A cancel of job `id`: a waiting job ends at once, a running one gets
/// [`CANCEL_GRACE`] to wind down, one not seen yet is remembered for its arrival.
pub(crate) fn cancel(
    state: &mut State,
    id: &str,
    reply: Option<Sender<()>>,
    now: Instant,
) -> Vec<Action> {
    let cancelled = |job: &Queued, reply: Option<Sender<()>>| {
        let mut out = vec![Record::of(
            job,
            Status::Cancelled,
            None,
            Some("cancelled".into()),
        )];
        out.extend(reply.map(Action::Reply));
        out
    };
    if let Some(job) = state.queue.remove(id) {
        return cancelled(&job, reply);
    }
    if let Some(pos) = state.held.iter().position(|j| j.id == id) {
        let job = state.held.remove(pos);
        return cancelled(&job, reply);
    }
    if let Some(pos) = state.delayed.iter().position(|(_, j)| j.id == id) {
        let (_, job) = state.delayed.remove(pos);
        state.streaks.remove(&job.id);
        return cancelled(&job, reply);
    }
    for (i, s) in state.slots.iter_mut().enumerate() {
        if let Some(r) = &mut s.running {
            if r.job.id == id {
                r.cancel_asked = true;
                if r.stop_at.is_none_or(|(at, _)| at > now + CANCEL_GRACE) {
                    r.stop_at = Some((now + CANCEL_GRACE, Reason::Cancelled));
                }
                r.waiters.extend(reply);
                return vec![Action::RequestCancel { slot: i }];
            }
        }
    }
    // Not ours: already finished, or committed by a spawn that has not enqueued it
    // yet. Remember the cancel so the job never runs if it is still coming.
    state
        .early_cancels
        .insert(id.to_string(), EarlyCancel { at: now, reply });
    Vec::new()
}

/// Graceful shutdown begins: daemons stop now (they stay restorable), other runs get
/// the shutdown grace; nothing starts any more.
pub(crate) fn shutdown(state: &mut State, limits: &Limits, now: Instant) -> Vec<Action> {
    let mut out = Vec::new();
    for (i, s) in state.slots.iter_mut().enumerate() {
        if let Some(r) = &mut s.running {
            if r.job.config.daemon {
                r.stopped_at = Some(now);
                out.push(Action::Stop {
                    slot: i,
                    reason: Reason::Shutdown,
                    note: None,
                });
            } else if r.stop_at.is_none() {
                r.stop_at = Some((now + limits.shutdown_grace, Reason::Shutdown));
            }
        }
    }
    state.shutting_down = Some(now);
    out
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
    /// Free slots warm for no app, less the ones this pass gave away.
    empty_free: usize,
    /// Apps waiting for one of their own slots, and since when (`State::spread_wait`).
    spread_wait: &'a HashMap<String, Instant>,
    /// Typical run time of each app's jobs (`State::run_time`).
    run_time: &'a HashMap<String, Duration>,
    /// Apps whose job this pass held back to wait for their own slot.
    held: Vec<String>,
    now: Instant,
}

impl Pass<'_> {
    /// Whether `app`'s next start would replace another app's warm context while one
    /// of `app`'s own slots is likely to free up soon: `app` runs (or starts in this
    /// pass) a job, its jobs are short (or it has no run time yet), and it has not
    /// waited [`SPREAD_WAIT`] yet.
    fn waits_for_own_slot(&self, app: &str, running: usize, pending: usize) -> bool {
        let warm = self.warm_free.get(app).is_some_and(|&n| n > pending);
        if warm || self.empty_free > 0 || running + pending == 0 {
            return false;
        }
        if self.run_time.get(app).is_some_and(|&t| t >= SHORT_RUN) {
            return false;
        }
        self.spread_wait
            .get(app)
            .is_none_or(|&since| self.now.saturating_duration_since(since) < SPREAD_WAIT)
    }
}

impl queue::Judge<Queued> for Pass<'_> {
    /// Apps with nothing running first (fairness: an idle app's job takes the next free
    /// slot whatever the others queued), and within each tier the apps a free slot is
    /// warm for (a fresh context and the worker file's parse cost ~1 ms of a slot's
    /// time, a warm run microseconds). An idle app without a warm slot can be passed
    /// only by idle apps that have one, each once: served, it is idle no more.
    fn class(&self, app: &str) -> u8 {
        let running = self.apps.get(app).map_or(0, |c| c.running);
        let pending = self.pending.get(app).map_or(0, |p| p.0);
        let idle = running + pending == 0;
        let warm = self.warm_free.get(app).is_some_and(|&n| n > pending);
        match (idle, warm) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
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
        if self.waits_for_own_slot(&job.app, running, p_jobs) {
            self.held.push(job.app.clone());
            return Verdict::SkipApp;
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
        let warm = self.warm_free.get(&job.app).is_some_and(|&n| n > p_jobs);
        if !warm && self.empty_free > 0 {
            self.empty_free -= 1;
        }
        let e = match self.pending.get_mut(job.app.as_str()) {
            Some(e) => e,
            None => self.pending.entry(job.app.clone()).or_insert((0, 0)),
        };
        e.0 += 1;
        e.1 += usize::from(job.config.daemon);
        Verdict::Start
    }
}

/// What starts now, and where: takes the jobs it starts out of the queue and returns
/// one [`Action::Dispatch`] per job, a slot warm for the job's app first, then a slot
/// warm for no app, then the free slot idle longest. A short job of an app already
/// running that would replace another app's context waits up to [`SPREAD_WAIT`] for
/// one of its own (see [`SHORT_RUN`]).
pub(crate) fn decide(
    state: &mut State,
    memory: Memory,
    limits: &Limits,
    now: Instant,
) -> Vec<Action> {
    let free = state.free_slots();
    if state.shutting_down.is_some() || free == 0 || state.queue.is_empty() {
        return Vec::new();
    }
    let pinned: u64 = state
        .running()
        .filter(|r| r.job.config.daemon || r.job.config.timeout_ms.is_none())
        .map(|r| r.job.config.memory_bytes)
        .sum();
    let mut warm_free: HashMap<String, usize> = HashMap::new();
    let mut empty_free = 0;
    for s in state.slots.iter().filter(|s| s.is_free()) {
        match &s.warm_app {
            Some(app) => *warm_free.entry(app.clone()).or_default() += 1,
            None => empty_free += 1,
        }
    }
    let mut pass = Pass {
        apps: &state.apps,
        limits,
        available: memory.available,
        budget_bytes: memory.budget,
        pinned,
        reserved_now: 0,
        pending: HashMap::new(),
        warm_free,
        empty_free,
        spread_wait: &state.spread_wait,
        run_time: &state.run_time,
        held: Vec::new(),
        now,
    };
    let start = state.queue.pick(free, now, &mut pass);
    let (held, pending) = (pass.held, pass.pending);
    // An app's wait ends when it starts a job or has nothing queued; an app held again
    // keeps the time its wait began.
    let queue = &state.queue;
    state
        .spread_wait
        .retain(|app, _| !pending.contains_key(app) && queue.has_app(app));
    for app in held {
        if !pending.contains_key(&app) {
            state.spread_wait.entry(app).or_insert(now);
        }
    }
    // Slots given away in this pass.
    let mut taken = vec![false; state.slots.len()];
    let open = |taken: &[bool], i: usize| state.slots[i].is_free() && !taken[i];
    let warm_for = |taken: &[bool], app: &str| {
        (0..state.slots.len())
            .find(|&i| open(taken, i) && state.slots[i].warm_app.as_deref() == Some(app))
    };
    // Jobs with a free slot warm for their app first, so the others do not take those
    // slots.
    let (warm, rest): (Vec<Queued>, Vec<Queued>) = start
        .into_iter()
        .partition(|j| warm_for(&taken, &j.app).is_some());
    let mut out = Vec::with_capacity(warm.len() + rest.len());
    let mut back = Vec::new();
    for job in warm.into_iter().chain(rest) {
        let slot = warm_for(&taken, &job.app)
            .or_else(|| {
                (0..state.slots.len())
                    .find(|&i| open(&taken, i) && state.slots[i].warm_app.is_none())
            })
            .or_else(|| {
                (0..state.slots.len())
                    .filter(|&i| open(&taken, i))
                    .min_by_key(|&i| state.slots[i].idle_since)
            });
        match slot {
            Some(slot) => {
                taken[slot] = true;
                out.push(Action::Dispatch { slot, job });
            }
            None => back.push(job),
        }
    }
    for job in back {
        state.push_queue(job, now);
    }
    out
}

/// The periodic checks: due retries back to the queue, held daemons back once the
/// store writes again, stale early cancels answered, broken slots respawned, due hard
/// stops, passed deadlines, idle channels, and the watchdog. `observed[i]` is what the
/// loop read of slot `i`'s atomics.
pub(crate) fn tick(
    state: &mut State,
    observed: &[Observed],
    store_degraded: bool,
    limits: &Limits,
    now: Instant,
) -> Vec<Action> {
    let mut out = Vec::new();
    state.requeue_due(now);
    state.early_cancels.retain(|_, e| {
        if now.duration_since(e.at) >= EARLY_CANCEL_REPLY {
            out.extend(e.reply.take().map(Action::Reply));
        }
        now.duration_since(e.at) < EARLY_CANCEL_KEEP
    });
    state
        .removed_apps
        .retain(|_, at| now.duration_since(*at) < REMOVED_APP_KEEP);
    if !state.held.is_empty() && !store_degraded {
        for job in std::mem::take(&mut state.held) {
            state.push_queue(job, now);
        }
    }
    for (i, s) in state.slots.iter_mut().enumerate() {
        if s.broken {
            out.push(Action::Respawn { slot: i });
            continue;
        }
        let Some(r) = &mut s.running else {
            continue;
        };
        let seen = observed.get(i).copied().unwrap_or_default();
        if let Some((at, reason)) = r.stop_at {
            if at <= now && r.stopped_at.is_none() {
                out.push(Action::Stop {
                    slot: i,
                    reason,
                    note: None,
                });
                r.stopped_at = Some(now);
            }
        }
        if r.stopped_at.is_none() && seen.stopping {
            // The deadline passed: the JS stops itself; start the watchdog.
            r.stopped_at = Some(now);
        }
        if let (Some(ch), Some(listeners)) = (&r.job.config.idle_channel, seen.listeners) {
            let idle_ms = r.job.config.idle_timeout_ms.unwrap_or(u64::MAX);
            let seen_at = state.idle_seen.entry(r.job.id.clone()).or_insert(now);
            if listeners > 0 {
                *seen_at = now;
            } else if now.duration_since(*seen_at) >= Duration::from_millis(idle_ms)
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
                r.cancel_asked = true;
                r.stop_at = Some((now + IDLE_GRACE, Reason::Idle));
                out.push(Action::RequestCancel { slot: i });
            }
        }
        if let Some(at) = r.stopped_at {
            if now.duration_since(at) >= limits.watchdog {
                out.push(Action::Abandon { slot: i });
            }
        }
    }
    out
}

/// The memory monitor found jobs over the budget: stop the newest running job that
/// holds more than it reserved. `heaps[i]` is slot `i`'s heap counter now.
pub(crate) fn over_budget(state: &mut State, heaps: &[i64], now: Instant) -> Vec<Action> {
    let victim = state
        .slots
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| {
            let heap = heaps.get(i).copied()?;
            s.running.as_mut().map(|r| (i, heap, r))
        })
        .filter(|(_, heap, r)| {
            r.stopped_at.is_none()
                && (*heap - r.heap_at_start).max(0) as u64 > r.job.config.memory_bytes
        })
        .max_by_key(|(_, _, r)| r.started);
    let Some((slot, heap, r)) = victim else {
        // Jobs hold more than the budget although none holds more than its
        // reservation: the ones that did are already stopping.
        log::debug!("memory over budget: the jobs past their reservations are stopping");
        return Vec::new();
    };
    let used = (heap - r.heap_at_start).max(0) as u64;
    log::warn!(
        "memory over budget: stopping job {} ({} used, {} reserved)",
        r.job.id,
        super::options::format_bytes(used),
        super::options::format_bytes(r.job.config.memory_bytes)
    );
    r.stopped_at = Some(now);
    vec![Action::Stop {
        slot,
        reason: Reason::Memory,
        note: Some(used),
    }]
}

/// How an abandoned run (its thread did not stop within the watchdog) ends: the old
/// thread may still be running it, so a timeout or memory stop is never retried or
/// restarted, or each attempt could strand another spinning thread.
pub(crate) fn abandoned(reason: Option<Reason>, config: &JobConfig, note: u64) -> Outcome {
    match reason.unwrap_or(Reason::Cancelled) {
        reason @ (Reason::Timeout | Reason::Memory) => {
            Outcome::Fatal(stop_message(reason, config, Some(note)))
        }
        other => Outcome::Interrupted(other),
    }
}

/// Facts of a run that ended, besides its outcome.
pub(crate) struct Ended<'a> {
    /// The store cannot write now (a failing daemon then waits for it, see `held`).
    pub store_degraded: bool,
    /// The stop flag's note (bytes used, for a memory stop).
    pub note: u64,
    /// Appended to the error text (an abandoned thread says so).
    pub suffix: &'a str,
}

/// Records how a run ended and what happens next: a retry after its delay, a daemon's
/// restart after its backoff (or once the store writes again), a daemon kept
/// restorable at shutdown. Frees the run's counts; the caller has taken `r` off its
/// slot.
pub(crate) fn conclude(
    state: &mut State,
    r: Running,
    outcome: Outcome,
    ended: Ended<'_>,
    now: Instant,
) -> Vec<Action> {
    state.release(&r.job);
    state.idle_seen.remove(&r.job.id);
    let ran_for = now.saturating_duration_since(r.started);
    let shutting_down = state.shutting_down.is_some();
    // A stop that was asked for decides the status, whatever the code did in its grace
    // period (returned, threw, or ran into its timeout).
    let asked = match r.stop_at {
        Some((_, Reason::Idle)) => Some(Reason::Idle),
        _ if r.cancel_asked => Some(Reason::Cancelled),
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
    let with = |m: String| format!("{m}{}", ended.suffix);
    let job = r.job;
    let mut out = match outcome {
        Outcome::Done(result) => {
            state.streaks.remove(&job.id);
            vec![match asked {
                Some(Reason::Idle) => Record::of(
                    &job,
                    Status::Stopped,
                    result,
                    Some(idle_message(&job.config)),
                ),
                Some(_) => Record::of(&job, Status::Cancelled, result, Some("cancelled".into())),
                None => Record::of(&job, Status::Done, result, None),
            }]
        }
        Outcome::Interrupted(Reason::Cancelled) => {
            state.streaks.remove(&job.id);
            vec![Record::of(
                &job,
                Status::Cancelled,
                None,
                Some(with("cancelled".into())),
            )]
        }
        Outcome::Interrupted(Reason::Idle) => {
            state.streaks.remove(&job.id);
            let msg = with(idle_message(&job.config));
            vec![Record::of(&job, Status::Stopped, None, Some(msg))]
        }
        Outcome::Interrupted(Reason::Shutdown) if job.config.daemon => {
            // Restorable: the next start resumes it from its checkpoint.
            vec![Record::of(&job, Status::Queued, None, None)]
        }
        Outcome::Interrupted(reason) => {
            let error = with(stop_message(reason, &job.config, Some(ended.note)));
            failed(
                state,
                job,
                error,
                ran_for,
                shutting_down,
                ended.store_degraded,
                now,
            )
        }
        Outcome::Fatal(error) => {
            state.streaks.remove(&job.id);
            vec![Record::of(&job, Status::Failed, None, Some(with(error)))]
        }
        Outcome::Failed(error) => failed(
            state,
            job,
            with(error),
            ran_for,
            shutting_down,
            ended.store_degraded,
            now,
        ),
    };
    out.extend(r.waiters.into_iter().map(Action::Reply));
    out
}

/// A run failed: retry, restart with backoff, or fail for good.
fn failed(
    state: &mut State,
    mut job: Queued,
    error: String,
    ran_for: Duration,
    shutting_down: bool,
    store_degraded: bool,
    now: Instant,
) -> Vec<Action> {
    // A job that waits again keeps its data in the store only.
    job.data = None;
    if job.config.daemon && shutting_down {
        // Still a daemon: it stays queued in the store and restarts after the restart.
        job.restarts += 1;
        return vec![Record::of(&job, Status::Queued, None, Some(error))];
    }
    if job.config.daemon && store_degraded {
        log::warn!(
            "daemon {} failed while the store cannot write ({error}); restarting once writes succeed, without backoff",
            job.id
        );
        job.restarts += 1;
        let out = vec![Record::of(&job, Status::Queued, None, Some(error))];
        state.held.push(job);
        return out;
    }
    if job.config.daemon {
        let streak = state.streaks.entry(job.id.clone()).or_insert(0);
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
        let out = vec![Record::of(&job, Status::Queued, None, Some(error))];
        state.delayed.push((now + delay, job));
        return out;
    }
    if job.attempt <= job.config.retry as i64 {
        job.attempt += 1;
        let out = vec![Record::of(&job, Status::Queued, None, Some(error))];
        if !shutting_down {
            // (At shutdown it stays queued in the store: it runs after the restart.)
            let delay = Duration::from_millis(job.config.retry_delay_ms);
            state.delayed.push((now + delay, job));
        }
        return out;
    }
    vec![Record::of(&job, Status::Failed, None, Some(error))]
}

pub(crate) fn idle_message(config: &JobConfig) -> String {
    format!(
        "stopped: channel '{}' had no listener for {}",
        config.idle_channel.as_deref().unwrap_or(""),
        super::options::format_ms(config.idle_timeout_ms.unwrap_or(0))
    )
}

/// The error text for a job stopped by the host.
pub(crate) fn stop_message(reason: Reason, config: &JobConfig, note: Option<u64>) -> String {
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
    use crate::js::Interrupt;

    const MB: u64 = 1 << 20;

    fn limits() -> Limits {
        Limits::default()
    }

    fn memory() -> Memory {
        Memory {
            available: 256 * MB,
            budget: 256 * MB,
        }
    }

    fn job(id: &str, app: &str, config: JobConfig, now: Instant) -> Queued {
        Queued {
            id: id.into(),
            app: app.into(),
            path: "workers/w.js".into(),
            config,
            data: None,
            has_data: false,
            attempt: 1,
            restarts: 0,
            since: now,
        }
    }

    /// A daemon (no timeout) of [`small`]'s size.
    fn daemon() -> JobConfig {
        JobConfig {
            daemon: true,
            timeout_ms: None,
            ..small()
        }
    }

    fn small() -> JobConfig {
        JobConfig {
            memory_bytes: MB,
            ..JobConfig::default()
        }
    }

    fn state(slots: usize) -> State {
        let mut s = State::default();
        s.slots.resize_with(slots, Default::default);
        s
    }

    /// A scheduling pass, and what the loop would do for its dispatches: each job runs
    /// on its slot. Returns (slot, job id) of each start.
    fn step(s: &mut State, memory: Memory, now: Instant) -> Vec<(usize, String)> {
        let actions = decide(s, memory, &limits(), now);
        let mut out = Vec::new();
        for a in actions {
            if let Action::Dispatch { slot, job } = a {
                out.push((slot, job.id.clone()));
                s.start(slot, running(job, now));
            }
        }
        out
    }

    fn running(job: Queued, now: Instant) -> Running {
        Running {
            job,
            interrupt: Interrupt::new(None),
            started: now,
            heap_at_start: 0,
            stop_at: None,
            stopped_at: None,
            cancel_asked: false,
            waiters: Vec::new(),
            idle_listeners: None,
        }
    }

    fn records(actions: &[Action]) -> Vec<Record> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Record(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn ended() -> Ended<'static> {
        Ended {
            store_degraded: false,
            note: 0,
            suffix: "",
        }
    }

    /// Ends the run on `slot` with `outcome` at `now`.
    fn end(
        s: &mut State,
        slot: usize,
        outcome: Outcome,
        e: Ended<'_>,
        now: Instant,
    ) -> Vec<Action> {
        let r = s.slots[slot].running.take().expect("a run on the slot");
        conclude(s, r, outcome, e, now)
    }

    #[test]
    fn decide_prefers_a_slot_warm_for_the_jobs_app() {
        let t0 = Instant::now();
        let mut s = state(3);
        s.slots[0].warm_app = Some("a".into());
        s.slots[2].warm_app = Some("b".into());
        enqueue(&mut s, job("1", "b", small(), t0), t0);
        enqueue(&mut s, job("2", "c", small(), t0), t0);
        let started = step(&mut s, memory(), t0);
        // b's job on b's warm slot; c (warm nowhere) on the slot warm for no app, so
        // a's warm slot stays for a.
        assert_eq!(started, vec![(2, "1".into()), (1, "2".into())]);
    }

    /// Slot 0 runs a job of `a` (warm for `a`), slot 1 is free and warm for `b`, and
    /// `a`'s jobs typically run `typical`; `a2` is queued at `t0`.
    fn a_runs_and_b_is_warm(typical: Duration, t0: Instant) -> State {
        let mut s = state(2);
        s.slots[1].warm_app = Some("b".into());
        s.start(0, running(job("a1", "a", small(), t0), t0));
        s.note_run("a", typical);
        enqueue(&mut s, job("a2", "a", small(), t0), t0);
        s
    }

    #[test]
    fn a_short_job_waits_for_its_apps_slot_rather_than_replace_another_apps_context() {
        let t0 = Instant::now();
        let mut s = a_runs_and_b_is_warm(Duration::from_micros(100), t0);
        // Before, a2 took b's warm slot at once: a fresh context for a, and another for
        // b's next job.
        assert_eq!(step(&mut s, memory(), t0), vec![]);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(step(&mut s, memory(), ms(10)), vec![]);
        // a's own slot frees up: a2 goes there, and b's context stays.
        let r = s.slots[0].running.take().expect("a1 runs");
        s.release(&r.job);
        assert_eq!(step(&mut s, memory(), ms(11)), vec![(0, "a2".into())]);
    }

    #[test]
    fn a_short_jobs_wait_for_its_apps_slot_is_bounded() {
        let t0 = Instant::now();
        let mut s = a_runs_and_b_is_warm(Duration::from_micros(100), t0);
        assert_eq!(step(&mut s, memory(), t0), vec![]);
        let late = t0 + SPREAD_WAIT;
        assert_eq!(step(&mut s, memory(), late), vec![(1, "a2".into())]);
        // Served: the next short job of a waits afresh.
        enqueue(&mut s, job("a3", "a", small(), late), late);
        s.slots.push(Default::default());
        s.slots[2].warm_app = Some("c".into());
        assert_eq!(step(&mut s, memory(), late), vec![]);
    }

    #[test]
    fn a_long_job_takes_another_apps_slot_at_once() {
        let t0 = Instant::now();
        let mut s = a_runs_and_b_is_warm(Duration::from_millis(50), t0);
        assert_eq!(step(&mut s, memory(), t0), vec![(1, "a2".into())]);
    }

    #[test]
    fn a_job_takes_an_empty_slot_rather_than_wait() {
        let t0 = Instant::now();
        let mut s = a_runs_and_b_is_warm(Duration::from_micros(100), t0);
        s.slots.push(Default::default());
        assert_eq!(step(&mut s, memory(), t0), vec![(2, "a2".into())]);
    }

    #[test]
    fn a_new_app_replaces_the_context_idle_longest() {
        let t0 = Instant::now();
        let mut s = state(3);
        for (i, (app, idle_ms)) in [("x", 2), ("y", 0), ("z", 1)].into_iter().enumerate() {
            s.slots[i].warm_app = Some(app.into());
            s.slots[i].idle_since = Some(t0 + Duration::from_millis(idle_ms));
        }
        enqueue(&mut s, job("n1", "n", small(), t0), t0);
        // Before: the first free slot (x's, the most recently used).
        assert_eq!(step(&mut s, memory(), t0), vec![(1, "n1".into())]);
    }

    #[test]
    fn an_idle_app_with_a_warm_slot_goes_before_an_idle_app_without_one() {
        let t0 = Instant::now();
        let mut s = state(2);
        s.slots[0].warm_app = Some("a".into());
        s.slots[1].warm_app = Some("c".into());
        s.slots[1].running = Some(running(job("c1", "c", small(), t0), t0));
        // b's job arrived first and b was never served: before warmth counted among
        // idle apps, b took a's warm slot and a fresh context.
        enqueue(&mut s, job("b1", "b", small(), t0), t0);
        enqueue(
            &mut s,
            job("a1", "a", small(), t0),
            t0 + Duration::from_millis(1),
        );
        let started = step(&mut s, memory(), t0 + Duration::from_millis(1));
        assert_eq!(started, vec![(0, "a1".into())]);
        // The next free slot goes to b, idle still, before busy a with a warm slot.
        s.slots[1].running = None;
        enqueue(
            &mut s,
            job("a2", "a", small(), t0),
            t0 + Duration::from_millis(2),
        );
        let started = step(&mut s, memory(), t0 + Duration::from_millis(2));
        assert_eq!(started, vec![(1, "b1".into())]);
    }

    #[test]
    fn decide_keeps_the_per_app_running_limit() {
        let t0 = Instant::now();
        let mut s = state(20);
        for i in 0..8 {
            enqueue(&mut s, job(&i.to_string(), "a", small(), t0), t0);
        }
        let started = step(&mut s, memory(), t0);
        assert_eq!(started.len(), limits().per_app_running);
        assert!(decide(&mut s, memory(), &limits(), t0).is_empty());
        // One ends: one more starts.
        let a = end(&mut s, started[0].0, Outcome::Done(None), ended(), t0);
        assert_eq!(records(&a)[0].status, Status::Done);
        assert_eq!(decide(&mut s, memory(), &limits(), t0).len(), 1);
    }

    #[test]
    fn decide_limits_daemons_per_app_but_lets_other_jobs_pass() {
        let t0 = Instant::now();
        let mut s = state(20);
        let daemon = daemon();
        for i in 0..3 {
            enqueue(&mut s, job(&format!("d{i}"), "a", daemon.clone(), t0), t0);
        }
        enqueue(&mut s, job("j", "a", small(), t0), t0);
        let mut ids: Vec<String> = step(&mut s, memory(), t0)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["d0", "d1", "j"]);
    }

    #[test]
    fn decide_memory_is_first_come_first_served() {
        let t0 = Instant::now();
        let mut s = state(20);
        let big = JobConfig {
            memory_bytes: 200 * MB,
            ..JobConfig::default()
        };
        enqueue(&mut s, job("running", "a", big.clone(), t0), t0);
        step(&mut s, memory(), t0);
        let left = Memory {
            available: 56 * MB,
            budget: 256 * MB,
        };
        let t1 = t0 + Duration::from_millis(1);
        enqueue(&mut s, job("big", "b", big, t1), t1);
        let t2 = t1 + Duration::from_millis(1);
        enqueue(&mut s, job("small", "c", small(), t2), t2);
        // The big job waits for memory, and the small one behind it does not overtake.
        assert!(decide(&mut s, left, &limits(), t2).is_empty());
        let ids: Vec<String> = step(&mut s, memory(), t2)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(ids, vec!["big", "small"]);
    }

    #[test]
    fn decide_starts_nothing_once_shutting_down() {
        let t0 = Instant::now();
        let mut s = state(2);
        enqueue(&mut s, job("1", "a", small(), t0), t0);
        shutdown(&mut s, &limits(), t0);
        assert!(decide(&mut s, memory(), &limits(), t0).is_empty());
        assert_eq!(s.queue.len(), 1);
    }

    #[test]
    fn a_failed_job_is_retried_after_its_delay() {
        let t0 = Instant::now();
        let mut s = state(1);
        let config = JobConfig {
            retry: 1,
            retry_delay_ms: 5_000,
            ..small()
        };
        enqueue(&mut s, job("1", "a", config, t0), t0);
        step(&mut s, memory(), t0);
        let a = end(&mut s, 0, Outcome::Failed("boom".into()), ended(), t0);
        let r = &records(&a)[0];
        assert_eq!(
            (r.status, r.attempt, r.error.as_deref()),
            (Status::Queued, 2, Some("boom"))
        );
        let before = t0 + Duration::from_millis(4_999);
        tick(&mut s, &[Observed::default()], false, &limits(), before);
        assert!(s.queue.is_empty(), "retried before its delay");
        let at = t0 + Duration::from_millis(5_000);
        tick(&mut s, &[Observed::default()], false, &limits(), at);
        step(&mut s, memory(), at);
        // The second attempt fails for good.
        let a = end(&mut s, 0, Outcome::Failed("boom".into()), ended(), at);
        assert_eq!(records(&a)[0].status, Status::Failed);
        assert!(s.delayed.is_empty());
    }

    #[test]
    fn daemon_backoff_doubles_and_resets_after_a_healthy_run() {
        let mut now = Instant::now();
        let mut s = state(1);
        let daemon = daemon();
        enqueue(&mut s, job("d", "a", daemon, now), now);
        let mut delays = Vec::new();
        for ran_ms in [10, 10, 10, 300_000, 10] {
            step(&mut s, memory(), now);
            now += Duration::from_millis(ran_ms);
            let a = end(&mut s, 0, Outcome::Failed("x".into()), ended(), now);
            assert_eq!(records(&a)[0].status, Status::Queued);
            let (at, _) = s.delayed[0];
            delays.push((at - now).as_secs());
            now = at;
            tick(&mut s, &[Observed::default()], false, &limits(), now);
        }
        assert_eq!(delays, vec![1, 2, 4, 1, 2]);
        assert_eq!(backoff_delay(9), BACKOFF_MAX);
    }

    #[test]
    fn a_daemon_failing_while_the_store_cannot_write_waits_for_it() {
        let t0 = Instant::now();
        let mut s = state(1);
        let daemon = daemon();
        enqueue(&mut s, job("d", "a", daemon, t0), t0);
        step(&mut s, memory(), t0);
        let degraded = Ended {
            store_degraded: true,
            ..ended()
        };
        end(&mut s, 0, Outcome::Failed("disk full".into()), degraded, t0);
        assert_eq!(s.held.len(), 1);
        tick(&mut s, &[Observed::default()], true, &limits(), t0);
        assert!(s.queue.is_empty(), "restarted while the store still fails");
        tick(&mut s, &[Observed::default()], false, &limits(), t0);
        assert_eq!(s.queue.len(), 1, "not restarted once the store writes");
    }

    #[test]
    fn a_daemon_stopped_by_shutdown_stays_queued_to_restore() {
        let t0 = Instant::now();
        let mut s = state(2);
        let daemon = daemon();
        enqueue(&mut s, job("d", "a", daemon, t0), t0);
        enqueue(&mut s, job("j", "a", small(), t0), t0);
        step(&mut s, memory(), t0);
        let a = shutdown(&mut s, &limits(), t0);
        let d = s
            .slots
            .iter()
            .position(|x| x.running.as_ref().is_some_and(|r| r.job.config.daemon));
        let d = d.expect("the daemon runs");
        assert!(matches!(
            a[..],
            [Action::Stop { slot, reason: Reason::Shutdown, .. }] if slot == d
        ));
        let a = end(
            &mut s,
            d,
            Outcome::Interrupted(Reason::Shutdown),
            ended(),
            t0,
        );
        assert_eq!(records(&a)[0].status, Status::Queued);
        // The other job gets the grace, then a hard stop.
        let j = 1 - d;
        let grace = t0 + limits().shutdown_grace;
        let obs = [Observed::default(), Observed::default()];
        assert!(tick(
            &mut s,
            &obs,
            false,
            &limits(),
            grace - Duration::from_millis(1)
        )
        .is_empty());
        let a = tick(&mut s, &obs, false, &limits(), grace);
        assert!(
            matches!(a[..], [Action::Stop { slot, reason: Reason::Shutdown, .. }] if slot == j)
        );
    }

    #[test]
    fn a_cancel_stops_a_running_job_after_the_grace_and_the_watchdog_abandons_it() {
        let t0 = Instant::now();
        let mut s = state(1);
        enqueue(&mut s, job("1", "a", small(), t0), t0);
        step(&mut s, memory(), t0);
        let (reply, replied) = crossbeam_channel::bounded(1);
        let a = cancel(&mut s, "1", Some(reply), t0);
        assert!(matches!(a[..], [Action::RequestCancel { slot: 0 }]));
        let obs = [Observed::default()];
        assert!(tick(
            &mut s,
            &obs,
            false,
            &limits(),
            t0 + CANCEL_GRACE - Duration::from_millis(1)
        )
        .is_empty());
        let stop_at = t0 + CANCEL_GRACE;
        let a = tick(&mut s, &obs, false, &limits(), stop_at);
        assert!(matches!(
            a[..],
            [Action::Stop {
                slot: 0,
                reason: Reason::Cancelled,
                ..
            }]
        ));
        let stopping = [Observed {
            stopping: true,
            ..Observed::default()
        }];
        let late = stop_at + limits().watchdog;
        assert!(tick(
            &mut s,
            &stopping,
            false,
            &limits(),
            late - Duration::from_millis(1)
        )
        .is_empty());
        let a = tick(&mut s, &stopping, false, &limits(), late);
        assert!(matches!(a[..], [Action::Abandon { slot: 0 }]));
        // What the loop does for it: the job ends as cancelled, the canceller hears.
        let outcome = abandoned(Some(Reason::Cancelled), &small(), 0);
        let a = end(&mut s, 0, outcome, ended(), late);
        assert_eq!(records(&a)[0].status, Status::Cancelled);
        for x in a {
            if let Action::Reply(tx) = x {
                tx.send(()).expect("reply");
            }
        }
        assert!(replied.try_recv().is_ok());
    }

    #[test]
    fn a_job_that_throws_in_its_cancel_grace_is_cancelled_not_retried() {
        let t0 = Instant::now();
        let mut s = state(1);
        let config = JobConfig {
            retry: 3,
            ..small()
        };
        enqueue(&mut s, job("1", "a", config, t0), t0);
        step(&mut s, memory(), t0);
        cancel(&mut s, "1", None, t0);
        let a = end(&mut s, 0, Outcome::Failed("cancelled!".into()), ended(), t0);
        assert_eq!(records(&a)[0].status, Status::Cancelled);
        assert!(s.delayed.is_empty());
    }

    #[test]
    fn a_timeout_starts_the_watchdog_and_an_abandoned_timeout_is_never_retried() {
        let t0 = Instant::now();
        let mut s = state(1);
        let config = JobConfig {
            retry: 3,
            ..small()
        };
        enqueue(&mut s, job("1", "a", config.clone(), t0), t0);
        step(&mut s, memory(), t0);
        let stopping = [Observed {
            stopping: true,
            ..Observed::default()
        }];
        let t1 = t0 + Duration::from_secs(30);
        assert!(tick(&mut s, &stopping, false, &limits(), t1).is_empty());
        let a = tick(&mut s, &stopping, false, &limits(), t1 + limits().watchdog);
        assert!(matches!(a[..], [Action::Abandon { slot: 0 }]));
        let outcome = abandoned(Some(Reason::Timeout), &config, 0);
        let a = end(&mut s, 0, outcome, ended(), t1 + limits().watchdog);
        assert_eq!(records(&a)[0].status, Status::Failed);
        assert!(s.delayed.is_empty(), "an abandoned timeout was retried");
    }

    #[test]
    fn an_idle_channel_stops_its_job_after_the_idle_timeout_and_grace() {
        let t0 = Instant::now();
        let mut s = state(1);
        let config = JobConfig {
            daemon: true,
            timeout_ms: None,
            idle_channel: Some("room".into()),
            idle_timeout_ms: Some(60_000),
            ..small()
        };
        enqueue(&mut s, job("1", "a", config, t0), t0);
        step(&mut s, memory(), t0);
        let listened = [Observed {
            listeners: Some(1),
            ..Observed::default()
        }];
        let alone = [Observed {
            listeners: Some(0),
            ..Observed::default()
        }];
        tick(&mut s, &listened, false, &limits(), t0);
        let t1 = t0 + Duration::from_secs(10);
        tick(&mut s, &listened, false, &limits(), t1);
        assert!(tick(
            &mut s,
            &alone,
            false,
            &limits(),
            t1 + Duration::from_millis(59_999)
        )
        .is_empty());
        let idle_at = t1 + Duration::from_secs(60);
        let a = tick(&mut s, &alone, false, &limits(), idle_at);
        assert!(matches!(a[..], [Action::RequestCancel { slot: 0 }]));
        let a = tick(&mut s, &alone, false, &limits(), idle_at + IDLE_GRACE);
        assert!(matches!(
            a[..],
            [Action::Stop {
                slot: 0,
                reason: Reason::Idle,
                ..
            }]
        ));
        let a = end(
            &mut s,
            0,
            Outcome::Done(None),
            ended(),
            idle_at + IDLE_GRACE,
        );
        let r = &records(&a)[0];
        assert_eq!(r.status, Status::Stopped);
        assert!(s.delayed.is_empty() && s.idle_seen.is_empty());
    }

    #[test]
    fn a_cancel_before_the_enqueue_keeps_the_job_from_running() {
        let t0 = Instant::now();
        let mut s = state(1);
        let (reply, replied) = crossbeam_channel::bounded(1);
        assert!(cancel(&mut s, "1", Some(reply), t0).is_empty());
        let a = enqueue(&mut s, job("1", "a", small(), t0), t0);
        assert_eq!(records(&a)[0].status, Status::Cancelled);
        assert!(a.iter().any(|x| matches!(x, Action::Reply(_))));
        assert!(s.queue.is_empty());
        // A cancel of a job that never comes is answered after the reply wait.
        let (reply, _rx) = crossbeam_channel::bounded(1);
        cancel(&mut s, "gone", Some(reply), t0);
        let obs = [Observed::default()];
        let soon = t0 + EARLY_CANCEL_REPLY - Duration::from_millis(1);
        assert!(tick(&mut s, &obs, false, &limits(), soon).is_empty());
        let a = tick(&mut s, &obs, false, &limits(), t0 + EARLY_CANCEL_REPLY);
        assert!(matches!(a[..], [Action::Reply(_)]));
        drop(replied);
    }

    /// Final review, MEDIUM: a cancel of a job that had just finished was held for 60 s
    /// in case the job was still on its way, and an operator's retry of that job within
    /// those 60 s was cancelled on arrival and never ran.
    #[test]
    fn an_operator_retry_is_not_cancelled_by_a_cancel_of_the_run_before() {
        let t0 = Instant::now();
        let mut s = state(1);
        let (reply, replied) = crossbeam_channel::bounded(1);
        // The job already ended: the cancel finds nothing and is held.
        assert!(cancel(&mut s, "1", Some(reply), t0).is_empty());
        let a = retry(
            &mut s,
            job("1", "a", small(), t0),
            t0 + Duration::from_secs(5),
        );
        assert!(
            records(&a).is_empty(),
            "the retry was recorded as {:?}",
            records(&a)
        );
        assert!(a.iter().any(|x| matches!(x, Action::Reply(_))));
        assert_eq!(s.queue.len(), 1);
        let started = step(&mut s, memory(), t0 + Duration::from_secs(5));
        assert_eq!(started, vec![(0, "1".to_string())]);
        drop(replied);
    }

    #[test]
    fn over_budget_stops_the_newest_job_past_its_reservation() {
        let t0 = Instant::now();
        let mut s = state(3);
        for (i, t) in [0u64, 1, 2].iter().enumerate() {
            let at = t0 + Duration::from_millis(*t);
            enqueue(
                &mut s,
                job(&i.to_string(), &format!("app{i}"), small(), at),
                at,
            );
        }
        let ids = step(&mut s, memory(), t0);
        assert_eq!(ids.len(), 3);
        for (slot, id) in &ids {
            let r = s.slots[*slot].running.as_mut().expect("running");
            r.started = t0 + Duration::from_millis(id.parse::<u64>().expect("number"));
        }
        let slot_of = |id: &str| {
            ids.iter()
                .find(|(_, j)| j == id)
                .map(|(s, _)| *s)
                .expect("slot")
        };
        let mut heaps = vec![0i64; 3];
        heaps[slot_of("0")] = 5 * MB as i64; // Over its reservation, oldest.
        heaps[slot_of("1")] = 3 * MB as i64; // Over, newest of those over.
        heaps[slot_of("2")] = (MB / 2) as i64; // Within.
        let a = over_budget(&mut s, &heaps, t0);
        assert!(matches!(
            a[..],
            [Action::Stop { slot, reason: Reason::Memory, note: Some(n) }] if slot == slot_of("1") && n == 3 * MB
        ));
    }
}
