//! The one thread that serves every WebSocket session: an epoll loop over the sessions'
//! non-blocking sockets (edge-triggered). It reads client frames, writes the frames
//! queued on connections (broadcasters only queue and wake it once per batch, so a
//! burst goes out as few large writes), and once a second sends due pings and drops
//! peers that are silent or stopped reading. Sessions cost no thread and no stack.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conn::{Conn, Flushed};
use super::session::{Readable, Session};
use super::Env;

/// The epoll token of the wake-up eventfd; sessions use their hub key.
const WAKE: u64 = u64::MAX;
/// How often pings, silence and stalled writes are checked.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A socket that takes no bytes for this long is cut off (a blocking writer's timeout
/// before).
const WRITE_STALL: Duration = Duration::from_secs(10);
/// At most this many ended sessions still write their last frames (a close reply, an
/// error) to a full socket; past it, an ended session's socket is cut at once.
const CLOSING_MAX: usize = 64;
/// An ended session's last frames get at most this long, even from a peer that keeps
/// reading slowly.
const CLOSING_LIMIT: Duration = Duration::from_secs(30);

/// What the rest of the server holds of the loop: where to queue new sessions and
/// connections with frames to write.
pub(crate) struct Shared {
    epfd: RawFd,
    efd: RawFd,
    dirty: Mutex<Vec<Arc<Conn>>>,
    incoming: Mutex<Vec<Session>>,
}

impl Shared {
    /// Marks `conn` as having frames to write; wakes the loop once per batch.
    pub(crate) fn schedule(&self, conn: Arc<Conn>) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let first = d.is_empty();
        d.push(conn);
        drop(d);
        if first {
            self.wake();
        }
    }

    /// Hands a new session to the loop.
    pub(crate) fn register(&self, s: Session) {
        self.incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
        self.wake();
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter
        // (EAGAIN) already means a pending wake-up.
        unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Starts the loop thread.
pub(crate) fn start(env: Arc<dyn Env>) -> std::io::Result<Arc<Shared>> {
    // SAFETY: plain syscalls; results checked.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: closing our own epoll descriptor.
        unsafe { libc::close(epfd) };
        return Err(e);
    }
    let shared = Arc::new(Shared {
        epfd,
        efd,
        dirty: Mutex::new(Vec::new()),
        incoming: Mutex::new(Vec::new()),
    });
    ctl(epfd, libc::EPOLL_CTL_ADD, efd, WAKE, libc::EPOLLIN as u32)?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("fazt-ws-loop".into())
        .spawn(move || run(&s, &*env))?;
    Ok(shared)
}

fn ctl(epfd: RawFd, op: i32, fd: RawFd, token: u64, events: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event; a bad fd only returns an error.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const SESSION_EVENTS: u32 = (libc::EPOLLIN
    | libc::EPOLLOUT
    | libc::EPOLLRDHUP
    | libc::EPOLLERR
    | libc::EPOLLHUP
    | libc::EPOLLET) as u32;

struct Loop<'a> {
    shared: &'a Shared,
    env: &'a dyn Env,
    sessions: HashMap<u64, Session>,
    /// Sessions that stopped reading at their per-turn budget with input left (edge
    /// triggering reports no new edge for it): read again next turn.
    again: Vec<u64>,
    /// Ended sessions whose last frames (a close reply, an error) wait for a full
    /// socket: still watched for writability until written, failed or stalled.
    closing: HashMap<u64, Closing>,
}

struct Closing {
    conn: Arc<Conn>,
    fd: RawFd,
    since: Instant,
}

fn run(shared: &Shared, env: &dyn Env) {
    let mut lp = Loop {
        shared,
        env,
        sessions: HashMap::new(),
        again: Vec::new(),
        closing: HashMap::new(),
    };
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        let timeout = if lp.again.is_empty() {
            next_sweep
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(1000) as i32
        } else {
            0
        };
        // SAFETY: `events` has room for its length.
        let n = unsafe {
            libc::epoll_wait(
                shared.epfd,
                events.as_mut_ptr(),
                events.len() as i32,
                timeout,
            )
        };
        let n = if n < 0 { 0 } else { n as usize };
        for ev in &events[..n] {
            let (token, bits) = (ev.u64, ev.events);
            if token == WAKE {
                let mut buf = 0u64;
                // SAFETY: reads 8 bytes into a live u64 (resets the counter).
                unsafe { libc::read(shared.efd, &mut buf as *mut u64 as *mut libc::c_void, 8) };
                continue;
            }
            if lp.closing.contains_key(&token) {
                lp.drain(token, bits);
                continue;
            }
            if bits & libc::EPOLLOUT as u32 != 0 {
                lp.flush(token);
            }
            let input = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
            if bits & input != 0 {
                lp.read(token);
            }
        }
        for token in std::mem::take(&mut lp.again) {
            lp.read(token);
        }
        lp.take_incoming();
        lp.flush_dirty();
        if Instant::now() >= next_sweep {
            lp.sweep();
            next_sweep = Instant::now() + SWEEP_EVERY;
        }
    }
}

