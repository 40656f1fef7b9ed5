//! Test support for OAuth: a test authorization server on loopback (RFC 8414 metadata, a
//! JWKS the test swaps, an RFC 7662 introspection endpoint answering from a table, every
//! request counted) and an ES256 key that signs access tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An ES256 signing key.
pub struct EcKey {
    pair: EcdsaKeyPair,
    kid: String,
}

impl EcKey {
    pub fn new(kid: &str) -> EcKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        EcKey {
            pair,
            kid: kid.into(),
        }
    }

    pub fn jwk(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        json!({"kty":"EC","crv":"P-256","kid":self.kid,"use":"sig","alg":"ES256",
               "x":B64.encode(&point[1..33]),"y":B64.encode(&point[33..65])})
    }

    pub fn sign(&self, claims: &Value, kid: &str) -> String {
        let header = json!({"alg":"ES256","typ":"at+jwt","kid":kid});
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let rng = ring::rand::SystemRandom::new();
        let sig = self.pair.sign(&rng, signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }
}

/// What the test authorization server answers at `/introspect`.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Answers from its token table (`{"active":false}` for unknown tokens).
    Normal,
    /// HTTP 500.
    Down,
    /// A body that is not JSON.
    BadJson,
}

/// A test authorization server on loopback: RFC 8414 metadata, a JWKS the test swaps, and an
/// introspection endpoint answering from a table; every request counted by path.
pub struct As {
    pub addr: SocketAddr,
    pub jwks: Arc<Mutex<String>>,
    pub tokens: Arc<Mutex<HashMap<String, Value>>>,
    pub mode: Arc<Mutex<Mode>>,
    /// Requests by path, and introspections by token.
    pub hits: Arc<Mutex<HashMap<String, usize>>>,
    /// The `Authorization` of the last introspection request.
    pub last_auth: Arc<Mutex<String>>,
    pub served: Arc<AtomicUsize>,
    /// While set, introspection answers wait.
    pub hold: Arc<std::sync::atomic::AtomicBool>,
}

impl As {
    pub fn start(jwks: Value) -> As {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = As {
            addr,
            jwks: Arc::new(Mutex::new(jwks.to_string())),
            tokens: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Normal)),
            hits: Arc::default(),
            last_auth: Arc::default(),
            served: Arc::default(),
            hold: Arc::default(),
        };
        let hold = s.hold.clone();
        let (jwks, tokens, mode, hits, last_auth, served) = (
            s.jwks.clone(),
            s.tokens.clone(),
            s.mode.clone(),
            s.hits.clone(),
            s.last_auth.clone(),
            s.served.clone(),
        );
        let issuer = s.issuer();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let hold = hold.clone();
                let (jwks, tokens, mode, hits, last_auth, served, issuer) = (
                    jwks.clone(),
                    tokens.clone(),
                    mode.clone(),
                    hits.clone(),
                    last_auth.clone(),
                    served.clone(),
                    issuer.clone(),
                );
                std::thread::spawn(move || {
                    let Some((path, headers, body)) = read_request(&conn) else {
                        return;
                    };
                    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let (status, doc) = match path.as_str() {
                        "/.well-known/oauth-authorization-server" => (
                            200,
                            json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks.json"),
                                   "introspection_endpoint": format!("{issuer}/introspect")})
                            .to_string(),
                        ),
                        "/jwks.json" => (200, jwks.lock().unwrap().clone()),
                        "/introspect" => {
                            *last_auth.lock().unwrap() = header(&headers, "authorization");
                            let current = *mode.lock().unwrap();
                            match current {
                                Mode::Down => (500, String::new()),
                                Mode::BadJson => (200, "{\"active\": tru".to_string()),
                                Mode::Normal => {
                                    let token = form_value(&body, "token");
                                    *hits.lock().unwrap().entry(token.clone()).or_default() += 1;
                                    // Held: the answer waits until the test lets it go.
                                    let deadline =
                                        std::time::Instant::now() + Duration::from_secs(20);
                                    while hold.load(Ordering::SeqCst)
                                        && std::time::Instant::now() < deadline
                                    {
                                        std::thread::sleep(Duration::from_millis(10));
                                    }
                                    let answer = tokens
                                        .lock()
                                        .unwrap()
                                        .get(&token)
                                        .cloned()
                                        .unwrap_or(json!({"active": false}));
                                    (200, answer.to_string())
                                }
                            }
                        }
                        _ => (404, String::new()),
                    };
                    served.fetch_add(1, Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                        doc.len()
                    );
                    let mut conn = conn;
                    let _ = conn.write_all(reply.as_bytes());
                });
            }
        });
        s
    }

    pub fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn grant(&self, token: &str, answer: Value) {
        self.tokens.lock().unwrap().insert(token.into(), answer);
    }
}

/// Path, header lines and body of one request.
fn read_request(mut conn: &TcpStream) -> Option<(String, String, String)> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let length: usize = header(head, "content-length").parse().unwrap_or(0);
            if raw.len() >= end + 4 + length {
                let path = head.split(' ').nth(1)?.to_string();
                let body = text[end + 4..end + 4 + length].to_string();
                return Some((path, head.to_string(), body));
            }
        }
    }
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// A form member, percent-decoded.
fn form_value(body: &str, name: &str) -> String {
    let raw = body
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_default();
    let bytes = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}
