//! The HTTP upstream's connection policy: one keep-alive pool per worker, and when a failed
//! request may be sent again. The bytes on the wire are `http::client`'s.
//!
//! A pooled connection the upstream has already closed is found before use (a non-blocking
//! peek). A request that failed on a reused connection is retried once on a fresh one only when
//! that cannot run it twice: nothing of it was written, or it is idempotent (GET, HEAD, DELETE,
//! OPTIONS) and no response byte arrived. A POST (`tools/call`) that was written may have been
//! read and acted on by the upstream even if the connection then died, so it is never resent;
//! instead every pooled connection is probed before a POST goes out on it.

use crate::http::body::BodyReservation;
use crate::http::client::{Progress, UpstreamError, UpstreamResponse, exchange};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Idle connections kept per upstream address.
const MAX_IDLE_PER_ADDR: usize = 256;
/// Pooled connections younger than this are reused without a liveness probe.
const RECENT: Duration = Duration::from_secs(1);
/// Idle connections older than this are not reused.
const IDLE_TTL: Duration = Duration::from_secs(50);
/// A worker's pool of idle upstream connections.
///
/// Connections are pooled per upstream address *and per owner* (the identity a request is
/// made for): a connection goes back only to requests of the identity that used it last. An
/// upstream that sends an answer nobody asked for (a duplicate, written late) puts its
/// connection one answer out of step, and no probe can see an answer still in flight (the
/// upstream's stack may hold it until the next request's bytes arrive). Per-owner pools keep
/// such an answer within the identity whose request caused it, never another tenant's.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<PoolKey, IdleList, foldhash::fast::RandomState>>,
    /// Idle connections held, all keys together (bounded by [`MAX_IDLE_TOTAL`]).
    idle_total: std::cell::Cell<usize>,
    /// Keys the owner hashes (random per worker, so nobody can choose an identity name whose
    /// hash meets another's).
    owners: std::collections::hash_map::RandomState,
    /// Response buffers given back by finished responses, for the next exchanges' heads: a
    /// 4 KiB allocation and free per request otherwise, each past the allocator's fast path.
    spare: RefCell<Vec<Vec<u8>>>,
}

/// The size of a fresh response-head buffer.
const HEAD_BUFFER: usize = 4096;
/// Spare response buffers kept per worker, and the largest one kept (a buffer a long body
/// grew is freed, not hoarded).
const MAX_SPARE: usize = 64;
const MAX_SPARE_CAPACITY: usize = 16 * 1024;

/// One address and owner's idle connections, with when each was put back.
type IdleList = Vec<(TcpStream, Instant)>;

/// Where an idle connection may be reused: its upstream address and its owner's hash.
type PoolKey = (SocketAddr, u64);

/// Idle connections kept per worker, all addresses and owners together.
const MAX_IDLE_TOTAL: usize = 1024;

/// The owner of the gateway's own requests (health probes, its own fetches).
pub const GATEWAY_OWNER: u64 = 0;

impl Pool {
    /// The pool key of the identity (session binding) `binding`.
    pub fn owner_of(&self, binding: &str) -> u64 {
        // Never the gateway's own key: 0 is remapped.
        std::hash::BuildHasher::hash_one(&self.owners, binding).max(1)
    }

    /// An idle connection to `addr` last used for `owner`; `always_probe` for a request that
    /// may not be resent.
    fn checkout(&self, addr: SocketAddr, owner: u64, always_probe: bool) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&(addr, owner))?;
        let mut found = None;
        while let Some((conn, since)) = list.pop() {
            self.idle_total.set(self.idle_total.get() - 1);
            let idle = since.elapsed();
            if idle >= IDLE_TTL {
                continue;
            }
            // A connection pooled moments ago is almost surely alive, and if the upstream did
            // close it, an idempotent request is simply retried: skip the probe's syscall for
            // those. A POST cannot be retried once written, so it always pays for the probe.
            if (idle < RECENT && !always_probe) || still_open(&conn) {
                found = Some(conn);
                break;
            }
        }
        if list.is_empty() {
            // Owners come and go (every identity has its own key): no empty lists are kept.
            idle.remove(&(addr, owner));
        }
        found
    }

    fn checkin(&self, addr: SocketAddr, owner: u64, conn: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        if self.idle_total.get() >= MAX_IDLE_TOTAL {
            // Owners that never came back leave expired connections no checkout clears: they
            // go first, so they cannot keep everyone else from pooling.
            self.idle_total
                .set(drop_expired(&mut idle, crate::runtime::clock::now()));
            if self.idle_total.get() >= MAX_IDLE_TOTAL {
                return;
            }
        }
        let list = idle.entry((addr, owner)).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push((conn, crate::runtime::clock::now()));
            self.idle_total.set(self.idle_total.get() + 1);
        }
    }

    /// Takes a response's connection back when it may carry another request of the same
    /// owner, and its read buffer for the next exchange.
    pub fn release(&self, resp: UpstreamResponse) {
        let owner = resp.owner();
        let (idle, buf) = resp.into_idle_and_buffer();
        if let Some((addr, conn)) = idle {
            self.checkin(addr, owner, conn);
        }
        self.recycle(buf);
    }

    /// Keeps `buf` (a response's buffer, or a body read into one) for a later response head,
    /// when its size is one worth keeping. Its bytes are cleared first.
    pub fn recycle(&self, mut buf: Vec<u8>) {
        let mut spare = self.spare.borrow_mut();
        if (HEAD_BUFFER..=MAX_SPARE_CAPACITY).contains(&buf.capacity()) && spare.len() < MAX_SPARE {
            buf.clear();
            spare.push(buf);
        }
    }

    /// A buffer for a response head: a spare one (empty), or a new one.
    fn head_buffer(&self) -> Vec<u8> {
        self.spare
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(HEAD_BUFFER))
    }

    /// Idle connections currently held (all addresses).
    pub fn idle_count(&self) -> usize {
        self.idle_total.get()
    }
}

