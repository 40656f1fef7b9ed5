//! A JWKS kept fresh off the workers: a thread of its own fetches `jwks_url` at start and every
//! `cache_duration_secs`, and early when a worker meets a token signed with a key it does not
//! know (a rotation at the IdP) — at most once per [`EARLY_REFRESH_EVERY`], so a flood of
//! tokens with random `kid`s cannot make the gateway hammer the IdP. Workers read the current
//! key set through an `ArcSwap` and never wait: a failed fetch keeps the keys already held.

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
    every: Duration,
    keys: ArcSwap<KeySet>,
    /// Fetches that succeeded: a verified-token cache is valid for one of them only (a key
    /// removed at the IdP stops its cached tokens at the next fetch).
    pub fetched: AtomicU64,
    /// Asks the thread for an early refresh; `None` until it runs.
    wake: Mutex<Option<SyncSender<()>>>,
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
            every,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetched: AtomicU64::new(0),
            wake: Mutex::new(None),
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

    /// Whether it is fetched from `url` every `every` (so a reload can keep it, keys and all).
    pub fn is_for(&self, url: &IdpUrl, every: Duration) -> bool {
        self.url == *url && self.every == every
    }

    /// A worker met an unknown `kid`: ask for an early refresh (never waits; at most one is
    /// queued, and the thread rate-limits them).
    pub fn refresh_soon(&self) {
        if let Ok(wake) = self.wake.lock()
            && let Some(tx) = wake.as_ref()
            && let Err(TrySendError::Disconnected(_)) = tx.try_send(())
        {
            tracing::warn!(target: "mcp_guard::auth", "JWKS refresher for {} has stopped", self.url.url);
        }
    }

    /// Starts the refresher thread (once); it ends when the last holder of the key set drops
    /// it (its configuration snapshot was replaced and is gone).
    pub fn start(self: &Arc<Self>) {
        let Ok(mut wake) = self.wake.lock() else {
            return;
        };
        if wake.is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        *wake = Some(tx);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("jwks".into())
            .spawn(move || run(weak, rx));
        if let Err(e) = spawned {
            tracing::error!(target: "mcp_guard::auth", "cannot start the JWKS thread: {e}");
        }
    }

    /// One fetch; on success the new keys replace the old ones.
    fn fetch(&self) -> Result<usize, String> {
        let answer = fetch::get(&self.url, &[], FETCH_TIMEOUT)?;
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
        self.fetched.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }
}

fn run(jwks: std::sync::Weak<Jwks>, wake: Receiver<()>) {
    let mut last_fetch: Option<Instant> = None;
    let mut wait = Duration::ZERO;
    loop {
        let early = match wake.recv_timeout(wait) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(jwks) = jwks.upgrade() else { return };
        if early && last_fetch.is_some_and(|t| t.elapsed() < EARLY_REFRESH_EVERY) {
            // Too soon after the last fetch: the flood is not the IdP's problem.
            let left = EARLY_REFRESH_EVERY
                .saturating_sub(last_fetch.map_or(Duration::ZERO, |t| t.elapsed()));
            wait = left.min(jwks.every);
            continue;
        }
        last_fetch = Some(Instant::now());
        wait = match jwks.fetch() {
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
