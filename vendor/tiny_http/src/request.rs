use std::io::Error as IoError;
use std::io::{self, Cursor, ErrorKind, Read, Write};

use std::fmt;
use std::net::SocketAddr;

use std::sync::mpsc::Sender;

use crate::util::{
    BodyBudget, BodyReader, BudgetGuard, ChunkedDecoder, FusedReader, Prebuffered,
};
use std::sync::Arc;
use crate::{HTTPVersion, Header, Method, Response, StatusCode};

/// Represents an HTTP request made by a client.
///
/// A `Request` object is what is produced by the server, and is your what
/// your code must analyse and answer.
///
/// This object implements the `Send` trait, therefore you can dispatch your requests to
/// worker threads.
///
/// # Pipelining
///
/// If a client sends multiple requests in a row (without waiting for the response), then you will
/// get multiple `Request` objects simultaneously. This is called *requests pipelining*.
/// Tiny-http automatically reorders the responses so that you don't need to worry about the order
/// in which you call `respond` or `into_writer`.
///
/// This mechanic is disabled if:
///
///  - The body of a request is large enough (handling requires pipelining requires storing the
///    body of the request in a buffer ; if the body is too big, tiny-http will avoid doing that)
///  - A request sends a `Expect: 100-continue` header (which means that the client waits to
///    know whether its body will be processed before sending it)
///  - A request sends a `Connection: close` header or `Connection: upgrade` header (used for
///    websockets), which indicates that this is the last request that will be received on this
///    connection
///
/// # Automatic cleanup
///
/// If a `Request` object is destroyed without `into_writer` or `respond` being called,
/// an empty response with a 500 status code (internal server error) will automatically be
/// sent back to the client.
/// This means that if your code fails during the handling of a request, this "internal server
/// error" response will automatically be sent during the stack unwinding.
///
/// # Testing
///
/// If you want to build fake requests to test your server, use [`TestRequest`](crate::test::TestRequest).
pub struct Request {
    // where to read the body from
    data_reader: Option<Box<dyn Read + Send + 'static>>,

    // fazt patch: the connection's socket descriptor (None for in-memory test
    // requests), so an upgraded connection can be taken over without a search.
    connection_fd: Option<i32>,

    // fazt patch: the raw stream of a bodiless `Connection: upgrade` request, for
    // `upgrade()` only. It used to be the body reader, so a handler reading the body of
    // such a request read the socket itself, with no length and no read-ahead.
    upgrade_source: Option<Box<dyn Read + Send + 'static>>,

    // if this writer is empty, then the request has been answered
    response_writer: Option<Box<dyn Write + Send + 'static>>,

    remote_addr: Option<SocketAddr>,

    // true if HTTPS, false if HTTP
    secure: bool,

    method: Method,

    path: String,

    http_version: HTTPVersion,

    headers: Vec<Header>,

    body_length: Option<usize>,

    // true if a `100 Continue` response must be sent when `as_reader()` is called
    must_send_continue: bool,

    // If Some, a message must be sent after responding
    notify_when_responded: Option<Sender<Responded>>,

    // fazt patch: memory for responses handed to the connection's thread to write.
    response_budget: Option<Arc<BodyBudget>>,

    // fazt patch: set when the thread that answers may write the response itself (see
    // `hand_off`); the connection's thread is then already reading the next request.
    direct: Option<Direct>,
}

/// fazt patch: what lets the thread that answers a request write the response itself:
/// what the socket takes at once goes out there (`Connection::send_now`, never
/// waiting), a rest goes to a pool thread that writes it under the write deadline.
/// This saves the connection thread's wake-up per request on kept-alive connections.
pub(crate) struct Direct {
    pub(crate) control: crate::connection::Connection,
    pub(crate) limits: Arc<crate::Limits>,
    pub(crate) pool: Arc<crate::util::TaskPool>,
}

