//! An HTTP server's replicas and the choice among them: which replica a new session (or a
//! request outside any session) goes to, which replica a session is pinned to, and what the
//! workers and the health checks know about each replica (atomics only, so choosing costs no
//! lock on the request path).
//!
//! - Choosing: `round_robin` takes the healthy replicas in turn; `least_outstanding` takes the
//!   healthy replica with the fewest requests in flight, ties taken in turn. A replica that is
//!   ejected is never chosen; with none healthy the request fails at once (503 naming the
//!   server) instead of waiting for a connection that will not come.
//! - Pinning: the session payload the gateway wraps under its MAC names the replica (a digest
//!   of its URL, not its position, so a reload that reorders or edits `urls` cannot move a
//!   session) and the replica's epoch. A session's requests go to that replica only: if it is
//!   ejected they fail with 503 (it may come back), if it left the configuration or began
//!   answering as another server (a new epoch) the session is unknown (404) and the client
//!   initializes again. A session never moves silently to another replica.
//! - Ejection: [`EJECT_AFTER`] consecutive failures eject a replica: connection or I/O
//!   failures of requests (passive) and failed health checks (active) count alike; a timeout
//!   does not (a slow tool is not a dead server). A health check that succeeds brings it back.
//! - A server configured with a single `url` is not balanced: its one endpoint is always
//!   tried, its session ids carry the upstream's own id unchanged, and its readiness is what
//!   the last health check found.

use crate::config::schema::LoadBalance;
use crate::config::{HttpEndpoint, HttpUpstream};
use crate::error::GatewayError;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Consecutive failures (requests that could not reach the replica, or failed health checks)
/// that eject a replica.
pub const EJECT_AFTER: u32 = 3;

/// The first byte of a pinned session payload. A raw upstream session id never starts with
/// it (a NUL cannot travel in an HTTP header), so the two forms cannot be mistaken for each
/// other across a reload that turns `url` into `urls` or back.
const PINNED: u8 = 0;
/// Bytes of the replica tag (a digest of its URL) in a pinned payload.
const TAG_LEN: usize = 8;
/// Marker, tag and epoch.
const PIN_LEN: usize = 1 + TAG_LEN + 4;

/// What the workers and the health checks know about one replica.
#[derive(Debug, Default)]
pub struct ReplicaState {
    /// Balanced: not ejected (chosen, and its sessions served). Single `url`: the last health
    /// check got an answer.
    healthy: AtomicBool,
    /// A health check has ever got an answer.
    answered: AtomicBool,
    /// Requests in flight (balanced servers only), until their reply is written.
    outstanding: AtomicUsize,
    /// Consecutive failures.
    failures: AtomicU32,
    /// Bumped when the replica starts answering as another server: sessions opened before are
    /// over.
    epoch: AtomicU32,
    /// What its last successful health check said it is (server name, version, protocol).
    /// Only the control and admin threads read or write it, never a worker.
    identity: Mutex<Option<String>>,
}

impl ReplicaState {
    /// Balanced replicas start healthy, so a fresh gateway serves before its first health
    /// check; a single endpoint starts not ready until one answers (`/ready` says so).
    fn new(balanced: bool, stable_epoch: bool) -> Self {
        // A random first epoch: a server removed by a reload and added back later (same URL)
        // is a new instance, and the sessions of the old one must not come back to life.
        // With configured session keys the gateway is one of a fleet (or must survive its own
        // restart), and every process must agree on the epoch: it starts at 0, and a server
        // added back then revives its old sessions as far as the server itself still knows
        // them (it answers 404 for those it does not).
        let epoch = if stable_epoch {
            0
        } else {
            u32::from_be_bytes(crate::mcp::session::random_bytes::<4>())
        };
        Self {
            healthy: AtomicBool::new(balanced),
            epoch: AtomicU32::new(epoch),
            ..Self::default()
        }
    }

    /// Not ejected (balanced) or answering (single endpoint).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Serving now: healthy, and a health check has confirmed it at least once.
    pub fn is_ready(&self) -> bool {
        self.is_healthy() && self.has_answered()
    }

    /// A health check has ever got an answer.
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// What the replica last said it is.
    pub fn identity(&self) -> Option<String> {
        self.identity.lock().ok().and_then(|i| i.clone())
    }

    /// A request reached it (an HTTP answer came back).
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request or a health check failed; true when this failure ejected the replica.
    pub fn failed(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        n >= EJECT_AFTER && self.healthy.swap(false, Ordering::Relaxed)
    }

