//! Rate limiting: token buckets sharded per core, backed by a shared quota pool.
//!
//! Each worker keeps a local bucket per key holding tokens it has *leased* from the pool. The
//! common case (tokens left) touches only worker-local state. A worker that runs dry leases a
//! small batch from the pool, which holds the real token bucket (rate `r`/s, capacity `b`) for
//! the whole process; the pool is behind the [`QuotaPool`] trait so that a Redis-backed pool
//! can replace the in-memory one for a fleet.
//!
//! Accuracy: every admitted request spent a token the pool really had, so over any interval of
//! length T the admitted count is at most `b + r·T + W·(L−1)`, where W is the number of workers
//! and L the lease size, `clamp(min(r, b) / (4·W), 1, 64)`: only tokens already leased (at most
//! L−1 per worker) can be spent outside the interval they were granted in. Leases unused for
//! [`LEASE_TTL`] are dropped, so stranded tokens make the limit stricter, never looser.
//!
//! Across a fleet ([`redis::RedisPool`]) the pool is a node-level stock of tokens leased in
//! batches from Redis; a worker whose local bucket is dry and whose node has no stock awaits
//! the Redis thread's answer for at most the lease timeout, never blocking its thread.

pub mod redis;
pub mod resp;

use crate::auth::RateKey;
use crate::prehashed::PrehashedMap;
use std::cell::RefCell;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A bucket's identity: a keyed 128-bit hash of (identity, tool).
pub type BucketKey = u128;

/// A limit: `rate` tokens per second, at most `burst` banked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Tokens per second.
    pub rate: f64,
    /// Bucket capacity.
    pub burst: u32,
}

/// What a lease returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lease {
    /// Tokens granted (0 = over the limit).
    pub granted: u32,
    /// When `granted` is 0: how long until a token is available.
    pub retry_after: Duration,
}

/// A lease answered now, or one a worker awaits (for at most [`QuotaPool::lease_timeout`]).
pub enum Leased {
    /// The answer.
    Now(Lease),
    /// The answer will come on this channel.
    Later(async_channel::Receiver<Lease>),
}

/// Where workers lease quota: in process (atomics/locks off the hot path) or across a fleet.
pub trait QuotaPool: Send + Sync {
    /// Takes up to `want` tokens from bucket `key`, without waiting on anything remote.
    fn lease(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease;
    /// Takes up to `want` tokens from bucket `key`, possibly answering later; `fleet` names the
    /// bucket across processes (computed only when a pool needs it).
    fn begin_lease(
        &self,
        key: BucketKey,
        fleet: &dyn Fn() -> FleetKey,
        want: u32,
        limit: Limit,
        now: Instant,
    ) -> Leased {
        let _ = fleet;
        Leased::Now(self.lease(key, want, limit, now))
    }
    /// How long a worker awaits a [`Leased::Later`].
    fn lease_timeout(&self) -> Duration {
        Duration::ZERO
    }
    /// The answer when a [`Leased::Later`] did not come in time.
    fn lease_timed_out(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease {
        self.lease(key, want, limit, now)
    }
    /// Gives back `tokens` taken from bucket `key` for a request that then turned out not to
    /// count (decided before the body was read, refused on it by policy). A pool that cannot
    /// (the Redis pool: its stock is shared by the fleet) keeps them spent.
    fn refund(&self, key: BucketKey, tokens: u32, limit: Limit, now: Instant) {
        let _ = (key, tokens, limit, now);
    }
    /// Appends the pool's own metrics (Prometheus text).
    fn render_metrics(&self, out: &mut String) {
        let _ = out;
    }
    /// Drops buckets that are full again (indistinguishable from new ones).
    fn sweep(&self, now: Instant);
    /// Number of buckets held.
    fn len(&self) -> usize;
    /// Whether no buckets are held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of (rate key, tool) under the process's hash keys.
pub fn bucket_key(rate_key: &RateKey, tool: Option<&str>) -> BucketKey {
    static HASHERS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    let (a, b) = HASHERS.get_or_init(|| (RandomState::new(), RandomState::new()));
    let k = (rate_key, tool);
    (u128::from(a.hash_one(k)) << 64) | u128::from(b.hash_one(k))
}

/// A bucket's name across a fleet: the same in every process, derived only by hashing (SHA-256
/// with lengths and a domain separator), so no caller input ever reaches a Redis key as text
/// and no two (identity, tool) pairs can be made to share a bucket short of a hash collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FleetKey {
    /// Hash of the caller alone: all of a caller's buckets share it (a Redis Cluster hash tag).
    pub caller: [u8; 16],
    /// Hash of (caller, tool).
    pub bucket: [u8; 16],
}

/// The fleet-wide name of (rate key, tool).
pub fn fleet_key(rate_key: &RateKey, tool: Option<&str>) -> FleetKey {
    use ring::digest::{Context, SHA256};
    let mut c = Context::new(&SHA256);
    c.update(b"mcp-guard rate caller v1\0");
    match rate_key {
        RateKey::Identity(id) => {
            c.update(&[1]);
            c.update(&(id.len() as u64).to_be_bytes());
            c.update(id.as_bytes());
        }
        RateKey::Address(ip) => {
            c.update(&[2]);
            c.update(ip.to_string().as_bytes());
        }
    }
    let caller_digest = c.finish();
    let mut b = Context::new(&SHA256);
    b.update(b"mcp-guard rate bucket v1\0");
    b.update(caller_digest.as_ref());
    match tool {
        None => b.update(&[0]),
        Some(t) => {
            b.update(&[1]);
            b.update(&(t.len() as u64).to_be_bytes());
            b.update(t.as_bytes());
        }
    }
    let bucket_digest = b.finish();
    let mut key = FleetKey {
        caller: [0; 16],
        bucket: [0; 16],
    };
    key.caller.copy_from_slice(&caller_digest.as_ref()[..16]);
    key.bucket.copy_from_slice(&bucket_digest.as_ref()[..16]);
    key
}

#[derive(Debug, Clone, Copy)]
struct GlobalBucket {
    tokens: f64,
    last: Instant,
    limit: Limit,
}

impl GlobalBucket {
    fn refill(&mut self, now: Instant, limit: Limit) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(f64::from(limit.burst));
        // Workers read their clocks at different moments, so `now` may be behind `last`:
        // moving `last` back would pay the stretch between the two out a second time.
        self.last = self.last.max(now);
        self.limit = limit;
    }
}

const SHARDS: usize = 64;
/// Buckets kept per shard of the in-memory pool (64 Mi buckets in all would be ~4 GiB; this
/// caps the pool at about 1 Mi active keys).
const MAX_PER_SHARD: usize = 16_384;

/// The in-process pool: sharded buckets behind short critical sections. Only leases (a worker
/// that ran dry) come here, never the common case.
pub struct MemoryPool {
    shards: Vec<Mutex<PrehashedMap<BucketKey, GlobalBucket>>>,
}

impl Default for MemoryPool {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(PrehashedMap::default()))
                .collect(),
        }
    }
}

