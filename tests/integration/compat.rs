//! Apps as they are written for upstream fazt, run unmodified through the real binary:
//! the fazt documents' own examples (byte for byte, in `compat/docs/`), every script
//! form of handlers and workers, `respond`, `sleep`, `require`, `priority`,
//! `fazt.worker.wait`, the extended `job` object, and the mall demo's upstream
//! endpoints.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{wait_until, Server};

const DOC_TEST_WORKER: &str = include_str!("compat/docs/test-worker.js");
const DOC_HELLO: &str = include_str!("compat/docs/hello.js");
const DOC_START_TICKER: &str = include_str!("compat/docs/start-ticker.js");
const DOC_TICKER: &str = include_str!("compat/docs/ticker.js");
const DOC_SPAWN_SYNC: &str = include_str!("compat/docs/spawn-sync.js");
const DOC_SPAWN_SYNC_DAEMON: &str = include_str!("compat/docs/spawn-sync-daemon.js");
const DOC_SYNC: &str = include_str!("compat/docs/sync.js");
const DOC_START_SIM: &str = include_str!("compat/docs/start-sim.js");

/// Jobs of `app`, newest first (system API).
fn jobs(s: &Server, app: &str) -> Vec<Value> {
    match s.api_json("GET", &format!("/api/jobs?app={app}")) {
        Value::Array(a) => a,
        other => panic!("job list is not an array: {other}"),
    }
}

/// The only job of `app` running `path`, once there is one.
fn job_of(s: &Server, app: &str, path: &str) -> Value {
    let mut found = Value::Null;
    let ok = wait_until(10, || {
        found = jobs(s, app)
            .into_iter()
            .find(|j| j["path"] == path)
            .unwrap_or(Value::Null);
        !found.is_null()
    });
    assert!(ok, "no job for {path} in app {app}");
    found
}

fn id(job: &Value) -> String {
    job["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no job id in {job}"))
        .to_string()
}

fn logs(s: &Server, id: &str) -> Vec<String> {
    match s.api_json("GET", &format!("/api/jobs/{id}/logs")) {
        Value::Array(a) => a
            .iter()
            .map(|l| l["msg"].as_str().unwrap_or_default().to_string())
            .collect(),
        other => panic!("logs are not an array: {other}"),
    }
}

fn cancel(s: &Server, id: &str) -> Value {
    s.api_json("POST", &format!("/api/jobs/{id}/cancel"))
}

/// The next broadcast on `channel`, within `secs`.
fn next_message(ws: &mut crate::util::Ws, channel: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(m) = ws.recv_within(500) {
            if m["type"] == "message" && m["channel"] == channel {
                return m["data"].clone();
            }
        }
    }
    panic!("no broadcast on '{channel}' within {secs}s");
}

