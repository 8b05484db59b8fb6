//! One WebSocket connection: the upgrade, then two threads. The reader parses client
//! frames (subscribe, unsubscribe, ping) on tiny_http's stream; the writer owns a
//! duplicate of the socket and sends everything else, so broadcasts never wait on a
//! blocked read. Pings every 30 s; a peer silent for 75 s is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tiny_http::{Header, Request, Response};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::hub::Out;
use super::Env;

/// Milliseconds on the monotonic clock since the first call: when a peer was last
/// heard from. The wall clock can jump (NTP, a manual change): a step forward would
/// drop every live peer at the next ping, a step back would keep dead ones for as long.
fn mono_ms() -> i64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as i64
}

const PING_EVERY: Duration = Duration::from_secs(30);
const DEAD_AFTER_MS: i64 = 75_000;
/// Largest frame a client may send; control messages are tiny.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// Answers with the JSON error every HTTP error has (`{"error": ...}`), built here so
/// realtime needs nothing from `http` (which calls into realtime).
fn refuse(req: Request, status: u16, msg: &str) {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut resp = tiny_http::Response::from_data(body).with_status_code(status);
    if let Ok(ct) = tiny_http::Header::from_bytes("Content-Type", "application/json") {
        resp.add_header(ct);
    }
    let _ = req.respond(resp);
}

/// The hub name of the admin-only system channel (the console's live overview). No
/// app can have it: app names start with a letter or digit.
pub const SYSTEM_HUB: &str = "_system";

/// Upgrades `req` (a GET /_ws on an app host, or on the system host for [`SYSTEM_HUB`]
/// once the admin check passed) and starts the session threads.
pub fn accept<E: Env + 'static>(req: Request, app: &str, services: &Arc<E>) {
    let services: Arc<dyn Env> = services.clone();
    let services = &services;
    let header = |name: &str| {
        req.headers()
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str().to_string())
    };
    let is_ws = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let Some(key) = header("sec-websocket-key").filter(|_| is_ws) else {
        return refuse(
            req,
            400,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request",
        );
    };
    let Some(peer) = req.remote_addr().copied() else {
        return refuse(req, 400, "unknown peer address");
    };
    let hub = services.hub();
    let (tx, rx) = crossbeam_channel::bounded::<Out>(hub.limits.queue);
    // Join before upgrading, so a refusal is a plain HTTP error the client can read.
    let (session, client_id) = match hub.join(app, peer.ip(), tx.clone(), None) {
        Ok(s) => s,
        Err(e) => return refuse(req, 429, &e),
    };
    // Joined first, checked second: a removal marks the app gone before it closes the
    // app's sessions, so a session is either closed by the removal or sees it here.
    if app != SYSTEM_HUB && !services.app_live(app) {
        hub.leave(app, session);
        return refuse(req, 404, &format!("no app named '{app}' is deployed"));
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = Response::empty(101).with_header(
        Header::from_bytes(&b"Sec-WebSocket-Accept"[..], accept.as_bytes()).unwrap_or_else(|_| {
            Header::from_bytes(&b"X-Invalid"[..], &b"1"[..]).expect("static header")
        }),
    );
    let fd = req.connection_fd();
    let stream = req.upgrade("websocket", resp);
    let taken = fd
        .ok_or_else(|| std::io::Error::other("the connection has no descriptor"))
        .and_then(|fd| super::socket::duplicate_connection(fd, peer));
    let sock = match taken {
        Ok(s) => s,
        Err(e) => {
            log::error!("WebSocket from {peer}: cannot take over the socket: {e}");
            hub.leave(app, session);
            return;
        }
    };
    let _ = sock.set_write_timeout(Some(Duration::from_secs(10)));
    // The socket still has the HTTP body timeout for reads (the duplicate shares it);
    // a WebSocket may be quiet for long, and dead peers are found by pings instead.
    let _ = sock.set_read_timeout(None);
    let _ = sock.set_nodelay(true);
    if let Ok(kill) = sock.try_clone() {
        hub.attach_socket(app, session, kill);
    }
    services.ws_connected();
    let last_seen = Arc::new(AtomicI64::new(mono_ms()));
    let writer = {
        let last_seen = last_seen.clone();
        std::thread::Builder::new()
            .name(format!("fazt-ws-w-{client_id}"))
            .stack_size(256 * 1024)
            .spawn(move || write_loop(sock, &rx, &last_seen))
    };
    if let Err(e) = writer {
        log::error!("cannot start a WebSocket writer: {e}");
        hub.leave(app, session);
        return;
    }
    let services_for_cleanup = services.clone();
    let app_for_cleanup = app.to_string();
    let services = services.clone();
    let app = app.to_string();
    let reader = std::thread::Builder::new()
        .name(format!("fazt-ws-r-{client_id}"))
        .stack_size(256 * 1024)
        .spawn(move || {
            read_loop(stream, &tx, &*services, &app, session, &last_seen);
            services.hub().leave(&app, session);
            let _ = tx.try_send(Out::Close("client gone"));
        });
    if let Err(e) = reader {
        // The closure (and its stream) is gone; leaving the hub shuts the socket,
        // which ends the writer.
        log::error!("cannot start a WebSocket reader: {e}");
        services_for_cleanup.hub().leave(&app_for_cleanup, session);
    }
}

