//! Fleet rate limits through a real `redis-server`: two gateway processes sharing one limit,
//! Redis killed and restarted under each `redis_failure` rule, hostile identities against the
//! key scheme and Redis memory, and a `redis_url` password that never shows.
//!
//! Without `redis-server` on the PATH these tests say so loudly and pass, unless `CI` is set:
//! there its absence is a failure (`.ci/run` installs it).

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use mcp_guard::ratelimit::resp::{Conn, RedisUrl, Reply};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BOB: &str = "bob-key-9a8b7c";
/// The background load's identity (its own bucket, so it never spends bob's).
const CAROL: &str = "carol-key-51f0e2";
const PASSWORD: &str = "s3cret-redis-pw-7d1e";

/// The `redis-server` binary, or `None` (after saying so) when the test should be skipped.
fn redis_binary() -> Option<String> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/bin".into(), "/usr/sbin".into()])
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "redis-server is not installed, and CI is set: install it (apt-get install redis-server)"
            )
        }
        None => {
            eprintln!(
                "\n*** SKIPPED: redis-server is not installed; the Redis rate-limit tests did not run \
                 (apt-get install redis-server) ***\n"
            );
            None
        }
    }
}

/// A free loopback port under the kernel's ephemeral range (32768 and up), for a Redis that is
/// killed and started again on the same port: a port from the ephemeral range can be taken
/// in between by any outgoing connection on this busy machine.
fn free_port_below_ephemeral() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let seed = RandomState::new();
    (0u64..)
        .map(|i| 20_000 + (seed.hash_one(i) % 12_000) as u16)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap()
}

/// A `redis-server` of this test's own on a loopback port, without persistence; killed on drop.
struct Redis {
    binary: String,
    port: u16,
    child: Option<Child>,
    /// TLS only (`rediss://`): the directory holding ca.pem, cert.pem and key.pem.
    tls: Option<tempfile::TempDir>,
}

impl Redis {
    fn start(binary: &str) -> Redis {
        Self::start_with(binary, None)
    }