/// fazt patch: tells the connection's thread that a handed-off write is over, however it
/// ends. Dropped unrun (the pool could not start a thread) or unwound (a panic), it
/// shuts the socket first: the connection's thread waits for `Done` before anything
/// else, so a lost task would hold that thread and its connection slot for good.
struct Finish {
    control: crate::connection::Connection,
    sender: Sender<Responded>,
    written: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.written {
            let _ = self.control.shutdown(std::net::Shutdown::Both);
        }
        let _ = self.sender.send(Responded::Done);
    }
}

/// fazt patch: what the connection's thread hears once a request is answered.
pub(crate) enum Responded {
    /// The answer is written (or the writer is with the application: `into_writer`).
    Done,
    /// The answer, serialized, for the connection's thread to write: a handler thread
    /// never blocks on a client that reads slowly or not at all.
    Write(PendingWrite),
}

/// fazt patch: a serialized response, its writer and its share of the budget.
pub(crate) struct PendingWrite {
    pub(crate) writer: Box<dyn Write + Send + 'static>,
    pub(crate) bytes: Vec<u8>,
    /// How much of `bytes` is already written.
    pub(crate) at: usize,
    _guard: Option<BudgetGuard>,
}

/// fazt patch: a response body up to this size is handed to the connection's thread
/// even when the response budget is spent (it mostly fits in the socket's buffer).
const HANDOFF_SMALL: usize = 64 << 10;

struct NotifyOnDrop<R> {
    sender: Sender<Responded>,
    inner: R,
}

impl<R: Read> Read for NotifyOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
impl<R: Write> Write for NotifyOnDrop<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
impl<R> Drop for NotifyOnDrop<R> {
    fn drop(&mut self) {
        // fazt patch: the connection may be gone (no one waits): not a panic.
        let _ = self.sender.send(Responded::Done);
    }
}

/// Error that can happen when building a `Request` object.
#[derive(Debug)]
pub enum RequestCreationError {
    /// The client sent an `Expect` header that was not recognized by tiny-http.
    ExpectationFailed,

    /// Error while reading data from the socket during the creation of the `Request`.
    CreationIoError(IoError),

    /// fazt patch: the body's framing is ambiguous or unsupported (400 and close).
    BadFraming,

    /// fazt patch: no memory to read the body ahead within a body timeout (503).
    Busy,
}

impl From<IoError> for RequestCreationError {
    fn from(err: IoError) -> RequestCreationError {
        RequestCreationError::CreationIoError(err)
    }
}

