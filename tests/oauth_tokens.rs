//! OAuth access tokens of an external authorization server, through the real binary, against
//! a test authorization server on loopback (metadata, JWKS, RFC 7662 introspection, each
//! counted): audience = this endpoint, every refusal audited with its reason, a rotated key
//! awaited by the request that met it, a kid flood held to the refresh rate, introspection
//! cached and its failures refused, the insufficient_scope challenge, and an upstream's own
//! 401 turned into a 502.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::oauth_as::{As, EcKey, Mode, now};
use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);
/// `server.public_url` of every gateway here: the resource its tokens must be minted for.
const PUBLIC: &str = "http://127.0.0.1:3000";
const RESOURCE: &str = "http://127.0.0.1:3000/mcp";
const CLIENT_ID: &str = "mcp-guard-test";
const CLIENT_SECRET: &str = "s3cret:with&odd=chars";

fn claims(issuer: &str, sub: &str, aud: Value) -> Value {
    json!({"iss": issuer, "sub": sub, "aud": aud, "scope": "tools:echo",
           "exp": now() + 300, "iat": now(), "client_id": "some-client"})
}

fn oauth_config(idp: &As, extra_oauth: &str, audit: &std::path::Path) -> String {
    format!(
        "{}[auth.oauth]\nprovider = \"custom\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nauthorization_servers = [\"{}\"]\n{extra_oauth}\n[audit]\nenabled = true\nfile = {:?}\n",
        stdio_config(
            "auto",
            &format!("public_url = \"{PUBLIC}\""),
            &["--test-tools"]
        ),
        idp.issuer(),
        audit.to_str().unwrap()
    )
}

fn post_as(g: &Gateway, token: &str, body: &str, sid: Option<&str>) -> Response {
    request(g.addr, &mcp_post_raw(body, sid, &bearer(token)))
}

fn init_as(g: &Gateway, token: &str) -> Response {
    post_as(g, token, INIT, None)
}

