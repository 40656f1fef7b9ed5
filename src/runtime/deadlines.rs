//! Thread-local deadlines for the request path's waits and timeouts (a connection idle between
//! requests, a head or body read, an upstream exchange, a reply write): one kernel timer per
//! worker thread serves all of them.
//!
//! The timer is a timerfd the firing task waits on through the runtime's own driver (a poll on
//! the ring, or epoll), so worker runtimes are built without monoio's timer driver. That driver
//! read the clock twice and turned its wheel on every park, and gave every park a timeout (a
//! kernel hrtimer armed and cancelled each time the worker slept), whatever the deadlines were:
//! about 900 instructions and 8 clock reads per guarded request. The timerfd is set only when
//! the earliest deadline moves, which is rare: most waits end long before their deadline.
//!
//! monoio's own `Sleep` is 640 bytes and 128-byte aligned (its entry is padded against false
//! sharing with other threads, which a thread-per-core worker never has), and it made up most
//! of what an idle connection's task cost. A wait here holds a pointer, an instant and its
//! slot; the slot holds the task's waker, and a min-heap orders the slots by deadline.
//!
//! Nearly every wait is withdrawn long before its deadline (a request's timeouts, when the
//! request is quick), so withdrawing is what must be cheap: it empties the wait's slot and
//! leaves its heap entry behind, to be skipped when it surfaces (the slot's generation no
//! longer matches) or swept when the stale entries outnumber the live ones. An ordered map
//! paid a search and a rebalance to add each wait and again to withdraw it.
//! Owned by one worker thread, so no atomics and no locks.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// This thread's set (see [`local`]).
    static LOCAL: RefCell<Option<Rc<Deadlines>>> = const { RefCell::new(None) };
}

/// This thread's deadlines. The first use on a monoio runtime starts their firing task on it,
/// so any code can bound a wait. Must be called from within a monoio runtime; a thread that
/// runs one runtime after another calls [`install`] at the start of each. Off the workers (whose
/// [`install`] must succeed), a thread that cannot have a timerfd falls back to the runtime's
/// own timer, which every other runtime of the gateway enables.
pub fn local() -> Rc<Deadlines> {
    LOCAL.with(|local| {
        if let Some(set) = local.borrow().as_ref().filter(|s| s.firing.get()) {
            return set.clone();
        }
        install().unwrap_or_else(|e| {
            tracing::warn!(target: "mcp_guard::runtime", "no timerfd for this thread's deadlines ({e}); using the runtime's timer");
            start(Clock::Runtime)
        })
    })
}

/// Gives this thread a fresh set, fired by a task on the current monoio runtime and woken by a
/// timerfd (a runtime without monoio's timer driver can run it). A worker calls it when its
/// runtime starts: a set left by an earlier runtime on the thread may still look fired (its
/// pending task is kept alive by the waker the set holds, so it is never dropped). Fails only
/// when the kernel gives no timerfd (out of descriptors or memory).
pub fn install() -> io::Result<Rc<Deadlines>> {
    Ok(start(Clock::Alarm(Alarm::new()?)))
}

/// A fresh set for this thread, fired on `clock`.
fn start(clock: Clock) -> Rc<Deadlines> {
    LOCAL.with(|local| {
        let set = Deadlines::new();
        set.firing.set(true);
        // The guard travels inside the task: however the task ends (its runtime dropped, even
        // before it first ran), the set is marked as no longer fired.
        let guard = Firing(set.clone());
        let fired = set.clone();
        monoio::spawn(async move {
            let _guard = guard;
            fired.fire_on(clock).await;
        });
        let earlier = local.borrow_mut().replace(set.clone());
        drop(earlier);
        set
    })
}

