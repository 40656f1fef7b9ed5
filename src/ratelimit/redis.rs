//! The fleet quota pool: one token bucket per key in Redis, shared by every replica. This node
//! keeps a small stock of tokens leased from Redis in batches (one round trip per batch, an
//! atomic Lua script on Redis's clock); workers lease from that stock, and when it is dry they
//! hand the lease to the Redis thread (a synchronous client on a thread of its own) and await
//! its answer for at most the lease timeout. While Redis is unreachable the `redis_failure`
//! rule answers instead, and the thread probes until Redis is back. A Redis Cluster is
//! followed through its `MOVED`/`ASK` redirections, by each key's hash-tag slot.
//!
//! Accuracy: a token is admitted at most [`super::LEASE_TTL`] after this node received it (node
//! stock) plus [`super::LEASE_TTL`] after a worker received it, and Redis grants at most
//! `b + r·t` tokens in any interval `t`, whatever the number of replicas. So over any interval
//! T the fleet admits at most `b + r·(T + 2·LEASE_TTL + lease_timeout)`; stranded tokens
//! (a replica that leased and then went quiet) only make it stricter.

use super::resp::{Conn, RedisUrl, Reply};
use super::{BucketKey, FleetKey, LEASE_TTL, Lease, Leased, Limit, MemoryPool, QuotaPool};
use crate::config::schema::RedisFailure;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `[rate_limit]`'s Redis settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// The server (its password never prints).
    pub url: RedisUrl,
    /// For `rediss://`: the roots its certificate must chain to (`None`: the Mozilla set).
    pub ca: Option<super::resp::CaRoots>,
    /// What happens while Redis is unreachable.
    pub failure: RedisFailure,
    /// Replicas expected to share the limits (the `local` fallback's divisor).
    pub replicas: u32,
    /// How long a request may wait on a lease; also each Redis command's timeout.
    pub lease_timeout: Duration,
}

/// Leases waiting for the Redis thread, across all workers; beyond it the failure rule answers.
const JOB_QUEUE: usize = 4096;
/// How often the thread tries Redis again while it is unreachable.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const SHARDS: usize = 64;
/// Stocked keys per shard (beyond it a batch's surplus is dropped: stricter, never looser).
const MAX_STOCK_PER_SHARD: usize = 4096;
/// Latency histogram bounds, seconds.
const LATENCY_BOUNDS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The token bucket, on Redis's clock (microseconds since the epoch; never rewound if the
/// clock steps back after a failover). Returns {granted, microseconds until a token}.
/// Unreadable state (not written by this script) counts as a full bucket.
const SCRIPT: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 't', 'n')
local last = tonumber(state[1])
local tokens = tonumber(state[2])
if last == nil or tokens == nil then
  tokens = burst
  last = now
end
if now > last then
  tokens = math.min(burst, tokens + (now - last) * rate / 1000000)
else
  now = last
end
if tokens > burst then tokens = burst end
local granted = math.min(want, math.floor(tokens))
if granted < 0 then granted = 0 end
tokens = tokens - granted
local wait = 0
if granted == 0 then
  if rate > 0 then wait = math.ceil((1 - tokens) * 1000000 / rate) else wait = 3600000000 end
end
redis.call('HSET', KEYS[1], 't', string.format('%d', now), 'n', string.format('%.6f', tokens))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {granted, wait}
"#;

#[derive(Debug, Clone, Copy)]
struct Stock {
    tokens: u32,
    at: Instant,
}

struct Job {
    key: BucketKey,
    fleet: FleetKey,
    want: u32,
    limit: Limit,
    deadline: Instant,
    reply: async_channel::Sender<Lease>,
}

#[derive(Default)]
struct Stats {
    leases: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
    tokens: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Stats {
    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, slot) in LATENCY_BOUNDS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                slot.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }
}

struct Inner {
    settings: RedisSettings,
    /// Whether the last exchange with Redis worked (leases are asked of it).
    healthy: AtomicBool,
    /// Whether limits are shared: a lease went through since the last failure (or Redis took
    /// the first connection). What the fallback gauge and the log tell: a Redis that takes
    /// connections but refuses leases must not be shown back at every reconnection.
    shared: AtomicBool,
    /// Whether a failure was logged and its end not yet.
    down_logged: AtomicBool,
    stock: Vec<Mutex<crate::prehashed::PrehashedMap<BucketKey, Stock>>>,
    /// The `local` rule's buckets (this node's share of each limit).
    fallback: MemoryPool,
    stats: Stats,
}

