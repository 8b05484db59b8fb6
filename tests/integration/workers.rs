//! The worker system through the real binary: spawn, limits, budget, cancel, timeout,
//! retry, uniqueKey, daemons (backoff, restore after kill -9), isolation, job API.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{wait_until, Server};

/// A handler that spawns `workers/<w>.js` with options from the JSON body.
const SPAWN: &str = r#"
module.exports = function (req) {
  const b = req.body || {};
  try { return fazt.worker.spawn(b.path || "workers/w.js", b.opts); }
  catch (e) { return { status: 400, body: { error: String(e) } }; }
};
"#;

const JOBS_API: &str = r#"
module.exports = function (req) {
  const q = req.query;
  // Job objects are returned as they are: their string `status` makes them JSON bodies.
  if (q.op === "get") return fazt.worker.get(q.id);
  if (q.op === "cancel") return fazt.worker.cancel(q.id);
  if (q.op === "list") return fazt.worker.list(q.status ? { status: q.status } : {});
  if (q.op === "kv") return fazt.storage.kv.get(q.key);
  return { status: 400, body: "op?" };
};
"#;

const WORKERS: &[(&str, &str)] = &[
    ("api/spawn.js", SPAWN),
    ("api/jobs.js", JOBS_API),
    ("workers/w.js", "module.exports = (job) => ({ doubled: job.data.x * 2, attempt: job.attempt });"),
    ("workers/spin.js", "module.exports = () => { while (true) {} };"),
    ("workers/short.js", "module.exports = (job) => { job.sleep(1000); return 'short'; };"),
    ("workers/trap.js", "module.exports = () => { for (;;) { try { while (true) {} } catch (e) {} } };"),
    ("workers/wait.js", "module.exports = (job) => { while (true) job.sleep(60000); };"),
    (
        "workers/coop.js",
        "module.exports = (job) => { let n = 0; while (!job.cancelled) { n++; job.sleep(10000); } return { stoppedCleanly: true }; };",
    ),
    (
        "workers/steps.js",
        r#"module.exports = (job) => {
  for (let i = 1; i <= 100; i++) {
    job.progress(i);
    job.log("step " + i);
    job.checkpoint({ step: i });
    if (fazt.storage.kv.get("release") !== true) job.sleep(30); else break;
  }
  return { last: job.getCheckpoint().step };
};"#,
    ),
    (
        "workers/flaky.js",
        r#"module.exports = (job) => { if (job.attempt < 2) throw new Error("flaky attempt " + job.attempt); return "ok on " + job.attempt; };"#,
    ),
    (
        "workers/crashy.js",
        r#"module.exports = (job) => {
  const t = fazt.storage.kv.get("starts") || [];
  t.push(Date.now());
  fazt.storage.kv.set("starts", t);
  throw new Error("daemon crash");
};"#,
    ),
    (
        "workers/counter.js",
        r#"module.exports = (job) => {
  const cp = job.getCheckpoint() || { n: 0 };
  const resumes = fazt.storage.kv.get("resumes") || [];
  resumes.push(cp.n);
  fazt.storage.kv.set("resumes", resumes);
  while (true) {
    cp.n++;
    job.checkpoint(cp);
    job.progress(cp.n % 100);
    job.sleep(20);
  }
};"#,
    ),
    (
        "workers/hog.js",
        r#"module.exports = () => { const keep = []; while (true) keep.push(new Array(100000).fill(7)); };"#,
    ),
    (
        "workers/stuck.js",
        // A loop inside a callback that native code calls: only the engine's interrupt
        // flag reaches it.
        r#"module.exports = () => "a".replace(/a/, () => { while (true) {} });"#,
    ),
    (
        "workers/prog.js",
        "module.exports = (job) => { job.progress(42); job.sleep(500); return null; };",
    ),
    ("workers/bigcp.js", r#"module.exports = (job) => { job.checkpoint("x".repeat(1100000)); };"#),
    ("workers/badreturn.js", r#"module.exports = async (job) => { await null; throw new RangeError("async nope"); };"#),
];

fn spawn(s: &Server, app: &str, path: &str, opts: Value) -> Value {
    let body = serde_json::json!({ "path": path, "opts": opts }).to_string();
    let r = s.app(app, "POST", "/api/spawn", Some(&body));
    assert_eq!(r.status, 200, "spawn {path}: {}", r.text());
    r.json()
}

fn spawn_err(s: &Server, app: &str, path: &str, opts: Value) -> String {
    let body = serde_json::json!({ "path": path, "opts": opts }).to_string();
    let r = s.app(app, "POST", "/api/spawn", Some(&body));
    assert_eq!(
        r.status,
        400,
        "expected a refusal for {path} {opts}: {}",
        r.text()
    );
    r.error()
}

fn id(job: &Value) -> String {
    job["id"].as_str().expect("job id").to_string()
}

fn server_with(apps: &[&str]) -> Server {
    let s = Server::start();
    for a in apps {
        s.deploy_ok(a, WORKERS);
    }
    s
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
fn spawn_runs_to_done_with_a_result() {
    let s = server_with(&["w"]);
    let job = spawn(
        &s,
        "w",
        "workers/w.js",
        serde_json::json!({ "data": { "x": 21 } }),
    );
    assert_eq!(job["status"], "queued");
    assert_eq!(job["app"], "w");
    let done = s.wait_status(&id(&job), "done", 20);
    assert_eq!(done["result"]["doubled"], 42);
    assert_eq!(done["result"]["attempt"], 1);
    assert_eq!(done["progress"], 100);
    assert!(done["startedAt"].as_i64() >= done["createdAt"].as_i64());
    assert!(done["doneAt"].as_i64() >= done["startedAt"].as_i64());
}

#[test]
fn progress_logs_and_checkpoints_are_visible_while_running() {
    let s = server_with(&["w"]);
    let job = spawn(&s, "w", "workers/steps.js", Value::Null);
    let jid = id(&job);
    let running = s.wait_job(&jid, 20, |j| {
        j["status"] == "running" && j["progress"].as_i64() >= Some(3)
    });
    assert!(running["progress"].as_i64() < Some(100));
    // The JS API sees the same live job.
    let via_js = s.call("w", &format!("/api/jobs?op=get&id={jid}"));
    assert_eq!(via_js["status"], "running");
    let logs = s.api_json("GET", &format!("/api/jobs/{jid}/logs"));
    assert!(logs.as_array().is_some_and(|l| l.len() >= 2), "{logs}");
    assert_eq!(logs[0]["msg"], "step 1");
    let r = s.app("w", "POST", "/api/kvset", None);
    assert_eq!(r.status, 404, "no such handler: sanity");
    s.deploy_ok(
        "w",
        &[
            WORKERS,
            &[(
                "api/release.js",
                "module.exports = () => fazt.storage.kv.set('release', true);",
            )],
        ]
        .concat(),
    );
    assert_eq!(s.app("w", "GET", "/api/release", None).status, 204);
    let done = s.wait_status(&jid, "done", 20);
    assert!(done["result"]["last"].as_i64() >= Some(3), "{done}");
    // CLI views of the same job.
    let show = s.cli(&["job", "show", &jid]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("\"status\": \"done\""));
    let logs = s.cli(&["job", "logs", &jid, "--follow"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("step 1") && text.contains("100% done"),
        "{text}"
    );
    let list = s.cli(&["job", "list", "--app", "w"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains(&jid));
}

#[test]
fn an_app_runs_at_most_five_jobs_and_queues_the_rest() {
    let s = server_with(&["one"]);
    let ids: Vec<String> = (0..6)
        .map(|_| id(&spawn(&s, "one", "workers/wait.js", Value::Null)))
        .collect();
    assert!(
        wait_until(20, || count(&s, "one", "running") == 5),
        "5 running"
    );
    assert_eq!(count(&s, "one", "queued"), 1);
    // Still 5 after a while: the limit holds, the sixth is queued, not refused.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&s, "one", "running"), 5);
    let h = s.health();
    assert_eq!(h["workers"]["running"], 5);
    assert_eq!(h["workers"]["queued"], 1);
    // Cancelling one lets the queued job start.
    let c = s.api_json("POST", &format!("/api/jobs/{}/cancel", ids[0]));
    assert_eq!(c["status"], "cancelled");
    assert!(wait_until(20, || count(&s, "one", "running") == 5
        && count(&s, "one", "queued") == 0));
}

#[test]
fn twenty_one_jobs_across_apps_fill_the_twenty_slots() {
    let apps = ["a1", "a2", "a3", "a4", "a5"];
    let s = server_with(&apps);
    for (i, app) in apps.iter().enumerate() {
        let n = if i < 4 { 5 } else { 1 };
        for _ in 0..n {
            // Small reservations, so memory is not what limits this test.
            spawn(
                &s,
                app,
                "workers/wait.js",
                serde_json::json!({ "memory": "4MB" }),
            );
        }
    }
    // The scheduler publishes its counts as it handles events: the 21st job's enqueue
    // may be handled just after the 20th start was published.
    assert!(
        wait_until(30, || {
            let w = &s.health()["workers"];
            w["running"] == 20 && w["queued"] == 1
        }),
        "{}",
        s.health()
    );
    // The rows follow: a start is written once held 5 ms (or with its outcome).
    let total_running = || -> usize { apps.iter().map(|a| count(&s, a, "running")).sum() };
    wait_until(10, || total_running() == 20);
    assert_eq!(total_running(), 20);
}

#[test]
fn big_jobs_wait_for_memory_instead_of_failing() {
    let s = server_with(&["m1", "m2"]);
    // 5 × 64 MB against a 256 MB budget: at most 4 run together.
    for i in 0..5 {
        let app = if i % 2 == 0 { "m1" } else { "m2" };
        spawn(
            &s,
            app,
            "workers/wait.js",
            serde_json::json!({ "memory": "64MB" }),
        );
    }
    assert!(wait_until(20, || s.health()["workers"]["running"] == 4));
    std::thread::sleep(Duration::from_millis(300));
    let h = s.health();
    assert_eq!(h["workers"]["running"], 4, "{h}");
    assert_eq!(h["workers"]["queued"], 1, "{h}");
    assert_eq!(h["workers"]["memory"]["reserved_bytes"], 256u64 << 20);
    // More than the whole budget is refused at spawn.
    let err = spawn_err(
        &s,
        "m1",
        "workers/w.js",
        serde_json::json!({ "memory": "512MB" }),
    );
    assert!(
        err.contains("more than the whole worker memory budget"),
        "{err}"
    );
}

#[test]
fn cancel_stops_a_busy_loop_within_100ms() {
    let s = server_with(&["c"]);
    for worker in ["workers/spin.js", "workers/trap.js"] {
        let jid = id(&spawn(&s, "c", worker, Value::Null));
        s.wait_status(&jid, "running", 20);
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let job = s.api_json("POST", &format!("/api/jobs/{jid}/cancel"));
        let took = t.elapsed();
        assert_eq!(job["status"], "cancelled", "{job}");
        println!("cancel of {worker}: {took:?} (cancel request to status 'cancelled')");
        // The design goal is 100 ms; the bound is generous for a loaded CI machine.
        assert!(
            took < Duration::from_millis(1000),
            "{worker}: cancel took {took:?}"
        );
    }
}

#[test]
fn sleeping_and_cooperative_jobs_wake_on_cancel() {
    let s = server_with(&["c"]);
    let sleeper = id(&spawn(&s, "c", "workers/wait.js", Value::Null));
    let coop = id(&spawn(&s, "c", "workers/coop.js", Value::Null));
    s.wait_status(&sleeper, "running", 20);
    s.wait_status(&coop, "running", 20);
    let t = Instant::now();
    let a = s.call("c", &format!("/api/jobs?op=cancel&id={sleeper}"));
    let b = s.call("c", &format!("/api/jobs?op=cancel&id={coop}"));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(a["status"], "cancelled");
    assert_eq!(b["status"], "cancelled");
    // The cooperative job saw job.cancelled and returned; it is still 'cancelled'.
    assert_eq!(b["result"]["stoppedCleanly"], true, "{b}");
}

#[test]
fn timeouts_fail_the_job_with_a_clear_error() {
    let s = server_with(&["t"]);
    let t = Instant::now();
    let jid = id(&spawn(
        &s,
        "t",
        "workers/spin.js",
        serde_json::json!({ "timeout": "300ms" }),
    ));
    let job = s.wait_status(&jid, "failed", 20);
    assert_eq!(job["error"], "timed out after 300ms");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn failures_are_retried_until_attempts_run_out() {
    let s = server_with(&["r"]);
    let jid = id(&spawn(
        &s,
        "r",
        "workers/flaky.js",
        serde_json::json!({ "retry": 2, "retryDelay": "100ms" }),
    ));
    let job = s.wait_status(&jid, "done", 20);
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["result"], "ok on 2");
    let jid = id(&spawn(&s, "r", "workers/flaky.js", Value::Null));
    let job = s.wait_status(&jid, "failed", 20);
    assert_eq!(job["error"], "Error: flaky attempt 1");
    let jid = id(&spawn(&s, "r", "workers/badreturn.js", Value::Null));
    assert_eq!(
        s.wait_status(&jid, "failed", 20)["error"],
        "RangeError: async nope"
    );
    let jid = id(&spawn(&s, "r", "workers/bigcp.js", Value::Null));
    let job = s.wait_status(&jid, "failed", 20);
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("limit is 1 MB")),
        "{job}"
    );
}

#[test]
fn unique_key_returns_the_live_job() {
    let s = server_with(&["u"]);
    let a = spawn(
        &s,
        "u",
        "workers/wait.js",
        serde_json::json!({ "uniqueKey": "sync" }),
    );
    let b = spawn(
        &s,
        "u",
        "workers/wait.js",
        serde_json::json!({ "uniqueKey": "sync" }),
    );
    assert_eq!(a["id"], b["id"]);
    let other = spawn(
        &s,
        "u",
        "workers/wait.js",
        serde_json::json!({ "uniqueKey": "other" }),
    );
    assert_ne!(a["id"], other["id"]);
    s.api_json("POST", &format!("/api/jobs/{}/cancel", id(&a)));
    let c = spawn(
        &s,
        "u",
        "workers/wait.js",
        serde_json::json!({ "uniqueKey": "sync" }),
    );
    assert_ne!(a["id"], c["id"], "a finished job does not block the key");
}

#[test]
fn bad_spawn_options_are_clear_js_errors() {
    let s = server_with(&["b"]);
    let cases = [
        (
            "workers/w.js",
            serde_json::json!({ "memory": "lots" }),
            "invalid memory size 'lots'",
        ),
        (
            "workers/w.js",
            serde_json::json!({ "timeout": "5 minutes" }),
            "invalid duration '5 minutes'",
        ),
        (
            "workers/w.js",
            serde_json::json!({ "retry": "3" }),
            "retry must be a whole number",
        ),
        (
            "workers/w.js",
            serde_json::json!({ "deamon": true }),
            "unknown spawn option 'deamon'",
        ),
        (
            "workers/w.js",
            serde_json::json!({ "idleTimeout": "1m" }),
            "idleTimeout and idleChannel go together",
        ),
        (
            "api/spawn.js",
            Value::Null,
            "must name a .js file under workers/",
        ),
        (
            "workers/../api/spawn.js",
            Value::Null,
            "'.' and '..' are not allowed",
        ),
        (
            "/workers/w.js",
            Value::Null,
            "absolute paths are not allowed",
        ),
        (
            "workers/missing.js",
            Value::Null,
            "no worker file workers/missing.js",
        ),
    ];
    for (path, opts, needle) in cases {
        let err = spawn_err(&s, "b", path, opts.clone());
        assert!(err.starts_with("Error: fazt.worker.spawn: "), "{err}");
        assert!(err.contains(needle), "{path} {opts}: {err}");
    }
}

#[test]
fn apps_cannot_see_or_cancel_each_others_jobs() {
    let s = server_with(&["alice", "bob"]);
    let jid = id(&spawn(&s, "alice", "workers/wait.js", Value::Null));
    s.wait_status(&jid, "running", 20);
    assert_eq!(
        s.call("bob", &format!("/api/jobs?op=get&id={jid}")),
        Value::Null
    );
    assert_eq!(
        s.call("bob", &format!("/api/jobs?op=cancel&id={jid}")),
        Value::Null
    );
    let bob_list = s.call("bob", "/api/jobs?op=list");
    assert_eq!(bob_list, serde_json::json!([]));
    assert_eq!(s.job(&jid)["status"], "running", "bob's cancel did nothing");
    let alice_list = s.call("alice", "/api/jobs?op=list&status=running");
    assert_eq!(alice_list[0]["id"], jid.as_str());
    assert_eq!(
        s.call("alice", &format!("/api/jobs?op=get&id={jid}"))["status"],
        "running"
    );
}

#[test]
fn crashing_daemons_restart_with_growing_delays() {
    let s = server_with(&["d"]);
    let jid = id(&spawn(
        &s,
        "d",
        "workers/crashy.js",
        serde_json::json!({ "daemon": true }),
    ));
    let job = s.wait_job(&jid, 30, |j| j["restarts"].as_i64() >= Some(3));
    assert_eq!(job["error"], "Error: daemon crash");
    let starts = s.call("d", "/api/jobs?op=kv&key=starts");
    let t: Vec<i64> = starts
        .as_array()
        .expect("starts")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(t.len() >= 3, "{starts}");
    let (g1, g2) = (t[1] - t[0], t[2] - t[1]);
    // 1 s, then 2 s (with slack for scheduling).
    assert!((900..2000).contains(&g1), "first restart after {g1} ms");
    assert!((1900..3500).contains(&g2), "second restart after {g2} ms");
    let c = s.api_json("POST", &format!("/api/jobs/{jid}/cancel"));
    assert_eq!(
        c["status"], "cancelled",
        "a daemon waiting out its backoff can be cancelled"
    );
}

#[test]
fn a_daemon_resumes_from_its_checkpoint_after_kill_9() {
    let mut s = server_with(&["k"]);
    let jid = id(&spawn(
        &s,
        "k",
        "workers/counter.js",
        serde_json::json!({ "daemon": true }),
    ));
    s.wait_status(&jid, "running", 20);
    // Let it checkpoint a few times (progress follows the counter), then kill the
    // process mid-stream.
    s.wait_job(&jid, 20, |j| j["progress"].as_i64() >= Some(8));
    s.kill9();
    s.restart();
    let resumes = {
        let mut v = Value::Null;
        assert!(
            wait_until(30, || {
                v = s.call("k", "/api/jobs?op=kv&key=resumes");
                v.as_array().is_some_and(|a| a.len() >= 2)
            }),
            "the daemon started again after the restart: {v}"
        );
        v
    };
    assert_eq!(resumes[0], 0, "first start had no checkpoint");
    assert!(
        resumes[1].as_i64() >= Some(5),
        "resumed from the last checkpoint, not from scratch: {resumes}"
    );
    let job = s.wait_status(&jid, "running", 20);
    assert!(job["restarts"].as_i64() >= Some(1));
    // A graceful stop keeps it restorable too.
    assert_eq!(s.stop(), 0);
    s.restart();
    assert!(wait_until(30, || s
        .call("k", "/api/jobs?op=kv&key=resumes")
        .as_array()
        .is_some_and(|a| a.len() >= 3)));
}

#[test]
fn jobs_running_when_the_server_died_are_failed_not_left_running() {
    let mut s = server_with(&["x"]);
    let lost = id(&spawn(&s, "x", "workers/wait.js", Value::Null));
    let retried = id(&spawn(
        &s,
        "x",
        "workers/wait.js",
        serde_json::json!({ "retry": 1 }),
    ));
    s.wait_status(&lost, "running", 20);
    s.wait_status(&retried, "running", 20);
    s.kill9();
    s.restart();
    let job = s.job(&lost);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"], "interrupted by server restart");
    let job = s.wait_status(&retried, "running", 20);
    assert_eq!(job["attempt"], 2);
}

#[test]
fn a_job_over_its_reservation_is_stopped_when_memory_runs_out() {
    let s = server_with(&["mem"]);
    let jid = id(&spawn(
        &s,
        "mem",
        "workers/hog.js",
        serde_json::json!({ "memory": "1MB" }),
    ));
    let job = s.wait_status(&jid, "failed", 60);
    let err = job["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("more than its 1MB reservation") && err.contains("memory budget"),
        "{err}"
    );
    // The server is fine afterwards.
    let ok = id(&spawn(
        &s,
        "mem",
        "workers/w.js",
        serde_json::json!({ "data": { "x": 1 } }),
    ));
    s.wait_status(&ok, "done", 20);
}

#[test]
fn job_api_validates_input() {
    let s = server_with(&["v"]);
    let r = s.api("GET", "/api/jobs?status=bogus", None);
    assert_eq!(r.status, 400);
    assert!(r.error().contains("unknown status 'bogus'"));
    assert_eq!(s.api("GET", "/api/jobs?limit=0", None).status, 400);
    assert_eq!(s.api("GET", "/api/jobs/nope", None).status, 404);
    assert_eq!(s.api("POST", "/api/jobs/nope/cancel", None).status, 404);
    assert_eq!(s.api("GET", "/api/jobs/nope/logs", None).status, 404);
    let out = s.cli(&["job", "show", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job with id 'nope'"));
}

#[test]
fn a_job_stuck_in_a_native_callback_times_out_without_abandoning_its_slot() {
    let s = server_with(&["stuck"]);
    let jid = id(&spawn(
        &s,
        "stuck",
        "workers/stuck.js",
        serde_json::json!({ "timeout": "200ms" }),
    ));
    let t = Instant::now();
    let job = s.wait_status(&jid, "failed", 30);
    let err = job["error"].as_str().unwrap_or_default();
    assert!(
        err.starts_with("timed out after 200ms") && !err.contains("abandoned"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let m = s.api("GET", "/metrics", None).text();
    assert!(m.contains("fazt_slots_abandoned_total 0"), "{m}");
    // All 20 slots still work.
    let ids: Vec<String> = (0..5)
        .map(|_| {
            id(&spawn(
                &s,
                "stuck",
                "workers/w.js",
                serde_json::json!({ "data": { "x": 1 }, "memory": "1MB" }),
            ))
        })
        .collect();
    for j in ids {
        s.wait_status(&j, "done", 20);
    }
    assert_eq!(s.health()["workers"]["slots_total"], 20);
}

#[test]
fn the_per_app_queue_is_bounded_with_a_clear_error() {
    let s = server_with(&["q"]);
    s.deploy_ok(
        "q",
        &[
            WORKERS,
            &[(
                "api/flood.js",
                r#"module.exports = () => {
  let n = 0;
  try { for (; n < 1100; n++) fazt.worker.spawn("workers/wait.js"); }
  catch (e) { return { spawned: n, error: String(e) }; }
  return { spawned: n };
};"#,
            )],
        ]
        .concat(),
    );
    let v = s.call("q", "/api/flood");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("job queue of app 'q' is full (1000 jobs waiting)")),
        "{v}"
    );
    let spawned = v["spawned"].as_u64().unwrap_or(0);
    assert!((1000..=1010).contains(&spawned), "{v}");
    // The CLI can cancel one of them.
    let list = s.api_json("GET", "/api/jobs?app=q&status=queued&limit=1");
    let qid = list[0]["id"].as_str().expect("a queued job").to_string();
    let out = s.cli(&["job", "cancel", &qid]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cancelled"),
        "{out:?}"
    );
}

#[test]
fn ctrl_c_gives_running_jobs_a_grace_period_and_loses_nothing() {
    let mut s = server_with(&["g"]);
    let busy = id(&spawn(&s, "g", "workers/wait.js", Value::Null));
    // About a second of work: done well inside the 5 s grace however loaded the
    // machine is (steps.js, with a durable checkpoint per step, took over 5 s once).
    let quick = id(&spawn(&s, "g", "workers/short.js", Value::Null));
    let queued: Vec<String> = (0..5)
        .map(|_| {
            id(&spawn(
                &s,
                "g",
                "workers/w.js",
                serde_json::json!({ "data": { "x": 3 } }),
            ))
        })
        .collect();
    s.wait_status(&busy, "running", 20);
    let t = Instant::now();
    assert_eq!(s.stop(), 0);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(20),
        "{took:?}"
    );
    s.restart();
    let job = s.job(&busy);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"], "interrupted by server shutdown");
    // A job that finishes within the grace period completes normally.
    assert_eq!(s.job(&quick)["status"], "done");
    // Jobs still queued at shutdown run after the restart.
    for q in queued {
        assert_eq!(s.wait_status(&q, "done", 20)["result"]["doubled"], 6);
    }
}

/// Spawns `n` jobs of `path` (1 MB each, so all slots take part) and returns their
/// results once all are done.
fn results_of(s: &Server, app: &str, path: &str, n: usize) -> Vec<Value> {
    let ids: Vec<String> = (0..n)
        .map(|_| id(&spawn(s, app, path, serde_json::json!({ "memory": "1MB" }))))
        .collect();
    ids.iter()
        .map(|j| s.wait_status(j, "done", 30)["result"].clone())
        .collect()
}

#[test]
fn warm_worker_contexts_pick_up_redeploys_and_never_cross_apps() {
    let s = Server::start();
    let setter = "module.exports = () => { globalThis.secret = 'A'; return 'v1'; };";
    s.deploy_ok("ga", &[("api/spawn.js", SPAWN), ("workers/g.js", setter)]);
    s.deploy_ok(
        "gb",
        &[
            ("api/spawn.js", SPAWN),
            (
                "workers/g.js",
                "module.exports = () => typeof globalThis.secret;",
            ),
        ],
    );
    // Enough jobs that every slot has run app ga at least once.
    assert!(results_of(&s, "ga", "workers/g.js", 40)
        .iter()
        .all(|r| r == "v1"));
    let b = results_of(&s, "gb", "workers/g.js", 40);
    assert!(
        b.iter().all(|r| r == "undefined"),
        "no globals leak between apps: {b:?}"
    );
    s.deploy_ok(
        "ga",
        &[
            ("api/spawn.js", SPAWN),
            ("workers/g.js", "module.exports = () => 'v2';"),
        ],
    );
    let a = results_of(&s, "ga", "workers/g.js", 40);
    assert!(a.iter().all(|r| r == "v2"), "the new code runs: {a:?}");
}

#[test]
fn job_logs_keep_the_newest_thousand_lines() {
    let s = Server::start();
    s.deploy_ok(
        "logs",
        &[
            ("api/spawn.js", SPAWN),
            (
                "workers/chatty.js",
                "module.exports = (job) => { for (let i = 1; i <= 1100; i++) console.log('line', i); };",
            ),
        ],
    );
    let jid = id(&spawn(&s, "logs", "workers/chatty.js", Value::Null));
    s.wait_status(&jid, "done", 30);
    let mut lines = Vec::new();
    assert!(wait_until(10, || {
        lines = s
            .api_json("GET", &format!("/api/jobs/{jid}/logs"))
            .as_array()
            .cloned()
            .unwrap_or_default();
        lines.last().is_some_and(|l| l["msg"] == "line 1100")
    }));
    assert_eq!(lines.len(), 1000);
    assert_eq!(lines[0]["msg"], "line 101");
    assert_eq!(lines[0]["level"], "log");
    let after = lines[998]["id"].as_i64().expect("id");
    let tail = s.api_json("GET", &format!("/api/jobs/{jid}/logs?after={after}"));
    assert_eq!(
        tail.as_array().map(Vec::len),
        Some(1),
        "paging with ?after="
    );
}

#[test]
fn a_job_too_big_to_fit_beside_daemons_does_not_stall_the_queue() {
    let s = server_with(&["p"]);
    let daemon = id(&spawn(
        &s,
        "p",
        "workers/wait.js",
        serde_json::json!({ "daemon": true, "memory": "64MB" }),
    ));
    s.wait_status(&daemon, "running", 20);
    let big = id(&spawn(
        &s,
        "p",
        "workers/w.js",
        serde_json::json!({ "memory": "256MB", "data": { "x": 1 } }),
    ));
    let small = id(&spawn(
        &s,
        "p",
        "workers/w.js",
        serde_json::json!({ "memory": "1MB", "data": { "x": 2 } }),
    ));
    assert_eq!(s.wait_status(&small, "done", 20)["result"]["doubled"], 4);
    assert_eq!(
        s.job(&big)["status"],
        "queued",
        "waits for the daemon's memory"
    );
    s.api_json("POST", &format!("/api/jobs/{daemon}/cancel"));
    assert_eq!(s.wait_status(&big, "done", 20)["result"]["doubled"], 2);
}

#[test]
fn a_cancel_wins_over_a_throw_in_the_grace_period() {
    let s = Server::start();
    s.deploy_ok(
        "grace",
        &[
            ("api/spawn.js", SPAWN),
            (
                "workers/bail.js",
                "module.exports = (job) => { for (;;) { job.sleep(5000); if (job.cancelled) throw new Error('bailing out'); } };",
            ),
        ],
    );
    let jid = id(&spawn(
        &s,
        "grace",
        "workers/bail.js",
        serde_json::json!({ "retry": 3 }),
    ));
    s.wait_status(&jid, "running", 20);
    let job = s.api_json("POST", &format!("/api/jobs/{jid}/cancel"));
    assert_eq!(job["status"], "cancelled", "not retried: {job}");
    let d = id(&spawn(
        &s,
        "grace",
        "workers/bail.js",
        serde_json::json!({ "daemon": true }),
    ));
    s.wait_status(&d, "running", 20);
    let job = s.api_json("POST", &format!("/api/jobs/{d}/cancel"));
    assert_eq!(
        job["status"], "cancelled",
        "a daemon is not restarted: {job}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.job(&d)["status"], "cancelled");
}

#[test]
fn removing_an_app_stops_its_jobs_and_forgets_them() {
    let s = server_with(&["gone"]);
    let running = id(&spawn(&s, "gone", "workers/steps.js", Value::Null));
    let queued: Vec<String> = (0..6)
        .map(|_| id(&spawn(&s, "gone", "workers/wait.js", Value::Null)))
        .collect();
    s.wait_job(&running, 20, |j| j["progress"].as_i64() >= Some(2));
    let t = Instant::now();
    assert_eq!(s.api("DELETE", "/api/apps/gone", None).status, 200);
    assert!(t.elapsed() < Duration::from_secs(5));
    for j in queued.iter().chain([&running]) {
        assert_eq!(s.api("GET", &format!("/api/jobs/{j}"), None).status, 404);
    }
    assert_eq!(s.health()["workers"]["running"], 0);
    // A new app with the same name starts with no history.
    s.deploy_ok("gone", WORKERS);
    assert_eq!(s.call("gone", "/api/jobs?op=list"), serde_json::json!([]));
    let logs = s.api("GET", &format!("/api/jobs/{running}/logs"), None);
    assert_eq!(logs.status, 404);
}

/// Issue 10, goal 5: with 10,000 jobs queued by other apps, one job of an idle app
/// starts as soon as a slot frees, not behind the other apps' backlog (it waited 48 s
/// when the queue was one FIFO across apps).
#[test]
fn idle_app_job_starts_promptly_behind_a_flood() {
    const FLOOD_APPS: usize = 10;
    const JOB_MS: i64 = 200;
    let flood_files: &[(&str, &str)] = &[
        (
            "api/flood.js",
            r#"module.exports = () => {
  let n = 0;
  try { for (; n < 100; n++) fazt.worker.spawn("workers/slow.js", { memory: "1MB" }); }
  catch (e) { return { spawned: n, full: String(e).includes("is full") }; }
  return { spawned: n, full: false };
};"#,
        ),
        // 200 ms each: 20 slots drain 100 jobs/s, so the backlog of 10,000 lasts
        // well past the check, and some slot frees within 200 ms at any moment.
        (
            "workers/slow.js",
            "module.exports = (job) => { job.sleep(200); return 1; };",
        ),
    ];
    let s = server_with(&["idle"]);
    let apps: Vec<String> = (0..FLOOD_APPS).map(|i| format!("flood{i}")).collect();
    for a in &apps {
        s.deploy_ok(a, flood_files);
    }
    // Each app fills its queue to the bound of 1,000 (a loaded machine may stop a
    // request at the 5 s handler deadline: the jobs it spawned stay, the next goes on).
    std::thread::scope(|scope| {
        for a in &apps {
            let s = &s;
            scope.spawn(move || {
                let filled = wait_until(180, || {
                    let r = s.app(a, "GET", "/api/flood", None);
                    r.status == 200 && r.json()["full"] == true
                });
                assert!(filled, "{a} could not fill its queue in 180 s");
            });
        }
    });
    let queued = s.health()["workers"]["queued"].as_u64().unwrap_or(0);
    assert!(queued >= 5000, "the flood is not queued: {queued} waiting");
    let job = spawn(
        &s,
        "idle",
        "workers/w.js",
        serde_json::json!({ "data": { "x": 1 } }),
    );
    let done = s.wait_status(&id(&job), "done", 30);
    let waited =
        done["startedAt"].as_i64().unwrap_or(i64::MAX) - done["createdAt"].as_i64().unwrap_or(0);
    let still_queued = s.health()["workers"]["queued"].as_u64().unwrap_or(0);
    eprintln!(
        "idle app's job waited {waited} ms behind {queued} queued jobs of {FLOOD_APPS} apps \
         (flood jobs run {JOB_MS} ms; {still_queued} still queued after)"
    );
    assert!(
        still_queued >= 3000,
        "the flood drained before the check meant anything ({still_queued} left)"
    );
    // At most one flood job's run until a slot frees, plus room for a loaded machine;
    // FIFO across apps it was `queued` / 100 jobs/s, tens of seconds.
    assert!(
        (0..=JOB_MS + 500).contains(&waited),
        "the idle app's job waited {waited} ms behind the other apps' backlog"
    );
}

/// An app whose `api/many.js?n=N` spawns N no-op jobs in a loop, reads the first back,
/// and answers their ids; `api/gates.js` holds the app's 5 running places with jobs
/// that wait for the kv key `go`, so what `many` spawns stays queued.
const BATCH_APP: &[(&str, &str)] = &[
    (
        "api/many.js",
        r#"module.exports = function (req) {
  const ids = [];
  for (let i = 0; i < Number(req.query.n); i++) ids.push(fazt.worker.spawn("workers/noop.js").id);
  const first = fazt.worker.get(ids[0]);
  const listed = fazt.worker.list({ status: "queued", limit: 1000 }).length;
  return { ids, first: first && first.status, listed };
};"#,
    ),
    (
        "api/gates.js",
        r#"module.exports = function () {
  for (let i = 0; i < 5; i++) fazt.worker.spawn("workers/gate.js");
  return { ok: true };
};"#,
    ),
    (
        "api/go.js",
        r#"module.exports = function () { fazt.storage.kv.set("go", true); return { ok: true }; };"#,
    ),
    (
        "api/fire.js",
        r#"module.exports = function (req) {
  for (let i = 0; i < Number(req.query.n); i++) fazt.worker.spawn("workers/noop.js");
  return { ok: true };
};"#,
    ),
    (
        "api/fill.js",
        r#"module.exports = function (req) {
  let n = 0;
  try { for (let i = 0; i < Number(req.query.n); i++) { fazt.worker.spawn("workers/noop.js"); n++; } }
  catch (e) { return { n, error: String(e) }; }
  return { n };
};"#,
    ),
    (
        "api/swallow.js",
        r#"module.exports = function () {
  for (let i = 0; i < 3; i++) fazt.worker.spawn("workers/noop.js");
  try { fazt.worker.list({ status: "queued" }); } catch (e) { /* swallowed */ }
  return { ok: true };
};"#,
    ),
    ("workers/noop.js", "module.exports = () => null;"),
    (
        "workers/gate.js",
        r#"module.exports = (job) => { while (fazt.storage.kv.get("go") !== true) job.sleep(5); return null; };"#,
    ),
];

