//! A JWKS kept fresh off the workers: a thread of its own fetches it at start and every
//! `cache_duration_secs`, and early when a worker meets a token signed with a key it does not
//! know (a rotation at the IdP). Workers read the current key set through an `ArcSwap`; a
//! failed fetch keeps the keys already held.
//!
//! An early refresh is something a request can wait for: [`Jwks::refresh_now`] hands back a
//! receiver that closes when the fetch ends, so every request that met the unknown `kid`
//! waits on the one fetch and is then verified with the new keys. Fetches are at most one per
//! [`EARLY_REFRESH_EVERY`] (scheduled ones count): a request asking sooner is refused at once,
//! so a flood of tokens with random `kid`s cannot make the gateway hammer the IdP.
//!
//! The keys' URL is either configured (`[auth.jwt] jwks_url`) or discovered from an
//! authorization server's metadata (`[auth.oauth]`: RFC 8414, then OpenID Connect discovery),
//! once, by the same thread.

use super::fetch::{self, IdpUrl};
use super::jwt::KeySet;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The soonest an unknown `kid` may trigger another fetch after the last one.
pub const EARLY_REFRESH_EVERY: Duration = Duration::from_secs(10);
/// One fetch, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed fetch, the next try comes this soon (then the regular interval).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15);

/// The key set of one `jwks_url`, shared by every worker and the thread that refreshes it.
pub struct Jwks {
    url: IdpUrl,
    /// `Some(issuer)`: `url` is the issuer, and the keys' URL is discovered from its metadata.
    discover: Option<String>,
    every: Duration,
    keys: ArcSwap<KeySet>,
    /// Fetches that succeeded: a verified-token cache is valid for one of them only (a key
    /// removed at the IdP stops its cached tokens at the next fetch).
    pub fetched: AtomicU64,
    control: Mutex<Control>,
}

/// What workers and the thread share about fetches (touched only when a token names a key
/// that is not held, and once per fetch).
#[derive(Default)]
struct Control {
    /// Asks the thread for an early refresh; `None` until it runs.
    wake: Option<SyncSender<()>>,
    /// When the last fetch (scheduled or early) started.
    last_fetch: Option<Instant>,
    /// The fetch under way, if any: its receivers close when it ends (the sender is dropped).
    inflight: Option<(async_channel::Sender<()>, async_channel::Receiver<()>)>,
}

/// The answer to a request for an early refresh.
#[derive(Debug)]
pub enum Refresh {
    /// A fetch is under way: the receiver closes when it ends.
    Wait(async_channel::Receiver<()>),
    /// No fetch now (the last one was too recent, or the refresher is not running).
    Refused,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url.url)
            .field("keys", &self.keys.load().len())
            .finish()
    }
}

impl Jwks {
    /// A key set for `url`, empty until the thread has fetched it.
    pub fn new(url: IdpUrl, every: Duration) -> Arc<Jwks> {
        Arc::new(Jwks {
            url,
            discover: None,
            every,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetched: AtomicU64::new(0),
            control: Mutex::new(Control::default()),
        })
    }

    /// A key set held as given and never fetched (a static set; benches and tests). Asking it
    /// for a refresh is refused.
    pub fn with_keys(url: IdpUrl, keys: KeySet) -> Arc<Jwks> {
        Arc::new(Jwks {
            url,
            discover: None,
            every: Duration::MAX,
            keys: ArcSwap::from_pointee(keys),
            fetched: AtomicU64::new(1),
            control: Mutex::new(Control::default()),
        })
    }

    /// The key set of the authorization server `issuer` (its `jwks_uri`, from its metadata).
    pub fn discovered(issuer: IdpUrl, every: Duration) -> Arc<Jwks> {
        Arc::new(Jwks {
            discover: Some(issuer.url.clone()),
            url: issuer,
            every,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetched: AtomicU64::new(0),
            control: Mutex::new(Control::default()),
        })
    }

    /// The keys now.
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// The URL it is fetched from.
    pub fn url(&self) -> &IdpUrl {
        &self.url
    }

    /// How often it is fetched.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Whether `other` fetches the same keys as often (so a reload can keep this one, keys
    /// and all).
    pub fn same_source(&self, other: &Jwks) -> bool {
        self.url == other.url && self.discover == other.discover && self.every == other.every
    }

    /// A worker met an unknown `kid` (or holds no keys yet): join the fetch under way, or start
    /// one unless the last began less than [`EARLY_REFRESH_EVERY`] ago. Never blocks on the
    /// network; the lock is held for a few instructions.
    ///
    /// `seen` is [`Jwks::fetched`] as the caller read it before it looked at the keys: when a
    /// fetch ended since, the keys it needs may be held now, and the answer is a wait that is
    /// already over (check again at once) rather than a refusal for asking too soon.
    pub fn refresh_now(&self, seen: u64) -> Refresh {
        let Ok(mut control) = self.control.lock() else {
            return Refresh::Refused;
        };
        if let Some((_, rx)) = &control.inflight {
            return Refresh::Wait(rx.clone());
        }
        if self.fetched.load(Ordering::Acquire) != seen {
            let (_, over) = async_channel::bounded(1);
            return Refresh::Wait(over);
        }
        if control
            .last_fetch
            .is_some_and(|t| t.elapsed() < EARLY_REFRESH_EVERY)
        {
            return Refresh::Refused;
        }
        let Some(wake) = control.wake.clone() else {
            return Refresh::Refused;
        };
        if let Err(TrySendError::Disconnected(_)) = wake.try_send(()) {
            tracing::warn!(target: "mcp_guard::auth", "JWKS refresher for {} has stopped", self.url.url);
            return Refresh::Refused;
        }
        let (tx, rx) = async_channel::bounded(1);
        control.last_fetch = Some(Instant::now());
        control.inflight = Some((tx, rx.clone()));
        Refresh::Wait(rx)
    }

