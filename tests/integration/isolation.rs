//! Apps stay apart: an attacker app and a victim app on one server (jobs, kv, channels,
//! files, contexts), remove + redeploy under the same name, path forms that must not
//! reach server-side files, header injection, and the data dir at rest.

use serde_json::{json, Value};

use crate::util::{request, wait_until, Server};

#[test]
fn server_side_files_never_served() {
    let s = Server::start();
    s.deploy_ok(
        "site",
        &[
            ("index.html", "home"),
            ("api/index.html", "SECRET api page"),
            ("api/secret.txt", "SECRET api text"),
            ("workers/index.html", "SECRET worker page"),
            ("workers/job.js", "module.exports = () => 'SECRET job';"),
            ("Workers/index.html", "SECRET mixed case"),
        ],
    );
    for path in [
        "//api",
        "//api/",
        "//api/index.html",
        "/./api/secret.txt",
        "/%61pi/secret.txt",
        "/x/..%2fapi/secret.txt",
        "/workers",
        "/workers/",
        "//workers",
        "/workers/index.html",
        "/%2e/workers/job.js",
        "/workers%2fjob.js",
        "/WORKERS/job.js",
        "/Workers",
        "/Api/secret.txt",
    ] {
        let r = s.app("site", "GET", path, None);
        assert!(
            !r.text().contains("SECRET"),
            "GET {path} served a server-side file: {} {}",
            r.status,
            r.text()
        );
        assert!(r.status >= 400, "GET {path}: {}", r.status);
    }
    assert_eq!(s.app("site", "GET", "//", None).text(), "home");
    assert_eq!(s.app("site", "GET", "/./index.html", None).text(), "home");
}

#[test]
fn header_injection_is_refused() {
    let s = Server::start();
    s.deploy_ok(
        "hdr",
        &[(
            "api/h.js",
            r#"
module.exports = function (req) {
  const h = {};
  if (req.query.k === "crlf") h["X-A"] = "a\r\nInjected: yes";
  if (req.query.k === "lf") h["X-A"] = "a\nInjected: yes";
  if (req.query.k === "nul") h["X-A"] = "a\u0000b";
  if (req.query.k === "space") h["X B"] = "1";
  if (req.query.k === "colon") h["Injected: yes\r\nX"] = "1";
  if (req.query.k === "length") h["Content-Length"] = "0";
  if (req.query.k === "ok") h["X-A"] = "fine";
  return { status: 200, headers: h, body: "body" };
};
"#,
        )],
    );
    for (k, name) in [
        ("crlf", "X-A"),
        ("lf", "X-A"),
        ("nul", "X-A"),
        ("space", "X B"),
        ("colon", "Injected"),
        ("length", "Content-Length"),
    ] {
        let r = s.app("hdr", "GET", &format!("/api/h?k={k}"), None);
        assert_eq!(r.status, 500, "{k}: {} {:?}", r.text(), r.headers);
        assert!(r.header("injected").is_none(), "{k}: {:?}", r.headers);
        assert!(r.error().contains(name), "{k}: {}", r.error());
    }
    let ok = s.app("hdr", "GET", "/api/h?k=ok", None);
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-a"), Some("fine"));
    assert_eq!(ok.text(), "body");
}

/// One handler for both apps of the suite, driven by `?op=`.
const PROBE: &str = r#"
module.exports = function (req) {
  const q = req.query;
  const attempt = (f) => { try { return { v: f() }; } catch (e) { return { error: String(e) }; } };
  switch (q.op) {
    case "kvset": fazt.storage.kv.set(q.k, q.v); return { ok: true };
    case "kvget": return { v: fazt.storage.kv.get(q.k) };
    case "kvlist": return { keys: fazt.storage.kv.list(q.prefix || "") };
    case "spawn": return fazt.worker.spawn("workers/w.js", { daemon: true });
    case "get": return { job: fazt.worker.get(q.id) };
    case "cancel": return attempt(() => fazt.worker.cancel(q.id));
    case "list": return { ids: fazt.worker.list({}).map((j) => j.id) };
    case "setglobal": globalThis.secret = q.v; return { ok: true };
    case "getglobal": return { v: typeof secret === "undefined" ? null : secret };
    case "require": return attempt(() => require(q.p));
    case "spawnpath": return attempt(() => fazt.worker.spawn(q.p, {}));
    case "broadcast": return { sent: fazt.realtime.broadcast(q.ch, { from: fazt.app.name }) };
    case "count": return { n: fazt.realtime.count(q.ch), subs: fazt.realtime.subscribers(q.ch) };
    case "version": return { v: VERSION };
  }
  return { status: 400, body: "op?" };
};
"#;

