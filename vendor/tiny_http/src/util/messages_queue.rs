use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

enum Control<T> {
    Elem(T),
    Unblock,
}

/// The queue of requests between connection threads and the application's threads.
///
/// fazt patch: an element pushed while threads wait goes straight to the thread that
/// began waiting last (a stack of waiters, not the condvar's FIFO wake-up). The most
/// recently busy thread is the one whose stack, caches and per-thread state (fazt: a
/// warm JavaScript context per app) are hot; a FIFO wake-up rotated every request
/// through all application threads, so all of them built and kept such state (16 warm
/// contexts where 2 or 3 do the work) and each request met cold caches.
pub struct MessagesQueue<T>
where
    T: Send,
{
    state: Mutex<State<T>>,
}

struct State<T> {
    queue: VecDeque<Control<T>>,
    /// Threads blocked in `pop`/`pop_timeout`, the one that began waiting last at
    /// the end.
    waiters: Vec<Arc<Waiter<T>>>,
}

/// One waiting thread: what it is handed, and how it is woken.
struct Waiter<T> {
    slot: Mutex<Option<Control<T>>>,
    ready: Condvar,
    /// fazt patch: the affinity keys of what this thread holds warm (fazt: the Host
    /// of each app whose JavaScript context it keeps), and whether it has room for
    /// more. See [`MessagesQueue::push_keyed`].
    keys: Vec<u64>,
    room: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every critical
    // section is a push or a pop): go on with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> MessagesQueue<T>
where
    T: Send,
{
    pub fn with_capacity(capacity: usize) -> Arc<MessagesQueue<T>> {
        Arc::new(MessagesQueue {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity),
                waiters: Vec::new(),
            }),
        })
    }

    fn deliver(&self, item: Control<T>, key: Option<u64>) {
        let mut state = lock(&self.state);
        // fazt patch: a keyed element goes to the waiter that waited last among those
        // holding its key, else among those with room, else to the one that waited last.
        let pick = key
            .and_then(|k| state.waiters.iter().rposition(|w| w.keys.contains(&k)))
            .or_else(|| key.and_then(|_| state.waiters.iter().rposition(|w| w.room)));
        let waiter = match pick {
            Some(i) => Some(state.waiters.remove(i)),
            None => state.waiters.pop(),
        };
        match waiter {
            Some(waiter) => {
                drop(state);
                *lock(&waiter.slot) = Some(item);
                waiter.ready.notify_one();
            }
            None => state.queue.push_back(item),
        }
    }

    /// Pushes an element to the queue.
    pub fn push(&self, value: T) {
        self.deliver(Control::Elem(value), None);
    }

    /// fazt patch: pushes an element with an affinity key. A waiting thread that holds
    /// the key gets it (its warm state for the key is reused), else one that has room
    /// (so a thread that is full does not drop some other key's state for it), else the
    /// thread that waited last. Waiters say what they hold in [`pop_for`](Self::pop_for).
    pub fn push_keyed(&self, value: T, key: u64) {
        self.deliver(Control::Elem(value), Some(key));
    }

    /// Unblock one thread stuck in pop loop.
    pub fn unblock(&self) {
        self.deliver(Control::Unblock, None);
    }

    fn unpack(item: Control<T>) -> Option<T> {
        match item {
            Control::Elem(value) => Some(value),
            Control::Unblock => None,
        }
    }

    /// Pops an element. Blocks until one is available.
    /// Returns None in case unblock() was issued.
    pub fn pop(&self) -> Option<T> {
        self.pop_until(None, Vec::new(), true)
    }

    /// fazt patch: pops an element, waiting until `deadline` (None: no limit), as a
    /// thread holding `keys` with `room` for more (see [`push_keyed`](Self::push_keyed)).
    pub fn pop_for(&self, deadline: Option<Instant>, keys: Vec<u64>, room: bool) -> Option<T> {
        self.pop_until(deadline, keys, room)
    }

    /// Tries to pop an element without blocking.
    pub fn try_pop(&self) -> Option<T> {
        match lock(&self.state).queue.pop_front() {
            Some(Control::Elem(value)) => Some(value),
            Some(Control::Unblock) | None => None,
        }
    }

    /// Tries to pop an element without blocking
    /// more than the specified timeout duration
    /// or unblock() was issued
    pub fn pop_timeout(&self, timeout: Duration) -> Option<T> {
        self.pop_until(Some(Instant::now() + timeout), Vec::new(), true)
    }

    fn pop_until(&self, deadline: Option<Instant>, keys: Vec<u64>, room: bool) -> Option<T> {
        let waiter = {
            let mut state = lock(&self.state);
            if let Some(item) = state.queue.pop_front() {
                return Self::unpack(item);
            }
            let waiter = Arc::new(Waiter {
                slot: Mutex::new(None),
                ready: Condvar::new(),
                keys,
                room,
            });
            state.waiters.push(waiter.clone());
            waiter
        };
        let mut slot = lock(&waiter.slot);
        loop {
            if let Some(item) = slot.take() {
                return Self::unpack(item);
            }
            match deadline {
                None => slot = waiter.ready.wait(slot).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    slot = waiter
                        .ready
                        .wait_timeout(slot, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        // Timed out: leave the stack, unless a push already took this waiter off it
        // (then its item is in the slot, or about to be: wait for it).
        drop(slot);
        let mut state = lock(&self.state);
        if let Some(i) = state.waiters.iter().position(|w| Arc::ptr_eq(w, &waiter)) {
            state.waiters.remove(i);
            return None;
        }
        drop(state);
        let mut slot = lock(&waiter.slot);
        loop {
            if let Some(item) = slot.take() {
                return Self::unpack(item);
            }
            slot = waiter.ready.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MessagesQueue;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn the_thread_that_waited_last_gets_the_next_element() {
        let q = MessagesQueue::<u32>::with_capacity(8);
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        for id in 0..3u32 {
            let (q2, tx) = (q.clone(), tx.clone());
            handles.push(std::thread::spawn(move || {
                while let Some(v) = q2.pop() {
                    tx.send((id, v)).unwrap();
                }
            }));
            // Wait until this thread is parked before starting the next one.
            while super::lock(&q.state).waiters.len() < id as usize + 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for v in 0..5 {
            q.push(v);
            let (id, got) = rx.recv().unwrap();
            assert_eq!((id, got), (2, v), "the last thread to wait serves every element");
            while super::lock(&q.state).waiters.len() < 3 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for _ in 0..3 {
            q.unblock();
        }
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_keyed_element_goes_to_the_waiter_holding_its_key_else_one_with_room() {
        let q = MessagesQueue::<u32>::with_capacity(8);
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        // Thread 0 holds key 7 and is full; 1 holds 9 and has room; 2 is full, no 7.
        let waiters: Vec<(Vec<u64>, bool)> = vec![(vec![7], false), (vec![9], true), (vec![8], false)];
        for (id, (keys, room)) in waiters.into_iter().enumerate() {
            let (q2, tx) = (q.clone(), tx.clone());
            handles.push(std::thread::spawn(move || {
                while let Some(v) = q2.pop_for(None, keys.clone(), room) {
                    tx.send((id, v)).unwrap();
                }
            }));
            while super::lock(&q.state).waiters.len() < id + 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let settle = |n: usize| {
            while super::lock(&q.state).waiters.len() < n {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // Held by thread 0, though thread 2 waited last.
        q.push_keyed(1, 7);
        assert_eq!(rx.recv().unwrap(), (0, 1));
        settle(3);
        // Held by no one: thread 1 has room; thread 0 and 2 would drop a warm key.
        q.push_keyed(2, 5);
        assert_eq!(rx.recv().unwrap(), (1, 2));
        settle(3);
        // Unkeyed: the thread that waited last (1, back on top after its element).
        q.push(3);
        assert_eq!(rx.recv().unwrap(), (1, 3));
        settle(3);
        for _ in 0..3 {
            q.unblock();
        }
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn elements_queue_when_no_one_waits_and_timeouts_leave_the_stack() {
        let q = MessagesQueue::<u32>::with_capacity(8);
        q.push(1);
        q.push(2);
        assert_eq!(q.try_pop(), Some(1));
        assert_eq!(q.pop_timeout(Duration::from_millis(1)), Some(2));
        assert_eq!(q.pop_timeout(Duration::from_millis(5)), None);
        assert!(super::lock(&q.state).waiters.is_empty());
        q.push(3);
        assert_eq!(q.pop(), Some(3));
    }
}
