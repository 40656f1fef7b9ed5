//! JWT authentication through the real binary: HS256 with a secret and ES256 from a JWKS served
//! on loopback (rotation, an unknown `kid`, a flood of them, the IdP down), scopes mapped to
//! tools, identities namespaced apart from API keys, and refusals audited with their reason.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use mcp_guard::cli::hash_key;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";
const WAIT: Duration = Duration::from_secs(10);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(v: &Value) -> String {
    B64.encode(v.to_string())
}

/// An HS256 token for `claims`.
fn hs256(claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(&json!({"alg":"HS256","typ":"JWT"})),
        b64(claims)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(tag.as_ref()))
}

/// An ES256 signing key with its JWK.
struct EcKey {
    pair: EcdsaKeyPair,
    kid: String,
}

impl EcKey {
    fn new(kid: &str) -> EcKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        EcKey {
            pair,
            kid: kid.into(),
        }
    }

    fn jwk(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        json!({"kty":"EC","crv":"P-256","kid":self.kid,"use":"sig","alg":"ES256",
               "x":B64.encode(&point[1..33]),"y":B64.encode(&point[33..65])})
    }

    fn sign(&self, claims: &Value, kid: &str) -> String {
        let header = json!({"alg":"ES256","typ":"JWT","kid":kid});
        let signing_input = format!("{}.{}", b64(&header), b64(claims));
        let rng = ring::rand::SystemRandom::new();
        let sig = self.pair.sign(&rng, signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }
}

fn claims(sub: &str, scope: &str) -> Value {
    json!({"sub":sub,"scope":scope,"iss":"https://idp.test","aud":"mcp-guard-test",
           "exp":now() + 300,"iat":now()})
}

/// A JWKS endpoint on loopback whose document the test swaps, counting its fetches; while
/// `down` it answers 500.
struct Idp {
    addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Idp {
    fn start(doc: Value) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(doc.to_string()));
        let hits = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, h, dn) = (doc.clone(), hits.clone(), down.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                h.fetch_add(1, Ordering::SeqCst);
                let reply = if dn.load(Ordering::SeqCst) {
                    "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                } else {
                    let body = d.lock().unwrap().clone();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = conn.write_all(reply.as_bytes());
            }
        });
        Idp {
            addr,
            doc,
            hits,
            down,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }
}

fn post_as(g: &Gateway, token: &str, body: &str, sid: Option<&str>) -> Response {
    request(g.addr, &mcp_post_raw(body, sid, &bearer(token)))
}

fn init_as(g: &Gateway, token: &str) -> Response {
    post_as(g, token, INIT, None)
}

fn simple_config(extra_auth: &str, audit: &std::path::Path) -> String {
    format!(
        "{}[auth.jwt]\nmode = \"simple\"\nsecret = \"{SECRET}\"\nissuer = \"https://idp.test\"\naudience = \"mcp-guard-test\"\n{extra_auth}\n[audit]\nenabled = true\nfile = {:?}\n",
        stdio_config("auto", "", &[]),
        audit.to_str().unwrap()
    )
}

