use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read};

use std::net::{Shutdown, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{HTTPVersion, Method};
use crate::connection::Connection;
use crate::util::BodyBudget;
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Limits;
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // fazt patch: a handle on the socket to set each phase's read timeout, the limits,
    // and how many body bytes the last request left unread (u64::MAX: unknown). They
    // are drained here, in the connection's thread, or the connection is closed: its
    // next bytes are not a request head.
    control: Connection,
    limits: Arc<Limits>,
    leftover: Arc<AtomicU64>,
    budget: Arc<BodyBudget>,
    /// The socket's read timeout as last set here (only this thread sets it while the
    /// connection serves HTTP).
    read_timeout: std::cell::Cell<Option<Duration>>,
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
    /// fazt patch: the request line is longer than the limit (414).
    RequestLineTooLong,
    /// fazt patch: the header lines are longer than the limit (431).
    HeadersTooLarge,
    /// fazt patch: the head did not arrive within the head timeout (408).
    HeadTimeout,
    /// fazt patch: a well-formed HTTP version other than 1.0 and 1.1 (505).
    UnsupportedVersion,
    /// fazt patch: ambiguous or unsupported body framing (400).
    BadFraming,
    /// fazt patch: no memory to read the body ahead (503).
    Busy,
    /// fazt patch: nothing more on this connection (EOF, idle timeout, or a body was
    /// left unread): close without an answer.
    Closed,
}

/// Why reading a line stopped early.
enum LineError {
    TooLong,
    TimedOut,
    Io(IoError),
}

