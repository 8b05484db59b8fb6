//! The operator console's server side: sign-in sessions (an HttpOnly, SameSite=Strict
//! cookie with an expiry, CSRF-safe), the job actions (retry, delete, bulk for an app)
//! and the filtered, keyset-paged job list. The admin bearer token keeps working for
//! every route; a session cookie is an alternative for the dashboard only.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tiny_http::{Method, Request};

use super::util::{self, HttpError, Reply};
use crate::services::Services;
use crate::store::{JobQuery, Retried};
use crate::worker::Status;

/// The session cookie's name.
pub const COOKIE: &str = "fazt_session";
/// How long a sign-in lasts; the cookie carries the same Max-Age.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; signing in past it forgets the oldest.
const MAX_SESSIONS: usize = 64;
/// The header a cookie-authorised request that changes something must carry. Browsers
/// never let another site set it without a CORS preflight, which this server never
/// grants, so a cross-site form or fetch cannot make an authorised change.
pub const CSRF_HEADER: &str = "x-fazt-console";

/// Signed-in sessions: id → expiry. In memory: a restart signs everyone out.
fn sessions() -> &'static Mutex<HashMap<String, Instant>> {
    static SESSIONS: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    SESSIONS.get_or_init(Default::default)
}

fn session_cookie(req: &Request) -> Option<String> {
    let cookies = util::header(req, "cookie")?;
    cookies.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == COOKIE && !v.is_empty()).then(|| v.to_string())
    })
}

/// Whether the request carries a live session (and drops expired ones on the way).
fn session_live(id: &str, now: Instant) -> bool {
    let mut s = sessions().lock().unwrap_or_else(|p| p.into_inner());
    s.retain(|_, exp| *exp > now);
    s.contains_key(id)
}

/// Whether a cookie-authorised request may do `method` (the CSRF rule, pure): reads
/// always; changes only with the console's header and, when the browser sends an
/// Origin, one naming this very host.
pub fn csrf_ok(
    method: &Method,
    console_header: Option<&str>,
    origin: Option<&str>,
    host: &str,
) -> bool {
    if matches!(method, Method::Get | Method::Head) {
        return true;
    }
    if console_header != Some("1") {
        return false;
    }
    match origin {
        None => true,
        Some(o) => {
            let o = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            o == Some(host)
        }
    }
}

/// The admin check for every system route but `/health`, `/` and the session routes:
/// a bearer token, or a live session cookie that passes [`csrf_ok`].
pub fn authorise(
    req: &Request,
    services: &Services,
    check_token: impl Fn(&Request, &Services) -> Result<(), HttpError>,
) -> Result<(), HttpError> {
    if util::header(req, "authorization").is_some() {
        return check_token(req, services);
    }
    let Some(id) = session_cookie(req) else {
        return check_token(req, services);
    };
    if !session_live(&id, Instant::now()) {
        return Err(HttpError::new(
            401,
            "your console session expired or the server restarted: sign in again",
        ));
    }
    let host = util::header(req, "host").unwrap_or_default();
    if !csrf_ok(
        req.method(),
        util::header(req, CSRF_HEADER).as_deref(),
        util::header(req, "origin").as_deref(),
        &host,
    ) {
        return Err(HttpError::new(
            403,
            format!(
                "a change made with the console's cookie needs the '{CSRF_HEADER}: 1' header from the console's own page"
            ),
        ));
    }
    Ok(())
}

fn new_session_id() -> Result<String, HttpError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| HttpError::internal(format!("no randomness for a session: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `/api/session`: sign in (POST `{"token"}`), sign out (DELETE), or ask (GET).
fn session_route(
    req: &mut Request,
    services: &Services,
    method: &Method,
) -> Result<Reply, HttpError> {
    match method {
        Method::Post => {
            let body = util::read_body(req, 4096)?;
            let given: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
                HttpError::bad_request("send JSON like {\"token\": \"<admin token>\"}")
            })?;
            let token = given["token"].as_str().unwrap_or("").trim();
            if token.is_empty() {
                return Err(HttpError::bad_request(
                    "send JSON like {\"token\": \"<admin token>\"} (admin.token in the data dir)",
                ));
            }
            if !super::system::constant_time_eq(token.as_bytes(), services.admin_token.as_bytes()) {
                return Err(HttpError::new(403, "invalid admin token"));
            }
            let id = new_session_id()?;
            let now = Instant::now();
            {
                let mut s = sessions().lock().unwrap_or_else(|p| p.into_inner());
                s.retain(|_, exp| *exp > now);
                while s.len() >= MAX_SESSIONS {
                    let oldest = s.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone());
                    match oldest {
                        Some(k) => s.remove(&k),
                        None => break,
                    };
                }
                s.insert(id.clone(), now + SESSION_TTL);
            }
            let cookie = format!(
                "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            Ok(with_header(
                Reply::json(
                    200,
                    &serde_json::json!({"signedIn": true, "expiresInS": SESSION_TTL.as_secs()}),
                ),
                "Set-Cookie",
                cookie,
            ))
        }
        Method::Delete => {
            if let Some(id) = session_cookie(req) {
                sessions()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            Ok(with_header(
                Reply::json(200, &serde_json::json!({"signedIn": false})),
                "Set-Cookie",
                format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
            ))
        }
        Method::Get => {
            let live = session_cookie(req).is_some_and(|id| session_live(&id, Instant::now()));
            Ok(Reply::json(200, &serde_json::json!({"signedIn": live})))
        }
        _ => Err(HttpError::new(
            405,
            "use POST, GET or DELETE on /api/session",
        )),
    }
}

