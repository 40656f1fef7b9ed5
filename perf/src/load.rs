//! The load generator: keep-alive MCP client connections on monoio threads, driven closed-loop
//! (maximum throughput) or open-loop at a fixed rate with latency measured from each request's
//! scheduled send time whenever the target delayed it (so coordinated omission is corrected),
//! plus idle connection holders.

use crate::wire;
use hdrhistogram::Histogram;
use monoio::net::TcpStream;
use serde::Serialize;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A response slower than this counts as a timeout and the connection is replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Latencies above this are clamped into the top bucket (they are timeouts anyway).
const HISTOGRAM_MAX_US: u64 = 60_000_000;
/// After a failed connect, wait this long so a dead target does not become a busy loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);

/// The measured request.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// tools/call `echo`, answered with JSON.
    Echo,
    /// tools/call `echo_sse`, answered with one SSE event.
    EchoSse,
    /// tools/list.
    ToolsList,
    /// tools/call `echo` with about 4 KiB of text (prose with line breaks, no secret),
    /// answered with JSON: a tool result of realistic size for the redaction scan.
    EchoResult4k,
}

impl Call {
    /// The JSON-RPC members after `"id"`.
    fn members(self) -> &'static str {
        match self {
            Call::Echo => {
                r#""method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}"#
            }
            Call::EchoSse => {
                r#""method":"tools/call","params":{"name":"echo_sse","arguments":{"text":"hello"}}"#
            }
            Call::ToolsList => r#""method":"tools/list","params":{}"#,
            Call::EchoResult4k => {
                static MEMBERS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
                    let mut text = String::with_capacity(4200);
                    let mut line = 0;
                    while text.len() < 4096 {
                        line += 1;
                        text.push_str(&format!(
                            "{line:03}: the build finished in 42.7 s; 1834 tests passed, 0 failed, see run 20261128-{line}\\n"
                        ));
                    }
                    format!(
                        r#""method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{text}"}}}}"#
                    )
                });
                MEMBERS.as_str()
            }
        }
    }
}

/// How requests are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// Each connection sends its next request when the previous response is complete.
    Closed,
    /// `rate` requests per second in total, on a fixed schedule spread over the connections.
    Open { rate: u64 },
}

/// One load run.
#[derive(Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    /// MCP endpoint paths; connection `i` opens its session at `endpoints[i % len]` and keeps
    /// using it (also when it reconnects).
    pub endpoints: Vec<String>,
    pub call: Call,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    pub pace: Pace,
    /// Extra request header lines (each ending in CRLF), e.g. credentials.
    pub extra_headers: String,
    /// CPUs the load threads are pinned to (empty: not pinned).
    pub cpus: Vec<usize>,
    /// Speak TLS with this client configuration (the handshake happens when the connection
    /// opens, before the measured window).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Counters kept current while the phase runs, for a sampler on another thread (`perf
    /// soak`); `None` for phases only read at their end.
    pub live: Option<Arc<LiveCounts>>,
    /// Open an MCP session first (initialize, then notifications/initialized). Off for the
    /// original mcp-guard, which has no sessions and relays a notification to its stdio server
    /// and then waits for an answer that never comes.
    pub handshake: bool,
}

/// Requests completed and failed so far in a running phase. Updated with one relaxed atomic add
/// per request (a few thousand a second in a soak: nothing next to the request itself); the
/// phase's exact figures still come from its `LoadResult`.
#[derive(Debug, Default)]
pub struct LiveCounts {
    completed: AtomicU64,
    errors: AtomicU64,
}

