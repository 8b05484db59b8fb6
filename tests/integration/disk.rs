//! A full disk loses no state (issue 12): faults injected with the test-only hooks
//! (`FAZT_TEST_HOOKS=1`): `fail_writes` fails every write batch as a full disk does in
//! WAL mode, `max_page_count` stops the database from growing (SQLITE_FULL). After the
//! fault clears, the store and the scheduler must agree again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{wait_until, Server};

const APP: &[(&str, &str)] = &[
    (
        "api/spawn.js",
        r#"module.exports = function (req) {
  const b = req.body || {};
  return fazt.worker.spawn(b.path || "workers/short.js", b.opts || {});
};"#,
    ),
    (
        "api/kv.js",
        r#"module.exports = function (req) {
  fazt.storage.kv.set(req.query.key || "k", req.query.value || "v");
  return { ok: true };
};"#,
    ),
    (
        "api/fill.js",
        r#"module.exports = function (req) {
  const big = "x".repeat(200000);
  for (let i = 0; i < 40; i++) fazt.storage.kv.set("big" + i, big + i);
  return { ok: true };
};"#,
    ),
    (
        "workers/short.js",
        r#"module.exports = (job) => { job.log("short " + job.id); job.sleep(30); return 1; };"#,
    ),
    (
        "workers/slow.js",
        r#"module.exports = (job) => { job.sleep(job.data.ms); return "slept"; };"#,
    ),
    (
        "workers/cp.js",
        r#"module.exports = (job) => {
  const cp = job.getCheckpoint() || { n: 0 };
  while (true) {
    cp.n++;
    job.checkpoint(cp);
    job.progress(cp.n % 100);
    job.log("tick " + cp.n);
    job.sleep(20);
  }
};"#,
    ),
];

fn spawn(s: &Server, path: &str, opts: Value) -> crate::util::Resp {
    let body = json!({ "path": path, "opts": opts }).to_string();
    s.app("disk", "POST", "/api/spawn", Some(&body))
}

fn spawn_ok(s: &Server, path: &str, opts: Value) -> String {
    let r = spawn(s, path, opts);
    assert_eq!(r.status, 200, "spawn: {}", r.text());
    r.json()["id"].as_str().expect("job id").to_string()
}

