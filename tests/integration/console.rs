//! The operator console (issue 11): metrics that Prometheus can scrape (checked with a
//! Prometheus text-format parser), the job actions (retry, delete, bulk), the job list
//! filters and keyset pages, sign-in with a session cookie and its CSRF rule, the CLI.

use std::collections::HashMap;

use prometheus_parse::{LineInfo, Scrape, Value as PromValue};
use serde_json::Value;

use crate::util::Server;

const SPAWN: &str = r#"
module.exports = function (req) {
  const b = req.body || {};
  try { return fazt.worker.spawn(b.path || "workers/ok.js", b.opts); }
  catch (e) { return { status: 400, body: { error: String(e) } }; }
};
"#;

const APP: &[(&str, &str)] = &[
    ("api/spawn.js", SPAWN),
    ("api/boom.js", "module.exports = () => { throw new Error('boom'); };"),
    ("workers/ok.js", "module.exports = (job) => { job.checkpoint({ n: 1 }); return { ok: true }; };"),
    ("workers/fail.js", "module.exports = (job) => { throw new Error('nope ' + job.attempt); };"),
    (
        "workers/slow.js",
        "module.exports = (job) => { for (let i = 1; i <= 100; i++) { job.progress(i); job.log('step ' + i); job.sleep(100); } return 1; };",
    ),
    ("workers/wait.js", "module.exports = (job) => { while (true) job.sleep(60000); };"),
];

fn spawn(s: &Server, app: &str, path: &str, opts: Value) -> String {
    let body = serde_json::json!({ "path": path, "opts": opts }).to_string();
    let r = s.app(app, "POST", "/api/spawn", Some(&body));
    assert_eq!(r.status, 200, "spawn {path}: {}", r.text());
    r.json()["id"].as_str().expect("job id").to_string()
}

fn server() -> Server {
    let s = Server::start();
    s.deploy_ok("shop", APP);
    s
}

fn scrape(s: &Server) -> (String, Scrape) {
    let r = s.api("GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("unparsable exposition: {e}\n{text}"));
    (text, parsed)
}

fn histogram<'a>(
    scrape: &'a Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a [prometheus_parse::HistogramCount]> {
    scrape.samples.iter().find_map(|s| match &s.value {
        PromValue::Histogram(h)
            if s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) =>
        {
            Some(h.as_slice())
        }
        _ => None,
    })
}

fn untyped(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|s| {
        let v = match s.value {
            PromValue::Untyped(v) | PromValue::Counter(v) | PromValue::Gauge(v) => v,
            _ => return None,
        };
        (s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).then_some(v)
    })
}

