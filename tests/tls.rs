//! Native TLS and mTLS: real certificates made here (a CA, a server certificate, client
//! certificates, and ones that must fail), clients on rustls and curl, both io drivers; the
//! identity each certificate field gives; `X-Client-Cert-*` headers believed only from trusted
//! proxies and never forwarded; a handshake that stalls is cut off without stalling the worker.

mod common;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// A certificate and its key, as PEM files.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA that signs the server's and clients' certificates, and its files.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// What a client certificate carries.
#[derive(Default)]
struct Names<'a> {
    cn: Option<&'a str>,
    dns: Option<&'a str>,
    email: Option<&'a str>,
    uri: Option<&'a str>,
    expired: bool,
    /// The validity window in Unix seconds, instead of the default one.
    window: Option<(u64, u64)>,
    /// Filler DNS names, each about 200 bytes, to make the certificate large.
    filler_names: usize,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = Self::ca("mcp-guard test CA");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        Pki { dir, ca, issuer }
    }

    fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(p, key))
    }

    fn write(&self, name: &str, cert: &rcgen::Certificate, key: &KeyPair) -> Pem {
        let pem = Pem {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&pem.cert, cert.pem()).unwrap();
        std::fs::write(&pem.key, key.serialize_pem()).unwrap();
        pem
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    fn server(&self, name: &str) -> Pem {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        self.write(name, &cert, &key)
    }

    /// A client certificate signed by `issuer` (this CA unless given).
    fn client_by(&self, file: &str, n: &Names, issuer: &Issuer<'static, KeyPair>) -> Pem {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        if let Some(cn) = n.cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        if let Some(d) = n.dns {
            p.subject_alt_names
                .push(SanType::DnsName(d.try_into().unwrap()));
        }
        if let Some(e) = n.email {
            p.subject_alt_names
                .push(SanType::Rfc822Name(e.try_into().unwrap()));
        }
        if let Some(u) = n.uri {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().unwrap()));
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if n.expired {
            p.not_before = rcgen::date_time_ymd(2001, 1, 1);
            p.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        if let Some((from, until)) = n.window {
            let epoch = rcgen::date_time_ymd(1970, 1, 1);
            p.not_before = epoch + Duration::from_secs(from);
            p.not_after = epoch + Duration::from_secs(until);
        }
        for i in 0..n.filler_names {
            let label = "f".repeat(60);
            let name = format!("n{i:04}.{label}.{label}.{label}.example");
            p.subject_alt_names
                .push(SanType::DnsName(name.try_into().unwrap()));
        }
        let cert = p.signed_by(&key, issuer).unwrap();
        self.write(file, &cert, &key)
    }

    fn client(&self, file: &str, n: &Names) -> Pem {
        self.client_by(file, n, &self.issuer)
    }
}

