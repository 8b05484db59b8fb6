//! Realtime and store benches: hub fan-out of one message to 100 subscribers, delivered
//! into their queues and drained by a separate thread (no sockets), and `kv_set` writes
//! through the store's batching writer as the store baseline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::{Receiver, Select};

use fazt::realtime::{Hub, Listeners};

const APP: &str = "bench";
const CHANNEL: &str = "room";

/// A hub with `n` subscribers on `CHANNEL`, and one thread draining their queues in
/// place of the sessions' writer threads. Both sides block rather than spin, so the
/// figures hold on 2 busy cores.
struct FanOut {
    hub: Hub,
    /// Messages taken off the queues so far.
    delivered: Arc<AtomicU64>,
    /// The drainer pings this after each pass that took something.
    progress: Receiver<()>,
    // Set to end the drainer, which is joined on drop.
    stop: Arc<AtomicBool>,
    drainer: Option<std::thread::JoinHandle<()>>,
}

impl FanOut {
    fn new(n: usize) -> FanOut {
        let hub = Hub::new(Arc::new(Listeners::default()), Default::default());
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            // The same bound a real session's queue has.
            let (tx, rx) = crossbeam_channel::bounded(hub.limits.queue);
            let (session, _) = hub.join(APP, ip, tx, None).expect("join");
            hub.subscribe(APP, session, CHANNEL).expect("subscribe");
            receivers.push(rx);
        }
        let delivered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (progress_tx, progress) = crossbeam_channel::bounded(1);
        let drainer = {
            let (delivered, stop) = (delivered.clone(), stop.clone());
            std::thread::Builder::new()
                .name("bench-drainer".into())
                .spawn(move || {
                    let mut sel = Select::new();
                    for rx in &receivers {
                        sel.recv(rx);
                    }
                    while !stop.load(Ordering::Relaxed) {
                        let mut got = 0;
                        for rx in &receivers {
                            while let Ok(msg) = rx.try_recv() {
                                drop(msg);
                                got += 1;
                            }
                        }
                        if got > 0 {
                            delivered.fetch_add(got, Ordering::Release);
                            let _ = progress_tx.try_send(());
                        } else {
                            // Sleep until some queue has a message.
                            let _ = sel.ready_timeout(Duration::from_millis(20));
                        }
                    }
                })
                .expect("drainer thread")
        };
        FanOut {
            hub,
            delivered,
            progress,
            stop,
            drainer: Some(drainer),
        }
    }

    /// Broadcasts one message and waits until every subscriber's copy was drained.
    fn one(&self, payload: &str, n: u64) {
        let target = self.delivered.load(Ordering::Acquire) + n;
        let sent = self
            .hub
            .broadcast(APP, Some(CHANNEL), payload)
            .expect("broadcast");
        assert_eq!(sent as u64, n, "every subscriber got it queued");
        while self.delivered.load(Ordering::Acquire) < target {
            let _ = self.progress.recv_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.drainer.take() {
            let _ = t.join();
        }
    }
}

fn broadcast(c: &mut Criterion) {
    // The JSON text a handler's `fazt.realtime.broadcast` would pass: a 200-char string.
    let payload = serde_json::Value::String(format!("B|0|0|{}", "x".repeat(194))).to_string();
    let mut g = c.benchmark_group("broadcast");
    for n in [1usize, 100] {
        let fan = FanOut::new(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("fanout_delivered", n), &n, |b, &n| {
            b.iter(|| fan.one(&payload, n as u64))
        });
    }
    g.finish();
}

fn store(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = fazt::store::Store::open(tmp.path()).expect("open store");
    let mut g = c.benchmark_group("store");

    // One writer waiting for each commit: the latency a handler's kv.set sees alone.
    let mut i = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("kv_set_one_writer", |b| {
        b.iter(|| {
            i += 1;
            store
                .kv_set(APP, &format!("k{}", i % 10_000), i.to_string(), None)
                .expect("kv_set");
        })
    });

    // Four writers at once: the writer thread batches their commits.
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 250;
    g.throughput(Throughput::Elements(THREADS * PER_THREAD));
    g.bench_function("kv_set_4_writers_1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..THREADS {
                        let store = &store;
                        s.spawn(move || {
                            for k in 0..PER_THREAD {
                                store
                                    .kv_set(APP, &format!("t{t}-{k}"), k.to_string(), None)
                                    .expect("kv_set");
                            }
                        });
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });

    g.throughput(Throughput::Elements(1));
    g.bench_function("kv_get", |b| {
        b.iter(|| store.kv_get(APP, "k1").expect("kv_get"))
    });
    g.finish();
    store.close();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = broadcast, store
}
criterion_main!(benches);
