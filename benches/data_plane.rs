//! Criterion benches of the data plane's per-request work: head parse, JSON-RPC classify,
//! chunked decode, session-id check, a stdio request's trip through the hub's router, a read
//! of the request path's clock, a worker's trip through its ring with and without monoio's
//! timer driver, a wait registered on the worker's deadlines and withdrawn. Each reports time per
//! operation.

use criterion::{Criterion, criterion_group, criterion_main};
use mcp_guard::http::chunked::ChunkedDecoder;
use mcp_guard::http::request::parse_head;
use mcp_guard::mcp::jsonrpc::Classifier;
use mcp_guard::mcp::session::SessionCodec;
use mcp_guard::runtime::{clock, deadlines};
use mcp_guard::upstream::router::{Limits, Output, Router};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use std::hint::black_box;
use std::time::{Duration, Instant};

const HEAD: &[u8] = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nUser-Agent: bench/1.0\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: c2Vzc2lvbi1pZC0xMjM0NTY3ODkw.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\nMCP-Protocol-Version: 2025-11-25\r\nAuthorization: Bearer mcpg_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG\r\nContent-Length: 112\r\n\r\n";
const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/hosts","limit":100}}}"#;

/// A router with one session, opened the way a client opens it (initialize, answered).
fn router_with_session() -> (Router<()>, [u8; 16]) {
    let mut router = Router::new(Limits {
        max_sessions: 1024,
        max_sessions_per_identity: 1024,
        max_pending: 1024,
        max_server_requests: 64,
    });
    let mut out = Vec::new();
    let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}"#;
    router.client_request(1, None, "bench", init, (), &mut out);
    router.child_line(
        br#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25","capabilities":{},"serverInfo":{"name":"demo","version":"1"}}}"#,
        &mut out,
    );
    let session = out
        .iter()
        .find_map(|o| match o {
            Output::Respond { new_session, .. } => *new_session,
            _ => None,
        })
        .expect("initialize opens a session");
    (router, session)
}

fn benches(c: &mut Criterion) {
    c.bench_function("http_head_parse", |b| {
        b.iter(|| parse_head(black_box(HEAD), 16384, 4 << 20).unwrap())
    });
    let mut classifier = Classifier::new();
    c.bench_function("jsonrpc_classify_tools_call", |b| {
        b.iter(|| classifier.classify(black_box(CALL)).unwrap())
    });
    let chunked = b"40\r\n0123456789012345678901234567890123456789012345678901234567890123\r\n40\r\n0123456789012345678901234567890123456789012345678901234567890123\r\n0\r\n\r\n";
    // What the hub decides per stdio request: the client's call re-framed with a hub id, then
    // the child's answer with the client's id restored (the perf harness's echo call).
    let (mut router, session) = router_with_session();
    let mut hub_id = 100u64;
    let mut out = Vec::with_capacity(4);
    c.bench_function("stdio_router_call_and_answer", |b| {
        b.iter(|| {
            hub_id += 1;
            out.clear();
            let call = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}"#;
            router.client_request(hub_id, Some(session), "bench", black_box(call), (), &mut out);
            let answer = format!(
                r#"{{"jsonrpc":"2.0","id":{hub_id},"result":{{"content":[{{"type":"text","text":"hello"}}]}}}}"#
            );
            router.child_line(black_box(answer.as_bytes()), &mut out);
            assert!(matches!(out.last(), Some(Output::Respond { .. })));
        })
    });
    c.bench_function("chunked_decode_128b", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            let mut d = ChunkedDecoder::new(1 << 20);
            d.decode(black_box(chunked), &mut out).unwrap()
        })
    });
    // A read of the clock as the request path makes it: the monotonic clock itself, and the
    // poll's reading reused (`runtime::clock`; a guarded request made ~10 reads fewer of the
    // first kind with it).
    c.bench_function("clock_monotonic_read", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    {
        let _poll = clock::PollScope::enter();
        c.bench_function("clock_read_within_a_poll", |b| {
            b.iter(|| black_box(clock::now()))
        });
    }
    let codec = SessionCodec::from_key(b"bench key");
    let sid = codec.encode("identity", b"upstream-session-0123456789abcdef");
    c.bench_function("session_id_verify", |b| {
        b.iter(|| codec.decode("identity", black_box(&sid)).unwrap())
    });
}