fn with_header(mut reply: Reply, name: &str, value: String) -> Reply {
    if let Reply::Full { headers, .. } = &mut reply {
        headers.push((name.to_string(), value));
    }
    reply
}

/// The dashboard's files, all in the binary (the server may have no internet).
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/console/app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "/console/style.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/style.css"),
    ),
];

/// Routes the console serves before the admin check: the dashboard's files (they hold
/// no data) and `/api/session`.
pub fn open_route(
    req: &mut Request,
    services: &Services,
    method: &Method,
    path: &str,
) -> Option<Result<Reply, HttpError>> {
    if path == "/api/session" {
        return Some(session_route(req, services, method));
    }
    if *method != Method::Get {
        return None;
    }
    let (_, ct, body) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    let reply = Reply::bytes(200, ct, body.as_bytes().to_vec());
    // The page may not be framed by another site (clickjacking the action buttons).
    let reply = with_header(reply, "X-Frame-Options", "DENY".into());
    Some(Ok(with_header(
        reply,
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
            .into(),
    )))
}

/// A final status named in a query (bulk actions take only those).
fn final_status(s: Option<&str>) -> Result<Status, HttpError> {
    let s = s.unwrap_or("failed");
    Status::parse(s).filter(|st| st.is_final()).ok_or_else(|| {
        HttpError::bad_request(format!(
            "status must be done, failed, cancelled or stopped, not '{s}'"
        ))
    })
}

/// The console's admin routes (after the admin check); None: not one of them.
pub fn route(
    req: &Request,
    services: &Services,
    method: &Method,
    segs: &[&str],
    query: &[(String, String)],
) -> Option<Result<Reply, HttpError>> {
    let q = |k| util::query_get(query, k).filter(|v| !v.is_empty());
    let reply = match (method, segs) {
        (Method::Get, ["_ws"]) => {
            // A browser sends the page's Origin with the handshake: another site's page
            // may not open the admin channel with the console's cookie.
            let host = util::header(req, "host").unwrap_or_default();
            let origin = util::header(req, "origin");
            if csrf_ok(&Method::Post, Some("1"), origin.as_deref(), &host) {
                Ok(Reply::Upgrade)
            } else {
                Err(HttpError::new(
                    403,
                    "the system channel is open to the console's own page only",
                ))
            }
        }
        (Method::Get, ["api", "console", "apps"]) => apps_view(services),
        (Method::Get, ["api", "console", "overview"]) => {
            Ok(Reply::json(200, &overview(services, &[])))
        }
        (Method::Get, ["api", "jobs"]) => list_jobs(services, query),
        (Method::Post, ["api", "jobs", id, "retry"]) => match services.store.retry_job(id) {
            Ok(Retried::Queued(row)) => {
                services.pool.enqueue_row(&row);
                log::info!("job {id} retried by the operator (attempt {})", row.attempt);
                Ok(Reply::json(200, &row.to_json()))
            }
            Ok(Retried::Live(st)) => Err(HttpError::new(
                409,
                format!(
                    "job {id} is {}: only a done, failed, cancelled or stopped job can be retried",
                    st.as_str()
                ),
            )),
            Ok(Retried::NotFound) => Err(HttpError::not_found(format!("no job with id '{id}'"))),
            Err(e) => Err(e.into()),
        },
        (Method::Delete, ["api", "jobs", id]) => match services.store.delete_job(id) {
            Ok(Some(Ok(()))) => Ok(Reply::json(200, &serde_json::json!({ "deleted": id }))),
            Ok(Some(Err(st))) => Err(HttpError::new(
                409,
                format!(
                    "job {id} is {}: cancel it first, then delete it",
                    st.as_str()
                ),
            )),
            Ok(None) => Err(HttpError::not_found(format!("no job with id '{id}'"))),
            Err(e) => Err(e.into()),
        },
        (Method::Post, ["api", "apps", app, "jobs", "retry"]) => final_status(q("status"))
            .and_then(|st| {
                let limit = services.pool.limits.queue_per_app;
                let (rows, left) = services.store.retry_jobs_of(app, st, limit)?;
                for row in &rows {
                    services.pool.enqueue_row(row);
                }
                log::info!("{} {} job(s) of {app} retried", rows.len(), st.as_str());
                // `left`: jobs the queue bound kept back; retry again once it drains.
                Ok(Reply::json(
                    200,
                    &serde_json::json!({ "retried": rows.len(), "left": left }),
                ))
            }),
        (Method::Delete, ["api", "apps", app, "jobs"]) => {
            final_status(q("status")).and_then(|st| {
                let n = services.store.delete_jobs_of(app, st)?;
                log::info!("{n} {} job(s) of {app} deleted", st.as_str());
                Ok(Reply::json(200, &serde_json::json!({ "deleted": n })))
            })
        }
        _ => return None,
    };
    Some(reply)
}

