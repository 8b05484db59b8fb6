//! The scheduler's hand-off to one slot thread: a queue behind a mutex and a condition
//! variable. A slot waits here between jobs; crossbeam's channel, used before, spun and
//! then called `sched_yield` up to four times before parking on every empty receive:
//! with 20 slots on 2 cores that was about 5% of the server's CPU in the 20-app burst,
//! time other threads needed. A wait here parks at once.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

struct State<T> {
    items: VecDeque<T>,
    /// The sending side was dropped: once the items are taken, `recv` returns None.
    closed: bool,
    /// The receiving side was dropped (its thread ended): `send` fails.
    gone: bool,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here panics while holding the lock; a poisoned lock holds valid state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side (the scheduler's). Dropping it ends the receiver's `recv` loop.
pub(crate) struct Post<T>(Arc<Inner<T>>);

/// The receiving side (the slot thread's).
pub(crate) struct Mailbox<T>(Arc<Inner<T>>);

pub(crate) fn mailbox<T>() -> (Post<T>, Mailbox<T>) {
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            items: VecDeque::new(),
            closed: false,
            gone: false,
        }),
        ready: Condvar::new(),
    });
    (Post(inner.clone()), Mailbox(inner))
}

impl<T> Post<T> {
    /// Leaves `item` for the receiver; gives it back if the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        let mut s = self.0.lock();
        if s.gone {
            return Err(item);
        }
        s.items.push_back(item);
        drop(s);
        self.0.ready.notify_one();
        Ok(())
    }
}

impl<T> Drop for Post<T> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
}

impl<T> Mailbox<T> {
    /// The next item, waiting for one; None once the sender is dropped and all is taken.
    pub fn recv(&self) -> Option<T> {
        let mut s = self.0.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s = self.0.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next item if one is there.
    #[cfg(test)]
    pub fn try_recv(&self) -> Option<T> {
        self.0.lock().items.pop_front()
    }
}

impl<T> Drop for Mailbox<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.gone = true;
        // Items left behind are dropped with the receiver, as a channel's would be.
        s.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_waiting_receiver_gets_what_is_sent_in_order() {
        let (post, mb) = mailbox::<u32>();
        let t = std::thread::spawn(move || {
            let a = mb.recv();
            let b = mb.recv();
            (a, b, mb.recv())
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(post.send(1).is_ok());
        assert!(post.send(2).is_ok());
        drop(post);
        assert_eq!(t.join().ok(), Some((Some(1), Some(2), None)));
    }

    #[test]
    fn sending_to_a_dropped_receiver_gives_the_item_back() {
        let (post, mb) = mailbox::<&str>();
        drop(mb);
        assert_eq!(post.send("job"), Err("job"));
    }

    #[test]
    fn items_sent_before_the_sender_drops_are_still_received() {
        let (post, mb) = mailbox::<u8>();
        assert!(post.send(7).is_ok());
        drop(post);
        assert_eq!(mb.try_recv(), Some(7));
        assert_eq!(mb.recv(), None);
    }
}
