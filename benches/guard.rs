//! Criterion benches of the guard path: API-key check, authorization, rate-limit decision,
//! audit enqueue, tools/list filtering, and the whole guarded request (head parse + auth +
//! classify + authorize + rate limit + audit enqueue), steady state; and a cold JWT verify
//! (no cache) per algorithm family; and a TLS 1.3 handshake in memory (ECDSA P-256 server
//! certificate), without and with a client certificate (its names read as the gateway does).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use mcp_guard::audit::{AuditEvent, AuditOutput, AuditWriter};
use mcp_guard::auth::api_key::{ApiKeys, decode_hash};
use mcp_guard::auth::jwt::{self, Algorithm, KeySet, Rules};
use mcp_guard::auth::{Authenticator, RateKey};
use mcp_guard::authz::{Matcher, Policy, Rule};
use mcp_guard::cli::hash_key;
use mcp_guard::http::request::{HeadParse, parse_head};
use mcp_guard::mcp::filter::filter_json;
use mcp_guard::mcp::jsonrpc::{Body, Classifier, Target, is_spec_tool_name};
use mcp_guard::mcp::transform::Transform;
use mcp_guard::observe::metrics::Metrics;
use mcp_guard::ratelimit::{Limit, LocalLimiter, MemoryPool, bucket_key};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/hosts","limit":100}}}"#;

fn request_head(key: &str) -> Vec<u8> {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: c2Vzc2lvbg.AAAA\r\nMCP-Protocol-Version: 2025-11-25\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
        CALL.len()
    )
    .into_bytes()
}

fn policy() -> Arc<Policy> {
    Arc::new(Policy {
        tools: Rule {
            allow: Matcher::new(&["read_*", "search", "list_directory"]),
            deny: Matcher::new(&["delete_*", "read_secret*"]),
        },
        ..Policy::default()
    })
}

/// An authenticator with 1,000 keys (lookup cost must not depend on the count).
fn authenticator() -> Authenticator {
    let mut keys = ApiKeys::default();
    for i in 0..1000 {
        let k = format!("key-{i:04}-0123456789abcdef");
        keys.insert(
            &format!("id-{i}"),
            decode_hash(&hash_key(&k)).unwrap(),
            policy(),
        );
    }
    Authenticator {
        api_keys: Some(keys),
        ..Authenticator::default()
    }
}

fn event(identity: Arc<str>) -> AuditEvent {
    AuditEvent {
        time: SystemTime::now(),
        request_id: "0a1b2c3d-00-0000000001".into(),
        client_request_id: None,
        trace_id: None,
        identity: Some(identity),
        auth_method: "api_key",
        client: "127.0.0.1".parse().unwrap(),
        method: "tools/call".into(),
        target: Some(("tool", "read_file".into())),
        decision: "allow",
        reason: None,
        status: 200,
        upstream: "default".into(),
        latency_us: 120,
        arguments: None,
        details: Vec::new(),
        session: None,
    }
}

