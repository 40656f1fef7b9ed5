//! The admin listener, on its own thread and port: `/metrics` (Prometheus text), `/health`,
//! `/live`, `/ready`. It runs its own small monoio runtime (epoll, so it works wherever the
//! process does) with a task per connection: a client that trickles bytes or never reads its
//! answer must not stop health checks and scrapes for everyone else, or an orchestrator would
//! restart a healthy gateway. Each connection has a deadline for its whole request head and
//! for writing its answer, and at most [`MAX_CONNECTIONS`] are served at once, at most
//! [`MAX_CONNECTIONS_PER_ADDRESS`] from one client address (the rest get a 503 and are counted). No request of the data plane ever waits on this thread.

use crate::runtime::worker::Shared;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use std::cell::Cell;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Admin connections served at once; beyond it a connection gets a 503 and is closed. Enough
/// for a few scrapers and probes, small enough that a flood costs little memory.
pub const MAX_CONNECTIONS: usize = 64;
/// Admin connections one client address may hold at once: a single client cannot take every
/// slot from the orchestrator's probes.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 8;
/// Deadline for a whole request head, however it trickles in (not per read).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline for writing an answer to a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for the 503 written at the cap: it fits any fresh socket's send buffer, and the
/// accept loop waits for it, so it must be short.
const REFUSE_TIMEOUT: Duration = Duration::from_millis(100);
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Admin-thread counters: only this thread touches them, so plain cells.
#[derive(Default)]
struct AdminState {
    active: Cell<usize>,
    /// Connections held per client address (at most `MAX_CONNECTIONS` entries).
    per_address: std::cell::RefCell<std::collections::HashMap<std::net::IpAddr, usize>>,
    refused: Cell<u64>,
    timed_out: Cell<u64>,
}

/// Starts the admin thread.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>) {
    let _ = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = listener.set_nonblocking(true).and_then(|_| {
                monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
            });
            match rt {
                Ok(mut rt) => rt.block_on(accept_loop(listener, shared)),
                Err(e) => {
                    tracing::error!(target: "mcp_guard::admin", "admin runtime failed to start: {e}")
                }
            }
        });
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(target: "mcp_guard::admin", "admin listener setup failed: {e}");
            return;
        }
    };
    let state = Rc::new(AdminState::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target: "mcp_guard::admin", "admin accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = peer.ip();
        let held = state.per_address.borrow().get(&ip).copied().unwrap_or(0);
        if state.active.get() >= MAX_CONNECTIONS || held >= MAX_CONNECTIONS_PER_ADDRESS {
            state.refused.set(state.refused.get() + 1);
            // Answered inline (bounded by REFUSE_TIMEOUT), so refusals never pile up as tasks.
            let out = response(503, "text/plain", b"too many admin connections\n".to_vec());
            let mut stream = stream;
            let _ = monoio::time::timeout(REFUSE_TIMEOUT, stream.write_all(out)).await;
            continue;
        }
        state.active.set(state.active.get() + 1);
        *state.per_address.borrow_mut().entry(ip).or_insert(0) += 1;
        let (state, shared) = (state.clone(), shared.clone());
        monoio::spawn(async move {
            if let Err(e) = serve(stream, &shared, &state).await {
                tracing::debug!(target: "mcp_guard::admin", "admin connection: {e}");
            }
            state.active.set(state.active.get() - 1);
            let mut per_address = state.per_address.borrow_mut();
            if let Some(n) = per_address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_address.remove(&ip);
                }
            }
        });
    }
}

/// Reads the request head, bounded in size and in total time.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Result<String, u16>>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let (res, b) = crate::http::io::read_append(stream, buf, 1024).await;
        buf = b;
        if res? == 0 {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") && req.method != Some("HEAD") {
                    return Ok(Some(Err(405)));
                }
                let path = req.path.unwrap_or("/");
                return Ok(Some(Ok(path.split('?').next().unwrap_or("/").to_string())));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return Ok(Some(Err(400))),
        }
    }
}

async fn serve(mut stream: TcpStream, shared: &Shared, state: &AdminState) -> std::io::Result<()> {
    let head = match monoio::time::timeout(HEAD_DEADLINE, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => {
            // Cut off: the request head did not arrive in time (slow or idle client).
            state.timed_out.set(state.timed_out.get() + 1);
            return Ok(());
        }
    };
    let out = match head {
        None => return Ok(()),
        Some(Err(405)) => response(405, "text/plain", b"method not allowed\n".to_vec()),
        Some(Err(_)) => response(400, "text/plain", b"bad request\n".to_vec()),
        Some(Ok(path)) => route(&path, shared, state),
    };
    match monoio::time::timeout(WRITE_TIMEOUT, stream.write_all(out)).await {
        Ok((res, _)) => res.map(|_| ()),
        Err(_) => {
            state.timed_out.set(state.timed_out.get() + 1);
            Ok(())
        }
    }
}

/// The serialised answer for `path`.
fn route(path: &str, shared: &Shared, state: &AdminState) -> Vec<u8> {
    match path {
        "/metrics" => {
            let mut body = shared.metrics.render(shared.is_ready());
            shared.quota.render_metrics(&mut body);
            if let Some(pins) = &shared.config.load().pins {
                pins.render_metrics(&mut body);
            }
            let _ = write!(
                body,
                "# HELP mcp_guard_admin_connections_refused_total Admin connections refused at the cap ({MAX_CONNECTIONS} at once), answered 503.\n\
                 # TYPE mcp_guard_admin_connections_refused_total counter\n\
                 mcp_guard_admin_connections_refused_total {}\n\
                 # HELP mcp_guard_admin_timeouts_total Admin connections cut off: request head not complete within {}s, or answer not read.\n\
                 # TYPE mcp_guard_admin_timeouts_total counter\n\
                 mcp_guard_admin_timeouts_total {}\n",
                state.refused.get(),
                HEAD_DEADLINE.as_secs(),
                state.timed_out.get(),
            );
            response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                body.into_bytes(),
            )
        }
        "/health" => {
            let (status, body) = shared.health();
            response(status, "application/json", body.into_bytes())
        }
        "/live" => response(200, "application/json", b"{\"status\":\"alive\"}".to_vec()),
        "/ready" => {
            let (status, body) = shared.readiness();
            response(status, "application/json", body.into_bytes())
        }
        _ => response(404, "text/plain", b"not found\n".to_vec()),
    }
}

fn response(status: u16, ctype: &str, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 128);
    crate::http::response::write_head(
        &mut out,
        status,
        &[("content-type", ctype)],
        crate::http::response::Framing::Length(body.len() as u64),
        false,
    );
    out.extend_from_slice(&body);
    out
}
