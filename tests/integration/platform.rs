//! The platform: deploys, static files, handlers, the system API, tokens, restarts.

use std::time::{Duration, Instant};

use crate::util::{request, Server};

const HELLO: &str = r#"
module.exports = function (request) {
  const n = (fazt.storage.kv.get("hits") || 0) + 1;
  fazt.storage.kv.set("hits", n);
  return { status: 201, headers: { "X-App": fazt.app.name }, body: {
    n, method: request.method, path: request.path, query: request.query,
    body: request.body, ua: request.headers["x-test"] || null } };
};
"#;

fn demo(s: &Server) {
    s.deploy_ok(
        "demo",
        &[
            ("index.html", "<h1>home</h1>"),
            ("css/site.css", "body{}"),
            ("docs/index.html", "docs"),
            ("api/hello.js", HELLO),
            (
                "api/main.js",
                "module.exports = (r) => ({ fallback: r.path });",
            ),
            ("api/plain.js", "module.exports = () => 'just text';"),
            (
                "api/job.js",
                "module.exports = () => ({ status: 'running', id: 'x' });",
            ),
            (
                "api/throw.js",
                "module.exports = () => { throw new TypeError('bad thing'); };",
            ),
            ("api/loop.js", "module.exports = () => { while (true) {} };"),
            (
                "api/trycatch.js",
                "module.exports = () => { for (;;) { try { while (true) {} } catch (e) {} } };",
            ),
            (
                "api/callback.js",
                "module.exports = () => { [1, 2, 3].map(() => { while (true) {} }); };",
            ),
            ("api/syntax.js", "module.exports = function ( {"),
        ],
    );
}

