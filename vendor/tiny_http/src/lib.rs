//! # Simple usage
//!
//! ## Creating the server
//!
//! The easiest way to create a server is to call `Server::http()`.
//!
//! The `http()` function returns an `IoResult<Server>` which will return an error
//! in the case where the server creation fails (for example if the listening port is already
//! occupied).
//!
//! ```no_run
//! let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! ```
//!
//! A newly-created `Server` will immediately start listening for incoming connections and HTTP
//! requests.
//!
//! ## Receiving requests
//!
//! Calling `server.recv()` will block until the next request is available.
//! This function returns an `IoResult<Request>`, so you need to handle the possible errors.
//!
//! ```no_run
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//!
//! loop {
//!     // blocks until the next request is received
//!     let request = match server.recv() {
//!         Ok(rq) => rq,
//!         Err(e) => { println!("error: {}", e); break }
//!     };
//!
//!     // do something with the request
//!     // ...
//! }
//! ```
//!
//! In a real-case scenario, you will probably want to spawn multiple worker tasks and call
//! `server.recv()` on all of them. Like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::thread;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! let server = Arc::new(server);
//! let mut guards = Vec::with_capacity(4);
//!
//! for _ in (0 .. 4) {
//!     let server = server.clone();
//!
//!     let guard = thread::spawn(move || {
//!         loop {
//!             let rq = server.recv().unwrap();
//!
//!             // ...
//!         }
//!     });
//!
//!     guards.push(guard);
//! }
//! ```
//!
//! If you don't want to block, you can call `server.try_recv()` instead.
//!
//! ## Handling requests
//!
//! The `Request` object returned by `server.recv()` contains informations about the client's request.
//! The most useful methods are probably `request.method()` and `request.url()` which return
//! the requested method (`GET`, `POST`, etc.) and url.
//!
//! To handle a request, you need to create a `Response` object. See the docs of this object for
//! more infos. Here is an example of creating a `Response` from a file:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! ```
//!
//! All that remains to do is call `request.respond()`:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! # let request = server.recv().unwrap();
//! # let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! let _ = request.respond(response);
//! ```
// fazt patch: `deny`, not `forbid`: one call (`Connection::send_now`) needs libc.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use zeroize::Zeroizing;

use std::error::Error;
use std::io::Error as IoError;
use std::io::ErrorKind as IoErrorKind;
use std::io::Result as IoResult;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use client::ClientConnection;
use connection::Connection;
use util::MessagesQueue;
use util::RefinedTcpStream;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use request::{ReadWrite, Request};
pub use response::{Response, ResponseBox};
pub use test::TestRequest;

/// fazt patch: the affinity key of a Host header value (FNV-1a of its ASCII-lowercased
/// bytes), as [`Server::recv_for`] matches requests to threads.
pub fn affinity_key(host: &[u8]) -> u64 {
    host.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

mod client;
mod common;
mod connection;
mod request;
mod response;
mod ssl;
mod test;
mod util;

/// The main class of this library.
///
/// Destroying this object will immediately close the listening socket and the reading
///  part of all the client's connections. Requests that have already been returned by
///  the `recv()` function will not close and the responses will be transferred to the client.
pub struct Server {
    // should be false as long as the server exists
    // when set to true, all the subtasks will close within a few hundreds ms
    close: Arc<AtomicBool>,

    // queue for messages received by child threads
    messages: Arc<MessagesQueue<Message>>,

    // result of TcpListener::local_addr()
    listening_addr: ListenAddr,

    // fazt patch: see `Server::answer_locally`.
    local: Arc<OnceLock<Box<LocalAnswer>>>,
}

/// fazt patch: an answer a connection's own thread may give (see
/// [`Server::answer_locally`]): a response whose body is already in memory, or None to
/// hand the request on to `recv` as usual.
pub type LocalAnswer =
    dyn Fn(&Request) -> Option<Response<std::io::Cursor<Arc<[u8]>>>> + Send + Sync;

enum Message {
    Error(IoError),
    NewRequest(Request),
}

impl From<IoError> for Message {
    fn from(e: IoError) -> Message {
        Message::Error(e)
    }
}

impl From<Request> for Message {
    fn from(rq: Request) -> Message {
        Message::NewRequest(rq)
    }
}

// this trait is to make sure that Server implements Share and Send
#[doc(hidden)]
#[allow(dead_code)]
trait MustBeShareDummy: Sync + Send {}
#[doc(hidden)]
impl MustBeShareDummy for Server {}

pub struct IncomingRequests<'a> {
    server: &'a Server,
}

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,

    /// If `Some`, then the server will use SSL to encode the communications.
    pub ssl: Option<SslConfig>,
}

