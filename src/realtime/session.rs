//! One WebSocket connection: the upgrade, which hands the socket (non-blocking) to the
//! event loop, and the session's side of that loop: parsing client frames (subscribe,
//! unsubscribe, ping) and its ping schedule. Pings every 30 s; a peer silent for 75 s
//! is dropped. No thread per session (see `event_loop.rs`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiny_http::{Header, Request, Response};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::conn::{Conn, Frame};
use super::Env;

const PING_EVERY: Duration = Duration::from_secs(30);
const DEAD_AFTER: Duration = Duration::from_secs(75);
/// Largest frame a client may send; control messages are tiny.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Bytes read from the socket at a time. Client messages are small; tungstenite's
/// default (128 KB, zero-filled on first read) made every idle connection cost that.
const READ_CHUNK: usize = 1024;
/// Client messages handled per session per loop turn, so one chatty client cannot
/// hold the loop.
const READ_BUDGET: usize = 32;
/// Bytes read per session per loop turn. Messages alone are no bound: a message that
/// never completes (a text frame without FIN followed by endless empty continuation
/// frames) keeps one `WebSocket::read` call going for as long as the client sends.
const READ_BYTES_PER_TURN: usize = 64 * 1024;
/// Bytes of a pipelined first frame taken from tiny_http's buffer at the hand-over.
const MAX_LEFTOVER: usize = 64 * 1024;
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
/// once the admin check passed) and hands the session to the event loop.
pub fn accept<E: Env + 'static>(req: Request, app: &str, services: &Arc<E>) {
    let env: Arc<dyn Env> = services.clone();
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
    let hub = env.hub();
    let event_loop = match hub.event_loop(&env) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot start the WebSocket event loop: {e}");
            return refuse(
                req,
                503,
                "WebSockets are unavailable: the server could not start their event loop",
            );
        }
    };
    let conn = Conn::new(hub.limits.queue, Some(event_loop.clone()));
    // Join before upgrading, so a refusal is a plain HTTP error the client can read.
    let session = match hub.join(app, peer.ip(), conn.clone()) {
        Ok((s, _)) => s,
        Err(e) => return refuse(req, 429, &e),
    };
    // Joined first, checked second: a removal marks the app gone before it closes the
    // app's sessions, so a session is either closed by the removal or sees it here.
    if app != SYSTEM_HUB && !env.app_live(app) {
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
    let mut stream = req.upgrade("websocket", resp);
    let prepared = fd
        .ok_or_else(|| std::io::Error::other("the connection has no descriptor"))
        .and_then(|fd| super::socket::prepare(fd, peer).map(|()| fd));
    let fd = match prepared {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("WebSocket from {peer}: cannot take over the socket: {e}");
            hub.leave(app, session);
            return;
        }
    };
    // The socket is non-blocking now: whatever tiny_http had buffered past the
    // handshake (a client that did not wait for the 101) comes out, then WouldBlock.
    let mut leftover = Vec::new();
    let mut buf = [0u8; 4096];
    while leftover.len() < MAX_LEFTOVER {
        match stream.read(&mut buf) {
            Ok(0) => {
                hub.leave(app, session);
                return;
            }
            Ok(n) => leftover.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Our own descriptor; tiny_http's stream goes now, which frees its connection
    // thread (it waits for the stream's end) instead of holding it for the session.
    let owned = super::socket::take_over(fd);
    drop(stream);
    let owned = match owned {
        Ok(o) => o,
        Err(e) => {
            log::error!("WebSocket from {peer}: cannot take over the socket: {e}");
            hub.leave(app, session);
            return;
        }
    };
    let fd = owned.as_raw_fd();
    conn.attach(owned);
    env.ws_connected();
    event_loop.register(Session::new(session, app, fd, conn, leftover));
}

/// tiny_http's socket for reading, non-blocking; whatever tungstenite writes on this
/// side (pong and close replies) is collected and queued on the connection.
struct Io {
    fd: RawFd,
    pending: Vec<u8>,
    /// Bytes this turn may still read; at 0 reads say WouldBlock and set `spent`.
    budget: usize,
    spent: bool,
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.budget == 0 {
            self.spent = true;
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let room = buf.len().min(self.budget);
        let buf = &mut buf[..room];
        // SAFETY: `buf` is writable for its length; the descriptor stays open while the
        // session's connection (which owns it) lives.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.budget -= n as usize;
        Ok(n as usize)
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a read turn left.
pub(crate) enum Readable {
    /// The socket has nothing more for now.
    Drained,
    /// The turn's budget ran out with input left.
    More,
    /// The session ended (closed, failed or misbehaved).
    Gone,
}

/// A session as the event loop holds it.
pub(crate) struct Session {
    /// The hub's key for it (also its epoll token).
    pub id: u64,
    pub app: String,
    pub fd: RawFd,
    pub conn: Arc<Conn>,
    ws: WebSocket<Io>,
    last_seen: Instant,
    next_ping: Instant,
}

impl Session {
    fn new(id: u64, app: &str, fd: RawFd, conn: Arc<Conn>, leftover: Vec<u8>) -> Session {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_CLIENT_MESSAGE))
            .max_frame_size(Some(MAX_CLIENT_MESSAGE));
        let io = Io {
            fd,
            pending: Vec::new(),
            budget: READ_BYTES_PER_TURN,
            spent: false,
        };
        let ws = WebSocket::from_partially_read(io, leftover, Role::Server, Some(config));
        let now = Instant::now();
        Session {
            id,
            app: app.to_string(),
            fd,
            conn,
            ws,
            last_seen: now,
            next_ping: now + PING_EVERY,
        }
    }

    /// Queues what tungstenite wrote (pong and close replies).
    fn flush_replies(&mut self) {
        let _ = self.ws.flush();
        let bytes = std::mem::take(&mut self.ws.get_mut().pending);
        if !bytes.is_empty() {
            let _ = self.conn.send(Frame::Owned(bytes));
        }
    }

    /// Reads and handles what the client sent, up to the turn's budget.
    pub(crate) fn on_readable(&mut self, env: &dyn Env) -> Readable {
        let io = self.ws.get_mut();
        io.budget = READ_BYTES_PER_TURN;
        io.spent = false;
        for _ in 0..READ_BUDGET {
            let msg = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.flush_replies();
                    // Out of bytes for this turn with input maybe left: come back after
                    // the other sessions had theirs (edge-triggered: no new event comes).
                    if self.ws.get_ref().spent {
                        return Readable::More;
                    }
                    return Readable::Drained;
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
                    continue;
                }
                Err(tungstenite::Error::Capacity(e)) => {
                    reply(
                        &self.conn,
                        serde_json::json!({"type": "error", "error": format!("message too large: {e}")}),
                    );
                    self.flush_replies();
                    self.conn.close_after_flush(None);
                    return Readable::Gone;
                }
                Err(_) => {
                    self.flush_replies();
                    self.conn.close_after_flush(None);
                    return Readable::Gone;
                }
            };
            self.last_seen = Instant::now();
            match msg {
                Message::Text(t) => {
                    handle_client_message(t.as_str(), &self.conn, env, &self.app, self.id)
                }
                Message::Binary(_) => reply(
                    &self.conn,
                    serde_json::json!({"type": "error", "error": "binary frames are not supported; send JSON text"}),
                ),
                Message::Close(_) => {
                    // tungstenite framed the close reply; it goes out before the shut.
                    let _ = self.ws.flush();
                    let bytes = std::mem::take(&mut self.ws.get_mut().pending);
                    self.conn
                        .close_after_flush(Some(bytes).filter(|b| !b.is_empty()));
                    return Readable::Gone;
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
            self.flush_replies();
        }
        Readable::More
    }

    /// The ping schedule: false when the peer is to be dropped (silent too long, or too
    /// far behind to take a ping).
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        if now < self.next_ping {
            return true;
        }
        if now.duration_since(self.last_seen) > DEAD_AFTER {
            log::info!("dropping a WebSocket peer that stopped answering pings");
            return false;
        }
        self.next_ping = now + PING_EVERY;
        self.conn.send_ping().is_ok()
    }
}

