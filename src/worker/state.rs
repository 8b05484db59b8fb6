//! The scheduler's state: the run queue, jobs waiting out a delay, what each slot runs,
//! per-app counts. Plain data owned by the scheduler thread; the rules that change it
//! are in `policy.rs`, the side effects (threads, store, replies) in `pool.rs`.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::pool::Queued;
use super::queue::Queue;
use crate::js::{Interrupt, Reason};

/// A job on a slot.
pub(crate) struct Running {
    pub job: Queued,
    /// The run's stop flag, shared with the slot thread; the policy never reads it
    /// (the loop samples it into [`Observed`](super::policy::Observed)).
    pub interrupt: Interrupt,
    pub started: Instant,
    /// The slot thread's heap when the job started: what the job holds is the growth.
    pub heap_at_start: i64,
    /// Hard stop due at this instant (cancel or idle grace, shutdown grace), with the
    /// reason.
    pub stop_at: Option<(Instant, Reason)>,
    /// When the hard stop was sent (or the deadline passed); the watchdog counts from
    /// here.
    pub stopped_at: Option<Instant>,
    /// A cancel was asked for (cooperative: `job.cancelled` is true). Mirrors the
    /// interrupt's flag so the policy decides the status without reading atomics.
    pub cancel_asked: bool,
    /// Callers waiting for this job to stop.
    pub waiters: Vec<Sender<()>>,
    /// Listener counter of the job's idle channel, fetched once at dispatch so the
    /// per-tick idle check is a plain atomic load.
    pub idle_listeners: Option<Arc<AtomicUsize>>,
}

/// A slot as the scheduler sees it (its thread's handles live in `pool.rs`).
#[derive(Default)]
pub(crate) struct SlotState {
    /// Bumped when the thread is replaced, so a late report of an abandoned thread is
    /// recognised and ignored.
    pub gen: u64,
    pub running: Option<Running>,
    /// Its thread was abandoned and no replacement could be started yet.
    pub broken: bool,
    /// The app whose context the slot keeps warm (the last one it ran): dispatch
    /// prefers such a slot, since a fresh context costs about 0.2 ms plus loading.
    pub warm_app: Option<String>,
    /// When its last run ended: of the free slots warm for other apps, the one idle
    /// longest is the one whose context a job of a new app replaces.
    pub idle_since: Option<Instant>,
}

impl SlotState {
    pub fn is_free(&self) -> bool {
        self.running.is_none() && !self.broken
    }
}

/// Running jobs of one app, for the per-app limits.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AppCounts {
    pub running: usize,
    pub daemons: usize,
}

/// A cancel that arrived before its job (see [`State::early_cancels`]).
pub(crate) struct EarlyCancel {
    pub at: Instant,
    /// The caller, answered when the job arrives, or after the policy's reply wait (the
    /// job was not in flight but had already ended).
    pub reply: Option<Sender<()>>,
}

/// Everything the scheduler decides over.
#[derive(Default)]
pub(crate) struct State {
    pub slots: Vec<SlotState>,
    /// Runnable jobs: per-app queues, apps taking turns (see `queue.rs`).
    pub queue: Queue<Queued>,
    /// Jobs waiting out a retry delay or a daemon backoff, in the order they failed.
    pub delayed: Vec<(Instant, Queued)>,
    /// Daemons that failed while the store could not write: most likely the store's
    /// doing (a checkpoint threw), so they wait for it instead of burning backoff.
    pub held: Vec<Queued>,
    pub apps: HashMap<String, AppCounts>,
    /// Consecutive failures of each daemon, for the backoff.
    pub streaks: HashMap<String, u32>,
    /// When each idle-watched job's channel was last seen with a listener.
    pub idle_seen: HashMap<String, Instant>,
    /// Cancels of jobs the scheduler has not seen: a spawn commits its row before it
    /// enqueues, so a cancel can overtake the job. Its enqueue then finds the cancel
    /// here instead of running.
    pub early_cancels: HashMap<String, EarlyCancel>,
    /// Since when the pool shuts down: nothing starts any more.
    pub shutting_down: Option<Instant>,
    /// Apps whose removal began (and when): a job of theirs may reach the queue after
    /// its row was deleted (spawned by a run that outlived the removal's wait), so
    /// dispatch checks that such a job's row still exists. Other jobs without data
    /// skip that read.
    pub removed_apps: HashMap<String, Instant>,
    /// Apps whose next job waits for one of their own slots to free up rather than
    /// replace another app's warm context, and since when (see `policy::SPREAD_WAIT`).
    pub spread_wait: HashMap<String, Instant>,
    /// How long each app's jobs typically run (a moving average of their functions'
    /// run times, setup left out): short ones wait for their app's own slot.
    pub run_time: HashMap<String, Duration>,
}

impl State {
    /// Queues a job (new, retried, restarted) as of `now`. Waiting jobs keep their data
    /// in the store (up to 1 MB each, 1,000 per app), not here: dispatch reads it back.
    pub fn push_queue(&mut self, mut job: Queued, now: Instant) {
        job.data = None;
        job.since = now;
        self.queue.push(job);
    }

    /// Counts a job as running on slot `slot`.
    pub fn start(&mut self, slot: usize, run: Running) {
        let counts = self.apps.entry(run.job.app.clone()).or_default();
        counts.running += 1;
        counts.daemons += usize::from(run.job.config.daemon);
        let s = &mut self.slots[slot];
        s.warm_app = Some(run.job.app.clone());
        s.running = Some(run);
    }

    /// Folds one run's time into its app's moving average (each run weighs a quarter).
    pub fn note_run(&mut self, app: &str, ran: Duration) {
        match self.run_time.get_mut(app) {
            Some(t) => *t = (*t * 3 + ran) / 4,
            None => {
                self.run_time.insert(app.to_string(), ran);
            }
        }
    }

    /// Undoes [`start`](Self::start)'s counts for a job that left its slot.
    pub fn release(&mut self, job: &Queued) {
        if let Some(c) = self.apps.get_mut(&job.app) {
            c.running = c.running.saturating_sub(1);
            if job.config.daemon {
                c.daemons = c.daemons.saturating_sub(1);
            }
            if c.running == 0 {
                self.apps.remove(&job.app);
            }
        }
    }

    /// Jobs whose retry delay or backoff ended by `now`, back in the queue in the order
    /// they failed.
    pub fn requeue_due(&mut self, now: Instant) {
        if self.delayed.iter().all(|(at, _)| *at > now) {
            return;
        }
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.delayed = wait;
        for (_, job) in due {
            self.push_queue(job, now);
        }
    }

    pub fn running(&self) -> impl Iterator<Item = &Running> {
        self.slots.iter().filter_map(|s| s.running.as_ref())
    }

    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_free()).count()
    }

    /// Jobs waiting in any form: queued, delayed, held.
    pub fn waiting(&self) -> usize {
        self.queue.len() + self.delayed.len() + self.held.len()
    }
}