#[test]
fn an_hs256_token_authenticates_and_every_bad_one_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let g = Gateway::start(&simple_config("", &audit));
    let good = hs256(&claims("alice", ""));
    let r = init_as(&g, &good);
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let r = post_as(&g, &good, &call(2, "echo", r#"{"text":"jwt"}"#), Some(&sid));
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "jwt");
    // Each refusal: 401, and the audit line says why (never the token).
    let mut expired = claims("alice", "");
    expired["exp"] = json!(now() - 3600);
    let mut wrong_aud = claims("alice", "");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_type = claims("alice", "");
    wrong_type["exp"] = json!((now() + 300).to_string());
    // alg none with some bytes where a signature goes (without any, it is not even a JWS).
    let none = format!(
        "{}.{}.{}",
        b64(&json!({"alg":"none"})),
        b64(&claims("alice", "")),
        B64.encode(b"sig")
    );
    let mut tampered = good.clone();
    tampered.insert(good.find('.').unwrap() + 2, 'x');
    let huge = format!("{}.{}.x", "a".repeat(10_000), "b".repeat(10));
    for (token, reason) in [
        (hs256(&expired), "jwt_expired"),
        (hs256(&wrong_aud), "jwt_wrong_audience"),
        (hs256(&wrong_type), "jwt_claim_type"),
        (none, "jwt_alg_not_allowed"),
        (tampered, "jwt_"),
        (huge, "jwt_too_large"),
    ] {
        let r = init_as(&g, &token);
        assert_eq!(r.status, 401, "{reason}: {}", r.text());
        assert!(r.header("www-authenticate").is_some());
        let deadline = Instant::now() + WAIT;
        loop {
            let log = std::fs::read_to_string(&audit).unwrap_or_default();
            if log.contains(&format!("\"reason\":\"{reason}")) {
                assert!(
                    !log.contains(&token[..40.min(token.len())]),
                    "token in the audit"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{reason} not audited:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        g.metric(
            "mcp_guard_auth_total",
            &[("method", "jwt"), ("result", "failure")]
        ) >= 6.0
    );
}

#[test]
fn a_token_and_an_api_key_for_the_same_name_are_different_callers() {
    let dir = tempfile::tempdir().unwrap();
    let key = "alice-api-key-0123456789";
    let g = Gateway::start(&simple_config(
        &format!(
            "[[auth.api_keys]]\nid = \"alice\"\nkey_hash = \"{}\"\n",
            hash_key(key)
        ),
        &dir.path().join("a.log"),
    ));
    let token = hs256(&claims("alice", ""));
    let r = init_as(&g, key);
    assert_eq!(r.status, 200, "{}", r.text());
    let key_sid = r.header("mcp-session-id").unwrap().to_string();
    let r = init_as(&g, &token);
    assert_eq!(r.status, 200, "{}", r.text());
    let token_sid = r.header("mcp-session-id").unwrap().to_string();
    let ping = r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#;
    assert_eq!(post_as(&g, &token, ping, Some(&key_sid)).status, 404);
    assert_eq!(post_as(&g, key, ping, Some(&token_sid)).status, 404);
    assert_eq!(post_as(&g, &token, ping, Some(&token_sid)).status, 200);
}

#[test]
fn scopes_grant_the_tools_the_mapping_names_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gateway::start(&simple_config(
        "[auth.jwt.scope_tool_mapping]\n\"tools:echo\" = [\"echo\"]\n\"admin\" = [\"*\"]\n",
        &dir.path().join("a.log"),
    ));
    let names = |token: &str| -> (Vec<String>, u16) {
        let r = init_as(&g, token);
        let sid = r.header("mcp-session-id").unwrap().to_string();
        let r = post_as(
            &g,
            token,
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
            Some(&sid),
        );
        let mut n: Vec<String> = rpc_result(&r)["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        let r = post_as(&g, token, &call(3, "add", r#"{"a":1,"b":2}"#), Some(&sid));
        let denied = rpc_result(&r).get("error").is_some();
        (n, if denied { 403 } else { 200 })
    };
    let (echo_only, add) = names(&hs256(&claims("bob", "tools:echo other")));
    assert_eq!(echo_only, ["echo"]);
    assert_eq!(add, 403);
    let (all, add) = names(&hs256(&claims("root", "admin")));
    assert!(all.len() > 1 && all.contains(&"add".to_string()), "{all:?}");
    assert_eq!(add, 200);
    let (none, add) = names(&hs256(&claims("nobody", "")));
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(add, 403);
}

fn jwks_config(idp: &Idp, every: u64) -> String {
    format!(
        "{}[auth.jwt]\nmode = \"jwks\"\njwks_url = \"{}\"\nalgorithms = [\"ES256\"]\nissuer = \"https://idp.test\"\naudience = \"mcp-guard-test\"\ncache_duration_secs = {every}\n",
        stdio_config("auto", "", &[]),
        idp.url()
    )
}

#[test]
fn jwks_keys_rotate_an_unknown_kid_refreshes_once_and_a_down_idp_keeps_the_keys() {
    let k1 = EcKey::new("k1");
    let k2 = EcKey::new("k2");
    let idp = Idp::start(json!({"keys":[k1.jwk()]}));
    let g = Gateway::start(&jwks_config(&idp, 3600));
    assert!(g.wait_log("JWKS loaded", WAIT), "keys never loaded");
    let t1 = k1.sign(&claims("carol", ""), "k1");
    assert_eq!(init_as(&g, &t1).status, 200);
    // Rotation: the IdP now also has k2; a token signed with it triggers one early refresh,
    // which the request awaits and then passes (once 10 s have gone by since the last fetch;
    // sooner, it would be refused at once).
    *idp.doc.lock().unwrap() = json!({"keys":[k1.jwk(), k2.jwk()]}).to_string();
    let t2 = k2.sign(&claims("carol", ""), "k2");
    std::thread::sleep(Duration::from_millis(10_500));
    let r = init_as(&g, &t2);
    assert_eq!(
        r.status,
        200,
        "the rotated key was not awaited: {}",
        r.text()
    );
    // A flood of unknown kids: the IdP sees at most one fetch per 10 s window.
    let before = idp.hits.load(Ordering::SeqCst);
    for i in 0..50 {
        let t = k2.sign(&claims("mallory", ""), &format!("random-{i}"));
        assert_eq!(init_as(&g, &t).status, 401);
    }
    std::thread::sleep(Duration::from_millis(500));
    let fetched = idp.hits.load(Ordering::SeqCst) - before;
    assert!(
        fetched <= 1,
        "{fetched} fetches for a flood of unknown kids"
    );
    // The IdP goes down: the keys held keep working.
    idp.down.store(true, Ordering::SeqCst);
    let t = k1.sign(&claims("dave", ""), "k1");
    assert_eq!(init_as(&g, &t).status, 200);
    // An HS256 token made with the public key as its secret is the confusion attack: refused.
    let public = k1.jwk().to_string();
    let signing_input = format!(
        "{}.{}",
        b64(&json!({"alg":"HS256","kid":"k1"})),
        b64(&claims("eve", ""))
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public.as_bytes());
    let forged = format!(
        "{signing_input}.{}",
        B64.encode(ring::hmac::sign(&key, signing_input.as_bytes()).as_ref())
    );
    assert_eq!(init_as(&g, &forged).status, 401);
}

#[test]
fn jwt_settings_that_cannot_be_safe_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("mode = \"simple\"\nsecret = \"short\"\n", "auth.jwt.secret"),
        (
            "mode = \"simple\"\nsecret = \"a-test-secret-that-is-long-enough-0123456789\"\nalgorithms = [\"RS256\"]\n",
            "auth.jwt.algorithms[0]",
        ),
        (
            "mode = \"jwks\"\njwks_url = \"https://idp.example.com/jwks\"\nalgorithms = [\"HS256\"]\n",
            "auth.jwt.algorithms[0]",
        ),
        (
            "mode = \"jwks\"\njwks_url = \"https://idp.example.com/jwks\"\nalgorithms = [\"none\"]\n",
            "auth.jwt.algorithms[0]",
        ),
        (
            "mode = \"jwks\"\njwks_url = \"http://idp.example.com/jwks\"\n",
            "auth.jwt.jwks_url",
        ),
        ("mode = \"jwks\"\n", "auth.jwt.jwks_url"),
    ];
    for (section, key) in cases {
        let p = dir.path().join("g.toml");
        std::fs::write(
            &p,
            format!("{}[auth.jwt]\n{section}", stdio_config("auto", "", &[])),
        )
        .unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{section}: {err}");
        assert!(err.contains(key), "{section}: {err}");
    }
}

#[test]
fn a_key_removed_at_the_idp_stops_its_cached_tokens_and_an_empty_set_is_honoured() {
    let k1 = EcKey::new("k1");
    let idp = Idp::start(json!({"keys":[k1.jwk()]}));
    let g = Gateway::start(&jwks_config(&idp, 3600));
    assert!(g.wait_log("JWKS loaded", WAIT), "keys never loaded");
    let t1 = k1.sign(&claims("carol", ""), "k1");
    assert_eq!(init_as(&g, &t1).status, 200);
    // The IdP revokes every key; a token naming an unknown kid makes the gateway look again
    // (at most once per 10 s), and the cached token stops working with the new set.
    *idp.doc.lock().unwrap() = json!({"keys":[]}).to_string();
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let probe = k1.sign(&claims("probe", ""), "unknown");
        init_as(&g, &probe);
        if init_as(&g, &t1).status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the revoked key still works");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn an_api_key_may_not_take_a_token_identity_and_missing_audience_is_warned() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.toml");
    let validate = |text: String| {
        std::fs::write(&p, text).unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = validate(format!(
        "{}[[auth.api_keys]]\nid = \"jwt:alice\"\nkey_hash = \"{}\"\n",
        stdio_config("auto", "", &[]),
        hash_key("some-key-0123456789")
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("auth.api_keys[0].id") && err.contains("reserved"),
        "{err}"
    );
    let (code, err) = validate(format!(
        "{}[auth.jwt]\nmode = \"simple\"\nsecret = \"{SECRET}\"\njwks_url = \"https://x/j\"\n",
        stdio_config("auto", "", &[])
    ));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("auth.jwt.audience is not set"), "{err}");
    assert!(err.contains("auth.jwt.issuer is not set"), "{err}");
    assert!(err.contains("auth.jwt.jwks_url has no effect"), "{err}");
}