fn audit_holds(audit: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(audit)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(Instant::now() < deadline, "{needle} not in the audit trail");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the audit trail holds `reason` (and never the token).
fn audited(audit: &std::path::Path, reason: &str, token: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(audit).unwrap_or_default();
        if log.contains(&format!("\"reason\":\"{reason}\"")) {
            assert!(!log.contains(token), "token in the audit trail");
            return;
        }
        assert!(Instant::now() < deadline, "{reason} not audited:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn jwt_access_tokens_must_name_this_endpoint_as_audience_and_each_refusal_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let key = EcKey::new("k1");
    let idp = As::start(json!({"keys": [key.jwk()]}));
    let g = Gateway::start(&oauth_config(&idp, "", &audit));
    let iss = idp.issuer();
    // The keys' URL came from the authorization server's metadata.
    assert!(
        g.wait_log("publishes its keys at", WAIT),
        "no metadata discovery"
    );
    let good = key.sign(&claims(&iss, "alice", json!(RESOURCE)), "k1");
    let r = init_as(&g, &good);
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    // The caller is `oauth:alice`, and the token never reaches the upstream.
    let r = post_as(
        &g,
        &good,
        &call(2, "last_request_headers", "{}"),
        Some(&sid),
    );
    let seen = rpc_result(&r)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(!seen.contains("authorization"), "{seen}");
    assert!(!seen.contains(&good[..30].to_ascii_lowercase()), "{seen}");
    audit_holds(&audit, "\"oauth:alice\"");
    // An array audience holding this endpoint is fine; a trailing slash too.
    let t = key.sign(
        &claims(
            &iss,
            "bob",
            json!(["https://other.example/mcp", format!("{RESOURCE}/")]),
        ),
        "k1",
    );
    assert_eq!(init_as(&g, &t).status, 200);

    let mut expired = claims(&iss, "alice", json!(RESOURCE));
    expired["exp"] = json!(now() - 3600);
    let mut no_aud = claims(&iss, "alice", json!(RESOURCE));
    no_aud.as_object_mut().unwrap().remove("aud");
    let hs256 = {
        let input = format!(
            "{}.{}",
            B64.encode(json!({"alg":"HS256","kid":"k1"}).to_string()),
            B64.encode(claims(&iss, "eve", json!(RESOURCE)).to_string())
        );
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.jwk().to_string().as_bytes());
        format!(
            "{input}.{}",
            B64.encode(ring::hmac::sign(&k, input.as_bytes()).as_ref())
        )
    };
    for (token, reason) in [
        (key.sign(&expired, "k1"), "oauth_expired"),
        (
            // Minted for another resource: refused, whatever else is right about it.
            key.sign(
                &claims(&iss, "alice", json!("https://other.example/mcp")),
                "k1",
            ),
            "oauth_wrong_audience",
        ),
        (key.sign(&no_aud, "k1"), "oauth_wrong_audience"),
        (
            key.sign(
                &claims(&iss, "alice", json!("http://127.0.0.1:3000/mcp/other")),
                "k1",
            ),
            "oauth_wrong_audience",
        ),
        (
            key.sign(
                &claims("https://evil.example", "alice", json!(RESOURCE)),
                "k1",
            ),
            "oauth_wrong_issuer",
        ),
        (hs256, "oauth_key_refused"),
    ] {
        let r = init_as(&g, &token);
        assert_eq!(r.status, 401, "{reason}: {}", r.text());
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        audited(&audit, reason, &token);
    }
    assert!(
        g.metric(
            "mcp_guard_auth_total",
            &[("method", "oauth"), ("result", "failure")]
        ) >= 6.0
    );
    assert!(
        g.metric(
            "mcp_guard_auth_total",
            &[("method", "oauth"), ("result", "success")]
        ) >= 2.0
    );
}

#[test]
fn a_rotated_key_is_awaited_by_the_requests_that_meet_it_and_a_kid_flood_costs_no_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (EcKey::new("k1"), EcKey::new("k2"));
    let idp = As::start(json!({"keys": [k1.jwk()]}));
    let g = Gateway::start(&oauth_config(&idp, "", &dir.path().join("a.log")));
    let iss = idp.issuer();
    assert!(g.wait_log("JWKS loaded", WAIT), "keys never loaded");
    assert_eq!(
        init_as(&g, &k1.sign(&claims(&iss, "carol", json!(RESOURCE)), "k1")).status,
        200
    );
    // Early refreshes are at most one per 10 s, the start's fetch included.
    std::thread::sleep(Duration::from_millis(10_500));
    *idp.jwks.lock().unwrap() = json!({"keys": [k1.jwk(), k2.jwk()]}).to_string();
    let before = idp.hits("/jwks.json");
    // Several requests meet the new kid at once: each waits for the one fetch, then succeeds.
    let token = k2.sign(&claims(&iss, "carol", json!(RESOURCE)), "k2");
    let addr = g.addr;
    let waiters: Vec<_> = (0..6)
        .map(|_| {
            let token = token.clone();
            std::thread::spawn(move || request(addr, &mcp_post_raw(INIT, None, &bearer(&token))))
        })
        .collect();
    for w in waiters {
        let r = w.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        idp.hits("/jwks.json") - before,
        1,
        "one fetch for all of them"
    );
    // A flood of random kids right after: refused at once, and the IdP sees nothing of it.
    let before = idp.hits("/jwks.json");
    let flood: Vec<_> = (0..40)
        .map(|i| {
            let t = k2.sign(
                &claims(&iss, "mallory", json!(RESOURCE)),
                &format!("random-{i}"),
            );
            std::thread::spawn(move || request(addr, &mcp_post_raw(INIT, None, &bearer(&t))))
        })
        .collect();
    for f in flood {
        assert_eq!(f.join().unwrap().status, 401);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        idp.hits("/jwks.json") - before,
        0,
        "the flood reached the IdP"
    );
}