/// Issue 11, metrics: histograms for enqueue→start wait and run time per app and path,
/// handler latency per app, outcomes per app by status, checkpoint and store commit
/// latency, all in a valid exposition: every line parses as a sample or a comment,
/// every family has HELP and TYPE, buckets are cumulative and end in `+Inf` = count.
/// Before: none of these families existed (the lookups below fail).
#[test]
fn metrics_histograms_parse_as_prometheus_text() {
    let s = server();
    let ok = spawn(&s, "shop", "workers/ok.js", serde_json::json!({}));
    let bad = spawn(&s, "shop", "workers/fail.js", serde_json::json!({}));
    s.wait_status(&ok, "done", 20);
    s.wait_status(&bad, "failed", 20);
    assert_eq!(s.app("shop", "GET", "/api/boom", None).status, 500);

    let (text, m) = scrape(&s);
    // Every line is a comment or a sample with a number: the crate's line parser, not a
    // regex of ours, decides.
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { .. } | LineInfo::Type { .. } | LineInfo::Empty => {}
            LineInfo::Sample { value, .. } => {
                let v = value.trim();
                assert!(
                    v == "+Inf" || v.parse::<f64>().is_ok(),
                    "bad value in {line:?}"
                );
            }
            LineInfo::Ignored => assert!(line.starts_with('#'), "unparsable line {line:?}"),
        }
    }
    let families = [
        "fazt_job_wait_seconds",
        "fazt_job_run_seconds",
        "fazt_handler_seconds",
        "fazt_checkpoint_seconds",
        "fazt_store_commit_seconds",
    ];
    for f in families {
        assert!(m.docs.contains_key(f), "no HELP for {f}");
        assert!(
            text.contains(&format!("# TYPE {f} histogram")),
            "no TYPE for {f}"
        );
    }
    let cases: [(&str, Vec<(&str, &str)>); 6] = [
        (
            "fazt_job_wait_seconds",
            vec![("app", "shop"), ("path", "workers/ok.js")],
        ),
        (
            "fazt_job_run_seconds",
            vec![("app", "shop"), ("path", "workers/fail.js")],
        ),
        ("fazt_handler_seconds", vec![("app", "shop")]),
        ("fazt_checkpoint_seconds", vec![]),
        ("fazt_store_commit_seconds", vec![]),
        (
            "fazt_job_run_seconds",
            vec![("app", "shop"), ("path", "workers/ok.js")],
        ),
    ];
    for (name, labels) in cases {
        let h = histogram(&m, name, &labels)
            .unwrap_or_else(|| panic!("no histogram {name} {labels:?} in\n{text}"));
        let mut last = 0.0;
        for b in h {
            assert!(b.count >= last, "{name}: buckets not cumulative: {h:?}");
            last = b.count;
        }
        let inf = h.last().expect("buckets");
        assert!(
            inf.less_than.is_infinite(),
            "{name}: last bucket is not +Inf"
        );
        let count = untyped(&m, &format!("{name}_count"), &labels).expect("_count");
        assert_eq!(inf.count, count, "{name}: +Inf bucket != _count");
        assert!(count >= 1.0, "{name}: nothing observed");
    }
    let outcome = |status: &str| {
        untyped(
            &m,
            "fazt_job_outcomes_total",
            &[("app", "shop"), ("status", status)],
        )
    };
    assert_eq!(outcome("done"), Some(1.0), "{text}");
    assert_eq!(outcome("failed"), Some(1.0), "{text}");
    let errors = untyped(
        &m,
        "fazt_handler_responses_total",
        &[("app", "shop"), ("code", "5xx")],
    );
    assert_eq!(errors, Some(1.0), "{text}");
}

/// Issue 11: "bounded label sets: cap distinct paths per app". An app with 40 worker
/// files gets at most 32 path series plus one `_other`; before, there was no per-path
/// series at all.
#[test]
fn metrics_path_labels_are_capped_per_app() {
    let s = Server::start();
    let mut files: Vec<(String, String)> = vec![("api/spawn.js".into(), SPAWN.into())];
    for n in 0..40 {
        files.push((
            format!("workers/w{n}.js"),
            "module.exports = () => 1;".into(),
        ));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    s.deploy_ok("many", &refs);
    let ids: Vec<String> = (0..40)
        .map(|n| {
            spawn(
                &s,
                "many",
                &format!("workers/w{n}.js"),
                serde_json::json!({}),
            )
        })
        .collect();
    for id in &ids {
        s.wait_status(id, "done", 30);
    }
    let (text, m) = scrape(&s);
    let paths: HashMap<String, f64> = m
        .samples
        .iter()
        .filter(|x| x.metric == "fazt_job_run_seconds" && x.labels.get("app") == Some("many"))
        .filter_map(|x| match &x.value {
            PromValue::Histogram(h) => Some((
                x.labels.get("path").unwrap_or("").to_string(),
                h.last().map_or(0.0, |b| b.count),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(paths.len(), 33, "{text}");
    assert_eq!(paths.get("_other"), Some(&8.0), "{paths:?}");
    assert_eq!(paths.values().sum::<f64>(), 40.0);
}

/// The Grafana dashboard in examples/grafana/ only charts metric families the server
/// exposes (a renamed metric would leave a panel silently empty).
#[test]
fn grafana_dashboard_uses_exposed_metrics() {
    let s = server();
    let id = spawn(&s, "shop", "workers/ok.js", serde_json::json!({}));
    s.wait_status(&id, "done", 20);
    s.app("shop", "GET", "/api/boom", None);
    let (text, _) = scrape(&s);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/grafana/fazt-dashboard.json"
    );
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard"))
        .expect("dashboard JSON");
    let mut used = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("fazt_") {
                    used += 1;
                    assert!(
                        text.lines().any(|l| l.starts_with(word)),
                        "panel {:?} uses {word}, which /metrics does not expose",
                        panel["title"]
                    );
                }
            }
        }
    }
    assert!(used >= 10, "the dashboard charts too little: {used}");
}
