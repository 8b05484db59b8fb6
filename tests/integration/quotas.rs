//! Quotas and retention (issue 9, item 5): the kv quota per app, finished-job retention
//! by count and age, handler log lines cut like workers', waiting jobs' data kept in the
//! store. (That /metrics reads counters, not the jobs table, is shown by the store's
//! unit test `metrics_job_counts_do_not_scan_the_jobs_table`.)

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::{wait_until, Server};

const APP: &[(&str, &str)] = &[
    (
        "api/kv.js",
        r#"module.exports = function (req) {
  const q = req.query;
  try {
    if (q.op === "del") return { deleted: fazt.storage.kv.delete(q.key) };
    fazt.storage.kv.set(q.key, "x".repeat(Number(q.size)), q.ttl ? Number(q.ttl) : undefined);
    return { ok: true };
  } catch (e) {
    return { status: 507, body: { error: e.message } };
  }
};"#,
    ),
    (
        "api/spawn.js",
        r#"module.exports = function (req) {
  const b = req.body || {};
  return fazt.worker.spawn(b.path || "workers/quick.js", b.opts || {});
};"#,
    ),
    (
        "api/log.js",
        r#"module.exports = function (req) {
  console.log("big:" + "y".repeat(2 * 1024 * 1024));
  return { ok: true };
};"#,
    ),
    ("workers/quick.js", "module.exports = (job) => job.data;"),
    (
        "workers/hold.js",
        "module.exports = (job) => { while (!fazt.storage.kv.get('go')) job.sleep(20); return job.data ? job.data.length : 0; };",
    ),
];

fn kv(s: &Server, app: &str, key: &str, size: usize) -> crate::util::Resp {
    s.app(app, "GET", &format!("/api/kv?key={key}&size={size}"), None)
}

#[test]
fn kv_quota_full_is_a_clear_error() {
    let s = Server::start_with(&["--kv-quota", "64KB"]);
    s.deploy_ok("a", APP);
    s.deploy_ok("b", APP);
    for i in 0..5 {
        let r = kv(&s, "a", &format!("k{i}"), 10_000);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // 50 KB used: 20 KB more does not fit.
    let r = kv(&s, "a", "big", 20_000);
    assert_eq!(r.status, 507, "{}", r.text());
    let e = r.error();
    assert!(
        e.contains("kv storage of app 'a' is full") && e.contains("65536-byte quota"),
        "{e}"
    );
    // Overwriting a key counts only the difference; other apps have their own quota.
    assert_eq!(kv(&s, "a", "k0", 12_000).status, 200);
    assert_eq!(kv(&s, "b", "big", 60_000).status, 200);
    // Deleting frees room.
    let r = s.app("a", "GET", "/api/kv?op=del&key=k1", None);
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(kv(&s, "a", "big", 8_000).status, 200);
    // Expired keys do not hold the quota.
    let r = s.app("a", "GET", "/api/kv?key=tmp&size=10000&ttl=50", None);
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(kv(&s, "a", "after-expiry", 9_000).status, 200);
}

fn spawn(s: &Server, app: &str, path: &str, opts: Value) -> String {
    let body = json!({ "path": path, "opts": opts }).to_string();
    let r = s.app(app, "POST", "/api/spawn", Some(&body));
    assert_eq!(r.status, 200, "spawn: {}", r.text());
    r.json()["id"].as_str().expect("id").to_string()
}

fn count(s: &Server, app: &str, status: &str) -> usize {
    s.api_json(
        "GET",
        &format!("/api/jobs?app={app}&status={status}&limit=1000"),
    )
    .as_array()
    .map_or(0, Vec::len)
}

#[test]
fn finished_jobs_are_pruned_by_count_and_age() {
    let s = Server::start_with(&["--jobs-keep", "5", "--jobs-max-age", "6s"]);
    s.deploy_ok("a", APP);
    s.deploy_ok("b", APP);
    let held = spawn(&s, "a", "workers/hold.js", json!({}));
    // One at a time, so they finish in spawn order: with five running at once a job
    // on a cold slot can end after later ones (seen in CI), and "newest" means last
    // finished. The newest finished job is never pruned, so waiting on it is safe.
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = spawn(&s, "a", "workers/quick.js", json!({ "data": i }));
        s.wait_status(&id, "done", 10);
        ids.push(id);
    }
    let b = spawn(&s, "b", "workers/quick.js", json!({ "data": 1 }));
    s.wait_status(&b, "done", 10);
    // Pruning may start as soon as they end: wait on the pool, not on each job.
    let ok = wait_until(10, || {
        let h = s.health();
        h["workers"]["running"] == 1 && h["workers"]["queued"] == 0
    });
    assert!(ok, "{}", s.health());
    // By count: app a keeps its 5 newest finished jobs; b (1 job) and the live job stay.
    let ok = wait_until(10, || count(&s, "a", "done") == 5);
    assert!(ok, "{} done jobs of a left", count(&s, "a", "done"));
    let r = s.api("GET", &format!("/api/jobs/{}", ids[0]), None);
    assert_eq!(r.status, 404, "the oldest is gone");
    // The newest are kept (ends within one ms tie-break by id, so check the later half).
    let kept = s.api_json("GET", "/api/jobs?app=a&status=done");
    for j in kept.as_array().expect("jobs") {
        let id = j["id"].as_str().unwrap_or_default().to_string();
        assert!(ids[10..].contains(&id), "an old job was kept: {j}");
    }
    assert_eq!(s.job(&b)["status"], "done");
    assert_eq!(
        s.job(&held)["status"],
        "running",
        "live jobs are never pruned"
    );
    // By age: after 6 s every finished job goes, the running one stays.
    let ok = wait_until(15, || {
        count(&s, "a", "done") == 0 && count(&s, "b", "done") == 0
    });
    assert!(ok, "finished jobs older than 6 s are still there");
    assert_eq!(s.job(&held)["status"], "running");
}