const DAEMON: &str = r#"
module.exports = function (job) {
  while (!job.cancelled) job.sleep(20);
  return "stopped";
};
"#;

fn probe_app(s: &Server, app: &str, version: u32) {
    let api = format!("const VERSION = {version};\n{PROBE}");
    s.deploy_ok(
        app,
        &[
            ("api/p.js", &api),
            ("lib/secret.js", "module.exports = 'SECRET of the victim';"),
            ("secret.txt", "SECRET file of the victim"),
            ("workers/w.js", DAEMON),
            (
                "workers/v.js",
                &format!("module.exports = () => ({{ v: {version} }});"),
            ),
        ],
    );
}

fn op(s: &Server, app: &str, query: &str) -> Value {
    s.call(app, &format!("/api/p?{query}"))
}

#[test]
fn attacker_cannot_reach_victim_jobs() {
    let s = Server::start();
    probe_app(&s, "victim", 1);
    probe_app(&s, "attacker", 1);
    let job = op(&s, "victim", "op=spawn");
    let id = job["id"].as_str().expect("job id").to_string();
    s.wait_status(&id, "running", 10);
    assert_eq!(
        op(&s, "attacker", &format!("op=get&id={id}"))["job"],
        Value::Null
    );
    let cancel = op(&s, "attacker", &format!("op=cancel&id={id}"));
    assert!(
        cancel["v"].is_null() || cancel["v"] == false,
        "attacker's cancel of a victim job: {cancel}"
    );
    let listed = op(&s, "attacker", "op=list");
    assert!(!listed["ids"].to_string().contains(&id), "{listed}");
    assert_eq!(s.job(&id)["status"], "running", "the victim's job runs on");
    assert!(op(&s, "victim", "op=list")["ids"].to_string().contains(&id));
}

#[test]
fn attacker_cannot_reach_victim_kv_files_or_context() {
    let s = Server::start();
    probe_app(&s, "victim", 1);
    probe_app(&s, "attacker", 1);
    op(&s, "victim", "op=kvset&k=token&v=SECRET");
    op(&s, "victim", "op=setglobal&v=SECRET");
    assert_eq!(op(&s, "attacker", "op=kvget&k=token")["v"], Value::Null);
    assert_eq!(op(&s, "attacker", "op=kvlist")["keys"], json!([]));
    // Warm every HTTP thread of the attacker: none may see the victim's global.
    for _ in 0..40 {
        assert_eq!(op(&s, "attacker", "op=getglobal")["v"], Value::Null);
    }
    for p in [
        "../victim/lib/secret",
        "/victim/lib/secret",
        "../../lib/secret",
    ] {
        let r = op(&s, "attacker", &format!("op=require&p={p}"));
        assert!(!r.to_string().contains("SECRET of the victim"), "{p}: {r}");
    }
    for p in [
        "workers/../../victim/workers/w.js",
        "../victim/workers/w.js",
    ] {
        let r = op(&s, "attacker", &format!("op=spawnpath&p={p}"));
        assert!(r["error"].is_string(), "{p}: {r}");
    }
    let r = s.app("attacker", "GET", "/../victim/secret.txt", None);
    assert!(!r.text().contains("SECRET"), "{}", r.text());
    // The victim still has all of it.
    assert_eq!(op(&s, "victim", "op=kvget&k=token")["v"], "SECRET");
}