impl QuotaPool for MemoryPool {
    fn lease(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease {
        let shard = &self.shards[(key as usize) % SHARDS];
        // A poisoned shard only means another thread panicked mid-update of plain numbers.
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_PER_SHARD && !map.contains_key(&key) {
            map.retain(|_, b| {
                let mut b2 = *b;
                b2.refill(now, b.limit);
                b2.tokens < f64::from(b.limit.burst)
            });
            if map.len() >= MAX_PER_SHARD {
                // Still full of active keys: refuse new keys rather than grow without bound.
                return Lease {
                    granted: 0,
                    retry_after: Duration::from_secs(1),
                };
            }
        }
        let bucket = map.entry(key).or_insert(GlobalBucket {
            tokens: f64::from(limit.burst),
            last: now,
            limit,
        });
        bucket.refill(now, limit);
        let granted = (bucket.tokens.floor() as u32).min(want);
        if granted > 0 {
            bucket.tokens -= f64::from(granted);
            Lease {
                granted,
                retry_after: Duration::ZERO,
            }
        } else {
            let missing = 1.0 - bucket.tokens;
            let secs = if limit.rate > 0.0 {
                missing / limit.rate
            } else {
                3600.0
            };
            Lease {
                granted: 0,
                retry_after: Duration::from_secs_f64(secs.max(0.001)),
            }
        }
    }

    fn refund(&self, key: BucketKey, tokens: u32, limit: Limit, now: Instant) {
        let shard = &self.shards[(key as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = map.get_mut(&key) {
            bucket.refill(now, limit);
            bucket.tokens = (bucket.tokens + f64::from(tokens)).min(f64::from(limit.burst));
        }
    }

    fn sweep(&self, now: Instant) {
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, b| {
                let mut b2 = *b;
                b2.refill(now, b.limit);
                b2.tokens < f64::from(b.limit.burst)
            });
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// Leased tokens not used within this long are dropped.
pub const LEASE_TTL: Duration = Duration::from_millis(250);
/// Local buckets kept per worker.
const MAX_LOCAL: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct LocalBucket {
    tokens: u32,
    leased_at: Instant,
    empty_until: Option<Instant>,
}

/// A refusal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    /// Until a token is available.
    pub retry_after: Duration,
    /// The limit that refused.
    pub limit: Limit,
}

enum Step {
    Done(Result<(), Limited>),
    Lease { want: u32, keep: bool },
}

/// A worker's local buckets.
pub struct LocalLimiter {
    buckets: RefCell<PrehashedMap<BucketKey, LocalBucket>>,
    workers: u32,
}

impl LocalLimiter {
    /// A limiter for one of `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self {
            buckets: RefCell::new(PrehashedMap::default()),
            workers: workers.max(1) as u32,
        }
    }

    fn lease_size(&self, limit: Limit) -> u32 {
        let base = limit.rate.min(f64::from(limit.burst)) / f64::from(4 * self.workers);
        (base.floor() as u32).clamp(1, 64)
    }

    /// Spends one token of `key`, leasing from `pool` when the local bucket is dry (a pool
    /// that would answer later is answered by its timeout rule at once).
    pub fn check(
        &self,
        pool: &dyn QuotaPool,
        key: BucketKey,
        limit: Limit,
        now: Instant,
    ) -> Result<(), Limited> {
        match self.take_local(key, limit, now) {
            Step::Done(r) => r,
            Step::Lease { want, keep } => {
                let lease = pool.lease(key, want, limit, now);
                self.store(key, lease, keep, limit, now)
            }
        }
    }

    /// [`check`](Self::check), awaiting a pool that answers later for at most its lease
    /// timeout. `fleet` names the bucket across processes; it is computed only on a lease.
    pub async fn check_async(
        &self,
        pool: &dyn QuotaPool,
        key: BucketKey,
        fleet: &dyn Fn() -> FleetKey,
        limit: Limit,
        now: Instant,
    ) -> Result<(), Limited> {
        let (want, keep) = match self.take_local(key, limit, now) {
            Step::Done(r) => return r,
            Step::Lease { want, keep } => (want, keep),
        };
        let lease = match pool.begin_lease(key, fleet, want, limit, now) {
            Leased::Now(l) => l,
            // No borrow of the buckets is held across this await.
            Leased::Later(rx) => {
                match crate::runtime::deadlines::timeout(pool.lease_timeout(), rx.recv()).await {
                    Ok(Ok(l)) => l,
                    _ => pool.lease_timed_out(key, want, limit, Instant::now()),
                }
            }
        };
        self.store(key, lease, keep, limit, now)
    }

    fn take_local(&self, key: BucketKey, limit: Limit, now: Instant) -> Step {
        let mut map = self.buckets.borrow_mut();
        if map.len() >= MAX_LOCAL && !map.contains_key(&key) {
            map.retain(|_, b| now.saturating_duration_since(b.leased_at) < LEASE_TTL);
            if map.len() >= MAX_LOCAL {
                // Too many active keys to cache locally: go to the pool one token at a time.
                return Step::Lease {
                    want: 1,
                    keep: false,
                };
            }
        }
        let b = map.entry(key).or_insert(LocalBucket {
            tokens: 0,
            leased_at: now,
            empty_until: None,
        });
        if b.tokens > 0 && now.saturating_duration_since(b.leased_at) < LEASE_TTL {
            b.tokens -= 1;
            return Step::Done(Ok(()));
        }
        if let Some(until) = b.empty_until
            && now < until
        {
            // Known dry: refuse locally rather than hammer the pool while over the limit.
            return Step::Done(Err(Limited {
                retry_after: until - now,
                limit,
            }));
        }
        Step::Lease {
            want: self.lease_size(limit),
            keep: true,
        }
    }

    fn store(
        &self,
        key: BucketKey,
        lease: Lease,
        keep: bool,
        limit: Limit,
        now: Instant,
    ) -> Result<(), Limited> {
        let refused = Limited {
            retry_after: lease.retry_after,
            limit,
        };
        if !keep {
            return if lease.granted > 0 {
                Ok(())
            } else {
                Err(refused)
            };
        }
        let mut map = self.buckets.borrow_mut();
        // Another request may have evicted or refilled the bucket while this lease was awaited.
        let b = map.entry(key).or_insert(LocalBucket {
            tokens: 0,
            leased_at: now,
            empty_until: None,
        });
        if lease.granted > 0 {
            if b.tokens > 0 && now.saturating_duration_since(b.leased_at) < LEASE_TTL {
                // Keep the older lease time: tokens never outlive LEASE_TTL from their first
                // lease, which is what the accuracy bound counts on.
                b.tokens = b.tokens.saturating_add(lease.granted - 1);
            } else {
                b.tokens = lease.granted - 1;
                b.leased_at = now;
            }
            b.empty_until = None;
            Ok(())
        } else {
            if b.tokens == 0 || now.saturating_duration_since(b.leased_at) >= LEASE_TTL {
                b.tokens = 0;
                b.empty_until = Some(now + lease.retry_after);
            }
            Err(refused)
        }
    }

    /// Gives back one token of `key` spent by [`check`](Self::check): to the local lease while
    /// it still holds tokens (they expire together), else to the pool.
    pub fn refund(&self, pool: &dyn QuotaPool, key: BucketKey, limit: Limit, now: Instant) {
        if let Some(b) = self.buckets.borrow_mut().get_mut(&key)
            && b.tokens > 0
            && now.saturating_duration_since(b.leased_at) < LEASE_TTL
        {
            b.tokens += 1;
            return;
        }
        pool.refund(key, 1, limit, now);
    }

    /// Drops local buckets idle for a while (called periodically by the worker).
    pub fn evict_idle(&self, now: Instant) {
        self.buckets.borrow_mut().retain(|_, b| {
            now.saturating_duration_since(b.leased_at) < Duration::from_secs(5)
                || b.empty_until.is_some_and(|u| u > now)
        });
    }

    /// Local buckets held.
    pub fn len(&self) -> usize {
        self.buckets.borrow().len()
    }

    /// Whether no local buckets are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        rate: 10.0,
        burst: 20,
    };

