//! App traffic (`<app>.host`): static files, `/api/<name>` handlers, and the `/_ws`
//! WebSocket upgrade handed to the realtime hub.

use std::sync::Arc;

use tiny_http::Request;

use super::handlers::{HandlerCache, HandlerRequest};
use super::static_files::StaticCache;
use super::util::{self, HttpError, Reply, Route};
use crate::js::Interrupt;
use crate::services::Services;

pub fn handle(
    req: &mut Request,
    app: &str,
    shared: &super::Shared,
    cache: &mut HandlerCache,
) -> Result<Reply, HttpError> {
    let (services, limits) = (&shared.services, &shared.limits);
    let (path, query) = util::split_url(req.url());
    let route = app_route(&path);
    // The request is a run of the app's live deployment until `run` drops: removing the
    // app stops a handler (its deadline counts from here) and waits for the rest. Only
    // a handler runs JS, so only a handler needs an interrupt (each one registers with
    // the deadline watcher).
    let interrupt = matches!(route, AppRoute::Handler { .. }).then(|| cache.new_interrupt());
    let Some(run) = services.enter_app(app, interrupt.clone())? else {
        return Err(HttpError::not_found(format!(
            "no app named '{app}' is deployed"
        )));
    };
    let deploy = run.deployment.deploy_id;
    match route {
        AppRoute::WebSocket => Ok(Reply::Upgrade),
        AppRoute::Handler { name, path } => {
            let Some(interrupt) = interrupt else {
                return Err(HttpError::internal("a handler run without an interrupt"));
            };
            let call = HandlerCall {
                app,
                deploy,
                name: &name,
                path: &path,
                interrupt,
            };
            let started = std::time::Instant::now();
            let reply = run_handler(req, call, query, services, limits, cache);
            let status = match &reply {
                Ok(Reply::Full { status, .. }) => *status,
                Ok(Reply::Upgrade) => 101,
                Err(e) => e.status,
            };
            crate::metrics::global().handler_called(app, status, started.elapsed());
            reply
        }
        AppRoute::Static { candidates } => {
            serve_static(app, deploy, &path, &candidates, services, &shared.statics)
        }
        AppRoute::NotFound => Err(HttpError::not_found(format!("no file at {path}"))),
    }
}

/// What an app request path asks for, decided once on the normalised path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppRoute {
    /// `/_ws`: the realtime upgrade.
    WebSocket,
    /// `/api` and below: run `api/<name>.js` (or `api/main.js`); `path` is normalised.
    Handler { name: String, path: String },
    /// A static file: the app paths to try, in order.
    Static { candidates: Vec<String> },
    /// Never served: server-side code (`api/`, `workers/` in any case) or a path that
    /// climbs out (`..`).
    NotFound,
}

/// The serving rules. `path` is already percent-decoded (so `%2e` is `.` and `%2f` is
/// `/`); empty and `.` segments are dropped (`//api` is `/api`), `..` is refused, and
/// the first segment decides: `api` runs a handler, `api`/`workers` in any other case
/// are never served, anything else is a file (`/` and `dir/` → `index.html`, `/about`
/// → `about` or `about/index.html`).
pub fn app_route(path: &str) -> AppRoute {
    let mut segs = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => return AppRoute::NotFound,
            s => segs.push(s),
        }
    }
    let dir = path.ends_with('/') || path.ends_with("/.") || segs.is_empty();
    let joined = segs.join("/");
    match segs.first() {
        Some(&"_ws") if segs.len() == 1 => return AppRoute::WebSocket,
        Some(&"api") => {
            let name = segs.get(1).copied().unwrap_or("").to_string();
            let path = if dir && !segs.is_empty() {
                format!("/{joined}/")
            } else {
                format!("/{joined}")
            };
            return AppRoute::Handler { name, path };
        }
        // Server-side code is never served as a file: it may hold secrets.
        Some(first)
            if first.eq_ignore_ascii_case("api") || first.eq_ignore_ascii_case("workers") =>
        {
            return AppRoute::NotFound
        }
        _ => {}
    }
    let candidates: Vec<String> = if segs.is_empty() {
        vec!["index.html".to_string()]
    } else if dir {
        vec![format!("{joined}/index.html")]
    } else {
        vec![joined.clone(), format!("{joined}/index.html")]
    };
    let candidates: Vec<String> = candidates
        .into_iter()
        .filter(|c| crate::apps::check_path(c).is_ok())
        .collect();
    if candidates.is_empty() {
        AppRoute::NotFound
    } else {
        AppRoute::Static { candidates }
    }
}

