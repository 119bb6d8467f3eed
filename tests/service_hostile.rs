//! Hostile clients: a body trickled byte by byte is cut off with 408 while
//! others are served; so is a head that never ends; a body declared too
//! large is refused before any of it is read; too many headers, or too
//! large a head, get 431.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use walden::service::Spawned;

fn service(dir: &std::path::Path, extra: &str) -> Spawned {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{0}\"\n{extra}\n\
         [namespaces.ns.backend]\ntype = \"embedded\"\n[namespaces.ns.target]\ntype = \"file\"\npath = \"{0}/out.jsonl\"\n",
        dir.display()
    );
    let config = walden::config::from_toml(&text).unwrap();
    walden::config::validate(&config).unwrap();
    Spawned::start(config).unwrap()
}

/// What the server sent until it closed the connection or `limit` passed;
/// and whether it closed.
fn read_answer(conn: &mut TcpStream, limit: Duration) -> (String, bool) {
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

fn head(addr: SocketAddr, extra_headers: &str, length: usize) -> String {
    format!(
        "POST /v1/namespaces/ns/log HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {length}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path(), "body_timeout_ms = 1000");
    let addr = svc.addr;
    let slow = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(head(addr, "", 100).as_bytes()).unwrap();
        let start = Instant::now();
        // One byte every 100 ms: the whole body would take 10 s.
        for _ in 0..25 {
            if conn.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            conn.set_nonblocking(true).unwrap();
            let mut peek = [0u8; 1];
            let answered = matches!(conn.peek(&mut peek), Ok(n) if n > 0);
            conn.set_nonblocking(false).unwrap();
            if answered {
                break;
            }
        }
        let (answer, closed) = read_answer(&mut conn, Duration::from_secs(3));
        (answer, closed, start.elapsed())
    });
    // Others are served meanwhile.
    let client = reqwest::Client::new();
    for i in 0..10 {
        let r = client
            .post(format!("http://{addr}/v1/namespaces/ns/log"))
            .json(&serde_json::json!({"payload": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (answer, closed, took) = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout_ms"), "{answer}");
    assert!(closed, "the connection stays open: {answer}");
    assert!(took < Duration::from_secs(3), "cut off after {took:?}");
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_never_ends_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path(), "request_head_timeout_ms = 500");
    let addr = svc.addr;
    let (answer, closed, took) = tokio::task::spawn_blocking(move || {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"POST /v1/namespaces/ns/log HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let start = Instant::now();
        let (answer, closed) = read_answer(&mut conn, Duration::from_secs(5));
        (answer, closed, start.elapsed())
    })
    .await
    .unwrap();
    assert!(closed, "still open after {took:?}: {answer}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    svc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_too_large_is_refused_unread_and_headers_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path(), "max_body_bytes = 1048576");
    let addr = svc.addr;
    let ask = move |request: String| {
        let mut conn = TcpStream::connect(addr).unwrap();
        let _ = conn.write_all(request.as_bytes());
        read_answer(&mut conn, Duration::from_secs(3)).0
    };
    let answers = tokio::task::spawn_blocking(move || {
        let huge = ask(head(addr, "", 1 << 30));
        let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
        let many = ask(head(addr, &many, 2) + "{}");
        let long = ask(head(addr, &format!("X-Long: {}\r\n", "a".repeat(200 << 10)), 2) + "{}");
        (huge, many, long)
    })
    .await
    .unwrap();
    let (huge, many, long) = answers;
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    assert!(huge.contains("max_body_bytes"), "{huge}");
    assert!(many.starts_with("HTTP/1.1 431"), "{many}");
    assert!(long.starts_with("HTTP/1.1 431"), "{long}");
    svc.stop();
}