impl Inner {
    fn take_stock(&self, key: BucketKey, want: u32, now: Instant) -> Option<Lease> {
        let mut map = self.stock[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let s = map.get_mut(&key)?;
        if s.tokens == 0 || now.saturating_duration_since(s.at) >= LEASE_TTL {
            map.remove(&key);
            return None;
        }
        let granted = s.tokens.min(want);
        s.tokens -= granted;
        if s.tokens == 0 {
            map.remove(&key);
        }
        Some(Lease {
            granted,
            retry_after: Duration::ZERO,
        })
    }

    fn put_stock(&self, key: BucketKey, tokens: u32, now: Instant) {
        if tokens == 0 {
            return;
        }
        let mut map = self.stock[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_STOCK_PER_SHARD && !map.contains_key(&key) {
            map.retain(|_, s| now.saturating_duration_since(s.at) < LEASE_TTL);
            if map.len() >= MAX_STOCK_PER_SHARD {
                return;
            }
        }
        // A fresh batch replaces what is left of an older one: an old token must not live on
        // under a new timestamp.
        map.insert(key, Stock { tokens, at: now });
    }

    /// The `redis_failure` rule's answer.
    fn failure_rule(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease {
        match self.settings.failure {
            RedisFailure::Local => self.local_share(key, want, limit, now),
            RedisFailure::Open => Lease {
                granted: want,
                retry_after: Duration::ZERO,
            },
            // Workers remember a refusal for its retry-after: no longer than until the next
            // probe, so shared limits resume soon after Redis does.
            RedisFailure::Closed => Lease {
                granted: 0,
                retry_after: PROBE_EVERY,
            },
        }
    }

    /// This node's share of `limit`, counted here alone (`redis_failure = "local"`).
    fn local_share(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease {
        let n = self.settings.replicas.max(1);
        let share = Limit {
            rate: limit.rate / f64::from(n),
            burst: limit.burst.div_ceil(n).max(1),
        };
        self.fallback.lease(key, want, share, now)
    }

    /// The answer to a lease Redis did not give in time though it is reachable (slow, or this
    /// node's queue of leases full). `open` admits without limit only while Redis is
    /// unreachable: here it takes the node's local share instead. Admitting every late lease
    /// let any caller past its limit under load alone, and the load it let through made more
    /// leases late (red team, fleet F4). `local` and `closed` answer as they do for an outage.
    fn late_rule(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease {
        match self.settings.failure {
            RedisFailure::Open => self.local_share(key, want, limit, now),
            _ => self.failure_rule(key, want, limit, now),
        }
    }

    fn batch(&self, want: u32, limit: Limit) -> u32 {
        let share = limit.rate.min(f64::from(limit.burst))
            / (4.0 * f64::from(self.settings.replicas.max(1)));
        (share.floor() as u32).clamp(1, 256).max(want)
    }
}

/// Where workers lease quota when limits are shared through Redis.
pub struct RedisPool {
    inner: Arc<Inner>,
    jobs: SyncSender<Job>,
}

impl RedisPool {
    /// Connects (within the lease timeout; a failure is logged and the failure rule applies
    /// until Redis answers) and starts the Redis thread.
    pub fn start(settings: RedisSettings) -> Result<RedisPool, String> {
        let inner = Arc::new(Inner {
            healthy: AtomicBool::new(false),
            shared: AtomicBool::new(false),
            down_logged: AtomicBool::new(false),
            stock: (0..SHARDS)
                .map(|_| Mutex::new(crate::prehashed::PrehashedMap::default()))
                .collect(),
            fallback: MemoryPool::default(),
            stats: Stats::default(),
            settings,
        });
        let mut link = Link::new(inner.clone());
        match link.connect() {
            Ok(()) => tracing::info!(
                target: "mcp_guard::ratelimit",
                "rate limits shared through Redis at {}",
                inner.settings.url
            ),
            Err(e) => {
                inner.down_logged.store(true, Relaxed);
                tracing::warn!(
                    target: "mcp_guard::ratelimit",
                    "Redis at {} is unreachable ({e}); {} until it answers",
                    inner.settings.url,
                    rule_phrase(inner.settings.failure)
                )
            }
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(JOB_QUEUE);
        std::thread::Builder::new()
            .name("ratelimit-redis".into())
            .spawn(move || link.run(rx))
            .map_err(|e| format!("cannot start the Redis thread: {e}"))?;
        Ok(RedisPool { inner, jobs: tx })
    }

    /// Whether Redis answered the last exchange.
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Relaxed)
    }
}

fn rule_phrase(rule: RedisFailure) -> &'static str {
    match rule {
        RedisFailure::Local => "limits apply per node (redis_failure = \"local\")",
        RedisFailure::Open => "requests are not limited (redis_failure = \"open\")",
        RedisFailure::Closed => "limited requests are refused (redis_failure = \"closed\")",
    }
}

impl QuotaPool for RedisPool {
    /// Without waiting: this node's stock, else the failure rule.
    fn lease(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease {
        self.inner
            .take_stock(key, want, now)
            .unwrap_or_else(|| self.inner.failure_rule(key, want, limit, now))
    }

    fn begin_lease(
        &self,
        key: BucketKey,
        fleet: &dyn Fn() -> FleetKey,
        want: u32,
        limit: Limit,
        now: Instant,
    ) -> Leased {
        if !self.inner.healthy.load(Relaxed) {
            return Leased::Now(self.inner.failure_rule(key, want, limit, now));
        }
        if let Some(l) = self.inner.take_stock(key, want, now) {
            return Leased::Now(l);
        }
        let (reply, rx) = async_channel::bounded(1);
        let job = Job {
            key,
            fleet: fleet(),
            want,
            limit,
            deadline: now + self.inner.settings.lease_timeout,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => Leased::Later(rx),
            Err(TrySendError::Full(_)) => {
                self.inner.stats.failures.fetch_add(1, Relaxed);
                Leased::Now(self.inner.late_rule(key, want, limit, now))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.inner.stats.failures.fetch_add(1, Relaxed);
                Leased::Now(self.inner.failure_rule(key, want, limit, now))
            }
        }
    }

    fn lease_timeout(&self) -> Duration {
        self.inner.settings.lease_timeout
    }

    fn lease_timed_out(&self, key: BucketKey, want: u32, limit: Limit, now: Instant) -> Lease {
        self.inner.stats.timeouts.fetch_add(1, Relaxed);
        self.inner.late_rule(key, want, limit, now)
    }

    fn sweep(&self, now: Instant) {
        for shard in &self.inner.stock {
            shard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, s| now.saturating_duration_since(s.at) < LEASE_TTL);
        }
        self.inner.fallback.sweep(now);
    }

    fn len(&self) -> usize {
        let stocked: usize = self
            .inner
            .stock
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum();
        stocked + self.inner.fallback.len()
    }

    fn render_metrics(&self, out: &mut String) {
        let s = &self.inner.stats;
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "mcp_guard_ratelimit_redis_leases_total",
            "counter",
            "Batches of tokens leased from Redis (one round trip each).",
            s.leases.load(Relaxed),
        );
        metric(
            "mcp_guard_ratelimit_redis_tokens_total",
            "counter",
            "Tokens Redis granted to this node.",
            s.tokens.load(Relaxed),
        );
        metric(
            "mcp_guard_ratelimit_redis_lease_failures_total",
            "counter",
            "Leases Redis did not answer (unreachable, an error, or the lease queue full); the redis_failure rule answered them.",
            s.failures.load(Relaxed),
        );
        metric(
            "mcp_guard_ratelimit_redis_lease_timeouts_total",
            "counter",
            "Requests that waited the whole lease timeout; answered by the node's share (redis_failure open or local) or refused (closed).",
            s.timeouts.load(Relaxed),
        );
        metric(
            "mcp_guard_ratelimit_redis_fallback_active",
            "gauge",
            "1 from a failed lease (or connection) until a lease goes through again: the redis_failure rule applies.",
            u64::from(!self.inner.shared.load(Relaxed)),
        );
        let name = "mcp_guard_ratelimit_redis_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Round trip of one lease to Redis.\n# TYPE {name} histogram"
        );
        for (bound, slot) in LATENCY_BOUNDS.iter().zip(&s.latency_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                slot.load(Relaxed)
            );
        }
        let count = s.latency_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            s.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The Redis thread's side: the connection and what it needs to lease.
struct Link {
    inner: Arc<Inner>,
    /// The configured server.
    conn: Option<Conn>,
    /// Redis Cluster nodes a redirection named, by `host:port`.
    nodes: HashMap<String, Conn>,
    /// Slots a `MOVED` placed on another node.
    slots: HashMap<u16, String>,
    sha: String,
    next_probe: Instant,
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The Redis key of a bucket: fixed text and hashes only. The `{…}` hash tag is the caller's
/// hash, so all of one caller's buckets live on one Redis Cluster slot.
pub fn redis_key(fleet: &FleetKey) -> String {
    format!("mcpg:rl:{{{}}}:{}", hex(&fleet.caller), hex(&fleet.bucket))
}

/// How long a bucket's key outlives its last lease: twice the time to refill from empty, and at
/// least a second (an absent key reads as a full bucket, which it would be by then anyway).
fn key_ttl_ms(limit: Limit) -> u64 {
    let refill = if limit.rate > 0.0 {
        f64::from(limit.burst) / limit.rate
    } else {
        86_400.0
    };
    ((refill * 2000.0).ceil() as u64).clamp(1000, 86_400_000)
}

impl Link {
    fn new(inner: Arc<Inner>) -> Link {
        Link {
            inner,
            conn: None,
            nodes: HashMap::new(),
            slots: HashMap::new(),
            sha: String::new(),
            next_probe: Instant::now(),
        }
    }

    fn connect(&mut self) -> Result<(), String> {
        let settings = &self.inner.settings;
        let mut conn = Conn::open(&settings.url, settings.ca.as_ref(), settings.lease_timeout)?;
        match conn.command(&[b"SCRIPT", b"LOAD", SCRIPT.as_bytes()])? {
            Reply::Bulk(Some(sha)) => self.sha = String::from_utf8_lossy(&sha).into_owned(),
            other => return Err(format!("SCRIPT LOAD answered {other:?}")),
        }
        self.conn = Some(conn);
        self.nodes.clear();
        // Healthy only once a lease goes through: a Redis that takes connections and refuses
        // every lease (out of memory, scripts refused) would otherwise be declared back at
        // every probe, and the fallback gauge and the log would flap with it.
        if let Err(e) = self.probe_lease() {
            self.conn = None;
            self.nodes.clear();
            return Err(e);
        }
        self.inner.healthy.store(true, Relaxed);
        // The first connection shares limits at once; after a failure, only a lease that goes
        // through says so (below).
        if !self.inner.down_logged.load(Relaxed) {
            self.inner.shared.store(true, Relaxed);
        }
        Ok(())
    }

    /// The lease script on a key of its own, asking for nothing (it writes, as a lease does).
    fn probe_lease(&mut self) -> Result<(), String> {
        self.eval_routed(
            PROBE_KEY,
            &[b"1", PROBE_KEY.as_bytes(), b"1", b"1", b"0", b"1000"],
        )
        .and_then(parse_grant)
        .map(|_| ())
    }

    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            let job = match jobs.recv_timeout(PROBE_EVERY) {
                Ok(j) => Some(j),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let now = Instant::now();
            if self.conn.is_none() && now >= self.next_probe {
                self.next_probe = now + PROBE_EVERY;
                // Back for leases; "answers again" waits for one that goes through.
                let _ = self.connect();
            }
            let Some(job) = job else { continue };
            // The worker stopped waiting (and applied the failure rule): nothing to answer.
            if job.reply.is_closed() || now >= job.deadline {
                continue;
            }
            let lease = match self.inner.take_stock(job.key, job.want, now) {
                Some(l) => l,
                None => self.lease(&job),
            };
            let _ = job.reply.try_send(lease);
        }
    }

    /// The connection for `node` (`None`: the configured server), opened if need be.
    fn conn_for(&mut self, node: Option<&str>) -> Result<&mut Conn, String> {
        let Some(addr) = node else {
            return self
                .conn
                .as_mut()
                .ok_or_else(|| "not connected".to_string());
        };
        if !self.nodes.contains_key(addr) {
            if self.nodes.len() >= MAX_NODES {
                return Err(format!("more than {MAX_NODES} cluster nodes named"));
            }
            let settings = &self.inner.settings;
            let url = settings.url.at_node(addr)?;
            let conn = Conn::open(&url, settings.ca.as_ref(), settings.lease_timeout)?;
            self.nodes.insert(addr.to_string(), conn);
        }
        self.nodes
            .get_mut(addr)
            .ok_or_else(|| "cluster node vanished".to_string())
    }

    /// Runs the lease script for `args` on the node serving `key`'s slot, following up to
    /// two cluster redirections (`MOVED` updates the slot map; `ASK` is for this one command).
    fn eval_routed(&mut self, key: &str, args: &[&[u8]]) -> Result<Reply, String> {
        let slot = key_slot(key.as_bytes());
        let mut node = self.slots.get(&slot).cloned();
        let mut asking = false;
        for _ in 0..3 {
            let mut sha = std::mem::take(&mut self.sha);
            let answer = self
                .conn_for(node.as_deref())
                .and_then(|conn| eval_script(conn, &mut sha, args, asking));
            self.sha = sha;
            let answer = answer?;
            match redirection(&answer) {
                Some((moved, target)) => {
                    let target = if target.starts_with(':') {
                        // Redis 7 may leave the host out: the same host as the one asked.
                        format!("{}{target}", self.inner.settings.url.host_for_redirect())
                    } else {
                        target
                    };
                    // The map holds at most one entry per slot (16384).
                    if moved {
                        self.slots.insert(slot, target.clone());
                    }
                    asking = !moved;
                    node = Some(target);
                }
                None => return Ok(answer),
            }
        }
        Err("too many cluster redirections".into())
    }

    fn lease(&mut self, job: &Job) -> Lease {
        let inner = self.inner.clone();
        if self.conn.is_none() {
            return inner.failure_rule(job.key, job.want, job.limit, Instant::now());
        }
        let batch = inner.batch(job.want, job.limit);
        let key = redis_key(&job.fleet);
        let rate = format!("{}", job.limit.rate);
        let burst = job.limit.burst.to_string();
        let want = batch.to_string();
        let ttl = key_ttl_ms(job.limit).to_string();
        let started = Instant::now();
        let answer = self.eval_routed(
            &key,
            &[
                b"1",
                key.as_bytes(),
                rate.as_bytes(),
                burst.as_bytes(),
                want.as_bytes(),
                ttl.as_bytes(),
            ],
        );
        let now = Instant::now();
        match answer.and_then(parse_grant) {
            Ok((granted, wait_us)) => {
                // Never more than was asked: a server answering more would lift the limit.
                let granted = granted.min(batch);
                inner.stats.observe(now.saturating_duration_since(started));
                inner.stats.leases.fetch_add(1, Relaxed);
                inner.stats.tokens.fetch_add(u64::from(granted), Relaxed);
                let mine = granted.min(job.want);
                inner.shared.store(true, Relaxed);
                if inner.down_logged.swap(false, Relaxed) {
                    tracing::info!(
                        target: "mcp_guard::ratelimit",
                        "Redis at {} answers again: limits are shared across the fleet again",
                        inner.settings.url
                    );
                }
                inner.put_stock(job.key, granted - mine, now);
                Lease {
                    granted: mine,
                    retry_after: Duration::from_micros(wait_us),
                }
            }
            Err(e) => {
                inner.stats.failures.fetch_add(1, Relaxed);
                self.conn = None;
                self.nodes.clear();
                self.next_probe = now + PROBE_EVERY;
                inner.healthy.store(false, Relaxed);
                inner.shared.store(false, Relaxed);
                // Logged once per outage, however often a reconnection is taken back.
                if !inner.down_logged.swap(true, Relaxed) {
                    tracing::warn!(
                        target: "mcp_guard::ratelimit",
                        "Redis at {} failed ({e}); {} until it answers",
                        inner.settings.url,
                        rule_phrase(inner.settings.failure)
                    );
                }
                inner.failure_rule(job.key, job.want, job.limit, now)
            }
        }
    }
}

/// The key [`Link::probe_lease`] leases nothing from.
const PROBE_KEY: &str = "mcpg:probe";

/// Cluster nodes the thread keeps connections to (beyond the configured one).
const MAX_NODES: usize = 64;

/// `EVALSHA` of the lease script (after `ASKING` when redirected by `ASK`), loading the script
/// once if this server does not have it (restarted, flushed, or a node not yet used).
fn eval_script(
    conn: &mut Conn,
    sha: &mut String,
    args: &[&[u8]],
    asking: bool,
) -> Result<Reply, String> {
    let eval = |conn: &mut Conn, sha: &str| {
        if asking {
            conn.command(&[b"ASKING"])?;
        }
        let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes()];
        cmd.extend_from_slice(args);
        conn.command(&cmd)
    };
    let answer = eval(conn, sha)?;
    if let Reply::Error(e) = &answer
        && e.starts_with("NOSCRIPT")
    {
        match conn.command(&[b"SCRIPT", b"LOAD", SCRIPT.as_bytes()])? {
            Reply::Bulk(Some(loaded)) => *sha = String::from_utf8_lossy(&loaded).into_owned(),
            other => return Err(format!("SCRIPT LOAD answered {other:?}")),
        }
        return eval(conn, sha);
    }
    Ok(answer)
}

/// `MOVED <slot> <host:port>` (true) or `ASK <slot> <host:port>` (false).
fn redirection(reply: &Reply) -> Option<(bool, String)> {
    let Reply::Error(e) = reply else { return None };
    let mut parts = e.split(' ');
    let moved = match parts.next()? {
        "MOVED" => true,
        "ASK" => false,
        _ => return None,
    };
    parts.next()?.parse::<u16>().ok()?;
    let target = parts.next()?;
    (!target.is_empty() && target.len() <= 300 && parts.next().is_none())
        .then(|| (moved, target.to_string()))
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (or of the whole key when it
/// has none), modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// The script's `{granted, wait_us}`, checked: a reply of any other shape is an error.
fn parse_grant(reply: Reply) -> Result<(u32, u64), String> {
    match reply {
        Reply::Array(Some(items)) => match items.as_slice() {
            [Reply::Int(g), Reply::Int(w)] if *g >= 0 && *w >= 0 => Ok((
                u32::try_from(*g).map_err(|_| "grant out of range")?,
                (*w as u64).min(3_600_000_000),
            )),
            _ => Err("the lease script answered an unexpected shape".into()),
        },
        Reply::Error(e) => Err(format!("Redis error: {}", super::resp::shown(&e))),
        _ => Err("the lease script answered an unexpected shape".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::RateKey;

    #[test]
    fn keys_are_hashes_under_one_hash_tag_per_caller() {
        let a = super::super::fleet_key(&RateKey::Identity("alice"), None);
        let a_tool = super::super::fleet_key(&RateKey::Identity("alice"), Some("search"));
        let (k, kt) = (redis_key(&a), redis_key(&a_tool));
        assert_eq!(k.len(), "mcpg:rl:{}:".len() + 64);
        // Same slot for one caller's buckets; different buckets.
        assert_eq!(k[..k.find('}').unwrap()], kt[..kt.find('}').unwrap()]);
        assert_ne!(k, kt);
        // Crafted to collide by concatenation: ("a|b", None) vs ("a", "b") and the like.
        let pairs = [
            (RateKey::Identity("a|b"), None),
            (RateKey::Identity("a"), Some("b")),
            (RateKey::Identity("a"), Some("|b")),
            (RateKey::Identity("a|"), Some("b")),
            (RateKey::Identity("a\0"), Some("")),
            (RateKey::Identity("a"), Some("")),
            (RateKey::Identity("127.0.0.1"), None),
            (RateKey::Address("127.0.0.1".parse().unwrap()), None),
        ];
        let keys: std::collections::HashSet<String> = pairs
            .iter()
            .map(|(r, t)| redis_key(&super::super::fleet_key(r, *t)))
            .collect();
        assert_eq!(keys.len(), pairs.len());
        // Injection: nothing of the input appears, only hex.
        let hostile = redis_key(&super::super::fleet_key(
            &RateKey::Identity("x}\r\n*1\r\n$8\r\nFLUSHALL\r\n{"),
            Some("} DEL *"),
        ));
        assert!(
            hostile["mcpg:rl:".len()..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b"{}:".contains(&b))
        );
    }

    #[test]
    fn grants_of_the_wrong_shape_are_errors() {
        assert_eq!(
            parse_grant(Reply::Array(Some(vec![Reply::Int(3), Reply::Int(0)]))),
            Ok((3, 0))
        );
        for bad in [
            Reply::Array(Some(vec![Reply::Int(-1), Reply::Int(0)])),
            Reply::Array(Some(vec![Reply::Int(1 << 40), Reply::Int(0)])),
            Reply::Array(Some(vec![Reply::Int(1)])),
            Reply::Array(None),
            Reply::Int(3),
            Reply::Error("BUSY".into()),
        ] {
            assert!(parse_grant(bad).is_err());
        }
    }

    #[test]
    fn slots_follow_the_hash_tag_and_redirections_parse() {
        // Reference values of the Redis Cluster specification's CRC16.
        assert_eq!(key_slot(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(
            redirection(&Reply::Error("MOVED 3999 127.0.0.1:6381".into())),
            Some((true, "127.0.0.1:6381".into()))
        );
        assert_eq!(
            redirection(&Reply::Error("ASK 3999 :6381".into())),
            Some((false, ":6381".into()))
        );
        for other in [
            "MOVED",
            "MOVED x 1.2.3.4:1",
            "MOVED 1 ",
            "ERR MOVED 1 a:1",
            "MOVED 1 a:1 b",
        ] {
            assert_eq!(redirection(&Reply::Error(other.into())), None, "{other}");
        }
    }

    #[test]
    fn key_ttl_is_a_few_refill_windows() {
        let l = |rate, burst| Limit { rate, burst };
        assert_eq!(key_ttl_ms(l(10.0, 20)), 4000);
        assert_eq!(key_ttl_ms(l(1000.0, 1)), 1000);
        assert_eq!(key_ttl_ms(l(0.0, 1)), 86_400_000);
    }

    #[test]
    fn the_failure_rules_answer_as_documented() {
        let limit = Limit {
            rate: 10.0,
            burst: 10,
        };
        let now = Instant::now();
        let pool = |failure, replicas| RedisPool {
            inner: Arc::new(Inner {
                settings: RedisSettings {
                    ca: None,
                    url: RedisUrl::parse("redis://127.0.0.1:1").unwrap(),
                    failure,
                    replicas,
                    lease_timeout: Duration::from_millis(10),
                },
                healthy: AtomicBool::new(false),
                shared: AtomicBool::new(false),
                down_logged: AtomicBool::new(false),
                stock: (0..SHARDS)
                    .map(|_| Mutex::new(crate::prehashed::PrehashedMap::default()))
                    .collect(),
                fallback: MemoryPool::default(),
                stats: Stats::default(),
            }),
            jobs: std::sync::mpsc::sync_channel(1).0,
        };
        let local = pool(RedisFailure::Local, 2);
        let granted: u32 = (0..20).map(|_| local.lease(1, 1, limit, now).granted).sum();
        assert_eq!(granted, 5, "half the burst on each of two replicas");
        let open = pool(RedisFailure::Open, 2);
        assert!((0..100).all(|_| open.lease(1, 1, limit, now).granted == 1));
        let closed = pool(RedisFailure::Closed, 2);
        assert_eq!(closed.lease(1, 1, limit, now).granted, 0);
        // A lease Redis did not answer in time, though reachable: `open` takes the node's
        // share rather than admitting every late lease (red team, fleet F4).
        let open = pool(RedisFailure::Open, 2);
        let late: u32 = (0..20)
            .map(|_| open.lease_timed_out(1, 1, limit, now).granted)
            .sum();
        assert_eq!(late, 5, "half the burst on each of two replicas");
        let closed = pool(RedisFailure::Closed, 2);
        assert_eq!(closed.lease_timed_out(1, 1, limit, now).granted, 0);
    }
}