    #[test]
    fn a_reading_behind_the_last_refill_pays_nothing_out_twice() {
        // Two workers: one refills at t0 + 1 s, the other's reading (taken earlier, applied
        // later) is t0 + 0.5 s. The stretch between them was paid by the first refill.
        let t0 = Instant::now();
        let mut bucket = GlobalBucket {
            tokens: 0.0,
            last: t0,
            limit: LIMIT,
        };
        bucket.refill(t0 + Duration::from_secs(1), LIMIT);
        assert_eq!(bucket.tokens, 10.0);
        bucket.refill(t0 + Duration::from_millis(500), LIMIT);
        bucket.refill(t0 + Duration::from_secs(1), LIMIT);
        assert_eq!(bucket.tokens, 10.0, "half a second of tokens minted twice");
    }

    #[test]
    fn burst_then_refill_at_rate() {
        let pool = MemoryPool::default();
        let local = LocalLimiter::new(1);
        let key = bucket_key(&RateKey::Identity("alice"), None);
        let t0 = Instant::now();
        let admitted = (0..100)
            .filter(|_| local.check(&pool, key, LIMIT, t0).is_ok())
            .count();
        assert_eq!(admitted, 20);
        let err = local.check(&pool, key, LIMIT, t0).unwrap_err();
        assert!(err.retry_after <= Duration::from_millis(100));
        // One second later, ten more tokens.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..100)
            .filter(|_| local.check(&pool, key, LIMIT, t1).is_ok())
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn a_refunded_token_can_be_spent_again_and_never_overfills() {
        let pool = MemoryPool::default();
        let local = LocalLimiter::new(4);
        let key = bucket_key(&RateKey::Identity("carol"), None);
        let t0 = Instant::now();
        let limit = Limit {
            rate: 1.0,
            burst: 3,
        };
        for _ in 0..10 {
            local.check(&pool, key, limit, t0).unwrap();
            local.refund(&pool, key, limit, t0);
        }
        let admitted = (0..10)
            .filter(|_| local.check(&pool, key, limit, t0).is_ok())
            .count();
        assert_eq!(admitted, 3);
        // Refunds past the burst are dropped.
        for _ in 0..10 {
            local.refund(&pool, key, limit, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        let admitted = (0..10)
            .filter(|_| local.check(&pool, key, limit, t1).is_ok())
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn many_workers_share_one_limit_within_the_bound() {
        let pool = MemoryPool::default();
        let workers: Vec<LocalLimiter> = (0..8).map(|_| LocalLimiter::new(8)).collect();
        let key = bucket_key(&RateKey::Identity("bob"), None);
        let t0 = Instant::now();
        let limit = Limit {
            rate: 1000.0,
            burst: 500,
        };
        let mut admitted = 0;
        for i in 0..10_000 {
            if workers[i % 8].check(&pool, key, limit, t0).is_ok() {
                admitted += 1;
            }
        }
        // No time passes: at most the burst.
        assert!(admitted <= 500, "{admitted}");
        assert!(admitted >= 500 - 8 * 15, "{admitted}");
    }

    #[test]
    fn keys_are_separate_and_full_buckets_are_swept() {
        let pool = MemoryPool::default();
        let local = LocalLimiter::new(1);
        let t0 = Instant::now();
        assert!(
            local
                .check(
                    &pool,
                    bucket_key(&RateKey::Identity("a"), Some("t")),
                    LIMIT,
                    t0
                )
                .is_ok()
        );
        assert!(
            local
                .check(&pool, bucket_key(&RateKey::Identity("a"), None), LIMIT, t0)
                .is_ok()
        );
        assert_eq!(pool.len(), 2);
        pool.sweep(t0 + Duration::from_secs(10));
        assert_eq!(pool.len(), 0);
        local.evict_idle(t0 + Duration::from_secs(10));
        assert!(local.is_empty());
    }
}
