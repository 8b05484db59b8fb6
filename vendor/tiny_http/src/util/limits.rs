//! fazt patch: connection caps, the refuser thread that answers connections over a cap,
//! the accept loop's back-off, and the request body reader that enforces the body
//! timeout and drains what the application left unread (bounded).

use std::collections::HashMap;
use std::convert::TryFrom;
use std::io::{ErrorKind, Read, Result as IoResult, Write};
use std::net::{IpAddr, Shutdown};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::connection::Connection;
use crate::Limits;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many connections in all: 503.
    Busy,
    /// Too many connections from this IP: 429.
    PerIp,
}

/// The address a client is counted under: an IPv4 address as is (also when it comes
/// IPv4-mapped through a dual-stack socket), an IPv6 address by its /64 prefix, the
/// smallest block one host is given: counting each IPv6 address alone would give one
/// client 2^64 separate allowances.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections in all and per client (see `client_key`).
#[derive(Default)]
pub struct ConnectionCounts {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One open connection's place in the counts; released on drop.
pub struct Slot {
    counts: Arc<ConnectionCounts>,
    ip: Option<IpAddr>,
}

impl ConnectionCounts {
    pub fn acquire(self: &Arc<Self>, ip: Option<IpAddr>, limits: &Limits) -> Result<Slot, Refusal> {
        let ip = ip.map(client_key);
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= limits.max_connections {
            return Err(Refusal::Busy);
        }
        if let Some(ip) = ip {
            let n = c.per_ip.entry(ip).or_insert(0);
            if *n >= limits.max_connections_per_ip {
                return Err(Refusal::PerIp);
            }
            *n += 1;
        }
        c.total += 1;
        Ok(Slot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = c.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Answers refused connections and closes them gracefully: the answer is written at
/// once, then whatever the client still sends is read and dropped for up to a second,
/// so closing does not reset the connection before the client read the answer.
pub struct Refuser {
    tx: SyncSender<(Connection, Refusal)>,
}

/// Refused connections waiting to be closed; past this they are closed at once.
const REFUSER_QUEUE: usize = 256;
const LINGER: Duration = Duration::from_secs(1);

impl Refuser {
    pub fn start() -> Refuser {
        let (tx, rx) = sync_channel(REFUSER_QUEUE);
        let spawned = thread::Builder::new()
            .name("tiny-http-refuser".into())
            .stack_size(64 << 10)
            .spawn(move || refuse_loop(&rx));
        if let Err(e) = spawned {
            // Without the thread, refused connections are simply closed (tx fails).
            log::error!("cannot start the connection refuser thread: {}", e);
        }
        Refuser { tx }
    }

    pub fn refuse(&self, conn: Connection, why: Refusal) {
        // A full queue (or no thread) closes the connection without an answer.
        let _ = self.tx.try_send((conn, why));
    }
}

fn refusal_response(why: Refusal) -> Vec<u8> {
    let (status, body) = match why {
        Refusal::Busy => (
            "503 Service Unavailable",
            "{\"error\":\"the server has too many open connections; retry shortly\"}",
        ),
        Refusal::PerIp => (
            "429 Too Many Requests",
            "{\"error\":\"too many open connections from your address\"}",
        ),
    };
    format!(
        "HTTP/1.1 {}\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: {}\r\n\r\n{}",
        status,
        body.len(),
        body
    )
    .into_bytes()
}

fn refuse_loop(rx: &Receiver<(Connection, Refusal)>) {
    let mut lingering: Vec<(Connection, Instant)> = Vec::new();
    let mut scratch = [0u8; 4096];
    loop {
        let next = if lingering.is_empty() {
            rx.recv().map_err(|_| TryRecvError::Disconnected)
        } else {
            rx.try_recv()
        };
        match next {
            Ok((mut conn, why)) => {
                let _ = conn.set_nonblocking(true);
                let _ = conn.write(&refusal_response(why));
                let _ = conn.shutdown(Shutdown::Write);
                lingering.push((conn, Instant::now() + LINGER));
                continue;
            }
            Err(TryRecvError::Disconnected) if lingering.is_empty() => return,
            Err(_) => {}
        }
        let now = Instant::now();
        lingering.retain_mut(|(conn, until)| {
            if now >= *until {
                return false;
            }
            loop {
                match conn.read(&mut scratch) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
            }
        });
        thread::sleep(Duration::from_millis(10));
    }
}

/// The accept loop's back-off after errors: 5 ms doubling to 1 s, reset by a success.
/// Errors are logged at most once a second, with how many were not.
pub struct Backoff {
    delay: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            delay: Duration::from_millis(5),
            last_log: None,
            unlogged: 0,
        }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        self.delay = Duration::from_millis(5);
    }

    pub fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last_log
            .map_or(true, |t| now - t >= Duration::from_secs(1))
        {
            log::error!(
                "accepting a connection failed: {} ({} more since the last report); retrying in {:?}",
                e,
                self.unlogged,
                self.delay
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        thread::sleep(self.delay);
        self.delay = (self.delay * 2).min(Duration::from_secs(1));
    }
}

/// A request body: at most `remaining` bytes of `inner` (or all of it, for chunked
/// bodies, where `inner` is the decoder). Reads fail with `TimedOut` when the client
/// stalls for `timeout`, or once `timeout` has passed and the body averages less than
/// `min_rate`. Dropping it never reads: what the application left unread is recorded
/// in `leftover` (`u64::MAX`: unknown, for chunked bodies), and the connection's own
/// thread drains it (bounded) or closes the connection, so a handler thread is never
/// held by a client that stopped sending.
pub struct BodyReader<R: Read> {
    inner: R,
    remaining: Option<u64>,
    started: Instant,
    received: u64,
    timeout: Duration,
    min_rate: u64,
    done: bool,
    leftover: Arc<AtomicU64>,
}

impl<R: Read> BodyReader<R> {
    pub fn new(inner: R, length: Option<u64>, limits: &Limits, leftover: Arc<AtomicU64>) -> Self {
        BodyReader {
            inner,
            remaining: length,
            started: Instant::now(),
            received: 0,
            timeout: limits.body_timeout,
            min_rate: limits.body_min_rate.max(1),
            done: length == Some(0),
            leftover,
        }
    }

    fn too_slow(&self) -> bool {
        let elapsed = self.started.elapsed();
        elapsed > self.timeout
            && self.received
                < (elapsed - self.timeout)
                    .as_secs()
                    .saturating_mul(self.min_rate)
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        ErrorKind::TimedOut,
        "the request body did not arrive in time",
    )
}

impl<R: Read> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.too_slow() {
            return Err(timed_out());
        }
        let want = match self.remaining {
            Some(r) => buf.len().min(usize::try_from(r).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                self.done = true;
                if self.remaining.is_some_and(|r| r > 0) {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the client closed the connection before sending the whole body",
                    ));
                }
                Ok(0)
            }
            Ok(n) => {
                self.received += n as u64;
                if let Some(r) = self.remaining.as_mut() {
                    *r -= n as u64;
                    if *r == 0 {
                        self.done = true;
                    }
                }
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(timed_out())
            }
            Err(e) => Err(e),
        }
    }
}

