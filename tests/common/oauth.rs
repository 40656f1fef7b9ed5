//! OAuth test support: a fake GitHub on loopback (an authorize endpoint that signs the user in
//! at once and sends the browser back, a token endpoint, `/user`), a gateway configured with
//! mcp-guard as the authorization server in front of it, and a client that does each step of
//! MCP authorization as the specification orders it (401 → protected-resource metadata →
//! authorization-server metadata → register → authorize with PKCE → token → call).

use super::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The fake GitHub's client credentials, as the gateway is configured with them.
pub const GH_CLIENT: &str = "gh-client-id";
pub const GH_SECRET: &str = "gh-client-secret";
/// The GitHub user everyone signs in as.
pub const GH_USER_ID: u64 = 4242;

/// A fake GitHub: codes it issued, tokens it issued, and every token request it saw.
pub struct FakeGithub {
    pub addr: SocketAddr,
    pub token_requests: Arc<Mutex<Vec<HashMap<String, String>>>>,
    pub authorize_requests: Arc<Mutex<Vec<HashMap<String, String>>>>,
    /// When set, the raw JSON `/user` answers with (a hostile or odd IdP).
    pub userinfo: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicUsize>,
}

impl FakeGithub {
    pub fn start() -> FakeGithub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token_requests = Arc::new(Mutex::new(Vec::new()));
        let authorize_requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicUsize::new(0));
        let codes: Arc<Mutex<Vec<String>>> = Arc::default();
        let userinfo: Arc<Mutex<Option<String>>> = Arc::default();
        let (tr, ar, st, ui) = (
            token_requests.clone(),
            authorize_requests.clone(),
            stop.clone(),
            userinfo.clone(),
        );
        std::thread::spawn(move || {
            let issued = AtomicUsize::new(0);
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) != 0 {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Some((method, target, body, headers)) = read_request(&mut conn) else {
                    continue;
                };
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let answer = match (method.as_str(), path) {
                    ("GET", "/login/oauth/authorize") => {
                        let q = parse_query(query);
                        ar.lock().unwrap().push(q.clone());
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        let code = format!("ghcode{n}");
                        codes.lock().unwrap().push(code.clone());
                        let back = format!(
                            "{}{}code={code}&state={}",
                            q["redirect_uri"],
                            if q["redirect_uri"].contains('?') {
                                "&"
                            } else {
                                "?"
                            },
                            enc(&q["state"])
                        );
                        format!(
                            "HTTP/1.1 302 Found\r\nlocation: {back}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                    }
                    ("POST", "/login/oauth/access_token") => {
                        let f = parse_query(&body);
                        tr.lock().unwrap().push(f.clone());
                        let known = codes
                            .lock()
                            .unwrap()
                            .iter()
                            .any(|c| Some(c) == f.get("code"));
                        let ok = known
                            && f.get("client_id").map(String::as_str) == Some(GH_CLIENT)
                            && f.get("client_secret").map(String::as_str) == Some(GH_SECRET);
                        // GitHub answers a bad code with 200 and an `error` member.
                        let doc = if ok {
                            json!({"access_token": "gho_faketoken", "token_type": "bearer", "scope": "read:user"})
                        } else {
                            json!({"error": "bad_verification_code"})
                        };
                        json_answer(&doc)
                    }
                    ("GET", "/user") => {
                        let auth = headers.get("authorization").cloned().unwrap_or_default();
                        let raw = ui.lock().unwrap().clone();
                        if auth == "Bearer gho_faketoken"
                            && let Some(body) = raw
                        {
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                        } else if auth == "Bearer gho_faketoken" {
                            json_answer(&json!({"id": GH_USER_ID, "login": "octocat"}))
                        } else {
                            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
                        }
                    }
                    _ => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .into(),
                };
                let _ = conn.write_all(answer.as_bytes());
            }
        });
        FakeGithub {
            addr,
            token_requests,
            authorize_requests,
            userinfo,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn json_answer(doc: &Value) -> String {
    let body = doc.to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

type RawRequest = (String, String, String, HashMap<String, String>);

fn read_request(conn: &mut TcpStream) -> Option<RawRequest> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? != 1 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some((method, target, String::from_utf8(body).ok()?, headers))
}

/// Percent-encodes a query or form value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn dec(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// The parameters of a query string or form.
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(n), dec(v))
        })
        .collect()
}