fn introspection_config(idp: &As, extra: &str, audit: &std::path::Path) -> String {
    oauth_config(
        idp,
        &format!(
            "introspection_url = \"{}/introspect\"\n{extra}",
            idp.issuer()
        ),
        audit,
    )
}

fn active(sub: &str, aud: &str, scope: &str) -> Value {
    json!({"active": true, "sub": sub, "aud": aud, "scope": scope, "exp": now() + 300,
           "token_type": "Bearer"})
}

#[test]
fn introspection_accepts_active_tokens_for_this_resource_caches_them_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let idp = As::start(json!({"keys": []}));
    idp.grant("opaque-good-token", active("dana", RESOURCE, "tools:echo"));
    idp.grant(
        "opaque-other-resource",
        active("dana", "https://other.example/mcp", ""),
    );
    let mut expired = active("dana", RESOURCE, "");
    expired["exp"] = json!(now() - 10);
    idp.grant("opaque-expired", expired);
    idp.grant(
        "opaque-no-user",
        json!({"active": true, "aud": RESOURCE, "exp": now() + 300}),
    );
    let g = Gateway::start(&introspection_config(&idp, "", &audit));
    let r = init_as(&g, "opaque-good-token");
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    // RFC 7662 §2.1: the gateway authenticated as its client.
    let basic = idp.last_auth.lock().unwrap().clone();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        "mcp-guard-test:s3cret%3Awith%26odd%3Dchars"
    );
    // Cached until its exp: at most one call per worker (the caches are per worker).
    for _ in 0..6 {
        let r = post_as(
            &g,
            "opaque-good-token",
            &call(2, "echo", r#"{"text":"hi"}"#),
            Some(&sid),
        );
        assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "hi");
    }
    assert!(idp.hits("opaque-good-token") <= 2);

    for (token, reason) in [
        ("opaque-unknown", "oauth_inactive"),
        ("opaque-other-resource", "oauth_wrong_audience"),
        ("opaque-expired", "oauth_expired"),
        ("opaque-no-user", "oauth_missing_user"),
    ] {
        let r = init_as(&g, token);
        assert_eq!(r.status, 401, "{reason}: {}", r.text());
        assert!(r.header("www-authenticate").is_some());
        audited(&audit, reason, token);
    }
    // A refusal is remembered briefly: a client retrying a dead token costs no call (beyond
    // one per worker).
    for _ in 0..6 {
        assert_eq!(init_as(&g, "opaque-unknown").status, 401);
    }
    assert!(idp.hits("opaque-unknown") <= 2);

    // The endpoint down, or answering nonsense: 503 (the token is not known bad), nothing
    // remembered, and the next request asks again.
    *idp.mode.lock().unwrap() = Mode::Down;
    let r = init_as(&g, "opaque-new-1");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    audited(&audit, "oauth_introspection_unavailable", "opaque-new-1");
    *idp.mode.lock().unwrap() = Mode::BadJson;
    let r = init_as(&g, "opaque-new-2");
    assert_eq!(r.status, 503, "{}", r.text());
    audited(&audit, "oauth_introspection_bad_answer", "opaque-new-2");
    *idp.mode.lock().unwrap() = Mode::Normal;
    idp.grant("opaque-new-2", active("erin", RESOURCE, ""));
    assert_eq!(init_as(&g, "opaque-new-2").status, 200);
}