impl LiveCounts {
    /// (completed, failed) so far.
    pub fn read(&self) -> (u64, u64) {
        (
            self.completed.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Failed requests by cause.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ErrorCounts {
    /// Well-formed response with a non-2xx status other than 429.
    pub status: u64,
    /// 429 Too Many Requests: the gateway's rate limit refused the request.
    pub rate_limited: u64,
    /// 2xx response carrying a JSON-RPC error.
    pub rpc_error: u64,
    /// Unparseable response or a body with neither result nor error.
    pub malformed: u64,
    /// No complete response within the request timeout.
    pub timeout: u64,
    /// Connection reset or closed mid-request.
    pub io: u64,
    /// Could not connect or initialize a session.
    pub connect: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.status
            + self.rate_limited
            + self.rpc_error
            + self.malformed
            + self.timeout
            + self.io
            + self.connect
    }

    fn add(&mut self, other: &ErrorCounts) {
        self.status += other.status;
        self.rate_limited += other.rate_limited;
        self.rpc_error += other.rpc_error;
        self.malformed += other.malformed;
        self.timeout += other.timeout;
        self.io += other.io;
        self.connect += other.connect;
    }

    fn count(&mut self, failure: Failure) {
        match failure {
            Failure::Status => self.status += 1,
            Failure::RateLimited => self.rate_limited += 1,
            Failure::Rpc => self.rpc_error += 1,
            Failure::Malformed => self.malformed += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Io => self.io += 1,
            Failure::Connect => self.connect += 1,
        }
    }
}

/// What one load run measured.
pub struct LoadResult {
    /// Latency in µs of every successful request.
    pub histogram: Histogram<u64>,
    pub completed: u64,
    pub errors: ErrorCounts,
    /// Open loop only: scheduled requests never sent because the target fell too far behind.
    pub missed_slots: u64,
    pub elapsed: Duration,
    /// What the load threads themselves spent while measuring.
    pub generator: GeneratorCpu,
}

/// The load generator's own CPU over the measured window, from getrusage(RUSAGE_THREAD) of each
/// load thread (µs resolution; connection set-up before the window is not counted).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct GeneratorCpu {
    /// User time of all load threads, seconds.
    pub user_s: f64,
    /// System time of all load threads, seconds.
    pub system_s: f64,
    /// The busiest load thread's CPU time ÷ the window: 1.0 is a whole core, i.e. the generator
    /// could not have sent faster and the target's requests/s are the generator's.
    pub busiest_thread: f64,
}

/// User and system CPU time of the calling thread.
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: an all-zero rusage is valid; getrusage writes only into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer has no other precondition.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    (time(usage.ru_utime), time(usage.ru_stime))
}

#[derive(Clone, Copy, Debug)]
enum Failure {
    Status,
    RateLimited,
    Rpc,
    Malformed,
    Timeout,
    Io,
    Connect,
}

/// One keep-alive client connection with its MCP session.
struct Client {
    stream: TcpStream,
    tls: Option<Box<crate::tls::ClientTls>>,
    buf: Vec<u8>,
    /// Request head up to (not including) Content-Length: host, content negotiation, session.
    head: String,
    next_id: u64,
}