#[test]
fn attacker_cannot_reach_victim_channels() {
    let s = Server::start();
    probe_app(&s, "victim", 1);
    probe_app(&s, "attacker", 1);
    let mut victim_ws = s.ws("victim");
    victim_ws.subscribe("room");
    let sent = op(&s, "attacker", "op=broadcast&ch=room");
    assert_eq!(sent["sent"], 0);
    assert!(
        victim_ws.recv_within(300).is_none(),
        "the attacker's broadcast arrived"
    );
    let seen = op(&s, "attacker", "op=count&ch=room");
    assert_eq!(seen["n"], 0);
    assert_eq!(seen["subs"], json!([]));
    assert_eq!(op(&s, "victim", "op=count&ch=room")["n"], 1);
}

#[test]
fn stale_code_after_remove_and_redeploy() {
    let s = Server::start();
    probe_app(&s, "app", 1);
    // Warm many HTTP threads and a worker slot with version 1.
    for _ in 0..40 {
        assert_eq!(op(&s, "app", "op=version")["v"], 1);
    }
    let job = s.call("app", "/api/p?op=spawnpath&p=workers/v.js")["v"]["id"]
        .as_str()
        .expect("job id")
        .to_string();
    assert_eq!(s.wait_status(&job, "done", 10)["result"]["v"], 1);
    let first = s.api_json("GET", "/api/apps/app");
    assert_eq!(s.api("DELETE", "/api/apps/app", None).status, 200);
    probe_app(&s, "app", 2);
    let stale = (0..40)
        .filter(|_| op(&s, "app", "op=version")["v"] != 2)
        .count();
    assert_eq!(stale, 0, "{stale} of 40 calls ran the removed app's code");
    for _ in 0..5 {
        let job = s.call("app", "/api/p?op=spawnpath&p=workers/v.js")["v"]["id"]
            .as_str()
            .expect("job id")
            .to_string();
        assert_eq!(s.wait_status(&job, "done", 10)["result"]["v"], 2);
    }
    // Deploy ids never repeat, also for a new app under an old name.
    let second = s.api_json("GET", "/api/apps/app");
    assert_eq!(
        second["version"], first["version"],
        "versions restart: {second}"
    );
    assert_ne!(second["deploy_id"], first["deploy_id"], "{first} {second}");
    assert_ne!(second["app_id"], first["app_id"], "{first} {second}");
}