#[test]
fn a_token_lacking_a_tools_scope_gets_the_step_up_challenge_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let idp = As::start(json!({"keys": []}));
    idp.grant("opaque-echo-only", active("fay", RESOURCE, "tools:echo"));
    let g = Gateway::start(&introspection_config(
        &idp,
        "[auth.oauth.scope_tool_mapping]\n\"tools:echo\" = [\"echo\"]\n\"tools:math\" = [\"add\"]\n\"admin\" = [\"*\"]\n",
        &dir.path().join("a.log"),
    ));
    let token = "opaque-echo-only";
    let r = init_as(&g, token);
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let r = post_as(
        &g,
        token,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        Some(&sid),
    );
    let list = rpc_result(&r);
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo"]);
    let r = post_as(&g, token, &call(3, "add", r#"{"a":1,"b":2}"#), Some(&sid));
    assert_eq!(r.status, 403, "{}", r.text());
    let challenge = r.header("www-authenticate").unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    // Either scope would do: `admin` grants every tool.
    assert!(
        challenge.contains("scope=\"admin tools:math\""),
        "{challenge}"
    );
    assert!(
        challenge.contains(&format!(
            "resource_metadata=\"{PUBLIC}/.well-known/oauth-protected-resource/mcp\""
        )),
        "{challenge}"
    );
    let body = r.json();
    assert_eq!(body["id"], 3);
    assert_eq!(body["error"]["data"]["scope"], "admin tools:math");
}

#[test]
fn an_upstream_401_becomes_a_502_naming_it_and_its_challenge_never_reaches_the_client() {
    let up = DemoHttp::start(&["--unauthorized"]);
    let g = Gateway::start(&http_config("auto", &up.url(), "", ""));
    let r = request(g.addr, &mcp_post_raw(INIT, None, ""));
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.header("www-authenticate").is_none(), "{:?}", r.headers);
    let body = r.json();
    assert_eq!(body["error"]["data"]["server"], "default");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'default'"),
        "{body}"
    );
    assert!(!r.text().contains("demo-upstream") && !r.text().contains("mcp-demo-server"));
}

