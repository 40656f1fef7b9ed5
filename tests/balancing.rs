//! A server with several `urls`, through the real binary: new sessions spread over the
//! replicas (`round_robin`, `least_outstanding`), each session stays on its replica, a dead
//! replica is ejected (its sessions fail, never move; new sessions go elsewhere; `/ready` says
//! so) and comes back when healthy, a replica answering as another server ends the sessions
//! opened on it, every replica down fails at once with 503 naming the server, and a session id
//! edited to name another replica is unknown.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A gateway whose only server, `web` at `/mcp/web`, has these replicas.
fn config(urls: &[String], policy: &str, timeout_secs: u64) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[server]\nport = 0\nworkers = 2\n[admin]\nport = 0\n[upstream]\ntimeout_secs = {timeout_secs}\n[[upstream.servers]]\nname = \"web\"\ntransport = \"http\"\nurls = [{}]\nload_balance = \"{policy}\"\n",
        urls.join(", ")
    )
}

const VERSION: &str = "MCP-Protocol-Version: 2025-11-25\r\n";

fn post(g: &Gateway, body: &str, sid: Option<&str>) -> Response {
    request(g.addr, &mcp_post_raw_at("/mcp/web", body, sid, VERSION))
}

/// Initializes a session at `web`; returns (the replica's serverInfo name, session id).
fn init(g: &Gateway) -> (String, String) {
    initialize_at(g.addr, "/mcp/web", VERSION)
}