/// The apps view: each app with its version, deploy time, files, handler calls and
/// 5xx answers since start, and jobs by status.
fn apps_view(services: &Services) -> Result<Reply, HttpError> {
    let apps = services.store.list_apps()?;
    let counts = services.store.job_counts_by_app()?;
    let m = crate::metrics::global();
    let list: Vec<serde_json::Value> = apps
        .iter()
        .map(|a| {
            let mut v = serde_json::to_value(a).unwrap_or_default();
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let jobs: serde_json::Map<String, serde_json::Value> = counts
                .iter()
                .filter(|(app, _, _)| *app == name)
                .map(|(_, st, n)| (st.clone(), (*n).into()))
                .collect();
            let (calls, errors) = m.handler_counts(&name);
            v["jobs"] = jobs.into();
            v["handlerCalls"] = calls.into();
            v["handlerErrors"] = errors.into();
            v
        })
        .collect();
    Ok(Reply::json(200, &list))
}

/// One minute of the throughput chart.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Minute {
    /// Minutes since the epoch.
    t: u64,
    done: u64,
    failed: u64,
}

/// Jobs without `data` and `result` (up to 1 MB each): the overview stays far under the
/// hub's message size limit, and the job page shows them.
fn slim(mut jobs: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    for j in &mut jobs {
        if let Some(o) = j.as_object_mut() {
            o.remove("data");
            o.remove("result");
        }
    }
    jobs
}

/// Everything the overview shows, read fresh. `minutes`: the last hour's throughput.
fn overview(services: &Services, minutes: &[Minute]) -> serde_json::Value {
    let s = &services.pool.stats;
    let b = &services.pool.budget;
    let l = &services.pool.limits;
    let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
    let running = services
        .store
        .query_jobs(&JobQuery {
            status: Some(Status::Running),
            limit: 100,
            ..Default::default()
        })
        .map(|p| p.jobs)
        .unwrap_or_default();
    let running = slim(running);
    let mut per_app: serde_json::Map<String, serde_json::Value> = Default::default();
    for (app, st, n) in services.store.job_counts_by_app().unwrap_or_default() {
        let e = per_app.entry(app).or_insert_with(|| serde_json::json!({}));
        e[st] = n.into();
    }
    let daemons = slim(services.store.live_daemons(50).unwrap_or_default());
    let rss = crate::worker::rss_bytes();
    let baseline = b.baseline_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let limit = baseline + b.budget_bytes;
    serde_json::json!({
        "time": crate::store::now_ms(),
        "slots": { "used": load(&s.running), "total": l.slots },
        "limits": { "perAppRunning": l.per_app_running, "perAppDaemons": l.per_app_daemons },
        "queued": load(&s.queued),
        "memory": {
            "budgetBytes": b.budget_bytes,
            "reservedBytes": b.reserved_bytes.load(std::sync::atomic::Ordering::Relaxed),
            "rssBytes": rss,
            "baselineBytes": baseline,
            // The monitor's own rule (budget.rs): warn past 80 % of budget + baseline.
            "warning": rss.saturating_mul(10) > limit.saturating_mul(8),
        },
        "running": running,
        "apps": per_app,
        "daemons": daemons,
        "minutes": minutes,
        "store": services.store.status(),
    })
}