impl Client {
    /// Connects, and with `handshake` initializes a session at `path` and sends
    /// notifications/initialized.
    async fn open(
        addr: SocketAddr,
        path: &str,
        extra_headers: Rc<str>,
        tls: Option<&Arc<rustls::ClientConfig>>,
        handshake: bool,
    ) -> Result<Client, Failure> {
        let mut stream =
            match monoio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                _ => return Err(Failure::Connect),
            };
        let _ = stream.set_nodelay(true);
        let tls = match tls {
            None => None,
            Some(config) => {
                let handshake = crate::tls::ClientTls::connect(&mut stream, config);
                match monoio::time::timeout(REQUEST_TIMEOUT, handshake).await {
                    Ok(Ok(t)) => Some(Box::new(t)),
                    _ => return Err(Failure::Connect),
                }
            }
        };
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{extra_headers}"
        );
        let mut client = Client {
            stream,
            tls,
            buf: Vec::with_capacity(16 * 1024),
            head,
            next_id: 1,
        };
        if !handshake {
            return Ok(client);
        }
        let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"mcp-guard-perf","version":"0.1.0"}}}"#;
        let response = client.exchange(init).await.map_err(|_| Failure::Connect)?;
        if !(200..300).contains(&response.status) || response.close {
            return Err(Failure::Connect);
        }
        client.head.push_str("Mcp-Protocol-Version: 2025-11-25\r\n");
        if let Some(session) = response.session_id {
            client
                .head
                .push_str(&format!("Mcp-Session-Id: {session}\r\n"));
        }
        let note = client
            .exchange(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .await
            .map_err(|_| Failure::Connect)?;
        if !(200..300).contains(&note.status) || note.close {
            return Err(Failure::Connect);
        }
        Ok(client)
    }

    /// Sends one request; the outcome, and whether the connection can carry another.
    async fn call(&mut self, call: Call) -> (Result<(), Failure>, bool) {
        let body = request_body(call, self.next_id);
        self.next_id += 1;
        let response = match self.exchange(&body).await {
            Ok(r) => r,
            Err(f) => return (Err(f), false),
        };
        let reusable = !response.close;
        if response.status == 429 {
            return (Err(Failure::RateLimited), reusable);
        }
        if !(200..300).contains(&response.status) {
            return (Err(Failure::Status), reusable);
        }
        let outcome = if wire::find(&response.body, b"\"result\"").is_some() {
            Ok(())
        } else if wire::find(&response.body, b"\"error\"").is_some() {
            Err(Failure::Rpc)
        } else {
            Err(Failure::Malformed)
        };
        (outcome, reusable)
    }

    async fn exchange(&mut self, body: &str) -> Result<wire::Response, Failure> {
        match monoio::time::timeout(REQUEST_TIMEOUT, self.exchange_untimed(body)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn exchange_untimed(&mut self, body: &str) -> Result<wire::Response, Failure> {
        let request = format!("{}Content-Length: {}\r\n\r\n{body}", self.head, body.len());
        match &mut self.tls {
            Some(tls) => tls.write_all(&mut self.stream, request.as_bytes()).await,
            None => wire::write_all(&mut self.stream, request.into_bytes()).await,
        }
        .map_err(|_| Failure::Io)?;
        let mut eof = false;
        loop {
            match wire::parse_response(&self.buf, eof) {
                Ok(Some(response)) => {
                    self.buf.drain(..response.consumed);
                    return Ok(response);
                }
                Ok(None) if eof => return Err(Failure::Io),
                Ok(None) => {}
                Err(_) => return Err(Failure::Malformed),
            }
            let result = match &mut self.tls {
                Some(tls) => tls.read_more(&mut self.stream, &mut self.buf).await,
                None => {
                    let (result, buf) =
                        wire::read_more(&mut self.stream, std::mem::take(&mut self.buf)).await;
                    self.buf = buf;
                    result
                }
            };
            match result {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(_) => return Err(Failure::Io),
            }
        }
    }
}

/// Per-thread tallies, shared by that thread's connection tasks (one histogram per thread, not
/// per connection: a histogram is ~100 KiB).
struct Tally {
    histogram: Histogram<u64>,
    completed: u64,
    errors: ErrorCounts,
    missed_slots: u64,
}

fn new_histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3)
        .map_err(|e| format!("cannot create histogram: {e}"))
}

/// The endpoint connection `index` uses: round robin over `endpoints`.
fn endpoint_of(endpoints: &[Rc<str>], index: usize) -> Rc<str> {
    endpoints[index % endpoints.len()].clone()
}