impl<R: Read> Drop for BodyReader<R> {
    fn drop(&mut self) {
        if !self.done {
            let rest = self.remaining.unwrap_or(u64::MAX);
            self.leftover.store(rest, Ordering::SeqCst);
        }
    }
}

/// Memory for request bodies read ahead by connection threads (or for responses
/// waiting to be written by them), shared by all of them, so they cannot exhaust
/// memory however many arrive at once. One client (see `client_key`) holds at most a
/// quarter of it, unless it holds nothing else, so one address cannot take it all.
pub struct BodyBudget {
    used: Mutex<Used>,
    freed: std::sync::Condvar,
    total: usize,
}

#[derive(Default)]
struct Used {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// Bytes of the budget held by one read-ahead body; returned on drop.
pub struct BudgetGuard {
    budget: Arc<BodyBudget>,
    client: Option<IpAddr>,
    bytes: usize,
}

impl BodyBudget {
    pub fn new(total: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            used: Mutex::new(Used::default()),
            freed: std::sync::Condvar::new(),
            total,
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    fn fits(&self, used: &Used, client: Option<IpAddr>, bytes: usize) -> bool {
        if used.total + bytes > self.total {
            return false;
        }
        let mine = client.and_then(|c| used.per_client.get(&c)).copied().unwrap_or(0);
        mine == 0 || mine + bytes <= self.total / 4
    }

    /// Takes `bytes` of the budget for a request from `ip`, waiting at most `wait` for
    /// them to be free.
    pub fn acquire(
        self: &Arc<Self>,
        bytes: usize,
        ip: Option<IpAddr>,
        wait: Duration,
    ) -> Option<BudgetGuard> {
        if bytes > self.total {
            return None;
        }
        let client = ip.map(client_key);
        let deadline = Instant::now() + wait;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while !self.fits(&used, client, bytes) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            used = self
                .freed
                .wait_timeout(used, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        used.total += bytes;
        if let Some(c) = client {
            *used.per_client.entry(c).or_insert(0) += bytes;
        }
        Some(BudgetGuard {
            budget: self.clone(),
            client,
            bytes,
        })
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        used.total = used.total.saturating_sub(self.bytes);
        if let Some(c) = self.client {
            if let Some(n) = used.per_client.get_mut(&c) {
                *n = n.saturating_sub(self.bytes);
                if *n == 0 {
                    used.per_client.remove(&c);
                }
            }
        }
        self.budget.freed.notify_all();
    }
}

/// A body read ahead into memory, then whatever of it is still unread (nothing, unless
/// the body was longer than the read-ahead).
pub struct Prebuffered<B> {
    data: std::io::Cursor<Vec<u8>>,
    rest: B,
    _guard: BudgetGuard,
}

impl<B> Prebuffered<B> {
    pub fn new(data: Vec<u8>, guard: BudgetGuard, rest: B) -> Self {
        Prebuffered {
            data: std::io::Cursor::new(data),
            rest,
            _guard: guard,
        }
    }
}

impl<B: Read> Read for Prebuffered<B> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let n = self.data.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        self.rest.read(buf)
    }
}

/// A chunked transfer decoder with bounded lines (replaces `chunked_transfer::Decoder`
/// for request bodies): that one collects a chunk-size line without limit, so a body of
/// endless digits grows memory until the connection ends.
pub struct ChunkedDecoder<R: Read> {
    source: R,
    state: Chunked,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// Longest chunk-size or trailer line, and most trailer lines.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64;

fn bad_chunk(msg: &str) -> std::io::Error {
    std::io::Error::new(
        ErrorKind::InvalidData,
        format!("malformed chunked body: {}", msg),
    )
}

impl<R: Read> ChunkedDecoder<R> {
    pub fn new(source: R) -> Self {
        ChunkedDecoder {
            source,
            state: Chunked::Size,
        }
    }

