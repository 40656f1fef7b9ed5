//! Several servers behind one gateway, through the real binary: routing by endpoint and
//! prefix (longest wins), `/routes` per caller, `allowed_servers`, session ids bound to their
//! server, paths that try to escape a route, HTTP and stdio servers side by side, and servers
//! added and removed by a reload.

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use std::time::Duration;

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789";

/// A stdio server entry running the demo server under `name` (its serverInfo name too).
fn stdio_server(name: &str, extra: &str) -> String {
    format!(
        "[[upstream.servers]]\nname = \"{name}\"\ntransport = \"stdio\"\ncommand = {DEMO:?}\nargs = [\"--name\", \"srv-{name}\"]\n{extra}\n"
    )
}

/// A gateway config: a default stdio upstream (serverInfo `srv-default`), the given servers,
/// and two keys (bob may reach only `alpha`).
fn config(servers: &str) -> String {
    format!(
        "[server]\nport = 0\nworkers = 2\n[admin]\nport = 0\n[upstream]\ntransport = \"stdio\"\ncommand = {DEMO:?}\nargs = [\"--name\", \"srv-default\"]\ntimeout_secs = 10\n{servers}\n[[auth.api_keys]]\nid = \"alice\"\nkey_hash = \"{}\"\n[[auth.api_keys]]\nid = \"bob\"\nkey_hash = \"{}\"\nallowed_servers = [\"alpha\"]\n",
        hash_key(ALICE),
        hash_key(BOB)
    )
}

fn post_at(g: &Gateway, path: &str, key: &str, body: &str, sid: Option<&str>) -> Response {
    request(g.addr, &mcp_post_raw_at(path, body, sid, &bearer(key)))
}

/// Initializes at `path`; returns (serverInfo name, session id).
fn init_at(g: &Gateway, path: &str, key: &str) -> (String, String) {
    initialize_at(g.addr, path, &bearer(key))
}