    /// A Redis that speaks only TLS, with a certificate for `localhost` from a fresh CA.
    fn start_tls(binary: &str) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Distinct names: a leaf whose issuer equals its subject reads as self-signed.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mcp-guard test CA");
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let cert = leaf.signed_by(&key, &*ca).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        Self::start_with(binary, Some(dir))
    }

    fn start_with(binary: &str, tls: Option<tempfile::TempDir>) -> Redis {
        let port = free_port_below_ephemeral();
        let mut r = Redis {
            binary: binary.to_string(),
            port,
            child: None,
            tls,
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        match &self.tls {
            None => format!("redis://:{PASSWORD}@127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://:{PASSWORD}@localhost:{}/0", self.port),
        }
    }

    fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|d| d.path().join("ca.pem"))
    }

    /// Starts it (again, on the same port) and waits until it answers.
    fn restart(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--bind", "127.0.0.1"]);
        match &self.tls {
            None => cmd.arg("--port").arg(self.port.to_string()),
            Some(dir) => cmd
                .args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(dir.path().join("cert.pem"))
                .arg("--tls-key-file")
                .arg(dir.path().join("key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(dir.path().join("ca.pem"))
                .args(["--tls-auth-clients", "no"]),
        };
        let child = cmd
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = self.conn().and_then(|mut c| c.command(&[b"PING"]));
            if answer == Ok(Reply::Simple("PONG".into())) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer: {answer:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn conn(&self) -> Result<Conn, String> {
        let ca = self
            .ca_file()
            .map(|p| mcp_guard::ratelimit::resp::read_ca_file(&p).unwrap());
        Conn::open(
            &RedisUrl::parse(&self.url()).unwrap(),
            ca.as_ref(),
            Duration::from_secs(2),
        )
    }

    /// The keys the limiter wrote.
    fn keys(&self) -> Vec<String> {
        let mut c = self.conn().unwrap();
        match c.command(&[b"KEYS", b"*"]).unwrap() {
            Reply::Array(Some(items)) => items
                .into_iter()
                .map(|i| match i {
                    Reply::Bulk(Some(b)) => String::from_utf8(b).unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway with bob's API key, the stdio demo upstream, two workers and `[rate_limit]` on
/// Redis with `rate_tail` appended.
fn gateway_config(redis: &Redis, rate_tail: &str) -> String {
    format!(
        "{}\n[[auth.api_keys]]\nid = \"bob\"\nkey_hash = \"{}\"\n\n[[auth.api_keys]]\nid = \"carol\"\nkey_hash = \"{}\"\n\n[rate_limit]\nbackend = \"redis\"\nredis_url = \"{}\"\n{rate_tail}\n",
        stdio_config("auto", "", &[]),
        hash_key(BOB),
        hash_key(CAROL),
        redis.url()
    )
}

/// What a run of requests met.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    admitted: u64,
    limited: u64,
    failed: u64,
}

/// `n` sessionless pings as bob on one connection to `addr`.
fn pings(addr: SocketAddr, n: u32) -> Tally {
    let mut p = Pinger::new(addr, BOB);
    (0..n).for_each(|_| p.ping());
    p.tally
}

/// Sessionless pings with one API key on one connection (a new one only after a failure, so a
/// long run does not use up the machine's ephemeral ports). The stdio upstream answers a ping
/// without a session 400 after the limiter let it through: anything but 429 was admitted;
/// anything but 200/400/429 (or a dropped connection) failed.
struct Pinger {
    addr: SocketAddr,
    raw: String,
    stream: std::net::TcpStream,
    tally: Tally,
}

impl Pinger {
    fn new(addr: SocketAddr, key: &str) -> Pinger {
        Pinger {
            addr,
            raw: mcp_post_raw(
                r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
                None,
                &bearer(key),
            ),
            stream: connect(addr),
            tally: Tally::default(),
        }
    }

    fn ping(&mut self) {
        let status = match self.stream.write_all(self.raw.as_bytes()) {
            Ok(()) => read_response(&mut self.stream).map(|r| r.status),
            Err(_) => None,
        };
        match status {
            Some(200 | 400) => self.tally.admitted += 1,
            Some(429) => self.tally.limited += 1,
            _ => {
                self.tally.failed += 1;
                self.stream = connect(self.addr);
            }
        }
    }
}

/// `threads` connections at once, `n` pings each, spread over `addrs` in turn.
fn concurrent_pings(addrs: &[SocketAddr], threads: usize, n: u32) -> Tally {
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            std::thread::spawn(move || pings(addr, n))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold(Tally::default(), |a, b| Tally {
            admitted: a.admitted + b.admitted,
            limited: a.limited + b.limited,
            failed: a.failed + b.failed,
        })
}

fn assert_password_hidden(g: &Gateway) {
    let logs = g.logs.lock().unwrap().join("\n");
    assert!(!logs.contains(PASSWORD), "password in the logs:\n{logs}");
    assert!(logs.contains(":***@"), "{logs}");
    let metrics = g.admin_get("/metrics").text();
    assert!(!metrics.contains(PASSWORD));
}

#[test]
fn limits_are_shared_over_tls_to_redis_verified_against_the_configured_ca() {
    let Some(bin) = redis_binary() else { return };
    let redis = Redis::start_tls(&bin);
    let ca = redis.ca_file().unwrap();
    let cfg = gateway_config(
        &redis,
        &format!(
            "requests_per_second = 1\nburst_size = 5\nredis_failure = \"open\"\nredis_lease_timeout_ms = 1000\nredis_ca_file = {:?}\n",
            ca.display().to_string()
        ),
    );
    let (a, b) = (Gateway::start(&cfg), Gateway::start(&cfg));
    // `open`: only a Redis that answered can refuse, so refusals prove the TLS link works.
    let t = concurrent_pings(&[a.addr, b.addr], 2, 10);
    assert_eq!(t.failed, 0, "{t:?}");
    assert!(t.limited > 0 && t.admitted >= 5, "{t:?}");
    for g in [&a, &b] {
        assert!(g.metric("mcp_guard_ratelimit_redis_leases_total", &[]) >= 1.0);
        assert_eq!(
            g.metric("mcp_guard_ratelimit_redis_fallback_active", &[]),
            0.0
        );
    }
    assert!(!redis.keys().is_empty());
    // Without the CA the server's certificate is not trusted: the failure rule applies.
    let untrusted = gateway_config(
        &redis,
        "requests_per_second = 1\nburst_size = 5\nredis_failure = \"open\"\nredis_lease_timeout_ms = 1000\n",
    );
    let c = Gateway::start(&untrusted);
    assert!(c.wait_log("is unreachable", Duration::from_secs(10)));
    assert_eq!(
        c.metric("mcp_guard_ratelimit_redis_fallback_active", &[]),
        1.0
    );
    assert_eq!(pings(c.addr, 10).admitted, 10);
    assert_password_hidden(&c);
}

#[test]
fn two_gateways_share_one_limit_within_the_stated_bound() {
    let Some(bin) = redis_binary() else { return };
    let redis = Redis::start(&bin);
    // rate 5/s, burst 40; `closed`, so a lease Redis did not answer refuses (a slow machine
    // can only lower the count, never lift it past the bound).
    let cfg = gateway_config(
        &redis,
        "requests_per_second = 5\nburst_size = 40\nredis_failure = \"closed\"\nredis_lease_timeout_ms = 1000\n",
    );
    let (a, b) = (Gateway::start(&cfg), Gateway::start(&cfg));
    let start = Instant::now();
    // A burst, then a steady stream for a few refill periods, from 8 connections at once.
    let mut t = concurrent_pings(&[a.addr, b.addr], 8, 30);
    let steady: Vec<_> = (0..8)
        .map(|i| {
            let addr = [a.addr, b.addr][i % 2];
            std::thread::spawn(move || {
                let mut p = Pinger::new(addr, BOB);
                let until = Instant::now() + Duration::from_secs(3);
                while Instant::now() < until {
                    p.ping();
                    std::thread::sleep(Duration::from_millis(20));
                }
                p.tally
            })
        })
        .collect();
    let mut sent_steady = 0;
    for h in steady {
        let one = h.join().unwrap();
        sent_steady += one.admitted + one.limited + one.failed;
        t.admitted += one.admitted;
        t.limited += one.limited;
        t.failed += one.failed;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // docs/security.md: at most b + r·(T + 2·LEASE_TTL + lease_timeout) across any number of
    // replicas (LEASE_TTL = 0.25 s). Two separate per-process limits would admit at least 2·b.
    let bound = 40.0 + 5.0 * (elapsed + 0.5 + 1.0);
    eprintln!("two gateways: {t:?} over {elapsed:.2}s; bound {bound:.1}");
    assert_eq!(t.failed, 0, "{t:?}");
    assert_eq!(t.admitted + t.limited, 240 + sent_steady);
    assert!(
        (t.admitted as f64) <= bound,
        "admitted {} > bound {bound:.1} over {elapsed:.2}s",
        t.admitted
    );
    assert!(t.admitted >= 20, "{t:?}");
    for g in [&a, &b] {
        assert!(g.metric("mcp_guard_ratelimit_redis_leases_total", &[]) >= 1.0);
        assert_eq!(
            g.metric("mcp_guard_ratelimit_redis_fallback_active", &[]),
            0.0
        );
        assert_password_hidden(g);
    }
    // Keys are hashes under a per-caller hash tag, and they expire.
    let keys = redis.keys();
    assert!(!keys.is_empty());
    let mut c = redis.conn().unwrap();
    for k in &keys {
        assert!(k.starts_with("mcpg:rl:{"), "{k}");
        assert!(!k.contains("bob"), "{k}");
        match c.command(&[b"PTTL", k.as_bytes()]).unwrap() {
            Reply::Int(ms) => assert!(ms > 0 && ms <= 20_000, "{k}: {ms}"),
            other => panic!("{other:?}"),
        }
    }
}

/// Background load on `addr` as carol until `stop`: counts failed requests.
fn background_load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<AtomicU64>) {
    let failed = Arc::new(AtomicU64::new(0));
    let f = failed.clone();
    let h = std::thread::spawn(move || {
        let mut p = Pinger::new(addr, CAROL);
        while !stop.load(Ordering::Relaxed) {
            p.ping();
            f.store(p.tally.failed, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (h, failed)
}

fn wait_metric(g: &Gateway, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.metric(name, &[]) != want {
        assert!(
            Instant::now() < deadline,
            "{name} never became {want}; logs:\n{}",
            g.logs.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Redis killed under load and started again, with `rule`: returns the tally of a burst sent
/// while Redis was down, after checking what holds in every mode (no failed request, the
/// fallback gauge, recovery with shared limits once Redis is back).
fn kill_and_restart(rule: &str) -> Option<Tally> {
    let bin = redis_binary()?;
    let mut redis = Redis::start(&bin);
    // rate 2/s, burst 20, two replicas expected: `local` allows burst 10 at 1/s on this node.
    let cfg = gateway_config(
        &redis,
        &format!(
            "requests_per_second = 2\nburst_size = 20\nredis_failure = \"{rule}\"\nredis_replicas = 2\nredis_lease_timeout_ms = 1000\n"
        ),
    );
    let g = Gateway::start(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let (load, load_failed) = background_load(g.addr, stop.clone());
    // Shared limits: the burst, then refusals.
    let before = concurrent_pings(&[g.addr], 4, 10);
    assert!(before.limited > 0, "{before:?}");
    assert!(g.metric("mcp_guard_ratelimit_redis_leases_total", &[]) >= 1.0);

    redis.kill();
    wait_metric(&g, "mcp_guard_ratelimit_redis_fallback_active", 1.0);
    // Let every leased token expire and the fallback buckets fill.
    std::thread::sleep(Duration::from_secs(1));
    let down = concurrent_pings(&[g.addr], 4, 10);
    assert_eq!(down.failed, 0, "{rule}: {down:?}");
    assert!(g.wait_log("until it answers", Duration::from_secs(5)));

    let leases = g.metric("mcp_guard_ratelimit_redis_leases_total", &[]);
    redis.restart();
    wait_metric(&g, "mcp_guard_ratelimit_redis_fallback_active", 0.0);
    assert!(g.wait_log("answers again", Duration::from_secs(5)));
    // Refusals the failure rule answered are remembered by each worker for their retry-after
    // (at most a second here); past that every lease goes to Redis again.
    std::thread::sleep(Duration::from_millis(1500));
    let start = Instant::now();
    let after = concurrent_pings(&[g.addr], 4, 20);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    // Shared again: Redis leases, a key in the fresh Redis, and the shared bound.
    assert!(g.metric("mcp_guard_ratelimit_redis_leases_total", &[]) > leases);
    assert!(!redis.keys().is_empty());
    assert_eq!(after.failed, 0, "{after:?}");
    assert!(after.limited > 0, "{after:?}");
    assert!(
        (after.admitted as f64) <= 20.0 + 2.0 * (elapsed + 1.5),
        "{after:?} over {elapsed:.2}s"
    );
    assert_eq!(
        load_failed.load(Ordering::Relaxed),
        0,
        "{rule}: failed requests"
    );
    assert_password_hidden(&g);
    Some(down)
}

#[test]
fn redis_down_with_local_applies_this_nodes_share_and_fails_nothing() {
    let Some(down) = kill_and_restart("local") else {
        return;
    };
    // This node's share of bob's limit: burst 10 at 1/s (a fresh bucket when Redis went away;
    // the burst of 40 takes well under the 10 s this allows for).
    assert!(down.admitted >= 1, "{down:?}");
    assert!(down.admitted <= 10 + 10, "{down:?}");
    assert!(down.limited > 0, "{down:?}");
}

#[test]
fn redis_down_with_open_lets_every_request_through() {
    let Some(down) = kill_and_restart("open") else {
        return;
    };
    assert_eq!(down.limited, 0, "{down:?}");
    assert_eq!(down.admitted, 40);
}

#[test]
fn redis_down_with_closed_refuses_with_429() {
    let Some(down) = kill_and_restart("closed") else {
        return;
    };
    assert_eq!(down.admitted, 0, "{down:?}");
    assert_eq!(down.limited, 40);
}

/// An HS256 token for `sub`.
fn token(secret: &str, sub: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"sub": sub, "exp": now + 300, "iss": "i", "aud": "a"});
    let input = format!(
        "{}.{}",
        B64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        B64.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

#[test]
fn hostile_identities_neither_inject_nor_outlive_their_keys() {
    let Some(bin) = redis_binary() else { return };
    let redis = Redis::start(&bin);
    let secret = "a-test-secret-that-is-long-enough-0123456789";
    // rate 1/s, burst 5: a bucket refills within 5 s, so its key lives 10 s after its last
    // lease (long enough to count them all on a slow machine, short enough to see them go).
    let cfg = format!(
        "{}\n[auth.jwt]\nmode = \"simple\"\nsecret = \"{secret}\"\nissuer = \"i\"\naudience = \"a\"\n\n[rate_limit]\nrequests_per_second = 1\nburst_size = 5\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_lease_timeout_ms = 1000\n",
        stdio_config("auto", "", &[]),
        redis.url()
    );
    let g = Gateway::start(&cfg);
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    // Identities crafted to be Redis commands, key patterns, hash tags, or to collide by
    // concatenation; then a flood of distinct ones.
    let mut subs: Vec<String> = [
        "x} *1 $8 FLUSHALL {",
        "*",
        "mcpg:rl:{00}",
        "a|b",
        "a",
        "{bob}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    subs.extend((0..200).map(|i| format!("flood-{i}")));
    let mut s = connect(g.addr);
    for sub in &subs {
        let raw = mcp_post_raw(ping, None, &bearer(&token(secret, sub)));
        s.write_all(raw.as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap();
        assert!(matches!(r.status, 200 | 400), "{sub:?}: {}", r.status);
    }
    let mut keys = redis.keys();
    // The gateway's own probe of the lease script at connection (a key of a second's life).
    keys.retain(|k| k != "mcpg:probe");
    // One bucket per identity, none shared, none named by its input.
    assert_eq!(keys.len(), subs.len(), "{keys:?}");
    for k in &keys {
        let rest = k.strip_prefix("mcpg:rl:{").unwrap();
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'}' || b == b':'),
            "{k}"
        );
    }
    // The flood does not stay: every key expires.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !redis.keys().is_empty() {
        assert!(Instant::now() < deadline, "keys did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_password_hidden(&g);
}

#[test]
fn validate_never_prints_the_redis_password() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "{}\n[[auth.api_keys]]\nid = \"bob\"\nkey_hash = \"{}\"\n",
        stdio_config("auto", "", &[]),
        hash_key(BOB)
    );
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let cases = [
        // Accepted (validate does not connect).
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://app:{PASSWORD}@127.0.0.1:1/0\"\n"
            ),
            None,
        ),
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://app:{PASSWORD}@127.0.0.1:notaport\"\n"
            ),
            Some("rate_limit.redis_url"),
        ),
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://:{PASSWORD}@h/x\"\nredis_replicas = 0\n"
            ),
            Some("rate_limit.redis_url"),
        ),
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://:{PASSWORD}@h\"\nredis_replicas = 0\n"
            ),
            Some("rate_limit.redis_replicas"),
        ),
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://:{PASSWORD}@h\"\nredis_lease_timeout_ms = 0\n"
            ),
            Some("rate_limit.redis_lease_timeout_ms"),
        ),
        (
            "[rate_limit]\nbackend = \"redis\"\n".to_string(),
            Some("rate_limit.redis_url"),
        ),
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://:{PASSWORD}@h\"\nredis_ca_file = \"/etc/hosts\"\n"
            ),
            Some("rate_limit.redis_ca_file"),
        ),
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"rediss://:{PASSWORD}@h\"\nredis_ca_file = \"/nonexistent/ca.pem\"\n"
            ),
            Some("rate_limit.redis_ca_file"),
        ),
        (
            format!(
                "[rate_limit]\nbackend = \"redis\"\nredis_url = \"rediss://:{PASSWORD}@h\"\nredis_ca_file = {:?}\n",
                not_pem.display().to_string()
            ),
            Some("rate_limit.redis_ca_file"),
        ),
        // Set but unused: a warning that names the key, not its value.
        (
            format!("[rate_limit]\nredis_url = \"redis://:{PASSWORD}@h\"\n"),
            None,
        ),
    ];
    for (i, (tail, refused_key)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&p, format!("{base}\n{tail}")).unwrap();
        let out = Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(PASSWORD), "case {i}: {text}");
        match refused_key {
            Some(key) => {
                assert_eq!(out.status.code(), Some(1), "case {i}: {text}");
                assert!(text.contains(key), "case {i}: {text}");
            }
            None => assert_eq!(out.status.code(), Some(0), "case {i}: {text}"),
        }
        if i == cases.len() - 1 {
            assert!(
                text.contains(
                    "rate_limit.redis_url has no effect: rate_limit.backend is \"memory\""
                ),
                "{text}"
            );
        }
    }
}