fn is_timeout(e: &IoError) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub(crate) fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        control: Connection,
        limits: Arc<Limits>,
        budget: Arc<BodyBudget>,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next_reader();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            control,
            limits,
            leftover: Arc::new(AtomicU64::new(0)),
            budget,
            read_timeout: std::cell::Cell::new(None),
        }
    }

    /// fazt patch: writes a response a handler serialized (`Request::respond`), here in
    /// the connection's thread (see `write_pending`). False (and the connection shut)
    /// when that fails.
    pub(crate) fn write_response(&mut self, pending: crate::request::PendingWrite) -> bool {
        write_pending(&self.control, &self.limits, pending)
    }

    /// fazt patch: whether the request just returned by `next` is the connection's last
    /// (`Connection: close`, HTTP/1.0, an upgrade).
    pub(crate) fn is_last(&self) -> bool {
        self.no_more_requests
    }

    /// fazt patch: what a handler thread needs to write a response itself, without
    /// waiting (`Request::hand_off`): the socket, the limits and the thread pool for a
    /// rest it could not write at once. None over TLS or without a descriptor.
    pub(crate) fn direct(&self, pool: &Arc<crate::util::TaskPool>) -> Option<crate::request::Direct> {
        if self.secure || self.control.raw_fd().is_none() {
            return None;
        }
        Some(crate::request::Direct {
            control: self.control.try_clone().ok()?,
            limits: self.limits.clone(),
            pool: pool.clone(),
        })
    }

    /// Reads the next line from self.next_header_source, at most `limit` bytes, and
    /// only until `deadline` (fazt patch: unbounded before, tiny-http #56).
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    ///
    /// fazt patch: scans the read buffer for the line's end instead of reading a byte
    /// per call (with a clock read per byte); the deadline is checked after every
    /// read from the socket, which is where a client dripping bytes makes us wait.
    fn read_next_line(&mut self, limit: usize, deadline: Instant) -> Result<Vec<u8>, LineError> {
        let mut buf = Vec::new();
        loop {
            let available = match self.next_header_source.fill_buf() {
                Ok([]) => {
                    return Err(LineError::Io(IoError::new(
                        ErrorKind::ConnectionAborted,
                        "Unexpected EOF",
                    )))
                }
                Ok(b) => b,
                Err(e) if is_timeout(&e) => return Err(LineError::TimedOut),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(LineError::Io(e)),
            };
            // Take the bytes up to and including the first LF, or all there are.
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            // Never hold more than the limit (plus the CRLF) of one line in memory.
            let room = (limit + 2).saturating_sub(buf.len());
            buf.extend_from_slice(&available[..take.min(room)]);
            self.next_header_source.consume(take.min(room));
            if done && take <= room && buf.ends_with(b"\r\n") {
                buf.truncate(buf.len() - 2);
                return Ok(buf);
            }
            if buf.len() > limit + 1 {
                return Err(LineError::TooLong);
            }
            // A client dripping one byte at a time must not hold the connection.
            if Instant::now() > deadline {
                return Err(LineError::TimedOut);
            }
        }
    }

    fn set_read_timeout(&self, t: Duration) {
        // fazt patch: a system call only when the timeout changes (the head and the
        // body timeouts are often the same).
        let t = t.max(Duration::from_millis(1));
        if self.read_timeout.get() != Some(t) && self.control.set_read_timeout(Some(t)).is_ok() {
            self.read_timeout.set(Some(t));
        }
    }

    /// Skips `n` unread body bytes so the connection can serve its next request: at
    /// most `drain_limit` of them, within one body timeout. False if that fails.
    fn drain(&mut self, n: u64) -> bool {
        if n > self.limits.drain_limit as u64 {
            return false;
        }
        self.set_read_timeout(self.limits.body_timeout);
        let deadline = Instant::now() + self.limits.body_timeout;
        let mut left = n as usize;
        let mut buf = [0u8; 8192];
        while left > 0 {
            if Instant::now() > deadline {
                return false;
            }
            let want = left.min(buf.len());
            match self.next_header_source.read(&mut buf[..want]) {
                Ok(0) | Err(_) => return false,
                Ok(k) => left -= k,
            }
        }
        true
    }

    /// After a body was left unread, reads and drops what the client still sends for a
    /// moment before closing, so the close does not reset the connection before the
    /// client has read its answer.
    fn linger(&mut self) {
        let _ = self.control.shutdown(Shutdown::Write);
        self.set_read_timeout(Duration::from_millis(500));
        let until = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 8192];
        let mut total = 0usize;
        while Instant::now() < until && total < (16 << 20) {
            match self.next_header_source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        // fazt patch: wait until the previous request's body is done with, then give
        // the client `idle_timeout` to start the next request and `head_timeout` to
        // finish its head. The body gets `body_timeout` per read.
        if !self.next_header_source.wait_turn() {
            return Err(ReadError::Closed);
        }
        let leftover = self.leftover.swap(0, Ordering::SeqCst);
        if leftover > 0 && !self.drain(leftover) {
            self.linger();
            return Err(ReadError::Closed);
        }
        self.set_read_timeout(self.limits.idle_timeout);
        let first = match self.next_header_source.by_ref().bytes().next() {
            Some(Ok(b)) => b,
            _ => return Err(ReadError::Closed),
        };
        let deadline = Instant::now() + self.limits.head_timeout;
        self.set_read_timeout(self.limits.head_timeout);
        let line_error = |e: LineError, too_long: ReadError| match e {
            LineError::TooLong => too_long,
            LineError::TimedOut => ReadError::HeadTimeout,
            LineError::Io(e) => ReadError::ReadIoError(e),
        };

        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                let mut line = vec![first];
                if first != b'\n' {
                    let rest = self
                        .read_next_line(self.limits.max_request_line, deadline)
                        .map_err(|e| line_error(e, ReadError::RequestLineTooLong))?;
                    line.extend_from_slice(&rest);
                }
                if line.len() > self.limits.max_request_line {
                    return Err(ReadError::RequestLineTooLong);
                }
                let line =
                    AsciiString::from_ascii(line).map_err(|_| ReadError::WrongRequestLine)?;
                parse_request_line(line.as_str().trim())?
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                let mut budget = self.limits.max_header_bytes;
                loop {
                    let line = self
                        .read_next_line(budget, deadline)
                        .map_err(|e| line_error(e, ReadError::HeadersTooLarge))?;
                    if line.len() > budget {
                        return Err(ReadError::HeadersTooLarge);
                    }
                    budget -= line.len();

                    if line.is_empty() {
                        break;
                    };
                    let line = AsciiString::from_ascii(line)
                        .map_err(|_| ReadError::WrongHeader(version.clone()))?;
                    headers.push(match FromStr::from_str(line.as_str().trim()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };
        self.set_read_timeout(self.limits.body_timeout);

        // building the writer for the request
        let writer = self.sink.next_writer();

        // follow-up for next potential request
        let mut data_source = self.source.next_reader();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let remote_addr = match self.remote_addr {
            Ok(a) => a,
            Err(_) => return Err(ReadError::Closed),
        };
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            remote_addr,
            data_source,
            writer,
            &self.limits,
            self.leftover.clone(),
            &self.budget,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
                request::RequestCreationError::BadFraming => ReadError::BadFraming,
                request::RequestCreationError::Busy => ReadError::Busy,
            }
        })?;
        let mut request = request;
        request.set_connection_fd(self.control.raw_fd());

        // return the request
        Ok(request)
    }

    /// fazt patch: answers a request that cannot be served and closes the connection.
    fn refuse(&mut self, status: u16, version: HTTPVersion, message: &str) {
        use crate::{Header, Response, StatusCode};
        let mut writer = self.sink.next_writer();
        let mut response = Response::from_string(format!("{{\"error\":\"{}\"}}", message))
            .with_status_code(StatusCode(status));
        if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
            response.add_header(h);
        }
        if let Ok(h) = Header::from_bytes(&b"Connection"[..], &b"close"[..]) {
            response.add_header(h);
        }
        response
            .raw_print(&mut writer, version, &[], false, None)
            .ok();
        // Out now, before any shutdown: the buffered writer would flush only on drop.
        let _ = std::io::Write::flush(&mut writer);
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        let v11 = HTTPVersion(1, 1);
        // Every error closes the connection: we don't know where the next request
        // would start.
        let rq = match self.read() {
            Err(ReadError::WrongRequestLine) => {
                self.refuse(400, v11, "malformed request line");
                return None;
            }
            Err(ReadError::WrongHeader(ver)) => {
                self.refuse(400, ver, "malformed header line");
                return None;
            }
            Err(ReadError::HeadTimeout) => {
                self.refuse(408, v11, "the request head did not arrive in time");
                return None;
            }
            Err(ReadError::ReadIoError(ref err)) if is_timeout(err) => {
                self.refuse(408, v11, "the request did not arrive in time");
                return None;
            }
            Err(ReadError::RequestLineTooLong) => {
                self.refuse(414, v11, "the request line is too long");
                return None;
            }
            Err(ReadError::HeadersTooLarge) => {
                self.refuse(431, v11, "the request headers are too large");
                return None;
            }
            Err(ReadError::UnsupportedVersion) => {
                self.refuse(
                    505,
                    v11,
                    "this server only supports HTTP versions 1.0 and 1.1",
                );
                return None;
            }
            Err(ReadError::BadFraming) => {
                self.refuse(
                    400,
                    v11,
                    "ambiguous request body framing: send one Content-Length, or Transfer-Encoding: chunked alone",
                );
                // The body that follows is unread: close gracefully, or the client may
                // get a reset instead of the answer.
                self.linger();
                return None;
            }
            Err(ReadError::Busy) => {
                self.refuse(
                    503,
                    v11,
                    "the server is busy receiving other request bodies; retry shortly",
                );
                self.linger();
                return None;
            }
            Err(ReadError::ExpectationFailed(ver)) => {
                self.refuse(417, ver, "unsupported Expect header");
                return None;
            }
            Err(ReadError::ReadIoError(_)) | Err(ReadError::Closed) => return None,
            Ok(rq) => rq,
        };

        // updating the status of the connection
        let connection_header = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str());

        let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

        match lowercase {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
            Some(ref val)
                if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
            {
                self.no_more_requests = true
            }
            None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        // returning the request
        Some(rq)
    }
}

