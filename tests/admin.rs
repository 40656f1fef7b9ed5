//! The admin port against the real binary: slow clients cannot stop `/health` and `/metrics`
//! for everyone else, a trickling client is cut off at the head deadline, and connections
//! beyond the cap are answered 503 and counted.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A client that sends one byte of a never-ending request head every 500 ms; returns how long
/// the gateway let it go on before closing the connection (`None`: still open after `give_up`).
fn trickle(admin: SocketAddr, give_up: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(admin).unwrap();
    // The read doubles as the 500 ms pause, and notices the close.
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let head = format!("GET /health HTTP/1.1\r\nX-Pad: {}", "a".repeat(1000));
    let start = Instant::now();
    let mut buf = [0u8; 256];
    for &b in head.as_bytes() {
        if start.elapsed() > give_up {
            return None;
        }
        if s.write_all(&[b]).is_err() {
            return Some(start.elapsed());
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => panic!("the admin port answered an incomplete request head"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn health_and_metrics_answer_promptly_while_clients_trickle_and_tricklers_are_cut_off() {
    let g = Gateway::start(&stdio_config("epoll", "", &[]));
    let admin = g.admin;
    let tricklers: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || trickle(admin, Duration::from_secs(15))))
        .collect();
    // Let every trickler be accepted and send a few bytes.
    std::thread::sleep(Duration::from_millis(700));
    let until = Instant::now() + Duration::from_secs(3);
    let mut probes = 0;
    while Instant::now() < until {
        for path in ["/health", "/metrics"] {
            let t = Instant::now();
            let r = g.admin_get(path);
            assert_eq!(r.status, 200, "{path}");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{path} took {:?} while clients trickle",
                t.elapsed()
            );
            probes += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(probes >= 10);
    for t in tricklers {
        let cut = t.join().unwrap().expect("a trickler must be cut off");
        // The deadline is 5 s for the whole head, not per read (each byte would reset that).
        assert!(
            cut >= Duration::from_millis(4500) && cut < Duration::from_secs(8),
            "trickler cut off after {cut:?}"
        );
    }
    assert!(g.metric("mcp_guard_admin_timeouts_total", &[]) >= 6.0);
}

#[test]
fn admin_connections_beyond_the_cap_get_503_and_are_counted() {
    let g = Gateway::start(&stdio_config("epoll", "", &[]));
    // 64 idle connections take every slot (each is served by its own task, waiting for a head),
    // from 8 loopback addresses, as one address may only hold 8.
    let idle: Vec<TcpStream> = (0..64)
        .map(|i| connect_from(&format!("127.0.0.{}", 2 + i / 8), g.admin))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = connect(g.admin);
    extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let r = read_response(&mut extra).expect("a 503");
    assert_eq!(r.status, 503);
    drop(idle);
    // The slots free as the gateway sees the idle connections close.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let mut s = connect(g.admin);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s).expect("a response");
        if r.status == 200 {
            let line = r
                .text()
                .lines()
                .find(|l| l.starts_with("mcp_guard_admin_connections_refused_total "))
                .map(str::to_string)
                .expect("the refusal counter");
            break line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        }
        assert!(Instant::now() < deadline, "admin slots never freed");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(refused >= 1.0, "refused = {refused}");
    assert_eq!(g.admin_get("/live").status, 200);
}

/// A connection to `to` from the loopback address `from` (any of 127.0.0.0/8).
fn connect_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

#[test]
fn one_address_cannot_take_every_admin_slot() {
    let g = Gateway::start(&stdio_config("epoll", "", &[]));
    let hog: Vec<TcpStream> = (0..8).map(|_| connect_from("127.0.0.9", g.admin)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut ninth = connect_from("127.0.0.9", g.admin);
    ninth
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut ninth).expect("a 503").status, 503);
    let mut probe = connect_from("127.0.0.10", g.admin);
    probe
        .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut probe).expect("an answer").status, 200);
    drop(hog);
}