/// `iters` one-byte exchanges over a socket pair, each a write and a read through the ring and
/// so a park of the runtime, with a deadline an hour away pending as a worker always has one.
/// `timer_driver`: that deadline on monoio's timer driver (what the workers ran before), else on
/// `deadlines` and its timerfd, with the driver left out (what they run now).
fn ring_round_trips(timer_driver: bool, iters: u64) -> Duration {
    let body = async move {
        let far = Duration::from_secs(3600);
        let _pending = if timer_driver {
            monoio::spawn(monoio::time::sleep(far))
        } else {
            deadlines::install().expect("a timerfd");
            monoio::spawn(deadlines::sleep(far))
        };
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut a, mut b) = (
            monoio::net::UnixStream::from_std(a).unwrap(),
            monoio::net::UnixStream::from_std(b).unwrap(),
        );
        let (mut out, mut into) = (vec![7u8], Vec::with_capacity(1));
        let start = Instant::now();
        for _ in 0..iters {
            let (r, o) = a.write_all(out).await;
            r.unwrap();
            out = o;
            let (r, i) = b.read(into).await;
            assert_eq!(r.unwrap(), 1);
            into = i;
            into.clear();
        }
        start.elapsed()
    };
    let builder = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new();
    if timer_driver {
        builder.enable_timer().build().unwrap().block_on(body)
    } else {
        builder.build().unwrap().block_on(body)
    }
}

fn ring_benches(c: &mut Criterion) {
    if !monoio::utils::detect_uring() {
        eprintln!("io_uring unavailable: the ring benches are skipped");
        return;
    }
    c.bench_function("ring_round_trip_timer_driver", |b| {
        b.iter_custom(|iters| ring_round_trips(true, iters))
    });
    c.bench_function("ring_round_trip_timerfd_deadlines", |b| {
        b.iter_custom(|iters| ring_round_trips(false, iters))
    });
}

/// `iters` waits on a worker's deadlines, each registered (its first poll, pending) and then
/// withdrawn (dropped) long before its deadline, as nearly every request's timeouts are, with 256
/// others pending among them (the idle deadlines of a worker's other connections).
fn deadline_waits_withdrawn(iters: u64) -> Duration {
    let body = async move {
        deadlines::install().expect("a timerfd");
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let base = Duration::from_secs(600);
        let mut pending: Vec<_> = (0..256u64)
            .map(|i| Box::pin(deadlines::sleep(base + Duration::from_secs(i))))
            .collect();
        for p in &mut pending {
            assert!(p.as_mut().poll(&mut cx).is_pending());
        }
        // The firing task runs once and arms its timer for the earliest of them.
        deadlines::sleep(Duration::from_millis(1)).await;
        let start = Instant::now();
        for i in 0..iters {
            // Spread among the pending ones, none earlier than the armed timer.
            let after = base + Duration::from_millis(i.wrapping_mul(7919) % 256_000);
            let mut wait = std::pin::pin!(deadlines::sleep(after));
            assert!(black_box(wait.as_mut().poll(&mut cx)).is_pending());
        }
        start.elapsed()
    };
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .build()
        .unwrap()
        .block_on(body)
}

fn deadline_benches(c: &mut Criterion) {
    c.bench_function("deadline_wait_registered_and_withdrawn_among_256", |b| {
        b.iter_custom(deadline_waits_withdrawn)
    });
}

criterion_group!(data_plane, benches, ring_benches, deadline_benches);
criterion_main!(data_plane);
