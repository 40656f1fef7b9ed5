//! The request path's clock: read at most once per connection-task poll.
//!
//! A guarded request read the monotonic clock 25 times on the worker, 17 of them the
//! gateway's own (deadlines armed and checked, pool timestamps, the rate limiter, start and end
//! marks), each a vDSO call of ~28 ns on this project's VM. Within one poll of a connection's
//! task no wait happens, so every read there would return (nearly) the same instant: the first
//! read of a poll is kept and the rest of that poll reuses it, the way an event loop caches its
//! time once per turn. That left 15 reads, 8 of them in monoio's timer driver, which the
//! workers no longer run (see `deadlines`): a guarded request now reads the clock 7 times. A request's start mark is its poll's reading: the poll its head
//! arrived in, which began when the bytes came. Marks taken later in a poll that report when
//! something happened (an upstream span's start, the request's end) still read the clock.
//!
//! What the reuse may cost: a deadline set in a long poll (a large answer scanned) is set from
//! the poll's start, earlier by that poll's length, and a deadline that passes during such a
//! poll is seen at the next one. Both are far below any configured timeout. A client can make
//! one poll serve many requests (pipelined, refused before any upstream wait, replies written
//! at once on epoll); all of them then see one instant, so rate-limit buckets refill nothing
//! during it: stricter, never looser, and a reading is never ahead of the clock. Nothing that waits
//! for time to pass within one poll may use it: such a loop would never see the clock move.
//! Outside a connection's poll (the deadlines' firing task, other tasks, other threads) every
//! call reads the clock.

use std::cell::Cell;
use std::time::Instant;

/// The state of this thread's poll clock.
#[derive(Clone, Copy)]
enum PollClock {
    /// Not inside a connection task's poll: every call reads the clock.
    Outside,
    /// Inside one, clock not read yet.
    Unread,
    /// Inside one, and this is the instant its first read gave.
    Read(Instant),
}

thread_local! {
    static POLL_CLOCK: Cell<PollClock> = const { Cell::new(PollClock::Outside) };
}

/// Now: within a connection task's poll, the instant of that poll's first call; elsewhere a
/// read of the monotonic clock.
pub fn now() -> Instant {
    POLL_CLOCK.with(|c| match c.get() {
        PollClock::Read(t) => t,
        PollClock::Unread => {
            let t = Instant::now();
            c.set(PollClock::Read(t));
            t
        }
        PollClock::Outside => Instant::now(),
    })
}

/// Marks a connection task's poll for [`now`] until dropped, restoring what it found (a poll
/// nested inside another, as a task polled from within one, keeps its own reading).
pub struct PollScope(PollClock);

impl PollScope {
    /// Starts a poll's scope; the clock is read on the first [`now`] within it.
    pub fn enter() -> Self {
        Self(POLL_CLOCK.with(|c| c.replace(PollClock::Unread)))
    }
}

impl Drop for PollScope {
    fn drop(&mut self) {
        POLL_CLOCK.with(|c| c.set(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn within_a_scope_every_call_returns_its_first_reading_and_outside_the_clock_moves() {
        let outside = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > outside, "outside a scope each call reads the clock");
        let scope = PollScope::enter();
        let first = now();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(now(), first, "a poll reuses its first reading");
        drop(scope);
        assert!(now() > first, "after the poll the clock is read again");
    }

    #[test]
    fn each_scope_reads_afresh_and_a_nested_one_leaves_the_outer_reading_intact() {
        let outer = PollScope::enter();
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        {
            let _inner = PollScope::enter();
            let b = now();
            assert!(b > a, "a new poll does not inherit the last one's reading");
        }
        assert_eq!(now(), a, "the outer poll keeps its reading");
        drop(outer);
        let _next = PollScope::enter();
        std::thread::sleep(Duration::from_millis(1));
        let c = now();
        assert!(
            c > a,
            "the next poll's first reading is taken when it is first asked for"
        );
    }
}