/// Three Redis Cluster primaries on loopback (no replicas); killed on drop.
struct Cluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(binary: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        // Each node also needs its cluster-bus port, port + 10000, free.
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                ports.push(p);
            }
        }
        let children = ports
            .iter()
            .map(|p| {
                Command::new(binary)
                    .args(["--bind", "127.0.0.1", "--port"])
                    .arg(p.to_string())
                    .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                    .arg(dir.path().join(format!("nodes-{p}.conf")))
                    .arg("--dir")
                    .arg(dir.path())
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--requirepass", PASSWORD, "--masterauth", PASSWORD])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start redis-server")
            })
            .collect();
        let c = Cluster {
            ports,
            children,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in &c.ports {
            while c.node(*p).is_err() {
                assert!(Instant::now() < deadline, "a cluster node did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new(binary.replace("redis-server", "redis-cli"))
            .args(["--no-auth-warning", "-a", PASSWORD, "--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (redis-tools) runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for p in &c.ports {
            loop {
                let info = c
                    .node(*p)
                    .and_then(|mut n| n.command(&[b"CLUSTER", b"INFO"]));
                if let Ok(Reply::Bulk(Some(b))) = &info
                    && String::from_utf8_lossy(b).contains("cluster_state:ok")
                {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok: {info:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c
    }

    fn node(&self, port: u16) -> Result<Conn, String> {
        let url = RedisUrl::parse(&format!("redis://:{PASSWORD}@127.0.0.1:{port}")).unwrap();
        Conn::open(&url, None, Duration::from_secs(2))
    }

    fn keys_on(&self, port: u16) -> usize {
        match self.node(port).unwrap().command(&[b"DBSIZE"]).unwrap() {
            Reply::Int(n) => n as usize,
            other => panic!("{other:?}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_redis_cluster_is_followed_through_its_redirections() {
    let Some(bin) = redis_binary() else { return };
    let cluster = Cluster::start(&bin);
    let secret = "a-test-secret-that-is-long-enough-0123456789";
    // Pointed at the first node only; rate 1/s, burst 5 per identity.
    let cfg = format!(
        "{}\n[auth.jwt]\nmode = \"simple\"\nsecret = \"{secret}\"\nissuer = \"i\"\naudience = \"a\"\n\n[rate_limit]\nrequests_per_second = 1\nburst_size = 5\nbackend = \"redis\"\nredis_url = \"redis://:{PASSWORD}@127.0.0.1:{}\"\nredis_failure = \"open\"\nredis_lease_timeout_ms = 1000\n",
        stdio_config("auto", "", &[]),
        cluster.ports[0]
    );
    let g = Gateway::start(&cfg);
    // The gateway serves before its Redis link is up (requests meanwhile follow
    // `redis_failure`, here without touching Redis): the buckets below need the link.
    wait_metric(&g, "mcp_guard_ratelimit_redis_fallback_active", 0.0);
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let mut s = connect(g.addr);
    let mut send = |sub: &str| {
        let raw = mcp_post_raw(ping, None, &bearer(&token(secret, sub)));
        s.write_all(raw.as_bytes()).unwrap();
        read_response(&mut s).unwrap().status
    };
    // 30 callers: their buckets land on all three nodes (by their hash tags).
    for i in 0..30 {
        assert!(matches!(send(&format!("caller-{i}")), 200 | 400));
    }
    for p in &cluster.ports {
        assert!(cluster.keys_on(*p) > 0, "no bucket on node {p}");
    }
    // One caller's limit holds wherever its slot lives (`open`: only Redis can refuse).
    let start = Instant::now();
    let statuses: Vec<u16> = (0..20).map(|_| send("one-caller")).collect();
    let admitted = statuses.iter().filter(|s| **s != 429).count() as f64;
    let elapsed = start.elapsed().as_secs_f64();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(admitted <= 5.0 + 1.0 * (elapsed + 1.5), "{statuses:?}");
    assert_eq!(
        g.metric("mcp_guard_ratelimit_redis_lease_failures_total", &[]),
        0.0
    );
    assert_eq!(
        g.metric("mcp_guard_ratelimit_redis_fallback_active", &[]),
        0.0
    );
}

/// A gateway sharing a 5/s limit through `redis`, refusing while Redis is down.
fn closed_gateway(redis: &Redis) -> Gateway {
    Gateway::start(&format!(
        "{}\n[rate_limit]\nrequests_per_second = 5\nburst_size = 5\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_failure = \"closed\"\n",
        stdio_config("auto", "", &[]),
        redis.url()
    ))
}

/// Asserts, for `rounds` requests 100 ms apart, that the fallback stays active.
fn assert_fallback_stays_active(g: &Gateway, rounds: usize) {
    for _ in 0..rounds {
        let r = mcp_post(g.addr, INIT, None);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(
            g.metric("mcp_guard_ratelimit_redis_fallback_active", &[]),
            1.0
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_redis_that_takes_connections_but_refuses_every_lease_stays_down() {
    // Red team (fleet, F5): at maxmemory, Redis takes connections and refuses every lease
    // (OOM). Each 500 ms probe's connection declared it back ("answers again") until the next
    // lease failed, so the log flapped and the fallback gauge read 0 much of the time, which a
    // "fallback active for a minute" alert never sees.
    let Some(bin) = redis_binary() else { return };
    let redis = Redis::start(&bin);
    let mut c = redis.conn().unwrap();
    assert!(matches!(
        c.command(&[b"CONFIG", b"SET", b"maxmemory", b"1"]).unwrap(),
        Reply::Simple(_)
    ));
    let g = closed_gateway(&redis);
    assert_fallback_stays_active(&g, 20);
    assert!(
        !g.wait_log("answers again", Duration::from_millis(10)),
        "Redis was declared back though no lease went through"
    );
    // Once a lease goes through again, shared limits resume, and only then is that said.
    c.command(&[b"CONFIG", b"SET", b"maxmemory", b"0"]).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while mcp_post(g.addr, INIT, None).status != 200 {
        assert!(Instant::now() < until, "still refused with Redis back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(g.wait_log("answers again", Duration::from_secs(5)));
    assert_eq!(
        g.metric("mcp_guard_ratelimit_redis_fallback_active", &[]),
        0.0
    );
}

#[test]
fn a_redis_that_answers_the_probe_but_refuses_real_leases_is_logged_down_once_and_stays_down() {
    // Red team (fleet, N6): a Redis whose access rules let the probe's key through and refuse
    // every bucket's (the same as a cluster whose bucket slots sit on a node out of memory)
    // was declared back at each reconnection: the log and the gauge flapped again.
    let Some(bin) = redis_binary() else { return };
    let redis = Redis::start(&bin);
    let mut c = redis.conn().unwrap();
    let acl = format!(">{PASSWORD}");
    assert!(matches!(
        c.command(&[
            b"ACL",
            b"SETUSER",
            b"default",
            b"on",
            b"resetkeys",
            b"~mcpg:probe",
            acl.as_bytes(),
            b"+@all",
        ])
        .unwrap(),
        Reply::Simple(_)
    ));
    let g = closed_gateway(&redis);
    // The first lease is refused; from then on, the fallback.
    mcp_post(g.addr, INIT, None);
    assert_fallback_stays_active(&g, 30);
    let logs = g.logs.lock().unwrap().clone();
    let failed = logs.iter().filter(|l| l.contains("failed (")).count();
    assert_eq!(failed, 1, "{logs:#?}");
    assert!(
        !logs.iter().any(|l| l.contains("answers again")),
        "{logs:#?}"
    );
}
