//! Small HTTP helpers: host routing, JSON replies and errors, body reading with a limit.

use std::io::Read;

use serde::Serialize;
use tiny_http::{Header, Request, Response};

/// Where a request goes, decided by its Host header alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// A bare host (`127.0.0.1`, `localhost`, `[::1]`): the system API and dashboard.
    System,
    /// `<app>.<anything>`: the app named by the first label.
    App(String),
}

/// `mall.localhost:8080` → App("mall"); `localhost`, `127.0.0.1:8080`, `[::1]` → System.
pub fn route_host(host: &str) -> Route {
    let host = host.trim().to_ascii_lowercase();
    let without_port = if host.starts_with('[') {
        return Route::System;
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(&host)
    };
    if without_port.parse::<std::net::IpAddr>().is_ok() {
        return Route::System;
    }
    match without_port.split_once('.') {
        Some((first, _)) if !first.is_empty() => Route::App(first.to_string()),
        _ => Route::System,
    }
}

/// An error that becomes a JSON `{"error": ...}` reply.
#[derive(Debug)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> HttpError {
        HttpError::new(400, m)
    }
    pub fn not_found(m: impl Into<String>) -> HttpError {
        HttpError::new(404, m)
    }
    pub fn internal(m: impl Into<String>) -> HttpError {
        HttpError::new(500, m)
    }
}

impl From<crate::store::Error> for HttpError {
    fn from(e: crate::store::Error) -> HttpError {
        match e {
            crate::store::Error::NotFound(what) => {
                HttpError::not_found(format!("{what} not found"))
            }
            crate::store::Error::Invalid(m) => HttpError::bad_request(m),
            crate::store::Error::Closed => HttpError::new(503, "the server is shutting down"),
            e @ crate::store::Error::Unavailable(_) => HttpError::new(503, e.to_string()),
            other => {
                log::error!("store error: {other}");
                HttpError::internal(format!("storage error: {other}"))
            }
        }
    }
}

/// The status of a host failure a handler let through (see [`crate::js::Failure`]).
pub fn failure_status(f: crate::js::Failure) -> u16 {
    match f {
        crate::js::Failure::Unavailable => 503,
        crate::js::Failure::Busy => 429,
    }
}

impl From<crate::worker::SpawnError> for HttpError {
    fn from(e: crate::worker::SpawnError) -> HttpError {
        use crate::worker::SpawnError;
        match e {
            SpawnError::Invalid(m) => HttpError::bad_request(m),
            e @ SpawnError::QueueFull { .. } => {
                HttpError::new(failure_status(crate::js::Failure::Busy), e.to_string())
            }
            SpawnError::Store(e) => e.into(),
        }
    }
}

impl From<crate::apps::AppError> for HttpError {
    fn from(e: crate::apps::AppError) -> HttpError {
        match e {
            crate::apps::AppError::Busy(m) => HttpError::new(409, m),
            crate::apps::AppError::Store(e) => e.into(),
        }
    }
}

/// What a route produces; turned into a tiny_http response at the end.
pub enum Reply {
    Full {
        status: u16,
        content_type: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The route asked to switch this connection to WebSocket.
    Upgrade,
}

impl Reply {
    pub fn json<T: Serialize>(status: u16, value: &T) -> Reply {
        let body = serde_json::to_vec(value).unwrap_or_else(|e| {
            format!("{{\"error\":\"serialising the reply failed: {e}\"}}").into_bytes()
        });
        Reply::Full {
            status,
            content_type: "application/json".into(),
            headers: Vec::new(),
            body,
        }
    }

    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        Reply::Full {
            status,
            content_type: content_type.into(),
            headers: Vec::new(),
            body,
        }
    }

    pub fn into_response(self) -> Response<std::io::Cursor<Vec<u8>>> {
        match self {
            Reply::Full {
                status,
                content_type,
                headers,
                body,
            } => {
                let mut resp = Response::from_data(body).with_status_code(status);
                let mut has_ct = false;
                for (k, v) in headers {
                    if k.eq_ignore_ascii_case("content-type") {
                        has_ct = true;
                    }
                    if let Ok(h) = Header::from_bytes(k.as_bytes(), v.as_bytes()) {
                        resp.add_header(h);
                    }
                }
                if !has_ct {
                    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
                    {
                        resp.add_header(h);
                    }
                }
                resp
            }
            Reply::Upgrade => error_response(500, "upgrade reply reached the response writer"),
        }
    }
}

impl From<HttpError> for Reply {
    fn from(e: HttpError) -> Reply {
        Reply::json(e.status, &serde_json::json!({ "error": e.message }))
    }
}

pub fn error_response(status: u16, msg: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    Reply::from(HttpError::new(status, msg)).into_response()
}

pub fn header(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

/// Reads the whole body, refusing more than `limit` bytes with a 413.
pub fn read_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, HttpError> {
    if let Some(len) = req.body_length() {
        if len > limit {
            return Err(too_large(limit));
        }
    }
    let mut buf = Vec::new();
    req.as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => HttpError::new(408, e.to_string()),
            _ => HttpError::bad_request(format!("reading the request body failed: {e}")),
        })?;
    if buf.len() > limit {
        return Err(too_large(limit));
    }
    Ok(buf)
}

fn too_large(limit: usize) -> HttpError {
    HttpError::new(
        413,
        format!("request body too large: the limit is {} MB", limit >> 20),
    )
}

/// Splits `/a/b?x=1&y=2` into the path and decoded query pairs.
pub fn split_url(url: &str) -> (String, Vec<(String, String)>) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let pairs = query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect();
    (percent_decode(path, false), pairs)
}

/// Decodes `%XX`, and `+` as a space when `plus_is_space` (query strings only);
/// invalid escapes are kept as they are.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn query_get<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_errors_map_to_statuses() {
        use crate::worker::SpawnError;
        let status = |e: SpawnError| HttpError::from(e).status;
        assert_eq!(status(SpawnError::Invalid("bad path".into())), 400);
        let full = SpawnError::QueueFull {
            app: "a".into(),
            limit: 3,
        };
        assert_eq!(status(full), 429);
        let unavailable = crate::store::Error::Unavailable("disk full".into());
        assert_eq!(status(SpawnError::Store(unavailable)), 503);
        assert_eq!(status(SpawnError::Store(crate::store::Error::Closed)), 503);
        let internal = crate::store::Error::Internal("bug".into());
        assert_eq!(status(SpawnError::Store(internal)), 500);
        assert_eq!(failure_status(crate::js::Failure::Unavailable), 503);
        assert_eq!(failure_status(crate::js::Failure::Busy), 429);
    }

    #[test]
    fn routes_by_host() {
        assert_eq!(route_host("mall.localhost:8080"), Route::App("mall".into()));
        assert_eq!(route_host("Mall.example.com"), Route::App("mall".into()));
        assert_eq!(route_host("localhost:8080"), Route::System);
        assert_eq!(route_host("127.0.0.1:9"), Route::System);
        assert_eq!(route_host("127.0.0.1"), Route::System);
        assert_eq!(route_host("[::1]:80"), Route::System);
        assert_eq!(route_host(""), Route::System);
    }

    #[test]
    fn splits_and_decodes_urls() {
        let (p, q) = split_url("/api/x%20y?a=1&b=two+words&c");
        assert_eq!(p, "/api/x y");
        assert_eq!(
            q,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "two words".into()),
                ("c".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("%zz%4", false), "%zz%4");
        assert_eq!(split_url("/c++.html?q=a+b").0, "/c++.html");
    }
}