    /// One CRLF- (or LF-) terminated line, at most `MAX_CHUNK_LINE` bytes.
    fn line(&mut self) -> IoResult<Vec<u8>> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if self.source.read(&mut byte)? == 0 {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the client closed the connection inside a chunked body",
                ));
            }
            if byte[0] == b'\n' {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if line.len() >= MAX_CHUNK_LINE {
                return Err(bad_chunk("line too long"));
            }
            line.push(byte[0]);
        }
    }
}

impl<R: Read> Read for ChunkedDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        loop {
            match self.state {
                Chunked::Done => return Ok(0),
                Chunked::Size => {
                    let line = self.line()?;
                    let text = std::str::from_utf8(&line).map_err(|_| bad_chunk("size"))?;
                    let hex = text.split(';').next().unwrap_or("").trim();
                    if hex.is_empty() || hex.len() > 16 {
                        return Err(bad_chunk("size"));
                    }
                    let size = u64::from_str_radix(hex, 16).map_err(|_| bad_chunk("size"))?;
                    self.state = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(0);
                    }
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = self.source.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "the client closed the connection inside a chunk",
                        ));
                    }
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                    return Ok(n);
                }
                Chunked::DataEnd => {
                    if !self.line()?.is_empty() {
                        return Err(bad_chunk("no CRLF after a chunk"));
                    }
                    self.state = Chunked::Size;
                }
                Chunked::Trailers(seen) => {
                    if self.line()?.is_empty() {
                        self.state = Chunked::Done;
                    } else if seen + 1 >= MAX_TRAILERS {
                        return Err(bad_chunk("too many trailer lines"));
                    } else {
                        self.state = Chunked::Trailers(seen + 1);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn body_reader_stops_at_the_length_and_records_the_rest() {
        let leftover = Arc::new(AtomicU64::new(0));
        let mut src = Cursor::new(b"hello world".to_vec());
        {
            let mut r = BodyReader::new(&mut src, Some(5), &Limits::default(), leftover.clone());
            let mut one = [0u8; 1];
            r.read_exact(&mut one).unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, b"ello");
        }
        assert_eq!(src.position(), 5);
        assert_eq!(leftover.load(Ordering::SeqCst), 0);
        {
            let mut r = BodyReader::new(&mut src, Some(6), &Limits::default(), leftover.clone());
            r.read_exact(&mut [0u8; 2]).unwrap();
        }
        assert_eq!(
            leftover.load(Ordering::SeqCst),
            4,
            "unread bytes are recorded, not read"
        );
        assert_eq!(src.position(), 7);
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_prefix() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("::ffff:192.0.2.7"), key("::ffff:192.0.2.8"));
        // So the per-IP cap holds across one /64.
        let limits = Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let counts = Arc::new(ConnectionCounts::default());
        let a = counts.acquire(Some("2001:db8::1".parse().unwrap()), &limits);
        let b = counts.acquire(Some("2001:db8::2".parse().unwrap()), &limits);
        let c = counts.acquire(Some("2001:db8::3".parse().unwrap()), &limits);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(c.err(), Some(Refusal::PerIp));
    }

    #[test]
    fn one_client_takes_at_most_a_quarter_of_the_budget() {
        let budget = BodyBudget::new(100);
        let hog: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let other: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        let first = budget.acquire(60, hog, Duration::ZERO);
        assert!(first.is_some(), "alone, a client may take more than its share");
        assert!(budget.acquire(1, hog, Duration::ZERO).is_none());
        let theirs = budget.acquire(25, other, Duration::ZERO);
        assert!(theirs.is_some());
        drop(first);
        assert!(budget.acquire(25, hog, Duration::ZERO).is_some());
    }

    #[test]
    fn chunked_decoder_reads_chunks_and_trailers() {
        let src =
            Cursor::new(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT".to_vec());
        let mut d = ChunkedDecoder::new(src);
        let mut out = String::new();
        d.read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello world");
        let mut rest = String::new();
        d.source.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn chunked_decoder_refuses_an_endless_size_line() {
        let src = Cursor::new(vec![b'0'; 1 << 20]);
        let mut d = ChunkedDecoder::new(src);
        let err = d.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        assert!(d.source.position() <= 4097);
    }

    #[test]
    fn an_unread_chunked_body_is_unknown_leftover() {
        let leftover = Arc::new(AtomicU64::new(0));
        let src = ChunkedDecoder::new(Cursor::new(b"5\r\nhello\r\n0\r\n\r\n".to_vec()));
        drop(BodyReader::new(
            src,
            None,
            &Limits::default(),
            leftover.clone(),
        ));
        assert_eq!(leftover.load(Ordering::SeqCst), u64::MAX);
    }
}