/// Builds a new request.
///
/// After the request line and headers have been read from the socket, a new `Request` object
/// is built.
///
/// You must pass a `Read` that will allow the `Request` object to read from the incoming data.
/// It is the responsibility of the `Request` to read only the data of the request and not further.
///
/// The `Write` object will be used by the `Request` to write the response.
#[allow(clippy::too_many_arguments)]
pub fn new_request<R, W>(
    secure: bool,
    method: Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
    remote_addr: Option<SocketAddr>,
    mut source_data: R,
    mut writer: W,
    limits: &crate::Limits,
    leftover: std::sync::Arc<std::sync::atomic::AtomicU64>,
    budget: &std::sync::Arc<BodyBudget>,
) -> Result<Request, RequestCreationError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    // fazt patch: strict body framing (request smuggling). Upstream took the first
    // Content-Length it could parse (so `5x` meant "no body" and the body was read as
    // the next request, and `+5` was 5), and any Transfer-Encoding as chunked, even
    // beside a Content-Length. A front proxy that frames the request another way
    // would then disagree with us on where the next request starts.
    let (transfer_encoding, content_length) = body_framing(&headers, &version)
        .map_err(|_| RequestCreationError::BadFraming)?;

    // true if the client sent a `Expect: 100-continue` header
    let mut expects_continue = {
        match headers
            .iter()
            .find(|h: &&Header| h.field.equiv("Expect"))
            .map(|h| h.value.as_str())
        {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
            _ => return Err(RequestCreationError::ExpectationFailed),
        }
    };

    // true if the client sent a `Connection: upgrade` header
    let connection_upgrade = {
        match headers
            .iter()
            .find(|h: &&Header| h.field.equiv("Connection"))
            .map(|h| h.value.as_str())
        {
            Some(v) if v.to_ascii_lowercase().contains("upgrade") => true,
            _ => false,
        }
    };

    // we wrap `source_data` around a reading whose nature depends on the transfer-encoding and
    // content-length headers
    let mut upgrade_source = None;
    let reader = if connection_upgrade && content_length.is_none() && transfer_encoding.is_none()
    {
        // fazt patch: the stream is kept for `upgrade()`; the body is empty. An upgrade
        // request that declares a body gets it framed like any other.
        upgrade_source = Some(Box::new(source_data) as Box<dyn Read + Send + 'static>);
        Box::new(io::empty()) as Box<dyn Read + Send + 'static>
    } else if let Some(content_length) = content_length {
        if content_length == 0 {
            Box::new(io::empty()) as Box<dyn Read + Send + 'static>
        } else if content_length <= 1024 && !expects_continue {
            // if the content-length is small enough, we just read everything into a buffer

            let mut buffer = vec![0; content_length];
            let mut offset = 0;
            // fazt patch: the whole small body within one body timeout.
            let deadline = std::time::Instant::now() + limits.body_timeout;

            while offset != content_length {
                if std::time::Instant::now() > deadline {
                    let err = IoError::new(
                        ErrorKind::TimedOut,
                        "the request body did not arrive in time",
                    );
                    return Err(RequestCreationError::CreationIoError(err));
                }
                let read = source_data.read(&mut buffer[offset..])?;
                if read == 0 {
                    // the socket returned EOF, but we were before the expected content-length
                    // aborting
                    let info = "Connection has been closed before we received enough data";
                    let err = IoError::new(ErrorKind::ConnectionAborted, info);
                    return Err(RequestCreationError::CreationIoError(err));
                }

                offset += read;
            }

            Box::new(Cursor::new(buffer)) as Box<dyn Read + Send + 'static>
        } else {
            // fazt patch: a body reader with the body timeout; the connection thread
            // drains what the application leaves unread.
            let body = BodyReader::new(source_data, Some(content_length as u64), limits, leftover);
            // fazt patch: a body up to `prebuffer_body` arrives here, in the
            // connection's thread, before the request is handed out: an application
            // thread never waits on a client that is slow to send it.
            match prebuffer(
                body,
                content_length,
                limits,
                budget,
                &mut writer,
                &mut expects_continue,
                remote_addr.map(|a| a.ip()),
            )? {
                Prebuffer::Whole(buffered) => Box::new(buffered) as Box<dyn Read + Send + 'static>,
                Prebuffer::Streamed(body) => Box::new(body) as Box<dyn Read + Send + 'static>,
            }
        }
    } else if transfer_encoding.is_some() {
        // if a transfer-encoding was specified, then "chunked" is ALWAYS applied
        // over the message (RFC2616 #3.6)
        // fazt patch: under the same body reader, so an unread chunked body closes the
        // connection instead of being parsed as the next request; a decoder with
        // bounded size and trailer lines; prebuffered like a Content-Length body, and
        // past `prebuffer_body` the buffered part is followed by the rest.
        let body = BodyReader::new(ChunkedDecoder::new(source_data), None, limits, leftover);
        let cap = limits.prebuffer_body;
        match prebuffer(
            body,
            cap.saturating_add(1),
            limits,
            budget,
            &mut writer,
            &mut expects_continue,
            remote_addr.map(|a| a.ip()),
        )? {
            Prebuffer::Whole(buffered) => Box::new(buffered) as Box<dyn Read + Send + 'static>,
            Prebuffer::Streamed(body) => {
                Box::new(FusedReader::new(body)) as Box<dyn Read + Send + 'static>
            }
        }
    } else {
        // if we have neither a Content-Length nor a Transfer-Encoding,
        // assuming that we have no data
        // TODO: could also be multipart/byteranges
        Box::new(io::empty()) as Box<dyn Read + Send + 'static>
    };

    Ok(Request {
        data_reader: Some(reader),
        connection_fd: None,
        upgrade_source,
        response_writer: Some(Box::new(writer) as Box<dyn Write + Send + 'static>),
        remote_addr,
        secure,
        method,
        path,
        http_version: version,
        headers,
        body_length: content_length,
        must_send_continue: expects_continue,
        notify_when_responded: None,
        response_budget: None,
        direct: None,
    })
}

/// fazt patch: how the body is framed, strictly (RFC 9112 §6): a Transfer-Encoding
/// must be exactly `chunked`, in HTTP/1.1, without a Content-Length; every
/// Content-Length must be the same plain decimal number. Anything else is refused, as
/// a proxy in front may read it differently. Returns (chunked, Content-Length).
fn body_framing(headers: &[Header], version: &HTTPVersion) -> Result<(Option<()>, Option<usize>), ()> {
    let mut chunked = None;
    for h in headers.iter().filter(|h| h.field.equiv("Transfer-Encoding")) {
        let only_chunked = h.value.as_str().trim().eq_ignore_ascii_case("chunked");
        if !only_chunked || chunked.is_some() || *version == HTTPVersion(1, 0) {
            return Err(());
        }
        chunked = Some(());
    }
    let mut length: Option<usize> = None;
    for h in headers.iter().filter(|h| h.field.equiv("Content-Length")) {
        let v = h.value.as_str().trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        let n: usize = v.parse().map_err(|_| ())?;
        if chunked.is_some() || length.is_some_and(|l| l != n) {
            return Err(());
        }
        length = Some(n);
    }
    Ok((chunked, length))
}

/// fazt patch: the outcome of `prebuffer`.
enum Prebuffer<B> {
    /// The body as a whole (or, when it was longer than the prebuffer, the buffered
    /// part followed by the rest).
    Whole(Prebuffered<B>),
    /// Not buffered (too long, or no memory budget left): read as it comes.
    Streamed(B),
}

/// fazt patch: reads up to `want` bytes of `body` into memory, within the global
/// prebuffer budget (waiting at most one body timeout for it). Sends the
/// `100 Continue` a client asked for first, as the body is now wanted.
fn prebuffer<B: Read + Send + 'static, W: Write>(
    mut body: B,
    want: usize,
    limits: &crate::Limits,
    budget: &std::sync::Arc<BodyBudget>,
    writer: &mut W,
    expects_continue: &mut bool,
    ip: Option<std::net::IpAddr>,
) -> Result<Prebuffer<B>, RequestCreationError> {
    if want > limits.prebuffer_body.saturating_add(1) {
        return Ok(Prebuffer::Streamed(body));
    }
    // fazt patch: no room within a body timeout (clients are sending slowly, or this
    // one already holds its share) is a 503: streaming the body instead would let a
    // slow sender hold a handler thread after all.
    let guard = match budget.acquire(want, ip, limits.body_timeout) {
        Some(g) => g,
        None => return Err(RequestCreationError::Busy),
    };
    if *expects_continue {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
        *expects_continue = false;
    }
    let mut buffer = Vec::with_capacity(want.min(64 << 10));
    body.by_ref().take(want as u64).read_to_end(&mut buffer)?;
    Ok(Prebuffer::Whole(Prebuffered::new(buffer, guard, body)))
}