#[test]
fn plan22_basic_job_top_level_handler_and_worker_run_as_written() {
    let s = Server::start();
    s.deploy_ok(
        "docs",
        &[
            ("api/test-worker.js", DOC_TEST_WORKER),
            ("workers/hello.js", DOC_HELLO),
        ],
    );
    // Top-level code with a top-level `return`: the object is the 200 JSON body.
    let r = s.app("docs", "GET", "/api/test-worker", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let job = &body["jobId"];
    assert_eq!(job["path"], "workers/hello.js", "{body}");
    let done = s.wait_status(&id(job), "done", 20);
    assert_eq!(done["result"], json!({ "message": "done" }), "{done}");
    assert_eq!(done["error"], Value::Null);
}

#[test]
fn plan22_daemon_ticker_broadcasts_checkpoints_and_resumes_as_written() {
    let mut s = Server::start();
    let files = [
        ("api/start-ticker.js", DOC_START_TICKER),
        ("workers/ticker.js", DOC_TICKER),
    ];
    s.deploy_ok("docs", &files);
    let mut ws = s.ws("docs");
    ws.subscribe("tick");
    // The handler returns nothing: an empty 204.
    let r = s.app("docs", "POST", "/api/start-ticker", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(next_message(&mut ws, "tick", 10), json!({ "count": 1 }));
    assert_eq!(next_message(&mut ws, "tick", 10), json!({ "count": 2 }));
    let job = job_of(&s, "docs", "workers/ticker.js");
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(job["daemon"], true);
    drop(ws);

    // A graceful restart keeps the daemon; it resumes from its checkpoint
    // (`job.getCheckpoint()?.count`), not from zero.
    assert_eq!(s.stop(), 0);
    s.restart();
    let mut ws = s.ws("docs");
    ws.subscribe("tick");
    let resumed = next_message(&mut ws, "tick", 15)["count"]
        .as_i64()
        .expect("count");
    assert!(resumed >= 3, "resumed at {resumed}, expected past 2");
    let stopped = cancel(&s, &id(&job));
    assert_eq!(stopped["status"], "cancelled", "{stopped}");
}

#[test]
fn v0_10_13_sync_worker_uses_global_sleep_and_stops_on_cancel() {
    let s = Server::start();
    s.deploy_ok(
        "docs",
        &[
            ("api/spawn-sync.js", DOC_SPAWN_SYNC),
            ("workers/sync.js", DOC_SYNC),
        ],
    );
    let t0 = Instant::now();
    let r = s.app("docs", "POST", "/api/spawn-sync", None);
    assert_eq!(r.status, 204, "{}", r.text());
    let job = job_of(&s, "docs", "workers/sync.js");
    let jid = id(&job);
    assert_eq!(job["data"], json!({ "userId": 123 }));
    // `sleep(1000)` between steps: the second step comes about a second later.
    let mut lines = Vec::new();
    assert!(wait_until(15, || {
        lines = logs(&s, &jid);
        lines.len() >= 2
    }));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert!(lines.iter().all(|l| l == "Processing..."), "{lines:?}");
    let j = s.wait_job(&jid, 15, |j| j["progress"].as_i64() >= Some(1));
    assert_eq!(j["status"], "running", "{j}");
    // The same uniqueKey gives the same job.
    assert_eq!(s.app("docs", "POST", "/api/spawn-sync", None).status, 204);
    assert_eq!(jobs(&s, "docs").len(), 1);
    // A cancel wakes `sleep` at once; the loop ends and the result is kept.
    let t = Instant::now();
    let done = cancel(&s, &jid);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(done["status"], "cancelled", "{done}");
    let n = done["result"]["processed"].as_i64().expect("processed");
    assert!(n >= 2, "{done}");
}

#[test]
fn v0_10_13_sync_worker_progress_past_100_is_clamped_not_thrown() {
    let mut s = Server::start();
    s.deploy_ok(
        "docs",
        &[
            ("api/spawn-sync.js", DOC_SPAWN_SYNC_DAEMON),
            ("workers/sync.js", DOC_SYNC),
        ],
    );
    assert_eq!(s.app("docs", "POST", "/api/spawn-sync", None).status, 204);
    let jid = id(&job_of(&s, "docs", "workers/sync.js"));
    s.wait_job(&jid, 15, |j| j["progress"].as_i64() >= Some(1));
    // Fast-forward the daemon's life: stop the server and give it the checkpoint it
    // would have after 150 s, as if it had run that long (its cursor is the progress).
    assert_eq!(s.stop(), 0);
    let db = rusqlite::Connection::open(s.dir.join("fazt.db")).expect("open the store");
    let n = db
        .execute(
            "UPDATE worker_jobs SET checkpoint = '{\"cursor\":150}' WHERE id = ?1",
            [&jid],
        )
        .expect("seed checkpoint");
    assert_eq!(n, 1);
    drop(db);
    s.restart();
    let j = s.wait_job(&jid, 15, |j| {
        j["progress"] == 100 && j["status"] == "running"
    });
    assert_eq!(j["error"], Value::Null, "{j}");
    // Still running a second later: progress(151) did not throw.
    std::thread::sleep(Duration::from_millis(1200));
    let j = s.job(&jid);
    assert_eq!(j["status"], "running", "{j}");
    assert_eq!(j["restarts"], 0, "{j}");
    let done = cancel(&s, &jid);
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["result"]["processed"].as_i64() >= Some(151), "{done}");
}

#[test]
fn v0_10_14_idle_timeout_spawn_is_accepted_as_written() {
    let s = Server::start();
    s.deploy_ok(
        "docs",
        &[
            ("api/start-sim.js", DOC_START_SIM),
            (
                "workers/sim.js",
                "while (!job.cancelled) { fazt.realtime.broadcast('mall', { at: Date.now() }); sleep(50); }",
            ),
        ],
    );
    let mut ws = s.ws("docs");
    ws.subscribe("mall");
    assert_eq!(s.app("docs", "POST", "/api/start-sim", None).status, 204);
    assert!(next_message(&mut ws, "mall", 10)["at"].is_number());
    let job = job_of(&s, "docs", "workers/sim.js");
    assert_eq!(job["daemon"], true);
    assert_eq!(cancel(&s, &id(&job))["status"], "cancelled");
}

/// A handler that spawns `body.path` with `body.opts` and returns the job.
const SPAWN: &str = "return fazt.worker.spawn(request.body.path, request.body.opts || {});";

fn spawn(s: &Server, app: &str, path: &str, opts: Value) -> Value {
    let body = json!({ "path": path, "opts": opts }).to_string();
    let r = s.app(app, "POST", "/api/spawn", Some(&body));
    assert_eq!(r.status, 200, "spawn {path}: {}", r.text());
    r.json()
}

#[test]
fn every_handler_form_runs_commonjs_top_level_exported_and_handler_function() {
    let s = Server::start();
    s.deploy_ok(
        "forms",
        &[
            (
                "api/cjs.js",
                "module.exports = function (request) { return { form: 'cjs', q: request.query.x }; };",
            ),
            ("api/top.js", "return { form: 'top', q: request.query.x };"),
            (
                "api/mixed.js",
                "const form = 'mixed:' + request.method;\nmodule.exports = function (req) { return { form, q: req.query.x }; };",
            ),
            (
                "api/handler.js",
                "function handler(req) {\n  return { form: 'handler', q: req.query.x };\n}",
            ),
            (
                "api/async.js",
                "module.exports = async (r) => { await null; return { form: 'async', q: r.query.x }; };",
            ),
            ("api/nothing.js", "const a = 1;"),
        ],
    );
    for (route, form) in [
        ("cjs", "cjs"),
        ("top", "top"),
        ("mixed", "mixed:GET"),
        ("handler", "handler"),
        ("async", "async"),
    ] {
        // Twice each, so the second call runs in a warm context.
        for x in ["1", "2"] {
            let got = s.call("forms", &format!("/api/{route}?x={x}"));
            assert_eq!(got, json!({ "form": form, "q": x }), "/api/{route}");
        }
    }
    assert_eq!(s.app("forms", "GET", "/api/nothing", None).status, 204);
}

#[test]
fn every_worker_form_runs_commonjs_top_level_and_handler_function() {
    let s = Server::start();
    s.deploy_ok(
        "forms",
        &[
            ("api/spawn.js", SPAWN),
            (
                "workers/cjs.js",
                "module.exports = (job) => ({ form: 'cjs', x: job.data.x });",
            ),
            (
                "workers/top.js",
                "job.log('top ' + job.data.x);\nreturn { form: 'top', x: job.data.x };",
            ),
            (
                "workers/handler.js",
                "function handler(job) { return { form: 'handler', x: job.data.x }; }",
            ),
        ],
    );
    for (path, form) in [
        ("workers/cjs.js", "cjs"),
        ("workers/top.js", "top"),
        ("workers/handler.js", "handler"),
    ] {
        for x in [1, 2] {
            let job = spawn(&s, "forms", path, json!({ "data": { "x": x } }));
            let done = s.wait_status(&id(&job), "done", 20);
            assert_eq!(done["result"], json!({ "form": form, "x": x }), "{path}");
        }
    }
}

#[test]
fn respond_builds_responses_from_body_status_or_both() {
    let s = Server::start();
    s.deploy_ok(
        "resp",
        &[
            (
                "api/r.js",
                r#"const kind = request.query.kind;
if (kind === 'body') return respond({ ok: true });
if (kind === 'status') return respond(204);
if (kind === 'both') return respond(201, { created: true });
if (kind === 'text') return respond(200, 'hello');
if (kind === 'headers') return respond(202, 'h', { 'X-Fazt': 'yes' });
if (kind === 'bad') return respond(99, 'x');
return respond();"#,
            ),
            (
                "api/cjs.js",
                "module.exports = function (request) { return respond(404, { error: 'no ' + request.query.what }); };",
            ),
        ],
    );
    let r = s.app("resp", "GET", "/api/r?kind=body", None);
    assert_eq!((r.status, r.json()), (200, json!({ "ok": true })));
    assert_eq!(s.app("resp", "GET", "/api/r?kind=status", None).status, 204);
    let r = s.app("resp", "GET", "/api/r?kind=both", None);
    assert_eq!((r.status, r.json()), (201, json!({ "created": true })));
    let r = s.app("resp", "GET", "/api/r?kind=text", None);
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    let r = s.app("resp", "GET", "/api/r?kind=headers", None);
    assert_eq!((r.status, r.header("x-fazt")), (202, Some("yes")));
    let r = s.app("resp", "GET", "/api/r?kind=bad", None);
    assert_eq!(r.status, 500);
    assert!(
        r.error().contains("respond: the status must be"),
        "{}",
        r.error()
    );
    let r = s.app("resp", "GET", "/api/r", None);
    assert_eq!(r.status, 200);
    let r = s.app("resp", "GET", "/api/cjs?what=cake", None);
    assert_eq!((r.status, r.json()), (404, json!({ "error": "no cake" })));
}

/// Declares everything a top-level scope can hold, and reports whether any of it was
/// already there: a warm context must not show one run's scope to the next.
const LEAKY: &str = r#"const seenBefore = typeof secret !== 'undefined' || 'Thing' in globalThis
  || 'secret' in globalThis || 'remember' in globalThis || 'counter' in globalThis;
var secret = ARG.data;
let counter = 0;
counter++;
function remember() { return secret; }
class Thing {}
return { seenBefore, counter, secret: remember(), thing: typeof Thing };"#;

#[test]
fn warm_contexts_do_not_leak_top_level_scope_between_runs() {
    let s = Server::start();
    let handler = LEAKY.replace("ARG.data", "request.query.s");
    let worker = LEAKY.replace("ARG.data", "job.data.s");
    s.deploy_ok(
        "leak",
        &[
            ("api/leak.js", handler.as_str()),
            ("api/spawn.js", SPAWN),
            ("workers/leak.js", worker.as_str()),
        ],
    );
    // More requests than HTTP threads: contexts are certainly reused.
    for i in 0..40 {
        let s_ = format!("v{i}");
        let got = s.call("leak", &format!("/api/leak?s={s_}"));
        assert_eq!(
            got,
            json!({ "seenBefore": false, "counter": 1, "secret": s_, "thing": "function" }),
            "request {i}"
        );
    }
    // Jobs of one app, one after the other, reuse the slot's warm context.
    for i in 0..6 {
        let s_ = format!("w{i}");
        let job = spawn(
            &s,
            "leak",
            "workers/leak.js",
            json!({ "data": { "s": s_ } }),
        );
        let done = s.wait_status(&id(&job), "done", 20);
        assert_eq!(
            done["result"],
            json!({ "seenBefore": false, "counter": 1, "secret": s_, "thing": "function" }),
            "job {i}"
        );
    }
}

/// An app with library files under `lib/` that handlers and workers require.
fn require_app(version: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "api/use.js",
            "const util = require('../lib/util');\nconst cfg = require('../lib/config.json');\nconst again = require('../lib/util.js');\nreturn { greeting: util.greet(request.query.name), version: cfg.version, same: util === again, loads: util.loads };".into(),
        ),
        (
            "lib/util.js",
            "exports.loads = (globalThis.__utilLoads = (globalThis.__utilLoads || 0) + 1);\nexports.greet = (name) => require('./words/hello.js').word + ', ' + name;".into(),
        ),
        ("lib/words/hello.js", "module.exports = { word: 'hello' };".into()),
        ("lib/config.json", format!("{{ \"version\": \"{version}\" }}")),
        (
            "api/cycle.js",
            "const a = require('../lib/a');\nreturn { a: a.name, b: a.b(), bSawA: a.bSawA() };".into(),
        ),
        (
            "lib/a.js",
            "exports.name = 'a';\nconst b = require('./b');\nexports.b = () => b.name;\nexports.bSawA = () => b.sawA;".into(),
        ),
        (
            "lib/b.js",
            "const a = require('./a');\nexports.name = 'b';\nexports.sawA = a.name;".into(),
        ),
        (
            "api/bad.js",
            "return { out: require(request.query.p) };".into(),
        ),
        ("lib/syntax.js", "const ok = 1;\nconst = 2;\n".into()),
        (
            "lib/throws.js",
            "const fine = 1;\n\nthrow new TypeError('lib refuses');\n".into(),
        ),
        (
            "lib/later.js",
            "module.exports = function () {\n  return JSON.parse('{broken');\n};".into(),
        ),
        (
            "api/later.js",
            "const later = require('../lib/later');\nreturn later();".into(),
        ),
        ("lib/notes.txt", "not code".into()),
        ("api/spawn.js", SPAWN.into()),
        (
            "workers/use.js",
            "const util = require('../lib/util');\nreturn util.greet(job.data.name);".into(),
        ),
    ]
}