/// Runs one load phase and merges what every thread measured.
pub fn run(spec: &LoadSpec) -> Result<LoadResult, String> {
    if spec.connections == 0 {
        return Err("at least one connection is needed".into());
    }
    if spec.endpoints.is_empty() {
        return Err("at least one endpoint is needed".into());
    }
    if let Pace::Open { rate: 0 } = spec.pace {
        return Err("the fixed rate must be at least 1 request/s".into());
    }
    let threads = spec.threads.clamp(1, spec.connections);
    let barrier = Arc::new(Barrier::new(threads));
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let barrier = barrier.clone();
        let indices: Vec<usize> = (thread..spec.connections).step_by(threads).collect();
        let spec = spec.clone();
        let handle = std::thread::Builder::new()
            .name(format!("load-{thread}"))
            .spawn(move || load_thread(spec, indices, &barrier))
            .map_err(|e| format!("cannot start load thread: {e}"))?;
        handles.push(handle);
    }
    let mut merged = LoadResult {
        histogram: new_histogram()?,
        completed: 0,
        errors: ErrorCounts::default(),
        missed_slots: 0,
        elapsed: Duration::ZERO,
        generator: GeneratorCpu::default(),
    };
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok((tally, elapsed, (user, system)))) => {
                merged.generator.user_s += user.as_secs_f64();
                merged.generator.system_s += system.as_secs_f64();
                if !elapsed.is_zero() {
                    let busy = (user + system).as_secs_f64() / elapsed.as_secs_f64();
                    merged.generator.busiest_thread = merged.generator.busiest_thread.max(busy);
                }
                merged
                    .histogram
                    .add(&tally.histogram)
                    .map_err(|e| format!("cannot merge histograms: {e}"))?;
                merged.completed += tally.completed;
                merged.errors.add(&tally.errors);
                merged.missed_slots += tally.missed_slots;
                merged.elapsed = merged.elapsed.max(elapsed);
            }
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(_) => first_error = first_error.or(Some("a load thread panicked".to_string())),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(merged),
    }
}

/// A load thread's tally, its measured window, and its own (user, system) CPU in that window.
type ThreadOutcome = (Tally, Duration, (Duration, Duration));

fn load_thread(
    spec: LoadSpec,
    indices: Vec<usize>,
    barrier: &Barrier,
) -> Result<ThreadOutcome, String> {
    let extra_headers: Rc<str> = spec.extra_headers.into();
    let endpoints: Rc<[Rc<str>]> = spec
        .endpoints
        .iter()
        .map(|e| Rc::from(e.as_str()))
        .collect();
    // Pinned before the runtime exists, so its ring and any kernel helper it starts inherit it.
    let prepared = crate::pinning::pin_current_thread(&spec.cpus)
        .and_then(|()| crate::runtime())
        .and_then(|mut rt| {
            let tally = Rc::new(RefCell::new(Tally {
                histogram: new_histogram()?,
                completed: 0,
                errors: ErrorCounts::default(),
                missed_slots: 0,
            }));
            // Sessions are set up before the clock starts: initialize is not what we measure.
            let clients = rt.block_on(async {
                let opening: Vec<_> = indices
                    .iter()
                    .map(|&index| {
                        let (path, headers) =
                            (endpoint_of(&endpoints, index), extra_headers.clone());
                        let tls = spec.tls.clone();
                        let handshake = spec.handshake;
                        monoio::spawn(async move {
                            Client::open(spec.addr, &path, headers, tls.as_ref(), handshake).await
                        })
                    })
                    .collect();
                let mut clients = Vec::with_capacity(opening.len());
                for handle in opening {
                    clients.push(handle.await.ok());
                }
                clients
            });
            Ok((rt, tally, clients))
        });
    // Every thread reaches the barrier, even a failed one, so the others are not stranded.
    barrier.wait();
    let (mut rt, tally, clients) = prepared?;
    let start = Instant::now();
    let cpu_start = thread_cpu();
    let plan = Rc::new(Plan {
        addr: spec.addr,
        call: spec.call,
        pace: spec.pace,
        start,
        deadline: start + spec.duration,
        total_connections: spec.connections,
        extra_headers,
        endpoints,
        tls: spec.tls.clone(),
        live: spec.live.clone(),
        handshake: spec.handshake,
    });
    rt.block_on(async {
        let tasks: Vec<_> = indices
            .iter()
            .zip(clients)
            .map(|(&index, client)| {
                monoio::spawn(drive(plan.clone(), index, client, tally.clone()))
            })
            .collect();
        for task in tasks {
            task.await;
        }
    });
    let elapsed = start.elapsed();
    let cpu_end = thread_cpu();
    drop(plan);
    let tally = Rc::try_unwrap(tally)
        .map_err(|_| "load tasks still hold the tally".to_string())?
        .into_inner();
    let spent = (
        cpu_end.0.saturating_sub(cpu_start.0),
        cpu_end.1.saturating_sub(cpu_start.1),
    );
    Ok((tally, elapsed, spent))
}