/// Commits the store made so far (`fazt_store_commit_seconds_count` in /metrics).
fn store_commits(s: &Server) -> u64 {
    let text = s.api("GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix("fazt_store_commit_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("fazt_store_commit_seconds_count in /metrics")
}

fn hold_the_apps_slots(s: &Server, app: &str) {
    assert_eq!(s.app(app, "GET", "/api/gates", None).status, 200);
    assert!(
        wait_until(30, || s.health()["workers"]["running"].as_u64() == Some(5)),
        "the 5 gate jobs did not start: {}",
        s.health()
    );
}

/// Issue 10, goal 1 (throughput): a handler spawning 400 jobs in a loop waited for one
/// store commit per spawn (400 transactions, one writer round trip each). Its spawns
/// are now queued for the writer and committed in batches; the handler still reads its
/// own spawns back (`get`, `list`), and its response goes out only once all of them
/// are committed.
#[test]
fn a_handler_spawning_in_a_loop_commits_its_jobs_in_batches() {
    let s = Server::start();
    s.deploy_ok("batch", BATCH_APP);
    hold_the_apps_slots(&s, "batch");
    let before = store_commits(&s);
    let r = s.app("batch", "GET", "/api/many?n=400", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let commits = store_commits(&s) - before;
    let body = r.json();
    let ids: Vec<String> = body["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 400);
    assert_eq!(body["first"], "queued", "{body}");
    assert_eq!(body["listed"], 400, "{body}");
    // One commit per spawn before (400, plus any other write). Batched, a commit takes
    // every spawn queued while the one before it was written: 20-150 commits in a
    // debug build (more on a loaded machine, where the handler's loop is about as slow
    // as a commit).
    assert!(commits < 300, "400 spawns took {commits} store commits");
    // Committed when the response came: every job is there, queued.
    let page = s.api_json("GET", "/api/jobs?app=batch&status=queued&limit=1000");
    assert_eq!(page.as_array().map(|a| a.len()), Some(400), "{page}");
    assert_eq!(s.app("batch", "GET", "/api/go", None).status, 200);
    let last = ids.last().expect("a last id");
    s.wait_status(last, "done", 60);
    assert!(wait_until(60, || {
        s.api_json("GET", "/api/jobs?app=batch&status=done&limit=1000")
            .as_array()
            .map(|a| a.len())
            == Some(405)
    }));
}

/// Issue 10, goal 1: batched spawns are durable once the handler answered: kill -9 right
/// after the response loses none of them.
#[test]
fn batched_spawns_survive_a_kill_9_right_after_the_response() {
    let mut s = Server::start();
    s.deploy_ok("batch", BATCH_APP);
    hold_the_apps_slots(&s, "batch");
    let r = s.app("batch", "GET", "/api/many?n=300", None);
    assert_eq!(r.status, 200, "{}", r.text());
    s.kill9();
    s.restart();
    let body = r.json();
    for id in body["ids"].as_array().expect("ids") {
        let id = id.as_str().expect("id");
        let job = s.job(id);
        assert_eq!(job["id"], id, "job {id} lost: {job}");
    }
}

/// Issue 10, goal 1: a batched spawn whose commit fails (the disk is full) fails the
/// handler's request with 503, although the spawn call itself had returned.
#[test]
fn a_batched_spawn_that_cannot_commit_fails_the_request() {
    let s = Server::start_hooked(&[]);
    s.deploy_ok("batch", BATCH_APP);
    s.hooks(serde_json::json!({ "fail_writes": true }));
    let r = s.app("batch", "GET", "/api/fire?n=3", None);
    s.hooks(serde_json::json!({ "fail_writes": false }));
    assert_eq!(r.status, 503, "{}", r.text());
}

/// Review of batched spawns, HIGH 1: the admission of a batched spawn trusted the
/// scheduler's count of queued jobs, which learns of a committed batch only a moment
/// later; concurrent handlers got 1,464 jobs into one app's queue of 1,000 (the
/// reviewer's run, intermittent). The bound is now counted in each insert's own
/// transaction: concurrent handlers spawning 2,000 jobs into one app leave at most
/// 1,000 queued.
#[test]
fn concurrent_batched_spawns_never_pass_the_queue_bound() {
    let s = Server::start();
    s.deploy_ok("batch", BATCH_APP);
    hold_the_apps_slots(&s, "batch");
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let r = s.app("batch", "GET", "/api/fill?n=250", None);
                assert!(
                    r.status == 200 || r.status == 429,
                    "{} {}",
                    r.status,
                    r.text()
                );
            });
        }
    });
    let mut last = u64::MAX;
    assert!(wait_until(30, || {
        let h = s.health();
        let queued = h["workers"]["queued"].as_u64().unwrap_or(0);
        let settled = h["store"]["pending_writes"] == 0 && queued == last;
        last = queued;
        settled
    }));
    assert!(
        last <= 1000,
        "{last} jobs queued in an app bounded at 1,000"
    );
    assert!(
        last >= 900,
        "only {last} queued: the bound refused too early"
    );
}