/// Drops the idle entries past [`IDLE_TTL`] and the keys left empty; how many remain.
fn drop_expired<C, S>(idle: &mut HashMap<PoolKey, Vec<(C, Instant)>, S>, now: Instant) -> usize {
    idle.retain(|_, list| {
        list.retain(|(_, since)| now.saturating_duration_since(*since) < IDLE_TTL);
        !list.is_empty()
    });
    idle.values().map(Vec::len).sum()
}

/// Whether an idle connection is still usable: no EOF, no unexpected bytes waiting.
#[allow(unsafe_code)]
fn still_open(conn: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a stack buffer on a socket fd we own; MSG_DONTWAIT keeps it
    // non-blocking. 0 means the peer closed; data means a stray response, so don't reuse.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

/// Whether a request with this method may be sent a second time after the upstream may have
/// read it (RFC 9110 section 9.2.2). Anything else, POST first of all, is never resent.
fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS")
}

/// Sends `request` (head and body already serialised, as [`build_request`] makes it) to one of
/// `addrs`, and reads the response head. The method is read back from the request line; an
/// unrecognised one is treated as not idempotent. Prefer [`send_request`], which is told.
pub async fn send(
    pool: &Pool,
    addrs: &[SocketAddr],
    request: Vec<u8>,
) -> Result<UpstreamResponse, UpstreamError> {
    let method = request
        .split(|&b| b == b' ')
        .next()
        .and_then(|m| std::str::from_utf8(m).ok())
        .unwrap_or("")
        .to_owned();
    send_request(pool, addrs, &method, request, None, GATEWAY_OWNER).await
}