/// The static answer a connection's own thread gives (installed with tiny_http's
/// `answer_locally`), so a cached file costs no wake-up of a handler thread: a `GET` or
/// `HEAD` of a file of an app's live deployment that the static cache already holds,
/// served under the same rules as [`handle`] (Host routing, `app_route` on the
/// normalised path, so never a file from `api/` or `workers/`; a run of the live
/// deployment while the answer is made, so a removed app's files are never served;
/// the same headers, the same request count). Everything else, a cache miss included,
/// is None: the request goes on to a handler thread. Never reads the store, never
/// blocks but on the registry's and the cache's short locks.
pub fn answer_cached_static(
    req: &Request,
    services: &Services,
    statics: &StaticCache,
) -> Option<tiny_http::Response<std::io::Cursor<Arc<[u8]>>>> {
    if !matches!(
        req.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    ) {
        return None;
    }
    // Handler calls, the common spelling, are handed on before anything is parsed (any
    // other spelling of `/api` is a handler too, and `app_route` below says so).
    let url = req.url();
    if url == "/api" || url.starts_with("/api/") || url.starts_with("/api?") {
        return None;
    }
    let host = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("host"))
        .map(|h| h.value.as_str())
        .unwrap_or_default();
    let Route::App(app) = util::route_host(host) else {
        return None;
    };
    let (path, _) = util::split_url(url);
    let AppRoute::Static { candidates } = app_route(&path) else {
        return None;
    };
    // Only a name the registry already knows: an unknown one needs a store read, which
    // is a handler thread's job.
    let no_store_read = || Ok::<_, std::convert::Infallible>(None);
    let run = match services.apps.enter(&app, None, no_store_read) {
        Ok(Some(run)) => run,
        Ok(None) | Err(_) => return None,
    };
    let deploy = run.deployment.deploy_id;
    statics.sweep(services.apps.changes(), |name| {
        services.apps.known(name).map(|d| d.deploy_id)
    });
    for rel in &candidates {
        match statics.get(&app, deploy, rel) {
            Some(Some(content)) => {
                services
                    .metrics
                    .http_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let len = content.len();
                let content_type =
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type(rel)).ok()?;
                return Some(tiny_http::Response::new(
                    tiny_http::StatusCode(200),
                    vec![content_type],
                    std::io::Cursor::new(content),
                    Some(len),
                    None,
                ));
            }
            // Known to be missing: try the next candidate.
            Some(None) => {}
            // Not cached: a handler thread reads the store.
            None => return None,
        }
    }
    None
}

pub fn upgrade(req: Request, route: Route, services: &Arc<Services>) {
    match route {
        Route::App(app) => crate::realtime::accept(req, &app, services),
        // The system host upgrades only `/_ws`, after the admin check (see console.rs).
        Route::System => crate::realtime::accept(req, crate::realtime::SYSTEM_HUB, services),
    }
}

fn serve_static(
    app: &str,
    deploy: i64,
    path: &str,
    candidates: &[String],
    services: &Services,
    statics: &StaticCache,
) -> Result<Reply, HttpError> {
    statics.sweep(services.apps.changes(), |name| {
        services.apps.known(name).map(|d| d.deploy_id)
    });
    for rel in candidates {
        let content = match statics.get(app, deploy, rel) {
            Some(cached) => cached.map(|c| c.to_vec()),
            None => {
                let content = services.store.app_file(app, rel)?;
                let shared = content.as_deref().map(Arc::<[u8]>::from);
                statics.put(app, deploy, rel, shared);
                content
            }
        };
        if let Some(content) = content {
            return Ok(Reply::bytes(200, content_type(rel), content));
        }
    }
    Err(HttpError::not_found(format!("no file at {path}")))
}

/// Which handler a request runs, of which deployment, and what stops it.
struct HandlerCall<'a> {
    app: &'a str,
    /// Keys the thread's warm context and loaded modules.
    deploy: i64,
    name: &'a str,
    path: &'a str,
    interrupt: Interrupt,
}