/// Review of batched spawns, HIGH 2: a spawn that could not be stored was reported by
/// the next `fazt.worker` call; a handler that caught that error answered 200 with ids
/// of jobs that do not exist. The run's response now fails whatever the handler caught.
#[test]
fn a_swallowed_spawn_failure_still_fails_the_response() {
    let s = Server::start_hooked(&[]);
    s.deploy_ok("batch", BATCH_APP);
    s.hooks(serde_json::json!({ "fail_writes": true }));
    let r = s.app("batch", "GET", "/api/swallow", None);
    s.hooks(serde_json::json!({ "fail_writes": false }));
    assert_eq!(r.status, 503, "{}", r.text());
}

/// The figure of one kind in `fazt_job_transitions_total`.
fn transitions(s: &Server, kind: &str) -> u64 {
    let text = s.api("GET", "/metrics", None).text();
    let line = format!("fazt_job_transitions_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in /metrics"))
}

#[test]
fn a_short_job_is_written_to_the_store_once() {
    // A job's start and its outcome each rewrote its row (and its index entries): the
    // writer's largest cost per no-op job. A run that ends within 5 ms of its start is
    // written once now, its start folded into the outcome.
    let s = server_with(&["w"]);
    let before = transitions(&s, "start_and_outcome");
    let mut jobs = Vec::new();
    for i in 0..20 {
        let job = spawn(
            &s,
            "w",
            "workers/w.js",
            serde_json::json!({ "data": { "x": i } }),
        );
        let done = s.wait_status(&id(&job), "done", 20);
        // The folded write keeps the dispatch time as the start.
        let (created, started, ended) = (
            done["createdAt"].as_i64().expect("createdAt"),
            done["startedAt"].as_i64().expect("startedAt"),
            done["doneAt"].as_i64().expect("doneAt"),
        );
        assert!(created <= started && started <= ended, "{done}");
        assert_eq!(done["result"]["doubled"], i * 2);
        jobs.push(done);
    }
    // Most of them at least (a loaded machine may hold a run past 5 ms).
    let folded = transitions(&s, "start_and_outcome") - before;
    assert!(folded >= 10, "{folded} of 20 short jobs written once");
    // A longer job still shows `running` while it runs.
    let long = spawn(&s, "w", "workers/short.js", Value::Null);
    let running = s.wait_status(&id(&long), "running", 10);
    assert!(running["startedAt"].as_i64().is_some(), "{running}");
    s.wait_status(&id(&long), "done", 20);
}

