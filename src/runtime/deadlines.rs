//! Thread-local deadlines for the request path's waits and timeouts (a connection idle between
//! requests, a head or body read, an upstream exchange, a reply write): one monoio timer per
//! worker thread serves all of them.
//!
//! monoio's own `Sleep` is 640 bytes and 128-byte aligned (its entry is padded against false
//! sharing with other threads, which a thread-per-core worker never has), and it made up most
//! of what an idle connection's task cost. A wait here holds a pointer, an instant and a key;
//! its entry in the worker's ordered map holds the instant, the key and the task's waker.
//! Owned by one worker thread, so no atomics and no locks.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// This thread's set (see [`local`]).
    static LOCAL: RefCell<Option<Rc<Deadlines>>> = const { RefCell::new(None) };
}

/// This thread's deadlines. The first use on a monoio runtime starts their firing task on it,
/// so any code on a worker can bound a wait. Must be called from within a monoio runtime; a
/// thread that runs one runtime after another calls [`install`] at the start of each.
pub fn local() -> Rc<Deadlines> {
    LOCAL.with(|local| {
        if let Some(set) = local.borrow().as_ref().filter(|s| s.firing.get()) {
            return set.clone();
        }
        install()
    })
}

/// Gives this thread a fresh set, fired by a task on the current monoio runtime. A worker calls
/// it when its runtime starts: a set left by an earlier runtime on the thread may still look
/// fired (its pending task is kept alive by the waker the set holds, so it is never dropped).
pub fn install() -> Rc<Deadlines> {
    LOCAL.with(|local| {
        let set = Deadlines::new();
        set.firing.set(true);
        // The guard travels inside the task: however the task ends (its runtime dropped, even
        // before it first ran), the set is marked as no longer fired.
        let guard = Firing(set.clone());
        let fired = set.clone();
        monoio::spawn(async move {
            let _guard = guard;
            fired.fire().await;
        });
        *local.borrow_mut() = Some(set.clone());
        set
    })
}

/// A future completing at `when`, on this thread's deadlines.
pub fn at(when: Instant) -> DeadlineWait {
    local().at(when)
}

/// `fut`, bounded by `after` from now, on this thread's deadlines (see [`Deadlines::timeout`]).
pub fn timeout<F: Future>(after: Duration, fut: F) -> Timeout<F> {
    local().timeout(after, fut)
}

/// Clears [`Deadlines::firing`] when the firing task goes.
struct Firing(Rc<Deadlines>);

impl Drop for Firing {
    fn drop(&mut self) {
        self.0.firing.set(false);
    }
}

/// A set of deadlines, and the state of the one task that fires them.
#[derive(Default)]
pub struct Deadlines {
    /// Whether a task fires this set (see [`local`]).
    firing: Cell<bool>,
    /// Waiting tasks by (deadline, key): the first entry is the next to fire.
    waiting: RefCell<BTreeMap<(Instant, u64), Waker>>,
    next_key: Cell<u64>,
    /// What the firing task's timer is set for (`None`: it waits for a first deadline).
    armed: Cell<Option<Instant>>,
    /// Set when a deadline earlier than `armed` arrives: the firing task re-arms.
    kicked: Cell<bool>,
    firer: RefCell<Option<Waker>>,
}

impl Deadlines {
    /// An empty set; spawn [`Deadlines::fire`] on the worker that owns it.
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// A future that completes at `when`.
    pub fn at(self: &Rc<Self>, when: Instant) -> DeadlineWait {
        DeadlineWait {
            set: self.clone(),
            when,
            key: None,
        }
    }

    /// `fut`, or [`Elapsed`] if it has not finished `after` from now. In place of
    /// `monoio::time::timeout`, whose timer made every future holding one 640 bytes larger
    /// and 128-byte aligned, and so every request's futures larger to build and move.
    pub fn timeout<F: Future>(self: &Rc<Self>, after: Duration, fut: F) -> Timeout<F> {
        Timeout {
            fut,
            deadline: self.at(super::clock::now() + after),
        }
    }

    /// How many waits are registered.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.borrow().len()
    }

    /// The worker's firing task: sleeps on one timer until the earliest deadline, wakes every
    /// wait that is due, and re-arms. Runs until the worker's runtime ends.
    pub async fn fire(self: Rc<Self>) {
        loop {
            let first = self.waiting.borrow().keys().next().map(|k| k.0);
            match first {
                None => {
                    self.armed.set(None);
                    Kick { set: &self }.await;
                }
                Some(t) if t <= Instant::now() => self.wake_due(),
                Some(t) => {
                    self.armed.set(Some(t));
                    monoio::select! {
                        _ = monoio::time::sleep_until(t.into()) => {}
                        _ = Kick { set: &self } => {}
                    }
                }
            }
        }
    }

    /// Wakes (and forgets) every wait whose deadline has come.
    fn wake_due(&self) {
        let now = Instant::now();
        let due = {
            let mut waiting = self.waiting.borrow_mut();
            let later = waiting.split_off(&(now, u64::MAX));
            std::mem::replace(&mut *waiting, later)
        };
        for (_, waker) in due {
            waker.wake();
        }
    }

    /// Tells the firing task a deadline earlier than its timer was added.
    fn kick(&self) {
        self.kicked.set(true);
        if let Some(w) = self.firer.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Completes when the firing task is kicked.
struct Kick<'a> {
    set: &'a Deadlines,
}

