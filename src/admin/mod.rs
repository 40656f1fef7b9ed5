//! The admin listener, on its own thread and port: `/metrics` (Prometheus text), `/health`,
//! `/live`, `/ready`. Blocking I/O with timeouts is fine here: no request of the data plane
//! ever waits on this thread.

use crate::runtime::worker::Shared;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Starts the admin thread.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>) {
    let _ = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = serve(stream, &shared) {
                            tracing::debug!(target: "mcp_guard::admin", "admin connection: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(target: "mcp_guard::admin", "admin accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
}

fn serve(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let path = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") && req.method != Some("HEAD") {
                    return respond(
                        &mut stream,
                        405,
                        "text/plain",
                        b"method not allowed\n".to_vec(),
                    );
                }
                break req
                    .path
                    .unwrap_or("/")
                    .split('?')
                    .next()
                    .unwrap_or("/")
                    .to_string();
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
            _ => return respond(&mut stream, 400, "text/plain", b"bad request\n".to_vec()),
        }
    };
    match path.as_str() {
        "/metrics" => {
            let body = shared.metrics.render(shared.is_ready());
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                body.into_bytes(),
            )
        }
        "/health" => respond(
            &mut stream,
            200,
            "application/json",
            shared.health_json().into_bytes(),
        ),
        "/live" => respond(
            &mut stream,
            200,
            "application/json",
            b"{\"status\":\"alive\"}".to_vec(),
        ),
        "/ready" if shared.is_ready() => respond(
            &mut stream,
            200,
            "application/json",
            b"{\"status\":\"ready\"}".to_vec(),
        ),
        "/ready" => respond(
            &mut stream,
            503,
            "application/json",
            b"{\"status\":\"not ready\",\"reason\":\"upstream unreachable\"}".to_vec(),
        ),
        _ => respond(&mut stream, 404, "text/plain", b"not found\n".to_vec()),
    }
}

fn respond(stream: &mut TcpStream, status: u16, ctype: &str, body: Vec<u8>) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(body.len() + 128);
    crate::http::response::write_head(
        &mut out,
        status,
        &[("content-type", ctype)],
        crate::http::response::Framing::Length(body.len() as u64),
        false,
    );
    out.extend_from_slice(&body);
    stream.write_all(&out)
}