/// A figure of `fazt_job_contexts_total` (`fresh` or `warm`).
fn job_contexts(s: &Server, kind: &str) -> u64 {
    let text = s.api("GET", "/metrics", None).text();
    let line = format!("fazt_job_contexts_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// An app for the slot-spreading tests, its jobs reserving 1 MB each so all 20 slots
/// can run at once: `gates` (5 jobs that wait for `go`), `go`, `fire?n=` (no-op
/// jobs), `naps?n=&ms=` (jobs that sleep that long).
const SPREAD_APP: &[(&str, &str)] = &[
    (
        "api/gates.js",
        r#"module.exports = function () {
  for (let i = 0; i < 5; i++) fazt.worker.spawn("workers/gate.js", { memory: "1MB" });
  return { ok: true };
};"#,
    ),
    (
        "api/go.js",
        r#"module.exports = function () { fazt.storage.kv.set("go", true); return { ok: true }; };"#,
    ),
    (
        "api/fire.js",
        r#"module.exports = function (req) {
  for (let i = 0; i < Number(req.query.n); i++) fazt.worker.spawn("workers/noop.js", { memory: "1MB" });
  return { ok: true };
};"#,
    ),
    (
        "api/naps.js",
        r#"module.exports = function (req) {
  for (let i = 0; i < Number(req.query.n); i++)
    fazt.worker.spawn("workers/nap.js", { memory: "1MB", data: { ms: Number(req.query.ms) } });
  return { ok: true };
};"#,
    ),
    ("workers/noop.js", "module.exports = () => null;"),
    (
        "workers/nap.js",
        "module.exports = (job) => { job.sleep(job.data.ms); return null; };",
    ),
    (
        "workers/gate.js",
        r#"module.exports = (job) => { while (fazt.storage.kv.get("go") !== true) job.sleep(5); return null; };"#,
    ),
];