/// Ends this thread's set, from within its runtime, before that runtime ends: the firing task
/// returns (its pending wait on the timer is cancelled while the runtime can still process the
/// cancellation), and every wait still registered is dropped. Left alone, the firing task would
/// outlive the runtime, kept by the wakers that point at it, holding its timerfd and its pending
/// operation until the process exits.
pub async fn retire() {
    let Some(set) = LOCAL.with(|local| local.borrow_mut().take()) else {
        return;
    };
    set.stop.set(true);
    set.kick();
    // Taken out first, dropped after: a dropped waker can be the last reference to its task,
    // whose wait then unregisters itself from this same map.
    let waiting = set.waiting.borrow_mut().clear();
    drop(waiting);
    // Until the firing task has returned: its guard clears `firing` and wakes this.
    std::future::poll_fn(|cx| {
        if set.firing.get() {
            *set.retired.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
}

/// Completes `after` from now, on this thread's deadlines: the workers' sleep (their runtime
/// has no timer of its own).
pub fn sleep(after: Duration) -> DeadlineWait {
    at(super::clock::now() + after)
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
        let retired = self.0.retired.borrow_mut().take();
        if let Some(w) = retired {
            w.wake();
        }
    }
}

/// A set of deadlines, and the state of the one task that fires them.
#[derive(Default)]
pub struct Deadlines {
    /// Whether a task fires this set (see [`local`]).
    firing: Cell<bool>,
    /// The registered waits.
    waiting: RefCell<Waits>,
    /// What the firing task's timer is set for (`None`: it waits for a first deadline).
    armed: Cell<Option<Instant>>,
    /// Set when a deadline earlier than `armed` arrives: the firing task re-arms.
    kicked: Cell<bool>,
    firer: RefCell<Option<Waker>>,
    /// Set by [`retire`]: the firing task returns at its next turn.
    stop: Cell<bool>,
    /// [`retire`], waiting for the firing task to have returned.
    retired: RefCell<Option<Waker>>,
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
            slot: None,
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
        self.waiting.borrow().live
    }

    /// The firing task on a timerfd (see [`install`]); fails only when the kernel gives none.
    pub async fn fire(self: Rc<Self>) -> io::Result<()> {
        self.fire_on(Clock::Alarm(Alarm::new()?)).await;
        Ok(())
    }

    /// The firing task: sleeps on one timer until the earliest deadline, wakes every wait that
    /// is due, and re-arms. Runs until its runtime ends.
    async fn fire_on(self: Rc<Self>, clock: Clock) {
        loop {
            if self.stop.get() {
                return;
            }
            let first = self.waiting.borrow_mut().earliest();
            let Some(t) = first else {
                self.armed.set(None);
                Kick { set: &self }.await;
                continue;
            };
            // A fresh reading: this task is outside any connection's poll, and a wait it wakes
            // must see its deadline passed when it is polled (see `clock`).
            let now = Instant::now();
            if t <= now {
                self.wake_due(now);
                continue;
            }
            let armed = match &clock {
                Clock::Alarm(_) if self.armed.get() == Some(t) => Some(t),
                Clock::Alarm(alarm) => match alarm.set(t - now) {
                    Ok(()) => Some(t),
                    Err(e) => {
                        // timerfd_settime fails only on a bad argument, which `set` never
                        // passes. Were it to, the timer rings in a millisecond and, left
                        // unarmed for `t`, is set again then: every deadline is kept.
                        tracing::error!(target: "mcp_guard::runtime", "the deadlines' timer could not be set ({e}); retrying in 1 ms");
                        let _ = alarm.set(Duration::from_millis(1));
                        None
                    }
                },
                Clock::Runtime => Some(t),
            };
            self.armed.set(armed);
            let rang = monoio::select! {
                r = clock.ring(t) => r,
                _ = Kick { set: &self } => Ok(()),
            };
            if let Err(e) = rang {
                // A wait on the worker's own timerfd failed, which a kernel with memory to
                // spare never does. The loop re-reads the deadlines either way; the pause keeps
                // a persistent failure from spinning this thread while still keeping every
                // deadline, at the cost of a millisecond's block.
                tracing::error!(target: "mcp_guard::runtime", "waiting on the deadlines' timer failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Wakes (and forgets) every wait whose deadline is at or before `now`, in deadline order.
    fn wake_due(&self, now: Instant) {
        // Woken after the borrow ends: a wake can run code that registers or withdraws a wait.
        let due = self.waiting.borrow_mut().take_due(now);
        for waker in due {
            waker.wake();
        }
    }

    /// Tells the firing task a deadline earlier than its timer was added.
    fn kick(&self) {
        self.kicked.set(true);
        let firer = self.firer.borrow_mut().take();
        if let Some(w) = firer {
            w.wake();
        }
    }
}

/// What the firing task sleeps on.
enum Clock {
    /// A timerfd, read through the runtime's driver.
    Alarm(Alarm),
    /// The runtime's own timer (a runtime built with `enable_timer`; see [`local`]).
    Runtime,
}

impl Clock {
    /// Completes once the timer set for `t` has rung (for an alarm, as [`Alarm::set`] left it).
    async fn ring(&self, t: Instant) -> io::Result<()> {
        match self {
            Clock::Alarm(alarm) => alarm.rung().await,
            Clock::Runtime => {
                monoio::time::sleep_until(t.into()).await;
                Ok(())
            }
        }
    }
}

/// A one-shot CLOCK_MONOTONIC timerfd, waited on like a socket.
///
/// monoio has no type for a timerfd, so it is held as a `UnixStream`: the only operations used
/// on it are a readiness wait (a poll on the ring, or epoll's readiness; neither is socket
/// specific) and a plain `read(2)` of its 8-byte expiry count. Drop closes it.
struct Alarm {
    fd: monoio::net::UnixStream,
}

impl Alarm {
    fn new() -> io::Result<Self> {
        // Non-blocking: `rung` reads it after a readiness wait that may be spurious.
        // SAFETY: plain system call, no pointers.
        #[allow(unsafe_code)]
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it; the stream takes ownership
        // and closes it once. It is never used as a socket (see the type's doc).
        #[allow(unsafe_code)]
        let std_fd = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        Ok(Self {
            fd: monoio::net::UnixStream::from_std(std_fd)?,
        })
    }

    /// Sets the timer to ring once, `after` from now (`after` > 0; a zero would disarm it).
    /// Setting it also clears an expiry not yet read.
    fn set(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec on the stack; the old value is not asked for.
        #[allow(unsafe_code)]
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Completes when the timer has rung, consuming its expiry.
    async fn rung(&self) -> io::Result<()> {
        loop {
            // Not relaxed: under epoll, a relaxed wait reports the readiness the driver last
            // saw, which only monoio's own reads clear; after a read of ours that found nothing
            // it would report it again at once, forever. The strict wait checks with poll(2).
            self.fd.readable(false).await?;
            let mut expiries = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a local 8-byte buffer.
            #[allow(unsafe_code)]
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    expiries.as_mut_ptr().cast(),
                    expiries.len(),
                )
            };
            if n == 8 {
                return Ok(());
            }
            // EAGAIN: not rung yet (a spurious readiness, or a set that cleared the expiry).
            let e = io::Error::last_os_error();
            if n >= 0 || e.kind() != io::ErrorKind::WouldBlock {
                return Err(if n >= 0 {
                    io::ErrorKind::UnexpectedEof.into()
                } else {
                    e
                });
            }
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
    /// Its slot, once registered (see [`Waits`]).
    slot: Option<Slot>,
}

impl Future for DeadlineWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // The poll's clock (see `clock`): the firing task woke this wait from a reading taken
        // before the poll began, so a due wait is never seen as early.
        if super::clock::now() >= this.when {
            if let Some(slot) = this.slot.take() {
                let waker = this.set.waiting.borrow_mut().withdraw(slot);
                drop(waker);
            }
            return Poll::Ready(());
        }
        let when = this.when;
        let set = &this.set;
        let mut waiting = set.waiting.borrow_mut();
        if let Some(slot) = this.slot
            && let Some(waker) = waiting.waker_mut(slot)
        {
            if !waker.will_wake(cx.waker()) {
                let earlier = std::mem::replace(waker, cx.waker().clone());
                drop(waiting);
                drop(earlier);
            }
            return Poll::Pending;
        }
        // Not registered yet (or already fired by a reading this poll's clock had not reached,
        // which `clock` rules out; registering again is right either way).
        let slot = waiting.register(when, cx.waker().clone());
        drop(waiting);
        this.slot = Some(slot);
        if set.armed.get().is_none_or(|armed| when < armed) {
            set.kick();
        }
        Poll::Pending
    }
}

impl Drop for DeadlineWait {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // Dropped after the borrow ends: the waker can be the last reference to a task
            // whose own waits withdraw themselves as it goes.
            let waker = self.set.waiting.borrow_mut().withdraw(slot);
            drop(waker);
        }
    }
}

/// A registered wait's place in [`Waits`]: its slot's index and the generation it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    index: u32,
    generation: u32,
}

/// The registered waits: wakers in slots reused through a free list, and a min-heap of
/// (deadline, order of registration, slot) entries. A withdrawn or fired wait empties its slot
/// and moves its generation on, which turns its heap entry stale; stale entries are dropped when
/// they reach the top, or all at once when they outnumber the live ones by [`Waits::SWEEP`].
#[derive(Default)]
struct Waits {
    heap: BinaryHeap<Reverse<(Instant, u64, Slot)>>,
    slots: Vec<SlotState>,
    free: Vec<u32>,
    /// Registered and neither fired nor withdrawn.
    live: usize,
    /// Registration order: waits with the same deadline fire in the order they were made.
    next_order: u64,
}

#[derive(Default)]
struct SlotState {
    generation: u32,
    /// `None`: free.
    waker: Option<Waker>,
}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Slot {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.index, self.generation).cmp(&(other.index, other.generation))
    }
}