    /// Starts the refresher thread (once); it ends when the last holder of the key set drops
    /// it (its configuration snapshot was replaced and is gone). Requests that arrive before
    /// the first fetch ends wait for it.
    pub fn start(self: &Arc<Self>) {
        let Ok(mut control) = self.control.lock() else {
            return;
        };
        if control.wake.is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        control.wake = Some(tx);
        control.last_fetch = Some(Instant::now());
        control.inflight = Some(async_channel::bounded(1));
        drop(control);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("jwks".into())
            .spawn(move || run(weak, rx));
        if let Err(e) = spawned {
            tracing::error!(target: "mcp_guard::auth", "cannot start the JWKS thread: {e}");
        }
    }

    /// One fetch ends, however it went: the requests waiting for it are woken.
    fn fetch_ended(&self) {
        if let Ok(mut control) = self.control.lock() {
            control.inflight = None;
        }
    }

    /// The fetch starts (a scheduled one counts against early refreshes too, and requests
    /// that meet an unknown `kid` meanwhile wait for it).
    fn fetch_starts(&self) {
        if let Ok(mut control) = self.control.lock() {
            control.last_fetch = Some(Instant::now());
            if control.inflight.is_none() {
                control.inflight = Some(async_channel::bounded(1));
            }
        }
    }

    /// One fetch; on success the new keys replace the old ones. `resolved` is the keys' URL
    /// once discovered (kept by the thread; discovery runs until it succeeds once).
    fn fetch(&self, resolved: &mut Option<IdpUrl>) -> Result<usize, String> {
        let url = match (&self.discover, resolved.as_ref()) {
            (None, _) => &self.url,
            (Some(_), Some(url)) => url,
            (Some(issuer), None) => {
                let found = super::oauth::discover_jwks_uri(&self.url, issuer, FETCH_TIMEOUT)?;
                tracing::info!(target: "mcp_guard::auth", "authorization server {issuer} publishes its keys at {}", found.url);
                resolved.insert(found)
            }
        };
        let answer = fetch::get(url, &[], FETCH_TIMEOUT)?;
        if answer.status != 200 {
            return Err(format!("HTTP {}", answer.status));
        }
        let keys = KeySet::from_jwks(&answer.body)?;
        // An IdP that publishes no usable key has revoked them all: honoured (every token is
        // refused until keys come back), never answered by keeping the old ones trusted.
        if keys.is_empty() {
            tracing::warn!(target: "mcp_guard::auth", "JWKS at {} holds no usable signing key: every token is refused", self.url.url);
        }
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        self.fetched.fetch_add(1, Ordering::Release);
        Ok(n)
    }
}

fn run(jwks: std::sync::Weak<Jwks>, wake: Receiver<()>) {
    let mut wait = Duration::ZERO;
    let mut resolved = None;
    loop {
        // Early wakes are rate-limited where they are asked for (`refresh_now`).
        match wake.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(jwks) = jwks.upgrade() else { return };
        jwks.fetch_starts();
        let fetched = jwks.fetch(&mut resolved);
        jwks.fetch_ended();
        wait = match fetched {
            Ok(n) => {
                tracing::info!(target: "mcp_guard::auth", "JWKS loaded from {}: {n} key(s)", jwks.url.url);
                jwks.every
            }
            Err(e) => {
                tracing::warn!(
                    target: "mcp_guard::auth",
                    "JWKS fetch from {} failed: {e}; keeping the {} key(s) held",
                    jwks.url.url,
                    jwks.keys.load().len()
                );
                RETRY_AFTER_FAILURE.min(jwks.every)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_wake_when_the_fetch_ends_and_a_refresh_too_soon_is_refused_at_once() {
        // An IdP that takes the connection and holds it until told to hang up: the fetch is
        // under way until then, and fails (which ends it all the same).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = IdpUrl::parse(&format!(
            "http://{}/jwks.json",
            listener.local_addr().unwrap()
        ))
        .unwrap();
        let (hang_up, told) = std::sync::mpsc::channel::<()>();
        let idp = std::thread::spawn(move || {
            let conn = listener.accept();
            let _ = told.recv();
            drop(conn);
        });
        let jwks = Jwks::new(url, Duration::from_secs(3600));
        assert!(
            matches!(jwks.refresh_now(0), Refresh::Refused),
            "no refresher yet"
        );
        jwks.start();
        // The first fetch is under way: requests wait for it, all on the same fetch.
        let (Refresh::Wait(a), Refresh::Wait(b)) = (jwks.refresh_now(0), jwks.refresh_now(0))
        else {
            panic!("the first fetch is not awaitable");
        };
        hang_up.send(()).unwrap();
        assert!(a.recv_blocking().is_err() && b.recv_blocking().is_err());
        idp.join().unwrap();
        // It has ended (failed); another one so soon is refused without waiting.
        assert!(matches!(jwks.refresh_now(0), Refresh::Refused));
        assert_eq!(jwks.keys().len(), 0);
        // A request that looked at the keys before a fetch ended (it saw an older epoch) is
        // told to look again at once, not refused for asking too soon.
        jwks.fetched.fetch_add(1, Ordering::Release);
        let Refresh::Wait(over) = jwks.refresh_now(0) else {
            panic!("a fetch that ended since the request looked is not a refusal");
        };
        assert!(over.recv_blocking().is_err(), "the wait is already over");
        assert!(matches!(jwks.refresh_now(1), Refresh::Refused));
    }
}