/// `g1`..`g4` hold every slot with gate jobs, then let them end, so each of the 20
/// slots keeps one of their contexts warm.
fn warm_every_slot_for_other_apps(s: &Server) {
    for g in ["g1", "g2", "g3", "g4"] {
        s.deploy_ok(g, SPREAD_APP);
        assert_eq!(s.app(g, "GET", "/api/gates", None).status, 200);
    }
    assert!(
        wait_until(30, || s.health()["workers"]["running"].as_u64() == Some(20)),
        "the 20 gate jobs did not start: {}",
        s.health()
    );
    for g in ["g1", "g2", "g3", "g4"] {
        assert_eq!(s.app(g, "GET", "/api/go", None).status, 200);
    }
    assert!(
        wait_until(30, || s.health()["workers"]["running"].as_u64() == Some(0)),
        "the gate jobs did not end: {}",
        s.health()
    );
}

/// Issue 10, goal 1: in the 20-app burst a tenth to a fifth of the server's CPU went to
/// fresh job contexts (1-2 ms each): a batch of an app took up to 5 slots at once, each
/// replacing another app's warm context, which that app's next batch rebuilt. Short
/// jobs of an app that runs already now wait for their app's own slot (delay
/// scheduling): 20 apps taking turns keep a slot each warm.
#[test]
fn short_jobs_of_many_apps_stay_on_their_own_warm_slots() {
    let s = Server::start();
    warm_every_slot_for_other_apps(&s);
    let apps: Vec<String> = (1..=16).map(|i| format!("s{i}")).collect();
    for a in &apps {
        s.deploy_ok(a, SPREAD_APP);
    }
    let before = job_contexts(&s, "fresh");
    for round in 1..=2 {
        for a in &apps {
            assert_eq!(s.app(a, "GET", "/api/fire?n=50", None).status, 200);
            assert!(
                wait_until(30, || count(&s, a, "done") == 50 * round),
                "{a}: {} of {} jobs done",
                count(&s, a, "done"),
                50 * round
            );
        }
    }
    let fresh = job_contexts(&s, "fresh") - before;
    // One per app in the first round (16), none in the second, and room for a loaded
    // machine's late slots; before: up to 5 per app and round, 160 (measured 150-160).
    assert!(
        fresh <= 40,
        "{fresh} fresh contexts for 1,600 short jobs of 16 apps"
    );
}