impl Waits {
    /// Stale heap entries allowed per live wait before a sweep (and never fewer than
    /// [`Waits::SWEEP_FLOOR`]): the sweep is linear, so it runs once per that many
    /// withdrawals, and the heap stays within a small multiple of the live waits.
    const SWEEP: usize = 3;
    const SWEEP_FLOOR: usize = 256;

    fn register(&mut self, when: Instant, waker: Waker) -> Slot {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(SlotState::default());
                // A worker holds far fewer than 4 billion waits: each is a live future.
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 waits")
            }
        };
        let state = &mut self.slots[index as usize];
        state.waker = Some(waker);
        let slot = Slot {
            index,
            generation: state.generation,
        };
        self.heap.push(Reverse((when, self.next_order, slot)));
        self.next_order += 1;
        self.live += 1;
        slot
    }

    /// The waker of a wait still registered (`None`: fired or withdrawn since).
    fn waker_mut(&mut self, slot: Slot) -> Option<&mut Waker> {
        let state = self.slots.get_mut(slot.index as usize)?;
        if state.generation != slot.generation {
            return None;
        }
        state.waker.as_mut()
    }

    /// Forgets a wait; returns its waker (for the caller to drop outside any borrow). A wait
    /// that already fired is not there any more, and its slot may be another's by now: the
    /// generation tells them apart.
    fn withdraw(&mut self, slot: Slot) -> Option<Waker> {
        let waker = self.free_slot(slot)?;
        if self.heap.len() > Self::SWEEP_FLOOR.max(self.live * (Self::SWEEP + 1)) {
            let slots = &self.slots;
            self.heap
                .retain(|Reverse((_, _, s))| slots[s.index as usize].generation == s.generation);
        }
        Some(waker)
    }

    fn free_slot(&mut self, slot: Slot) -> Option<Waker> {
        let state = self.slots.get_mut(slot.index as usize)?;
        if state.generation != slot.generation {
            return None;
        }
        let waker = state.waker.take()?;
        state.generation = state.generation.wrapping_add(1);
        self.free.push(slot.index);
        self.live -= 1;
        Some(waker)
    }

    /// Forgets every wait; returns their wakers. Slots keep their place with a new generation,
    /// so a wait still held somewhere can never withdraw a later one that reused its slot.
    fn clear(&mut self) -> Vec<Waker> {
        self.heap.clear();
        self.free.clear();
        self.live = 0;
        let mut wakers = Vec::new();
        for (index, state) in self.slots.iter_mut().enumerate() {
            wakers.extend(state.waker.take());
            state.generation = state.generation.wrapping_add(1);
            self.free.push(index as u32);
        }
        wakers
    }

    /// The earliest live deadline, dropping the stale entries above it.
    fn earliest(&mut self) -> Option<Instant> {
        while let Some(Reverse((when, _, slot))) = self.heap.peek() {
            if self.slots[slot.index as usize].generation == slot.generation {
                return Some(*when);
            }
            self.heap.pop();
        }
        None
    }

    /// Fires every wait due at `now`: their wakers, in deadline order.
    fn take_due(&mut self, now: Instant) -> Vec<Waker> {
        let mut due = Vec::new();
        while let Some(Reverse((when, _, slot))) = self.heap.peek().copied() {
            if when > now {
                break;
            }
            self.heap.pop();
            if let Some(waker) = self.free_slot(slot) {
                due.push(waker);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Runs `body` on a runtime of each driver, neither with monoio's timer (as a worker's):
    /// every wait in it must be on the deadlines.
    fn on_both_drivers<F: Future<Output = ()>>(body: impl Fn() -> F) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(body());
        // A kernel without io_uring (or a sandbox refusing it) still runs the epoll half.
        if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().build() {
            rt.block_on(body());
        }
    }

    #[test]
    fn waits_complete_at_their_deadlines_in_order_whatever_order_they_were_added() {
        on_both_drivers(|| async {
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
        on_both_drivers(|| async {
            let set = Deadlines::new();
            monoio::spawn(set.clone().fire());
            let quick = set.timeout(Duration::from_millis(50), async { 7 }).await;
            assert_eq!(quick, Ok(7));
            assert_eq!(set.waiting(), 0, "a ready future registers no deadline");
            let start = Instant::now();
            let slow = set
                .timeout(Duration::from_millis(100), std::future::pending::<()>())
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
            on_both_drivers(|| async {
                install().unwrap();
                let start = Instant::now();
                let cut = timeout(Duration::from_millis(50), std::future::pending::<()>()).await;
                assert_eq!(cut, Err(Elapsed));
                assert!(start.elapsed() < Duration::from_secs(2));
            });
        }
    }

    #[test]
    fn a_dropped_wait_leaves_nothing_behind_and_a_past_deadline_is_ready_at_once() {
        on_both_drivers(|| async {
            let set = Deadlines::new();
            monoio::spawn(set.clone().fire());
            let far = set.at(Instant::now() + Duration::from_secs(3600));
            let near = set.at(Instant::now() + Duration::from_millis(20));
            let raced = monoio::select! {
                _ = far => false,
                _ = near => true,
            };
            assert!(raced);
            assert_eq!(set.waiting(), 0, "the dropped wait was forgotten");
            let start = Instant::now();
            set.at(Instant::now() - Duration::from_millis(1)).await;
            assert!(start.elapsed() < Duration::from_millis(50));
        });
    }

    #[test]
    fn an_earlier_deadline_rearms_the_timer_and_a_withdrawn_one_rings_harmlessly() {
        on_both_drivers(|| async {
            let set = Deadlines::new();
            monoio::spawn(set.clone().fire());
            let start = Instant::now();
            // Armed for an hour; a later 30 ms wait must re-arm it, or this hangs.
            let hour = set.at(start + Duration::from_secs(3600));
            let withdrawn = set.at(start + Duration::from_millis(10));
            {
                // Registered, then dropped: the timer still rings at 10 ms for nothing.
                let mut withdrawn = std::pin::pin!(withdrawn);
                let polled = std::future::poll_fn(|cx| {
                    let _ = withdrawn.as_mut().poll(cx);
                    Poll::Ready(())
                });
                polled.await;
            }
            set.at(start + Duration::from_millis(30)).await;
            let waited = start.elapsed();
            assert!(waited >= Duration::from_millis(30), "{waited:?}");
            assert!(waited < Duration::from_secs(2), "{waited:?}");
            assert_eq!(set.waiting(), 0);
            // After ringing with nothing due, the set still fires the next wait.
            set.at(Instant::now() + Duration::from_millis(5)).await;
            drop(hour);
            assert_eq!(set.waiting(), 0);
        });
    }

    #[test]
    fn a_retired_set_ends_its_firing_task_within_the_runtime() {
        on_both_drivers(|| async {
            let set = install().unwrap();
            // Armed, with a wait pending: the task is parked on the timer.
            let pending = monoio::spawn(async { sleep(Duration::from_secs(3600)).await });
            sleep(Duration::from_millis(5)).await;
            assert!(set.firing.get());
            retire().await;
            assert!(!set.firing.get(), "the firing task outlived retire");
            assert_eq!(set.waiting(), 0);
            drop(pending);
            // The thread's next use starts a fresh set.
            let start = Instant::now();
            sleep(Duration::from_millis(10)).await;
            assert!(start.elapsed() >= Duration::from_millis(10));
            retire().await;
        });
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Waker, Arc<std::sync::atomic::AtomicUsize>) {
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(count.clone()))), count)
    }

    #[test]
    fn a_slot_withdrawn_or_fired_is_reused_and_its_old_holder_cannot_touch_the_new_wait() {
        let mut waits = Waits::default();
        let t0 = Instant::now();
        let (waker, woken) = counting_waker();
        let first = waits.register(t0 + Duration::from_secs(5), waker.clone());
        assert!(waits.withdraw(first).is_some());
        assert!(waits.withdraw(first).is_none(), "withdrawn twice");
        // The same slot, a new generation: the first wait's handle no longer reaches it.
        let second = waits.register(t0 + Duration::from_secs(9), waker.clone());
        assert_eq!(second.index, first.index);
        assert_ne!(second.generation, first.generation);
        assert!(waits.waker_mut(first).is_none());
        assert!(waits.withdraw(first).is_none());
        assert_eq!(waits.live, 1);
        // The first wait's stale entry (5 s) is not the earliest: the second's is.
        assert_eq!(waits.earliest(), Some(t0 + Duration::from_secs(9)));
        // Fired, then reused: a late withdraw by the fired wait leaves the new one alone.
        assert_eq!(waits.take_due(t0 + Duration::from_secs(9)).len(), 1);
        let third = waits.register(t0 + Duration::from_secs(20), waker.clone());
        assert_eq!(third.index, second.index);
        assert!(waits.withdraw(second).is_none());
        assert_eq!(waits.live, 1);
        assert_eq!(waits.earliest(), Some(t0 + Duration::from_secs(20)));
        // Cleared: every handle goes stale, even for slots reused afterwards.
        assert_eq!(waits.clear().len(), 1);
        let fourth = waits.register(t0 + Duration::from_secs(30), waker);
        assert!(waits.withdraw(third).is_none());
        assert_eq!(waits.live, 1);
        assert!(waits.withdraw(fourth).is_some());
        assert_eq!(woken.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn due_waits_fire_in_deadline_then_registration_order_and_stale_entries_are_swept() {
        struct Named(usize, Arc<std::sync::Mutex<Vec<usize>>>);
        impl std::task::Wake for Named {
            fn wake(self: Arc<Self>) {
                self.1.lock().unwrap().push(self.0);
            }
        }
        let mut waits = Waits::default();
        let t0 = Instant::now();
        let fired = Arc::new(std::sync::Mutex::new(Vec::new()));
        for (i, s) in [3u64, 1, 2, 1, 3].iter().enumerate() {
            let named = Waker::from(Arc::new(Named(i, fired.clone())));
            waits.register(t0 + Duration::from_secs(*s), named);
        }
        waits
            .take_due(t0 + Duration::from_secs(2))
            .into_iter()
            .for_each(Waker::wake);
        assert_eq!(*fired.lock().unwrap(), vec![1, 3, 2]);
        assert_eq!(waits.live, 2);
        let (waker, woken) = counting_waker();
        assert_eq!(waits.earliest(), Some(t0 + Duration::from_secs(3)));
        // Waits withdrawn long before their deadlines, as most are: the heap keeps their
        // entries only until a sweep, so it stays within a few times the live waits.
        for i in 0..10_000u64 {
            let slot = waits.register(t0 + Duration::from_secs(100 + i % 50), waker.clone());
            assert!(waits.withdraw(slot).is_some());
            assert!(waits.heap.len() <= Waits::SWEEP_FLOOR + 1);
        }
        assert_eq!(waits.live, 2);
        assert_eq!(waits.earliest(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(waits.take_due(t0 + Duration::from_secs(1000)).len(), 2);
        assert_eq!(waits.earliest(), None);
        assert_eq!(waits.slots.len(), 5, "slots are reused, not added");
        assert_eq!(woken.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn retiring_drops_the_tasks_only_its_waits_kept() {
        on_both_drivers(|| async {
            let set = install().unwrap();
            // Detached tasks (their handles dropped), like a worker's metrics tick: once parked,
            // the waker in the set is all that keeps each alive, so retiring drops them, and
            // each one's wait unregisters itself from the set as it goes.
            let dropped = Rc::new(Cell::new(0));
            for _ in 0..3 {
                let on_drop = Counted(dropped.clone());
                drop(monoio::spawn(async move {
                    let _on_drop = on_drop;
                    sleep(Duration::from_secs(3600)).await;
                }));
            }
            sleep(Duration::from_millis(5)).await;
            assert_eq!(set.waiting(), 3);
            retire().await;
            assert_eq!(dropped.get(), 3, "a parked task outlived its set");
            assert_eq!(set.waiting(), 0);
            assert!(!set.firing.get());
        });

        struct Counted(Rc<Cell<u32>>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.set(self.0.get() + 1);
            }
        }
    }

    #[test]
    fn a_set_on_the_runtimes_own_timer_fires_as_one_on_a_timerfd() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(async {
                let set = start(Clock::Runtime);
                let begun = Instant::now();
                let cut = set
                    .timeout(Duration::from_millis(40), std::future::pending::<()>())
                    .await;
                assert_eq!(cut, Err(Elapsed));
                assert!(begun.elapsed() >= Duration::from_millis(40));
                assert!(begun.elapsed() < Duration::from_secs(2));
            });
    }

    #[test]
    fn an_alarm_rings_once_per_setting_and_a_new_setting_clears_an_unread_ring() {
        on_both_drivers(|| async {
            let alarm = Alarm::new().unwrap();
            alarm.set(Duration::from_millis(5)).unwrap();
            let start = Instant::now();
            alarm.rung().await.unwrap();
            assert!(start.elapsed() >= Duration::from_millis(5));
            // Rung and not re-set: no second ring within 50 ms.
            let set = Deadlines::new();
            monoio::spawn(set.clone().fire());
            let again = set.timeout(Duration::from_millis(50), alarm.rung()).await;
            assert!(again.is_err(), "a one-shot alarm rang twice");
            // An expiry left unread is cleared by the next setting.
            alarm.set(Duration::from_millis(1)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            alarm.set(Duration::from_millis(60)).unwrap();
            let start = Instant::now();
            alarm.rung().await.unwrap();
            assert!(
                start.elapsed() >= Duration::from_millis(50),
                "{:?}",
                start.elapsed()
            );
        });
    }
}