/// Configuration of the server for SSL.
#[derive(Debug, Clone)]
pub struct SslConfig {
    /// Contains the public certificate to send to clients.
    pub certificate: Vec<u8>,
    /// Contains the ultra-secret private key used to decode communications.
    pub private_key: Vec<u8>,
}

/// Limits that keep hostile clients from exhausting the server (fazt patch; see
/// vendor/PATCHES.md). The defaults are safe for a server on the open internet.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest request line (method, target, version); longer gets 414 and a close.
    pub max_request_line: usize,
    /// Most bytes of header lines per request; more gets 431 and a close.
    pub max_header_bytes: usize,
    /// Time a request head may take to arrive once its first byte came; then 408.
    pub head_timeout: Duration,
    /// How long a kept-alive connection may sit idle before the next request.
    pub idle_timeout: Duration,
    /// Longest wait for any part of a request body; also, the body must keep coming
    /// at `body_min_rate` on average after this much time (else the read fails with
    /// `TimedOut`, which the application answers with 408).
    pub body_timeout: Duration,
    /// Bytes per second a body must average once `body_timeout` has passed.
    pub body_min_rate: u64,
    /// Longest a single write of a response may block.
    pub write_timeout: Duration,
    /// Unread body bytes drained after a response to keep the connection; a longer
    /// rest closes the connection instead.
    pub drain_limit: usize,
    /// Bodies up to this size are read in the connection's thread before the request
    /// is handed out, so a slow sender never holds an application thread.
    pub prebuffer_body: usize,
    /// Memory for such read-ahead bodies in all; when it is used up, a body waits for
    /// room up to one body timeout, then is read as it comes.
    pub prebuffer_total: usize,
    /// Memory for responses waiting to be written by connection threads, in all. A
    /// response with a body over 64 KB that does not fit gets a 503 instead (writing
    /// it in the application's thread would let a client that does not read hold it).
    pub response_buffer_total: usize,
    /// Open connections in all; past it new ones get 503 and a close.
    pub max_connections: usize,
    /// Open connections per client IP; past it new ones get 429 and a close.
    pub max_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 << 10,
            max_header_bytes: 32 << 10,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
            body_min_rate: 16 << 10,
            write_timeout: Duration::from_secs(30),
            drain_limit: 256 << 10,
            prebuffer_body: 1 << 20,
            prebuffer_total: 64 << 20,
            response_buffer_total: 64 << 20,
            max_connections: 4096,
            max_connections_per_ip: 256,
        }
    }
}

/// fazt patch: hands out a connection's requests one at a time. The next request is
/// read only once the previous one is answered (upstream did so for HTTPS only, against
/// a deadlock). Otherwise a client pipelining requests it never reads answers to had
/// every one handed out at once: the first handler thread blocked writing to the full
/// socket and all others queued behind it for their turn to write. A connection now
/// holds at most one handler thread, and an unbounded pipeline costs no memory. An
/// upgrade is not waited for: it holds its stream for the WebSocket's life.
///
/// On a kept-alive connection the thread that answers writes the response itself,
/// without waiting on the client (`request::Direct`), and this thread goes straight on
/// to read the next request's head: one thread wake-up per request instead of two. It
/// hands that request out only once the previous answer is written. The last request
/// (`Connection: close`, HTTP/1.0, an upgrade) has its answer handed back here and
/// written by this thread (`ClientConnection::write_response`), as are answers over
/// TLS; either way under a deadline: see `Request::respond`.
///
/// A request that `local` (see `Server::answer_locally`) answers is answered here,
/// without waking an application thread; its answer is written exactly as the
/// application's would be.
fn serve_connection(
    client: &mut ClientConnection,
    messages: &MessagesQueue<Message>,
    responses: &Arc<util::BodyBudget>,
    pool: &Arc<util::TaskPool>,
    local: &OnceLock<Box<LocalAnswer>>,
) {
    let (sender, receiver) = mpsc::channel();
    // Whether the previous request's answer is still being written by another thread.
    let mut outstanding = false;
    let answered = |client: &mut ClientConnection| match receiver.recv() {
        Ok(request::Responded::Done) => true,
        Ok(request::Responded::Write(pending)) => client.write_response(pending),
        Err(_) => false,
    };
    while let Some(rq) = client.next() {
        if outstanding && !answered(client) {
            return;
        }
        let direct = if client.is_last() {
            None
        } else {
            client.direct(pool)
        };
        outstanding = direct.is_some();
        let rq = rq.with_notify_sender(sender.clone(), responses.clone(), direct);
        match local.get().and_then(|answer| answer_here(answer, &rq)) {
            // `respond` tells `receiver` as an application thread's would.
            Some(response) => {
                let _ = rq.respond(response);
            }
            // fazt patch: keyed by Host, so a thread warm for the app gets it.
            None => match rq.affinity_key() {
                Some(key) => messages.push_keyed(rq.into(), key),
                None => messages.push(rq.into()),
            },
        }
        if !outstanding && !answered(client) {
            return;
        }
    }
    if outstanding {
        answered(client);
    }
}