#[test]
fn oauth_settings_that_cannot_be_safe_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.toml");
    let base = |server: &str, oauth: &str| {
        format!(
            "{}[auth.oauth]\nprovider = \"custom\"\nclient_id = \"c\"\n{oauth}",
            stdio_config("auto", server, &[])
        )
    };
    let public = format!("public_url = \"{PUBLIC}\"");
    let cases = [
        (
            base("", "authorization_servers = [\"https://as.example\"]\n"),
            "server.public_url",
        ),
        (
            base(
                "public_url = \"http://mcp.example.com\"",
                "authorization_servers = [\"https://as.example\"]\n",
            ),
            "server.public_url",
        ),
        (
            base(
                "public_url = \"https://mcp.example.com/?a=1\"",
                "authorization_servers = [\"https://as.example\"]\n",
            ),
            "server.public_url",
        ),
        // custom without an authorization server: mcp-guard is one, in front of the IdP's URLs.
        (base(&public, ""), "auth.oauth.authorization_url"),
        (
            base(
                &format!("{public}\nmcp_path = \"/m\\\"cp\""),
                "authorization_servers = [\"https://as.example\"]\n",
            ),
            "server.mcp_path",
        ),
        (
            base(
                &public,
                "authorization_servers = [\"http://as.example.com\"]\n",
            ),
            "auth.oauth.authorization_servers[0]",
        ),
        (
            base(
                &public,
                "authorization_servers = [\"https://as.example\"]\nintrospection_url = \"https://as.example/introspect\"\n",
            ),
            "auth.oauth.client_secret",
        ),
        (
            base(
                &public,
                "authorization_servers = [\"https://as.example\"]\nclient_secret = \"x\"\nintrospection_url = \"http://as.example/introspect\"\n",
            ),
            "auth.oauth.introspection_url",
        ),
        (
            base(
                &public,
                "authorization_servers = [\"https://as.example\"]\n[auth.oauth.scope_tool_mapping]\n\"a\\\"b\" = [\"echo\"]\n",
            ),
            "auth.oauth.scope_tool_mapping",
        ),
    ];
    for (text, key) in cases {
        std::fs::write(&p, &text).unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn a_reload_that_leaves_oauth_alone_keeps_the_verified_tokens_and_one_that_changes_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("a.log");
    let idp = As::start(json!({"keys": []}));
    idp.grant("opaque-kept", active("gus", RESOURCE, "tools:echo"));
    // One worker, so "asked once" is exact.
    let config = |rate: u32, mapping: &str| {
        introspection_config(&idp, mapping, &audit).replacen("workers = 2", "workers = 1", 1)
            + &format!("[rate_limit]\nenabled = true\nrequests_per_second = {rate}\n")
    };
    let g = Gateway::start(&config(100, ""));
    let reloads = |n: f64| {
        let deadline = Instant::now() + WAIT;
        while g.metric("mcp_guard_config_reloads_total", &[]) < n {
            assert!(Instant::now() < deadline, "reload {n} never applied");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(init_as(&g, "opaque-kept").status, 200);
    assert_eq!(idp.hits("opaque-kept"), 1);
    // A change elsewhere: the cached answer stands.
    g.rewrite_config(&config(200, ""));
    reloads(1.0);
    assert_eq!(init_as(&g, "opaque-kept").status, 200);
    assert_eq!(
        idp.hits("opaque-kept"),
        1,
        "asked again after an unrelated reload"
    );
    // The scope mapping changed: the token is checked again under the new rules.
    g.rewrite_config(&config(
        200,
        "[auth.oauth.scope_tool_mapping]\n\"tools:echo\" = [\"echo\"]\n",
    ));
    reloads(2.0);
    assert_eq!(init_as(&g, "opaque-kept").status, 200);
    assert_eq!(idp.hits("opaque-kept"), 2);
}

#[test]
fn an_sse_upstream_refusing_the_gateways_credentials_fails_the_request_without_its_challenge() {
    // Its stream opens (the first request), then every message is refused 401.
    let up = DemoHttp::start(&[
        "--legacy-sse",
        "--unauthorized",
        "--unauthorized-after",
        "1",
    ]);
    let g = Gateway::start(&format!(
        "[server]\nport = 0\nworkers = 1\n[admin]\nport = 0\n[upstream]\ntransport = \"sse\"\nurl = \"http://{}/sse\"\ntimeout_secs = 3\n",
        up.addr
    ));
    let r = request(g.addr, &mcp_post_raw(INIT, None, ""));
    assert!(r.status == 502, "{}: {}", r.status, r.text());
    assert!(r.header("www-authenticate").is_none(), "{:?}", r.headers);
    assert!(!r.text().contains("demo-upstream"), "{}", r.text());
    // The operator learns why.
    assert!(
        g.wait_log("refused the gateway's credentials (HTTP 401)", WAIT),
        "the 401 was not logged"
    );
}

#[test]
fn a_request_waiting_for_introspection_holds_up_no_other_request_on_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    let idp = As::start(json!({"keys": []}));
    idp.grant("opaque-fast", active("hal", RESOURCE, ""));
    idp.grant("opaque-slow", active("ivy", RESOURCE, ""));
    // One worker: both requests are its.
    let g = Gateway::start(
        &introspection_config(&idp, "", &dir.path().join("a.log")).replacen(
            "workers = 2",
            "workers = 1",
            1,
        ),
    );
    assert_eq!(init_as(&g, "opaque-fast").status, 200);
    idp.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let addr = g.addr;
    let slow = std::thread::spawn(move || {
        request(addr, &mcp_post_raw(INIT, None, &bearer("opaque-slow")))
    });
    let deadline = Instant::now() + WAIT;
    while idp.hits("opaque-slow") == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow token was never introspected"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The worker is awaiting the answer, not blocked on it: another caller is served.
    assert_eq!(init_as(&g, "opaque-fast").status, 200);
    assert!(!slow.is_finished(), "the held answer was not awaited");
    idp.hold.store(false, std::sync::atomic::Ordering::SeqCst);
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}