fn benches(c: &mut Criterion) {
    let auth = authenticator();
    let head_bytes = request_head("key-0500-0123456789abcdef");
    let HeadParse::Complete(head) = parse_head(&head_bytes, 16384, 1 << 22).unwrap() else {
        panic!("head")
    };
    let peer = "127.0.0.1".parse().unwrap();
    let tokens = mcp_guard::auth::TokenCache::default();
    c.bench_function("api_key_check_1000_keys", |b| {
        b.iter(|| {
            let slot = mcp_guard::auth::IdentitySlot::new();
            auth.authenticate(black_box(&head), peer, &slot, &tokens)
                .unwrap()
                .rate_key
                == mcp_guard::auth::RateKey::Identity("x")
        })
    });

    let p = policy();
    let target = mcp_guard::mcp::jsonrpc::Target::Tool("read_file".into());
    c.bench_function("authorize_tools_call", |b| {
        b.iter(|| p.decide(Some(black_box(&target))))
    });

    // Resource URIs are normalised before matching; a plain one must take the borrowed path.
    for (name, uri) in [
        (
            "normalize_resource_uri_plain",
            "file:///public/reports/2024/q3.csv",
        ),
        (
            "normalize_resource_uri_dotted",
            "file:///public/a/%2e%2E/reports/./q3.csv",
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| mcp_guard::authz::uri::normalize(black_box(uri)).is_ok())
        });
    }

    let pool = MemoryPool::default();
    let limiter = LocalLimiter::new(2);
    let key = bucket_key(&RateKey::Identity("id-500"), None);
    let limit = Limit {
        rate: 1e9,
        burst: 1_000_000_000,
    };
    c.bench_function("rate_limit_decision", |b| {
        b.iter(|| {
            limiter
                .check(&pool, black_box(key), limit, Instant::now())
                .unwrap()
        })
    });

    // Audit into a real writer thread (writing to /dev/null), as a worker does.
    let metrics = Metrics::new(1);
    let (writer, mut sinks) = AuditWriter::start(
        AuditOutput {
            file: Some("/dev/null".into()),
            stdout: false,
            export: None,
        },
        &[1 << 16],
        metrics,
    )
    .unwrap();
    let sink = sinks.pop().unwrap();
    let id: Arc<str> = Arc::from("id-500");
    c.bench_function("audit_enqueue", |b| b.iter(|| sink.push(event(id.clone()))));

    let tools: Vec<String> = (0..100)
        .map(|i| {
            let name = if i % 3 == 0 { format!("read_{i}") } else { format!("write_{i}") };
            format!(r#"{{"name":"{name}","description":"Tool number {i}","inputSchema":{{"type":"object","properties":{{"path":{{"type":"string"}}}}}}}}"#)
        })
        .collect();
    let list = format!(
        r#"{{"jsonrpc":"2.0","id":1,"result":{{"tools":[{}]}}}}"#,
        tools.join(",")
    );
    // "Above passthrough" is measured against relaying the same bytes (one copy) with no
    // filter at all.
    c.bench_function("tools_list_filter_passthrough_100_tools", |b| {
        b.iter(|| black_box(list.as_bytes()).to_vec())
    });
    c.bench_function("tools_list_filter_100_tools", |b| {
        b.iter(|| filter_json(black_box(list.as_bytes()), &p.tools).unwrap())
    });
    // The whole response-transform chain of a restricted caller, as the data plane runs it.
    c.bench_function("tools_list_filter_chain_100_tools", |b| {
        b.iter(|| {
            Transform::tools_only(p.clone())
                .json(black_box(list.as_bytes()))
                .unwrap()
        })
    });
    // The perf harness's `tools_list_100`: the mock upstream's tools (a description and an
    // input schema each, ~20 KiB in all), an allow list of two names and five `a*b` globs.
    let harness_list = harness_tools_list();
    let harness_policy = Arc::new(Policy {
        tools: Rule {
            allow: Matcher::new(&[
                "echo", "echo_sse", "tool_0*0", "tool_0*2", "tool_0*4", "tool_0*6", "tool_0*8",
            ]),
            deny: Matcher::default(),
        },
        ..Policy::default()
    });
    c.bench_function("tools_list_filter_passthrough_harness_100_tools", |b| {
        b.iter(|| black_box(harness_list.as_bytes()).to_vec())
    });
    // The same list each time, under a new JSON-RPC id, as an upstream answers every caller:
    // the scan recognizes the list and reads it once.
    let mut id = 0u64;
    c.bench_function("tools_list_filter_chain_harness_100_tools", |b| {
        b.iter_batched(
            || {
                id += 1;
                harness_list.replacen(r#""id":2"#, &format!(r#""id":{id}"#), 1)
            },
            |answer| {
                Transform::tools_only(harness_policy.clone())
                    .json(black_box(answer.as_bytes()))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    // Lists this thread has not scanned lately: twelve variants in turn, more than the scan
    // keeps, so each is scanned whole. Each differs from the others in one character of one
    // tool's description halfway through (the same length, the same first and last bytes):
    // the worst case for recognizing a list, compared with each kept list up to there.
    let variants: Vec<String> = (0..12)
        .map(|v| harness_list.replacen("number 50,", &format!("number 50 ({v:02}),"), 1))
        .collect();
    let mut turn = 0;
    c.bench_function(
        "tools_list_filter_chain_harness_100_tools_never_seen",
        |b| {
            b.iter(|| {
                turn = (turn + 1) % variants.len();
                Transform::tools_only(harness_policy.clone())
                    .json(black_box(variants[turn].as_bytes()))
                    .unwrap()
            })
        },
    );
    // Every answer to a restricted caller goes through the chain: a 4 KiB `tools/call` result
    // (file contents with escaped newlines and quotes) that holds no tool list.
    let call_result = call_result_4k();
    c.bench_function("tools_list_filter_passthrough_call_result_4k", |b| {
        b.iter(|| black_box(call_result.as_bytes()).to_vec())
    });
    c.bench_function("tools_list_filter_chain_call_result_4k", |b| {
        b.iter(|| {
            Transform::tools_only(p.clone())
                .json(black_box(call_result.as_bytes()))
                .unwrap()
        })
    });

    let mut classifier = Classifier::new();
    c.bench_function("guard_path_whole", |b| {
        b.iter(|| {
            let HeadParse::Complete(head) =
                parse_head(black_box(&head_bytes), 16384, 1 << 22).unwrap()
            else {
                unreachable!()
            };
            let slot = mcp_guard::auth::IdentitySlot::new();
            let caller = auth.authenticate(&head, peer, &slot, &tokens).unwrap();
            let body = classifier.classify(black_box(CALL)).unwrap();
            let Body::Single(m) = &body else {
                unreachable!()
            };
            if let Some(Target::Tool(t)) = &m.target {
                assert!(is_spec_tool_name(t));
            }
            let decision = caller.identity.policy.decide(m.target.as_ref());
            let key = bucket_key(&caller.rate_key, None);
            limiter.check(&pool, key, limit, Instant::now()).unwrap();
            sink.push(event(caller.identity.id.clone()));
            decision
        })
    });
    writer.stop();
}

/// A `tools/call` answer of about 4 KiB: a text file's contents, as servers send them.
/// The answer `perf upstream --tools 100` gives to tools/list, byte for byte in shape.
fn harness_tools_list() -> String {
    let schema = r#"{"type":"object","properties":{"text":{"type":"string"}},"required":["text"]}"#;
    let mut tools = vec![
        format!(
            r#"{{"name":"echo","description":"Echoes its text argument as JSON.","inputSchema":{schema}}}"#
        ),
        format!(
            r#"{{"name":"echo_sse","description":"Echoes its text argument as one SSE event.","inputSchema":{schema}}}"#
        ),
    ];
    for n in 2..100 {
        tools.push(format!(
            r#"{{"name":"tool_{n:03}","description":"Synthetic tool number {n}, listed to give tools/list a realistic size.","inputSchema":{schema}}}"#
        ));
    }
    format!(
        r#"{{"jsonrpc":"2.0","id":2,"result":{{"tools":[{}]}}}}"#,
        tools.join(",")
    )
}

fn call_result_4k() -> String {
    let mut text = String::new();
    let mut line = 0;
    while text.len() < 3900 {
        text.push_str(&format!(
            "{line:04}: let value = config.get(\\\"key_{line}\\\").unwrap_or_default();\\n"
        ));
        line += 1;
    }
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":42,"result":{{"content":[{{"type":"text","text":"{text}"}}],"isError":false}}}}"#
    );
    assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
    body
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact token with typical access-token claims, signed by `sign`.
fn jwt_token(alg: Algorithm, kid: &str, now: u64, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let header = format!(r#"{{"alg":"{alg}","typ":"at+jwt","kid":"{kid}"}}"#);
    let claims = format!(
        r#"{{"iss":"https://idp.example","aud":"mcp-guard","sub":"user-1234","exp":{},"iat":{now},"nbf":{now},"jti":"0f8c2b","scope":"tools:read tools:call resources:read"}}"#,
        now + 3600
    );
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

/// Cold verification (every check, no verified-token cache): HS256, RS256 with a 2048-bit key,
/// ES256 and EdDSA, each against the key set its deployment would have (a secret, or a JWKS).
fn jwt(c: &mut Criterion) {
    use rsa::pkcs8::EncodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let rng = SystemRandom::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rules = Rules {
        algorithms: vec![
            Algorithm::HS256,
            Algorithm::RS256,
            Algorithm::ES256,
            Algorithm::EdDSA,
        ],
        issuer: Some("https://idp.example".into()),
        audience: Some("mcp-guard".into()),
        ..Rules::default()
    };

    let secret = [7u8; 32];
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let hs = jwt_token(Algorithm::HS256, "hs", now, |m| {
        ring::hmac::sign(&hmac, m).as_ref().to_vec()
    });

    // ring cannot generate RSA keys: the rsa dev-dependency does, ring signs.
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let rsa_pair = RsaKeyPair::from_pkcs8(private.to_pkcs8_der().unwrap().as_bytes()).unwrap();
    let rs = jwt_token(Algorithm::RS256, "rsa", now, |m| {
        let mut sig = vec![0; rsa_pair.public().modulus_len()];
        rsa_pair
            .sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
            .unwrap();
        sig
    });

    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let ec_pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let es = jwt_token(Algorithm::ES256, "ec", now, |m| {
        ec_pair.sign(&rng, m).unwrap().as_ref().to_vec()
    });

    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let ed_pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let ed = jwt_token(Algorithm::EdDSA, "ed", now, |m| {
        ed_pair.sign(m).as_ref().to_vec()
    });

    let point = ec_pair.public_key().as_ref();
    let jwks = format!(
        r#"{{"keys":[{{"kty":"RSA","kid":"rsa","use":"sig","n":"{}","e":"{}"}},{{"kty":"EC","crv":"P-256","kid":"ec","x":"{}","y":"{}"}},{{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"{}"}}]}}"#,
        b64(&private.n().to_bytes_be()),
        b64(&private.e().to_bytes_be()),
        b64(&point[1..33]),
        b64(&point[33..]),
        b64(ed_pair.public_key().as_ref()),
    );
    let public = KeySet::from_jwks(jwks.as_bytes()).unwrap();
    let shared = jwt::hmac_key(&secret).unwrap();

    for (name, token, keys) in [
        ("jwt_verify_hs256", &hs, &shared),
        ("jwt_verify_rs256_2048", &rs, &public),
        ("jwt_verify_es256", &es, &public),
        ("jwt_verify_eddsa", &ed, &public),
    ] {
        assert!(jwt::verify(token, keys, &rules, now).is_ok(), "{name}");
        c.bench_function(name, |b| {
            b.iter(|| jwt::verify(black_box(token), keys, &rules, now).unwrap())
        });
    }

    // The request path's cost for a token already verified on this worker: the chain finds
    // it in the worker's cache (whatever the algorithm: none is checked again).
    let auth = Authenticator {
        jwt: Some(mcp_guard::auth::JwtProvider {
            rules: rules.clone(),
            keys: mcp_guard::auth::JwtKeys::Secret(jwt::hmac_key(&secret).unwrap()),
            scope_tools: None,
            routes: Vec::new(),
            generation: 1,
        }),
        ..Authenticator::default()
    };
    let real_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let live = jwt_token(Algorithm::HS256, "hs", real_now, |m| {
        ring::hmac::sign(&hmac, m).as_ref().to_vec()
    });
    let head_bytes = request_head(&live);
    let HeadParse::Complete(head) = parse_head(&head_bytes, 16384, 1 << 22).unwrap() else {
        panic!("head")
    };
    let tokens = mcp_guard::auth::TokenCache::default();
    let peer = "127.0.0.1".parse().unwrap();
    {
        let slot = mcp_guard::auth::IdentitySlot::new();
        auth.authenticate(&head, peer, &slot, &tokens).unwrap();
    }
    c.bench_function("jwt_authenticate_cached", |b| {
        b.iter(|| {
            let slot = mcp_guard::auth::IdentitySlot::new();
            auth.authenticate(black_box(&head), peer, &slot, &tokens)
                .unwrap()
                .expires_at
        })
    });

    // The same for an OAuth access token (a JWT of the authorization server, its audience
    // this endpoint) already verified on this worker.
    let oauth = Authenticator {
        oauth_tokens: Some(mcp_guard::auth::oauth::OauthProvider {
            validation: mcp_guard::auth::oauth::Validation::Jwt {
                rules: Rules {
                    audience: None,
                    ..rules.clone()
                },
                keys: mcp_guard::auth::jwks::Jwks::with_keys(
                    mcp_guard::auth::fetch::IdpUrl::parse("https://idp.example/jwks").unwrap(),
                    jwt::hmac_key(&secret).unwrap(),
                ),
            },
            issuer: Some("https://idp.example".into()),
            resources: vec![(Arc::from("default"), "mcp-guard".to_string())],
            user_id_claim: "sub".into(),
            scope_tools: None,
            routes: vec![Arc::from("default")],
            public_url: "https://mcp.example".into(),
            generation: 2,
        }),
        ..Authenticator::default()
    };
    let oauth_tokens = mcp_guard::auth::TokenCache::default();
    {
        let slot = mcp_guard::auth::IdentitySlot::new();
        let caller = oauth
            .authenticate(&head, peer, &slot, &oauth_tokens)
            .unwrap();
        assert_eq!(&*caller.identity.id, "oauth:user-1234");
    }
    c.bench_function("oauth_authenticate_cached", |b| {
        b.iter(|| {
            let slot = mcp_guard::auth::IdentitySlot::new();
            oauth
                .authenticate(black_box(&head), peer, &slot, &oauth_tokens)
                .unwrap()
                .expires_at
        })
    });
}

/// A CA-signed ECDSA P-256 certificate and key (PEM), for `names`.
fn signed(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    names: &[&str],
    cn: &str,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    (
        p.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

/// Runs a client and a server connection against each other in memory until both are done.
fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
    let mut wire = Vec::with_capacity(8192);
    while client.is_handshaking()
        || server.is_handshaking()
        || client.wants_write()
        || server.wants_write()
    {
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
        }
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
    }
}

fn tls(c: &mut Criterion) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (server_cert, server_key) = signed(&issuer, &["localhost"], "localhost");
    let (client_cert, client_key) = signed(&issuer, &["client.example.com"], "client");
    let section = |client_ca: bool| mcp_guard::config::schema::TlsSection {
        cert_path: write("server.crt", &server_cert),
        key_path: write("server.key", &server_key),
        client_ca_path: client_ca.then(|| write("ca.crt", &ca_pem)),
        client_auth: Default::default(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let client_builder = || {
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
    };
    let anonymous = Arc::new(client_builder().with_no_client_auth());
    let with_cert = Arc::new(
        client_builder()
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(client_cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(client_key.as_bytes()).unwrap(),
            )
            .unwrap(),
    );
    let name = ServerName::try_from("localhost").unwrap();
    for (label, server, client) in [
        ("tls/handshake_tls13_p256", section(false), &anonymous),
        (
            "tls/handshake_tls13_p256_client_cert",
            section(true),
            &with_cert,
        ),
    ] {
        let config = mcp_guard::tls::build(&server).unwrap().config;
        c.bench_function(label, |b| {
            b.iter(|| {
                let mut s = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut cl = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
                handshake(&mut cl, &mut s);
                let names = s
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|der| mcp_guard::tls::CertNames::from_der(der));
                black_box(names)
            })
        });
    }
}

criterion_group!(guard, benches, jwt, tls);
criterion_main!(guard);
