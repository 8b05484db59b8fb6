//! Typed errors at the boundaries (issue 9, item 9): a failure that is not the
//! caller's fault never reads as "invalid" (400) or as a handler bug (500). A store
//! that cannot write is a 503 and a full job queue a 429, also when a handler lets the
//! error from `fazt.*` through uncaught.

use serde_json::json;

use crate::util::{wait_until, Server};

const APP: &[(&str, &str)] = &[
    (
        "api/spawn.js",
        r#"module.exports = function (req) {
  return fazt.worker.spawn(req.query.path || "workers/w.js");
};"#,
    ),
    (
        "api/kv.js",
        r#"module.exports = function (req) {
  fazt.storage.kv.set("k", "v");
  return { ok: true };
};"#,
    ),
    (
        "api/caught.js",
        r#"module.exports = function (req) {
  try { fazt.storage.kv.set("k", "v"); return { stored: true }; }
  catch (e) { return { caught: String(e) }; }
};"#,
    ),
    (
        "api/bug.js",
        r#"module.exports = function (req) { throw new Error("a bug in the app"); };"#,
    ),
    (
        "api/flood.js",
        r#"module.exports = function (req) {
  let n = 0;
  try { for (; n < 1100; n++) fazt.worker.spawn("workers/w.js"); }
  catch (e) { return { spawned: n, error: String(e) }; }
  return { spawned: n };
};"#,
    ),
    (
        "workers/w.js",
        "module.exports = (job) => { while (true) job.sleep(60000); };",
    ),
];

#[test]
fn infrastructure_failure_is_not_a_400() {
    let s = Server::start_hooked(&[]);
    s.deploy_ok("e", APP);
    s.hooks(json!({ "fail_writes": true }));
    // The first refused write marks the store degraded; until then a write may still
    // be in flight, so poll for the typed answer.
    let mut last = None;
    let typed = wait_until(10, || {
        let r = s.app("e", "GET", "/api/spawn", None);
        let done = r.status == 503;
        last = Some((r.status, r.text()));
        done
    });
    assert!(typed, "a spawn while the store cannot write: {last:?}");
    let r = s.app("e", "GET", "/api/spawn", None);
    assert_eq!(r.status, 503, "spawn: {}", r.text());
    assert!(
        r.error().contains("cannot store data right now"),
        "{}",
        r.text()
    );
    // Any store write a handler does not catch: 503, not the 500 of a thrown bug.
    let r = s.app("e", "GET", "/api/kv", None);
    assert_eq!(r.status, 503, "kv.set: {}", r.text());
    // The error is still an ordinary catchable Error.
    let v = s.call("e", "/api/caught");
    assert!(
        v["caught"]
            .as_str()
            .is_some_and(|e| e.contains("cannot store data right now")),
        "{v}"
    );
    // The caller's mistakes and the app's bugs keep their statuses meanwhile.
    let r = s.app("e", "GET", "/api/spawn?path=api/kv.js", None);
    assert_eq!(r.status, 500, "a bad path thrown uncaught: {}", r.text());
    assert!(r.error().contains("fazt.worker.spawn: "), "{}", r.text());
    let r = s.app("e", "GET", "/api/bug", None);
    assert_eq!(r.status, 500, "{}", r.text());
    s.hooks(json!({ "fail_writes": false }));
    let ok = wait_until(10, || s.app("e", "GET", "/api/kv", None).status == 200);
    assert!(ok, "writes work again");
}

#[test]
fn full_job_queue_is_a_429_not_a_500() {
    let s = Server::start();
    s.deploy_ok("e", APP);
    let v = s.call("e", "/api/flood");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("job queue of app 'e' is full (1000 jobs waiting)")),
        "{v}"
    );
    let r = s.app("e", "GET", "/api/spawn", None);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.error().contains("try again later"), "{}", r.text());
}
