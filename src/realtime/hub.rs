//! The hub: which sessions each app has and which channels they subscribe to, plus
//! per-(app, channel) listener counters the worker pool reads without taking a lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::conn::{text_frame, Conn, Frame, SendError};

/// Listener counters by (app, channel). A reader fetches a counter once (one read lock)
/// and then loads it atomically forever after.
#[derive(Default)]
pub struct Listeners {
    map: RwLock<HashMap<(String, String), Arc<AtomicUsize>>>,
}

impl Listeners {
    /// The counter for (app, channel), created at zero if new.
    pub fn counter(&self, app: &str, channel: &str) -> Arc<AtomicUsize> {
        let key = (app.to_string(), channel.to_string());
        if let Some(c) = self.map.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return c.clone();
        }
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// Lowers the counter of (app, channel), dropping the entry once nobody listens and
    /// nobody else (an idle-watching job) holds the counter, so the map stays as small
    /// as the set of channels in use.
    fn decrement(&self, app: &str, channel: &str) {
        let key = (app.to_string(), channel.to_string());
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            let left = c.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
            if left == 0 && Arc::strong_count(c) == 1 {
                map.remove(&key);
            }
        }
    }

    /// Gives back a counter fetched with [`counter`](Self::counter) (an idle-watching
    /// job ended): the entry goes if nobody listens and nobody else holds it.
    pub fn release(&self, app: &str, channel: &str, counter: Arc<AtomicUsize>) {
        drop(counter);
        let key = (app.to_string(), channel.to_string());
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&key)
            .is_some_and(|c| c.load(Ordering::Relaxed) == 0 && Arc::strong_count(c) == 1)
        {
            map.remove(&key);
        }
    }

    fn increment(&self, app: &str, channel: &str) {
        self.counter(app, channel).fetch_add(1, Ordering::Relaxed);
    }

    /// Entries in the map (for tests of its clean-up).
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn count(&self, app: &str, channel: &str) -> usize {
        let key = (app.to_string(), channel.to_string());
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

pub(crate) struct SessionHandle {
    pub id: String,
    /// Where its frames are queued; closing it ends the session in the event loop.
    pub conn: Arc<Conn>,
    pub channels: HashSet<String>,
    pub ip: std::net::IpAddr,
}

#[derive(Default)]
struct AppHub {
    sessions: HashMap<u64, SessionHandle>,
    channels: HashMap<String, HashSet<u64>>,
}

/// All apps' sessions. One mutex guards membership; broadcasts hold it only to copy
/// out the recipients' connections, never while writing to a socket.
pub struct Hub {
    apps: Mutex<HashMap<String, AppHub>>,
    /// Open connections per client IP, for the per-IP cap.
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    listeners: Arc<Listeners>,
    /// Internal session keys; never shown to apps (client ids are random, see `join`).
    next_id: AtomicU64,
    pub broadcasts: AtomicU64,
    pub deliveries: AtomicU64,
    pub dropped_slow: AtomicU64,
    pub limits: HubLimits,
    /// The WebSocket event loop, started by the first upgrade.
    event_loop: Mutex<Option<Arc<super::event_loop::Shared>>>,
}

#[derive(Debug, Clone)]
pub struct HubLimits {
    pub per_app: usize,
    pub per_ip: usize,
    pub channels_per_session: usize,
    /// Messages a session may have waiting; a client that falls this far behind is
    /// disconnected rather than silently starved.
    pub queue: usize,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            per_app: 5000,
            per_ip: 1000,
            channels_per_session: 100,
            queue: 1024,
        }
    }
}

/// Largest broadcast payload (JSON text).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

impl Hub {
    pub fn new(listeners: Arc<Listeners>, limits: HubLimits) -> Hub {
        Hub {
            apps: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            listeners,
            next_id: AtomicU64::new(1),
            broadcasts: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            dropped_slow: AtomicU64::new(0),
            limits,
            event_loop: Mutex::new(None),
        }
    }