impl Request {
    /// Returns true if the request was made through HTTPS.
    #[inline]
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Returns the method requested by the client (eg. `GET`, `POST`, etc.).
    #[inline]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Returns the resource requested by the client.
    #[inline]
    pub fn url(&self) -> &str {
        &self.path
    }

    /// Returns a list of all headers sent by the client.
    #[inline]
    /// fazt patch: the affinity key of the request's Host header (see
    /// [`crate::affinity_key`]), None without one.
    pub fn affinity_key(&self) -> Option<u64> {
        self.headers
            .iter()
            .find(|h| h.field.equiv("Host"))
            .map(|h| crate::affinity_key(h.value.as_bytes()))
    }

    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Returns the HTTP version of the request.
    #[inline]
    pub fn http_version(&self) -> &HTTPVersion {
        &self.http_version
    }

    /// Returns the length of the body in bytes.
    ///
    /// Returns `None` if the length is unknown.
    #[inline]
    pub fn body_length(&self) -> Option<usize> {
        self.body_length
    }

    /// Returns the address of the client that sent this request.
    ///
    /// The address is always `Some` for TCP listeners, but always `None` for UNIX listeners
    /// (as the remote address of a UNIX client is almost always unnamed).
    ///
    /// Note that this is gathered from the socket. If you receive the request from a proxy,
    /// this function will return the address of the proxy and not the address of the actual
    /// user.
    #[inline]
    pub fn remote_addr(&self) -> Option<&SocketAddr> {
        self.remote_addr.as_ref()
    }