struct Plan {
    addr: SocketAddr,
    call: Call,
    pace: Pace,
    start: Instant,
    deadline: Instant,
    total_connections: usize,
    extra_headers: Rc<str>,
    endpoints: Rc<[Rc<str>]>,
    tls: Option<Arc<rustls::ClientConfig>>,
    live: Option<Arc<LiveCounts>>,
    handshake: bool,
}

impl Plan {
    fn count_live(&self, ok: bool) {
        if let Some(live) = &self.live {
            let counter = if ok { &live.completed } else { &live.errors };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One connection's request loop, bounded by the deadline (open loop: plus a grace period to
/// catch up, after which unsent slots are counted as missed).
async fn drive(
    plan: Rc<Plan>,
    index: usize,
    mut client: Option<Client>,
    tally: Rc<RefCell<Tally>>,
) {
    if client.is_none() {
        tally.borrow_mut().errors.connect += 1;
        plan.count_live(false);
    }
    let duration = plan.deadline - plan.start;
    let hard_stop = plan.deadline + duration.min(Duration::from_secs(2));
    let (interval, offset) = match plan.pace {
        Pace::Closed => (Duration::ZERO, Duration::ZERO),
        Pace::Open { rate } => (
            Duration::from_secs_f64(plan.total_connections as f64 / rate as f64),
            Duration::from_secs_f64(index as f64 / rate as f64),
        ),
    };
    let path = endpoint_of(&plan.endpoints, index);
    let mut slot_number: u32 = 0;
    loop {
        if crate::interrupted() {
            return;
        }
        let now = Instant::now();
        let scheduled = match plan.pace {
            Pace::Closed if now >= plan.deadline => return,
            Pace::Closed => now,
            Pace::Open { .. } => {
                let slot = plan.start + offset + interval * slot_number;
                if slot >= plan.deadline {
                    return;
                }
                if now >= hard_stop {
                    let left = (plan.deadline - slot).as_secs_f64() / interval.as_secs_f64();
                    tally.borrow_mut().missed_slots += left.ceil() as u64;
                    return;
                }
                if slot > now {
                    // The connection is free before its slot. The timer wakes us up to ~1 ms
                    // late (monoio's wheel has millisecond ticks); that lateness is ours, not the
                    // target's, so the clock starts at the actual send.
                    monoio::time::sleep_until(monoio::time::Instant::from_std(slot)).await;
                    Instant::now()
                } else {
                    // The previous response ran past this slot: the wait is the target's doing,
                    // so it counts (coordinated-omission correction).
                    slot
                }
            }
        };
        slot_number = slot_number.saturating_add(1);
        let connection = match client.as_mut() {
            Some(c) => c,
            None => match Client::open(
                plan.addr,
                &path,
                plan.extra_headers.clone(),
                plan.tls.as_ref(),
                plan.handshake,
            )
            .await
            {
                Ok(c) => client.insert(c),
                Err(f) => {
                    tally.borrow_mut().errors.count(f);
                    plan.count_live(false);
                    monoio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            },
        };
        let (outcome, reusable) = connection.call(plan.call).await;
        let latency_us = scheduled
            .elapsed()
            .as_micros()
            .min(u128::from(HISTOGRAM_MAX_US)) as u64;
        plan.count_live(outcome.is_ok());
        {
            let mut tally = tally.borrow_mut();
            match outcome {
                Ok(()) => {
                    tally.completed += 1;
                    tally.histogram.saturating_record(latency_us.max(1));
                }
                Err(f) => tally.errors.count(f),
            }
        }
        if !reusable {
            client = None;
        }
    }
}

/// Opens one MCP session at `/mcp` the way every load connection does (initialize, then
/// notifications/initialized) and returns the header lines its requests carry: content
/// negotiation, `extra_headers`, protocol version and session id, without the request line and
/// Host. An outside load generator (wrk) sends these on every request; the session outlives this
/// connection, as Streamable HTTP sessions do.
pub fn session_headers(
    addr: SocketAddr,
    extra_headers: &str,
) -> Result<Vec<(String, String)>, String> {
    let mut rt = crate::runtime()?;
    let client = rt
        .block_on(Client::open(addr, "/mcp", extra_headers.into(), None, true))
        .map_err(|f| format!("cannot open an MCP session at {addr}: {f:?}"))?;
    Ok(client
        .head
        .split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| !name.eq_ignore_ascii_case("host"))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect())
}

/// The JSON-RPC body of one `call` request with id `id`.
pub fn request_body(call: Call, id: u64) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},{}}}"#, call.members())
}