/// `name=value&…`.
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(n, v)| format!("{n}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A loopback port free now (the gateway's `public_url` must name its port before it starts).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A gateway on a port named in its own configuration (`config_for(port)`): a port free a
/// moment ago can be taken by another test before the gateway binds it, so a start that
/// finds it in use is tried again on another.
pub fn start_on_a_free_port(config_for: impl Fn(u16) -> String) -> Gateway {
    let mut last = String::new();
    for _ in 0..8 {
        match Gateway::try_start(&config_for(free_port())) {
            Ok(g) => return g,
            Err(logs) if logs.contains("already in use") => last = logs,
            Err(logs) => panic!("mcp-guard did not start; logs:\n{logs}"),
        }
    }
    panic!("mcp-guard found every port it was given in use; last logs:\n{last}")
}

/// A gateway with mcp-guard as the authorization server in front of `gh`: the demo server
/// over stdio at `/mcp` and again as the routed server `files`; scope `mcp:echo` grants
/// `echo`, `mcp:all` everything. `extra` is appended to the file.
pub fn facade_gateway(gh: &FakeGithub, extra: &str) -> Gateway {
    start_on_a_free_port(|port| {
        format!(
            "[server]\nport = {port}\nworkers = 2\npublic_url = \"http://127.0.0.1:{port}\"\n\
         [admin]\nport = 0\n\
         [upstream]\ntransport = \"stdio\"\ncommand = {DEMO:?}\ntimeout_secs = 10\n\
         [[upstream.servers]]\nname = \"files\"\ntransport = \"stdio\"\ncommand = {DEMO:?}\n\
         [auth.oauth]\nprovider = \"github\"\nclient_id = \"{GH_CLIENT}\"\nclient_secret = \"{GH_SECRET}\"\n\
         authorization_url = \"{}\"\ntoken_url = \"{}\"\nuserinfo_url = \"{}\"\n\
         [auth.oauth.scope_tool_mapping]\n\"mcp:echo\" = [\"echo\"]\n\"mcp:all\" = [\"*\"]\n{extra}",
            gh.url("/login/oauth/authorize"),
            gh.url("/login/oauth/access_token"),
            gh.url("/user"),
        )
    })
}

/// The gateway's public base URL.
pub fn base(g: &Gateway) -> String {
    format!("http://{}", g.addr)
}

/// Splits an `http://127.0.0.1:port/path?query` URL into address and target.
pub fn split_url(url: &str) -> (SocketAddr, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (authority, target) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    (authority.parse().expect("an IP:port authority"), target)
}

/// GET `url` (on loopback).
pub fn get_url(url: &str) -> Response {
    let (addr, target) = split_url(url);
    request(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

/// GET `url` (on loopback) with a `Cookie` header (as a browser sends what it was given).
pub fn get_url_with_cookie(url: &str, cookie: &str) -> Response {
    let (addr, target) = split_url(url);
    request(
        addr,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// The `name=value` a `Set-Cookie` header of `r` sets.
pub fn cookie_of(r: &Response) -> String {
    r.header("set-cookie")
        .expect("a Set-Cookie header")
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// POST `body` of `content_type` to `path` on the gateway.
pub fn post(g: &Gateway, path: &str, content_type: &str, body: &str) -> Response {
    request(
        g.addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// A PKCE verifier and its S256 challenge.
pub fn pkce() -> (String, String) {
    let verifier = B64.encode(rand_bytes());
    let challenge = B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    (verifier, challenge)
}

fn rand_bytes() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    b
}

/// Registers a client with `redirect_uris`; returns its `client_id`.
pub fn register(g: &Gateway, redirect_uris: &[&str]) -> String {
    let r = post(
        g,
        "/oauth/register",
        "application/json",
        &json!({"redirect_uris": redirect_uris, "client_name": "test client",
                "token_endpoint_auth_method": "none"})
        .to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["client_id"].as_str().unwrap().to_string()
}

/// The redirect URI test clients register.
pub const CLIENT_REDIRECT: &str = "http://127.0.0.1:1/callback";

/// The authorize URL for `client` with these parameters (each `(name, value)`).
pub fn authorize_url(g: &Gateway, params: &[(&str, &str)]) -> String {
    format!("{}/oauth/authorize?{}", base(g), form(params))
}

/// Standard authorization parameters for `client` with `challenge` and `state`.
pub fn authorize_params<'a>(
    client: &'a str,
    challenge: &'a str,
    state: &'a str,
    resource: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("response_type", "code"),
        ("client_id", client),
        ("redirect_uri", CLIENT_REDIRECT),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
        ("state", state),
        ("resource", resource),
    ]
}

/// The consent page's ticket.
pub fn ticket_of(page: &Response) -> String {
    let text = page.text();
    let at = text
        .find("name=\"ticket\" value=\"")
        .expect("a consent form")
        + 21;
    text[at..].split('"').next().unwrap().to_string()
}

/// The consent page's form, submitted as a browser on the gateway's page would.
pub fn decide(authorize: &str, ticket: &str, decision: &str, origin: Option<&str>) -> Response {
    let (addr, _) = split_url(authorize);
    let body = form(&[("ticket", ticket), ("decision", decision)]);
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    request(
        addr,
        &format!(
            "POST /oauth/authorize HTTP/1.1\r\nHost: {addr}\r\n{origin}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// Opens an authorize URL and allows on its consent page: the redirect to the IdP.
pub fn approve(authorize: &str) -> Response {
    let page = get_url(authorize);
    assert_eq!(page.status, 200, "consent page: {}", page.text());
    let (addr, _) = split_url(authorize);
    decide(
        authorize,
        &ticket_of(&page),
        "allow",
        Some(&format!("http://{addr}")),
    )
}

/// Follows the browser's way from an authorize URL: the consent page (allowed), the fake
/// GitHub, back to the gateway's callback, and to the client's redirect URI; returns that last
/// URL's query parameters.
pub fn sign_in(authorize: &str) -> HashMap<String, String> {
    let r = approve(authorize);
    assert_eq!(r.status, 302, "authorize: {}", r.text());
    let to_idp = r.header("location").unwrap().to_string();
    // The browser keeps the cookie the approval set and sends it back to the callback.
    let cookie = cookie_of(&r);
    let r = get_url(&to_idp);
    assert_eq!(r.status, 302, "fake GitHub authorize");
    let to_callback = r.header("location").unwrap().to_string();
    let r = get_url_with_cookie(&to_callback, &cookie);
    assert_eq!(r.status, 302, "callback: {}", r.text());
    let to_client = r.header("location").unwrap().to_string();
    assert!(
        to_client.starts_with(CLIENT_REDIRECT),
        "back at the client: {to_client}"
    );
    parse_query(to_client.split_once('?').map_or("", |(_, q)| q))
}

/// Redeems `code` at the token endpoint.
pub fn redeem(g: &Gateway, client: &str, code: &str, verifier: &str) -> Response {
    post(
        g,
        "/oauth/token",
        "application/x-www-form-urlencoded",
        &form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("client_id", client),
            ("code_verifier", verifier),
            ("redirect_uri", CLIENT_REDIRECT),
        ]),
    )
}

/// Refreshes with `refresh`.
pub fn refresh(g: &Gateway, client: &str, refresh: &str) -> Response {
    post(
        g,
        "/oauth/token",
        "application/x-www-form-urlencoded",
        &form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("client_id", client),
        ]),
    )
}

/// A whole sign-in for a new client: returns (client id, token response).
pub fn tokens_for(g: &Gateway, resource: &str, scope: Option<&str>) -> (String, Value) {
    let client = register(g, &[CLIENT_REDIRECT]);
    let (verifier, challenge) = pkce();
    let mut params = authorize_params(&client, &challenge, "st-1", resource);
    if let Some(s) = scope {
        params.push(("scope", s));
    }
    let back = sign_in(&authorize_url(g, &params));
    assert_eq!(back["state"], "st-1");
    let r = redeem(g, &client, &back["code"], &verifier);
    assert_eq!(r.status, 200, "{}", r.text());
    (client, r.json())
}

/// Initialize at `path` with `token`: the status.
pub fn initialize_with(g: &Gateway, path: &str, token: &str) -> Response {
    request(g.addr, &mcp_post_raw_at(path, INIT, None, &bearer(token)))
}