    /// Sends a response with a `Connection: upgrade` header, then turns the `Request` into a `Stream`.
    ///
    /// The main purpose of this function is to support websockets.
    /// If you detect that the request wants to use some kind of protocol upgrade, you can
    ///  call this function to obtain full control of the socket stream.
    ///
    /// If you call this on a non-websocket request, tiny-http will wait until this `Stream` object
    ///  is destroyed before continuing to read or write on the socket. Therefore you should always
    ///  destroy it as soon as possible.
    /// fazt patch: the descriptor of the socket this request came on (Unix, TCP or
    /// Unix-domain). It stays open while the request or the stream `upgrade` returns
    /// lives; an embedder may `dup` it to keep a second handle on the connection.
    pub fn connection_fd(&self) -> Option<i32> {
        self.connection_fd
    }

    pub(crate) fn set_connection_fd(&mut self, fd: Option<i32>) {
        self.connection_fd = fd;
    }

    pub fn upgrade<R: Read>(
        mut self,
        protocol: &str,
        response: Response<R>,
    ) -> Box<dyn ReadWrite + Send> {
        use crate::util::CustomStream;

        response
            .raw_print(
                self.response_writer.as_mut().unwrap().by_ref(),
                self.http_version.clone(),
                &self.headers,
                false,
                Some(protocol),
            )
            .ok(); // TODO: unused result

        self.response_writer.as_mut().unwrap().flush().ok(); // TODO: unused result

        let reader = match self.upgrade_source.take() {
            Some(raw) => raw,
            None => self.extract_reader_impl(),
        };
        let stream = CustomStream::new(reader, self.extract_writer_impl());
        // fazt patch: the connection's thread reads no further request after an
        // upgrade, so it need not wait for the stream's end (it used to, for HTTPS).
        if let Some(sender) = self.notify_when_responded.take() {
            let _ = sender.send(Responded::Done);
        }
        Box::new(stream) as Box<dyn ReadWrite + Send>
    }

    /// Allows to read the body of the request.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # extern crate tiny_http;
    /// # use std::io::Read;
    /// # fn get_content_type(_: &tiny_http::Request) -> &'static str { "" }
    /// # fn main() {
    /// # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
    /// let mut request = server.recv().unwrap();
    ///
    /// if get_content_type(&request) == "application/json" {
    ///     let mut content = String::new();
    ///     request.as_reader().read_to_string(&mut content).unwrap();
    /// }
    /// # }
    /// ```
    ///
    /// If the client sent a `Expect: 100-continue` header with the request, calling this
    ///  function will send back a `100 Continue` response.
    #[inline]
    pub fn as_reader(&mut self) -> &mut dyn Read {
        if self.must_send_continue {
            let msg = Response::new_empty(StatusCode(100));
            msg.raw_print(
                self.response_writer.as_mut().unwrap().by_ref(),
                self.http_version.clone(),
                &self.headers,
                true,
                None,
            )
            .ok();
            self.response_writer.as_mut().unwrap().flush().ok();
            self.must_send_continue = false;
        }

        self.data_reader.as_mut().unwrap()
    }

