//! A worker-local shutdown signal: a flag plus the wakers of every task waiting on it. Owned by
//! one worker thread, so no atomics and no locks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// The signal; clone the `Rc` to share it among a worker's tasks.
#[derive(Default)]
pub struct LocalShutdown {
    fired: Cell<bool>,
    next: Cell<u64>,
    waiters: RefCell<HashMap<u64, Waker>>,
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
        for (_, w) in waiters {
            w.wake();
        }
    }

    /// A future that completes once shutdown has begun.
    pub fn wait(self: &Rc<Self>) -> ShutdownWait {
        ShutdownWait {
            signal: self.clone(),
            key: None,
        }
    }
}

/// Completes when the worker starts shutting down.
pub struct ShutdownWait {
    signal: Rc<LocalShutdown>,
    key: Option<u64>,
}

impl Future for ShutdownWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(k) => k,
            None => {
                let k = self.signal.next.get();
                self.signal.next.set(k + 1);
                self.key = Some(k);
                k
            }
        };
        self.signal
            .waiters
            .borrow_mut()
            .insert(key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for ShutdownWait {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            self.signal.waiters.borrow_mut().remove(&k);
        }
    }
}