#[allow(clippy::too_many_arguments)]
fn run_handler(
    req: &mut Request,
    call: HandlerCall<'_>,
    query: Vec<(String, String)>,
    services: &Arc<Services>,
    limits: &super::HttpLimits,
    cache: &mut HandlerCache,
) -> Result<Reply, HttpError> {
    let HandlerCall {
        app,
        deploy,
        name,
        path,
        interrupt,
    } = call;
    // A declared body over the limit is refused before anything is read or loaded.
    // (`read_body` refuses a declared length over the limit without reading.)
    if req
        .body_length()
        .is_some_and(|len| len > limits.max_handler_body)
    {
        util::read_body(req, limits.max_handler_body)?;
    }
    // `api/<name>.js`, else `api/main.js`; a module this thread already loaded for
    // this deployment needs no store read.
    let mut file = None;
    let named = format!("api/{name}.js");
    let candidates: Vec<&str> = if !name.is_empty() && crate::apps::check_path(&named).is_ok() {
        vec![named.as_str(), "api/main.js"]
    } else {
        vec!["api/main.js"]
    };
    for candidate in candidates {
        if cache.is_loaded(app, deploy, candidate) {
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
        body_bytes: raw.len(),
    };
    cache.run_with(services, app, deploy, &file, &source, request, interrupt)
}

/// The content type for a file name, by extension.
pub fn content_type(path: &str) -> &'static str {
    // Lower-cased on the stack: every static answer asks, and no extension we know is
    // longer than 8 bytes.
    let mut buf = [0u8; 8];
    let ext = match path.rsplit_once('.') {
        Some((_, e)) if e.len() <= buf.len() => {
            let lower = &mut buf[..e.len()];
            lower.copy_from_slice(e.as_bytes());
            lower.make_ascii_lowercase();
            std::str::from_utf8(lower).ok()
        }
        _ => None,
    };
    match ext {
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
    use super::{app_route, content_type, AppRoute};
    use crate::http::util::split_url;

    fn route(url: &str) -> AppRoute {
        app_route(&split_url(url).0)
    }

    fn files(list: &[&str]) -> AppRoute {
        AppRoute::Static {
            candidates: list.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn handler(name: &str, path: &str) -> AppRoute {
        AppRoute::Handler {
            name: name.into(),
            path: path.into(),
        }
    }

    #[test]
    fn server_side_files_are_never_static() {
        // Every spelling of api/ and workers/ either runs a handler or is refused;
        // none is looked up as a file.
        for url in [
            "/workers",
            "/workers/",
            "//workers",
            "/./workers/index.html",
            "/%77orkers/x.js",
            "/workers%2fjob.js",
            "/WORKERS/job.js",
            "/Api/index.html",
            "/API",
            "/x/../api/index.html",
            "/%2e%2e/api/main.js",
            "/%2E%2E/admin.token",
            "/a/%2e%2e/b",
        ] {
            assert_eq!(route(url), AppRoute::NotFound, "{url}");
        }
    }

    #[test]
    fn api_in_any_form_is_a_handler() {
        assert_eq!(route("/api"), handler("", "/api"));
        assert_eq!(route("//api"), handler("", "/api"));
        assert_eq!(route("/api/"), handler("", "/api/"));
        assert_eq!(route("/./api/x"), handler("x", "/api/x"));
        assert_eq!(route("/api//x/y"), handler("x", "/api/x/y"));
        assert_eq!(route("/%61pi/x"), handler("x", "/api/x"));
        assert_eq!(route("/api%2fx?q=1"), handler("x", "/api/x"));
        assert_eq!(route("/api/x/"), handler("x", "/api/x/"));
    }

    #[test]
    fn static_paths_normalise() {
        assert_eq!(route("/"), files(&["index.html"]));
        assert_eq!(route("//"), files(&["index.html"]));
        assert_eq!(route("/."), files(&["index.html"]));
        assert_eq!(route("/about"), files(&["about", "about/index.html"]));
        assert_eq!(route("/docs/"), files(&["docs/index.html"]));
        assert_eq!(
            route("//docs//a.css"),
            files(&["docs/a.css", "docs/a.css/index.html"])
        );
        assert_eq!(
            route("/./docs/./a.css"),
            files(&["docs/a.css", "docs/a.css/index.html"])
        );
        assert_eq!(route("/%2e/a.css"), files(&["a.css", "a.css/index.html"]));
        assert_eq!(
            route("/Index.HTML"),
            files(&["Index.HTML", "Index.HTML/index.html"])
        );
        assert_eq!(
            route("/apis.html"),
            files(&["apis.html", "apis.html/index.html"])
        );
        assert_eq!(route("/_ws"), AppRoute::WebSocket);
        assert_eq!(route("//_ws"), AppRoute::WebSocket);
        assert_eq!(route("/a\\b"), AppRoute::NotFound);
        assert_eq!(route("/a%00b"), AppRoute::NotFound);
        assert_eq!(route("/%2e%2e"), AppRoute::NotFound);
        assert_eq!(route("/x/.%2e/y"), AppRoute::NotFound);
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("a/b/app.JS"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("logo.png"), "image/png");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert_eq!(content_type("a.WOFF2"), "font/woff2");
        assert_eq!(content_type("a.verylongext"), "application/octet-stream");
        assert_eq!(content_type("a.é"), "application/octet-stream");
    }
}
