//! Request bodies in memory and the per-worker allowance they count against: a body is counted
//! from the moment its length is known until its bytes are gone — answered, or handed to the
//! upstream (written to its socket, or moved into a stdio child's bounded queue), whichever
//! comes first. A call waiting on a slow tool therefore holds no allowance, so it cannot starve
//! other clients' bodies; what it still holds is counted where it lives.

use crate::error::GatewayError;
use crate::runtime::worker::Worker;
use std::rc::Rc;

/// Request-body bytes one worker holds in memory at once, across its connections (raised to
/// `max_body_bytes` when that is larger, so one maximal body always fits). Beyond it a request
/// gets 503 and its connection is closed: slow or large bodies cannot pin unbounded memory.
pub const MAX_BODY_BYTES_IN_FLIGHT: usize = 64 << 20;

/// Body bytes counted against the worker's in-flight cap until dropped.
pub struct BodyReservation {
    w: Rc<Worker>,
    held: usize,
    cap: usize,
    /// Dropped with the reservation: tells another worker, which counts these bytes until
    /// they are handed on, that they have been.
    handed: Option<async_channel::Sender<()>>,
}

impl BodyReservation {
    /// Nothing counted yet, under the cap for bodies up to `max_body_bytes`.
    pub fn new(w: &Rc<Worker>, max_body_bytes: usize) -> Self {
        Self {
            w: w.clone(),
            held: 0,
            cap: MAX_BODY_BYTES_IN_FLIGHT.max(max_body_bytes),
            handed: None,
        }
    }

    /// Raises this body's share to `total` bytes, if the worker's cap allows it (503 if not).
    pub fn grow_to(&mut self, total: usize) -> Result<(), GatewayError> {
        // Bytes handed over from another worker are counted there.
        if total <= self.held || self.handed.is_some() {
            return Ok(());
        }
        let in_flight = self.w.body_bytes_in_flight.get() + (total - self.held);
        if in_flight > self.cap {
            self.w
                .metrics
                .bodies_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(GatewayError::Overloaded);
        }
        self.w.body_bytes_in_flight.set(in_flight);
        self.held = total;
        Ok(())
    }

    /// Bytes counted now.
    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        let w = &self.w;
        w.body_bytes_in_flight
            .set(w.body_bytes_in_flight.get() - self.held);
    }
}

/// A request body in memory, with its share of the worker's cap. Whoever moves the bytes on
/// takes the share with them ([`HeldBody::into_parts`]) and drops it once the bytes are gone.
pub struct HeldBody {
    bytes: Vec<u8>,
    /// `None` for bytes counted elsewhere (a held or handed-over call's copy).
    reservation: Option<BodyReservation>,
}

impl HeldBody {
    /// `bytes`, counted by `reservation` (which must already cover them).
    pub fn new(bytes: Vec<u8>, reservation: BodyReservation) -> Self {
        debug_assert!(reservation.held >= bytes.len());
        Self {
            bytes,
            reservation: Some(reservation),
        }
    }

    /// Bytes another worker counts (a legacy POST's, forwarded by the worker holding its
    /// session's stream): `handed` is dropped once they are handed upstream, or dropped.
    pub fn handed_over(bytes: Vec<u8>, w: &Rc<Worker>, handed: async_channel::Sender<()>) -> Self {
        let mut reservation = BodyReservation::new(w, 0);
        reservation.handed = Some(handed);
        Self {
            bytes,
            reservation: Some(reservation),
        }
    }

    /// Bytes outside the allowance: a copy an approval holds for its own bounded number of
    /// calls.
    pub fn uncounted(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            reservation: None,
        }
    }

    /// The body.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Puts `bytes` in place of the body (a rewritten initialize), counting the larger of the
    /// two sizes; 503 when the cap cannot take the difference.
    pub fn replace(&mut self, bytes: Vec<u8>) -> Result<(), GatewayError> {
        if let Some(reservation) = &mut self.reservation {
            reservation.grow_to(bytes.len())?;
        }
        self.bytes = bytes;
        Ok(())
    }

    /// The bytes and their share, for code that hands the bytes on and must keep them
    /// counted until they are gone.
    pub fn into_parts(self) -> (Vec<u8>, Option<BodyReservation>) {
        (self.bytes, self.reservation)
    }
}

impl std::ops::Deref for HeldBody {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}