/// fazt patch: asks `answer` about `rq`; a panic in it hands the request on (the
/// connection machinery never panics).
fn answer_here(
    answer: &LocalAnswer,
    rq: &Request,
) -> Option<Response<std::io::Cursor<Arc<[u8]>>>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(rq))).unwrap_or_else(|_| {
        log::error!("the local answer panicked; handing the request on");
        None
    })
}

impl Server {
    /// Shortcut for a simple server on a specific address.
    #[inline]
    pub fn http<A>(addr: A) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: None,
        })
    }

    /// Shortcut for an HTTPS server on a specific address.
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    #[inline]
    pub fn https<A>(
        addr: A,
        config: SslConfig,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: Some(config),
        })
    }

    #[cfg(unix)]
    #[inline]
    /// Shortcut for a UNIX socket server at a specific path
    pub fn http_unix(
        path: &std::path::Path,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::unix_from_path(path),
            ssl: None,
        })
    }

    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = config.addr.bind()?;
        Self::from_listener(listener, config.ssl)
    }

    /// Builds a new server using the specified TCP listener.
    ///
    /// This is useful if you've constructed TcpListener using some less usual method
    /// such as from systemd. For other cases, you probably want the `new()` function.
    pub fn from_listener<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Self::from_listener_with_limits(listener, ssl_config, Limits::default())
    }

    /// Like `from_listener`, with explicit limits (fazt patch).
    pub fn from_listener_with_limits<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
        limits: Limits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = listener.into();
        // building the "close" variable
        let close_trigger = Arc::new(AtomicBool::new(false));

        // building the TcpListener
        let (server, local_addr) = {
            let local_addr = listener.local_addr()?;
            log::debug!("Server listening on {}", local_addr);
            (listener, local_addr)
        };

        // building the SSL capabilities
        #[cfg(all(feature = "ssl-openssl", feature = "ssl-rustls"))]
        compile_error!(
            "Features 'ssl-openssl' and 'ssl-rustls' must not be enabled at the same time"
        );
        #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
        type SslContext = ();
        #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
        type SslContext = crate::ssl::SslContextImpl;
        let ssl: Option<SslContext> = {
            match ssl_config {
                #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                Some(config) => Some(SslContext::from_pem(
                    config.certificate,
                    Zeroizing::new(config.private_key),
                )?),
                #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                Some(_) => return Err(
                    "Building a server with SSL requires enabling the `ssl` feature in tiny-http"
                        .into(),
                ),
                None => None,
            }
        };

        // creating a task where server.accept() is continuously called
        // and ClientConnection objects are pushed in the messages queue
        let messages = MessagesQueue::with_capacity(8);

        let inside_close_trigger = close_trigger.clone();
        let inside_messages = messages.clone();
        let local: Arc<OnceLock<Box<LocalAnswer>>> = Arc::new(OnceLock::new());
        let inside_local = local.clone();
        let limits = Arc::new(limits);
        let counts = Arc::new(util::ConnectionCounts::default());
        let budget = util::BodyBudget::new(limits.prebuffer_total);
        let responses = util::BodyBudget::new(limits.response_buffer_total);
        let refuser = util::Refuser::start();
        thread::Builder::new()
            .name("tiny-http-accept".into())
            .spawn(move || {
                // a tasks pool is used to dispatch the connections into threads
                let tasks_pool = Arc::new(util::TaskPool::new());
                let mut backoff = util::Backoff::default();

                log::debug!("Running accept thread");
                while !inside_close_trigger.load(Relaxed) {
                    // fazt patch (tiny-http #283): an accept error (EMFILE, ECONNABORTED, ...)
                    // used to end this thread, and with it the server. Back off and retry.
                    let (sock, peer) = match server.accept() {
                        Ok(accepted) => {
                            backoff.reset();
                            accepted
                        }
                        Err(e) => {
                            if inside_close_trigger.load(Relaxed) {
                                break;
                            }
                            backoff.failed(&e);
                            continue;
                        }
                    };
                    if inside_close_trigger.load(Relaxed) {
                        break;
                    }
                    // fazt patch: caps on open connections, overall and per client IP. A
                    // refused connection gets a short answer and is closed by the refuser
                    // thread, so it costs neither a thread nor a slot.
                    let slot = match counts.acquire(peer.map(|a| a.ip()), &limits) {
                        Ok(slot) => slot,
                        Err(refusal) => {
                            refuser.refuse(sock, refusal);
                            continue;
                        }
                    };
                    let _ = sock.set_write_timeout(Some(limits.write_timeout));
                    // fazt patch: no Nagle. A response's last segment must not wait for
                    // the client's delayed ACK of the one before (~40 ms per response on
                    // a kept-alive connection); responses go out in as few writes as
                    // possible instead (see `Response::raw_print`). Upgraded sockets
                    // (WebSockets) keep the option: it belongs to the socket.
                    let _ = sock.set_nodelay(true);
                    let control = match sock.try_clone() {
                        Ok(c) => c,
                        Err(e) => {
                            log::warn!("dropping a new connection: {}", e);
                            continue;
                        }
                    };
                    let streams = match ssl {
                        None => RefinedTcpStream::new(sock),
                        #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                        Some(ref ssl) => {
                            // trying to apply SSL over the connection
                            // if an error occurs, we just close the socket and resume listening
                            let sock = match ssl.accept(sock) {
                                Ok(s) => s,
                                Err(_) => continue,
                            };

                            RefinedTcpStream::new(sock)
                        }
                        #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                        Some(ref _ssl) => unreachable!(),
                    };
                    let (read_closable, write_closable) = match streams {
                        Ok(s) => s,
                        Err(e) => {
                            log::warn!("dropping a new connection: {}", e);
                            continue;
                        }
                    };
                    let client = ClientConnection::new(
                        write_closable,
                        read_closable,
                        control,
                        limits.clone(),
                        budget.clone(),
                    );

                    let messages = inside_messages.clone();
                    let local = inside_local.clone();
                    let responses = responses.clone();
                    let pool = tasks_pool.clone();
                    let mut task = Some((client, slot));
                    tasks_pool.spawn(Box::new(move || {
                        if let Some((mut client, slot)) = task.take() {
                            serve_connection(&mut client, &messages, &responses, &pool, &local);
                            // The slot is released once no more requests come. Dropping
                            // the connection then waits for the last request's reader,
                            // which an upgraded connection (a WebSocket) holds for its
                            // whole life: it no longer counts as an HTTP connection.
                            drop(slot);
                            drop(client);
                        }
                    }));
                }
                log::debug!("Terminating accept thread");
            })?;

        // result
        Ok(Server {
            messages,
            close: close_trigger,
            listening_addr: local_addr,
            local,
        })
    }

    /// fazt patch: lets connection threads answer requests themselves. `answer` is asked
    /// about every request a connection reads (on that connection's thread, so it must
    /// be quick and must never block: a lookup in memory); a response it returns is
    /// written as an application thread's `respond` would write it, and the request
    /// never reaches `recv`. None hands the request on as usual. Set once; a second
    /// call returns `answer` back.
    pub fn answer_locally(&self, answer: Box<LocalAnswer>) -> Result<(), Box<LocalAnswer>> {
        self.local.set(answer)
    }

    /// Returns an iterator for all the incoming requests.
    ///
    /// The iterator will return `None` if the server socket is shutdown.
    #[inline]
    pub fn incoming_requests(&self) -> IncomingRequests<'_> {
        IncomingRequests { server: self }
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Returns the number of clients currently connected to the server.
    pub fn num_connections(&self) -> usize {
        unimplemented!()
        //self.requests_receiver.lock().len()
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(rq),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// fazt patch: `recv()` (`timeout`: None) or `recv_timeout()` as a thread that holds
    /// warm state for the requests of the affinity `keys` (see [`affinity_key`]) and has
    /// `room` for more: a request is handed to a waiting thread holding its Host's key,
    /// else to one with room, else to the thread that waited last.
    pub fn recv_for(
        &self,
        timeout: Option<Duration>,
        keys: Vec<u64>,
        room: bool,
    ) -> IoResult<Option<Request>> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        match self.messages.pop_for(deadline, keys, room) {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None if timeout.is_some() => Ok(None),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        match self.messages.try_pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

impl Iterator for IncomingRequests<'_> {
    type Item = Request;
    fn next(&mut self) -> Option<Request> {
        self.server.recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => {
                // TODO: use connect_addr when its stabilized.
                let path = addr.as_pathname().unwrap();
                std::os::unix::net::UnixStream::connect(path).map(Connection::from)
            }
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
