//! The queues between a stdio (or legacy SSE) upstream's hub and the worker writing a client's
//! server-to-client stream: bounded in messages and in bytes, so a client that stops reading
//! its stream, or a child that floods one, holds at most [`STREAM_BYTES`] per stream before
//! further messages are dropped and counted. A message larger than that is never queued: each
//! listening stream would hold (and its writer copy) one of its own.
//! A request's own answer ([`EventSender::send_last`]) is the exception: it is what the client
//! asked for, bounded by the upstream's line limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Messages one stream queues for a client that has not taken them yet.
pub const STREAM_CAPACITY: usize = 256;
/// Bytes one stream queues for a client that has not taken them yet, and the largest message
/// it carries (a request's answer aside).
pub const STREAM_BYTES: usize = 8 << 20;

/// The hub's end of a stream.
#[derive(Clone, Debug)]
pub struct EventSender {
    tx: async_channel::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// The worker's count of what it takes off a stream (see [`Queued::taken`]).
#[derive(Debug)]
pub struct Queued(Arc<AtomicUsize>);

/// What a stream's producer counts as queued, counted down by the worker as it takes messages:
/// a hub's [`Queued`] on another thread, or a legacy session's count on the worker's own.
pub enum Backlog {
    /// Counted by a hub.
    Shared(Queued),
    /// Counted on this worker.
    Local(std::rc::Rc<std::cell::Cell<usize>>),
}

impl Backlog {
    /// A message of `len` bytes left the queue.
    pub fn taken(&self, len: usize) {
        match self {
            Backlog::Shared(q) => q.taken(len),
            Backlog::Local(c) => c.set(c.get().saturating_sub(len)),
        }
    }
}

impl Queued {
    /// A message of `len` bytes left the queue.
    pub fn taken(&self, len: usize) {
        self.0.fetch_sub(len, Ordering::AcqRel);
    }
}

/// A stream: the hub's end, the worker's end, and the worker's count of what it takes.
pub fn channel() -> (EventSender, async_channel::Receiver<Vec<u8>>, Queued) {
    let (tx, rx) = async_channel::bounded(STREAM_CAPACITY);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        EventSender {
            tx,
            queued: queued.clone(),
        },
        rx,
        Queued(queued),
    )
}

impl EventSender {
    /// Queues `message` unless the stream is closed or full (in messages or bytes); gives it
    /// back when refused.
    pub fn try_send(&self, message: Vec<u8>) -> Result<(), Vec<u8>> {
        let len = message.len();
        if len > STREAM_BYTES {
            return Err(message);
        }
        let held = self.queued.fetch_add(len, Ordering::AcqRel);
        if held + len > STREAM_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(message);
        }
        self.tx.try_send(message).map_err(|e| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            e.into_inner()
        })
    }

    /// Queues a stream's last message (a request's answer), waiting for room in messages: it
    /// must not be dropped, and nothing follows it.
    pub async fn send_last(&self, message: Vec<u8>) {
        let len = message.len();
        self.queued.fetch_add(len, Ordering::AcqRel);
        if self.tx.send(message).await.is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// Whether the worker's end is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_holds_at_most_its_bytes_and_no_message_larger() {
        let (tx, rx, queued) = channel();
        assert!(tx.try_send(vec![b'x'; STREAM_BYTES + 1]).is_err());
        assert!(tx.try_send(vec![b'x'; STREAM_BYTES]).is_ok());
        assert!(tx.try_send(vec![b'y'; 1]).is_err());
        let first = rx.try_recv().unwrap();
        queued.taken(first.len());
        for _ in 0..4 {
            assert!(tx.try_send(vec![b'z'; STREAM_BYTES / 4]).is_ok());
        }
        assert!(tx.try_send(vec![b'z'; 1]).is_err(), "over the byte bound");
        while let Ok(m) = rx.try_recv() {
            queued.taken(m.len());
        }
        for _ in 0..STREAM_CAPACITY {
            assert!(tx.try_send(vec![b'n'; 1]).is_ok());
        }
        assert!(
            tx.try_send(vec![b'n'; 1]).is_err(),
            "over the message bound"
        );
    }
}
