//! A worker-local shutdown signal: a flag plus the wakers of every task waiting on it. Owned by
//! one worker thread, so no atomics and no locks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// The signal; clone the `Rc` to share it among a worker's tasks.
#[derive(Default)]
pub struct LocalShutdown {
    fired: Cell<bool>,
    /// The waiting tasks' wakers, by slot (a slab: every request's between-request wait
    /// registers here, and a slot index costs less than hashing a key).
    waiters: RefCell<Slots>,
}

/// Waker slots and the indices of the free ones.
#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl LocalShutdown {
    /// A new, unfired signal.
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// Whether shutdown has begun.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Begins shutdown, waking every waiter.
    pub fn fire(&self) {
        self.fired.set(true);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters.wakers.into_iter().flatten() {
            w.wake();
        }
    }

    /// A future that completes once shutdown has begun.
    pub fn wait(self: &Rc<Self>) -> ShutdownWait {
        ShutdownWait {
            signal: self.clone(),
            slot: None,
        }
    }
}

/// Completes when the worker starts shutting down.
pub struct ShutdownWait {
    signal: Rc<LocalShutdown>,
    slot: Option<usize>,
}

impl Future for ShutdownWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        let slot = match self.slot {
            Some(slot) => slot,
            None => {
                let slot = waiters.free.pop().unwrap_or_else(|| {
                    waiters.wakers.push(None);
                    waiters.wakers.len() - 1
                });
                drop(waiters);
                self.slot = Some(slot);
                waiters = self.signal.waiters.borrow_mut();
                slot
            }
        };
        match &mut waiters.wakers[slot] {
            Some(w) if w.will_wake(cx.waker()) => {}
            other => *other = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for ShutdownWait {
    fn drop(&mut self) {
        // After `fire` the slots are gone (and none is handed out again): nothing to free.
        if let Some(slot) = self.slot {
            let mut waiters = self.signal.waiters.borrow_mut();
            if let Some(w) = waiters.wakers.get_mut(slot) {
                *w = None;
                waiters.free.push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn fire_wakes_every_live_waiter_once_and_dropped_slots_are_reused() {
        let signal = LocalShutdown::new();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut waits: Vec<_> = (0..4).map(|_| Box::pin(signal.wait())).collect();
        for w in &mut waits {
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        // Two leave; two new ones take their slots rather than growing the slab.
        waits.truncate(2);
        for _ in 0..2 {
            let mut w = Box::pin(signal.wait());
            assert!(w.as_mut().poll(&mut cx).is_pending());
            waits.push(w);
        }
        assert_eq!(signal.waiters.borrow().wakers.len(), 4);
        // Polling again keeps one slot per wait.
        assert!(waits[0].as_mut().poll(&mut cx).is_pending());
        assert_eq!(signal.waiters.borrow().wakers.len(), 4);
        signal.fire();
        assert_eq!(count.0.load(Ordering::Relaxed), 4);
        assert!(
            waits
                .iter_mut()
                .all(|w| w.as_mut().poll(&mut cx).is_ready())
        );
        // Waits dropped after the fire touch nothing, and new ones are ready at once.
        drop(waits);
        assert!(Box::pin(signal.wait()).as_mut().poll(&mut cx).is_ready());
    }
}