    /// A health check of a balanced replica answered as `identity`. Returns whether it came
    /// back from ejection, and the identity it had before when that changed (its epoch is
    /// then bumped, ending the sessions opened before).
    pub fn checked_ok(&self, identity: String) -> (bool, Option<String>) {
        self.answered.store(true, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        let mut changed = None;
        if let Ok(mut known) = self.identity.lock() {
            match known.as_deref() {
                Some(old) if old != identity => {
                    self.epoch.fetch_add(1, Ordering::Relaxed);
                    changed = Some(old.to_string());
                }
                _ => {}
            }
            *known = Some(identity);
        }
        let back = !self.healthy.swap(true, Ordering::Relaxed);
        (back, changed)
    }

    /// A health check of a single endpoint: `ok` is whether it answered. Returns whether the
    /// state changed.
    pub fn checked_single(&self, ok: bool) -> bool {
        if ok {
            self.answered.store(true, Ordering::Relaxed);
        }
        self.healthy.swap(ok, Ordering::Relaxed) != ok
    }

    /// Counts a request in flight until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request counted against its replica until dropped (once its reply has been written).
pub struct InFlight(Arc<ReplicaState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// One replica: where it is, the tag sessions name it by, and its shared state.
#[derive(Debug)]
pub struct Replica {
    /// Its endpoint.
    pub endpoint: HttpEndpoint,
    tag: [u8; TAG_LEN],
    /// What the workers and the health checks know about it.
    pub state: Arc<ReplicaState>,
}

/// The tag of the replica at `url` (as shown: no credentials, no query).
fn tag_of(url: &str) -> [u8; TAG_LEN] {
    let d = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&d.as_ref()[..TAG_LEN]);
    tag
}

/// A running HTTP upstream: its settings, its replicas (one for a single `url`) and the
/// round-robin position.
#[derive(Debug)]
pub struct HttpServer {
    /// Its settings (headers, balancing).
    pub settings: HttpUpstream,
    replicas: Vec<Replica>,
    next: AtomicUsize,
}

/// Where a request goes: the replica, the upstream's own session id if it is in one, and the
/// epoch a session it opens is pinned to.
#[derive(Debug)]
pub struct Target<'p> {
    /// Index into the replicas.
    pub replica: usize,
    /// The upstream's session id.
    pub session: Option<&'p [u8]>,
    /// The replica's epoch when the request left.
    pub epoch: u32,
}

impl HttpServer {
    /// The server for `settings`, keeping what `previous` knew about replicas whose URL is
    /// unchanged (health, failures, identity, requests in flight) when it was balanced the
    /// same way.
    pub fn new(settings: &HttpUpstream, previous: Option<&HttpServer>) -> Self {
        let balanced = settings.balance.is_some();
        let replicas = settings
            .endpoints
            .iter()
            .map(|e| {
                let state = previous
                    .filter(|p| p.is_balanced() == balanced)
                    .and_then(|p| p.replicas.iter().find(|r| r.endpoint.url == e.url))
                    .map(|r| r.state.clone())
                    .unwrap_or_else(|| {
                        Arc::new(ReplicaState::new(balanced, settings.stable_epochs))
                    });
                Replica {
                    endpoint: e.clone(),
                    tag: tag_of(&e.url),
                    state,
                }
            })
            .collect();
        Self {
            settings: settings.clone(),
            replicas,
            next: AtomicUsize::new(0),
        }
    }

    /// Configured with `urls`.
    pub fn is_balanced(&self) -> bool {
        self.settings.balance.is_some()
    }

    /// Every replica, in file order.
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// Serving now: some replica is.
    pub fn is_ready(&self) -> bool {
        self.replicas.iter().any(|r| r.state.is_ready())
    }

    /// Some replica has answered a health check.
    pub fn has_answered(&self) -> bool {
        self.replicas.iter().any(|r| r.state.has_answered())
    }