/// Opens `count` idle keep-alive connections (nothing sent: the cheapest state a client can hold
/// a server in, so what they cost is the server's per-connection floor).
pub fn open_idle(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpStream>, String> {
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    for n in 0..count {
        if crate::interrupted() {
            return Err("interrupted".into());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "opening {count} idle connections took over 60 s ({n} open)"
            ));
        }
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("idle connection {n} of {count} to {addr} failed: {e}"))?;
        held.push(stream);
    }
    Ok(held)
}

/// How many held idle connections the server has closed meanwhile.
pub fn count_closed(held: &[std::net::TcpStream]) -> usize {
    let mut probe = [0u8; 1];
    held.iter()
        .filter(|s| {
            if s.set_nonblocking(true).is_err() {
                return true;
            }
            // Readable with 0 bytes (or an error other than "would block") means closed.
            match std::io::Read::read(&mut &**s, &mut probe) {
                Ok(_) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_a_json_rpc_request_and_the_4k_result_is_4k_of_text() {
        for call in [
            Call::Echo,
            Call::EchoSse,
            Call::ToolsList,
            Call::EchoResult4k,
        ] {
            let v: serde_json::Value = serde_json::from_str(&request_body(call, 1)).unwrap();
            assert_eq!(v["jsonrpc"], "2.0", "{call:?}");
        }
        let v: serde_json::Value =
            serde_json::from_str(&request_body(Call::EchoResult4k, 1)).unwrap();
        let text = v["params"]["arguments"]["text"].as_str().unwrap();
        assert!((4096..4300).contains(&text.len()), "{}", text.len());
    }

    #[test]
    fn connections_spread_over_endpoints_round_robin() {
        let endpoints: Vec<Rc<str>> = (0..10).map(|i| Rc::from(format!("/mcp/s{i}"))).collect();
        assert_eq!(&*endpoint_of(&endpoints, 0), "/mcp/s0");
        assert_eq!(&*endpoint_of(&endpoints, 13), "/mcp/s3");
        // 64 connections over 10 endpoints: 7 on the first four, 6 on the rest, every one used.
        let mut per_endpoint = [0; 10];
        for index in 0..64 {
            let path = endpoint_of(&endpoints, index);
            per_endpoint[endpoints.iter().position(|e| *e == path).unwrap()] += 1;
        }
        assert_eq!(per_endpoint, [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]);
        let single: Vec<Rc<str>> = vec![Rc::from("/mcp")];
        assert!((0..5).all(|i| &*endpoint_of(&single, i) == "/mcp"));
    }
}