#[test]
fn static_files_are_served_with_content_types() {
    let s = Server::start();
    demo(&s);
    let r = s.app("demo", "GET", "/", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "<h1>home</h1>");
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let r = s.app("demo", "GET", "/css/site.css", None);
    assert_eq!(r.header("content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(s.app("demo", "GET", "/docs/", None).text(), "docs");
    assert_eq!(s.app("demo", "GET", "/docs", None).text(), "docs");
    let missing = s.app("demo", "GET", "/nope.txt", None);
    assert_eq!(missing.status, 404);
    assert!(missing.error().contains("no file"), "{}", missing.text());
    // Server-side code is not downloadable: /api/* runs handlers, workers/ is hidden.
    assert!(!s
        .app("demo", "GET", "/api/hello.js", None)
        .text()
        .contains("module.exports"));
    s.deploy_ok("src", &[("workers/w.js", "module.exports = () => 1;")]);
    assert_eq!(s.app("src", "GET", "/workers/w.js", None).status, 404);
    assert_eq!(
        s.app("demo", "GET", "/%2e%2e/admin.token", None).status,
        404
    );
    let other = s.app("ghost", "GET", "/", None);
    assert_eq!(other.status, 404);
    assert!(other.error().contains("no app named 'ghost'"));
}

#[test]
fn handlers_get_the_request_and_shape_the_response() {
    let s = Server::start();
    demo(&s);
    let host = format!("demo.localhost:{}", s.port());
    let r = request(
        s.addr,
        "POST",
        &host,
        "/api/hello/deeper?x=1&y=a%20b",
        &[("Content-Type", "application/json"), ("X-Test", "yes")],
        Some(br#"{"k":[1,2]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("x-app"), Some("demo"));
    let v = r.json();
    assert_eq!(v["n"], 1);
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/api/hello/deeper");
    assert_eq!(v["query"]["y"], "a b");
    assert_eq!(v["body"]["k"][1], 2);
    assert_eq!(v["ua"], "yes");
    // kv persists between requests.
    assert_eq!(s.call("demo", "/api/hello")["n"], 2);
    // Fallback to api/main.js, plain string bodies, and non-response objects as JSON.
    assert_eq!(s.call("demo", "/api/other")["fallback"], "/api/other");
    let plain = s.app("demo", "GET", "/api/plain", None);
    assert_eq!(plain.json(), "just text");
    let job_like = s.app("demo", "GET", "/api/job", None);
    assert_eq!(job_like.status, 200);
    assert_eq!(job_like.json()["status"], "running");
}

#[test]
fn handler_errors_are_json_with_fitting_statuses() {
    let s = Server::start();
    demo(&s);
    let r = s.app("demo", "GET", "/api/throw", None);
    assert_eq!(r.status, 500);
    assert_eq!(r.error(), "TypeError: bad thing");
    let r = s.app("demo", "GET", "/api/syntax", None);
    assert_eq!(r.status, 500);
    assert!(r.error().contains("api/syntax.js"), "{}", r.text());
    let r = s.app("demo", "POST", "/api/hello", Some("{not json"));
    assert_eq!(r.status, 400);
    assert!(r.error().starts_with("malformed JSON body"), "{}", r.text());
    // The context survives a throw: the next request works.
    assert_eq!(s.call("demo", "/api/hello")["n"], 1);
}

#[test]
fn infinite_loops_in_handlers_time_out_with_504() {
    let s = Server::start();
    demo(&s);
    for route in ["/api/loop", "/api/trycatch", "/api/callback"] {
        let t = Instant::now();
        let r = s.app("demo", "GET", route, None);
        let took = t.elapsed();
        assert_eq!(r.status, 504, "{route}: {}", r.text());
        assert!(
            r.error().contains("did not finish within 5 s"),
            "{}",
            r.text()
        );
        assert!(took < Duration::from_secs(8), "{route} took {took:?}");
        assert!(took >= Duration::from_millis(4900), "{route} took {took:?}");
    }
    // The thread that ran the loop still serves.
    assert_eq!(s.call("demo", "/api/hello")["n"], 1);
}

#[test]
fn deploy_rejects_bad_names_paths_and_oversized_uploads() {
    let s = Server::start();
    for bad in ["Bad", "a_b", "-x", "x-", &"a".repeat(64)] {
        let r = s.deploy(bad, &[("index.html", "x")]);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.error().contains("invalid app name"), "{}", r.text());
    }
    for (path, needle) in [
        ("../escape.txt", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty path segment"),
        ("a\\b", "separator"),
    ] {
        let r = s.deploy("ok", &[(path, "x")]);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.error().contains(needle), "{path}: {}", r.text());
    }
    let r = s.api("PUT", "/api/apps/ok", Some(b"{\"files\": 3}"));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("malformed deploy body"));
    let big = vec![b' '; 51 << 20];
    let r = s.api("PUT", "/api/apps/ok", Some(&big));
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.error().contains("too large"));
    // Nothing was half-created.
    assert_eq!(s.api_json("GET", "/api/apps"), serde_json::json!([]));
}

#[test]
fn redeploy_replaces_every_file_and_reloads_handlers() {
    let s = Server::start();
    s.deploy_ok(
        "app",
        &[
            ("old.txt", "old"),
            ("api/v.js", "module.exports = () => ({v: 1});"),
        ],
    );
    assert_eq!(s.call("app", "/api/v")["v"], 1);
    s.deploy_ok(
        "app",
        &[
            ("new.txt", "new"),
            ("api/v.js", "module.exports = () => ({v: 2});"),
        ],
    );
    assert_eq!(s.app("app", "GET", "/old.txt", None).status, 404);
    assert_eq!(s.app("app", "GET", "/new.txt", None).text(), "new");
    // Every HTTP thread notices the new version.
    for _ in 0..40 {
        assert_eq!(s.call("app", "/api/v")["v"], 2);
    }
    let apps = s.api_json("GET", "/api/apps");
    assert_eq!(apps[0]["version"], 2);
    assert_eq!(apps[0]["files"], 2);
    let r = s.api("DELETE", "/api/apps/app", None);
    assert_eq!(r.status, 200);
    assert_eq!(s.app("app", "GET", "/new.txt", None).status, 404);
    assert_eq!(s.api("DELETE", "/api/apps/app", None).status, 404);
}

#[test]
fn admin_api_needs_the_token_but_health_does_not() {
    let s = Server::start();
    let h = s.health();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["workers"]["slots_total"], 20);
    assert!(h["workers"]["memory"]["budget_bytes"].as_u64() == Some(256 << 20));
    assert!(h["workers"]["memory"]["rss_bytes"].as_u64().unwrap_or(0) > 0);
    for key in ["running", "queued", "daemons"] {
        assert!(h["workers"][key].is_u64(), "{key} in {h}");
    }
    let none = request(s.addr, "GET", "127.0.0.1", "/api/apps", &[], None);
    assert_eq!(none.status, 401);
    assert!(none.error().contains("admin token"));
    let wrong = request(
        s.addr,
        "GET",
        "127.0.0.1",
        "/api/apps",
        &[("Authorization", "Bearer nope")],
        None,
    );
    assert_eq!(wrong.status, 403);
    let metrics = request(s.addr, "GET", "localhost", "/metrics", &[], None);
    assert_eq!(metrics.status, 401);
    let m = s.api("GET", "/metrics", None).text();
    assert!(m.contains("fazt_jobs{status=\"done\"}"), "{m}");
    assert!(m.contains("fazt_http_requests_total"), "{m}");
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.dir.join("admin.token"))
        .expect("token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The dashboard loads without a token (it asks for one).
    let dash = request(s.addr, "GET", "localhost", "/", &[], None);
    assert_eq!(dash.status, 200);
    assert!(dash.text().contains("<title>fazt</title>"));
}