    /// Where a request goes: the replica its session is pinned to, or for a request outside
    /// any session, the one the balancing policy chooses. `server` names the route in errors.
    pub fn target<'p>(
        &self,
        server: &Arc<str>,
        session: Option<&'p [u8]>,
    ) -> Result<Target<'p>, GatewayError> {
        let Some(policy) = self.settings.balance else {
            // A single endpoint pins its sessions too: the tag is a digest of its URL, so a
            // reload pointing the server elsewhere ends them (404) instead of handing one
            // server's session id to another; the epoch is its instance's, so a server removed
            // and added back does not revive the old one's sessions.
            let current = self.replicas[0].state.epoch();
            let session = match session {
                Some(payload) => {
                    let (_, epoch, sid) = self.unpin(payload)?;
                    if epoch != current {
                        return Err(GatewayError::UnknownSession);
                    }
                    Some(sid)
                }
                None => None,
            };
            return Ok(Target {
                replica: 0,
                session,
                epoch: current,
            });
        };
        match session {
            Some(payload) => {
                let (replica, epoch, sid) = self.unpin(payload)?;
                let state = &self.replicas[replica].state;
                if state.epoch() != epoch {
                    // The replica answers as another server now: its sessions are over.
                    return Err(GatewayError::UnknownSession);
                }
                if !state.is_healthy() {
                    return Err(GatewayError::ReplicaDown(server.clone()));
                }
                Ok(Target {
                    replica,
                    session: Some(sid),
                    epoch,
                })
            }
            None => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let replicas = &self.replicas;
                let replica = pick(
                    policy,
                    replicas.len(),
                    start,
                    |i| replicas[i].state.is_healthy(),
                    |i| replicas[i].state.outstanding(),
                )
                .ok_or_else(|| GatewayError::ServerDown(server.clone()))?;
                Ok(Target {
                    replica,
                    session: None,
                    epoch: replicas[replica].state.epoch(),
                })
            }
        }
    }

    /// Counts a request to `replica` in flight (balanced servers only: nothing reads it for
    /// a single endpoint).
    pub fn begin(&self, replica: usize) -> Option<InFlight> {
        self.is_balanced()
            .then(|| self.replicas[replica].state.begin())
    }

    /// The session payload for the upstream's session id `sid`, opened at `target`.
    pub fn pin(&self, target: &Target<'_>, sid: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(PIN_LEN + sid.len());
        p.push(PINNED);
        p.extend_from_slice(&self.replicas[target.replica].tag);
        p.extend_from_slice(&target.epoch.to_be_bytes());
        p.extend_from_slice(sid);
        p
    }

    /// The replica, epoch and upstream session id of a pinned payload; a replica no longer
    /// configured makes the session unknown.
    fn unpin<'p>(&self, payload: &'p [u8]) -> Result<(usize, u32, &'p [u8]), GatewayError> {
        if payload.len() < PIN_LEN || payload[0] != PINNED {
            return Err(GatewayError::UnknownSession);
        }
        let tag = &payload[1..1 + TAG_LEN];
        let replica = self
            .replicas
            .iter()
            .position(|r| r.tag == tag)
            .ok_or(GatewayError::UnknownSession)?;
        let mut epoch = [0u8; 4];
        epoch.copy_from_slice(&payload[1 + TAG_LEN..PIN_LEN]);
        Ok((replica, u32::from_be_bytes(epoch), &payload[PIN_LEN..]))
    }

    /// Its state for `/ready` and `/health`: each replica's URL, whether it serves, whether it
    /// is ejected, its requests in flight, its consecutive failures and what it said it is.
    pub fn describe(&self) -> serde_json::Value {
        let replicas: Vec<serde_json::Value> = self
            .replicas
            .iter()
            .map(|r| {
                let s = &r.state;
                serde_json::json!({
                    "url": r.endpoint.url,
                    "ready": s.is_ready(),
                    "ejected": self.is_balanced() && !s.is_healthy(),
                    "in_flight": s.outstanding(),
                    "failures": s.failures(),
                    "server": s.identity(),
                })
            })
            .collect();
        let policy = self.settings.balance.map(|b| match b {
            LoadBalance::RoundRobin => "round_robin",
            LoadBalance::LeastOutstanding => "least_outstanding",
        });
        serde_json::json!({ "load_balance": policy, "replicas": replicas })
    }
}