/// tiny_http's stream for reading; whatever tungstenite writes on this side (pong and
/// close replies) is framed here and handed to the writer thread at flush.
struct ReaderIo {
    inner: Box<dyn tiny_http::ReadWrite + Send>,
    pending: Vec<u8>,
    out: Sender<Out>,
}

impl Read for ReaderIo {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for ReaderIo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let bytes = std::mem::take(&mut self.pending);
            let _ = self.out.try_send(Out::Raw(bytes));
        }
        Ok(())
    }
}

fn reply(tx: &Sender<Out>, value: serde_json::Value) {
    let _ = tx.try_send(Out::Text(Arc::from(value.to_string())));
}

fn read_loop(
    stream: Box<dyn tiny_http::ReadWrite + Send>,
    tx: &Sender<Out>,
    services: &dyn Env,
    app: &str,
    session: u64,
    last_seen: &AtomicI64,
) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE));
    let io = ReaderIo {
        inner: stream,
        pending: Vec::new(),
        out: tx.clone(),
    };
    let mut ws = WebSocket::from_raw_socket(io, Role::Server, Some(config));
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Capacity(e)) => {
                reply(
                    tx,
                    serde_json::json!({"type": "error", "error": format!("message too large: {e}")}),
                );
                let _ = ws.flush();
                return;
            }
            Err(_) => {
                let _ = ws.flush();
                return;
            }
        };
        let _ = ws.flush();
        last_seen.store(mono_ms(), Ordering::Relaxed);
        match msg {
            Message::Text(t) => handle_client_message(t.as_str(), tx, services, app, session),
            Message::Binary(_) => reply(
                tx,
                serde_json::json!({"type": "error", "error": "binary frames are not supported; send JSON text"}),
            ),
            Message::Close(_) => return,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

fn handle_client_message(
    text: &str,
    tx: &Sender<Out>,
    services: &dyn Env,
    app: &str,
    session: u64,
) {
    let err = |m: String| reply(tx, serde_json::json!({"type": "error", "error": m}));
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return err(format!("malformed JSON: {e}")),
    };
    let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let channel = v.get("channel").and_then(|c| c.as_str());
    match (kind, channel) {
        ("ping", _) => reply(tx, serde_json::json!({"type": "pong"})),
        ("subscribe" | "unsubscribe", None) => err(format!("'{kind}' needs a string 'channel'")),
        ("subscribe", Some(ch)) => {
            if let Err(e) = super::check_channel(ch) {
                return err(e);
            }
            match services.hub().subscribe(app, session, ch) {
                Ok(()) => reply(tx, serde_json::json!({"type": "subscribed", "channel": ch})),
                Err(e) => err(e),
            }
        }
        ("unsubscribe", Some(ch)) => {
            services.hub().unsubscribe(app, session, ch);
            reply(
                tx,
                serde_json::json!({"type": "unsubscribed", "channel": ch}),
            );
        }
        _ => err(format!(
            "unknown message type '{kind}' (use subscribe, unsubscribe or ping)"
        )),
    }
}

fn write_loop(sock: TcpStream, rx: &Receiver<Out>, last_seen: &AtomicI64) {
    let mut ws = WebSocket::from_raw_socket(sock, Role::Server, None);
    // Pings go out on a fixed schedule, busy or not: a peer that stopped reading on a
    // chatty channel must still be found dead.
    let mut next_ping = Instant::now() + PING_EVERY;
    'outer: loop {
        if Instant::now() >= next_ping {
            if mono_ms() - last_seen.load(Ordering::Relaxed) > DEAD_AFTER_MS {
                log::info!("dropping a WebSocket peer that stopped answering pings");
                break;
            }
            if ws.send(Message::Ping(Default::default())).is_err() {
                break;
            }
            next_ping = Instant::now() + PING_EVERY;
        }
        let first = match rx.recv_deadline(next_ping) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // Write everything already waiting, then flush once.
        let mut next = Some(first);
        while let Some(out) = next.take() {
            let ok = match out {
                Out::Text(t) => ws.write(Message::text(t.as_ref())).is_ok(),
                Out::Raw(bytes) => ws.flush().is_ok() && ws.get_mut().write_all(&bytes).is_ok(),
                Out::Close(why) => {
                    log::debug!("closing a WebSocket session: {why}");
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    break 'outer;
                }
            };
            if !ok {
                break 'outer;
            }
            next = rx.try_recv().ok();
        }
        if ws.flush().is_err() {
            break;
        }
    }
    // Ends the reader too: its blocked read returns.
    let _ = ws.get_ref().shutdown(Shutdown::Both);
}