#[test]
fn apps_and_data_survive_a_restart_and_shutdown_is_clean() {
    let mut s = Server::start();
    s.deploy_ok(
        "keep",
        &[("index.html", "still here"), ("api/hello.js", HELLO)],
    );
    assert_eq!(s.call("keep", "/api/hello")["n"], 1);
    let token = s.token.clone();
    assert_eq!(s.stop(), 0, "Ctrl-C exits 0");
    s.restart();
    assert_eq!(s.token, token, "the token is kept");
    assert_eq!(s.app("keep", "GET", "/", None).text(), "still here");
    assert_eq!(s.call("keep", "/api/hello")["n"], 2);
}

/// Runs `fazt server` on `data_dir` expecting it to refuse to start; returns stderr.
fn refused_start(data_dir: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fazt"))
        .args([
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "server",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_corrupt_database_is_a_clear_error_at_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("fazt.db"), vec![0x42u8; 8192]).expect("garbage");
    let err = refused_start(&dir);
    assert!(err.contains("error: opening the database"), "{err}");
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").expect("file");
    assert!(refused_start(&file).contains("not a directory"));
}

#[test]
fn cli_deploys_lists_and_removes_apps() {
    let s = Server::start();
    let src = tempfile::tempdir().expect("tmp");
    let app_dir = src.path().join("blog");
    std::fs::create_dir_all(app_dir.join("api")).expect("mkdir");
    std::fs::write(app_dir.join("index.html"), "blog home").expect("write");
    std::fs::write(
        app_dir.join("api/ping.js"),
        "module.exports = () => ({pong: true});",
    )
    .expect("write");
    std::fs::write(app_dir.join(".secret"), "not uploaded").expect("write");
    let out = s.cli(&["app", "deploy", app_dir.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployed blog: version 1, 2 files"));
    assert_eq!(s.app("blog", "GET", "/", None).text(), "blog home");
    assert_eq!(s.call("blog", "/api/ping")["pong"], true);
    assert_eq!(s.app("blog", "GET", "/.secret", None).status, 404);
    let list = s.cli(&["app", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("blog"));
    let bad = s.cli(&[
        "app",
        "deploy",
        app_dir.to_str().expect("utf-8"),
        "--name",
        "Bad Name",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid app name"));
    let rm = s.cli(&["app", "remove", "blog"]);
    assert!(rm.status.success());
    assert_eq!(s.app("blog", "GET", "/", None).status, 404);
    let rm_again = s.cli(&["app", "remove", "blog"]);
    assert!(String::from_utf8_lossy(&rm_again.stderr).contains("404"));
}

#[test]
fn builtins_replaced_for_interruptibility_behave_like_the_originals() {
    let s = Server::start();
    s.deploy_ok(
        "b",
        &[(
            "api/check.js",
            r#"module.exports = () => {
  const people = [{n: "b", a: 2}, {n: "a", a: 1}, {n: "c", a: 2}, {n: "d", a: 1}];
  const nums = [10, 9, 1, 100, 25, undefined, 3];
  const holes = [3, , 1];
  function depth(n) { return n === 0 ? 0 : 1 + depth(n - 1); }
  return {
    stable: people.slice().sort((x, y) => x.a - y.a).map((p) => p.n).join(""),
    dflt: nums.slice().sort(),
    numeric: [10, 9, 1, 100].sort((a, b) => a - b),
    holes: holes.sort().length,
    map: [1, 2, 3].map(function (x) { return x * this.k; }, { k: 3 }),
    filter: [1, 2, 3, 4].filter((x) => x % 2 === 0),
    reduce: [1, 2, 3].reduce((a, b) => a + b),
    reduceRight: ["a", "b", "c"].reduceRight((a, b) => a + b, ""),
    some: [1, 2].some((x) => x > 1), every: [1, 2].every((x) => x > 1),
    find: [5, 6].find((x) => x > 5), findIndex: [5, 6].findIndex((x) => x > 9),
    flatMap: [1, [2]].flatMap((x) => [x, x]),
    emptyReduce: (() => { try { [].reduce((a, b) => a); } catch (e) { return e.name; } })(),
    deep: depth(3000),
  };
};"#,
        ), ("api/runaway.js", "module.exports = () => { try { (function f() { f(); })(); } catch (e) { return 'caught'; } };")],
    );
    let v = s.call("b", "/api/check");
    assert_eq!(v["stable"], "adbc");
    assert_eq!(v["dflt"], serde_json::json!([1, 10, 100, 25, 3, 9, null]));
    assert_eq!(v["numeric"], serde_json::json!([1, 9, 10, 100]));
    assert_eq!(v["holes"], 3);
    assert_eq!(v["map"], serde_json::json!([3, 6, 9]));
    assert_eq!(v["filter"], serde_json::json!([2, 4]));
    assert_eq!(v["reduce"], 6);
    assert_eq!(v["reduceRight"], "cba");
    assert_eq!(v["some"], true);
    assert_eq!(v["every"], false);
    assert_eq!(v["find"], 6);
    assert_eq!(v["findIndex"], -1);
    assert_eq!(v["flatMap"], serde_json::json!([1, 1, [2], [2]]));
    assert_eq!(v["emptyReduce"], "TypeError");
    assert_eq!(v["deep"], 3000);
    // Runaway recursion is stopped by an error user code cannot swallow.
    let r = s.app("b", "GET", "/api/runaway", None);
    assert_eq!(r.status, 500);
    assert!(
        r.error().contains("maximum number of recursive calls"),
        "{}",
        r.text()
    );
    assert_eq!(s.call("b", "/api/check")["deep"], 3000);
}

#[test]
fn kv_storage_lists_by_prefix_expires_and_is_per_app() {
    let s = Server::start();
    let kv = r#"module.exports = (r) => {
  const q = r.query, kv = fazt.storage.kv;
  if (q.op === "seed") {
    for (const k of ["user:1", "user:2", "User:3", "user_%", "order:1"]) kv.set(k, { k });
    kv.set("short", 1, 150);
    return kv.list("user");
  }
  if (q.op === "list") return kv.list(q.prefix);
  if (q.op === "get") return kv.get(q.key);
  if (q.op === "del") return kv.delete(q.key);
  if (q.op === "bad") { try { kv.set("", 1); } catch (e) { return String(e); } }
  if (q.op === "ttl") { try { kv.set("x", 1, -5); } catch (e) { return String(e); } }
  if (q.op === "fn") { try { kv.set("x", () => 1); } catch (e) { return String(e); } }
};"#;
    s.deploy_ok("k1", &[("api/kv.js", kv)]);
    s.deploy_ok("k2", &[("api/kv.js", kv)]);
    assert_eq!(
        s.call("k1", "/api/kv?op=seed"),
        serde_json::json!(["user:1", "user:2", "user_%"])
    );
    assert_eq!(
        s.call("k1", "/api/kv?op=list&prefix=user_"),
        serde_json::json!(["user_%"])
    );
    assert_eq!(
        s.call("k1", "/api/kv?op=get&key=user:2"),
        serde_json::json!({"k": "user:2"})
    );
    assert_eq!(
        s.call("k2", "/api/kv?op=get&key=user:2"),
        serde_json::Value::Null,
        "per app"
    );
    assert_eq!(
        s.call("k2", "/api/kv?op=list&prefix="),
        serde_json::json!([])
    );
    assert_eq!(s.call("k1", "/api/kv?op=del&key=user:1"), true);
    assert_eq!(s.call("k1", "/api/kv?op=del&key=user:1"), false);
    assert!(crate::util::wait_until(10, || s
        .call("k1", "/api/kv?op=get&key=short")
        .is_null()));
    assert!(s
        .call("k1", "/api/kv?op=bad")
        .as_str()
        .is_some_and(|e| e.contains("1 to 512 bytes")));
    assert!(s
        .call("k1", "/api/kv?op=ttl")
        .as_str()
        .is_some_and(|e| e.contains("ttlMs")));
    assert!(s
        .call("k1", "/api/kv?op=fn")
        .as_str()
        .is_some_and(|e| e.contains("JSON-serialisable")));
}

#[test]
fn await_loops_and_native_callback_loops_time_out() {
    let s = Server::start_with(&["--http-threads", "1"]);
    s.deploy_ok(
        "stuck",
        &[
            ("api/awaits.js", "module.exports = async () => { for (;;) await 0; };"),
            (
                "api/chain.js",
                "module.exports = () => { const s = () => Promise.resolve().then(s); s(); return new Promise(() => {}); };",
            ),
            // A replace callback runs from native code, outside the budgeted loop: the
            // engine's interrupt flag, set by the deadline thread, stops it.
            (
                "api/native.js",
                "module.exports = () => 'a'.replace(/a/, () => { const f = () => 1; for (;;) f(); });",
            ),
        ],
    );
    for route in ["/api/awaits", "/api/chain", "/api/native"] {
        let t = Instant::now();
        let r = s.app("stuck", "GET", route, None);
        // The endless promise chain keeps every promise alive: it may hit the handler
        // heap cap (a 500) before its deadline.
        let capped = route == "/api/chain" && r.error().contains("allocated more than");
        assert!(
            r.status == 504 || capped,
            "{route}: {} {}",
            r.status,
            r.text()
        );
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{route}: {:?}",
            t.elapsed()
        );
    }
    // The only HTTP thread came back each time: no watchdog replacement was needed.
    let m = s.api("GET", "/metrics", None).text();
    assert!(m.contains("fazt_http_threads_abandoned_total 0"), "{m}");
    assert_eq!(s.health()["status"], "ok");
}

#[test]
fn promise_reactions_a_handler_leaves_behind_run_before_the_response() {
    let s = Server::start();
    s.deploy_ok(
        "micro",
        &[
            (
                "api/fire.js",
                "module.exports = (r) => { Promise.resolve().then(() => fazt.storage.kv.set('late', r.query.n)); return 'ok'; };",
            ),
            ("api/read.js", "module.exports = () => fazt.storage.kv.get('late');"),
        ],
    );
    assert_eq!(s.call("micro", "/api/fire?n=1"), "ok");
    assert_eq!(
        s.call("micro", "/api/read"),
        "1",
        "ran with its own request"
    );
    assert_eq!(s.call("micro", "/api/fire?n=2"), "ok");
    assert_eq!(s.call("micro", "/api/read"), "2");
}