impl Future for Kick<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.kicked.replace(false) {
            return Poll::Ready(());
        }
        *self.set.firer.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The deadline of a [`Deadlines::timeout`] passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// A future bounded by a deadline (see [`Deadlines::timeout`]). The future is polled first, so
/// one that is ready at once never registers its deadline.
pub struct Timeout<F> {
    fut: F,
    deadline: DeadlineWait,
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `fut` is structurally pinned: `Timeout` never moves it out and has no Drop
        // impl, so it stays where it was pinned. `deadline` is `Unpin` and used by reference.
        #[allow(unsafe_code)]
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: see above; `this.fut` is never moved while `this` is pinned.
        #[allow(unsafe_code)]
        let fut = unsafe { Pin::new_unchecked(&mut this.fut) };
        if let Poll::Ready(v) = fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        Pin::new(&mut this.deadline).poll(cx).map(|()| Err(Elapsed))
    }
}

/// Completes at its deadline; dropping it earlier forgets the deadline.
pub struct DeadlineWait {
    set: Rc<Deadlines>,
    when: Instant,
    key: Option<u64>,
}

impl Future for DeadlineWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // The poll's clock (see `clock`): the firing task woke this wait from a reading taken
        // before the poll began, so a due wait is never seen as early.
        if super::clock::now() >= self.when {
            if let Some(key) = self.key.take() {
                self.set.waiting.borrow_mut().remove(&(self.when, key));
            }
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(key) => key,
            None => {
                let key = self.set.next_key.get();
                self.set.next_key.set(key + 1);
                self.key = Some(key);
                key
            }
        };
        let when = self.when;
        let set = &self.set;
        let mut waiting = set.waiting.borrow_mut();
        match waiting.get_mut(&(when, key)) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => *w = cx.waker().clone(),
            None => {
                waiting.insert((when, key), cx.waker().clone());
                drop(waiting);
                if set.armed.get().is_none_or(|armed| when < armed) {
                    set.kick();
                }
            }
        }
        Poll::Pending
    }
}

impl Drop for DeadlineWait {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.set.waiting.borrow_mut().remove(&(self.when, key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn waits_complete_at_their_deadlines_in_order_whatever_order_they_were_added() {
        runtime().block_on(async {
            let set = Deadlines::new();
            monoio::spawn(set.clone().fire());
            let start = Instant::now();
            let order = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            // The later deadline first: the firing task must re-arm for the earlier one.
            for ms in [300u64, 100, 200] {
                let (set, order) = (set.clone(), order.clone());
                tasks.push(monoio::spawn(async move {
                    set.at(start + Duration::from_millis(ms)).await;
                    assert!(start.elapsed() >= Duration::from_millis(ms));
                    order.borrow_mut().push(ms);
                }));
            }
            for t in tasks {
                t.await;
            }
            assert_eq!(*order.borrow(), vec![100, 200, 300]);
            assert!(start.elapsed() < Duration::from_secs(2));
            assert_eq!(set.waiting(), 0);
        });
    }

    #[test]
    fn a_timeout_passes_a_finished_future_through_and_cuts_off_a_slow_one() {
        runtime().block_on(async {
            let set = Deadlines::new();
            monoio::spawn(set.clone().fire());
            let quick = set.timeout(Duration::from_millis(50), async { 7 }).await;
            assert_eq!(quick, Ok(7));
            assert_eq!(set.waiting(), 0, "a ready future registers no deadline");
            let start = Instant::now();
            let slow = set
                .timeout(
                    Duration::from_millis(100),
                    monoio::time::sleep(Duration::from_secs(3600)),
                )
                .await;
            assert_eq!(slow, Err(Elapsed));
            assert!(start.elapsed() >= Duration::from_millis(100));
            assert!(start.elapsed() < Duration::from_secs(2));
            assert_eq!(set.waiting(), 0);
        });
    }

    #[test]
    fn a_second_runtime_on_the_thread_gets_a_set_of_its_own() {
        for _ in 0..2 {
            runtime().block_on(async {
                install();
                let start = Instant::now();
                let cut = timeout(
                    Duration::from_millis(50),
                    monoio::time::sleep(Duration::from_secs(3600)),
                )
                .await;
                assert_eq!(cut, Err(Elapsed));
                assert!(start.elapsed() < Duration::from_secs(2));
            });
        }
    }

    #[test]
    fn a_dropped_wait_leaves_nothing_behind_and_a_past_deadline_is_ready_at_once() {
        runtime().block_on(async {
            let set = Deadlines::new();
            monoio::spawn(set.clone().fire());
            let far = set.at(Instant::now() + Duration::from_secs(3600));
            let raced = monoio::select! {
                _ = far => false,
                _ = monoio::time::sleep(Duration::from_millis(20)) => true,
            };
            assert!(raced);
            assert_eq!(set.waiting(), 0, "the dropped wait was forgotten");
            let start = Instant::now();
            set.at(Instant::now() - Duration::from_millis(1)).await;
            assert!(start.elapsed() < Duration::from_millis(50));
        });
    }
}
