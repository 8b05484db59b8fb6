//! The system host: `/health` (open), and behind the admin token `/metrics`, the app
//! API, the job API and the dashboard's data.

use std::sync::Arc;

use tiny_http::{Method, Request};

use super::util::{self, HttpError, Reply};
use crate::services::Services;

pub fn handle(req: &mut Request, services: &Arc<Services>) -> Result<Reply, HttpError> {
    let (path, query) = util::split_url(req.url());
    let method = req.method().clone();
    if path == "/health" && method == Method::Get {
        return Ok(Reply::json(200, &services.health()));
    }
    if let Some(reply) = super::console::open_route(req, services, &method, &path) {
        return reply;
    }
    super::console::authorise(req, services, check_token)?;
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let Some(reply) = super::console::route(req, services, &method, &segs, &query) {
        return reply;
    }
    match (&method, segs.as_slice()) {
        (Method::Get, ["metrics"]) => Ok(Reply::bytes(
            200,
            "text/plain; version=0.0.4",
            services.metrics_text().into_bytes(),
        )),
        (Method::Get, ["api", "apps"]) => Ok(Reply::json(200, &services.store.list_apps()?)),
        (Method::Put, ["api", "apps", name]) => {
            crate::apps::check_name(name).map_err(HttpError::bad_request)?;
            let body = util::read_body(req, crate::apps::MAX_UPLOAD_BYTES)?;
            let files = crate::apps::parse_upload(&body).map_err(HttpError::bad_request)?;
            let info = services.deploy_app(name, files)?;
            log::info!(
                "deployed app {name} (version {}, deploy {}, {} files)",
                info.version,
                info.deploy_id,
                info.files
            );
            Ok(Reply::json(200, &info))
        }
        (Method::Get, ["api", "apps", name]) => match services.store.get_app(name)? {
            Some(info) => Ok(Reply::json(200, &info)),
            None => Err(HttpError::not_found(format!("no app named '{name}'"))),
        },
        (Method::Delete, ["api", "apps", name]) => {
            crate::apps::check_name(name).map_err(HttpError::bad_request)?;
            let removed = services.remove_app(name)?;
            if removed {
                log::info!("removed app {name}");
                Ok(Reply::json(200, &serde_json::json!({ "removed": name })))
            } else {
                Err(HttpError::not_found(format!("no app named '{name}'")))
            }
        }
        // Test-only fault injection (see `store::TestHooks`): answers 404 unless the
        // server was started with FAZT_TEST_HOOKS=1.
        (Method::Post, ["api", "_test", "store"]) if services.store.test_hooks_enabled() => {
            let body = util::read_body(req, 4096)?;
            let hooks: crate::store::TestHooks = serde_json::from_slice(&body)
                .map_err(|e| HttpError::bad_request(format!("test hooks: {e}")))?;
            services.store.set_test_hooks(&hooks)?;
            log::warn!("test hooks set: {hooks:?}");
            Ok(Reply::json(200, &services.store.status()))
        }
        (Method::Get, ["api", "jobs", id]) => match services.store.get_job(id)? {
            Some(job) => Ok(Reply::json(200, &job.to_json())),
            None => Err(HttpError::not_found(format!("no job with id '{id}'"))),
        },
        (Method::Post, ["api", "jobs", id, "cancel"]) => match services.pool.cancel(None, id)? {
            Some(job) => Ok(Reply::json(200, &job.to_json())),
            None => Err(HttpError::not_found(format!("no job with id '{id}'"))),
        },
        (Method::Get, ["api", "jobs", id, "logs"]) => {
            let after = match util::query_get(&query, "after") {
                Some(a) => a
                    .parse::<i64>()
                    .map_err(|_| HttpError::bad_request("after must be an integer log id"))?,
                None => 0,
            };
            if services.store.get_job(id)?.is_none() {
                return Err(HttpError::not_found(format!("no job with id '{id}'")));
            }
            Ok(Reply::json(200, &services.store.job_logs(id, after)?))
        }
        (_, ["api", ..]) | (_, ["metrics"]) => Err(HttpError::new(
            if matches!(
                method,
                Method::Get | Method::Put | Method::Post | Method::Delete
            ) {
                404
            } else {
                405
            },
            format!("no route for {} {path}", method.as_str()),
        )),
        _ => Err(HttpError::not_found(format!(
            "no route for {} {path}",
            method.as_str()
        ))),
    }
}

fn check_token(req: &Request, services: &Services) -> Result<(), HttpError> {
    let given = util::header(req, "authorization").unwrap_or_default();
    let given = given.strip_prefix("Bearer ").unwrap_or("").trim();
    if given.is_empty() {
        return Err(HttpError::new(
            401,
            "missing admin token: send 'Authorization: Bearer <token>' (see admin.token in the data dir)",
        ));
    }
    if !constant_time_eq(given.as_bytes(), services.admin_token.as_bytes()) {
        return Err(HttpError::new(403, "invalid admin token"));
    }
    Ok(())
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