/// The replica `policy` chooses among `n`, `start` being this choice's round-robin position;
/// `None` when none is healthy.
fn pick(
    policy: LoadBalance,
    n: usize,
    start: usize,
    healthy: impl Fn(usize) -> bool,
    outstanding: impl Fn(usize) -> usize,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    // Scanning from the round-robin position spreads ties (and skipped replicas) evenly.
    let mut order = (0..n).map(|k| (start + k) % n).filter(|&i| healthy(i));
    match policy {
        LoadBalance::RoundRobin => order.next(),
        // `min_by_key` keeps the first of equals: the one nearest the round-robin position.
        LoadBalance::LeastOutstanding => order.min_by_key(|&i| outstanding(i)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(policy: LoadBalance, healthy: &[bool], load: &[usize], rounds: usize) -> Vec<usize> {
        (0..rounds)
            .filter_map(|start| pick(policy, healthy.len(), start, |i| healthy[i], |i| load[i]))
            .collect()
    }

    #[test]
    fn round_robin_takes_healthy_replicas_in_turn() {
        let rr = LoadBalance::RoundRobin;
        assert_eq!(picks(rr, &[true; 3], &[0; 3], 6), [0, 1, 2, 0, 1, 2]);
        // An ejected replica is skipped; its turn goes to the next one.
        assert_eq!(
            picks(rr, &[true, false, true], &[0; 3], 6),
            [0, 2, 2, 0, 2, 2]
        );
        assert_eq!(picks(rr, &[false; 3], &[0; 3], 3), Vec::<usize>::new());
        assert_eq!(pick(rr, 0, 5, |_| true, |_| 0), None);
        // The position wraps.
        assert_eq!(pick(rr, 3, usize::MAX, |_| true, |_| 0), Some(0));
    }

    #[test]
    fn least_outstanding_prefers_the_idlest_healthy_replica_and_rotates_ties() {
        let lo = LoadBalance::LeastOutstanding;
        assert_eq!(picks(lo, &[true; 3], &[4, 1, 2], 3), [1, 1, 1]);
        // The idlest one is ejected: the next idlest.
        assert_eq!(picks(lo, &[true, false, true], &[4, 1, 2], 3), [2, 2, 2]);
        // Ties are taken in turn.
        assert_eq!(picks(lo, &[true; 3], &[0, 0, 0], 3), [0, 1, 2]);
        assert_eq!(picks(lo, &[true; 3], &[1, 0, 0], 4), [1, 1, 2, 1]);
        assert_eq!(picks(lo, &[false; 2], &[0, 0], 2), Vec::<usize>::new());
    }

    fn server(urls: &[&str], balance: Option<LoadBalance>) -> HttpServer {
        let endpoints = urls
            .iter()
            .map(|u| HttpEndpoint {
                url: u.to_string(),
                addrs: vec!["127.0.0.1:1".parse().unwrap()],
                host_header: "h".into(),
                path: "/mcp".into(),
            })
            .collect();
        HttpServer::new(
            &HttpUpstream {
                endpoints,
                balance,
                headers: Vec::new(),
                stable_epochs: false,
            },
            None,
        )
    }

    #[test]
    fn a_session_stays_on_its_replica_and_never_moves() {
        let s = server(
            &["http://a/mcp", "http://b/mcp"],
            Some(LoadBalance::RoundRobin),
        );
        let name: Arc<str> = "web".into();
        let first = s.target(&name, None).unwrap();
        let payload = s.pin(&first, b"sid-1");
        for _ in 0..4 {
            let t = s.target(&name, Some(&payload)).unwrap();
            assert_eq!((t.replica, t.session), (first.replica, Some(&b"sid-1"[..])));
        }
        // Its replica ejected: 503 naming the server, never the other replica.
        let state = &s.replicas()[first.replica].state;
        for _ in 0..EJECT_AFTER {
            state.failed();
        }
        assert_eq!(
            s.target(&name, Some(&payload)).unwrap_err(),
            GatewayError::ReplicaDown(name.clone())
        );
        // New sessions go to the other one.
        for _ in 0..3 {
            assert_ne!(s.target(&name, None).unwrap().replica, first.replica);
        }
        // Back after a good check, the session with it.
        assert_eq!(state.checked_ok("srv 1, protocol x".into()), (true, None));
        assert_eq!(
            s.target(&name, Some(&payload)).unwrap().replica,
            first.replica
        );
        // The replica answers as another server: the session is over (404), not moved.
        let (_, was) = state.checked_ok("other 1, protocol x".into());
        assert_eq!(was.as_deref(), Some("srv 1, protocol x"));
        assert_eq!(
            s.target(&name, Some(&payload)).unwrap_err(),
            GatewayError::UnknownSession
        );
    }

    #[test]
    fn every_replica_down_fails_fast_naming_the_server() {
        let s = server(
            &["http://a/mcp", "http://b/mcp"],
            Some(LoadBalance::LeastOutstanding),
        );
        let name: Arc<str> = "web".into();
        for r in s.replicas() {
            for _ in 0..EJECT_AFTER - 1 {
                assert!(!r.state.failed());
            }
            assert!(r.state.failed(), "the third failure ejects");
        }
        assert_eq!(
            s.target(&name, None).unwrap_err(),
            GatewayError::ServerDown(name.clone())
        );
        assert!(!s.is_ready());
    }

    #[test]
    fn payloads_from_another_replica_set_or_form_are_unknown() {
        let name: Arc<str> = "web".into();
        let ab = server(
            &["http://a/mcp", "http://b/mcp"],
            Some(LoadBalance::RoundRobin),
        );
        let t = ab.target(&name, None).unwrap();
        let payload = ab.pin(&t, b"sid");
        // The same URLs in another order (a reload, which carries the replicas over): the
        // session still finds its replica.
        let reordered = server(
            &["http://b/mcp", "http://a/mcp"],
            Some(LoadBalance::RoundRobin),
        );
        let ba = HttpServer::new(&reordered.settings, Some(&ab));
        let moved = ba.target(&name, Some(&payload)).unwrap();
        assert_eq!(
            ba.replicas()[moved.replica].endpoint.url,
            ab.replicas()[t.replica].endpoint.url
        );
        // Its replica removed: unknown.
        let other = server(&["http://c/mcp"], Some(LoadBalance::RoundRobin));
        assert_eq!(
            other.target(&name, Some(&payload)).unwrap_err(),
            GatewayError::UnknownSession
        );
        // A raw id: unknown, balanced or not.
        assert_eq!(
            ab.target(&name, Some(b"raw-upstream-id")).unwrap_err(),
            GatewayError::UnknownSession
        );
        let single = server(&["http://a/mcp"], None);
        assert_eq!(
            single.target(&name, Some(b"raw")).unwrap_err(),
            GatewayError::UnknownSession
        );
        // A single endpoint pins too: its sessions end when the URL changes.
        let t = single.target(&name, None).unwrap();
        let pinned = single.pin(&t, b"sid");
        assert_eq!(
            single.target(&name, Some(&pinned)).unwrap().session,
            Some(&b"sid"[..])
        );
        let elsewhere = server(&["http://c/mcp"], None);
        assert_eq!(
            elsewhere.target(&name, Some(&pinned)).unwrap_err(),
            GatewayError::UnknownSession
        );
        // The same URL, but a new instance (removed, then added back): unknown too.
        let again = server(&["http://a/mcp"], None);
        assert_eq!(
            again.target(&name, Some(&pinned)).unwrap_err(),
            GatewayError::UnknownSession
        );
    }

    #[test]
    fn a_reload_keeps_what_is_known_of_unchanged_replicas() {
        let rr = Some(LoadBalance::RoundRobin);
        let old = server(&["http://a/mcp", "http://b/mcp"], rr);
        for _ in 0..EJECT_AFTER {
            old.replicas()[1].state.failed();
        }
        let next_settings = HttpUpstream {
            endpoints: vec![
                old.replicas()[1].endpoint.clone(),
                HttpEndpoint {
                    url: "http://c/mcp".into(),
                    ..old.replicas()[0].endpoint.clone()
                },
            ],
            balance: rr,
            headers: Vec::new(),
            stable_epochs: false,
        };
        let next = HttpServer::new(&next_settings, Some(&old));
        assert!(Arc::ptr_eq(
            &next.replicas()[0].state,
            &old.replicas()[1].state
        ));
        assert!(!next.replicas()[0].state.is_healthy(), "still ejected");
        assert!(next.replicas()[1].state.is_healthy(), "a new replica");
    }

    #[test]
    fn requests_in_flight_are_counted_until_their_guard_drops() {
        let s = server(
            &["http://a/mcp", "http://b/mcp"],
            Some(LoadBalance::LeastOutstanding),
        );
        let name: Arc<str> = "web".into();
        let first = s.target(&name, None).unwrap();
        let held = s.begin(first.replica);
        // The busy replica is avoided while its request runs.
        for _ in 0..3 {
            assert_ne!(s.target(&name, None).unwrap().replica, first.replica);
        }
        drop(held);
        assert_eq!(s.replicas()[first.replica].state.outstanding(), 0);
        assert!(server(&["http://a/mcp"], None).begin(0).is_none());
    }
}
