//! App traffic (`<app>.host`): static files, `/api/<name>` handlers, and the `/_ws`
//! WebSocket upgrade handed to the realtime hub.

use std::sync::Arc;

use tiny_http::Request;

use super::handlers::{HandlerCache, HandlerRequest};
use super::util::{self, HttpError, Reply, Route};
use crate::services::Services;

pub fn handle(
    req: &mut Request,
    app: &str,
    services: &Arc<Services>,
    limits: &super::HttpLimits,
    cache: &mut HandlerCache,
) -> Result<Reply, HttpError> {
    let (path, query) = util::split_url(req.url());
    let Some(info) = services.store.get_app(app)? else {
        return Err(HttpError::not_found(format!(
            "no app named '{app}' is deployed"
        )));
    };
    if path == "/_ws" {
        return Ok(Reply::Upgrade);
    }
    if path == "/api" || path.starts_with("/api/") {
        return run_handler(
            req,
            app,
            info.version,
            &path,
            query,
            services,
            limits,
            cache,
        );
    }
    serve_static(app, &path, services)
}

pub fn upgrade(req: Request, route: Route, services: &Arc<Services>) {
    match route {
        Route::App(app) => crate::realtime::accept(req, &app, services),
        Route::System => {
            let _ = req.respond(util::error_response(404, "no WebSocket endpoint here"));
        }
    }
}

fn serve_static(app: &str, path: &str, services: &Services) -> Result<Reply, HttpError> {
    let mut rel = path.trim_start_matches('/').to_string();
    if rel.is_empty() || rel.ends_with('/') {
        rel.push_str("index.html");
    }
    // Server-side code is never served as a file: it may hold secrets.
    if rel.starts_with("api/")
        || rel.starts_with("workers/")
        || crate::apps::check_path(&rel).is_err()
    {
        return Err(HttpError::not_found(format!("no file at {path}")));
    }
    let content = match services.store.app_file(app, &rel)? {
        Some(c) => c,
        None => {
            // `/about` → `about/index.html`, as static hosts do.
            let index = format!("{rel}/index.html");
            match services.store.app_file(app, &index)? {
                Some(c) => {
                    rel = index;
                    c
                }
                None => return Err(HttpError::not_found(format!("no file at {path}"))),
            }
        }
    };
    Ok(Reply::bytes(200, content_type(&rel), content))
}

#[allow(clippy::too_many_arguments)]
fn run_handler(
    req: &mut Request,
    app: &str,
    version: i64,
    path: &str,
    query: Vec<(String, String)>,
    services: &Arc<Services>,
    limits: &super::HttpLimits,
    cache: &mut HandlerCache,
) -> Result<Reply, HttpError> {
    // A declared body over the limit is refused before anything is read or loaded.
    // (`read_body` refuses a declared length over the limit without reading.)
    if req
        .body_length()
        .is_some_and(|len| len > limits.max_handler_body)
    {
        util::read_body(req, limits.max_handler_body)?;
    }
    let name = path
        .trim_start_matches("/api")
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    // `api/<name>.js`, else `api/main.js`; a module this thread already loaded for
    // this version needs no store read.
    let mut file = None;
    let named = format!("api/{name}.js");
    let candidates: Vec<&str> = if !name.is_empty() && crate::apps::check_path(&named).is_ok() {
        vec![named.as_str(), "api/main.js"]
    } else {
        vec!["api/main.js"]
    };
    for candidate in candidates {
        if cache.is_loaded(app, version, candidate) {
            file = Some((candidate.to_string(), Vec::new()));
            break;
        }
        if let Some(src) = services.store.app_file(app, candidate)? {
            file = Some((candidate.to_string(), src));
            break;
        }
    }
    let Some((file, source)) = file else {
        return Err(HttpError::not_found(format!(
            "no handler for {path}: add api/{}.js or api/main.js",
            if name.is_empty() { "<name>" } else { name }
        )));
    };
    let source = String::from_utf8(source)
        .map_err(|_| HttpError::internal(format!("{file} is not valid UTF-8")))?;

    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                serde_json::Value::String(h.value.as_str().to_string()),
            )
        })
        .collect();
    let raw = util::read_body(req, limits.max_handler_body)?;
    let is_json = headers
        .get("content-type")
        .and_then(|v| v.as_str())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    let body = if raw.is_empty() {
        serde_json::Value::Null
    } else if is_json {
        serde_json::from_slice(&raw)
            .map_err(|e| HttpError::bad_request(format!("malformed JSON body: {e}")))?
    } else {
        serde_json::Value::String(String::from_utf8_lossy(&raw).into_owned())
    };
    let query = query
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let request = HandlerRequest {
        method: req.method().as_str().to_string(),
        path: path.to_string(),
        query,
        headers,
        body,
    };
    cache.run(services, app, version, &file, &source, request)
}

/// The content type for a file name, by extension.
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("md") => "text/markdown; charset=utf-8",
        Some("csv") => "text/csv; charset=utf-8",
        Some("xml") => "application/xml",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("wasm") => "application/wasm",
        Some("pdf") => "application/pdf",
        Some("mp3") => "audio/mpeg",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::content_type;

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("a/b/app.JS"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("logo.png"), "image/png");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