fn ping(g: &Gateway, sid: &str) -> Response {
    post(g, r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#, Some(sid))
}

/// `/ready`'s entry for replica `i` of `web`.
fn replica(g: &Gateway, i: usize) -> serde_json::Value {
    g.admin_get("/ready").json()["upstreams"]["web"]["replicas"][i].clone()
}

/// Polls `/ready` until `cond` holds for `web`'s entry.
fn wait_ready(g: &Gateway, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let v = g.admin_get("/ready").json();
        if cond(&v["upstreams"]["web"]) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A demo server on a given address (to bring a replica back where it was).
fn demo_at(addr: std::net::SocketAddr, name: &str) -> DemoHttp {
    // The later `--http` wins over the helper's port 0.
    DemoHttp::start(&["--http", &addr.to_string(), "--name", name])
}

#[test]
fn round_robin_spreads_new_sessions_and_each_session_stays_on_its_replica() {
    let ups: Vec<DemoHttp> = (0..3)
        .map(|i| DemoHttp::start(&["--name", &format!("r{i}")]))
        .collect();
    let g = Gateway::start(&config(
        &ups.iter().map(DemoHttp::url).collect::<Vec<_>>(),
        "round_robin",
        10,
    ));
    let sessions: Vec<(String, String)> = (0..6).map(|_| init(&g)).collect();
    let mut names: Vec<&str> = sessions.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["r0", "r0", "r1", "r1", "r2", "r2"]);
    // Each replica knows only its own sessions (another one answers 404): every request of a
    // session reaching its replica is what 200 proves.
    for _ in 0..3 {
        for (name, sid) in &sessions {
            let r = ping(&g, sid);
            assert_eq!(r.status, 200, "session on {name}: {}", r.text());
        }
    }
    let ready = g.admin_get("/ready").json();
    assert_eq!(ready["upstreams"]["web"]["load_balance"], "round_robin");
    assert_eq!(
        ready["upstreams"]["web"]["replicas"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn least_outstanding_sends_new_sessions_to_the_idle_replica() {
    let a = DemoHttp::start(&["--name", "a"]);
    let b = DemoHttp::start(&["--name", "b"]);
    let g = Gateway::start(&config(&[a.url(), b.url()], "least_outstanding", 30));
    let (busy, sid) = init(&g);
    let i = if busy == "a" { 0 } else { 1 };
    // A request counts until its reply is written, a moment after the client has it: wait
    // for `replica`'s count to settle at `n`.
    let settle = |replica_index: usize, n: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while replica(&g, replica_index)["in_flight"] != n {
            assert!(Instant::now() < deadline, "{}", replica(&g, replica_index));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    settle(i, 0);
    std::thread::scope(|s| {
        // Long enough to outlast the new sessions below on a loaded machine.
        let slow = s.spawn(|| post(&g, &call(3, "sleep", r#"{"ms":6000}"#), Some(&sid)));
        // Until the slow call is under way.
        settle(i, 1);
        for _ in 0..4 {
            settle(1 - i, 0);
            let (name, _) = init(&g);
            assert_ne!(
                name,
                busy,
                "a new session went to the busy replica: {}",
                g.admin_get("/ready").text()
            );
        }
        assert_eq!(
            replica(&g, i)["in_flight"],
            1,
            "the slow call outlasted them"
        );
        assert_eq!(slow.join().unwrap().status, 200);
    });
    // Idle again: ties are taken in turn, so both get new sessions.
    let mut names: Vec<String> = (0..4)
        .map(|_| {
            settle(0, 0);
            settle(1, 0);
            init(&g).0
        })
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn a_dead_replica_is_ejected_its_sessions_fail_and_it_comes_back_when_healthy() {
    let mut a = DemoHttp::start(&["--name", "a"]);
    let b = DemoHttp::start(&["--name", "b"]);
    let a_addr = a.addr;
    let g = Gateway::start(&config(&[a.url(), b.url()], "round_robin", 10));
    wait_ready(&g, "checked", |w| {
        w["replicas"][0]["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("a "))
    });
    let mut on_a = None;
    let mut on_b = None;
    while on_a.is_none() || on_b.is_none() {
        let (name, sid) = init(&g);
        if name == "a" {
            on_a = Some(sid)
        } else {
            on_b = Some(sid)
        }
    }
    let (on_a, on_b) = (on_a.unwrap(), on_b.unwrap());
    let _ = a.child.kill();
    let _ = a.child.wait();
    // Its session fails, and is never answered by `b` (which would say 404: unknown there).
    let r = ping(&g, &on_a);
    assert!(
        r.status == 502 || r.status == 503,
        "{} {}",
        r.status,
        r.text()
    );
    wait_ready(&g, "ejected", |w| {
        w["replicas"][0]["ejected"] == true && w["replicas"][0]["ready"] == false
    });
    let r = ping(&g, &on_a);
    assert_eq!(r.status, 503, "{}", r.text());
    let err = &r.json()["error"];
    assert_eq!(err["data"]["server"], "web");
    assert!(err["message"].as_str().unwrap().contains("'web'"), "{err}");
    // New sessions go to `b`; `b`'s own session is untouched; the server is still ready.
    for _ in 0..4 {
        assert_eq!(init(&g).0, "b");
    }
    assert_eq!(ping(&g, &on_b).status, 200);
    let ready = g.admin_get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["upstreams"]["web"]["ready"], true);
    // Back where it was: a good check brings it back, and new sessions reach it again.
    let _a = demo_at(a_addr, "a");
    wait_ready(&g, "back", |w| w["replicas"][0]["ready"] == true);
    assert_eq!(replica(&g, 0)["ejected"], false);
    let names: Vec<String> = (0..4).map(|_| init(&g).0).collect();
    assert!(names.iter().any(|n| n == "a"), "{names:?}");
    // The old session went with the old process: the new one says so itself (its own 404).
    let r = ping(&g, &on_a);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        r.json()["error"]["code"],
        -32001,
        "the replica's own answer"
    );
}

#[test]
fn a_replica_answering_as_another_server_ends_its_sessions_instead_of_moving_them() {
    let mut a = DemoHttp::start(&["--name", "a"]);
    let b = DemoHttp::start(&["--name", "b"]);
    let a_addr = a.addr;
    let g = Gateway::start(&config(&[a.url(), b.url()], "round_robin", 10));
    wait_ready(&g, "checked", |w| {
        w["replicas"][0]["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("a "))
    });
    let on_a = loop {
        let (name, sid) = init(&g);
        if name == "a" {
            break sid;
        }
    };
    // Swapped for another server at once, before anything could eject it.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let _imposter = demo_at(a_addr, "imposter");
    assert!(
        g.wait_log("now answers as imposter", Duration::from_secs(15)),
        "the check never saw the new server"
    );
    // The gateway's own 404 (not the replica's): the session is over.
    let r = ping(&g, &on_a);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32000, "{}", r.text());
    assert_eq!(replica(&g, 0)["ready"], true, "it serves new sessions");
}

#[test]
fn every_replica_down_fails_at_once_with_503_naming_the_server() {
    // Ports that accept and never answer: a request there would wait for its whole timeout.
    let silent: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let urls: Vec<String> = silent
        .iter()
        .map(|l| format!("http://{}/mcp", l.local_addr().unwrap()))
        .collect();
    let g = Gateway::start(&config(&urls, "least_outstanding", 30));
    wait_ready(&g, "all ejected", |w| {
        (0..2).all(|i| w["replicas"][i]["ejected"] == true)
    });
    let started = Instant::now();
    let r = post(&g, INIT, None);
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(r.header("retry-after"), Some("2"));
    let err = &r.json()["error"];
    assert_eq!(err["code"], -32603);
    assert_eq!(err["data"]["server"], "web");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("Server 'web' is unavailable"),
        "{err}"
    );
    let ready = g.admin_get("/ready");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["upstreams"]["web"]["ready"], false);
    drop(silent);
}

#[test]
fn a_session_id_edited_to_name_another_replica_is_unknown() {
    let a = DemoHttp::start(&["--name", "a"]);
    let b = DemoHttp::start(&["--name", "b"]);
    let g = Gateway::start(&config(&[a.url(), b.url()], "round_robin", 10));
    let mut on = std::collections::HashMap::new();
    while on.len() < 2 {
        let (name, sid) = init(&g);
        on.insert(name, sid);
    }
    let payload = |sid: &str| B64.decode(sid.split_once('.').unwrap().0).unwrap();
    let (sid_a, sid_b) = (&on["a"], &on["b"]);
    // The payload names the replica (bytes 1..9); put b's there, keep a's MAC.
    let mut edited = payload(sid_a);
    edited[1..9].copy_from_slice(&payload(sid_b)[1..9]);
    let forged = format!(
        "{}.{}",
        B64.encode(&edited),
        sid_a.split_once('.').unwrap().1
    );
    let r = ping(&g, &forged);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32000, "the gateway's own 404");
    // The genuine ids still work.
    assert_eq!(ping(&g, sid_a).status, 200);
    assert_eq!(ping(&g, sid_b).status, 200);
}

#[test]
fn a_reload_that_drops_a_replica_ends_only_its_sessions() {
    let a = DemoHttp::start(&["--name", "a"]);
    let b = DemoHttp::start(&["--name", "b"]);
    let g = Gateway::start(&config(&[a.url(), b.url()], "round_robin", 10));
    let mut on = std::collections::HashMap::new();
    while on.len() < 2 {
        let (name, sid) = init(&g);
        on.insert(name, sid);
    }
    // `b` first now, `a` gone: b's session finds its replica wherever it stands.
    g.rewrite_config(&config(&[b.url()], "round_robin", 10));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("configuration reloaded", Duration::from_secs(5)));
    assert_eq!(ping(&g, &on["b"]).status, 200);
    let r = ping(&g, &on["a"]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32000);
    assert_eq!(init(&g).0, "b");
}