#[test]
fn handler_log_line_is_truncated() {
    let s = Server::start();
    s.deploy_ok("a", APP);
    let before = s.stderr_bytes.load(Ordering::Relaxed);
    let r = s.app("a", "GET", "/api/log", None);
    assert_eq!(r.status, 200, "{}", r.text());
    // The line reaches the log (cut), not 2 MB of it (a handler may allocate 64 MB).
    let ok = wait_until(10, || {
        s.stderr_bytes.load(Ordering::Relaxed) > before + 8 * 1024
    });
    assert!(ok, "the log line never arrived");
    std::thread::sleep(Duration::from_millis(200));
    let grew = s.stderr_bytes.load(Ordering::Relaxed) - before;
    assert!(grew < 64 * 1024, "the server log grew by {grew} bytes");
}

#[test]
fn queued_job_data_stays_in_the_store() {
    // One malloc arena, and big blocks always mmap'd: freed memory goes back to the
    // system at once, so RSS shows what is held rather than what was once touched.
    let s = Server::start_with_env(
        &[],
        &[
            ("MALLOC_ARENA_MAX", "1"),
            ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ],
        None,
    );
    let mut files = APP.to_vec();
    // A worker spawns the jobs: its context (and the garbage of 100 job objects) is
    // dropped when it ends, so what stays is what the server keeps.
    files.push((
        "workers/spawner.js",
        r#"module.exports = () => {
  const big = "d".repeat(1000 * 1000 - 10);
  const ids = [];
  for (let i = 0; i < 100; i++) ids.push(fazt.worker.spawn("workers/hold.js", { data: big }).id);
  return ids;
};"#,
    ));
    s.deploy_ok("a", &files);
    // Four held jobs and the spawner fill the app's five running places; the spawned
    // jobs wait (one starts when the spawner ends).
    for _ in 0..4 {
        let id = spawn(&s, "a", "workers/hold.js", json!({}));
        s.wait_status(&id, "running", 10);
    }
    let rss = |s: &Server| {
        s.health()["workers"]["memory"]["rss_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = rss(&s);
    let spawner = spawn(&s, "a", "workers/spawner.js", json!({}));
    let ids = s.wait_status(&spawner, "done", 60)["result"].clone();
    let ok = wait_until(10, || s.health()["workers"]["queued"] == 99);
    assert!(ok, "{}", s.health());
    // ~100 MB of data waits in the queue: it must be in the store, not in memory.
    let grew = rss(&s).saturating_sub(before);
    assert!(grew < 40 << 20, "RSS grew by {} MB", grew >> 20);
    // The jobs still get their data when they run.
    let r = s.app("a", "GET", "/api/kv?key=go&size=1", None);
    assert_eq!(r.status, 200, "{}", r.text());
    for i in [0, 50, 99] {
        let id = ids[i].as_str().expect("job id");
        let mut last = Value::Null;
        let done = wait_until(60, || {
            last = s.job(id);
            last["status"] == "done"
        });
        // Without the 1 MB of data in the message.
        assert!(
            done,
            "job {i} is {} (started {}), workers {}",
            last["status"],
            last["startedAt"],
            s.health()["workers"]
        );
        assert_eq!(last["result"], 1000 * 1000 - 10, "job {i} saw its data");
    }
}
