//! The small blocking HTTP(S) client that identity-provider calls use (JWKS, authorization
//! server metadata, token exchange, introspection, userinfo) and the audit shipper posts with,
//! run only on threads of their own, never on a worker.
//! TLS is rustls with the ring provider and the Mozilla root set; `http://` is allowed only to
//! loopback addresses (a sidecar, a test), never across a network where the keys that decide
//! who is who could be swapped in transit.

use crate::http::chunked::ChunkedDecoder;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The largest answer read from an identity provider.
pub const MAX_ANSWER: usize = 1024 * 1024;

/// A parsed identity-provider URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdpUrl {
    /// As configured (for messages).
    pub url: String,
    /// `https` (true) or loopback `http`.
    pub tls: bool,
    /// Host name (for TLS verification and `Host`).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Request target (path and query).
    pub target: String,
}

impl IdpUrl {
    /// Parses `url`: `https://host[:port]/path`, or `http://` to a loopback address only.
    pub fn parse(url: &str) -> Result<IdpUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{url}` is not an https:// URL"));
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("`{url}` has no host, or carries credentials"));
        }
        let (host, port) = crate::config::split_host_port(authority, if tls { 443 } else { 80 })
            .ok_or_else(|| format!("bad host:port in `{url}`"))?;
        if target.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(format!("`{url}` holds characters a request line cannot"));
        }
        let parsed = IdpUrl {
            url: url.to_string(),
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            target,
        };
        if !tls && !parsed.is_loopback() {
            return Err(format!(
                "`{url}`: identity-provider URLs must be https (http only to a loopback address)"
            ));
        }
        Ok(parsed)
    }

    fn is_loopback(&self) -> bool {
        if self.host.eq_ignore_ascii_case("localhost") {
            return true;
        }
        self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{}`: {e}", self.host))?
            .collect();
        // A loopback http URL must stay on loopback whatever the resolver says.
        if !self.tls && addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(format!("`{}` resolves off loopback", self.host));
        }
        Ok(addrs)
    }
}

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body (at most [`MAX_ANSWER`] bytes).
    pub body: Vec<u8>,
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth());
            // The ring provider supports the default protocol versions; if it ever did not,
            // every IdP call fails with a clear error instead of the process stopping.
            Arc::new(config.unwrap_or_else(|_| {
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 with ring")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
            }))
        })
        .clone()
}

/// `GET url` with `headers`, the whole exchange bounded by `timeout`.
pub fn get(url: &IdpUrl, headers: &[(&str, &str)], timeout: Duration) -> Result<Answer, String> {
    let raw = request("GET", url, headers, None, answer_complete, timeout)?;
    parse_answer(&raw)
}

/// `POST url` with an `application/x-www-form-urlencoded` body (a token endpoint's request),
/// bounded like [`get`].
pub fn post_form(
    url: &IdpUrl,
    headers: &[(&str, &str)],
    form: &str,
    timeout: Duration,
) -> Result<Answer, String> {
    let body = Some(("application/x-www-form-urlencoded", form.as_bytes()));
    let raw = request("POST", url, headers, body, answer_complete, timeout)?;
    parse_answer(&raw)
}

/// `POST url` with `headers` and a `body` of `content_type`, bounded like [`get`], for the
/// status alone: the audit shipper needs only to know whether a batch was taken, and a bulk
/// API's per-item answer can outgrow [`MAX_ANSWER`].
pub fn post_for_status(
    url: &IdpUrl,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let raw = request(
        "POST",
        url,
        headers,
        Some((content_type, body)),
        head_complete,
        timeout,
    )?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => Ok(resp.code.unwrap_or(0)),
        _ => Err("not an HTTP response".into()),
    }
}

