//! The run queue: which queued job is offered a free slot next. A plain data structure
//! with a pure policy taking `now`, so the rules test in microseconds.
//!
//! One queue per app. Apps take turns in classes the caller assigns (the pool: apps
//! with nothing running first, so an idle app's job takes the next free slot whatever
//! the others queued; then apps a free slot is warm for, since a fresh JS context costs
//! milliseconds; then the rest). Inside a class the app served least recently goes
//! first (apps never served by the arrival of their oldest job). Inside an app, higher
//! `priority` goes first, and waiting ages a job upwards so `low` is never starved;
//! equal ranks go by arrival.
//!
//! The cost of a pick is O(apps with queued jobs × log) plus the jobs it starts or
//! skips, never O(queued jobs): a backlog of 10,000 jobs costs nothing per free slot.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::ops::Bound;
use std::time::{Duration, Instant};

pub use crate::job::Priority;

/// Each this long a job waits counts as one priority level more. A `low` job queued
/// at `t` therefore goes before every `high` job of its app queued at
/// `t + 2 * AGING_STEP` or later (equal ranks go by arrival), and before every `normal`
/// one queued at `t + AGING_STEP` or later: it can be passed only by the jobs that
/// arrived within 20 s after it, a bounded number, so it always gets its turn.
pub const AGING_STEP: Duration = Duration::from_secs(10);

/// What the queue needs to know of a job.
pub trait Item {
    fn id(&self) -> &str;
    fn app(&self) -> &str;
    fn priority(&self) -> Priority;
    /// When it joined the queue (or re-joined it: retries, daemon restarts).
    fn since(&self) -> Instant;
}

/// The caller's side of a pick: which class an app is in now, and whether the job the
/// queue offers may start.
pub trait Judge<T> {
    /// Lower classes are offered slots first. Asked again whenever the app comes up,
    /// and a class may only grow during a pick (the caller's state only fills up).
    fn class(&self, app: &str) -> u8;
    fn judge(&mut self, item: &T) -> Verdict;
}

/// Every app in one class, the verdict from a closure: plain turns.
pub struct Turns<F>(F);

impl<F> Turns<F> {
    pub fn new<T>(f: F) -> Self
    where
        F: FnMut(&T) -> Verdict,
    {
        Turns(f)
    }
}

impl<T, F: FnMut(&T) -> Verdict> Judge<T> for Turns<F> {
    fn class(&self, _: &str) -> u8 {
        0
    }
    fn judge(&mut self, item: &T) -> Verdict {
        (self.0)(item)
    }
}

/// The caller's judgement of the job the queue offers next (limits, memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start it: it leaves the queue and its app's turn ends.
    Start,
    /// Not this job (say a daemon over its app's daemon limit); the app's next one.
    SkipJob,
    /// None of this app's jobs now (the app is at its running limit).
    SkipApp,
    /// Nothing more this pass (a job waits for memory: nobody overtakes it).
    Stop,
}

struct AppQueue<T> {
    /// By arrival number.
    jobs: BTreeMap<u64, T>,
    /// How many of `jobs` are not `Normal`: with none, arrival order is rank order.
    prioritized: usize,
}

/// Per-app queues with turns between apps.
pub struct Queue<T> {
    apps: HashMap<String, AppQueue<T>>,
    /// Job id → (app, arrival number), for cancels.
    ids: HashMap<String, (String, u64)>,
    /// The turn number of each app's last start (absent: never, or not since it was
    /// last seen with an empty queue and forgotten).
    served: HashMap<String, u64>,
    seq: u64,
    turn: u64,
    len: usize,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            apps: HashMap::new(),
            ids: HashMap::new(),
            served: HashMap::new(),
            seq: 0,
            turn: 0,
            len: 0,
        }
    }
}

/// Priority level plus one per [`AGING_STEP`] waited.
fn rank(priority: Priority, since: Instant, now: Instant) -> u64 {
    let waited = now.saturating_duration_since(since);
    priority.level() + (waited.as_millis() / AGING_STEP.as_millis()) as u64
}

