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

/// Routes the console serves before the admin check (`/api/session`).
pub fn open_route(
    req: &mut Request,
    services: &Services,
    method: &Method,
    path: &str,
) -> Option<Result<Reply, HttpError>> {
    (path == "/api/session").then(|| session_route(req, services, method))
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
    services: &Services,
    method: &Method,
    segs: &[&str],
    query: &[(String, String)],
) -> Option<Result<Reply, HttpError>> {
    let q = |k| util::query_get(query, k).filter(|v| !v.is_empty());
    let reply = match (method, segs) {
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
                let rows = services.store.retry_jobs_of(app, st)?;
                for row in &rows {
                    services.pool.enqueue_row(row);
                }
                log::info!("{} {} job(s) of {app} retried", rows.len(), st.as_str());
                Ok(Reply::json(
                    200,
                    &serde_json::json!({ "retried": rows.len() }),
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