fn request(
    method: &str,
    url: &IdpUrl,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
    complete: fn(&[u8]) -> bool,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut last = "no address".to_string();
    let mut conn = None;
    for addr in url.addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    let tcp = conn.ok_or(last)?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let mut request = format!(
        "{method} {} HTTP/1.1\r\nhost: {}\r\naccept: application/json\r\nuser-agent: mcp-guard/{}\r\nconnection: close\r\n",
        url.target,
        if (url.tls && url.port == 443) || (!url.tls && url.port == 80) {
            url.host.clone()
        } else {
            format!("{}:{}", url.host, url.port)
        },
        env!("CARGO_PKG_VERSION")
    );
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some((content_type, body)) = body {
        request.push_str(&format!(
            "content-type: {content_type}\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    if let Some((_, body)) = body {
        request.extend_from_slice(body);
    }
    if url.tls {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("`{}` is not a valid TLS server name: {e}", url.host))?;
        let client = rustls::ClientConnection::new(tls_config(), name)
            .map_err(|e| format!("TLS setup: {e}"))?;
        let mut stream = rustls::StreamOwned::new(client, tcp);
        exchange(&mut stream, &request, complete, deadline)
    } else {
        let mut tcp = tcp;
        exchange(&mut tcp, &request, complete, deadline)
    }
}

fn exchange(
    s: &mut impl ReadWrite,
    request: &[u8],
    complete: fn(&[u8]) -> bool,
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    s.write_all(request).map_err(|e| format!("sending: {e}"))?;
    s.flush().map_err(|e| format!("sending: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() > deadline {
            return Err("no complete answer in time".into());
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_ANSWER + 64 * 1024 {
                    return Err(format!("answer over {MAX_ANSWER} bytes"));
                }
                if complete(&raw) {
                    return Ok(raw);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A TLS peer closing without close_notify after a complete answer is common.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {
                return Ok(raw);
            }
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Whether `raw` holds a whole response head.
fn head_complete(raw: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    matches!(resp.parse(raw), Ok(httparse::Status::Complete(_)))
}

/// Whether `raw` already holds a whole response (length-framed or chunked); otherwise the
/// answer ends when the connection closes.
fn answer_complete(raw: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = resp.parse(raw) else {
        return false;
    };
    let body = &raw[len..];
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            return std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .is_some_and(|n| body.len() >= n);
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let mut d = ChunkedDecoder::new(MAX_ANSWER as u64);
            let mut out = Vec::new();
            return d.decode(body, &mut out).is_ok() && d.is_done();
        }
    }
    false
}

fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return Err("not an HTTP response".into()),
    };
    let status = resp.code.unwrap_or(0);
    let mut body = raw[len..].to_vec();
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let mut d = ChunkedDecoder::new(MAX_ANSWER as u64);
            let mut out = Vec::new();
            d.decode(&body, &mut out)
                .map_err(|_| "malformed chunked answer".to_string())?;
            if !d.is_done() {
                return Err("answer cut short".into());
            }
            body = out;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        }
    }
    if let Some(n) = length {
        if body.len() < n {
            return Err("answer cut short".into());
        }
        body.truncate(n);
    }
    if body.len() > MAX_ANSWER {
        return Err(format!("answer over {MAX_ANSWER} bytes"));
    }
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_urls_are_accepted() {
        let u = IdpUrl::parse("https://idp.example.com/.well-known/jwks.json").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("idp.example.com", 443));
        assert_eq!(u.target, "/.well-known/jwks.json");
        let u = IdpUrl::parse("http://127.0.0.1:8080/jwks").unwrap();
        assert!(!u.tls && u.port == 8080);
        IdpUrl::parse("http://[::1]:9/k").unwrap();
        IdpUrl::parse("http://localhost/k").unwrap();
        for bad in [
            "http://idp.example.com/jwks",
            "http://10.0.0.1/jwks",
            "ftp://x/y",
            "https://user:pw@idp/jwks",
            "https:///jwks",
            "https://idp/a b",
        ] {
            assert!(IdpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_read_by_length_or_chunks() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"{}"[..]));
        let a = parse_answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(a.body, b"{}");
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}").is_err());
        assert!(answer_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
        ));
        assert!(!answer_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{}"
        ));
    }
}