fn jobs_with(s: &Server, status: &str) -> Vec<Value> {
    s.api_json("GET", &format!("/api/jobs?status={status}&limit=1000"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until /health says degraded (a write must have failed first).
fn wait_degraded(s: &Server) -> Value {
    let mut h = Value::Null;
    let ok = wait_until(10, || {
        h = s.health();
        h["status"] == "degraded"
    });
    assert!(ok, "never degraded: {h}");
    h
}

#[test]
fn full_disk_status_writes_are_retried_not_dropped() {
    let s = Server::start_hooked(&[]);
    s.deploy_ok("disk", APP);
    let id = spawn_ok(&s, "workers/slow.js", json!({ "data": { "ms": 400 } }));
    s.wait_status(&id, "running", 10);
    s.hooks(json!({ "fail_writes": true }));
    // The job ends while nothing can be written: its "done" must not be lost.
    let ended = wait_until(10, || s.health()["workers"]["running"] == 0);
    assert!(ended, "the job did not end");
    let h = wait_degraded(&s);
    assert!(h["store"]["pending_transitions"].as_u64() >= Some(1), "{h}");
    assert_eq!(s.job(&id)["status"], "running", "not written yet");
    s.hooks(json!({ "fail_writes": false }));
    s.wait_status(&id, "done", 10);
    let ok = wait_until(10, || {
        let h = s.health();
        h["status"] == "ok" && h["store"]["pending_writes"] == 0
    });
    assert!(ok, "still degraded: {}", s.health());
}

#[test]
fn full_disk_spawn_gets_503() {
    let s = Server::start_hooked(&[]);
    s.deploy_ok("disk", APP);
    let daemon = spawn_ok(&s, "workers/cp.js", json!({ "daemon": true }));
    s.wait_status(&daemon, "running", 10);
    s.hooks(json!({ "fail_writes": true }));
    wait_degraded(&s);
    // spawn and kv.set from a handler: a clear error saying to try again.
    for (what, r) in [
        ("spawn", spawn(&s, "workers/short.js", json!({}))),
        (
            "kv.set",
            s.app("disk", "GET", "/api/kv?key=a&value=b", None),
        ),
    ] {
        assert!(r.status >= 500, "{what}: {} {}", r.status, r.text());
        assert!(
            r.error().contains("cannot store data right now"),
            "{what}: {}",
            r.text()
        );
    }
    // Deploy over the system API: 503.
    let r = s.deploy("other", &[("index.html", "hi")]);
    assert_eq!(r.status, 503, "deploy: {}", r.text());
    assert!(r.error().contains("try again later"), "{}", r.text());
    // The daemon's checkpoint throws the same error (it checkpoints every 20 ms); its
    // failure is a job state transition kept for retry. Wait for it before the fault
    // clears: on a loaded machine the whole window above can pass in less time than
    // the daemon takes to reach its next checkpoint.
    let mut h = Value::Null;
    let failed = wait_until(10, || {
        h = s.health();
        h["store"]["pending_transitions"].as_u64().unwrap_or(0) >= 1
    });
    assert!(failed, "the daemon never met the fault: {h}");
    s.hooks(json!({ "fail_writes": false }));
    let ok = wait_until(10, || s.health()["status"] == "ok");
    assert!(ok, "{}", s.health());
    let id = spawn_ok(&s, "workers/short.js", json!({}));
    s.wait_status(&id, "done", 10);
    s.deploy_ok("other", &[("index.html", "hi")]);
    let j = s.wait_job(&daemon, 10, |j| j["status"] == "running");
    assert!(
        j["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot store data right now"),
        "the daemon's last failure names the store: {j}"
    );
}

#[test]
fn full_disk_health_reports_degraded() {
    let s = Server::start_hooked(&[]);
    s.deploy_ok("disk", APP);
    let h = s.health();
    assert_eq!(h["status"], "ok", "{h}");
    assert!(
        h["store"]["free_bytes"].as_u64().is_some(),
        "free space: {h}"
    );
    s.hooks(json!({ "max_page_count": 1 }));
    // kv values this big need new pages: SQLITE_FULL.
    let r = s.app("disk", "GET", "/api/fill", None);
    assert!(r.status >= 500, "{} {}", r.status, r.text());
    let h = wait_degraded(&s);
    let reason = h["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cannot write since") && reason.contains("full"),
        "{h}"
    );
    assert!(h["store"]["failing_since_ms"].as_i64().is_some(), "{h}");
    let metrics = s.api("GET", "/metrics", None).text();
    assert!(metrics.contains("fazt_store_writable 0"), "{metrics}");
    assert!(metrics.contains("fazt_disk_free_bytes "), "{metrics}");
    // The dashboard's script renders /health in the browser: it must show the
    // degraded reason from the same /health the assertions above read.
    let dash = s.api("GET", "/console/app.js", None).text();
    assert!(
        dash.contains(r#"h.status === "degraded""#) && dash.contains("h.reason"),
        "the dashboard shows the degraded state"
    );
    s.hooks(json!({ "max_page_count": 0 }));
    // The next write succeeds and ends the degraded state.
    let ok = wait_until(10, || {
        s.app("disk", "GET", "/api/kv?key=a&value=b", None).status == 200
            && s.health()["status"] == "ok"
    });
    assert!(ok, "{}", s.health());
    let metrics = s.api("GET", "/metrics", None).text();
    assert!(metrics.contains("fazt_store_writable 1"), "{metrics}");
}

#[test]
fn full_disk_daemon_does_not_burn_backoff() {
    let s = Server::start_hooked(&[]);
    s.deploy_ok("disk", APP);
    let daemon = spawn_ok(&s, "workers/cp.js", json!({ "daemon": true }));
    s.wait_status(&daemon, "running", 10);
    for _ in 0..3 {
        s.hooks(json!({ "fail_writes": true }));
        wait_degraded(&s);
        std::thread::sleep(Duration::from_millis(1200));
        s.hooks(json!({ "fail_writes": false }));
        // Restarted as soon as writes succeed, not after a growing backoff (1 s, 2 s,
        // 4 s …): checkpoints advance again well within that.
        let before = s.job(&daemon)["progress"].as_i64();
        let t = Instant::now();
        let ok = wait_until(5, || {
            let j = s.job(&daemon);
            j["status"] == "running" && j["progress"].as_i64() != before
        });
        assert!(ok, "daemon did not resume: {}", s.job(&daemon));
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "daemon waited {:?} after the store recovered",
            t.elapsed()
        );
    }
}

#[test]
fn full_disk_fill_free_rounds_store_matches_scheduler() {
    let s = Arc::new(Server::start_hooked(&[]));
    s.deploy_ok("disk", APP);
    for _ in 0..2 {
        let id = spawn_ok(&s, "workers/cp.js", json!({ "daemon": true }));
        s.wait_status(&id, "running", 10);
    }
    // Short jobs spawned throughout; spawns refused during a fault are fine.
    let stop = Arc::new(AtomicBool::new(false));
    let spawner = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut accepted = 0;
            while !stop.load(Ordering::SeqCst) {
                if spawn(&s, "workers/short.js", json!({})).status == 200 {
                    accepted += 1;
                }
                std::thread::sleep(Duration::from_millis(15));
            }
            accepted
        })
    };
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        // Alternate the two kinds of full: nothing writable, and no room to grow.
        if round % 2 == 0 {
            s.hooks(json!({ "fail_writes": true }));
        } else {
            s.hooks(json!({ "max_page_count": 1 }));
        }
        wait_degraded(&s);
        std::thread::sleep(Duration::from_millis(500));
        s.hooks(json!({ "fail_writes": false, "max_page_count": 0 }));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let accepted = spawner.join().expect("spawner");
    assert!(accepted > 10, "only {accepted} spawns accepted");
    // Once every short job ended: the store says exactly what the scheduler runs.
    let mut last = String::new();
    let ok = wait_until(20, || {
        let h = s.health();
        let running = jobs_with(&s, "running");
        let queued = jobs_with(&s, "queued");
        last = format!(
            "health {h}\nrunning rows {}: {:?}\nqueued rows {}",
            running.len(),
            running.iter().map(|j| &j["path"]).collect::<Vec<_>>(),
            queued.len()
        );
        h["status"] == "ok"
            && h["workers"]["running"] == 2
            && h["workers"]["queued"] == 0
            && running.len() == 2
            && running.iter().all(|j| j["path"] == "workers/cp.js")
            && queued.is_empty()
    });
    assert!(ok, "store and scheduler disagree:\n{last}");
    let done = jobs_with(&s, "done").len();
    assert!(done > 10, "{done} short jobs recorded done");
}

#[test]
fn wal_is_truncated_after_burst() {
    let s = Server::start();
    s.deploy_ok("disk", APP);
    // ~8 MB of kv writes: the WAL file grows past SQLite's 4 MB auto-checkpoint, which
    // resets it for reuse but never shrinks it.
    let r = s.app("disk", "GET", "/api/fill", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let wal = s.dir.join("fazt.db-wal");
    let size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    // The file shrinks a moment before the counter in /health moves: wait for both.
    let ok = wait_until(10, || {
        size() < 1 << 20 && s.health()["store"]["wal_truncations"].as_u64() >= Some(1)
    });
    assert!(
        ok,
        "WAL still {} bytes after the burst: {}",
        size(),
        s.health()
    );
}
