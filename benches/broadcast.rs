//! Realtime and store benches: hub fan-out of one message to 100 subscribers over real
//! loopback sockets, written by the WebSocket event loop and read by a client thread
//! (no HTTP handshake), and `kv_set` writes through the store's batching writer as the
//! store baseline.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::Receiver;

use fazt::realtime::{Env, Hub, Listeners};

const APP: &str = "bench";
const CHANNEL: &str = "room";

/// The least a session needs from the server: the hub.
struct BenchEnv {
    hub: Hub,
}

impl Env for BenchEnv {
    fn hub(&self) -> &Hub {
        &self.hub
    }
    fn app_live(&self, _: &str) -> bool {
        true
    }
    fn ws_connected(&self) {}
}

/// A hub with `n` subscribers on `CHANNEL`, each a loopback socket served by the event
/// loop, and one thread reading the client ends (blocking in poll, never spinning, so
/// the figures hold on 2 busy cores).
struct FanOut {
    env: Arc<BenchEnv>,
    /// Bytes read by the clients so far.
    received: Arc<AtomicU64>,
    /// The reader pings this after each pass that read something.
    progress: Receiver<()>,
    // Set to end the reader, which is joined on drop.
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FanOut {
    fn new(n: usize) -> FanOut {
        let env = Arc::new(BenchEnv {
            hub: Hub::new(Arc::new(Listeners::default()), Default::default()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            let client = TcpStream::connect(addr).expect("connect");
            let (server_side, _) = listener.accept().expect("accept");
            let session = fazt::realtime::attach_raw(&env, APP, server_side).expect("attach");
            env.hub.subscribe(APP, session, CHANNEL).expect("subscribe");
            client.set_nonblocking(true).expect("non-blocking");
            clients.push(client);
        }
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (progress_tx, progress) = crossbeam_channel::bounded(1);
        let reader = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::Builder::new()
                .name("bench-clients".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut fds: Vec<libc::pollfd> = clients
                        .iter()
                        .map(|c| libc::pollfd {
                            fd: c.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        })
                        .collect();
                    while !stop.load(Ordering::Relaxed) {
                        let mut got = 0u64;
                        for c in &mut clients {
                            while let Ok(k) = c.read(&mut buf) {
                                if k == 0 {
                                    break;
                                }
                                got += k as u64;
                            }
                        }
                        if got > 0 {
                            received.fetch_add(got, Ordering::Release);
                            let _ = progress_tx.try_send(());
                        } else {
                            // SAFETY: `fds` is a live array of its length.
                            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 20) };
                        }
                    }
                })
                .expect("client reader thread")
        };
        FanOut {
            env,
            received,
            progress,
            stop,
            reader: Some(reader),
        }
    }

    /// Broadcasts one message and waits until every subscriber read its frame
    /// (`frame` bytes each).
    fn one(&self, payload: &str, n: u64, frame: u64) {
        let target = self.received.load(Ordering::Acquire) + n * frame;
        let sent = self
            .env
            .hub
            .broadcast(APP, Some(CHANNEL), payload)
            .expect("broadcast");
        assert_eq!(sent as u64, n, "every subscriber got it queued");
        while self.received.load(Ordering::Acquire) < target {
            let _ = self.progress.recv_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

fn broadcast(c: &mut Criterion) {
    // The JSON text a handler's `fazt.realtime.broadcast` would pass: a 200-char string.
    let payload = serde_json::Value::String(format!("B|0|0|{}", "x".repeat(194))).to_string();
    // The frame every subscriber reads: the hub's JSON envelope with a 13-digit
    // timestamp, behind a 4-byte header (126 + 16-bit length).
    let envelope = format!(
        "{{\"type\":\"message\",\"channel\":\"{CHANNEL}\",\"data\":{payload},\"timestamp\":{}}}",
        1_700_000_000_000u64
    );
    let frame = envelope.len() as u64 + 4;
    let mut g = c.benchmark_group("broadcast");
    for n in [1usize, 100] {
        let fan = FanOut::new(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("fanout_delivered", n), &n, |b, &n| {
            b.iter(|| fan.one(&payload, n as u64, frame))
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
