//! Apps stay apart: an attacker app and a victim app on one server (jobs, kv, channels,
//! files, contexts), remove + redeploy under the same name, path forms that must not
//! reach server-side files, header injection, and the data dir at rest.

use crate::util::Server;

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