/// Where one app is in a pass: its jobs in the order it offers them.
enum Cursor {
    /// All `Normal`: arrival order, after this arrival number.
    Fifo(Option<u64>),
    /// Some priorities: the arrival numbers sorted by rank, and the next index.
    Ranked(Vec<u64>, usize),
}

impl<T: Item> Queue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `app` has a queued job.
    pub fn has_app(&self, app: &str) -> bool {
        self.apps.contains_key(app)
    }

    /// Appends a job at the back of its app's queue.
    pub fn push(&mut self, item: T) {
        self.seq += 1;
        let app = item.app().to_string();
        self.ids
            .insert(item.id().to_string(), (app.clone(), self.seq));
        let q = self.apps.entry(app).or_insert_with(|| AppQueue {
            jobs: BTreeMap::new(),
            prioritized: 0,
        });
        if item.priority() != Priority::Normal {
            q.prioritized += 1;
        }
        q.jobs.insert(self.seq, item);
        self.len += 1;
    }

    /// Takes job `id` out of the queue (a cancel).
    pub fn remove(&mut self, id: &str) -> Option<T> {
        let (app, seq) = self.ids.remove(id)?;
        self.take(&app, seq)
    }

    fn take(&mut self, app: &str, seq: u64) -> Option<T> {
        let q = self.apps.get_mut(app)?;
        let item = q.jobs.remove(&seq)?;
        if item.priority() != Priority::Normal {
            q.prioritized -= 1;
        }
        if q.jobs.is_empty() {
            self.apps.remove(app);
        }
        self.ids.remove(item.id());
        self.len -= 1;
        Some(item)
    }

    /// Every queued job, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.apps.values().flat_map(|q| q.jobs.values())
    }

    /// Offers queued jobs to `judge` in turn order until it started `free` of them,
    /// said [`Verdict::Stop`], or every app was offered all it has; returns the started
    /// ones, in the order they were started. Each start ends its app's turn: the next
    /// offer goes to the lowest class, in it to the app served least recently (apps
    /// never served first, by the arrival of their oldest job).
    pub fn pick(&mut self, free: usize, now: Instant, judge: &mut impl Judge<T>) -> Vec<T> {
        if free == 0 || self.is_empty() {
            return Vec::new();
        }
        // Min-heap of apps by (class, last served, oldest arrival, name).
        let mut turns: BinaryHeap<Reverse<(u8, u64, u64, &str)>> = BinaryHeap::new();
        let mut cursors: HashMap<&str, Cursor> = HashMap::new();
        for (app, q) in &self.apps {
            let Some((&first, _)) = q.jobs.first_key_value() else {
                continue;
            };
            let served = self.served.get(app).copied().unwrap_or(0);
            turns.push(Reverse((judge.class(app), served, first, app.as_str())));
            let cursor = if q.prioritized == 0 {
                Cursor::Fifo(None)
            } else {
                let mut ranked: Vec<(Reverse<u64>, u64)> = q
                    .jobs
                    .iter()
                    .map(|(&seq, j)| (Reverse(rank(j.priority(), j.since(), now)), seq))
                    .collect();
                ranked.sort_unstable();
                Cursor::Ranked(ranked.into_iter().map(|(_, s)| s).collect(), 0)
            };
            cursors.insert(app.as_str(), cursor);
        }
        // (app, arrival number, turn number of the start)
        let mut started: Vec<(String, u64, u64)> = Vec::new();
        let mut turn = self.turn;
        while started.len() < free {
            let Some(Reverse((class, served, first, app))) = turns.pop() else {
                break;
            };
            let now_class = judge.class(app);
            if now_class != class {
                // Its class grew since it was queued for a turn: queue it again.
                turns.push(Reverse((now_class, served, first, app)));
                continue;
            }
            let q = &self.apps[app];
            let Some(cursor) = cursors.get_mut(app) else {
                continue;
            };
            let seq = match cursor {
                Cursor::Fifo(after) => {
                    let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
                    let next = q
                        .jobs
                        .range((lower, Bound::Unbounded))
                        .next()
                        .map(|(&s, _)| s);
                    *after = next;
                    next
                }
                Cursor::Ranked(order, i) => {
                    let next = order.get(*i).copied();
                    *i += 1;
                    next
                }
            };
            let Some(seq) = seq else {
                continue; // Offered all it has.
            };
            match judge.judge(&q.jobs[&seq]) {
                Verdict::Start => {
                    turn += 1;
                    started.push((app.to_string(), seq, turn));
                    turns.push(Reverse((judge.class(app), turn, first, app)));
                }
                Verdict::SkipJob => turns.push(Reverse((class, served, first, app))),
                Verdict::SkipApp => {}
                Verdict::Stop => break,
            }
        }
        drop(turns);
        drop(cursors);
        self.turn = turn;
        let mut out = Vec::with_capacity(started.len());
        for (app, seq, turn) in started {
            self.turn_taken(&app, turn);
            if let Some(item) = self.take(&app, seq) {
                out.push(item);
            }
        }
        out
    }

    fn turn_taken(&mut self, app: &str, turn: u64) {
        // Turn numbers are unique and grow: an app's last start is its highest.
        self.served.insert(app.to_string(), turn);
        // Forget apps with nothing queued once the map grows: a forgotten app counts
        // as never served, which only favours an app that has one job now and then.
        if self.served.len() > 4 * self.apps.len() + 64 {
            let apps = &self.apps;
            self.served.retain(|a, _| apps.contains_key(a));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct J {
        id: String,
        app: &'static str,
        priority: Priority,
        since: Instant,
    }

    impl Item for J {
        fn id(&self) -> &str {
            &self.id
        }
        fn app(&self) -> &str {
            self.app
        }
        fn priority(&self) -> Priority {
            self.priority
        }
        fn since(&self) -> Instant {
            self.since
        }
    }

    fn j(id: u32, app: &'static str, priority: Priority, since: Instant) -> J {
        J {
            id: id.to_string(),
            app,
            priority,
            since,
        }
    }

    fn queue(jobs: &[J]) -> Queue<J> {
        let mut q = Queue::default();
        for job in jobs {
            q.push(job.clone());
        }
        q
    }

    fn ids(started: &[J]) -> Vec<&str> {
        started.iter().map(|j| j.id.as_str()).collect()
    }

    fn all(q: &mut Queue<J>, now: Instant) -> Vec<J> {
        q.pick(usize::MAX, now, &mut Turns::new(|_| Verdict::Start))
    }

    #[test]
    fn one_app_all_normal_is_fifo() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Normal, t),
            j(2, "a", Priority::Normal, t),
            j(3, "a", Priority::Normal, t),
        ]);
        assert_eq!(ids(&all(&mut q, t)), ["1", "2", "3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn higher_priority_of_an_app_goes_first() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Low, t),
            j(2, "a", Priority::Normal, t),
            j(3, "a", Priority::High, t),
            j(4, "a", Priority::Normal, t),
        ]);
        assert_eq!(ids(&all(&mut q, t)), ["3", "2", "4", "1"]);
    }

    #[test]
    fn apps_take_turns() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Normal, t),
            j(2, "a", Priority::Normal, t),
            j(3, "a", Priority::Normal, t),
            j(4, "b", Priority::Normal, t),
            j(5, "b", Priority::Normal, t),
            j(6, "c", Priority::Normal, t),
        ]);
        assert_eq!(ids(&all(&mut q, t)), ["1", "4", "6", "2", "5", "3"]);
    }

    #[test]
    fn an_idle_apps_job_waits_one_round_behind_a_flood_queued_before_it() {
        let t = Instant::now();
        let mut jobs: Vec<J> = (0..10_000)
            .map(|i| j(i, ["a", "b", "c", "d"][i as usize % 4], Priority::Normal, t))
            .collect();
        jobs.push(j(99_999, "idle", Priority::Normal, t));
        let mut q = queue(&jobs);
        // Never served, the apps go by arrival: one job of each flood app, then the
        // idle app's, before any flood app's second.
        let first = q.pick(5, t, &mut Turns::new(|_| Verdict::Start));
        assert_eq!(ids(&first), ["0", "1", "2", "3", "99999"]);
    }

    #[test]
    fn a_late_app_goes_first_when_the_others_were_served() {
        let t = Instant::now();
        let mut q = queue(
            &(0..1000)
                .map(|i| j(i, if i % 2 == 0 { "a" } else { "b" }, Priority::Normal, t))
                .collect::<Vec<_>>(),
        );
        assert_eq!(q.pick(20, t, &mut Turns::new(|_| Verdict::Start)).len(), 20);
        q.push(j(5000, "late", Priority::Normal, t));
        assert_eq!(
            ids(&q.pick(1, t, &mut Turns::new(|_| Verdict::Start))),
            ["5000"]
        );
    }

    #[test]
    fn the_least_recently_served_app_goes_first() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Normal, t),
            j(2, "b", Priority::Normal, t),
            j(3, "a", Priority::Normal, t),
            j(4, "b", Priority::Normal, t),
        ]);
        // b is at its limit this pass: a is served.
        let first = q.pick(
            1,
            t,
            &mut Turns::new(|j: &J| {
                if j.app == "b" {
                    Verdict::SkipApp
                } else {
                    Verdict::Start
                }
            }),
        );
        assert_eq!(ids(&first), ["1"]);
        // Next free slot: b was never served, a just was.
        assert_eq!(
            ids(&q.pick(1, t, &mut Turns::new(|_| Verdict::Start))),
            ["2"]
        );
        assert_eq!(
            ids(&q.pick(1, t, &mut Turns::new(|_| Verdict::Start))),
            ["3"]
        );
    }

    #[test]
    fn an_app_at_its_limit_blocks_no_other() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Normal, t),
            j(2, "a", Priority::Normal, t),
            j(3, "b", Priority::Normal, t),
        ]);
        let got = q.pick(
            5,
            t,
            &mut Turns::new(|j: &J| {
                if j.app == "a" {
                    Verdict::SkipApp
                } else {
                    Verdict::Start
                }
            }),
        );
        assert_eq!(ids(&got), ["3"]);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn skip_job_offers_the_same_apps_next_job() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Normal, t),
            j(2, "a", Priority::Normal, t),
            j(3, "b", Priority::Normal, t),
        ]);
        let got = q.pick(
            1,
            t,
            &mut Turns::new(|j: &J| {
                if j.id == "1" {
                    Verdict::SkipJob
                } else {
                    Verdict::Start
                }
            }),
        );
        assert_eq!(ids(&got), ["2"]);
    }

    #[test]
    fn stop_ends_the_pass_so_nobody_overtakes_a_job_waiting_for_memory() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Normal, t),
            j(2, "b", Priority::Normal, t),
            j(3, "c", Priority::Normal, t),
        ]);
        let got = q.pick(
            3,
            t,
            &mut Turns::new(|j: &J| {
                if j.id == "2" {
                    Verdict::Stop
                } else {
                    Verdict::Start
                }
            }),
        );
        assert_eq!(ids(&got), ["1"]);
        assert_eq!(q.len(), 2);
    }

    /// Classes as the pool assigns them: "idle" has nothing running (0), "warm" has
    /// a free slot warm for it (1, until it used it), the rest 2.
    struct Classes {
        warm_left: usize,
    }

    impl Judge<J> for Classes {
        fn class(&self, app: &str) -> u8 {
            match app {
                "idle" => 0,
                "warm" if self.warm_left > 0 => 1,
                _ => 2,
            }
        }
        fn judge(&mut self, j: &J) -> Verdict {
            if j.app == "warm" {
                self.warm_left = self.warm_left.saturating_sub(1);
            }
            Verdict::Start
        }
    }

    #[test]
    fn lower_classes_go_first_then_turns() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "busy", Priority::Normal, t),
            j(2, "warm", Priority::Normal, t),
            j(3, "warm", Priority::Normal, t),
            j(4, "idle", Priority::Normal, t),
            j(5, "busy", Priority::Normal, t),
        ]);
        let got = q.pick(5, t, &mut Classes { warm_left: 1 });
        // idle (class 0); warm for its one warm slot (class 1); then turns between
        // busy and warm, busy never served.
        assert_eq!(ids(&got), ["4", "2", "1", "3", "5"]);
    }

    #[test]
    fn each_start_of_a_pass_keeps_its_own_turn() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "busy", Priority::Normal, t),
            j(2, "busy", Priority::Normal, t),
            j(3, "idle", Priority::Normal, t),
            j(4, "idle", Priority::Normal, t),
        ]);
        // Like the pool: an app with nothing running is class 0, until it starts one.
        struct NothingRunningFirst(Vec<&'static str>);
        impl Judge<J> for NothingRunningFirst {
            fn class(&self, app: &str) -> u8 {
                u8::from(self.0.contains(&app))
            }
            fn judge(&mut self, j: &J) -> Verdict {
                self.0.push(j.app);
                Verdict::Start
            }
        }
        // Busy runs a job already; idle goes first although busy's jobs came first.
        let first = q.pick(2, t, &mut NothingRunningFirst(vec!["busy"]));
        assert_eq!(ids(&first), ["3", "1"]);
        // Next slot, plain turns: idle was served before busy in that pass.
        assert_eq!(
            ids(&q.pick(1, t, &mut Turns::new(|_| Verdict::Start))),
            ["4"]
        );
    }

    #[test]
    fn remove_takes_a_job_out() {
        let t = Instant::now();
        let mut q = queue(&[j(1, "a", Priority::High, t), j(2, "a", Priority::Normal, t)]);
        assert_eq!(q.remove("1").map(|j| j.id), Some("1".to_string()));
        assert!(q.remove("1").is_none());
        assert_eq!(q.len(), 1);
        assert_eq!(ids(&all(&mut q, t)), ["2"]);
        assert!(q.apps.is_empty() && q.ids.is_empty());
    }

    #[test]
    fn low_ages_past_newer_high_jobs() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(100);
        let low = j(1, "a", Priority::Low, t0);
        // Queued within 2 aging steps of the low job: may still go first.
        let soon = j(2, "a", Priority::High, t0 + Duration::from_secs(5));
        assert_eq!(ids(&all(&mut queue(&[low.clone(), soon]), now)), ["2", "1"]);
        // Queued later than that: behind it, however many keep coming.
        let mut jobs = vec![low];
        jobs.extend((0..50).map(|i| {
            j(
                10 + i,
                "a",
                Priority::High,
                t0 + Duration::from_secs(20 + i as u64),
            )
        }));
        assert_eq!(
            ids(&queue(&jobs).pick(1, now, &mut Turns::new(|_| Verdict::Start))),
            ["1"]
        );
    }

    #[test]
    fn equal_rank_keeps_arrival_order() {
        let t0 = Instant::now();
        // A low job that waited one step ranks as a fresh normal one; it came first.
        let mut q = queue(&[
            j(1, "a", Priority::Low, t0),
            j(2, "a", Priority::Normal, t0 + AGING_STEP),
        ]);
        assert_eq!(ids(&all(&mut q, t0 + AGING_STEP)), ["1", "2"]);
    }

    #[test]
    fn a_clock_behind_since_counts_as_no_wait() {
        let t = Instant::now();
        let mut q = queue(&[
            j(1, "a", Priority::Low, t + Duration::from_secs(5)),
            j(2, "a", Priority::High, t),
        ]);
        assert_eq!(ids(&all(&mut q, t)), ["2", "1"]);
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
