//! Audit shipping to a SIEM: a real loopback HTTP receiver that is stopped and restarted while
//! events flow, a gateway restarted with events in its spool, the spool's bound, shutdown, and
//! hostile fields and secrets.

mod common;

use common::*;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "sekrit-hec-token-4242";

/// The receiver takes the batch.
const ANSWER_OK: u8 = 0;
/// The receiver refuses it with 503 (the POST is not recorded).
const ANSWER_503: u8 = 1;
/// The receiver sends 2 MiB that never become an HTTP head (not recorded).
const ANSWER_GARBAGE: u8 = 2;

/// One POST the receiver took.
#[derive(Debug, Clone)]
struct Post {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A loopback SIEM: records every POST and answers 200; can be stopped (connections refused)
/// and started again on the same port.
struct Siem {
    addr: SocketAddr,
    posts: Arc<Mutex<Vec<Post>>>,
    /// How it answers: [`ANSWER_OK`], [`ANSWER_503`] or [`ANSWER_GARBAGE`].
    answer: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Siem {
    fn start() -> Siem {
        Self::start_on("127.0.0.1:0".parse().unwrap(), Arc::default())
    }

    fn start_on(addr: SocketAddr, posts: Arc<Mutex<Vec<Post>>>) -> Siem {
        let listener = TcpListener::bind(addr).expect("bind the SIEM");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let answer = Arc::new(AtomicU8::new(ANSWER_OK));
        let (stop2, posts2, answer2) = (stop.clone(), posts.clone(), answer.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        if let Some(post) = serve(s, answer2.load(Ordering::Relaxed)) {
                            posts2.lock().unwrap().push(post);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Siem {
            addr,
            posts,
            answer,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops listening: from now on connections are refused.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// Starts again on the same port, keeping what was recorded.
    fn restart(&mut self) {
        self.stop();
        *self = Siem::start_on(self.addr, self.posts.clone());
    }

    fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    /// Every event received, in arrival order (a JSON-array body per POST).
    fn events(&self) -> Vec<serde_json::Value> {
        self.posts()
            .iter()
            .flat_map(|p| {
                let v: serde_json::Value = serde_json::from_slice(&p.body).expect("a JSON array");
                v.as_array().expect("a JSON array").clone()
            })
            .collect()
    }

    /// Waits until the distinct event ids received include all of `want`.
    fn wait_for(&self, want: &HashSet<String>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let got: HashSet<String> = self.events().iter().map(event_id).collect();
            if want.is_subset(&got) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Siem {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request and answers it as `answer` says; returns it when it was taken.
fn serve(mut s: TcpStream, answer: u8) -> Option<Post> {
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let (head_len, headers, length) = loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            let headers: Vec<(String, String)> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, headers, length);
        }
    };
    while raw.len() < head_len + length {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    match answer {
        ANSWER_503 => {
            let _ = s.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
            return None;
        }
        ANSWER_GARBAGE => {
            let _ = s.write_all(&vec![b'x'; 2 << 20]);
            return None;
        }
        _ => {}
    }
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        .ok()?;
    Some(Post {
        headers,
        body: raw[head_len..head_len + length].to_vec(),
    })
}

fn event_id(v: &serde_json::Value) -> String {
    v["event_id"].as_str().expect("an event_id").to_string()
}

/// The ids in the audit file (every event the gateway wrote).
fn file_ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| event_id(&serde_json::from_str(l).expect("an audit line")))
        .collect()
}

/// Waits until the audit file holds at least `n` events and returns their ids.
fn wait_file_ids(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ids = file_ids(path);
        if ids.len() >= n || Instant::now() > deadline {
            return ids;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that, per writer queue (`<run>-<queue>-<seq>`), the first arrival of each event
/// is in sequence order.
fn assert_in_order_per_queue(events: &[serde_json::Value]) {
    let mut seen = HashSet::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        let id = event_id(e);
        if !seen.insert(id.clone()) {
            continue;
        }
        let (queue, seq) = id.rsplit_once('-').unwrap();
        let seq: u64 = seq.parse().unwrap();
        let prev = last.insert(queue.to_string(), seq).unwrap_or(0);
        assert!(seq > prev, "event {id} arrived after #{prev} of its queue");
    }
}

fn siem_config(siem_url: &str, spool: &Path, file: &Path, extra: &str) -> String {
    format!(
        "{}\n[rate_limit]\nenabled = false\n[audit]\nfile = {file:?}\nexport_url = \"{siem_url}\"\nexport_batch_size = 5\nexport_interval_secs = 1\nexport_headers = {{ Authorization = \"Splunk {SECRET}\" }}\nspool_dir = {spool:?}\n{extra}\n",
        stdio_config("auto", "shutdown_grace_secs = 2", &[])
    )
}

/// Sends `n` pings over `conns` connections (so both workers' queues carry events).
fn pings(addr: SocketAddr, sid: &str, n: usize, conns: usize) {
    let mut streams: Vec<TcpStream> = (0..conns).map(|_| connect(addr)).collect();
    for i in 0..n {
        let s = &mut streams[i % conns];
        s.write_all(ping_raw(i as u32 + 10, sid).as_bytes())
            .unwrap();
        assert_eq!(read_response(s).unwrap().status, 200);
    }
}

fn assert_no_secret(g: &Gateway) {
    let logs = g.logs.lock().unwrap().join("\n");
    assert!(
        !logs.contains(SECRET),
        "the SIEM token is in the logs:\n{logs}"
    );
    let metrics = g.admin_get("/metrics").text();
    assert!(
        !metrics.contains(SECRET),
        "the SIEM token is in the metrics"
    );
}

#[test]
fn events_survive_a_siem_outage_in_order_and_at_least_once() {
    // The shipper runs beside the workers, but the events come from them: both drivers.
    for io in DRIVERS {
        siem_outage(io);
    }
}

fn siem_outage(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
    let mut siem = Siem::start();
    let cfg = siem_config(&siem.url(), &spool, &file, "")
        .replace("io = \"auto\"", &format!("io = \"{io}\""));
    let g = Gateway::start(&cfg);
    assert!(g.wait_log(&format!("{io} driver"), Duration::from_secs(5)));
    let sid = initialize(g.addr);
    pings(g.addr, &sid, 20, 4);
    let before: HashSet<String> = wait_file_ids(&file, 22).into_iter().collect();
    assert!(
        siem.wait_for(&before, Duration::from_secs(15)),
        "first events not shipped"
    );

    // The SIEM goes away while events keep coming: they wait in the spool.
    siem.stop();
    pings(g.addr, &sid, 30, 4);
    let deadline = Instant::now() + Duration::from_secs(15);
    while g.metric("mcp_guard_audit_export_events_spooled_total", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "nothing was spooled");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(g.metric("mcp_guard_audit_export_retries_total", &[]) >= 1.0);
    assert!(g.metric("mcp_guard_audit_export_spool_bytes", &[]) > 0.0);

    // Back: everything the gateway wrote arrives, per queue in order, none lost.
    siem.restart();
    let all: HashSet<String> = wait_file_ids(&file, 52).into_iter().collect();
    assert!(all.len() >= 52, "{} events written", all.len());
    assert!(
        siem.wait_for(&all, Duration::from_secs(30)),
        "events lost across the outage"
    );
    let events = siem.events();
    assert_in_order_per_queue(&events);
    let received: HashSet<String> = events.iter().map(event_id).collect();
    assert_eq!(received, all, "the SIEM got events the file does not have");
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.metric("mcp_guard_audit_export_spool_bytes", &[]) > 0.0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        g.metric("mcp_guard_audit_export_events_dropped_total", &[]),
        0.0
    );
    assert!(g.metric("mcp_guard_audit_export_events_shipped_total", &[]) >= 52.0);
    assert!(g.metric("mcp_guard_audit_export_duration_seconds_count", &[]) >= 1.0);
    // The user's header reached the SIEM on every POST, and nowhere else.
    for p in siem.posts() {
        let auth = p.headers.iter().find(|(n, _)| n == "authorization");
        assert_eq!(
            auth.map(|(_, v)| v.as_str()),
            Some(&*format!("Splunk {SECRET}"))
        );
        assert!(
            p.headers
                .iter()
                .any(|(n, v)| n == "content-type" && v == "application/json")
        );
    }
    assert_no_secret(&g);
}

#[test]
fn a_restarted_gateway_ships_what_its_spool_held() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
    // A SIEM address with nothing listening yet.
    let mut siem = Siem::start();
    siem.stop();
    let cfg = siem_config(&siem.url(), &spool, &file, "");
    let mut g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    pings(g.addr, &sid, 12, 2);
    let written: HashSet<String> = wait_file_ids(&file, 14).into_iter().collect();
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        g.wait_log(
            "stay in the spool for the next start",
            Duration::from_secs(2)
        ),
        "{}",
        g.logs.lock().unwrap().join("\n")
    );
    assert!(
        std::fs::read_dir(&spool).unwrap().count() > 1,
        "an empty spool"
    );
    assert_no_secret_in_logs(&g);
    drop(g);
    // As if a crash had cut a write short: half a record at the end of the last segment.
    let mut segments: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let mut last = std::fs::OpenOptions::new()
        .append(true)
        .open(segments.last().expect("a segment"))
        .unwrap();
    last.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(last);

    // The SIEM is back and so is the gateway: the spool goes first.
    siem.restart();
    let g = Gateway::start(&cfg);
    assert!(g.wait_log("from a previous run", Duration::from_secs(5)));
    assert!(
        siem.wait_for(&written, Duration::from_secs(30)),
        "spooled events not shipped after the restart"
    );
    assert_in_order_per_queue(&siem.events());
    // The torn record was skipped and counted, and cost nothing else.
    assert_eq!(
        g.metric_settles(
            "mcp_guard_audit_export_events_dropped_total",
            &[("reason", "corrupt")],
            1.0
        ),
        1.0
    );
    assert_no_secret(&g);
}

fn assert_no_secret_in_logs(g: &Gateway) {
    let logs = g.logs.lock().unwrap().join("\n");
    assert!(!logs.contains(SECRET), "{logs}");
}

#[test]
fn sigterm_flushes_queued_events_to_the_siem() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
    let siem = Siem::start();
    // A long interval and a big batch: only the shutdown can send these.
    let cfg = siem_config(&siem.url(), &spool, &file, "")
        .replace("export_batch_size = 5", "export_batch_size = 1000")
        .replace("export_interval_secs = 1", "export_interval_secs = 600");
    let mut g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    pings(g.addr, &sid, 5, 1);
    let written: HashSet<String> = wait_file_ids(&file, 7).into_iter().collect();
    assert!(siem.events().is_empty());
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(siem.wait_for(&written, Duration::from_secs(1)));
    let left: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(left, 0, "nothing should be left in the spool");
}

#[test]
fn the_spool_bound_drops_the_oldest_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
    let mut siem = Siem::start();
    siem.stop();
    let max = 65_536u64;
    let cfg = siem_config(
        &siem.url(),
        &spool,
        &file,
        &format!("include_arguments = true\nspool_max_bytes = {max}\n"),
    );
    let g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    // ~4 KiB of arguments per event: about 40 events exceed the bound.
    let blob = "y".repeat(4000);
    let mut s = connect(g.addr);
    for i in 0..60 {
        let body = call(100 + i, "echo", &format!(r#"{{"text":"{blob}"}}"#));
        s.write_all(mcp_post_raw(&body, Some(&sid), "").as_bytes())
            .unwrap();
        read_response(&mut s).unwrap();
    }
    let written = wait_file_ids(&file, 62);
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.metric(
        "mcp_guard_audit_export_events_dropped_total",
        &[("reason", "spool_full")],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the bound was never hit");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The SIEM was never up: every event goes through the spool exactly once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.metric("mcp_guard_audit_export_events_spooled_total", &[]) < written.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "not every event reached the spool"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let on_disk: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(on_disk <= max, "{on_disk} bytes spooled, bound {max}");
    assert!(g.metric("mcp_guard_audit_export_spool_bytes", &[]) <= max as f64);
    let dropped = g.metric(
        "mcp_guard_audit_export_events_dropped_total",
        &[("reason", "spool_full")],
    ) as usize;

    // When the SIEM returns, what is left arrives: the newest events, the oldest dropped.
    siem.restart();
    let newest: HashSet<String> = written[written.len() - 5..].iter().cloned().collect();
    // The spool drains in order: once the newest are in, so is everything kept.
    assert!(siem.wait_for(&newest, Duration::from_secs(30)));
    let received: HashSet<String> = siem.events().iter().map(event_id).collect();
    assert_eq!(
        received.len() + dropped,
        written.len(),
        "every event is either shipped or counted as dropped"
    );
    assert!(
        !received.contains(&written[0]),
        "the oldest should have gone"
    );
}

#[test]
fn hostile_fields_are_escaped_and_bounded_in_cef() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
    let siem = Siem::start();
    // Tool names as the upstream may define them: not limited to the strict set.
    let cfg = siem_config(
        &siem.url(),
        &spool,
        &file,
        "format = \"cef\"\ninclude_arguments = true\n",
    )
    .replace(
        "shutdown_grace_secs = 2",
        "shutdown_grace_secs = 2\nstrict_tool_names = false",
    );
    let g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    let evil = r#"x\nCEF:0|evil|evil|1|1|1|10|src=6.6.6.6 act=allow\r\n=|\\"#;
    let huge = "z".repeat(50_000);
    let body = call(7, evil, &format!(r#"{{"text":"{huge}","k":"{evil}"}}"#));
    let r = request(
        g.addr,
        &mcp_post_raw(&body, Some(&sid), "X-Request-Id: a|b=c\\d|suser=root\r\n"),
    );
    assert!(
        r.status == 200 || r.status == 403,
        "{} {}",
        r.status,
        r.text()
    );
    let written = wait_file_ids(&file, 3);
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text: String = siem
            .posts()
            .iter()
            .map(|p| String::from_utf8(p.body.clone()).unwrap())
            .collect();
        if text.lines().count() >= written.len() || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        text.lines().count(),
        written.len(),
        "one line per event:\n{text}"
    );
    for line in text.lines() {
        assert!(line.starts_with("CEF:0|mcp-guard|mcp-guard|"), "{line}");
        assert!(
            line.len() < 16 * 1024,
            "an unbounded line: {} bytes",
            line.len()
        );
        // The injected `src=` and `act=` stay inside an escaped value.
        assert_eq!(line.matches(" src=").count(), 1, "{line}");
        assert_eq!(line.matches(" act=").count(), 1, "{line}");
    }
    let call_line = text.lines().find(|l| l.contains("cs1=tools/call")).unwrap();
    assert!(call_line.contains("src\\=6.6.6.6"), "{call_line}");
    assert!(
        call_line.contains("flexString1=a|b\\=c\\\\d|suser\\=root"),
        "{call_line}"
    );
    assert_eq!(call_line.matches("suser=").count(), 1, "{call_line}");
    assert!(
        call_line.contains("flexString2=true"),
        "the cut is marked: {call_line}"
    );
    assert!(siem.posts().iter().all(|p| {
        p.headers
            .iter()
            .any(|(n, v)| n == "content-type" && v.starts_with("text/plain"))
    }));
    assert_no_secret(&g);
}

#[test]
fn validate_and_a_refused_reload_never_show_the_export_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
    let siem = Siem::start();
    let cfg = siem_config(&siem.url(), &spool, &file, "");
    let path = dir.path().join("guard.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = std::process::Command::new(GUARD)
        .arg("validate")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
    // A bad header value is refused by name, its value not repeated.
    let bad = cfg.replace(
        &format!("Splunk {SECRET}\""),
        &format!("Splunk {SECRET}\\r\\nX-Injected: 1\""),
    );
    std::fs::write(&path, &bad).unwrap();
    let out = std::process::Command::new(GUARD)
        .arg("validate")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        shown.contains("audit.export_headers.Authorization"),
        "{shown}"
    );
    assert!(!shown.contains(SECRET), "{shown}");

    // A reload that changes the token needs a restart; the log names the key only.
    let g = Gateway::start(&cfg);
    g.rewrite_config(&cfg.replace(SECRET, "another-sekrit-value"));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("reload refused", Duration::from_secs(10)));
    let logs = g.logs.lock().unwrap().join("\n");
    assert!(logs.contains("audit.export_headers changed"), "{logs}");
    assert!(!logs.contains("another-sekrit-value"), "{logs}");
    assert_no_secret(&g);
}

#[test]
fn splunk_hec_and_elastic_bulk_bodies_carry_every_event() {
    for (format, content_type) in [
        ("splunk_hec", "application/json"),
        ("elastic_bulk", "application/x-ndjson"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
        let siem = Siem::start();
        let cfg = siem_config(
            &siem.url(),
            &spool,
            &file,
            &format!("format = \"{format}\"\n"),
        );
        let g = Gateway::start(&cfg);
        let sid = initialize(g.addr);
        pings(g.addr, &sid, 6, 2);
        let written: HashSet<String> = wait_file_ids(&file, 8).into_iter().collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        let received = loop {
            let mut ids = Vec::new();
            for p in siem.posts() {
                assert!(
                    p.headers
                        .iter()
                        .any(|(n, v)| n == "content-type" && v == content_type),
                    "{format}: {:?}",
                    p.headers
                );
                let values: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&p.body)
                    .into_iter()
                    .map(|v| v.expect("each body is a stream of JSON values"))
                    .collect();
                for (i, v) in values.iter().enumerate() {
                    match format {
                        "splunk_hec" => {
                            assert!(v["time"].as_f64().unwrap() > 1.7e9, "{v}");
                            assert_eq!(v["sourcetype"], "mcp-guard:audit");
                            ids.push(event_id(&v["event"]));
                        }
                        _ if i % 2 == 0 => {
                            assert_eq!(v["create"]["_id"], values[i + 1]["event_id"], "{v}")
                        }
                        _ => ids.push(event_id(v)),
                    }
                }
                if format == "elastic_bulk" {
                    assert!(p.body.ends_with(b"\n"), "a bulk body ends with a newline");
                }
            }
            if ids.len() >= written.len() || Instant::now() > deadline {
                break ids;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            received.iter().cloned().collect::<HashSet<_>>(),
            written,
            "{format}"
        );
    }
}

#[test]
fn a_siem_that_refuses_or_answers_garbage_gets_everything_once_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, file) = (dir.path().join("spool"), dir.path().join("audit.jsonl"));
    let siem = Siem::start();
    siem.answer.store(ANSWER_GARBAGE, Ordering::Relaxed);
    let g = Gateway::start(&siem_config(&siem.url(), &spool, &file, ""));
    let sid = initialize(g.addr);
    pings(g.addr, &sid, 10, 2);
    let wait_retries = |n: f64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while g.metric("mcp_guard_audit_export_retries_total", &[]) < n {
            assert!(Instant::now() < deadline, "fewer than {n} retries");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_retries(1.0);
    assert!(g.wait_log(
        "cannot ship audit events to the SIEM",
        Duration::from_secs(5)
    ));
    siem.answer.store(ANSWER_503, Ordering::Relaxed);
    let after_garbage = g.metric("mcp_guard_audit_export_retries_total", &[]);
    wait_retries(after_garbage + 1.0);
    assert!(g.wait_log("it answered HTTP 503", Duration::from_secs(5)));
    assert!(siem.posts().is_empty());
    siem.answer.store(ANSWER_OK, Ordering::Relaxed);
    let written: HashSet<String> = wait_file_ids(&file, 12).into_iter().collect();
    assert!(siem.wait_for(&written, Duration::from_secs(30)));
    assert!(g.wait_log("takes events again", Duration::from_secs(5)));
    assert_in_order_per_queue(&siem.events());
    assert_eq!(
        g.metric("mcp_guard_audit_export_events_dropped_total", &[]),
        0.0
    );
    assert_no_secret(&g);
}