fn deploy_owned(s: &Server, app: &str, files: &[(&'static str, String)]) {
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
    s.deploy_ok(app, &files);
}

#[test]
fn require_loads_app_files_js_and_json_cached_per_context() {
    let s = Server::start();
    deploy_owned(&s, "req", &require_app("1"));
    for _ in 0..20 {
        let got = s.call("req", "/api/use?name=ann");
        assert_eq!(got["greeting"], "hello, ann", "{got}");
        assert_eq!(got["version"], "1");
        assert_eq!(got["same"], true, "one module instance per context");
        // Loaded once per context, not once per request.
        assert_eq!(got["loads"], 1, "{got}");
    }
    let job = spawn(
        &s,
        "req",
        "workers/use.js",
        json!({ "data": { "name": "bo" } }),
    );
    assert_eq!(s.wait_status(&id(&job), "done", 20)["result"], "hello, bo");
}

#[test]
fn require_cycle_behaves_as_in_node() {
    let s = Server::start();
    deploy_owned(&s, "req", &require_app("1"));
    // b requires a while a is still loading: it sees a's exports as far as they got.
    assert_eq!(
        s.call("req", "/api/cycle"),
        json!({ "a": "a", "b": "b", "bSawA": "a" })
    );
}

#[test]
fn redeploy_invalidates_required_modules() {
    let s = Server::start();
    deploy_owned(&s, "req", &require_app("1"));
    for _ in 0..20 {
        assert_eq!(s.call("req", "/api/use?name=x")["version"], "1");
    }
    deploy_owned(&s, "req", &require_app("2"));
    for _ in 0..20 {
        assert_eq!(s.call("req", "/api/use?name=x")["version"], "2");
    }
}

fn require_error(s: &Server, spec: &str) -> String {
    let q: String = spec
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let r = s.app("req", "GET", &format!("/api/bad?p={q}"), None);
    assert_eq!(r.status, 500, "require({spec}): {}", r.text());
    r.error()
}

#[test]
fn require_refuses_paths_outside_the_app_with_clear_errors() {
    let s = Server::start();
    deploy_owned(&s, "req", &require_app("1"));
    for (spec, needle) in [
        ("../../etc/passwd", "leads outside the app"),
        ("../../../x.js", "leads outside the app"),
        ("/etc/passwd", "absolute paths are not allowed"),
        ("node:fs", "Node's built-in modules are not available"),
        ("fs", "packages are not available"),
        ("./nope", "no file api/nope.js or api/nope.json"),
        ("../lib/notes.txt", "no file lib/notes.txt.js"),
    ] {
        let e = require_error(&s, spec);
        assert!(e.contains(needle), "require({spec}): {e}");
        assert!(e.contains(spec), "the error names the path: {e}");
        assert!(
            e.contains("api/bad.js"),
            "the error names the requiring file: {e}"
        );
    }
}

#[test]
fn require_errors_carry_the_required_files_name_and_line() {
    let s = Server::start();
    deploy_owned(&s, "req", &require_app("1"));
    let e = require_error(&s, "../lib/syntax.js");
    assert!(e.starts_with("SyntaxError"), "{e}");
    assert!(e.contains("lib/syntax.js"), "{e}");
    assert!(e.contains("line 2"), "{e}");
    let e = require_error(&s, "../lib/throws");
    assert!(e.starts_with("TypeError: lib refuses"), "{e}");
    assert!(e.contains("lib/throws.js:3"), "{e}");
    // Thrown later, from a function of a required file.
    let r = s.app("req", "GET", "/api/later", None);
    assert_eq!(r.status, 500);
    assert!(r.error().contains("lib/later.js:2"), "{}", r.error());
    // A failed load is not cached: the next require tries again (and fails again).
    let e = require_error(&s, "../lib/throws");
    assert!(e.contains("lib refuses"), "{e}");
}

#[test]
fn priority_high_jobs_of_an_app_start_before_queued_lower_ones() {
    let s = Server::start();
    s.deploy_ok(
        "prio",
        &[
            ("api/spawn.js", SPAWN),
            (
                "api/go.js",
                "fazt.storage.kv.set('go-' + request.query.n, true);\nreturn respond(204);",
            ),
            ("api/order.js", "return fazt.storage.kv.get('order') || [];"),
            (
                "workers/block.js",
                "while (fazt.storage.kv.get('go-' + job.data.n) !== true) sleep(20);\nreturn job.data.n;",
            ),
            (
                "workers/task.js",
                "const order = fazt.storage.kv.get('order') || [];\norder.push(job.data.name);\nfazt.storage.kv.set('order', order);\nreturn job.data.name;",
            ),
        ],
    );
    // Five blockers fill the app's five running places.
    let blockers: Vec<String> = (0..5)
        .map(|n| {
            id(&spawn(
                &s,
                "prio",
                "workers/block.js",
                json!({ "data": { "n": n } }),
            ))
        })
        .collect();
    for b in &blockers {
        s.wait_status(b, "running", 10);
    }
    let mut tasks = Vec::new();
    for p in ["low", "normal", "high"] {
        let job = spawn(
            &s,
            "prio",
            "workers/task.js",
            json!({ "data": { "name": p }, "priority": p }),
        );
        assert_eq!(job["status"], "queued", "{job}");
        tasks.push(id(&job));
    }
    // One place frees up: the three run one after the other in it, high first.
    assert_eq!(s.app("prio", "POST", "/api/go?n=0", None).status, 204);
    for t in &tasks {
        s.wait_status(t, "done", 10);
    }
    assert_eq!(
        s.call("prio", "/api/order"),
        json!(["high", "normal", "low"])
    );
    for n in 1..5 {
        s.app("prio", "POST", &format!("/api/go?n={n}"), None);
    }
    // A bad priority is a clear error.
    let body = json!({ "path": "workers/task.js", "opts": { "priority": "urgent" } }).to_string();
    let r = s.app("prio", "POST", "/api/spawn", Some(&body));
    assert_eq!(r.status, 500);
    assert!(
        r.error()
            .contains("priority must be 'low', 'normal' or 'high'"),
        "{}",
        r.error()
    );
}

const WAIT_APP: &[(&str, &str)] = &[
    ("api/spawn.js", SPAWN),
    (
        "api/wait.js",
        r#"const j = fazt.worker.spawn('workers/slow.js', { data: { ms: Number(request.query.ms) } });
try {
  return fazt.worker.wait(j.id, { timeout: request.query.t });
} catch (e) {
  return respond(408, { error: String(e), id: j.id });
}"#,
    ),
    (
        "api/waitfor.js",
        "return fazt.worker.wait(request.query.id, { timeout: '1s' });",
    ),
    (
        "workers/slow.js",
        "sleep(job.data.ms);\nreturn { slept: job.data.ms };",
    ),
    (
        "workers/waiter.js",
        r#"const other = fazt.worker.spawn('workers/slow.js', { data: { ms: job.data.ms } });
job.log('waiting for ' + other.id);
const ended = fazt.worker.wait(other.id, { timeout: '1m' });
return { status: ended.status, result: ended.result, other: other.id };"#,
    ),
];

#[test]
fn wait_returns_the_ended_job_or_throws_on_timeout() {
    let s = Server::start();
    s.deploy_ok("wait", WAIT_APP);
    let r = s.app("wait", "GET", "/api/wait?ms=100&t=5s", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["status"], "done", "{j}");
    assert_eq!(j["result"], json!({ "slept": 100 }));

    let r = s.app("wait", "GET", "/api/wait?ms=60000&t=200ms", None);
    assert_eq!(r.status, 408, "{}", r.text());
    let e = r.json();
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains("is still running after 200ms")
                || m.contains("is still queued after 200ms")),
        "{e}"
    );
    cancel(&s, e["id"].as_str().expect("id"));

    // In a worker: waits for the other job, then carries on.
    let w = spawn(
        &s,
        "wait",
        "workers/waiter.js",
        json!({ "data": { "ms": 50 } }),
    );
    let done = s.wait_status(&id(&w), "done", 20);
    assert_eq!(done["result"]["status"], "done", "{done}");
    assert_eq!(done["result"]["result"], json!({ "slept": 50 }));
}