fn get_routes(g: &Gateway, key: &str) -> Response {
    request(
        g.addr,
        &format!(
            "GET /routes HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        ),
    )
}

#[test]
fn each_server_is_reached_at_its_endpoint_and_prefix_and_the_longest_prefix_wins() {
    let servers = format!(
        "{}{}{}",
        stdio_server("alpha", "path_prefix = \"/a\""),
        stdio_server("beta", "path_prefix = \"/a/b\""),
        stdio_server("gamma", ""),
    );
    let g = Gateway::start(&config(&servers));
    assert_eq!(init_at(&g, "/mcp", ALICE).0, "srv-default");
    assert_eq!(init_at(&g, "/mcp/alpha", ALICE).0, "srv-alpha");
    assert_eq!(init_at(&g, "/a", ALICE).0, "srv-alpha");
    assert_eq!(init_at(&g, "/a/b", ALICE).0, "srv-beta");
    assert_eq!(init_at(&g, "/mcp/gamma", ALICE).0, "srv-gamma");
    // Without strip_prefix, paths below an endpoint are not routed; a prefix matches whole
    // segments only.
    assert_eq!(post_at(&g, "/a/c", ALICE, INIT, None).status, 404);
    assert_eq!(post_at(&g, "/ab", ALICE, INIT, None).status, 404);
    assert_eq!(post_at(&g, "/mcp/delta", ALICE, INIT, None).status, 404);
    // A call works end to end on a routed server, and the audit names it.
    let (_, sid) = init_at(&g, "/mcp/gamma", ALICE);
    let r = post_at(
        &g,
        "/mcp/gamma",
        ALICE,
        &call(2, "echo", r#"{"text":"via gamma"}"#),
        Some(&sid),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "via gamma");
}

#[test]
fn a_session_id_is_unknown_at_any_other_server() {
    let servers = format!("{}{}", stdio_server("alpha", ""), stdio_server("beta", ""));
    let g = Gateway::start(&config(&servers));
    let (_, sid) = init_at(&g, "/mcp/alpha", ALICE);
    let ping = r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#;
    assert_eq!(
        post_at(&g, "/mcp/alpha", ALICE, ping, Some(&sid)).status,
        200
    );
    for other in ["/mcp/beta", "/mcp"] {
        let r = post_at(&g, other, ALICE, ping, Some(&sid));
        assert_eq!(r.status, 404, "{other}: {}", r.text());
    }
    // And at its own server, for another identity.
    let bob = post_at(&g, "/mcp/alpha", BOB, ping, Some(&sid));
    assert_eq!(bob.status, 404, "{}", bob.text());
}

#[test]
fn allowed_servers_refuses_other_servers_and_hides_them_from_routes() {
    let servers = format!(
        "{}{}",
        stdio_server("alpha", "path_prefix = \"/alpha\""),
        stdio_server("beta", "")
    );
    let g = Gateway::start(&config(&servers));
    assert_eq!(init_at(&g, "/mcp/alpha", BOB).0, "srv-alpha");
    for path in ["/mcp/beta", "/mcp"] {
        let r = post_at(&g, path, BOB, INIT, None);
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert!(
            r.text().contains("is not permitted for this caller"),
            "{}",
            r.text()
        );
    }
    let bob = get_routes(&g, BOB);
    assert_eq!(bob.status, 200);
    let names: Vec<String> = bob.json()["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["alpha"]);
    assert_eq!(bob.json()["routes"][0]["endpoint"], "/mcp/alpha");
    assert_eq!(bob.json()["routes"][0]["path_prefix"], "/alpha");
    let alice = get_routes(&g, ALICE).json();
    assert_eq!(alice["routes"].as_array().unwrap().len(), 3);
    // /routes says where, never what: no command lines or URLs.
    assert!(!get_routes(&g, ALICE).text().contains("demo"));
    // A stranger learns nothing.
    let anon = request(
        g.addr,
        "GET /routes HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(anon.status, 401);
}

#[test]
fn paths_that_are_not_in_normal_form_are_refused_before_routing() {
    let servers = format!("{}{}", stdio_server("alpha", ""), stdio_server("beta", ""));
    let g = Gateway::start(&config(&servers));
    for path in [
        "/mcp/alpha/../beta",
        "/mcp//beta",
        "/mcp/./beta",
        "/mcp/%62eta",
        "/mcp/alpha%2f..%2fbeta",
        "/mcp/alpha/%2e%2e/beta",
        "/mcp\\beta",
        "/mcp/beta/",
    ] {
        let r = post_at(&g, path, ALICE, INIT, None);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
    }
}

#[test]
fn http_and_stdio_servers_side_by_side_with_a_prefix_stripped() {
    let http = DemoHttp::start(&["--name", "srv-http"]);
    let servers = format!(
        "[[upstream.servers]]\nname = \"web\"\ntransport = \"http\"\nurl = \"http://{}/mcp\"\npath_prefix = \"/web\"\nstrip_prefix = true\n{}",
        http.addr,
        stdio_server("local", "")
    );
    let g = Gateway::start(&config(&servers));
    assert_eq!(init_at(&g, "/web", ALICE).0, "srv-http");
    assert_eq!(init_at(&g, "/mcp/web", ALICE).0, "srv-http");
    assert_eq!(init_at(&g, "/mcp/local", ALICE).0, "srv-local");
    // Below the prefix, the remainder is appended to the upstream's path (which the demo
    // server does not serve: its own 404 comes back, proving where it went).
    let r = post_at(&g, "/web/extra", ALICE, INIT, None);
    assert_eq!(r.status, 404, "{}", r.text());
    // /ready reports each upstream.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = g.admin_get("/ready");
        if ready.status == 200 {
            let v = ready.json();
            assert_eq!(v["upstreams"]["web"]["ready"], true);
            assert_eq!(v["upstreams"]["local"]["ready"], true);
            assert_eq!(v["upstreams"]["default"]["ready"], true);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", ready.text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_reload_adds_and_removes_servers_without_a_restart() {
    let g = Gateway::start(&config(&stdio_server("alpha", "")));
    let (_, alpha_sid) = init_at(&g, "/mcp/alpha", ALICE);
    assert_eq!(post_at(&g, "/mcp/beta", ALICE, INIT, None).status, 404);
    g.rewrite_config(&config(&format!(
        "{}{}",
        stdio_server("alpha", ""),
        stdio_server("beta", "")
    )));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("configuration reloaded", Duration::from_secs(5)));
    assert_eq!(init_at(&g, "/mcp/beta", ALICE).0, "srv-beta");
    // alpha was unchanged: it ran on, and so did its session.
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(
        post_at(&g, "/mcp/alpha", ALICE, ping, Some(&alpha_sid)).status,
        200
    );
    g.rewrite_config(&config(&stdio_server("beta", "")));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("upstream replaced", Duration::from_secs(5)));
    assert_eq!(post_at(&g, "/mcp/alpha", ALICE, INIT, None).status, 404);
    assert_eq!(init_at(&g, "/mcp/beta", ALICE).0, "srv-beta");
}

#[test]
fn validate_refuses_ambiguous_or_malformed_routes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("routes.toml");
    for (servers, expected) in [
        (
            format!("{}{}", stdio_server("alpha", ""), stdio_server("alpha", "")),
            "upstream.servers[1].name: `alpha` is already the name of upstream.servers[0]",
        ),
        (
            stdio_server("alpha", "path_prefix = \"/mcp\""),
            "`/mcp` is already served by upstream",
        ),
        (
            stdio_server("alpha", "path_prefix = \"/x/../y\""),
            "upstream.servers[0].path_prefix: `/x/../y` must be an absolute path in normal form",
        ),
        (
            stdio_server("default", ""),
            "`default` names the [upstream]",
        ),
        (
            stdio_server("a/b", ""),
            "upstream.servers[0].name: `a/b` must be 1-64 characters",
        ),
        (
            stdio_server("alpha", "path_prefix = \"/routes\""),
            "is one of the gateway's own paths",
        ),
    ] {
        std::fs::write(&p, config(&servers)).unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config", p.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{servers}: {err}");
        assert!(err.contains(expected), "{servers}: {err}");
    }
}

#[test]
fn a_deleted_session_is_unknown_whatever_the_upstream_would_answer() {
    let http = DemoHttp::start(&["--name", "srv-http"]);
    let servers = format!(
        "[[upstream.servers]]\nname = \"web\"\ntransport = \"http\"\nurl = \"http://{}/mcp\"\n",
        http.addr
    );
    let g = Gateway::start(&config(&servers));
    let (_, sid) = init_at(&g, "/mcp/web", ALICE);
    let r = request(
        g.addr,
        &format!(
            "DELETE /mcp/web HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ALICE}\r\nMcp-Session-Id: {sid}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(r.status < 300, "{}", r.text());
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    let r = post_at(&g, "/mcp/web", ALICE, ping, Some(&sid));
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn tool_entries_can_name_a_server() {
    // carol: `echo` anywhere, `add` only on beta; `echo` denied on alpha.
    let carol = "carol-key-0123456789";
    let servers = format!("{}{}", stdio_server("alpha", ""), stdio_server("beta", ""));
    let cfg = format!(
        "{}[[auth.api_keys]]\nid = \"carol\"\nkey_hash = \"{}\"\nallowed_tools = [\"echo\", \"beta/add\"]\ndenied_tools = [\"alpha/echo\"]\n",
        config(&servers),
        hash_key(carol)
    );
    let g = Gateway::start(&cfg);
    let call_on = |path: &str, tool: &str, args: &str| {
        let (_, sid) = init_at(&g, path, carol);
        let r = post_at(&g, path, carol, &call(2, tool, args), Some(&sid));
        rpc_result(&r)
    };
    let add = r#"{"a":1,"b":2}"#;
    let echo = r#"{"text":"x"}"#;
    assert_eq!(
        call_on("/mcp/beta", "add", add)["result"]["content"][0]["text"],
        "3"
    );
    assert!(
        call_on("/mcp/alpha", "add", add)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not on this caller's allow list")
    );
    assert!(call_on("/mcp", "add", add)["error"].is_object());
    assert!(
        call_on("/mcp/alpha", "echo", echo)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("denied for this caller")
    );
    assert_eq!(
        call_on("/mcp/beta", "echo", echo)["result"]["content"][0]["text"],
        "x"
    );
    // tools/list follows the same per-server policy.
    let list = |path: &str| {
        let (_, sid) = init_at(&g, path, carol);
        let r = post_at(
            &g,
            path,
            carol,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#,
            Some(&sid),
        );
        let mut names: Vec<String> = rpc_result(&r)["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(list("/mcp/beta"), ["add", "echo"]);
    assert!(list("/mcp/alpha").is_empty());
    assert_eq!(list("/mcp"), ["echo"]);
    // A server that does not exist is a configuration error, not a silent no-op.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, cfg.replace("beta/add", "gamma/add")).unwrap();
    let out = std::process::Command::new(GUARD)
        .args(["validate", "--config", p.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("names server `gamma`, which is not configured"),
        "{err}"
    );
}

#[test]
fn the_public_port_tells_health_without_the_setup_and_refuses_path_parameters() {
    let g = Gateway::start(&config(&stdio_server(
        "alpha",
        "path_prefix = \"/a\"\nstrip_prefix = true",
    )));
    for path in ["/ready", "/health"] {
        let r = request(
            g.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        );
        let text = r.text();
        assert!(
            !text.contains("alpha") && !text.contains("upstreams"),
            "{path}: {text}"
        );
        assert!(r.json()["status"].is_string(), "{text}");
    }
    // The admin port has the details.
    assert!(g.admin_get("/ready").text().contains("alpha"));
    // `..;` is `..` to some servers: a path parameter is not normal form.
    assert_eq!(
        post_at(&g, "/a/..;/..;/admin", ALICE, INIT, None).status,
        400
    );
}

#[test]
fn mcp_method_and_name_headers_are_refused_on_a_batch() {
    let g = Gateway::start(&config(""));
    let (_, sid) = init_at(&g, "/mcp", ALICE);
    let batch = format!("[{}]", call(5, "echo", r#"{"text":"x"}"#));
    let r = request(
        g.addr,
        &format!(
            "POST /mcp HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ALICE}\r\nMCP-Protocol-Version: 2025-03-26\r\nMcp-Name: admin_wipe\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\nMcp-Session-Id: {sid}\r\nContent-Length: {}\r\n\r\n{batch}",
            batch.len()
        ),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("a batch must not carry them"),
        "{}",
        r.text()
    );
}

#[test]
fn narrowing_allowed_servers_ends_an_open_get_stream_there() {
    // dora may reach alpha; a reload takes it away while her GET stream at alpha is open.
    let dora = "dora-key-0123456789";
    let entry = |servers: &str| {
        format!(
            "[[auth.api_keys]]\nid = \"dora\"\nkey_hash = \"{}\"\nallowed_servers = [{servers}]\n",
            hash_key(dora)
        )
    };
    let servers = stdio_server("alpha", "");
    let g = Gateway::start(&format!("{}{}", config(&servers), entry("\"alpha\"")));
    let (_, sid) = init_at(&g, "/mcp/alpha", dora);
    let (_, alice_sid) = init_at(&g, "/mcp/alpha", ALICE);
    let mut stream = std::net::TcpStream::connect(g.addr).unwrap();
    std::io::Write::write_all(
        &mut stream,
        format!(
            "GET /mcp/alpha HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {dora}\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 512];
    let n = std::io::Read::read(&mut stream, &mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    g.rewrite_config(&format!("{}{}", config(&servers), entry("\"default\"")));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("configuration reloaded", Duration::from_secs(5)));
    // A notification for every session of alpha's child: dora's stream ends instead.
    let r = post_at(
        &g,
        "/mcp/alpha",
        ALICE,
        &call(3, "notify", "{}"),
        Some(&alice_sid),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut stream, &mut rest);
    assert!(read.is_ok(), "stream did not end: {read:?}");
    assert!(!String::from_utf8_lossy(&rest).contains("list_changed"));
}

#[test]
fn a_reload_pointing_a_server_elsewhere_ends_its_sessions() {
    let first = DemoHttp::start(&["--name", "first"]);
    let second = DemoHttp::start(&["--name", "second"]);
    let server = |addr: std::net::SocketAddr| {
        format!(
            "[[upstream.servers]]\nname = \"web\"\ntransport = \"http\"\nurl = \"http://{addr}/mcp\"\n"
        )
    };
    let g = Gateway::start(&config(&server(first.addr)));
    let (name, sid) = init_at(&g, "/mcp/web", ALICE);
    assert_eq!(name, "first");
    g.rewrite_config(&config(&server(second.addr)));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("configuration reloaded", Duration::from_secs(5)));
    // The first server's session id is never handed to the second.
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(post_at(&g, "/mcp/web", ALICE, ping, Some(&sid)).status, 404);
    assert_eq!(init_at(&g, "/mcp/web", ALICE).0, "second");
}

#[test]
fn a_stripped_prefix_remainder_goes_before_the_upstream_urls_query() {
    // `url = ".../mcp?tenant=a"`: `/web/extra` is `/mcp/extra?tenant=a` upstream, not
    // `/mcp?tenant=a/extra` (a query the upstream would read as `a/extra`).
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut line = String::new();
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            if reader.read_line(&mut line).is_ok() {
                let _ = tx.send(line.trim_end().to_string());
            }
            let _ = (&conn).write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let servers = format!(
        "[[upstream.servers]]\nname = \"web\"\ntransport = \"http\"\nurl = \"http://{addr}/mcp?tenant=a\"\npath_prefix = \"/web\"\nstrip_prefix = true\n{}",
        stdio_server("local", "")
    );
    let g = Gateway::start(&config(&servers));
    let r = post_at(&g, "/web/extra", ALICE, INIT, None);
    assert_eq!(r.status, 404, "{}", r.text());
    let seen: Vec<String> = rx.try_iter().collect();
    assert!(
        seen.iter()
            .any(|l| l == "POST /mcp/extra?tenant=a HTTP/1.1"),
        "{seen:?}"
    );
}