    /// Turns the `Request` into a writer.
    ///
    /// The writer has a raw access to the stream to the user.
    /// This function is useful for things like CGI.
    ///
    /// Note that the destruction of the `Writer` object may trigger
    /// some events. For exemple if a client has sent multiple requests and the requests
    /// have been processed in parallel, the destruction of a writer will trigger
    /// the writing of the next response.
    /// Therefore you should always destroy the `Writer` as soon as possible.
    #[inline]
    pub fn into_writer(mut self) -> Box<dyn Write + Send + 'static> {
        let writer = self.extract_writer_impl();
        if let Some(sender) = self.notify_when_responded.take() {
            let writer = NotifyOnDrop {
                sender,
                inner: writer,
            };
            Box::new(writer) as Box<dyn Write + Send + 'static>
        } else {
            writer
        }
    }

    /// Extract the response `Writer` object from the Request, dropping this `Writer` has the same side effects
    /// as the object returned by `into_writer` above.
    ///
    /// This may only be called once on a single request.
    fn extract_writer_impl(&mut self) -> Box<dyn Write + Send + 'static> {
        use std::mem;

        assert!(self.response_writer.is_some());

        let mut writer = None;
        mem::swap(&mut self.response_writer, &mut writer);
        writer.unwrap()
    }

    /// Extract the body `Reader` object from the Request.
    ///
    /// This may only be called once on a single request.
    fn extract_reader_impl(&mut self) -> Box<dyn Read + Send + 'static> {
        use std::mem;

        assert!(self.data_reader.is_some());

        let mut reader = None;
        mem::swap(&mut self.data_reader, &mut reader);
        reader.unwrap()
    }

    /// Sends a response to this request.
    #[inline]
    pub fn respond<R>(mut self, response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        let Some(sender) = self.notify_when_responded.take() else {
            return self.respond_impl(response);
        };
        // fazt patch: a response of known length is serialized here and written by the
        // connection's thread (under a deadline), within a shared memory budget; a
        // large one past the budget is refused 503 rather than written here, where a
        // client that does not read would hold this (application) thread.
        let length = response.data_length();
        // fazt patch: a small response written by this thread itself (see `Direct`)
        // needs no share of the budget: it mostly fits in the socket's buffer, and
        // such responses always went (`HANDOFF_SMALL`).
        if self.direct.is_some() && length.is_some_and(|len| len <= HANDOFF_SMALL) {
            return self.hand_off(response, None, &sender);
        }
        let guard = match (length, &self.response_budget) {
            (Some(len), Some(budget)) => {
                let ip = self.remote_addr.map(|a| a.ip());
                budget.acquire(len, ip, std::time::Duration::ZERO)
            }
            _ => None,
        };
        let over = |budget: &Option<Arc<BodyBudget>>, len: usize| {
            budget.as_ref().map_or(true, |b| len > b.total())
        };
        match (length, guard) {
            // Larger than the whole budget (or no budget): written here, as upstream.
            (Some(len), None) if over(&self.response_budget, len) => {
                let res = self.respond_impl(response);
                let _ = sender.send(Responded::Done);
                res
            }
            (None, _) => {
                let res = self.respond_impl(response);
                let _ = sender.send(Responded::Done);
                res
            }
            (Some(_), Some(guard)) => self.hand_off(response, Some(guard), &sender),
            (Some(len), None) if len <= HANDOFF_SMALL => self.hand_off(response, None, &sender),
            (Some(_), None) => {
                log::warn!(
                    "the response budget is spent by clients that read slowly; answering 503"
                );
                let mut busy = Response::from_string(
                    "{\"error\":\"the server is busy sending large responses; retry shortly\"}",
                )
                .with_status_code(StatusCode(503));
                for (k, v) in [("Content-Type", "application/json"), ("Retry-After", "1")] {
                    if let Ok(h) = Header::from_bytes(k.as_bytes(), v.as_bytes()) {
                        busy.add_header(h);
                    }
                }
                self.hand_off(busy, None, &sender)
            }
        }
    }

    /// fazt patch: serializes `response` and sends it to the connection's thread; if
    /// that thread is gone, writes it here.
    fn hand_off<R: Read>(
        &mut self,
        response: Response<R>,
        guard: Option<BudgetGuard>,
        sender: &Sender<Responded>,
    ) -> Result<(), IoError> {
        let mut bytes = Vec::with_capacity(response.data_length().unwrap_or(0) + 512);
        response.raw_print(
            &mut bytes,
            self.http_version.clone(),
            &self.headers,
            self.method == Method::Head,
            None,
        )?;
        let writer = self.extract_writer_impl();
        if let Some(direct) = self.direct.take() {
            return Self::write_direct(direct, writer, bytes, guard, sender);
        }
        let pending = PendingWrite {
            writer,
            bytes,
            at: 0,
            _guard: guard,
        };
        match sender.send(Responded::Write(pending)) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::SendError(Responded::Write(mut p))) => {
                Self::ignore_client_closing_errors(p.writer.write_all(&p.bytes))?;
                Self::ignore_client_closing_errors(p.writer.flush())
            }
            Err(_) => Ok(()),
        }
    }

    /// fazt patch: writes what the socket takes of `bytes` now, from this thread, and
    /// hands a rest to a pool thread (under the write deadline, like the connection's
    /// thread would); the connection's thread hears `Done` once all is written.
    fn write_direct(
        direct: Direct,
        mut writer: Box<dyn Write + Send + 'static>,
        bytes: Vec<u8>,
        guard: Option<BudgetGuard>,
        sender: &Sender<Responded>,
    ) -> Result<(), IoError> {
        // Nothing is buffered in the writer (every writer before it flushed), but if
        // something were, it must go first.
        let sent = writer.flush().and_then(|()| direct.control.send_now(&bytes));
        let at = match sent {
            Ok(n) if n == bytes.len() => {
                // Drop the writer first: it lets the next response's writer go.
                drop(writer);
                let _ = sender.send(Responded::Done);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => {
                let _ = direct.control.shutdown(std::net::Shutdown::Both);
                drop(writer);
                let _ = sender.send(Responded::Done);
                return Self::ignore_client_closing_errors(Err(e));
            }
        };
        let pending = PendingWrite {
            writer,
            bytes,
            at,
            _guard: guard,
        };
        let finish = Finish {
            control: direct.control,
            sender: sender.clone(),
            written: false,
        };
        let mut task = Some((direct.limits, pending, finish));
        direct.pool.spawn(Box::new(move || {
            if let Some((limits, pending, mut finish)) = task.take() {
                crate::client::write_pending(&finish.control, &limits, pending);
                finish.written = true;
            }
        }));
        Ok(())
    }

    fn respond_impl<R>(&mut self, response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        let mut writer = self.extract_writer_impl();

        let do_not_send_body = self.method == Method::Head;

        Self::ignore_client_closing_errors(response.raw_print(
            writer.by_ref(),
            self.http_version.clone(),
            &self.headers,
            do_not_send_body,
            None,
        ))?;

        Self::ignore_client_closing_errors(writer.flush())
    }

    fn ignore_client_closing_errors(result: io::Result<()>) -> io::Result<()> {
        result.or_else(|err| match err.kind() {
            ErrorKind::BrokenPipe => Ok(()),
            ErrorKind::ConnectionAborted => Ok(()),
            ErrorKind::ConnectionRefused => Ok(()),
            ErrorKind::ConnectionReset => Ok(()),
            _ => Err(err),
        })
    }

    pub(crate) fn with_notify_sender(
        mut self,
        sender: Sender<Responded>,
        budget: Arc<BodyBudget>,
        direct: Option<Direct>,
    ) -> Self {
        self.notify_when_responded = Some(sender);
        self.response_budget = Some(budget);
        self.direct = direct;
        self
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        write!(
            formatter,
            "Request({} {} from {:?})",
            self.method, self.path, self.remote_addr
        )
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.response_writer.is_some() {
            let response = Response::empty(500);
            let _ = self.respond_impl(response); // ignoring any potential error
            if let Some(sender) = self.notify_when_responded.take() {
                let _ = sender.send(Responded::Done);
            }
        }
    }
}

/// Dummy trait that regroups the `Read` and `Write` traits.
///
/// Automatically implemented on all types that implement both `Read` and `Write`.
pub trait ReadWrite: Read + Write {}
impl<T> ReadWrite for T where T: Read + Write {}

#[cfg(test)]
mod tests {
    use super::Request;

    #[test]
    fn must_be_send() {
        #![allow(dead_code)]
        fn f<T: Send>(_: &T) {}
        fn bar(rq: &Request) {
            f(rq);
        }
    }
}
