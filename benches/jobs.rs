//! Worker benches: spawn→done latency of one no-op job, the throughput of a batch of
//! 1,000 no-op jobs spread over several apps (so neither the per-app queue bound of
//! 1,000 nor the per-app running limit of 5 is what gets measured), and the store side
//! of 100 spawns, waited one by one against batched.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

use fazt::store::AppFile;

const WORKER: &str = "workers/noop.js";
/// Apps the batch is spread over: 10 × 5 running ≥ the 20 slots, 100 queued each.
const BATCH_APPS: usize = 10;
const BATCH: usize = 1000;
/// How often the bench thread looks at the store while it waits. Short enough to add
/// little to a sub-millisecond latency; a sleep, not a spin, so it leaves the 2 cores
/// to the scheduler, the slots and the writer.
const POLL: Duration = Duration::from_micros(100);

mod common;
use common::start_server;

fn deploy_noop(services: &fazt::services::Services, app: &str) {
    services
        .store
        .deploy_app(
            app,
            vec![AppFile {
                path: WORKER.into(),
                content: b"module.exports = function (job) { return null; };".to_vec(),
            }],
        )
        .expect("deploy");
}

/// 1 MB reservations, so 20 jobs fit the 256 MB budget at once and only the slots
/// limit concurrency.
fn opts() -> serde_json::Value {
    serde_json::json!({ "memory": "1MB" })
}

fn is_done(services: &fazt::services::Services, id: &str) -> bool {
    let row = services
        .store
        .get_job(id)
        .expect("get_job")
        .expect("job exists");
    match row.status {
        fazt::worker::Status::Done => true,
        s if s.is_final() => panic!("job {id} ended {s:?}: {:?}", row.error),
        _ => false,
    }
}

fn jobs(c: &mut Criterion) {
    let server = start_server(2);
    let services = server.handle.services.clone();
    deploy_noop(&services, "lat");
    let batch_apps: Vec<String> = (0..BATCH_APPS).map(|i| format!("batch{i}")).collect();
    for app in &batch_apps {
        deploy_noop(&services, app);
    }

    let mut g = c.benchmark_group("jobs");

    // One job at a time: spawn (store insert + enqueue), scheduler start, slot run,
    // outcome committed and visible to a reader.
    g.bench_function("spawn_to_done", |b| {
        b.iter(|| {
            let row = fazt::worker::spawn(&services.store, &services.pool, "lat", WORKER, &opts())
                .expect("spawn");
            while !is_done(&services, &row.id) {
                std::thread::sleep(POLL);
            }
        })
    });

    // 1,000 jobs spawned back to back, timed until the last is done.
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(25));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("batch_1000_spawn_to_all_done", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut pending = VecDeque::with_capacity(BATCH);
                for i in 0..BATCH {
                    let app = &batch_apps[i % BATCH_APPS];
                    let row =
                        fazt::worker::spawn(&services.store, &services.pool, app, WORKER, &opts())
                            .expect("spawn");
                    pending.push_back(row.id);
                }
                // Jobs finish roughly in spawn order: drop the finished front, then wait.
                while let Some(id) = pending.front() {
                    if is_done(&services, id) {
                        pending.pop_front();
                    } else {
                        std::thread::sleep(POLL * 10);
                    }
                }
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();

    // The store side of 100 spawns: each insert waited for (one writer round trip and
    // commit per job, how a spawn in a worker or with a uniqueKey goes) against the
    // 100 queued at once and then waited for (how a handler's spawns are batched). The
    // rows stay queued in the store (the pool is not told), under an app of their own.
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(100));
    let config = fazt::worker::JobConfig::default();
    g.bench_function("insert_100_waited", |b| {
        b.iter(|| {
            for _ in 0..100 {
                let id = fazt::worker::new_job_id();
                services
                    .store
                    .insert_job(id, "ins", WORKER, &config, None, None)
                    .expect("insert");
            }
        })
    });
    g.bench_function("insert_100_batched", |b| {
        b.iter(|| {
            let pending: Vec<_> = (0..100)
                .map(|_| {
                    let id = fazt::worker::new_job_id();
                    services
                        .store
                        .insert_job_begin(id, "ins", WORKER, &config, None, None, |_| {})
                        .expect("queue the insert")
                        .1
                })
                .collect();
            for p in pending {
                p.wait().expect("insert");
            }
        })
    });
    g.finish();

    server.handle.shutdown();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = jobs
}
criterion_main!(benches);
