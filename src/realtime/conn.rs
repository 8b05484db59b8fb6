//! One WebSocket connection's outgoing side, shared by the hub (broadcasts), the
//! session's reads (replies) and the event loop (flushes). Frames wait in a bounded
//! queue and are written by the event loop with one `sendmsg` of everything waiting, on
//! a non-blocking socket: no thread per connection, and a client that stops reading
//! only fills its own queue (past the bound it is cut off).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::event_loop::Shared as LoopShared;

/// A server-to-client frame, already encoded: a broadcast is framed once and shared by
/// every recipient.
pub(crate) enum Frame {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl Frame {
    fn bytes(&self) -> &[u8] {
        match self {
            Frame::Shared(b) => b,
            Frame::Owned(b) => b,
        }
    }
}

/// Encodes one unmasked (server-to-client) frame with the FIN bit set.
pub(crate) fn encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = Vec::with_capacity(len + 10);
    f.push(0x80 | opcode);
    if len < 126 {
        f.push(len as u8);
    } else if len <= u16::MAX as usize {
        f.push(126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

pub(crate) const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

pub(crate) fn text_frame(text: &str) -> Vec<u8> {
    encode(OP_TEXT, text.as_bytes())
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The client is this far behind (the queue bound): the caller cuts it off.
    Full,
    /// The connection is closed or closing.
    Closed,
}

/// How many frames one `sendmsg` takes at most.
const MAX_IOV: usize = 64;

pub(crate) struct Conn {
    state: Mutex<State>,
    /// Frames a client may have waiting before it counts as too slow.
    limit: usize,
    /// The event loop that flushes this connection (None in unit tests of the hub).
    event_loop: Option<Arc<LoopShared>>,
}

struct State {
    /// The socket, -1 until the upgrade hands it over. Owned by `owner`.
    fd: RawFd,
    /// Owns the descriptor, so it lives exactly as long as this connection: never
    /// closed, and so never reused, while a broadcaster may still write to it.
    owner: Option<OwnedFd>,
    queue: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// In the event loop's list of connections to flush.
    scheduled: bool,
    /// The socket's buffer is full: the loop waits for it to become writable.
    blocked_since: Option<Instant>,
    /// Sends are refused; the socket is shut (or shuts once the queue is written).
    closed: bool,
    shut: bool,
}

impl Conn {
    pub(crate) fn new(limit: usize, event_loop: Option<Arc<LoopShared>>) -> Arc<Conn> {
        Arc::new(Conn {
            state: Mutex::new(State {
                fd: -1,
                owner: None,
                queue: VecDeque::new(),
                offset: 0,
                scheduled: false,
                blocked_since: None,
                closed: false,
                shut: false,
            }),
            limit,
            event_loop,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the upgraded socket (non-blocking) to this connection; frames queued since
    /// the session joined go out now.
    pub(crate) fn attach(self: &Arc<Self>, owner: OwnedFd) {
        let mut st = self.lock();
        st.fd = owner.as_raw_fd();
        st.owner = Some(owner);
        if st.closed && !st.shut {
            // Closed before the hand-over (the app went away): shut it now.
            shut(&mut st);
        }
        let wake = !st.queue.is_empty() && !st.scheduled && !st.closed;
        if wake {
            st.scheduled = true;
        }
        drop(st);
        if wake {
            self.schedule();
        }
    }

    /// Queues a frame for the event loop to write.
    pub(crate) fn send(self: &Arc<Self>, frame: Frame) -> Result<(), SendError> {
        let mut st = self.lock();
        if st.closed {
            return Err(SendError::Closed);
        }
        if st.queue.len() >= self.limit {
            return Err(SendError::Full);
        }
        st.queue.push_back(frame);
        let wake = !st.scheduled && st.blocked_since.is_none() && st.fd >= 0;
        if wake {
            st.scheduled = true;
        }
        drop(st);
        if wake {
            self.schedule();
        }
        Ok(())
    }

    pub(crate) fn send_text(self: &Arc<Self>, text: &str) -> Result<(), SendError> {
        self.send(Frame::Owned(text_frame(text)))
    }

    pub(crate) fn send_ping(self: &Arc<Self>) -> Result<(), SendError> {
        self.send(Frame::Owned(encode(OP_PING, &[])))
    }

    fn schedule(self: &Arc<Self>) {
        if let Some(l) = &self.event_loop {
            l.schedule(self.clone());
        }
    }

    /// Writes what is queued until done or the socket is full (event loop only).
    /// Returns whether the socket's buffer is full with frames still waiting.
    pub(crate) fn flush(&self) -> Flushed {
        let mut st = self.lock();
        st.scheduled = false;
        flush_locked(&mut st)
    }

    /// Frames waiting.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// When the socket last refused more bytes with frames still waiting.
    pub(crate) fn blocked_since(&self) -> Option<Instant> {
        self.lock().blocked_since
    }

    /// Says goodbye with a close frame (written now if the socket takes it) and shuts
    /// the socket, which ends the session in the event loop.
    pub(crate) fn close(&self, why: &str) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        log::debug!("closing a WebSocket session: {why}");
        st.queue.push_back(Frame::Owned(encode(OP_CLOSE, &[])));
        let _ = flush_locked(&mut st);
        st.closed = true;
        shut(&mut st);
    }

    /// Queues a close frame and shuts the socket once everything queued is written (a
    /// client's own close handshake).
    pub(crate) fn close_after_flush(&self, reply: Option<Vec<u8>>) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        if let Some(r) = reply {
            st.queue.push_back(Frame::Owned(r));
        }
        st.closed = true;
        if flush_locked(&mut st) != Flushed::Blocked {
            shut(&mut st);
        }
    }

    /// Closed, with frames (a close reply, an error) still waiting for a socket that
    /// was full: the event loop keeps writing them until they are out or it stalls.
    pub(crate) fn draining(&self) -> bool {
        let st = self.lock();
        st.closed && !st.shut && !st.queue.is_empty()
    }

    /// Shuts the socket without a word (a dead or too slow peer): the event loop sees
    /// it end and removes the session.
    pub(crate) fn abort(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.queue.clear();
        shut(&mut st);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything queued is written (or nothing could be: closed).
    Done,
    /// The socket is full; wait until it is writable.
    Blocked,
    /// The socket failed: the peer is gone.
    Failed,
}

fn shut(st: &mut State) {
    if st.fd >= 0 && !st.shut {
        // SAFETY: `fd` is owned by `st.owner`, alive while `st` is.
        unsafe { libc::shutdown(st.fd, libc::SHUT_RDWR) };
        st.shut = true;
    }
    st.queue.clear();
}

fn flush_locked(st: &mut State) -> Flushed {
    if st.fd < 0 || st.shut {
        return Flushed::Done;
    }
    let mut progressed = false;
    while !st.queue.is_empty() {
        let mut iov: [libc::iovec; MAX_IOV] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0;
        for (i, f) in st.queue.iter().take(MAX_IOV).enumerate() {
            let b = if i == 0 {
                &f.bytes()[st.offset..]
            } else {
                f.bytes()
            };
            iov[n] = libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            };
            n += 1;
        }
        // SAFETY: a zeroed msghdr is valid; iov points at `n` live buffers that outlive
        // the call (the queue is not touched while the lock is held).
        let written = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n as _;
            libc::sendmsg(st.fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if written < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => {
                    // A stall is counted from the last time the socket took bytes.
                    if progressed || st.blocked_since.is_none() {
                        st.blocked_since = Some(Instant::now());
                    }
                    return Flushed::Blocked;
                }
                std::io::ErrorKind::Interrupted => continue,
                _ => {
                    st.queue.clear();
                    st.closed = true;
                    return Flushed::Failed;
                }
            }
        }
        progressed |= written > 0;
        let mut left = written as usize;
        while left > 0 {
            let Some(front) = st.queue.front() else { break };
            let rest = front.bytes().len() - st.offset;
            if left >= rest {
                left -= rest;
                st.offset = 0;
                st.queue.pop_front();
            } else {
                st.offset += left;
                left = 0;
            }
        }
    }
    st.blocked_since = None;
    if st.closed {
        shut(st);
    }
    Flushed::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_encode_every_length_form() {
        assert_eq!(encode(OP_TEXT, b"hi"), vec![0x81, 2, b'h', b'i']);
        let mid = encode(OP_TEXT, &[0; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 1, 44]);
        assert_eq!(mid.len(), 304);
        let big = encode(OP_TEXT, &[0; 70_000]);
        assert_eq!(&big[..2], &[0x81, 127]);
        assert_eq!(
            u64::from_be_bytes(big[2..10].try_into().expect("8")),
            70_000
        );
        assert_eq!(encode(OP_PING, &[]), vec![0x89, 0]);
    }

    #[test]
    fn queue_is_bounded_and_closed_refuses() {
        let c = Conn::new(2, None);
        assert_eq!(c.send_text("a"), Ok(()));
        assert_eq!(c.send_text("b"), Ok(()));
        assert_eq!(c.send_text("c"), Err(SendError::Full));
        assert_eq!(c.queued(), 2);
        c.abort();
        assert_eq!(c.send_text("d"), Err(SendError::Closed));
    }
}