fn path(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

/// `[server.tls]` lines for `server`, verifying clients against `ca` with `client_auth`.
fn tls_section(server: &Pem, client_ca: Option<(&Path, &str)>) -> String {
    let mut s = format!(
        "[server.tls]\ncert_path = {}\nkey_path = {}\n",
        path(&server.cert),
        path(&server.key)
    );
    if let Some((ca, auth)) = client_ca {
        s += &format!("client_ca_path = {}\nclient_auth = \"{auth}\"\n", path(ca));
    }
    s
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config trusting `ca`, presenting `client` when given.
fn client_config(ca: &Path, client: Option<&Pem>) -> Arc<rustls::ClientConfig> {
    client_config_for(ca, client, rustls::DEFAULT_VERSIONS)
}

/// [`client_config`] offering only `versions`.
fn client_config_for(
    ca: &Path,
    client: Option<&Pem>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => b.with_no_client_auth(),
        Some(pem) => {
            let certs = CertificateDer::pem_file_iter(&pem.cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(&pem.key).unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to the gateway with its handshake done (or the handshake's error).
fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = connect(addr);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Sends `raw` on `tls` and reads the response; `None` when the server refused or closed.
fn tls_request(tls: &mut Tls, raw: &str) -> Option<Response> {
    tls.write_all(raw.as_bytes()).ok()?;
    tls.flush().ok()?;
    read_response(tls)
}

/// One request on a fresh TLS connection as `client`; `None` when the server refused it.
fn request_as(g: &Gateway, ca: &Path, client: Option<&Pem>, raw: &str) -> Option<Response> {
    let mut tls = tls_connect(g.addr, client_config(ca, client)).ok()?;
    tls_request(&mut tls, raw)
}

/// Waits until the audit file holds `needle`.
fn audited(audit: &Path, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(audit).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "{needle} not audited:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn audit_section(audit: &Path) -> String {
    format!("[audit]\nenabled = true\nfile = {}\n", path(audit))
}

#[test]
fn tls_serves_mcp_on_both_io_drivers_across_idle_keep_alive() {
    let pki = Pki::new();
    let server = pki.server("server");
    for io in DRIVERS {
        let g = Gateway::start(&stdio_config(io, &tls_section(&server, None), &[]));
        let mut tls = tls_connect(g.addr, client_config(&pki.ca, None)).unwrap();
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "{io}");
        let r = tls_request(&mut tls, &mcp_post_raw(INIT, None, "")).unwrap();
        assert_eq!(r.status, 200, "{io}: {}", r.text());
        let sid = r.header("mcp-session-id").unwrap().to_string();
        // Past the idle wait's buffered read (cancelled after 500 ms): the next request on
        // the same connection must still arrive whole.
        std::thread::sleep(Duration::from_millis(800));
        let r = tls_request(
            &mut tls,
            &mcp_post_raw(&call(2, "echo", r#"{"text":"over tls"}"#), Some(&sid), ""),
        )
        .unwrap();
        assert_eq!(
            rpc_result(&r)["result"]["content"][0]["text"],
            "over tls",
            "{io}"
        );
        // Pipelined: two requests in one write, two answers in order.
        let two = format!("{}{}", ping_raw(3, &sid), ping_raw(4, &sid));
        tls.write_all(two.as_bytes()).unwrap();
        tls.flush().unwrap();
        for id in [3, 4] {
            let r = read_response(&mut tls).unwrap();
            assert_eq!(rpc_result(&r)["id"], id, "{io}");
        }
        // A connection the gateway closes ends with close_notify, not a bare TCP close (which
        // a client could not tell from a truncation).
        let r = tls_request(
            &mut tls,
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert!(r.status == 200 || r.status == 503, "{io}");
        let mut rest = [0u8; 16];
        assert_eq!(tls.read(&mut rest).unwrap(), 0, "{io}: no close_notify");
        // Plain HTTP on the TLS port gets no HTTP answer.
        let mut plain = connect(g.addr);
        plain
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf);
        assert!(!buf.starts_with(b"HTTP/1.1 200"), "{io}");
    }
}

#[test]
fn required_client_auth_refuses_missing_foreign_and_expired_certificates() {
    let pki = Pki::new();
    let server = pki.server("server");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let good = pki.client(
        "alice",
        &Names {
            cn: Some("alice"),
            ..Names::default()
        },
    );
    let (_, other_issuer) = Pki::ca("another CA");
    let foreign = pki.client_by(
        "mallory",
        &Names {
            cn: Some("alice"),
            ..Names::default()
        },
        &other_issuer,
    );
    let expired = pki.client(
        "old",
        &Names {
            cn: Some("alice"),
            expired: true,
            ..Names::default()
        },
    );
    let config = format!(
        "{}[auth.mtls]\nenabled = true\nidentity_source = \"cn\"\n{}",
        stdio_config(
            "auto",
            &tls_section(&server, Some((&pki.ca, "required"))),
            &[]
        ),
        audit_section(&audit)
    );
    let g = Gateway::start(&config);
    let r = request_as(&g, &pki.ca, Some(&good), &mcp_post_raw(INIT, None, "")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    audited(&audit, "\"identity\":\"mtls:alice\"");
    for (what, client) in [
        ("none", None),
        ("another CA", Some(&foreign)),
        ("expired", Some(&expired)),
    ] {
        assert!(
            request_as(&g, &pki.ca, client, &mcp_post_raw(INIT, None, "")).is_none(),
            "a client with {what} was served"
        );
    }
    // Each refused handshake is a failed mTLS authentication, audited with its reason.
    for reason in [
        "mtls_no_certificate",
        "mtls_unknown_issuer",
        "mtls_certificate_expired",
    ] {
        audited(&audit, &format!("\"reason\":\"{reason}\""));
    }
    assert_eq!(
        g.metric_settles(
            "mcp_guard_auth_total",
            &[("method", "mtls"), ("result", "failure")],
            3.0
        ),
        3.0
    );
    assert_eq!(
        g.metric_settles(
            "mcp_guard_auth_total",
            &[("method", "mtls"), ("result", "success")],
            1.0
        ),
        1.0
    );
}

#[test]
fn each_identity_source_names_the_caller_and_a_missing_field_is_refused() {
    let pki = Pki::new();
    let server = pki.server("server");
    let full = pki.client(
        "full",
        &Names {
            cn: Some("alice"),
            dns: Some("alice.example.com"),
            email: Some("alice@example.com"),
            uri: Some("spiffe://example.org/ns/prod/sa/alice"),
            ..Names::default()
        },
    );
    let cn_only = pki.client(
        "cn-only",
        &Names {
            cn: Some("bob"),
            ..Names::default()
        },
    );
    for (source, identity) in [
        ("cn", "alice"),
        ("san_dns", "alice.example.com"),
        ("san_email", "alice@example.com"),
        ("san_uri", "spiffe://example.org/ns/prod/sa/alice"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.log");
        let config = format!(
            "{}[auth.mtls]\nenabled = true\nidentity_source = \"{source}\"\n{}",
            stdio_config(
                "auto",
                &tls_section(&server, Some((&pki.ca, "required"))),
                &[]
            ),
            audit_section(&audit)
        );
        let g = Gateway::start(&config);
        let r = request_as(&g, &pki.ca, Some(&full), &mcp_post_raw(INIT, None, "")).unwrap();
        assert_eq!(r.status, 200, "{source}: {}", r.text());
        audited(&audit, &format!("\"identity\":\"mtls:{identity}\""));
        let r = request_as(&g, &pki.ca, Some(&cn_only), &mcp_post_raw(INIT, None, "")).unwrap();
        if source == "cn" {
            assert_eq!(r.status, 200, "{source}");
        } else {
            assert_eq!(r.status, 401, "{source}: {}", r.text());
            audited(&audit, "\"reason\":\"mtls_identity_missing\"");
        }
    }
}

#[test]
fn optional_client_auth_uses_a_certificate_when_presented_and_the_chain_otherwise() {
    let pki = Pki::new();
    let server = pki.server("server");
    let good = pki.client(
        "carol",
        &Names {
            cn: Some("carol"),
            ..Names::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    // The key "secret-key" (SHA-256, base64).
    let hash = "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=";
    let config = format!(
        "{}[auth.mtls]\nenabled = true\nallowed_tools = [\"echo\"]\n[[auth.api_keys]]\nid = \"ci\"\nkey_hash = \"{hash}\"\n{}",
        stdio_config(
            "auto",
            &tls_section(&server, Some((&pki.ca, "optional"))),
            &[]
        ),
        audit_section(&audit)
    );
    let g = Gateway::start(&config);
    // No certificate and no other credential: 401 like any missing credential.
    let r = request_as(&g, &pki.ca, None, &mcp_post_raw(INIT, None, "")).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // A certificate: its identity, under [auth.mtls]'s policy.
    let mut tls = tls_connect(g.addr, client_config(&pki.ca, Some(&good))).unwrap();
    let r = tls_request(&mut tls, &mcp_post_raw(INIT, None, "")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let r = tls_request(
        &mut tls,
        &mcp_post_raw(&call(2, "add", r#"{"a":1,"b":2}"#), Some(&sid), ""),
    )
    .unwrap();
    let v = rpc_result(&r);
    assert!(
        v.get("error").is_some() || v["result"]["isError"] == true,
        "add was allowed: {v}"
    );
    audited(&audit, "\"identity\":\"mtls:carol\"");
}

#[test]
fn client_cert_headers_count_only_from_trusted_proxies_and_never_go_upstream() {
    let demo = DemoHttp::start(&["--test-tools"]);
    let headers = "X-Client-Cert-Verified: SUCCESS\r\nX-Client-Cert-CN: dave\r\nX-Client-Cert-SAN-URI: spiffe://example.org/dave\r\n";
    for (trusted, expect) in [("127.0.0.1", 200), ("10.9.9.9", 401)] {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.log");
        let config = format!(
            "{}[auth.mtls]\nenabled = true\ntrusted_proxy_ips = [\"{trusted}\"]\n{}",
            http_config("auto", &demo.url(), "", ""),
            audit_section(&audit)
        );
        let g = Gateway::start(&config);
        let r = request(g.addr, &mcp_post_raw(INIT, None, headers));
        assert_eq!(r.status, expect, "trusted {trusted}: {}", r.text());
        if expect == 401 {
            continue;
        }
        audited(&audit, "\"identity\":\"mtls:dave\"");
        let sid = r.header("mcp-session-id").unwrap().to_string();
        let r = request(
            g.addr,
            &mcp_post_raw(&call(2, "last_request_headers", "{}"), Some(&sid), headers),
        );
        let seen = rpc_result(&r)["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase();
        assert!(seen.contains("mcp-session-id"), "{seen}");
        assert!(!seen.contains("x-client-cert"), "forwarded: {seen}");
        // A terminator that says the certificate failed: refused, with the reason.
        let failed = "X-Client-Cert-Verified: FAILED:expired\r\nX-Client-Cert-CN: dave\r\n";
        let r = request(g.addr, &mcp_post_raw(INIT, None, failed));
        assert_eq!(r.status, 401);
        audited(&audit, "\"reason\":\"mtls_not_verified\"");
        // A name that would not read as what it is (a bidi override), or a blank one.
        for cn in ["\u{202e}evad", " "] {
            let bad = format!("X-Client-Cert-Verified: SUCCESS\r\nX-Client-Cert-CN: {cn}\r\n");
            let r = request(g.addr, &mcp_post_raw(INIT, None, &bad));
            assert_eq!(r.status, 401, "{cn:?}");
        }
        audited(&audit, "\"reason\":\"mtls_bad_identity\"");
        // A terminator that says no certificate was sent: like no credential at all.
        let none = "X-Client-Cert-Verified: NONE\r\n";
        let r = request(g.addr, &mcp_post_raw(INIT, None, none));
        assert_eq!(r.status, 401);
        // Two values for one field: refused as malformed, never resolved by preference.
        let twice = format!("{headers}X-Client-Cert-CN: eve\r\n");
        assert_eq!(
            request(g.addr, &mcp_post_raw(INIT, None, &twice)).status,
            400
        );
    }
}

#[test]
fn a_stalled_handshake_is_cut_off_and_the_worker_serves_others_meanwhile() {
    let pki = Pki::new();
    let server = pki.server("server");
    let extra = format!("header_timeout_secs = 1\n{}", tls_section(&server, None));
    let config = stdio_config("auto", &extra, &[]).replace("workers = 2", "workers = 1");
    let g = Gateway::start(&config);
    // The first bytes of a ClientHello record, then nothing.
    let mut staller = connect(g.addr);
    staller
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    // The same (only) worker completes another client's handshake and request meanwhile.
    let r = request_as(&g, &pki.ca, None, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(r.status == 200 || r.status == 503, "{}", r.status);
    // The staller is closed once header_timeout has passed (well before the read timeout).
    let mut buf = [0u8; 64];
    match staller.read(&mut buf) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the stalled handshake was not cut off: {e}"
        ),
    }
    assert_eq!(
        g.metric_settles("mcp_guard_requests_total", &[("status", "408")], 1.0),
        1.0
    );
}

#[test]
fn curl_with_a_client_certificate_is_served() {
    let pki = Pki::new();
    let server = pki.server("server");
    let client = pki.client(
        "erin",
        &Names {
            cn: Some("erin"),
            ..Names::default()
        },
    );
    let config = format!(
        "{}[auth.mtls]\nenabled = true\n",
        stdio_config(
            "auto",
            &tls_section(&server, Some((&pki.ca, "required"))),
            &[]
        )
    );
    let g = Gateway::start(&config);
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(&pki.ca)
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .args([
            "-H",
            "Content-Type: application/json",
            "-H",
            &format!("Accept: {ACCEPT_BOTH}"),
        ])
        .args(["--data", INIT])
        .arg(format!("https://localhost:{}/mcp", g.addr.port()))
        .args([
            "--resolve",
            &format!("localhost:{}:127.0.0.1", g.addr.port()),
        ])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim_end().ends_with("200"),
        "curl: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("serverInfo"), "{text}");
}

#[test]
fn a_reload_brings_a_new_certificate_to_new_handshakes_and_a_bad_one_is_refused() {
    let pki = Pki::new();
    let first = pki.server("first");
    let second = pki.server("second");
    let live = Pem {
        cert: pki.dir.path().join("live.crt"),
        key: pki.dir.path().join("live.key"),
    };
    std::fs::copy(&first.cert, &live.cert).unwrap();
    std::fs::copy(&first.key, &live.key).unwrap();
    let config = stdio_config("auto", &tls_section(&live, None), &[]);
    let g = Gateway::start(&config);
    let served_cert = |g: &Gateway| {
        let tls = tls_connect(g.addr, client_config(&pki.ca, None)).unwrap();
        tls.conn.peer_certificates().unwrap()[0].as_ref().to_vec()
    };
    let der = |p: &Path| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(p)
            .unwrap()
            .as_ref()
            .to_vec()
    };
    assert_eq!(served_cert(&g), der(&first.cert));
    let open = tls_connect(g.addr, client_config(&pki.ca, None)).unwrap();
    std::fs::copy(&second.cert, &live.cert).unwrap();
    std::fs::copy(&second.key, &live.key).unwrap();
    g.signal(libc::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while served_cert(&g) != der(&second.cert) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A connection from before the reload goes on.
    let mut open = open;
    let r = tls_request(&mut open, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(r.status == 200 || r.status == 503);
    // A key that does not match its certificate: the reload is refused, the old pair stays.
    std::fs::copy(&first.key, &live.key).unwrap();
    let before = g.metric("mcp_guard_config_reload_failures_total", &[]);
    g.signal(libc::SIGHUP);
    assert_eq!(
        g.metric_settles("mcp_guard_config_reload_failures_total", &[], before + 1.0),
        before + 1.0
    );
    assert_eq!(served_cert(&g), der(&second.cert));
}

/// Reads from `tls` until `needle` has been seen (or the read fails), returning what was read.
fn tls_read_until(tls: &mut Tls, needle: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(needle.len()).any(|w| w == needle) {
        match tls.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn sse_streams_run_over_tls_and_a_key_update_does_not_end_them() {
    let pki = Pki::new();
    let server = pki.server("server");
    for io in DRIVERS {
        let g = Gateway::start(&stdio_config(io, &tls_section(&server, None), &[]));
        let config = client_config(&pki.ca, None);
        let mut post = tls_connect(g.addr, config.clone()).unwrap();
        let r = tls_request(&mut post, &mcp_post_raw(INIT, None, "")).unwrap();
        let sid = r.header("mcp-session-id").unwrap().to_string();
        let mut stream = tls_connect(g.addr, config.clone()).unwrap();
        let get = format!(
            "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n"
        );
        stream.write_all(get.as_bytes()).unwrap();
        let head = tls_read_until(&mut stream, b"\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{io}: {head}");
        for round in 0..2 {
            let r = tls_request(
                &mut post,
                &mcp_post_raw(&call(10 + round, "notify", "{}"), Some(&sid), ""),
            )
            .unwrap();
            assert_eq!(r.status, 200, "{io}");
            let events = tls_read_until(&mut stream, b"list_changed");
            assert!(
                events.contains("notifications/tools/list_changed"),
                "{io} round {round}: {events}"
            );
            // A TLS 1.3 key update is not a request: the stream must go on after it.
            stream.conn.refresh_traffic_keys().unwrap();
            stream.flush().unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
        // The legacy transport's stream too: its endpoint event arrives over TLS.
        let mut legacy = tls_connect(g.addr, config).unwrap();
        legacy
            .write_all(b"GET /sse HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
            .unwrap();
        let got = tls_read_until(&mut legacy, b"event: endpoint");
        assert!(got.contains("event: endpoint"), "{io}: {got}");
    }
}

#[test]
fn validate_knows_tls_and_names_the_file_at_fault() {
    let pki = Pki::new();
    let server = pki.server("server");
    let other = pki.server("other");
    let write = |name: &str, text: &str| {
        let p = pki.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let validate = |config: &Path| {
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = write(
        "good.toml",
        &format!(
            "{}[auth.mtls]\nenabled = true\n",
            stdio_config(
                "auto",
                &tls_section(&server, Some((&pki.ca, "required"))),
                &[]
            )
        ),
    );
    let (ok, out, err) = validate(&good);
    assert!(ok, "{err}");
    assert!(out.contains("with TLS and client certificates"), "{out}");
    let mismatched = Pem {
        cert: server.cert.clone(),
        key: other.key.clone(),
    };
    let bad = write(
        "bad.toml",
        &stdio_config("auto", &tls_section(&mismatched, None), &[]),
    );
    let (ok, _, err) = validate(&bad);
    assert!(!ok);
    assert!(err.contains("server.tls.key_path"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

#[test]
fn a_forged_record_after_the_handshake_closes_only_that_connection() {
    let pki = Pki::new();
    let server = pki.server("server");
    let config = stdio_config("auto", &tls_section(&server, None), &[])
        .replace("workers = 2", "workers = 1");
    let g = Gateway::start(&config);
    let mut tls = tls_connect(g.addr, client_config(&pki.ca, None)).unwrap();
    // An application-data record whose ciphertext is not ours: it cannot be decrypted.
    tls.sock
        .write_all(
            &[0x17, 0x03, 0x03, 0x00, 0x20]
                .iter()
                .copied()
                .chain([0x41; 32])
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let mut buf = [0u8; 64];
    let mut raw = Vec::new();
    // The gateway answers with an alert (or nothing) and closes; no HTTP comes back.
    loop {
        match tls.sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "the connection was not closed: {e}"
                );
                break;
            }
        }
    }
    assert!(
        raw.is_empty() || raw[0] == 0x15 || raw[0] == 0x17,
        "{raw:?}"
    );
    // The worker goes on serving.
    let r = request_as(&g, &pki.ca, None, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(r.status == 200 || r.status == 503);
}

/// Now, in Unix seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A gateway on `[server.tls]` verifying clients against `ca` (`client_auth`), with
/// `[auth.mtls]` lines `mtls`, an API key `ci` (key "secret-key"), and an audit file.
fn mtls_config(server: &Pem, ca: &Path, client_auth: &str, mtls: &str, audit: &Path) -> String {
    let hash = "hdvhXXXvkwjHrg8zx6MkzG9L9Rmi7S8wJ70zwUCk+ao=";
    format!(
        "{}[auth.mtls]\nenabled = true\n{mtls}[[auth.api_keys]]\nid = \"ci\"\nkey_hash = \"{hash}\"\n{}",
        stdio_config("auto", &tls_section(server, Some((ca, client_auth))), &[]),
        audit_section(audit)
    )
}

#[test]
fn an_expired_certificate_stops_authenticating_on_keep_alive_and_resumed_sessions() {
    let pki = Pki::new();
    let server = pki.server("server");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let g = Gateway::start(&mtls_config(&server, &pki.ca, "required", "", &audit));
    // Valid for a few seconds from now: long enough for the handshakes below.
    let now = unix_now();
    let until = now + 3;
    let brief = pki.client(
        "brief",
        &Names {
            cn: Some("alice"),
            window: Some((now - 60, until)),
            ..Names::default()
        },
    );
    let mut open = Vec::new();
    for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
        // One client config per version: its session cache lets the later connection resume.
        let config = client_config_for(&pki.ca, Some(&brief), versions);
        let mut tls = tls_connect(g.addr, config.clone()).unwrap();
        let r = tls_request(&mut tls, &mcp_post_raw(INIT, None, "")).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        open.push((config, tls));
    }
    audited(&audit, "\"identity\":\"mtls:alice\"");
    while unix_now() <= until + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    for (config, mut tls) in open {
        let version = format!("{:?}", tls.conn.protocol_version());
        // The open keep-alive connection: refused with the reason, and closed.
        let r = tls_request(&mut tls, &mcp_post_raw(INIT, None, "")).unwrap();
        assert_eq!(r.status, 401, "{version}: {}", r.text());
        assert!(
            tls_request(&mut tls, &mcp_post_raw(INIT, None, "")).is_none(),
            "{version}: the connection stayed open"
        );
        // A resumed session skips the certificate check of a full handshake: the request is
        // refused all the same.
        let mut resumed = tls_connect(g.addr, config).unwrap();
        assert_eq!(
            resumed.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{version}"
        );
        let r = tls_request(&mut resumed, &mcp_post_raw(INIT, None, "")).unwrap();
        assert_eq!(r.status, 401, "{version}: {}", r.text());
    }
    // Refused as requests (not handshakes), with the reason.
    let log = audited(&audit, "\"reason\":\"mtls_certificate_expired\"");
    assert!(
        log.lines()
            .any(|l| l.contains("mtls_certificate_expired") && l.contains("\"status\":401")),
        "{log}"
    );
    // A full handshake refuses it at once.
    assert!(request_as(&g, &pki.ca, Some(&brief), &mcp_post_raw(INIT, None, "")).is_none());
}

#[test]
fn a_reload_that_drops_a_ca_or_requires_certificates_ends_open_connections_it_no_longer_admits() {
    let pki = Pki::new();
    let server = pki.server("server");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let (second_pem, second) = Pki::ca("second CA");
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(&pki.ca).unwrap() + &second_pem,
    )
    .unwrap();
    let alice = pki.client(
        "alice",
        &Names {
            cn: Some("alice"),
            ..Names::default()
        },
    );
    let bob = pki.client_by(
        "bob",
        &Names {
            cn: Some("bob"),
            ..Names::default()
        },
        &second,
    );
    let g = Gateway::start(&mtls_config(&server, &both, "optional", "", &audit));
    let init = mcp_post_raw(INIT, None, "");
    let init_with_key = mcp_post_raw(INIT, None, &bearer("secret-key"));
    let mut by_alice = tls_connect(g.addr, client_config(&pki.ca, Some(&alice))).unwrap();
    let mut by_bob = tls_connect(g.addr, client_config(&pki.ca, Some(&bob))).unwrap();
    let mut by_key = tls_connect(g.addr, client_config(&pki.ca, None)).unwrap();
    for (tls, raw) in [
        (&mut by_alice, &init),
        (&mut by_bob, &init),
        (&mut by_key, &init_with_key),
    ] {
        let r = tls_request(tls, raw).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    audited(&audit, "\"identity\":\"mtls:bob\"");
    // The second CA leaves the bundle, and certificates become required.
    g.reload(&mtls_config(&server, &pki.ca, "required", "", &audit), WAIT);
    // Bob's chain no longer verifies: refused with the reason, then the connection ends.
    let r = tls_request(&mut by_bob, &init).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    audited(&audit, "\"reason\":\"mtls_revoked\"");
    assert!(tls_request(&mut by_bob, &init).is_none());
    // Alice's still does, on the same connection.
    for _ in 0..2 {
        let r = tls_request(&mut by_alice, &init).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Without a certificate, a connection no longer meets the handshake's requirement.
    assert!(tls_request(&mut by_key, &init_with_key).is_none());
    // New handshakes as bob are refused too.
    assert!(request_as(&g, &pki.ca, Some(&bob), &init).is_none());
}

#[test]
fn a_client_chain_over_eight_intermediates_is_refused_before_it_is_verified() {
    let pki = Pki::new();
    let server = pki.server("server");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let g = Gateway::start(&mtls_config(&server, &pki.ca, "required", "", &audit));
    let leaf = pki.client(
        "alice",
        &Names {
            cn: Some("alice"),
            ..Names::default()
        },
    );
    // Bogus intermediates named like the real CA, each with a key of its own: the path builder
    // would try every one of them.
    let bogus: Vec<String> = (0..9).map(|_| Pki::ca("mcp-guard test CA").0).collect();
    let with = |n: usize| {
        let pem = Pem {
            cert: dir.path().join(format!("chain{n}.crt")),
            key: leaf.key.clone(),
        };
        let chain = std::fs::read_to_string(&leaf.cert).unwrap() + &bogus[..n].concat();
        std::fs::write(&pem.cert, chain).unwrap();
        pem
    };
    let at_cap = with(8);
    let r = request_as(&g, &pki.ca, Some(&at_cap), &mcp_post_raw(INIT, None, "")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let over = with(9);
    assert!(request_as(&g, &pki.ca, Some(&over), &mcp_post_raw(INIT, None, "")).is_none());
    audited(&audit, "\"reason\":\"mtls_chain_too_long\"");
}

#[test]
fn a_certificate_from_the_handshake_decides_over_a_trusted_proxys_headers() {
    let pki = Pki::new();
    let server = pki.server("server");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let g = Gateway::start(&mtls_config(
        &server,
        &pki.ca,
        "optional",
        "identity_source = \"san_dns\"\ntrusted_proxy_ips = [\"127.0.0.1\"]\n",
        &audit,
    ));
    let bob = pki.client(
        "bob",
        &Names {
            dns: Some("bob.example"),
            ..Names::default()
        },
    );
    let nameless = pki.client(
        "nameless",
        &Names {
            cn: Some("nameless"),
            ..Names::default()
        },
    );
    let admin = "X-Client-Cert-Verified: SUCCESS\r\nX-Client-Cert-SAN-DNS: admin\r\n";
    let r = request_as(&g, &pki.ca, Some(&bob), &mcp_post_raw(INIT, None, admin)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // A certificate without the name field stays refused; the headers do not fill it in.
    let r = request_as(
        &g,
        &pki.ca,
        Some(&nameless),
        &mcp_post_raw(INIT, None, admin),
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let log = audited(&audit, "\"reason\":\"mtls_identity_missing\"");
    assert!(log.contains("\"identity\":\"mtls:bob.example\""), "{log}");
    assert!(!log.contains("mtls:admin"), "{log}");
    // Without a client certificate, the trusted proxy's headers still name the caller.
    let r = request_as(&g, &pki.ca, None, &mcp_post_raw(INIT, None, admin)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    audited(&audit, "\"identity\":\"mtls:admin\"");
}

#[test]
fn odd_certificates_are_refused_with_their_own_reasons() {
    let pki = Pki::new();
    let server = pki.server("server");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let g = Gateway::start(&mtls_config(&server, &pki.ca, "required", "", &audit));
    let init = mcp_post_raw(INIT, None, "");
    // A CN with a trailing space would be a second `alice` that reads the same.
    let spaced = pki.client(
        "spaced",
        &Names {
            cn: Some("alice "),
            ..Names::default()
        },
    );
    let r = request_as(&g, &pki.ca, Some(&spaced), &init).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    audited(&audit, "\"reason\":\"mtls_bad_identity\"");
    // Not valid yet: refused in the handshake, and said so.
    let now = unix_now();
    let future = pki.client(
        "future",
        &Names {
            cn: Some("alice"),
            window: Some((now + 86_400, now + 2 * 86_400)),
            ..Names::default()
        },
    );
    assert!(request_as(&g, &pki.ca, Some(&future), &init).is_none());
    audited(&audit, "\"reason\":\"mtls_certificate_not_yet_valid\"");
    // Over rustls's 64 KiB handshake message limit: refused, and counted and audited.
    let huge = pki.client(
        "huge",
        &Names {
            cn: Some("alice"),
            filler_names: 200,
            ..Names::default()
        },
    );
    // Sent twice: each copy stays under what a certificate parser takes, the message not.
    let twice = std::fs::read_to_string(&huge.cert).unwrap();
    std::fs::write(&huge.cert, twice.repeat(2)).unwrap();
    assert!(std::fs::metadata(&huge.cert).unwrap().len() > 100_000);
    assert!(request_as(&g, &pki.ca, Some(&huge), &init).is_none());
    audited(&audit, "\"reason\":\"mtls_certificate_too_large\"");
    // Three failed mTLS authentications: the spaced name, the future and the huge certificate.
    assert_eq!(
        g.metric_settles(
            "mcp_guard_auth_total",
            &[("method", "mtls"), ("result", "failure")],
            3.0
        ),
        3.0
    );
}

#[test]
fn a_quoted_e_mail_local_part_names_nobody() {
    let pki = Pki::new();
    let server = pki.server("server");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let g = Gateway::start(&mtls_config(
        &server,
        &pki.ca,
        "required",
        "identity_source = \"san_email\"\n",
        &audit,
    ));
    let init = mcp_post_raw(INIT, None, "");
    let plain = pki.client(
        "plain",
        &Names {
            email: Some("alice@example.org"),
            ..Names::default()
        },
    );
    let r = request_as(&g, &pki.ca, Some(&plain), &init).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    audited(&audit, "\"identity\":\"mtls:alice@example.org\"");
    for (file, email) in [
        ("quoted", "\"alice@example.org\"@evil.com"),
        ("twoat", "alice@example.org@evil.com"),
    ] {
        let odd = pki.client(
            file,
            &Names {
                email: Some(email),
                ..Names::default()
            },
        );
        let r = request_as(&g, &pki.ca, Some(&odd), &init).unwrap();
        assert_eq!(r.status, 401, "{email}: {}", r.text());
    }
    audited(&audit, "\"reason\":\"mtls_bad_identity\"");
}

#[test]
fn api_key_ids_that_would_pass_for_another_caller_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let hash = "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=";
    for (id, ok) in [
        ("ci", true),
        ("\\u200bmtls:alice", false),
        (" mtls:alice", false),
        ("alice ", false),
        ("al\\u202eice", false),
    ] {
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "{}[[auth.api_keys]]\nid = \"{id}\"\nkey_hash = \"{hash}\"\n",
                stdio_config("auto", "", &[])
            ),
        )
        .unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "{id:?}: {err}");
        if !ok {
            assert!(err.contains("auth.api_keys[0].id"), "{id:?}: {err}");
        }
    }
}
