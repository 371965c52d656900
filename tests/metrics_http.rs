//! The metrics endpoint over real HTTP on 127.0.0.1: scrapes see counters grow, and garbage
//! requests get an error status without stopping the server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use wgbond::bond::{LinkState, LinkStats};
use wgbond::io::metrics::{LinkMetrics, MetricsServer, MetricsSnapshot, PeerMetrics, CONTENT_TYPE};

const STEP: u64 = 1500;

/// A server whose snapshot's byte counters grow by STEP on every scrape.
async fn start() -> SocketAddr {
    let server = MetricsServer::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = server.local_addr().expect("local addr");
    let scrapes = Arc::new(AtomicU64::new(0));
    tokio::spawn(server.serve(move || {
        let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
        let link = |name: &str, bytes| LinkMetrics {
            stats: LinkStats {
                name: name.to_owned(),
                state: Some(LinkState::Up),
                tx_bytes: bytes,
                rx_bytes: 2 * bytes,
                ..LinkStats::default()
            },
            since_handshake: Some(Duration::from_secs(1)),
        };
        MetricsSnapshot {
            interface: "wgb0".to_owned(),
            peers: vec![PeerMetrics {
                name: Some("hub".to_owned()),
                public_key: "x".to_owned(),
                links: vec![link("cable", n * STEP), link("lte", n * STEP / 3)],
                ..PeerMetrics::default()
            }],
            drops: Vec::new(),
        }
    }));
    addr
}

/// Sends `request` raw and returns the whole response (the server closes after one).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let work = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("response within 10 s")
}

fn status(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn tx_bytes(body: &str, link: &str) -> u64 {
    let series =
        format!(r#"wgbond_link_tx_bytes_total{{interface="wgb0",peer="hub",link="{link}"}} "#);
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

async fn scrape(addr: SocketAddr) -> String {
    let r = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
    assert_eq!(header(&r, "content-type"), Some(CONTENT_TYPE));
    let len: usize = header(&r, "content-length")
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    assert_eq!(len, body(&r).len());
    r
}

#[tokio::test]
async fn scrapes_over_http_show_growing_counters() {
    let addr = start().await;
    let first = scrape(addr).await;
    let second = scrape(addr).await;
    let (c1, c2) = (
        tx_bytes(body(&first), "cable"),
        tx_bytes(body(&second), "cable"),
    );
    assert!(c2 > c1, "cable tx bytes did not grow: {c1} -> {c2}");
    assert_eq!(c2 - c1, STEP);
    assert!(tx_bytes(body(&second), "lte") > tx_bytes(body(&first), "lte"));
    assert!(body(&second).ends_with("# EOF\n"));

    // HEAD: headers with the length, no body.
    let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&head), "HTTP/1.1 200 OK");
    assert!(body(&head).is_empty());
    // A request sent in pieces is still one request.
    let slow = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        for part in [&b"GET /met"[..], b"rics HTTP/1.1\r", b"\n\r\n"] {
            s.write_all(part).await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    };
    assert_eq!(status(&slow.await), "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn garbage_gets_errors_and_the_server_lives_on() {
    let addr = start().await;
    let cases: [(&[u8], &str); 6] = [
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (
            b"GET /favicon.ico HTTP/1.1\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
    ];
    for (request, want) in cases {
        let r = exchange(addr, request).await;
        assert_eq!(
            status(&r),
            want,
            "for {:?}",
            String::from_utf8_lossy(request)
        );
    }
    // An endless header is cut off, not buffered.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let r = exchange(addr, &huge).await;
    assert_eq!(status(&r), "HTTP/1.1 431 Request Header Fields Too Large");
    // Connections that close early or send nothing useful.
    for partial in [&b""[..], b"GET /metr", b"\0\0\0\0"] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(partial).await.expect("write");
        drop(s);
    }
    // Idle connections do not block a scrape.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let r = scrape(addr).await;
    assert!(tx_bytes(body(&r), "cable") > 0);
    drop(idle);
}

#[tokio::test]
async fn busy_port_is_a_clear_error() {
    let server = MetricsServer::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = server.local_addr().expect("addr");
    let err = MetricsServer::bind(addr).await.expect_err("port is taken");
    assert!(
        err.to_string().contains(&format!("metrics_listen {addr}")),
        "{err}"
    );
}