/// How often the overview is pushed to the system channel.
const OVERVIEW_EVERY: Duration = Duration::from_secs(1);
/// The system channel the overview goes to.
pub const OVERVIEW_CHANNEL: &str = "overview";

/// Starts the `fazt-console` thread: it samples job outcomes every second into a
/// one-hour per-minute history, and while anyone listens on the system hub pushes the
/// overview to [`OVERVIEW_CHANNEL`]. It holds the services weakly and ends with them.
pub fn start_overview(services: &std::sync::Arc<Services>) -> std::io::Result<()> {
    let weak = std::sync::Arc::downgrade(services);
    std::thread::Builder::new()
        .name("fazt-console".into())
        .spawn(move || {
            let mut history: std::collections::VecDeque<Minute> = Default::default();
            let mut last = crate::metrics::global().outcome_totals();
            loop {
                std::thread::sleep(OVERVIEW_EVERY);
                let Some(services) = weak.upgrade() else {
                    return;
                };
                let now = crate::store::now_ms().max(0) as u64 / 60_000;
                let totals = crate::metrics::global().outcome_totals();
                record_minute(&mut history, now, last, totals);
                last = totals;
                let hub = crate::realtime::SYSTEM_HUB;
                if services.listeners.count(hub, OVERVIEW_CHANNEL) == 0 {
                    continue;
                }
                let minutes: Vec<Minute> = history.iter().copied().collect();
                let data = overview(&services, &minutes).to_string();
                if let Err(e) = services.hub.broadcast(hub, Some(OVERVIEW_CHANNEL), &data) {
                    log::warn!("console overview not sent: {e}");
                }
            }
        })
        .map(|_| ())
}

/// Adds the outcomes between two samples to minute `now`, keeping 60 minutes (pure).
fn record_minute(
    history: &mut std::collections::VecDeque<Minute>,
    now: u64,
    before: (u64, u64),
    after: (u64, u64),
) {
    let (done, failed) = (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
    );
    match history.back_mut() {
        Some(m) if m.t == now => {
            m.done += done;
            m.failed += failed;
        }
        _ => history.push_back(Minute {
            t: now,
            done,
            failed,
        }),
    }
    while history.front().is_some_and(|m| m.t + 60 <= now) {
        history.pop_front();
    }
}

/// `GET /api/jobs?app=&status=&path=&q=&before=&limit=`: an array of jobs, newest
/// first; the `X-Next-Cursor` header, when present, is the next page's `before`.
fn list_jobs(services: &Services, query: &[(String, String)]) -> Result<Reply, HttpError> {
    let q = |k| util::query_get(query, k).filter(|v| !v.is_empty());
    let f = crate::worker::ListFilter::from_query(q("app"), q("status"), q("limit"))
        .map_err(HttpError::bad_request)?;
    let before =
        match q("before") {
            Some(c) => Some(JobQuery::parse_cursor(c).ok_or_else(|| {
                HttpError::bad_request("before must be a cursor from X-Next-Cursor")
            })?),
            None => None,
        };
    let page = services.store.query_jobs(&JobQuery {
        app: f.app,
        status: f.status,
        path: q("path").map(str::to_string),
        error_contains: q("q").map(str::to_string),
        before,
        limit: f.limit,
    })?;
    let reply = Reply::json(200, &page.jobs);
    Ok(match page.next {
        Some(next) => with_header(reply, "X-Next-Cursor", next),
        None => reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_history_keeps_one_hour_by_minute() {
        let mut h = Default::default();
        record_minute(&mut h, 100, (0, 0), (3, 1));
        record_minute(&mut h, 100, (3, 1), (5, 1));
        record_minute(&mut h, 101, (5, 1), (5, 4));
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].done, h[0].failed, h[1].failed), (5, 1, 3));
        record_minute(&mut h, 160, (5, 4), (5, 4));
        assert_eq!(
            h.front().map(|m| m.t),
            Some(101),
            "minute 100 is over an hour old"
        );
    }

    #[test]
    fn cookie_changes_need_the_console_header_and_our_origin() {
        let host = "127.0.0.1:8080";
        assert!(csrf_ok(&Method::Get, None, None, host));
        assert!(!csrf_ok(&Method::Post, None, None, host));
        assert!(!csrf_ok(
            &Method::Post,
            Some("1"),
            Some("http://evil.example"),
            host
        ));
        assert!(csrf_ok(
            &Method::Post,
            Some("1"),
            Some("http://127.0.0.1:8080"),
            host
        ));
        assert!(csrf_ok(&Method::Delete, Some("1"), None, host));
    }
}