/// fazt patch: writes a serialized response from where `pending.at` says, within
/// `write_timeout` plus the time the body takes at `body_min_rate` (a client that reads
/// slowly or not at all loses its connection, not a thread for long). False (and the
/// connection shut) when that fails.
pub(crate) fn write_pending(
    control: &Connection,
    limits: &Limits,
    pending: crate::request::PendingWrite,
) -> bool {
    use std::io::Write;
    let crate::request::PendingWrite {
        mut writer,
        bytes,
        at,
        ..
    } = pending;
    let t = limits.write_timeout;
    let per_rate = bytes.len() as u64 / limits.body_min_rate.max(1);
    let deadline = Instant::now() + t + Duration::from_secs(per_rate);
    let mut at = at;
    let mut ok = true;
    while at < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            ok = false;
            break;
        }
        // The socket's timeout bounds each write call; the deadline bounds them all.
        let _ = control.set_write_timeout(Some(left.min(t).max(Duration::from_millis(1))));
        match writer.write(&bytes[at..]) {
            Ok(0) | Err(_) => {
                ok = false;
                break;
            }
            Ok(n) => at += n,
        }
    }
    ok = ok && writer.flush().is_ok();
    let _ = control.set_write_timeout(Some(t));
    if !ok {
        let _ = control.shutdown(Shutdown::Both);
    }
    ok
}

/// Parses a "HTTP/1.1" string. fazt patch: a well-formed version other than 1.0 and
/// 1.1 is answered 505 and the connection closed (HTTP/2.0 used to get a 505 and then
/// a wait for another request that never came, stranding a thread and a socket).
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    match version {
        "HTTP/1.0" => return Ok(HTTPVersion(1, 0)),
        "HTTP/1.1" => return Ok(HTTPVersion(1, 1)),
        _ => {}
    }
    let digits = version
        .strip_prefix("HTTP/")
        .ok_or(ReadError::WrongRequestLine)?;
    let (major, minor) = digits.split_once('.').unwrap_or((digits, "0"));
    let numeric = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    if numeric(major) && numeric(minor) {
        Err(ReadError::UnsupportedVersion)
    } else {
        Err(ReadError::WrongRequestLine)
    }
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().map(parse_http_version);
    if parts.next().is_some() {
        return Err(ReadError::WrongRequestLine);
    }

    match (method, path, version) {
        (Some(method), Some(path), Some(version)) => Ok((method, path, version?)),
        _ => Err(ReadError::WrongRequestLine),
    }
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
        assert!(matches!(
            super::parse_request_line("GET / HTTP/2.0"),
            Err(super::ReadError::UnsupportedVersion)
        ));
        assert!(matches!(
            super::parse_request_line("GET / HTTP/0.9"),
            Err(super::ReadError::UnsupportedVersion)
        ));
        assert!(matches!(
            super::parse_request_line("GET / HTTX/1.1"),
            Err(super::ReadError::WrongRequestLine)
        ));
    }
}