#[test]
fn wait_in_a_worker_wakes_on_cancel_and_in_a_handler_ends_at_its_deadline() {
    let s = Server::start();
    s.deploy_ok("wait", WAIT_APP);
    let w = id(&spawn(
        &s,
        "wait",
        "workers/waiter.js",
        json!({ "data": { "ms": 60000 } }),
    ));
    s.wait_job(&w, 10, |_| {
        logs(&s, &w).iter().any(|l| l.starts_with("waiting for "))
    });
    let t = Instant::now();
    let stopped = cancel(&s, &w);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(stopped["status"], "cancelled", "{stopped}");
    let other = logs(&s, &w)[0]
        .trim_start_matches("waiting for ")
        .to_string();
    assert_eq!(cancel(&s, &other)["status"], "cancelled");

    // A handler cannot outwait its own 5 s deadline.
    let t = Instant::now();
    let r = s.app("wait", "GET", "/api/wait?ms=60000&t=1m", None);
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

#[test]
fn wait_sees_only_jobs_of_its_own_app() {
    let s = Server::start();
    s.deploy_ok("wait", WAIT_APP);
    s.deploy_ok("other", WAIT_APP);
    let mine = spawn(
        &s,
        "wait",
        "workers/slow.js",
        json!({ "data": { "ms": 1 } }),
    );
    s.wait_status(&id(&mine), "done", 10);
    let ok = s.call("wait", &format!("/api/waitfor?id={}", id(&mine)));
    assert_eq!(ok["status"], "done");
    let r = s.app(
        "other",
        "GET",
        &format!("/api/waitfor?id={}", id(&mine)),
        None,
    );
    assert_eq!(r.status, 500);
    assert!(r.error().contains("no job"), "{}", r.error());
}

#[test]
fn job_object_has_memory_daemon_checkpoint_getter_and_checked_progress() {
    let s = Server::start();
    s.deploy_ok(
        "jobobj",
        &[
            ("api/spawn.js", SPAWN),
            (
                "workers/info.js",
                r#"const before = job.checkpoint();
job.checkpoint({ step: 1 });
const after = job.checkpoint();
const errors = [];
for (const bad of ['50', NaN, Infinity, undefined, null, {}]) {
  try { job.progress(bad); errors.push('accepted'); } catch (e) { errors.push(e.name); }
}
job.progress(-5);
job.progress(42.4);
job.memory = 1;
return { memory: job.memory, daemon: job.daemon, before, after, errors, progress: fazt.worker.get(job.id).progress };"#,
            ),
            (
                "workers/progress.js",
                "job.progress(250);\nwhile (fazt.storage.kv.get('go') !== true) sleep(20);\njob.progress(-3);\nwhile (fazt.storage.kv.get('go2') !== true) sleep(20);",
            ),
            ("api/go.js", "fazt.storage.kv.set(request.query.k, true); return respond(204);"),
        ],
    );
    let job = spawn(&s, "jobobj", "workers/info.js", json!({ "memory": "64MB" }));
    let done = s.wait_status(&id(&job), "done", 10);
    let r = &done["result"];
    assert_eq!(r["memory"], 64 << 20, "{done}");
    assert_eq!(r["daemon"], false);
    assert_eq!(r["before"], Value::Null);
    assert_eq!(r["after"], json!({ "step": 1 }));
    assert_eq!(r["errors"], json!(vec!["TypeError"; 6]), "{done}");

    let p = id(&spawn(&s, "jobobj", "workers/progress.js", json!({})));
    s.wait_job(&p, 10, |j| j["progress"] == 100 && j["status"] == "running");
    s.app("jobobj", "POST", "/api/go?k=go", None);
    s.wait_job(&p, 10, |j| j["progress"] == 0 && j["status"] == "running");
    s.app("jobobj", "POST", "/api/go?k=go2", None);
    s.wait_status(&p, "done", 10);
}

#[test]
fn mall_demo_answers_upstreams_simulate_start_status_and_stop() {
    let s = Server::start();
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mall"));
    let files = fazt::apps::read_dir_files(dir).expect("read examples/mall");
    let r = s.api(
        "PUT",
        "/api/apps/mall",
        Some(&fazt::apps::encode_upload(&files)),
    );
    assert_eq!(r.status, 200, "deploy mall: {}", r.text());

    let st = s.call("mall", "/api/simulate/status");
    assert_eq!(st["running"], false, "{st}");
    assert_eq!(
        s.app("mall", "GET", "/api/simulate/start", None).status,
        405
    );

    let mut ws = s.ws("mall");
    ws.subscribe("mall");
    let r = s.app("mall", "POST", "/api/simulate/start", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let started = r.json();
    let jid = id(&started["job"]);
    assert_eq!(started["job"]["daemon"], true, "{started}");
    // The old route and a second start give the same simulator.
    assert_eq!(id(&s.app("mall", "POST", "/api/start", None).json()), jid);
    assert_eq!(
        id(&s.app("mall", "POST", "/api/simulate/start", None).json()["job"]),
        jid
    );
    let tick = next_message(&mut ws, "mall", 10);
    assert!(tick["zones"].is_array(), "{tick}");

    let mut st = Value::Null;
    assert!(
        wait_until(10, || {
            st = s.call("mall", "/api/simulate/status");
            st["running"] == true && st["progress"].as_i64() > Some(0)
        }),
        "{st}"
    );
    assert_eq!(id(&st["job"]), jid);
    assert_eq!(st["job"]["status"], "running");
    assert_eq!(st["viewers"], 1, "{st}");

    let r = s.app("mall", "POST", "/api/simulate/stop", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let stopped = r.json();
    assert_eq!(stopped["stopped"]["id"], jid.as_str(), "{stopped}");
    assert_eq!(stopped["stopped"]["status"], "cancelled", "{stopped}");
    assert_eq!(s.call("mall", "/api/simulate/status")["running"], false);
}

#[test]
fn files_may_redeclare_the_names_the_loader_provides() {
    let s = Server::start();
    s.deploy_ok(
        "names",
        &[
            (
                "api/shadow.js",
                "const request = 'mine';\nlet module = 'm';\nconst require = 'r';\nreturn { request, module, require, file: __filename };",
            ),
            ("api/spawn.js", SPAWN),
            (
                "workers/parent.js",
                "const job = fazt.worker.spawn('workers/child.js', {});\nreturn { child: job.path };",
            ),
            ("workers/child.js", "return 1;"),
        ],
    );
    assert_eq!(
        s.call("names", "/api/shadow"),
        json!({ "request": "mine", "module": "m", "require": "r", "file": "api/shadow.js" })
    );
    let p = spawn(&s, "names", "workers/parent.js", json!({}));
    let done = s.wait_status(&id(&p), "done", 10);
    assert_eq!(
        done["result"],
        json!({ "child": "workers/child.js" }),
        "{done}"
    );
}

#[test]
fn a_file_that_closes_its_wrapper_early_is_still_stopped_at_the_deadline() {
    let s = Server::start();
    s.deploy_ok(
        "escape",
        &[
            // Closes the loader's wrapper and loops at the top level of the script.
            (
                "api/escape.js",
                "})(); }); while (true) {} (function () { return (() => {",
            ),
            (
                "lib/escape.js",
                "})(); }); while (true) {} (function () { return (() => {",
            ),
            ("api/req.js", "return require('../lib/escape.js');"),
            ("api/ok.js", "return { ok: true };"),
        ],
    );
    std::thread::scope(|sc| {
        for route in ["/api/escape", "/api/req"] {
            let s = &s;
            sc.spawn(move || {
                let t = Instant::now();
                let r = s.app("escape", "GET", route, None);
                assert_eq!(r.status, 504, "{route}: {}", r.text());
                assert!(
                    t.elapsed() < Duration::from_secs(8),
                    "{route}: {:?}",
                    t.elapsed()
                );
            });
        }
    });
    assert_eq!(s.call("escape", "/api/ok"), json!({ "ok": true }));
}
