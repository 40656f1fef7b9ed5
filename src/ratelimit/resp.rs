//! The Redis wire (RESP2) and one blocking connection to a Redis server, plain or TLS (rustls
//! on ring): just what the fleet rate limiter sends (AUTH, SELECT, SCRIPT LOAD, EVALSHA, PING).
//! Used only on the limiter's own thread, never on a worker; every read and write is bounded by
//! a timeout.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A bulk string larger than this from the server is refused (the limiter's replies are tiny).
const MAX_BULK: usize = 1024 * 1024;
/// An array longer than this is refused.
const MAX_ARRAY: usize = 1024;
/// Nesting deeper than this is refused.
const MAX_DEPTH: usize = 4;

/// A parsed `redis://` or `rediss://` URL. Its password never prints: `Display` and `Debug`
/// show `***` in its place.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `rediss://`: TLS, verified against the Mozilla root set.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (6379 unless given).
    pub port: u16,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password, if any.
    password: Option<String>,
    /// Database number (`/N`).
    pub db: u32,
}

impl RedisUrl {
    /// Parses `redis[s]://[[user]:password@]host[:port][/db]`.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        // Error messages name the URL without its credentials.
        let (tls, rest) = if let Some(r) = url.strip_prefix("rediss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("redis://") {
            (false, r)
        } else {
            return Err("must start with redis:// or rediss://".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.find(':') {
                    Some(i) => (&u[..i], Some(&u[i + 1..])),
                    None => (u, None),
                };
                let user =
                    crate::http::percent_decoded(user).ok_or("the user name has a bad %-escape")?;
                let pass = pass
                    .map(|p| {
                        crate::http::percent_decoded(p).ok_or("the password has a bad %-escape")
                    })
                    .transpose()?;
                // `redis://secret@host` is the common "password only" spelling.
                match pass {
                    Some(p) => ((!user.is_empty()).then_some(user), Some(p)),
                    None if user.is_empty() => (None, None),
                    None => (None, Some(user)),
                }
            }
        };
        if hostport.is_empty() {
            return Err("has no host".into());
        }
        let (host, port) = crate::config::split_host_port(hostport, 6379)
            .ok_or("has a bad host:port (a port is 1–65535)")?;
        if port == 0 {
            return Err("has port 0".into());
        }
        let path = path.split(['?', '#']).next().unwrap_or("");
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<u32>()
                .map_err(|_| "has a database that is not a number (`/0`)")?
        };
        let check = |s: &str| s.bytes().all(|b| b > 0x20 && b != 0x7f);
        if !check(&host) || username.as_deref().is_some_and(|u| !check(u)) {
            return Err("holds spaces or control characters".into());
        }
        Ok(RedisUrl {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            username,
            password,
            db,
        })
    }

    /// Whether a password is set.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The same server settings (TLS, credentials) at a cluster node named `host:port` by a
    /// redirection.
    pub fn at_node(&self, addr: &str) -> Result<RedisUrl, String> {
        let (host, port) = crate::config::split_host_port(addr, 6379)
            .filter(|(h, p)| !h.is_empty() && *p != 0)
            .ok_or_else(|| format!("a redirection names a bad address `{}`", shown(addr)))?;
        Ok(RedisUrl {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            ..self.clone()
        })
    }

    /// This server's host as a redirection's `host:port` would spell it.
    pub fn host_for_redirect(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(f, "{scheme}://")?;
        match (&self.username, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (None, Some(_)) => write!(f, ":***@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, None) => {}
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}/{}", self.host, self.port, self.db)
        } else {
            write!(f, "{}:{}/{}", self.host, self.port, self.db)
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR …`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` (None: the null bulk string).
    Bulk(Option<Vec<u8>>),
    /// `*n` (None: the null array).
    Array(Option<Vec<Reply>>),
}

/// Encodes a command as an array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the front of `buf`: `Ok(None)` when it is not all there yet (read
/// more), `Err` when it is not RESP or exceeds the bounds, else the reply and its length.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    parse_at(buf, 0)
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(raw: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| "a RESP length or integer is not a number".to_string())
}