/// The other side of the rule above: jobs that run longer than a fresh context costs
/// still spread over their app's 5 places at once, whatever other apps keep warm.
#[test]
fn an_app_with_longer_jobs_still_spreads_over_other_apps_warm_slots() {
    let s = Server::start();
    warm_every_slot_for_other_apps(&s);
    s.deploy_ok("long", SPREAD_APP);
    assert_eq!(
        s.app("long", "GET", "/api/naps?n=10&ms=300", None).status,
        200
    );
    assert!(
        wait_until(30, || count(&s, "long", "done") == 10),
        "{} of 10 jobs done",
        count(&s, "long", "done")
    );
    let jobs = s.api_json("GET", "/api/jobs?app=long&limit=100");
    let spans: Vec<(i64, i64)> = jobs
        .as_array()
        .expect("job list")
        .iter()
        .map(|j| {
            (
                j["startedAt"].as_i64().expect("startedAt"),
                j["doneAt"].as_i64().expect("doneAt"),
            )
        })
        .collect();
    let most = spans
        .iter()
        .map(|&(start, _)| {
            spans
                .iter()
                .filter(|&&(a, b)| a <= start && start < b)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert_eq!(
        most, 5,
        "at most {most} of the app's 300 ms jobs ran at once: {spans:?}"
    );
}

/// A run's start is written a moment after it begins (short runs fold it into their
/// outcome), and its progress went to the store at once: for up to ~15 ms a job showed
/// progress while `queued`, and `list({ status: "running" })` missed it (the mall demo's
/// status check failed 1 run in 4). The first progress of a run now marks it running.
#[test]
fn a_job_with_progress_is_never_shown_queued() {
    let s = server_with(&["w"]);
    for _ in 0..5 {
        let job = spawn(&s, "w", "workers/prog.js", Value::Null);
        let url = format!("/api/jobs?op=get&id={}", id(&job));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let j = s.app("w", "GET", &url, None).json();
            if j["progress"] == 42 {
                assert_eq!(j["status"], "running", "{j}");
                assert!(j["startedAt"].as_i64().is_some(), "{j}");
                break;
            }
            assert!(Instant::now() < deadline, "no progress: {j}");
        }
        s.wait_status(&id(&job), "done", 10);
    }
}