    /// The event loop serving this hub's sessions, started on first use.
    pub(crate) fn event_loop(
        &self,
        env: &Arc<dyn super::Env>,
    ) -> std::io::Result<Arc<super::event_loop::Shared>> {
        let mut l = self.event_loop.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = &*l {
            return Ok(shared.clone());
        }
        let shared = super::event_loop::start(env.clone())?;
        *l = Some(shared.clone());
        Ok(shared)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AppHub>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session, or refuses it when the app or the IP is at its cap.
    pub(crate) fn join(
        &self,
        app: &str,
        ip: std::net::IpAddr,
        conn: Arc<Conn>,
    ) -> Result<(u64, String), String> {
        let mut apps = self.lock();
        // Lock order: `apps`, then `per_ip`.
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.per_ip {
            return Err(format!(
                "too many WebSocket connections from {ip} (limit {})",
                self.limits.per_ip
            ));
        }
        let hub = apps.entry(app.to_string()).or_default();
        if hub.sessions.len() >= self.limits.per_app {
            return Err(format!(
                "too many WebSocket connections to app '{app}' (limit {})",
                self.limits.per_app
            ));
        }
        *per_ip.entry(ip).or_insert(0) += 1;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = client_id(n);
        hub.sessions.insert(
            n,
            SessionHandle {
                id: id.clone(),
                conn,
                channels: HashSet::new(),
                ip,
            },
        );
        Ok((n, id))
    }

    /// Closes every session of `app` (it is being removed) and forgets its channels,
    /// so none of its clients hears what a new app of the same name broadcasts.
    pub fn close_app(&self, app: &str) {
        let mut apps = self.lock();
        let Some(hub) = apps.remove(app) else {
            return;
        };
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        for s in hub.sessions.into_values() {
            if let Some(n) = per_ip.get_mut(&s.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&s.ip);
                }
            }
            s.conn.close("app removed");
            for ch in s.channels {
                self.listeners.decrement(app, &ch);
            }
        }
    }

    pub(crate) fn leave(&self, app: &str, session: u64) {
        let mut apps = self.lock();
        let Some(hub) = apps.get_mut(app) else {
            return;
        };
        if let Some(s) = hub.sessions.remove(&session) {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per_ip.get_mut(&s.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&s.ip);
                }
            }
            drop(per_ip);
            // A connection still writing its last frames (a close reply) is the event
            // loop's to end once they are out; any other is cut now.
            if !s.conn.draining() {
                s.conn.abort();
            }
            for ch in s.channels {
                if let Some(set) = hub.channels.get_mut(&ch) {
                    set.remove(&session);
                    if set.is_empty() {
                        hub.channels.remove(&ch);
                    }
                }
                self.listeners.decrement(app, &ch);
            }
        }
        if hub.sessions.is_empty() {
            apps.remove(app);
        }
    }

    pub fn subscribe(&self, app: &str, session: u64, channel: &str) -> Result<(), String> {
        let mut apps = self.lock();
        let Some(hub) = apps.get_mut(app) else {
            return Err("session is closed".into());
        };
        let Some(s) = hub.sessions.get_mut(&session) else {
            return Err("session is closed".into());
        };
        if s.channels.contains(channel) {
            return Ok(());
        }
        if s.channels.len() >= self.limits.channels_per_session {
            return Err(format!(
                "too many subscriptions (limit {} channels per connection)",
                self.limits.channels_per_session
            ));
        }
        s.channels.insert(channel.to_string());
        hub.channels
            .entry(channel.to_string())
            .or_default()
            .insert(session);
        self.listeners.increment(app, channel);
        Ok(())
    }

    pub(crate) fn unsubscribe(&self, app: &str, session: u64, channel: &str) {
        let mut apps = self.lock();
        let Some(hub) = apps.get_mut(app) else {
            return;
        };
        let removed = hub
            .sessions
            .get_mut(&session)
            .is_some_and(|s| s.channels.remove(channel));
        if removed {
            if let Some(set) = hub.channels.get_mut(channel) {
                set.remove(&session);
                if set.is_empty() {
                    hub.channels.remove(channel);
                }
            }
            self.listeners.decrement(app, channel);
        }
    }

    /// Sends `data` (JSON text) to the channel's subscribers, or with `channel` None to
    /// every session of the app. Returns how many sessions it was queued for.
    pub fn broadcast(&self, app: &str, channel: Option<&str>, data: &str) -> Result<usize, String> {
        if data.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "message is {} bytes; the limit is {} KB",
                data.len(),
                MAX_MESSAGE_BYTES >> 10
            ));
        }
        let ts = crate::store::now_ms();
        let ch_json = match channel {
            Some(c) => serde_json::Value::String(c.to_string()).to_string(),
            None => "null".to_string(),
        };
        let text = format!(
            "{{\"type\":\"message\",\"channel\":{ch_json},\"data\":{data},\"timestamp\":{ts}}}"
        );
        // Framed once, shared by every recipient.
        let frame: Arc<[u8]> = Arc::from(text_frame(&text));
        let recipients: Vec<(u64, Arc<Conn>)> = {
            let apps = self.lock();
            let Some(hub) = apps.get(app) else {
                self.broadcasts.fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            };
            match channel {
                Some(c) => hub
                    .channels
                    .get(c)
                    .map(|set| {
                        set.iter()
                            .filter_map(|id| hub.sessions.get(id).map(|s| (*id, s.conn.clone())))
                            .collect()
                    })
                    .unwrap_or_default(),
                None => hub
                    .sessions
                    .iter()
                    .map(|(id, s)| (*id, s.conn.clone()))
                    .collect(),
            }
        };
        self.broadcasts.fetch_add(1, Ordering::Relaxed);
        let mut sent = 0;
        for (id, conn) in recipients {
            match conn.send(Frame::Shared(frame.clone())) {
                Ok(()) => sent += 1,
                Err(SendError::Full) => {
                    // Too far behind: drop it so it reconnects, instead of starving it.
                    self.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    log::warn!("app {app}: disconnecting a slow WebSocket client (queue full)");
                    self.leave(app, id);
                }
                Err(SendError::Closed) => self.leave(app, id),
            }
        }
        self.deliveries.fetch_add(sent as u64, Ordering::Relaxed);
        Ok(sent)
    }

    pub fn connections(&self, app: &str) -> usize {
        self.lock().get(app).map_or(0, |h| h.sessions.len())
    }

    pub fn total_connections(&self) -> usize {
        self.lock().values().map(|h| h.sessions.len()).sum()
    }

    pub fn subscribers(&self, app: &str, channel: &str) -> Vec<String> {
        let apps = self.lock();
        let Some(hub) = apps.get(app) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = hub
            .channels
            .get(channel)
            .map(|set| {
                set.iter()
                    .filter_map(|id| hub.sessions.get(id).map(|s| s.id.clone()))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Closes every session (server shutdown).
    pub fn close_all(&self) {
        let apps = self.lock();
        for hub in apps.values() {
            for s in hub.sessions.values() {
                s.conn.close("server shutting down");
            }
        }
    }
}

/// A client id as apps see it (`fazt.realtime.subscribers`): random, so it says
/// nothing about how many clients this or any other app has had. Falls back to the
/// session key mixed with the clock only without an entropy source.
fn client_id(n: u64) -> String {
    let mut rnd = [0u8; 8];
    if getrandom::fill(&mut rnd).is_err() {
        rnd = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ crate::store::now_ms() as u64).to_le_bytes();
    }
    let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    format!("c{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> std::net::IpAddr {
        std::net::IpAddr::from([127, 0, 0, 1])
    }

    #[test]
    fn counts_follow_subscriptions() {
        let l = Arc::new(Listeners::default());
        let hub = Hub::new(l.clone(), HubLimits::default());
        let tx = Conn::new(8, None);
        let (s, _) = hub.join("a", ip(), tx.clone()).expect("join");
        hub.subscribe("a", s, "c").expect("subscribe");
        hub.subscribe("a", s, "c").expect("idempotent");
        assert_eq!(l.count("a", "c"), 1);
        assert_eq!(l.count("b", "c"), 0, "apps are separate");
        assert_eq!(hub.broadcast("a", Some("c"), "1"), Ok(1));
        assert_eq!(hub.broadcast("b", Some("c"), "1"), Ok(0));
        assert_eq!(tx.queued(), 1);
        hub.unsubscribe("a", s, "c");
        assert_eq!(l.count("a", "c"), 0);
        hub.subscribe("a", s, "c").expect("subscribe");
        hub.leave("a", s);
        assert_eq!(l.count("a", "c"), 0);
        assert!(l.is_empty(), "unused channels leave the map");
    }

    #[test]
    fn counters_held_by_a_watcher_survive_an_empty_channel() {
        let l = Arc::new(Listeners::default());
        let hub = Hub::new(l.clone(), HubLimits::default());
        let watched = l.counter("a", "c");
        let tx = Conn::new(8, None);
        let (s, _) = hub.join("a", ip(), tx.clone()).expect("join");
        hub.subscribe("a", s, "c").expect("subscribe");
        assert_eq!(watched.load(Ordering::Relaxed), 1);
        hub.leave("a", s);
        assert_eq!(watched.load(Ordering::Relaxed), 0);
        let tx = Conn::new(8, None);
        let (s, _) = hub.join("a", ip(), tx.clone()).expect("join");
        hub.subscribe("a", s, "c").expect("subscribe");
        assert_eq!(
            watched.load(Ordering::Relaxed),
            1,
            "the watcher sees the new listener"
        );
    }

    #[test]
    fn full_queue_disconnects() {
        let l = Arc::new(Listeners::default());
        let hub = Hub::new(
            l.clone(),
            HubLimits {
                queue: 1,
                ..HubLimits::default()
            },
        );
        let tx = Conn::new(1, None);
        let (s, _) = hub.join("a", ip(), tx.clone()).expect("join");
        hub.subscribe("a", s, "c").expect("subscribe");
        assert_eq!(hub.broadcast("a", Some("c"), "1"), Ok(1));
        assert_eq!(hub.broadcast("a", Some("c"), "2"), Ok(0));
        assert_eq!(hub.connections("a"), 0);
        assert_eq!(l.count("a", "c"), 0);
    }

    #[test]
    fn close_app_ends_sessions_and_counts() {
        let l = Arc::new(Listeners::default());
        let hub = Hub::new(l.clone(), HubLimits::default());
        let tx = Conn::new(8, None);
        let (s, _) = hub.join("a", ip(), tx.clone()).expect("join");
        hub.subscribe("a", s, "c").expect("subscribe");
        let tx_b = Conn::new(8, None);
        hub.join("b", ip(), tx_b).expect("join b");
        hub.close_app("a");
        assert_eq!(tx.send_text("late"), Err(SendError::Closed), "closed");
        assert_eq!(hub.connections("a"), 0);
        assert_eq!(hub.connections("b"), 1, "other apps keep theirs");
        assert_eq!(l.count("a", "c"), 0);
        assert_eq!(hub.broadcast("a", Some("c"), "1"), Ok(0));
        hub.leave("a", s);
        assert_eq!(hub.total_connections(), 1);
    }

    #[test]
    fn client_ids_are_not_a_counter() {
        let hub = Hub::new(Arc::default(), HubLimits::default());
        let tx = Conn::new(1, None);
        let (_, a) = hub.join("a", ip(), tx.clone()).expect("a");
        let (_, b) = hub.join("a", ip(), tx.clone()).expect("b");
        assert_ne!(a, b);
        assert_eq!(a.len(), 17, "{a}");
        assert!(a != "c1" && b != "c2", "{a} {b}");
    }

    #[test]
    fn caps_refuse() {
        let hub = Hub::new(
            Arc::default(),
            HubLimits {
                per_ip: 1,
                ..HubLimits::default()
            },
        );
        let tx = Conn::new(1, None);
        hub.join("a", ip(), tx.clone()).expect("first");
        assert!(hub.join("b", ip(), tx.clone()).is_err());
    }
}