fn parse_at(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, String> {
    if depth > MAX_DEPTH {
        return Err("RESP nesting too deep".into());
    }
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((text, used)) = line(&buf[1..]) else {
        // A line longer than any bounded header means garbage, not a slow server.
        return if buf.len() > 64 && kind != b'+' && kind != b'-' || buf.len() > MAX_BULK {
            Err("RESP line too long".into())
        } else {
            Ok(None)
        };
    };
    let used = used + 1;
    let as_text = || String::from_utf8_lossy(text).into_owned();
    match kind {
        b'+' => Ok(Some((Reply::Simple(as_text()), used))),
        b'-' => Ok(Some((Reply::Error(as_text()), used))),
        b':' => Ok(Some((Reply::Int(number(text)?), used))),
        b'$' => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some((Reply::Bulk(None), used)));
            }
            let n = usize::try_from(n).map_err(|_| "negative RESP length")?;
            if n > MAX_BULK {
                return Err("RESP bulk string too large".into());
            }
            let Some(body) = buf.get(used..used + n + 2) else {
                return Ok(None);
            };
            if &body[n..] != b"\r\n" {
                return Err("RESP bulk string not terminated".into());
            }
            Ok(Some((Reply::Bulk(Some(body[..n].to_vec())), used + n + 2)))
        }
        b'*' => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some((Reply::Array(None), used)));
            }
            let n = usize::try_from(n).map_err(|_| "negative RESP length")?;
            if n > MAX_ARRAY {
                return Err("RESP array too long".into());
            }
            let mut items = Vec::with_capacity(n);
            let mut at = used;
            for _ in 0..n {
                match parse_at(&buf[at..], depth + 1)? {
                    Some((r, len)) => {
                        items.push(r);
                        at += len;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        _ => Err("not a RESP reply".into()),
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Certificate authorities for `rediss://` read from a PEM file, and the TLS client
/// configuration built on them.
#[derive(Clone)]
pub struct CaRoots {
    path: String,
    config: Arc<rustls::ClientConfig>,
}

impl PartialEq for CaRoots {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}

impl fmt::Debug for CaRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaRoots({})", self.path)
    }
}

/// Reads the certificate authorities in the PEM file at `path`.
pub fn read_ca_file(path: &std::path::Path) -> Result<CaRoots, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: a certificate is not usable: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(CaRoots {
        path: path.display().to_string(),
        config: client_config(roots)?,
    })
}

fn client_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, String> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
        .map_err(|e| format!("TLS: {e}"))
}

/// The client configuration for `rediss://` without a CA file: the Mozilla root set.
fn public_roots_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            client_config(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        })
        .clone()
}