/// Sends `request` (head and body already serialised, for `method`) to one of `addrs`, and
/// reads the response head. A failure on a reused connection is retried once on a fresh one
/// only where that cannot make the upstream act twice (see [`Progress`]); otherwise the error
/// is returned and the caller answers 502.
pub async fn send_request(
    pool: &Pool,
    addrs: &[SocketAddr],
    method: &str,
    request: Vec<u8>,
    share: Option<BodyReservation>,
    owner: u64,
) -> Result<UpstreamResponse, UpstreamError> {
    let resendable = idempotent(method);
    let mut request = request;
    let mut share = share;
    // First try a pooled connection to any address, then fresh connections in order.
    for addr in addrs {
        if let Some(conn) = pool.checkout(*addr, owner, !resendable) {
            match exchange(
                conn,
                *addr,
                request,
                resendable,
                &mut share,
                pool.head_buffer(),
                owner,
            )
            .await
            {
                Ok(r) => return Ok(r),
                Err((e, req, progress)) => {
                    let retry = match progress {
                        Progress::NothingWritten => true,
                        Progress::Written => resendable,
                        Progress::ResponseStarted => false,
                    };
                    if !retry {
                        return Err(e);
                    }
                    request = req;
                }
            }
            break;
        }
    }
    let mut last_err = UpstreamError::Protocol("no upstream address");
    for addr in addrs {
        match TcpStream::connect_addr(*addr).await {
            Ok(conn) => {
                let _ = conn.set_nodelay(true);
                return match exchange(
                    conn,
                    *addr,
                    request,
                    resendable,
                    &mut share,
                    pool.head_buffer(),
                    owner,
                )
                .await
                {
                    Ok(r) => Ok(r),
                    Err((e, _, _)) => Err(e),
                };
            }
            Err(e) => last_err = UpstreamError::Io(e),
        }
    }
    Err(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::client::build_request;

    #[test]
    fn expired_idle_entries_of_owners_gone_for_good_are_dropped_with_their_keys() {
        let now = crate::runtime::clock::now();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let stale = now - IDLE_TTL - Duration::from_secs(1);
        let mut idle: HashMap<PoolKey, Vec<((), Instant)>> = HashMap::new();
        idle.insert((addr, 1), vec![((), stale), ((), stale)]);
        idle.insert((addr, 2), vec![((), stale), ((), now)]);
        assert_eq!(drop_expired(&mut idle, now), 1);
        assert!(
            !idle.contains_key(&(addr, 1)),
            "an emptied key stays behind"
        );
        assert_eq!(idle[&(addr, 2)].len(), 1);
    }

    #[test]
    fn spare_buffers_come_back_empty_bounded_in_number_and_size() {
        let pool = Pool::default();
        let mut used = Vec::with_capacity(HEAD_BUFFER);
        used.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nanother caller's answer");
        pool.recycle(used);
        let again = pool.head_buffer();
        assert!(again.is_empty(), "a recycled buffer hands on no bytes");
        assert!(again.capacity() >= HEAD_BUFFER);
        // A buffer a long body grew is freed, and one too small to hold a head is not kept.
        pool.recycle(Vec::with_capacity(1 << 20));
        pool.recycle(Vec::with_capacity(64));
        assert_eq!(pool.spare.borrow().len(), 0);
        for _ in 0..MAX_SPARE * 2 {
            pool.recycle(Vec::with_capacity(HEAD_BUFFER));
        }
        assert_eq!(pool.spare.borrow().len(), MAX_SPARE);
    }

    /// What a mock upstream connection does with each request it reads, in order.
    #[derive(Clone, Copy)]
    enum Step {
        /// Answer 200 and keep the connection.
        Answer,
        /// Read the whole request, then close without answering.
        ReadThenClose,
        /// Close as soon as the previous step is done (a keep-alive timeout upstream).
        Close,
        /// Answer `100 Continue` and the final 200 in one write.
        ContinueThenAnswer,
    }

    /// A raw std TCP upstream: connection `i` follows `scripts[i]`; later ones just answer.
    /// Returns its address, a stop flag and the thread, which yields every request line seen.
    fn mock_upstream(
        scripts: Vec<Vec<Step>>,
    ) -> (
        SocketAddr,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut index = 0;
            while !stop2.load(Ordering::Relaxed) {
                let mut conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let script = scripts
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| vec![Step::Answer; 4]);
                index += 1;
                let mut buf = Vec::new();
                for step in script {
                    if let Step::Close = step {
                        break;
                    }
                    // Read one whole request: head, then Content-Length bytes of body.
                    let mut chunk = [0u8; 4096];
                    let (line, total) = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                            if buf.len() >= end + 4 + len {
                                break (head.lines().next().unwrap().to_string(), end + 4 + len);
                            }
                        }
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return seen,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..total);
                    seen.push(line);
                    if let Step::ReadThenClose = step {
                        break;
                    }
                    if let Step::ContinueThenAnswer = step {
                        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                    }
                    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .unwrap();
                }
            }
            seen
        });
        (addr, stop, t)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// One request through the pool; the body is read so the connection goes back to it.
    async fn roundtrip(pool: &Pool, addr: SocketAddr, method: &str) -> Result<u16, UpstreamError> {
        let req = build_request(
            method,
            "/mcp",
            "up",
            &[],
            if method == "POST" { b"{}" } else { b"" },
        );
        let mut resp = send_request(pool, &[addr], method, req, None, GATEWAY_OWNER).await?;
        let status = resp.status;
        resp.read_to_end().await?;
        pool.release(resp);
        Ok(status)
    }

    #[test]
    fn a_post_that_dies_on_a_reused_connection_is_not_resent() {
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::Answer, Step::ReadThenClose]]);
        let (first, second) = block_on(async {
            // The pool lives (and drops its connections) inside the runtime.
            let pool = Pool::default();
            let first = roundtrip(&pool, addr, "GET").await;
            let second = roundtrip(&pool, addr, "POST").await;
            (first, second)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = mock.join().unwrap();
        assert_eq!(first.unwrap(), 200);
        assert!(second.is_err(), "the caller must see the failure (502)");
        let posts = seen.iter().filter(|l| l.starts_with("POST ")).count();
        assert_eq!(
            posts, 1,
            "the upstream must see the POST exactly once: {seen:?}"
        );
    }

    #[test]
    fn a_get_that_dies_on_a_reused_connection_is_retried_once() {
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::Answer, Step::ReadThenClose]]);
        let (first, second) = block_on(async {
            // The pool lives (and drops its connections) inside the runtime.
            let pool = Pool::default();
            let first = roundtrip(&pool, addr, "GET").await;
            let second = roundtrip(&pool, addr, "GET").await;
            (first, second)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = mock.join().unwrap();
        assert_eq!(first.unwrap(), 200);
        assert_eq!(second.unwrap(), 200);
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn a_post_probes_even_a_just_pooled_connection_and_goes_out_once_on_a_fresh_one() {
        // The upstream closes right after answering; the POST follows within RECENT, when an
        // idempotent request would skip the probe. The POST must find the close first.
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::Answer, Step::Close]]);
        let (first, second) = block_on(async {
            // The pool lives (and drops its connections) inside the runtime.
            let pool = Pool::default();
            let first = roundtrip(&pool, addr, "GET").await;
            // Let the upstream's FIN arrive.
            std::thread::sleep(Duration::from_millis(100));
            let second = roundtrip(&pool, addr, "POST").await;
            (first, second)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = mock.join().unwrap();
        assert_eq!(first.unwrap(), 200);
        assert_eq!(second.unwrap(), 200);
        let posts = seen.iter().filter(|l| l.starts_with("POST ")).count();
        assert_eq!(posts, 1, "{seen:?}");
    }

    #[test]
    fn an_interim_response_arriving_with_the_final_one_is_skipped_at_once() {
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::ContinueThenAnswer]]);
        let started = std::time::Instant::now();
        let status = block_on(async {
            let pool = Pool::default();
            roundtrip(&pool, addr, "POST").await
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = mock.join();
        assert_eq!(status.unwrap(), 200);
        // Not after the mock's 5 s read timeout closed the connection.
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn only_get_head_delete_and_options_count_as_resendable() {
        assert!(idempotent("GET") && idempotent("DELETE"));
        assert!(!idempotent("POST") && !idempotent("") && !idempotent("get"));
    }

    /// An upstream that answers one request with `head`, then `pieces` in separate writes.
    fn scripted_answer(head: &'static str, pieces: Vec<Vec<u8>>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            conn.write_all(head.as_bytes()).unwrap();
            for piece in pieces {
                std::thread::sleep(Duration::from_millis(20));
                if conn.write_all(&piece).is_err() {
                    return;
                }
            }
        });
        addr
    }

    /// Sends a GET to `addr` and reads the whole body; whether the connection may be reused.
    fn whole_body(addr: SocketAddr) -> (Result<Vec<u8>, UpstreamError>, bool) {
        block_on(async {
            let pool = Pool::default();
            let req = build_request("GET", "/mcp", "up", &[], b"");
            let mut resp = send_request(&pool, &[addr], "GET", req, None, GATEWAY_OWNER)
                .await
                .unwrap();
            let body = resp.read_to_end().await;
            (body, resp.into_idle().is_some())
        })
    }

    #[test]
    fn a_declared_length_body_arriving_in_pieces_is_read_whole_and_exactly() {
        let body: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let pieces = vec![
            body[..3].to_vec(),
            body[3..9000].to_vec(),
            body[9000..].to_vec(),
        ];
        let addr = scripted_answer("HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n", pieces);
        let (got, reusable) = whole_body(addr);
        assert_eq!(got.unwrap(), body);
        assert!(reusable);
        // Bytes past the declared length are not part of the body, and the connection that
        // carried them is not used again.
        let mut extra = body.clone();
        extra.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let addr = scripted_answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n",
            vec![extra],
        );
        let (got, reusable) = whole_body(addr);
        assert_eq!(got.unwrap(), body);
        assert!(!reusable);
    }

    /// Sends a POST to `addr` and drops its answer within `limit` bytes; whether that
    /// worked, and whether the connection may be reused.
    fn discarded(addr: SocketAddr, limit: usize) -> (bool, bool) {
        block_on(async {
            let pool = Pool::default();
            let req = build_request("POST", "/mcp", "up", &[], b"{}");
            let mut resp = send_request(&pool, &[addr], "POST", req, None, GATEWAY_OWNER)
                .await
                .unwrap();
            let ok = resp.discard_body(limit).await.is_ok();
            (ok, resp.into_idle().is_some())
        })
    }

    #[test]
    fn an_answer_no_one_reads_is_dropped_within_its_limit_and_never_held() {
        // Red team: the answer to a cancellation was read whole (up to 64 MiB) into memory.
        let small = scripted_answer(
            "HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\n",
            vec![b"hello".to_vec()],
        );
        assert_eq!(discarded(small, 64), (true, true));
        let chunk = format!("{:x}\r\n{}\r\n", 40_000, "e".repeat(40_000));
        let large = scripted_answer(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            vec![chunk.clone().into_bytes(), chunk.into_bytes()],
        );
        assert_eq!(discarded(large, 64 * 1024), (false, false));
    }

    #[test]
    fn a_declared_length_body_cut_short_is_an_error() {
        let addr = scripted_answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n",
            vec![vec![b'x'; 12_000]],
        );
        let (got, reusable) = whole_body(addr);
        assert!(got.is_err());
        assert!(!reusable);
    }
}