fn reply(conn: &Arc<Conn>, value: serde_json::Value) {
    let _ = conn.send_text(&value.to_string());
}

fn handle_client_message(
    text: &str,
    conn: &Arc<Conn>,
    services: &dyn Env,
    app: &str,
    session: u64,
) {
    let err = |m: String| reply(conn, serde_json::json!({"type": "error", "error": m}));
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return err(format!("malformed JSON: {e}")),
    };
    let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let channel = v.get("channel").and_then(|c| c.as_str());
    match (kind, channel) {
        ("ping", _) => reply(conn, serde_json::json!({"type": "pong"})),
        ("subscribe" | "unsubscribe", None) => err(format!("'{kind}' needs a string 'channel'")),
        ("subscribe", Some(ch)) => {
            if let Err(e) = super::check_channel(ch) {
                return err(e);
            }
            match services.hub().subscribe(app, session, ch) {
                Ok(()) => reply(
                    conn,
                    serde_json::json!({"type": "subscribed", "channel": ch}),
                ),
                Err(e) => err(e),
            }
        }
        ("unsubscribe", Some(ch)) => {
            services.hub().unsubscribe(app, session, ch);
            reply(
                conn,
                serde_json::json!({"type": "unsubscribed", "channel": ch}),
            );
        }
        _ => err(format!(
            "unknown message type '{kind}' (use subscribe, unsubscribe or ping)"
        )),
    }
}

/// Serves an already connected socket (the server side of a TCP connection whose
/// WebSocket handshake is skipped) as a session of `app`, as if upgraded: for benches
/// of the fan-out over real sockets without HTTP in the way. Returns the session key.
#[doc(hidden)]
pub fn attach_raw<E: Env + 'static>(
    services: &Arc<E>,
    app: &str,
    stream: std::net::TcpStream,
) -> std::io::Result<u64> {
    let env: Arc<dyn Env> = services.clone();
    let hub = env.hub();
    let event_loop = hub.event_loop(&env)?;
    let peer = stream.peer_addr()?;
    let fd = stream.as_raw_fd();
    super::socket::prepare(fd, peer)?;
    let conn = Conn::new(hub.limits.queue, Some(event_loop.clone()));
    let (session, _) = hub
        .join(app, peer.ip(), conn.clone())
        .map_err(std::io::Error::other)?;
    conn.attach(stream.into());
    event_loop.register(Session::new(session, app, fd, conn, Vec::new()));
    Ok(session)
}
