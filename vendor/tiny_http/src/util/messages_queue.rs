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

    fn deliver(&self, item: Control<T>) {
        let mut state = lock(&self.state);
        match state.waiters.pop() {
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
        self.deliver(Control::Elem(value));
    }

    /// Unblock one thread stuck in pop loop.
    pub fn unblock(&self) {
        self.deliver(Control::Unblock);
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
        self.pop_until(None)
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
        self.pop_until(Some(Instant::now() + timeout))
    }

    fn pop_until(&self, deadline: Option<Instant>) -> Option<T> {
        let waiter = {
            let mut state = lock(&self.state);
            if let Some(item) = state.queue.pop_front() {
                return Self::unpack(item);
            }
            let waiter = Arc::new(Waiter {
                slot: Mutex::new(None),
                ready: Condvar::new(),
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