#[test]
fn removed_app_kv_not_inherited() {
    let s = Server::start();
    let writer = r#"
module.exports = function () {
  let i = 0;
  for (;;) fazt.storage.kv.set("old:" + i++, i);
};
"#;
    let files = [("api/w.js", writer), ("api/p.js", PROBE)];
    s.deploy_ok("kvw", &files);
    let (addr, port) = (s.addr, s.port());
    let running = std::thread::spawn(move || {
        let host = format!("kvw.localhost:{port}");
        request(addr, "GET", &host, "/api/w", &[], None).status
    });
    assert!(
        wait_until(10, || op(&s, "kvw", "op=kvlist&prefix=old:")["keys"]
            .as_array()
            .is_some_and(|k| k.len() >= 50)),
        "the handler did not start writing"
    );
    let t0 = std::time::Instant::now();
    assert_eq!(s.api("DELETE", "/api/apps/kvw", None).status, 200);
    let removal = t0.elapsed();
    s.deploy_ok("kvw", &[("api/p.js", PROBE)]);
    // Whatever the old handler still does must not land in the new app.
    for _ in 0..10 {
        let keys = op(&s, "kvw", "op=kvlist");
        assert_eq!(keys["keys"], json!([]), "the new app inherited kv keys");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = running.join().expect("writer request");
    assert!(status >= 500, "the old handler was stopped: {status}");
    assert!(
        removal < std::time::Duration::from_secs(4),
        "removal stops the handler instead of waiting out its deadline: {removal:?}"
    );
}

#[test]
fn removed_app_websocket_is_closed() {
    let s = Server::start();
    probe_app(&s, "chat", 1);
    let mut old = s.ws("chat");
    old.subscribe("room");
    assert_eq!(s.api("DELETE", "/api/apps/chat", None).status, 200);
    // The server ends the session: a close frame or the connection dropping.
    let closed = wait_until(5, || {
        let _ = old
            .ws
            .get_mut()
            .set_read_timeout(Some(std::time::Duration::from_millis(100)));
        match old.ws.read() {
            Ok(tungstenite::Message::Close(_)) => true,
            Ok(_) => false,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(_) => true,
        }
    });
    assert!(closed, "the removed app's WebSocket stayed open");
    probe_app(&s, "chat", 2);
    let mut fresh = s.ws("chat");
    fresh.subscribe("room");
    assert_eq!(op(&s, "chat", "op=broadcast&ch=room")["sent"], 1);
    assert_eq!(fresh.recv()["data"]["from"], "chat");
    assert!(
        matches!(old.ws.read(), Err(_) | Ok(tungstenite::Message::Close(_))),
        "the old client still hears the new app"
    );
}

#[test]
fn client_ids_do_not_reveal_other_apps_traffic() {
    let s = Server::start();
    probe_app(&s, "spy", 1);
    probe_app(&s, "busy", 1);
    let mut first = s.ws("spy");
    first.subscribe("ch");
    let before = op(&s, "spy", "op=count&ch=ch")["subs"][0]
        .as_str()
        .expect("id")
        .to_string();
    let mut others: Vec<_> = (0..5).map(|_| s.ws("busy")).collect();
    for o in &mut others {
        o.subscribe("ch");
    }
    let mut second = s.ws("spy");
    second.subscribe("ch");
    let subs = op(&s, "spy", "op=count&ch=ch")["subs"].clone();
    let after = subs
        .as_array()
        .expect("subs")
        .iter()
        .filter_map(Value::as_str)
        .find(|id| *id != before)
        .expect("second id")
        .to_string();
    let num = |id: &str| id.trim_start_matches('c').parse::<i64>().ok();
    let gap = num(&after).zip(num(&before)).map(|(a, b)| a - b);
    assert_ne!(
        gap,
        Some(6),
        "ids {before} and {after} count the other app's 5 connections"
    );
    assert_ne!(before, after);
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn data_files_are_private() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    // The loosest umask: every file would be world-readable (and writable) by default.
    let mut s = Server::start_in_umask(&dir, &[], Some(0));
    probe_app(&s, "app", 1);
    op(&s, "app", "op=kvset&k=a&v=1");
    let check = |dir: &std::path::Path| {
        assert_eq!(mode(dir), 0o700, "data dir");
        for f in ["fazt.db", "fazt.db-wal", "fazt.db-shm", "admin.token"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
    };
    check(&dir);
    // A data dir made loose by an older version (or by hand) is tightened at start.
    s.stop();
    use std::os::unix::fs::PermissionsExt;
    let loosen = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    loosen(&dir, 0o755);
    loosen(&dir.join("fazt.db"), 0o644);
    let s = Server::start_in_umask(&dir, &[], Some(0));
    op(&s, "app", "op=kvset&k=b&v=2");
    check(&dir);
}

/// A server on `dir` with an app and some data, stopped cleanly (so fazt.db holds it all).
fn server_with_data(dir: &std::path::Path) {
    let mut s = Server::start_in(dir, &[]);
    probe_app(&s, "app", 1);
    let files: Vec<(String, String)> = (0..300)
        .map(|i| (format!("f/{i}.txt"), format!("{i:0>900}")))
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    s.deploy_ok("bulk", &refs);
    assert_eq!(s.stop(), 0);
}

#[test]
fn corrupt_database_refused_at_start() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    server_with_data(&dir);
    let db = dir.join("fazt.db");
    let mut bytes = std::fs::read(&db).expect("read db");
    assert!(bytes.len() > 200 * 1024, "db is {} bytes", bytes.len());
    // Garbage over 16 whole pages in the middle, as a bad disk or a stray write would.
    let page = 4096;
    let start = bytes.len() / 2 / page * page;
    for b in &mut bytes[start..start + 16 * page] {
        *b = 0xAB;
    }
    std::fs::write(&db, &bytes).expect("write garbage");
    let (code, err) = crate::util::start_refused(&dir);
    assert_ne!(code, 0);
    assert!(err.contains("damaged"), "{err}");
    assert!(err.contains("fazt.db"), "{err}");
    // `fazt check` reports it too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fazt"))
        .args(["--data-dir", dir.to_str().expect("utf-8"), "check"])
        .output()
        .expect("fazt check");
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn emptied_database_beside_token_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    server_with_data(&dir);
    std::fs::write(dir.join("fazt.db"), b"").expect("empty the db");
    let (code, err) = crate::util::start_refused(&dir);
    assert_ne!(code, 0);
    assert!(err.contains("empty or missing"), "{err}");
    assert!(err.contains("admin.token"), "{err}");
    std::fs::remove_file(dir.join("fazt.db")).expect("remove the db");
    let (code, err) = crate::util::start_refused(&dir);
    assert_ne!(code, 0, "{err}");
    // Deleting the token too is the documented way to start over.
    std::fs::remove_file(dir.join("admin.token")).expect("remove token");
    let s = Server::start_in(&dir, &[]);
    assert_eq!(s.api_json("GET", "/api/apps"), json!([]));
}

#[test]
fn backup_while_running_restores() {
    let s = Server::start();
    probe_app(&s, "app", 1);
    for i in 0..20 {
        op(&s, "app", &format!("op=kvset&k=before{i}&v={i}"));
    }
    // Writes keep coming while the backup runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (addr, port, stop) = (s.addr, s.port(), stop.clone());
        std::thread::spawn(move || {
            let host = format!("app.localhost:{port}");
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let path = format!("/api/p?op=kvset&k=during{n}&v={n}");
                assert_eq!(request(addr, "GET", &host, &path, &[], None).status, 200);
                n += 1;
            }
            n
        })
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let backup = tmp.path().join("backup.db");
    let out = s.cli(&["backup", backup.to_str().expect("utf-8")]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().expect("writer");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(written > 0);
    assert_eq!(mode(&backup), 0o600);
    let check = s.cli(&["check", "--file", backup.to_str().expect("utf-8")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Restore into a fresh data dir: the app and its data are there.
    let dir = tmp.path().join("restored");
    std::fs::create_dir(&dir).expect("dir");
    std::fs::copy(&backup, dir.join("fazt.db")).expect("restore");
    let r = Server::start_in(&dir, &[]);
    let keys = op(&r, "app", "op=kvlist&prefix=before");
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(20), "{keys}");
    assert_eq!(op(&r, "app", "op=version")["v"], 1);
}

#[test]
fn jobs_spawned_during_removal_do_not_outlive_it() {
    let s = Server::start();
    let spawner = r#"
module.exports = function () {
  for (;;) { try { fazt.worker.spawn("workers/w.js", { data: { old: true } }); } catch (e) { if (String(e).includes("stopped")) throw e; } }
};
"#;
    let old_worker = "module.exports = (job) => { job.sleep(50); return 'old'; };";
    s.deploy_ok(
        "jobs",
        &[
            ("api/s.js", spawner),
            ("api/p.js", PROBE),
            ("workers/w.js", old_worker),
        ],
    );
    let (addr, port) = (s.addr, s.port());
    let running = std::thread::spawn(move || {
        let host = format!("jobs.localhost:{port}");
        request(addr, "GET", &host, "/api/s", &[], None).status
    });
    assert!(
        wait_until(10, || s
            .api_json("GET", "/api/jobs?app=jobs&limit=1000")
            .as_array()
            .is_some_and(|j| j.len() >= 20)),
        "the handler did not start spawning"
    );
    assert_eq!(s.api("DELETE", "/api/apps/jobs", None).status, 200);
    // The new app's worker records any job that reaches it.
    let ghost = "module.exports = (job) => { fazt.storage.kv.set('ghost:' + job.id, job.data); };";
    s.deploy_ok("jobs", &[("api/p.js", PROBE), ("workers/w.js", ghost)]);
    let _ = running.join();
    for _ in 0..20 {
        let ghosts = op(&s, "jobs", "op=kvlist&prefix=ghost:")["keys"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(ghosts, 0, "jobs of the removed app ran the new app's code");
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert_eq!(s.api_json("GET", "/api/jobs?app=jobs"), json!([]));
    assert_eq!(s.health()["workers"]["queued"], 0);
}