/// A connection to one Redis server, authenticated and on its database.
pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Conn {
    /// Connects, handshakes TLS for `rediss://` (verified against `ca`, else the Mozilla root
    /// set), authenticates and selects the database, each step within `timeout`.
    pub fn open(url: &RedisUrl, ca: Option<&CaRoots>, timeout: Duration) -> Result<Conn, String> {
        let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
            .collect();
        let mut last = "no address".to_string();
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("cannot connect to {a}: {e}"),
            }
        }
        let tcp = tcp.ok_or(last)?;
        tcp.set_nodelay(true).ok();
        let stream = if url.tls {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|_| format!("`{}` is not a valid TLS server name", url.host))?;
            let config = match ca {
                Some(ca) => ca.config.clone(),
                None => public_roots_config()?,
            };
            let client =
                rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(client, tcp)))
        } else {
            Stream::Plain(tcp)
        };
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
            timeout,
        };
        if let Some(p) = &url.password {
            let reply = match &url.username {
                Some(u) => conn.command(&[b"AUTH", u.as_bytes(), p.as_bytes()])?,
                None => conn.command(&[b"AUTH", p.as_bytes()])?,
            };
            if let Reply::Error(e) = reply {
                // The server's words (e.g. WRONGPASS), never the password.
                return Err(format!("AUTH refused: {}", shown(&e)));
            }
        }
        if url.db != 0 {
            if let Reply::Error(e) = conn.command(&[b"SELECT", url.db.to_string().as_bytes()])? {
                return Err(format!("SELECT {} refused: {}", url.db, shown(&e)));
            }
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply, within the connection's timeout. An `Err` leaves
    /// the connection unusable (the caller drops it).
    pub fn command(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        let deadline = Instant::now() + self.timeout;
        let tcp_timeout = |s: &Stream| {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            s.tcp().set_read_timeout(Some(left)).ok();
            s.tcp().set_write_timeout(Some(left)).ok();
        };
        tcp_timeout(&self.stream);
        self.stream
            .write_all(&encode(args))
            .and_then(|()| self.stream.flush())
            .map_err(|e| format!("write: {e}"))?;
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            if Instant::now() >= deadline {
                return Err("timed out".into());
            }
            tcp_timeout(&self.stream);
            let mut chunk = [0u8; 4096];
            let n = match self.stream.read(&mut chunk) {
                // A signal to the process (SIGHUP, say) is not Redis's doing: read on.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The socket's read timeout (the command's deadline) ran out.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("timed out".into());
                }
                other => other.map_err(|e| format!("read: {e}"))?,
            };
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Text a Redis server sent (an error reply, an address), as logs may show it: control
/// characters escaped (a bare LF in an error reply would forge a log line) and cut at 200
/// characters (a server may send errors of any length, again at every retry).
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(220));
    for (i, c) in text.chars().enumerate() {
        if i == 200 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_text_is_shown_on_one_line_and_bounded() {
        // Red team (fleet, F6): an error reply with a bare LF forged a second log line, and
        // 100 KB errors made 100 KB log lines at every retry.
        let forged = "ERR boom\n2026-11-30T00:00:00Z  INFO Redis answers again";
        let one_line = shown(forged);
        assert!(
            !one_line.contains('\n') && one_line.contains("\\n"),
            "{one_line}"
        );
        let long = shown(&"x".repeat(100_000));
        assert!(long.chars().count() <= 201, "{}", long.len());
        assert_eq!(shown("WRONGPASS invalid"), "WRONGPASS invalid");
    }

    #[test]
    fn urls_parse_and_never_print_their_password() {
        let u = RedisUrl::parse("redis://app:s%40cret@cache.internal:6380/2").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.db, u.username.as_deref()),
            ("cache.internal", 6380, 2, Some("app"))
        );
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        assert_eq!(u.to_string(), "redis://app:***@cache.internal:6380/2");
        assert!(!format!("{u:?}").contains("cret"));
        let u = RedisUrl::parse("rediss://:pw@[::1]").unwrap();
        assert!(u.tls && u.username.is_none() && u.has_password());
        assert_eq!(u.to_string(), "rediss://:***@[::1]:6379/0");
        let u = RedisUrl::parse("redis://onlypassword@h").unwrap();
        assert_eq!(u.password.as_deref(), Some("onlypassword"));
        for bad in [
            "http://h",
            "redis://",
            "redis://h:99999",
            "redis://h/x",
            "redis://u:%zz@h",
            "redis://h:0",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_parse_whole_or_ask_for_more_and_hostile_ones_are_refused() {
        assert_eq!(
            parse(b"*2\r\n:3\r\n$2\r\nok\r\n").unwrap(),
            Some((
                Reply::Array(Some(vec![Reply::Int(3), Reply::Bulk(Some(b"ok".to_vec()))])),
                16
            ))
        );
        assert_eq!(
            parse(b"-NOSCRIPT x\r\n").unwrap().unwrap().0,
            Reply::Error("NOSCRIPT x".into())
        );
        for partial in [&b""[..], b"*2\r\n:3\r\n", b"$5\r\nab", b":12"] {
            assert_eq!(parse(partial).unwrap(), None, "{partial:?}");
        }
        for hostile in [
            &b"$99999999999\r\n"[..],
            b"*100000\r\n",
            b"$-5\r\n",
            b"?x\r\n",
            b"$2\r\nabcd",
            b":notanumber\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            &[b'$'; 100][..],
        ] {
            assert!(parse(hostile).is_err(), "{hostile:?}");
        }
        assert_eq!(encode(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
    }
}