impl Loop<'_> {
    fn take_incoming(&mut self) {
        let new = std::mem::take(
            &mut *self
                .shared
                .incoming
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for s in new {
            let token = s.id;
            if let Err(e) = ctl(
                self.shared.epfd,
                libc::EPOLL_CTL_ADD,
                s.fd,
                token,
                SESSION_EVENTS,
            ) {
                log::error!("cannot watch a WebSocket session: {e}");
                self.env.hub().leave(&s.app, s.id);
                s.conn.abort();
                continue;
            }
            self.sessions.insert(token, s);
            // Bytes the client sent with or right after its handshake may already wait.
            self.again.push(token);
        }
    }

    fn flush_dirty(&mut self) {
        let dirty =
            std::mem::take(&mut *self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        for c in dirty {
            // A failed socket is found by its session's next read (EPOLLERR/HUP).
            let _ = c.flush();
        }
    }

    fn flush(&mut self, token: u64) {
        if let Some(s) = self.sessions.get(&token) {
            if s.conn.flush() == Flushed::Failed {
                self.remove(token);
            }
        }
    }

    fn read(&mut self, token: u64) {
        let Some(s) = self.sessions.get_mut(&token) else {
            return;
        };
        let env = self.env;
        // One session's bug must not end the loop every session of every app shares.
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.on_readable(env)));
        match turn {
            Ok(Readable::Drained) => {}
            Ok(Readable::More) => self.again.push(token),
            Ok(Readable::Gone) => self.remove(token),
            Err(_) => {
                log::error!("a WebSocket session panicked while reading; closing it");
                self.remove(token);
            }
        }
    }

    fn remove(&mut self, token: u64) {
        let Some(s) = self.sessions.remove(&token) else {
            return;
        };
        self.env.hub().leave(&s.app, s.id);
        if s.conn.draining() && self.closing.len() < CLOSING_MAX {
            // A close reply or error still waits for the socket: keep writing it (the
            // sweep cuts it off if the peer stops reading). Such a socket no longer
            // counts in the per-client caps, hence the bound on how many there are.
            self.closing.insert(
                token,
                Closing {
                    conn: s.conn.clone(),
                    fd: s.fd,
                    since: Instant::now(),
                },
            );
            return;
        }
        // Unwatched before the descriptor can close (it closes when the connection's
        // last handle drops, after this).
        let _ = ctl(self.shared.epfd, libc::EPOLL_CTL_DEL, s.fd, token, 0);
        s.conn.abort();
    }

    /// An event on a closing connection: write what waits; end it once written, on an
    /// error or hang-up.
    fn drain(&mut self, token: u64, bits: u32) {
        let Some(c) = self.closing.get(&token) else {
            return;
        };
        let hung_up = bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        if !hung_up && c.conn.flush() != Flushed::Failed && c.conn.draining() {
            return;
        }
        self.end_closing(token);
    }

    fn end_closing(&mut self, token: u64) {
        if let Some(c) = self.closing.remove(&token) {
            let _ = ctl(self.shared.epfd, libc::EPOLL_CTL_DEL, c.fd, token, 0);
            c.conn.abort();
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let gone: Vec<u64> = self
            .sessions
            .iter_mut()
            .filter_map(|(token, s)| {
                if s.conn
                    .blocked_since()
                    .is_some_and(|t| now - t > WRITE_STALL)
                {
                    log::info!("dropping a WebSocket peer that stopped reading");
                    return Some(*token);
                }
                (!s.tick(now)).then_some(*token)
            })
            .collect();
        for token in gone {
            self.remove(token);
        }
        let stalled: Vec<u64> = self
            .closing
            .iter()
            .filter(|(_, c)| {
                now - c.since > CLOSING_LIMIT
                    || c.conn
                        .blocked_since()
                        .is_some_and(|t| now - t > WRITE_STALL)
            })
            .map(|(token, _)| *token)
            .collect();
        for token in stalled {
            self.end_closing(token);
        }
    }
}
